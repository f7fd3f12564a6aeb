#!/usr/bin/env python
"""Is LEAP's learned allocation why it loses unstructured on the LLM? (an experiment for llm.py)

LEAP with magnitude scores keeps, in each matrix, its largest weights; what it learns is how many
(one threshold per matrix) and when (the density falls over the first ~50 steps, and a weight can
come back while it does). One-shot magnitude + fine-tuning keeps the same fraction of every matrix
from step 0. This piece separates the two: one-shot magnitude pruning with the per-matrix densities
a LEAP piece ended with (``history[-1]["groups"]`` of its result), then the same fine-tuning
budget with the mask fixed, exactly as llm.py's magnitude + fine-tuning. Its perplexity against

  - uniform magnitude + ft (llm.py's piece): the cost of LEAP's allocation, without its dynamics;
  - LEAP itself: the cost of LEAP's dynamics (gradual, moving masks), at its own allocation.

    python benchmarks/llm_allocation.py --leap-piece benchmarks/results/llm_cache/unstructured-0.5-leap-*.json \\
        --out benchmarks/results/llm_experiments/allocation.json
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks import llm  # noqa: E402


def allocation_of(piece: dict) -> tuple[dict, dict]:
    """The LEAP row of a piece result and each group's kept weights at its end."""
    leap = next(r for r in piece["rows"] if r["method"] == "leap")
    groups = leap["history"][-1].get("groups")
    if not groups:
        raise SystemExit("the LEAP piece has no per-group densities (run before llm.py recorded them): rerun it")
    return leap, {name: round(g["density"] * g["weights"]) for name, g in groups.items()}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--leap-piece", required=True, help="an unstructured LEAP piece result of llm.py")
    ap.add_argument("--out", required=True, help="where to write this experiment's rows (JSON)")
    ap.add_argument("--model", default="smollm2-135m", help="the model the LEAP piece pruned")
    ap.add_argument("--smoke", action="store_true", help="llm.py's --smoke sizes (a piece from llm.py --smoke)")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args(argv)
    piece = json.loads(Path(args.leap_piece).read_text())
    leap, kept = allocation_of(piece)
    if leap["leg"] != "unstructured":
        raise SystemExit(f"{args.leap_piece} is a {leap['leg']} piece: this experiment ranks single weights")
    torch.set_num_threads(args.threads)
    from leap_ds.apps.tasks.oneshot import oneshot_magnitude_per_group
    from leap_ds.integration.config import split_config
    # llm.py's defaults (or its --smoke sizes): the data, split and budget the LEAP piece had
    settings = argparse.Namespace(model=args.model, **{**llm.SIZES, **(llm.SMOKE_SIZES if args.smoke else {})})
    start = time.time()
    setup = llm.load_setup(settings)
    spec = {"leg": leap["leg"], "density": leap["target_density"]}
    raw = llm.leg_config(spec["leg"], spec["density"])
    _, section = split_config(raw)
    pruned, density = oneshot_magnitude_per_group(setup.dense, section, kept)
    rows = [llm.evaluated_row(spec, setup, "magnitude@leap", pruned, density, raw, start)]
    tuned = llm.fine_tune(pruned, setup.dense, setup.task, setup.train, settings.steps,
                          raw["optimizer"]["params"]["lr"], raw, seed=settings.seed)[0]
    rows.append(llm.evaluated_row(spec, setup, "magnitude@leap+ft", tuned, density, raw, start))
    Path(args.out).write_text(json.dumps({"leap_piece": Path(args.leap_piece).name, "rows": rows,
                                          "wall_s": round(time.time() - start)}, indent=1))
    return rows


if __name__ == "__main__":
    main()
