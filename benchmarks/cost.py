#!/usr/bin/env python
"""Cost benchmark: what LEAP adds to a DeepSpeed training step.

All parts use the real DeepSpeed engine through ``leap_ds.initialize`` (dense:
plain ``deepspeed.initialize``), each part in its own ``torchrun`` launch:

  (a) step time and peak memory, LEAP vs the same dense training (same model,
      batch, optimizer, ZeRO stage 0), for unstructured, block 32x32 and head
      granularity (magnitude scores, ds_configs/default.json's shared parameters).
      Step time: every engine lives in one process and steps round-robin, so
      machine load hits all configurations alike; median of the timed steps.
      Memory: one process per configuration; peak RSS (ru_maxrss) and its growth
      from after engine construction to after the timed steps.
  (b) per-rank memory of LEAP's own state (thresholds and learned scores; masks
      are recomputed inside each forward and never stored) at ZeRO-3 with 1 and 2
      ranks: owned elements per rank counted with
      ``leap_ds.integration.zero.local_slice`` over ``engine.leap.parameters()``.
  (c) per-step LEAP overhead vs model size: random-init BERTs, 4 layers, hidden
      128/256/384/512 (heads = hidden/64, FFN = 4 x hidden), dense vs LEAP
      unstructured, round-robin as in (a).

    python benchmarks/cost.py                  # full run -> benchmarks/results/cost.md, cost.png, cost.json
    python benchmarks/cost.py --smoke --out /tmp/c
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks.machine import machine_info  # noqa: E402

ENCODER = (r"encoder\.layer\.\d+\.(attention\.self\.(query|key|value)|attention\.output\.dense"
           r"|intermediate\.dense|output\.dense)$")
GRANULARITIES = {
    "unstructured": {"encoder": {"params": {"granularity": "unstructured"}, "modules": [ENCODER]}},
    "block32x32": {"encoder": {"params": {"granularity": "block", "block_size": [32, 32]},
                               "modules": [ENCODER]}},
    "head": {"attention": {"params": {"granularity": "head"},
                           "modules": [r"encoder\.layer\.\d+\.attention\.output\.dense"],
                           "related_modules": [r"attention\.self\.query", r"attention\.self\.key",
                                               r"attention\.self\.value"]}},
    "unstructured_learned": {"encoder": {"params": {"granularity": "unstructured", "score": "learned"},
                                         "modules": [ENCODER]}},
}


# ----------------------------------------------------------------------------- helpers
def leap_shared(target=0.3, **over) -> dict:
    cfg = json.load(open(ROOT / "ds_configs" / "default.json"))
    shared = dict(cfg["compression_training"]["leap"]["shared_parameters"])
    shared.update(target_density=target, **over)
    return shared


def ds_config(batch: int, stage: int, world: int, groups: dict | None, steps: int, target: float = 0.3) -> dict:
    """default.json's optimizer, scheduler and clipping; micro batch = batch / world."""
    cfg = {
        "train_batch_size": batch,
        "train_micro_batch_size_per_gpu": batch // world,
        "optimizer": {"type": "AdamW", "params": {"lr": 5e-5, "weight_decay": 0.01, "torch_adam": True}},
        "scheduler": {"type": "WarmupDecayLR",
                      "params": {"warmup_min_lr": 0, "warmup_max_lr": 5e-5,
                                 "warmup_num_steps": max(1, steps // 10), "total_num_steps": max(2, steps)}},
        "zero_optimization": {"stage": stage},
        "gradient_clipping": 1.0,
        "steps_per_print": 10 ** 9,
    }
    if stage == 3:
        # partition every parameter, however small (LEAP's thresholds included)
        cfg["zero_optimization"]["stage3_param_persistence_threshold"] = 0
    if stage > 0:
        cfg["zero_allow_untested_optimizer"] = True
    if groups is not None:
        cfg["compression_training"] = {"leap": {"shared_parameters": leap_shared(target),
                                                "different_groups": groups}}
    return cfg


def minilm(num_labels=2):
    from transformers import AutoModelForSequenceClassification
    from leap_ds.apps.train import EMBEDDED_MODEL, resolve_model_path
    return AutoModelForSequenceClassification.from_pretrained(resolve_model_path(EMBEDDED_MODEL),
                                                              num_labels=num_labels)


def random_bert(hidden: int, layers: int = 4, vocab: int = 8192, seed: int = 0):
    import torch
    from transformers import BertConfig, BertForSequenceClassification
    torch.manual_seed(seed)
    cfg = BertConfig(vocab_size=vocab, hidden_size=hidden, num_hidden_layers=layers,
                     num_attention_heads=max(1, hidden // 64) if hidden >= 64 else 2,
                     intermediate_size=4 * hidden, max_position_embeddings=128, num_labels=2)
    return BertForSequenceClassification(cfg)


def make_model(spec: dict):
    if spec["model"] == "minilm":
        return minilm()
    return random_bert(spec["hidden"], spec.get("layers", 4), spec.get("vocab", 8192))


def batch_for(model, batch: int, seq: int, seed: int = 0):
    import torch
    g = torch.Generator().manual_seed(seed)
    vocab = model.config.vocab_size
    return {"input_ids": torch.randint(1000 if vocab > 2000 else 1, vocab, (batch, seq), generator=g),
            "attention_mask": torch.ones(batch, seq, dtype=torch.long),
            "labels": torch.randint(0, 2, (batch,), generator=g)}


def quiet():
    import logging
    import transformers
    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    logging.getLogger("DeepSpeed").setLevel(logging.WARNING)
    try:
        import deepspeed
        deepspeed.utils.logger.setLevel(logging.WARNING)
    except Exception:
        pass


def build_engine(spec: dict, groups: dict | None, batch: int, stage: int, world: int, steps: int):
    import deepspeed
    import torch
    import leap_ds
    torch.manual_seed(0)
    model = make_model(spec)
    cfg = ds_config(batch, stage, world, groups, steps)
    if groups is None:
        engine, *_ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=cfg)
    else:
        engine, *_ = leap_ds.initialize(model=model, model_parameters=model.parameters(), config=cfg)
    return engine


def train_step(engine, batch):
    loss = engine(**batch).loss
    engine.backward(loss)
    engine.step()
    return float(loss.detach())


def rss_mb() -> float:
    import psutil
    return psutil.Process().memory_info().rss / 2 ** 20


def peak_rss_mb() -> float:
    import resource
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def round_robin(engines: dict, batches: dict, warmup: int, steps: int) -> dict:
    """Step every engine once per round, rotating the order; per-engine step times and, against
    "dense", the median of per-round ratios (load bursts hit both steps of a round alike).
    Wall clock (``perf_counter``) and this thread's CPU time (``thread_time``: one torch thread,
    so the step's compute; time spent waiting for a core of a shared machine is not in it)."""
    times = {k: [] for k in engines}
    cpu = {k: [] for k in engines}
    names = list(engines)
    for r in range(warmup + steps):
        order = names[r % len(names):] + names[:r % len(names)]
        for k in order:
            t0, c0 = time.perf_counter(), time.thread_time()
            train_step(engines[k], batches[k])
            dt, dc = time.perf_counter() - t0, time.thread_time() - c0
            if r >= warmup:
                times[k].append(dt)
                cpu[k].append(dc)
    out = {k: {"median_s": statistics.median(v), "mean_s": statistics.fmean(v), "min_s": min(v),
               "max_s": max(v), "steps": len(v), "times_s": v,
               "cpu_median_s": statistics.median(cpu[k]), "cpu_times_s": cpu[k]} for k, v in times.items()}
    if "dense" in times:
        for k, v in times.items():
            out[k]["paired_ratio"] = statistics.median(a / b for a, b in zip(v, times["dense"]))
            out[k]["cpu_paired_ratio"] = statistics.median(a / b for a, b in zip(cpu[k], cpu["dense"]))
    return out


def mask_time(engine, repeats: int = 3) -> float:
    """Seconds LEAP spends computing every group's hard mask once (what each forward adds before the
    masked matmuls): unit scores + top-k, as LeapPruner does in the forward; for one-weight units
    (unstructured) the fused masked weight, which includes the multiply."""
    import torch
    from leap_ds.algorithm.pruner import _logical_weight
    pruner = engine.leap
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        with torch.no_grad():
            for g in pruner.groups:
                if g.fused:
                    g.module(weight=_logical_weight(g.members[0]), record=False)   # mask and masked weight in one
                elif g.module.needs_weight_scores:
                    g.module(g.members[0].layout.unit_sq_norms(_logical_weight(g.members[0])), record=False)
                else:   # learned scores, or unit norms the pruner keeps for multi-matrix units
                    g.module(record=False, set_index=g.plan.set_index)
        best = min(best, time.perf_counter() - t0)
    return best


# ----------------------------------------------------------------------------- workers (inside torchrun)
def worker(args):
    import deepspeed
    import deepspeed.comm as dist
    import torch
    from leap_ds.apps import device as placement
    quiet()
    torch.set_num_threads(args.threads)
    deepspeed.init_distributed(dist_backend="gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    spec = json.loads(args.spec)
    out = {"rank": rank, "world": world, "threads": torch.get_num_threads()}

    if args.worker == "timing":       # (a) and (c): dense + LEAP engines, round-robin
        engines, batches = {}, {}
        for name in spec["configs"]:
            groups = None if name == "dense" else GRANULARITIES[name]
            engines[name] = build_engine(spec, groups, spec["batch"], 0, world, spec["warmup"] + spec["steps"])
            batches[name] = placement.to_device(batch_for(engines[name].module, spec["batch"], spec["seq"]),
                                                engines[name].device)
        out["loadavg_before"] = os.getloadavg()
        out["timing"] = round_robin(engines, batches, spec["warmup"], spec["steps"])
        out["loadavg_after"] = os.getloadavg()
        leap = next((e.leap for e in engines.values() if getattr(e, "leap", None) is not None), None)
        dense = engines.get("dense")
        if dense is not None:
            out["model_params"] = sum(p.numel() for p in dense.module.parameters())
        if leap is not None:
            out["prunable_weights"] = leap.report()["prunable_weights"]
        out["densities"] = {k: e.leap.report()["global_density"] for k, e in engines.items()
                            if getattr(e, "leap", None) is not None}
        out["mask_s"] = {k: mask_time(e) for k, e in engines.items() if getattr(e, "leap", None) is not None}

    elif args.worker == "memory":     # (a): one configuration per process
        name = spec["config"]
        rss0 = rss_mb()
        engine = build_engine(spec, None if name == "dense" else GRANULARITIES[name], spec["batch"], 0, world,
                              spec["warmup"] + spec["steps"])
        batch = placement.to_device(batch_for(engine.module, spec["batch"], spec["seq"]), engine.device)
        rss_init, peak_init = rss_mb(), peak_rss_mb()
        for _ in range(spec["warmup"] + spec["memory_steps"]):
            train_step(engine, batch)
        out.update(config=name, rss_start_mb=rss0, rss_after_init_mb=rss_init, peak_after_init_mb=peak_init,
                   rss_end_mb=rss_mb(), peak_rss_mb=peak_rss_mb())

    elif args.worker == "state":      # (b): LEAP's own parameters per rank at ZeRO-3
        from leap_ds.integration.zero import local_slice
        engine = build_engine(spec, GRANULARITIES[spec["config"]], spec["batch"], 3, world, 4)
        batch = placement.to_device(batch_for(engine.module, spec["batch"] // world, spec["seq"], seed=rank),
                                    engine.device)
        for _ in range(spec["steps"]):   # prove the partitioned state trains
            train_step(engine, batch)
        owned = {"threshold": [0, 0], "scores": [0, 0]}
        full = {"threshold": 0, "scores": 0}
        for kind in owned:
            for p in engine.leap.parameters(kind):
                flat, _ = local_slice(p)
                owned[kind][0] += flat.numel()
                owned[kind][1] += flat.numel() * flat.element_size()
                full[kind] += p.ds_numel if hasattr(p, "ds_numel") else p.numel()
        model_owned = sum(local_slice(p)[0].numel() for n, p in engine.module.named_parameters()
                          if ".leap_" not in n)
        opt_state = 0
        opt = engine.optimizer
        for attr in ("fp32_partitioned_groups_flat",):
            for t in getattr(opt, attr, []) or []:
                opt_state += t.numel()
        out.update(config=spec["config"], owned_elements={k: v[0] for k, v in owned.items()},
                   owned_bytes={k: v[1] for k, v in owned.items()}, full_elements=full,
                   model_owned_elements=model_owned, report_density=engine.leap.report()["global_density"],
                   zero_stage=engine.zero_optimization_stage())
    Path(f"{args.result}.rank{rank}.json").write_text(json.dumps(out, indent=1))
    dist.barrier()


# ----------------------------------------------------------------------------- orchestration
def launch(nproc: int, worker_name: str, spec: dict, work: Path, threads: int, timeout: int = 1800) -> list[dict]:
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    result = work / f"{worker_name}-{spec.get('config', '') or spec.get('tag', '')}-n{nproc}"
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", f"--master_port={port}",
           str(Path(__file__).resolve()), "--worker", worker_name, "--spec", json.dumps(spec),
           "--result", str(result), "--threads", str(threads)]
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    env.setdefault("TORCH_EXTENSIONS_DIR", str(ROOT / ".torch_extensions"))
    t0 = time.time()
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}")
    print(f"  {worker_name} {spec.get('config', spec.get('tag', ''))} x{nproc}: {time.time() - t0:.0f} s", flush=True)
    return [json.loads(Path(f"{result}.rank{r}.json").read_text()) for r in range(nproc)]


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    p.add_argument("--spec", default=None, help=argparse.SUPPRESS)
    p.add_argument("--result", default=None, help=argparse.SUPPRESS)
    p.add_argument("--local_rank", "--local-rank", type=int, default=-1, help=argparse.SUPPRESS)
    p.add_argument("--batch-size", type=int, default=None, help="(a) batch (default 32)")
    p.add_argument("--max-seq-length", type=int, default=None, help="(a), (c) tokens per row (default 48)")
    p.add_argument("--steps", type=int, default=None, help="timed steps per configuration (default 20)")
    p.add_argument("--memory-steps", type=int, default=None, help="steps of each memory process (default 4)")
    p.add_argument("--warmup", type=int, default=None, help="untimed steps first (default 2)")
    p.add_argument("--widths", default=None, help="(c) hidden sizes (default 128,256,384,512)")
    p.add_argument("--sizes-batch", type=int, default=None, help="(c) batch (default 32)")
    p.add_argument("--threads", type=int, default=1, help="torch threads per process")
    p.add_argument("--parts", default="a,b,c")
    p.add_argument("--smoke", action="store_true", help="tiny random BERTs, 2 steps; writes to --out or a temp dir")
    p.add_argument("--out", default=None)
    p.add_argument("--report-only", action="store_true",
                   help="rewrite cost.md and cost.png from OUT/cost.json (e.g. after adding OUT/cost_notes.md)")
    p.add_argument("--merge-a", default=None, metavar="DIR[,DIR...]",
                   help="put part (a) of several runs (their DIR/cost.json, e.g. from --parts a --out DIR) into "
                        "OUT/cost.json (default benchmarks/results; its parts b and c are kept) and rewrite the "
                        "report: per configuration the median and min-max over the runs")
    args = p.parse_args(argv)
    if args.worker:
        return worker(args)
    if args.merge_a:
        out = Path(args.out or ROOT / "benchmarks" / "results")
        res = json.loads((out / "cost.json").read_text())
        res["a_runs"] = []
        for d in args.merge_a.split(","):
            run = json.loads((Path(d) / "cost.json").read_text())
            res["a_runs"].append({"dir": d, **{k: run.get(k) for k in ("command", "wall_s", "loadavg", "machine",
                                                                         "settings", "a_timing", "a_memory")}})
        res.pop("a_timing", None)
        res.pop("a_memory", None)
        res["a_merge_command"] = f"python {os.path.relpath(__file__, ROOT)} --merge-a {args.merge_a}"
        json.dump(res, open(out / "cost.json", "w"), indent=1)
        write_report(res, out, smoke=False)
        return res
    if args.report_only:
        out = Path(args.out or ROOT / "benchmarks" / "results")
        res = json.loads((out / "cost.json").read_text())
        write_report(res, out, smoke=False)
        return res

    smoke = args.smoke
    d = dict(batch_size=8 if smoke else 32, max_seq_length=16 if smoke else 48, steps=2 if smoke else 20,
             memory_steps=2 if smoke else 4,
             warmup=1 if smoke else 2, widths="64" if smoke else "128,256,384,512",
             sizes_batch=8 if smoke else 32)
    for k, v in d.items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    widths = [int(w) for w in str(args.widths).split(",")]
    out = Path(args.out or (tempfile.mkdtemp(prefix="leap_cost_smoke_") if smoke else ROOT / "benchmarks" / "results"))
    out.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="leap_cost_work_"))
    parts = set(args.parts.split(","))
    command = "python " + " ".join([os.path.relpath(__file__, ROOT)] + list(sys.argv[1:] if argv is None else argv))
    t_start = time.time()
    base = {"model": "bert", "hidden": 64, "layers": 2, "vocab": 1024} if smoke else {"model": "minilm"}
    configs = ["dense", "unstructured", "block32x32", "head"]
    res = {"settings": {k: getattr(args, k) for k in ("batch_size", "max_seq_length", "steps", "warmup", "threads",
                                                       "sizes_batch", "memory_steps")},
           "widths": widths, "model": base, "command": command, "machine": machine_info()}
    common = {**base, "batch": args.batch_size, "seq": args.max_seq_length, "warmup": args.warmup,
              "steps": args.steps, "memory_steps": args.memory_steps}
    print(f"cost benchmark -> {out} (work {work})", flush=True)
    res["loadavg"] = {"before": os.getloadavg()}
    if "a" in parts:
        res["a_timing"] = launch(1, "timing", {**common, "configs": configs, "tag": "a"}, work, args.threads)[0]
        mem_configs = configs[:2] if smoke else configs   # smoke: dense and unstructured only
        res["a_memory"] = {c: launch(1, "memory", {**common, "config": c}, work, args.threads)[0] for c in mem_configs}
    if "b" in parts:
        spec = {**base, "batch": 4, "seq": 16, "steps": 1, "config": "unstructured_learned"}
        res["b_state"] = {n: launch(n, "state", spec, work, args.threads) for n in (1, 2)}
    if "c" in parts:
        res["c_sizes"] = {}
        for w in widths:
            spec = {"model": "bert", "hidden": w, "layers": 4, "vocab": 8192, "batch": args.sizes_batch,
                    "seq": args.max_seq_length, "warmup": args.warmup, "steps": args.steps,
                    "configs": ["dense", "unstructured"], "tag": f"c{w}"}
            res["c_sizes"][w] = launch(1, "timing", spec, work, args.threads)[0]
    res["wall_s"] = round(time.time() - t_start, 1)
    res["loadavg"]["after"] = os.getloadavg()
    json.dump(res, open(out / "cost.json", "w"), indent=1)
    write_report(res, out, smoke)
    print(f"wrote {out / 'cost.md'} ({res['wall_s'] / 60:.1f} min)", flush=True)
    return res


# ----------------------------------------------------------------------------- report
def write_report(res: dict, out: Path, smoke: bool):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    m, s = res["machine"], res["settings"]
    lines = ["# Cost: what LEAP adds to a DeepSpeed training step", ""]
    if smoke:
        lines += ["**SMOKE RUN** (tiny random BERTs, 2 steps): checks the pipeline, measures nothing.", ""]
    lines += [f"Machine: {m['cpu']}, {m['cores']} CPU cores, **no GPU** (CUDA available: {m['cuda_available']}; "
              f"this task had no accelerator, so every number is CPU, fp32, {s['threads']} torch thread per "
              f"process, DeepSpeed's CPU accelerator with gloo). torch {m['torch']}, deepspeed {m['deepspeed']}, "
              f"transformers {m['transformers']}. The machine was shared with other jobs, so absolute times "
              f"are noisy; ratios come from engines stepped round-robin in one process.", "",
              f"Command: `{res['command']}` ({res['wall_s'] / 60:.1f} min).", ""]
    fig, axes = plt.subplots(1, 3, figsize=(16, 4.6))
    if "a_timing" in res:
        t = res["a_timing"]["timing"]
        mem = res.get("a_memory", {})
        model = model_name(res["model"])
        lines += ["## (a) Step time and memory, LEAP vs dense (ZeRO stage 0, one rank)", "",
                  f"{model}, batch {s['batch_size']}, sequence {s['max_seq_length']}, AdamW + WarmupDecayLR + "
                  f"clipping as ds_configs/default.json, magnitude scores, target 0.3. "
                  f"{s['warmup']} warm-up + {s['steps']} timed steps per configuration, round-robin. "
                  f"Granularity `head` prunes attention only (Q, K, V, output, like ds_configs/head.json); "
                  f"the others prune all six encoder matrices.", "",
                  "| configuration | step time vs dense (median of paired rounds) | CPU time vs dense (same) | "
                  "median step (s) | min / max step (s) | LEAP mask computation per forward (s) | peak RSS (MiB) | "
                  "RSS growth in training (MiB) | LEAP density after the timed steps |",
                  "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
        dens = res["a_timing"].get("densities", {})
        masks = res["a_timing"].get("mask_s", {})
        for c, v in t.items():
            mm = mem.get(c, {})
            growth = mm.get("peak_rss_mb", 0) - mm.get("rss_after_init_mb", 0) if mm else float("nan")
            cpu = f"{100 * (v['cpu_paired_ratio'] - 1):+.1f}%" if "cpu_paired_ratio" in v else "n/a"
            lines.append(f"| {c} | {100 * (v.get('paired_ratio', 1.0) - 1):+.1f}% | {cpu} | {v['median_s']:.3f} | "
                         f"{v['min_s']:.3f} / {v['max_s']:.3f} | "
                         f"{masks[c] if c in masks else 0:.3f} | {mm.get('peak_rss_mb', float('nan')):.0f} | "
                         f"{growth:.0f} | {dens.get(c, 1.0):.3f} |")
        lines += ["", "Peak RSS: `resource.getrusage(RUSAGE_SELF).ru_maxrss` of a process that builds only that "
                  f"configuration and runs {s['warmup']} + {s['memory_steps']} steps; growth: peak minus RSS right after the engine was "
                  "built (activations, gradients, optimizer state, LEAP's transient masks).", ""]
        ax = axes[0]
        names = list(t)
        ax.bar(names, [100 * (t[c].get("paired_ratio", 1.0) - 1) for c in names],
               color=["gray"] + ["C0"] * (len(names) - 1))
        ax.axhline(10, color="r", linestyle=":", label="+10%")
        ax.axhline(0, color="k", linewidth=0.8)
        ax.set_ylabel("step time vs dense (%, median of paired rounds)")
        ax.set_title("(a) step time, ZeRO-0, 1 rank")
        ax.legend()
    if res.get("a_runs"):
        lines += a_runs_section(res, axes[0])
    if "b_state" in res:
        lines += ["## (b) LEAP's own state per rank at ZeRO-3", "",
                  model_name(res["model"]) + " ",
                  ]
        lines[-1] += ("with learned scores (unstructured: one score per prunable weight, the largest LEAP "
                      "state there is) and one threshold per matrix. Owned elements: "
                      "`leap_ds.integration.zero.local_slice(p)` over `engine.leap.parameters()` on each rank "
                      "(`stage3_param_persistence_threshold: 0`, so even the 1-element thresholds are "
                      "partitioned). Masks are not state: they are recomputed in every forward from the scores "
                      "and thresholds. The fp32 Adam moments of these parameters follow the same partition "
                      "(2 x the bytes below).")
        lines += ["", "| ranks | rank | threshold elements | score elements | LEAP bytes on this rank | "
                  "of the full LEAP state | model weights owned |", "|---:|---:|---:|---:|---:|---:|---:|"]
        xs, ys = [], []
        for n, ranks in res["b_state"].items():
            for r in ranks:
                tot = sum(r["full_elements"].values())
                own = sum(r["owned_elements"].values())
                lines.append(f"| {n} | {r['rank']} | {r['owned_elements']['threshold']:,} | "
                             f"{r['owned_elements']['scores']:,} | {sum(r['owned_bytes'].values()) / 2 ** 20:.2f} MiB | "
                             f"{100 * own / tot:.1f}% | {r['model_owned_elements']:,} |")
            xs.append(int(n))
            ys.append(max(sum(r["owned_bytes"].values()) for r in ranks) / 2 ** 20)
        lines.append("")
        ax = axes[1]
        ax.plot(xs, ys, marker="o")
        ax.set_xticks(xs)
        ax.set_xlabel("ranks (ZeRO-3)")
        ax.set_ylabel("LEAP state per rank (MiB, max over ranks)")
        ax.set_title("(b) LEAP state per rank")
    if "c_sizes" in res:
        lines += ["## (c) LEAP overhead vs model size", "",
                  f"Random-init BERT, 4 layers, heads = hidden/64, FFN 4 x hidden, batch {s['sizes_batch']}, "
                  f"sequence {s['max_seq_length']}, ZeRO-0, one rank; dense vs LEAP unstructured (magnitude), "
                  f"round-robin in one process.", "",
                  "| hidden | prunable weights | dense step (s) | LEAP step (s) | overhead (s) | "
                  "overhead (median of paired rounds) | LEAP mask computation per forward (s) |",
                  "|---:|---:|---:|---:|---:|---:|---:|"]
        ws, ov = [], []
        for w, r in res["c_sizes"].items():
            dt, lt = r["timing"]["dense"]["median_s"], r["timing"]["unstructured"]["median_s"]
            ratio = r["timing"]["unstructured"].get("paired_ratio", lt / dt)
            lines.append(f"| {w} | {r.get('prunable_weights', 0):,} | {dt:.3f} | {lt:.3f} | {lt - dt:+.3f} | "
                         f"{100 * (ratio - 1):+.1f}% | {r.get('mask_s', {}).get('unstructured', 0):.3f} |")
            ws.append(int(w))
            ov.append(100 * (ratio - 1))
        lines.append("")
        ax = axes[2]
        ax.plot(ws, ov, marker="o")
        ax.axhline(10, color="r", linestyle=":", label="+10%")
        ax.set_xlabel("hidden size (4 layers)")
        ax.set_ylabel("LEAP step time overhead vs dense (%)")
        ax.set_title("(c) overhead vs model size")
        ax.legend()
    fig.tight_layout()
    fig.savefig(out / "cost.png", dpi=100)
    plt.close(fig)
    lines += ["![cost](cost.png)", "", "## Observations", ""]
    notes = out / "cost_notes.md"
    if notes.is_file():   # hand-written interpretation of a finished run
        lines += [notes.read_text().strip(), ""]
    lines += ["Computed from the tables:", "", *observations(res), ""]
    (out / "cost.md").write_text("\n".join(lines))


def _spread(values: list[float]) -> str:
    """median [min, max] of ratios, as percentages over dense"""
    pct = [100 * (v - 1) for v in values]
    return f"{statistics.median(pct):+.1f}% [{min(pct):+.1f}, {max(pct):+.1f}]"


def a_runs_summary(res: dict) -> dict:
    """Per configuration, over the merged part (a) runs: wall and CPU-time paired ratios and more."""
    runs = res["a_runs"]
    out = {}
    for c in runs[0]["a_timing"]["timing"]:
        t = [r["a_timing"]["timing"][c] for r in runs]
        out[c] = {"wall": [v.get("paired_ratio", 1.0) for v in t],
                  "cpu": [v.get("cpu_paired_ratio", 1.0) for v in t],
                  "median_s": [v["median_s"] for v in t], "cpu_median_s": [v.get("cpu_median_s", 0.0) for v in t],
                  "mask_s": [r["a_timing"].get("mask_s", {}).get(c, 0.0) for r in runs],
                  "peak_rss_mb": [r.get("a_memory", {}).get(c, {}).get("peak_rss_mb", float("nan")) for r in runs],
                  "density": [r["a_timing"].get("densities", {}).get(c, 1.0) for r in runs]}
    return out


def a_runs_section(res: dict, ax) -> list[str]:
    runs, summ = res["a_runs"], a_runs_summary(res)
    s = runs[0]["settings"]
    n = len(runs)
    lines = [f"## (a) Step time and memory, LEAP vs dense (ZeRO stage 0, one rank): {n} runs", "",
             f"{model_name(res['model'])}, batch {s['batch_size']}, sequence {s['max_seq_length']}, AdamW + "
             f"WarmupDecayLR + clipping as ds_configs/default.json, magnitude scores, target 0.3. Each run: "
             f"`{runs[0]['command']}` (one process, {s['warmup']} warm-up + {s['steps']} timed steps per "
             f"configuration, round-robin; then one memory process per configuration); {n} runs in a row. "
             f"Per run, a configuration's ratio is the median over the timed rounds of its step time over "
             f"dense's in the same round; the table gives the median over the runs and [min, max]. Wall: "
             f"`time.perf_counter`; CPU: `time.thread_time` of the stepping thread (one torch thread), which "
             f"leaves out time spent waiting for a core of this shared machine (but not cache and memory "
             f"contention). Granularity `head` prunes attention only (Q, K, V, output, like "
             f"ds_configs/head.json); the others prune all six encoder matrices. Merged by "
             f"`{res.get('a_merge_command', '--merge-a')}`.", "",
             f"| configuration | step time vs dense, wall: median [min, max] of {n} runs | "
             f"CPU time vs dense: median [min, max] | median step, wall (s) | median step, CPU (s) | "
             f"LEAP mask computation per forward (s) | peak RSS (MiB) | LEAP density after the timed steps |",
             "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for c, v in summ.items():
        lines.append(f"| {c} | {_spread(v['wall'])} | {_spread(v['cpu'])} | {statistics.median(v['median_s']):.3f} | "
                     f"{statistics.median(v['cpu_median_s']):.3f} | {statistics.median(v['mask_s']):.3f} | "
                     f"{statistics.median(v['peak_rss_mb']):.0f} | {statistics.median(v['density']):.3f} |")
    names = list(summ)
    lines += ["", "Per run (load average: 1-minute value before / after the run; the machine has "
              f"{res['machine']['cores']} cores):", "",
              "| run | load before / after | " + " | ".join(f"{c} wall / CPU" for c in names[1:]) + " | minutes |",
              "|---|---:|" + "---:|" * (len(names) - 1) + "---:|"]
    for i, r in enumerate(runs):
        la = r.get("loadavg") or {}
        load = " / ".join(f"{la[k][0]:.1f}" if la.get(k) else "?" for k in ("before", "after"))
        cells = [f"{100 * (r['a_timing']['timing'][c].get('paired_ratio', 1) - 1):+.1f}% / "
                 f"{100 * (r['a_timing']['timing'][c].get('cpu_paired_ratio', 1) - 1):+.1f}%" for c in names[1:]]
        lines.append(f"| {i + 1} (`{r['dir']}`) | {load} | " + " | ".join(cells) + f" | {r['wall_s'] / 60:.1f} |")
    lines += ["", "Peak RSS: `resource.getrusage(RUSAGE_SELF).ru_maxrss` of a process that builds only that "
              f"configuration and runs {s['warmup']} + {s['memory_steps']} steps (median over the runs).", ""]
    x = list(range(len(names)))
    for off, key, label in ((-0.2, "wall", "wall"), (0.2, "cpu", "CPU time")):
        med = [100 * (statistics.median(summ[c][key]) - 1) for c in names]
        lo = [m - 100 * (min(summ[c][key]) - 1) for m, c in zip(med, names)]
        hi = [100 * (max(summ[c][key]) - 1) - m for m, c in zip(med, names)]
        ax.bar([i + off for i in x], med, width=0.4, yerr=[lo, hi], capsize=3, label=label)
    ax.set_xticks(x)
    ax.set_xticklabels(names)
    ax.axhline(10, color="r", linestyle=":", label="+10%")
    ax.axhline(0, color="k", linewidth=0.8)
    ax.set_ylabel(f"step vs dense (%, median and min-max of {n} runs)")
    ax.set_title("(a) step time, ZeRO-0, 1 rank")
    ax.legend()
    return lines


def model_name(spec: dict) -> str:
    if spec["model"] == "minilm":
        return "all-MiniLM-L6-v2 (22.7M parameters, 6 layers, hidden 384)"
    return f"random-init BERT ({spec.get('layers', 4)} layers, hidden {spec['hidden']})"


def observations(res) -> list[str]:
    obs = []
    if res.get("a_runs"):
        for c, v in a_runs_summary(res).items():
            if c == "dense":
                continue
            verdicts = []
            for key, label in (("wall", "wall clock"), ("cpu", "CPU time")):
                med = statistics.median(v[key])
                verdicts.append(f"{label} {100 * (med - 1):+.1f}% (runs {min(v[key]) * 100 - 100:+.1f} to "
                                f"{max(v[key]) * 100 - 100:+.1f}%): median {'within' if med <= 1.1 else 'NOT within'} "
                                f"the 10% target" + ("" if (max(v[key]) <= 1.1) == (med <= 1.1) else
                                                     ", not every run on the same side"))
            obs.append(f"- (a) {c}, {len(v['wall'])} runs: " + "; ".join(verdicts) + ".")
    if "a_timing" in res:
        t = res["a_timing"]["timing"]
        for c, v in t.items():
            if c != "dense":
                r = v.get("paired_ratio", 1.0)
                ok = "within" if r <= 1.1 else "NOT within"
                obs.append(f"- (a) {c}: {100 * (r - 1):+.1f}% step time vs dense (median of paired rounds), "
                           f"{ok} the 10% target.")
    if "b_state" in res:
        per = {n: max(sum(r["owned_elements"].values()) for r in ranks) for n, ranks in res["b_state"].items()}
        ks = sorted(per, key=int)
        if len(ks) > 1:
            obs.append(f"- (b) LEAP state per rank: {per[ks[0]]:,} elements with {ks[0]} rank, {per[ks[-1]]:,} "
                       f"with {ks[-1]} ranks ({per[ks[-1]] / max(1, per[ks[0]]):.2f}x).")
    if "c_sizes" in res:
        parts = [f"hidden {w}: {100 * (r['timing']['unstructured'].get('paired_ratio', 1.0) - 1):+.1f}%"
                 for w, r in res["c_sizes"].items()]
        obs.append("- (c) LEAP unstructured overhead: " + ", ".join(parts) + ".")
    return obs


if __name__ == "__main__":
    main()
