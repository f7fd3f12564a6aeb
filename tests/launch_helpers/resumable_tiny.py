"""A stand-in for `python -m leap_ds.train` for the launcher tests: same CLI shape, tiny model.

Flags shared with leap_ds.train: --deepspeed_config, --output-dir, --overwrite, --model,
--max-steps, --seed, --resume auto, --local_rank. Extra: --save-steps K (checkpoint every
K optimizer steps into <output-dir>/checkpoints, DeepSpeed tag "step<N>", plus at the end),
--step-sleep S (sleep S seconds after every step so a run lasts long enough to be killed
or requeued), --global-batch.
SIGUSR1/SIGTERM during training: the protocol of leap_ds.train (leap_ds/apps/preemption.py):
all ranks checkpoint at the current step (tag "step<N>") and exit with status preemption.EXIT_STATUS (75).

Outputs, all under --output-dir:
  metrics.json        (rank 0, at the end) world, global_steps, resumed_from_step,
                      final_loss, losses, density, densities, thresholds
  starts.jsonl        (rank 0, one line per start) resumed_from_step, slurm_restart_count
  progress.rank<r>    one line per finished step, "<global_step>\n", flushed at once
and prints "[resumable_tiny] rank R: resumed from PATH at step K" (the wording of
leap_ds.train) or "... starting at step 0".

Rank r of W trains on rows [r*B/W, (r+1)*B/W) of each global batch of B rows, so runs
with different rank counts see the same data and agree.
"""
import argparse
import json
import os
import shutil
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, ROOT)

import deepspeed  # noqa: E402
import deepspeed.comm as dist  # noqa: E402

import leap_ds  # noqa: E402
from leap_ds.apps.preemption import StopOnSignal  # noqa: E402
from tests import tiny_models as tm  # noqa: E402


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--deepspeed_config", default=None,
                    help="JSON; only zero_optimization.stage is taken from it")
    ap.add_argument("--output-dir", required=True)
    ap.add_argument("--overwrite", action="store_true")
    ap.add_argument("--model", default="bert", choices=sorted(tm.MODELS))
    ap.add_argument("--max-steps", type=int, default=20)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--resume", default="never", choices=["auto", "never"])
    ap.add_argument("--save-steps", type=int, default=0)
    ap.add_argument("--step-sleep", type=float, default=0.0)
    ap.add_argument("--global-batch", type=int, default=8)
    ap.add_argument("--stage", type=int, default=0)
    ap.add_argument("--local_rank", type=int, default=-1)
    args = ap.parse_args()

    deepspeed.init_distributed(dist_backend="gloo", auto_mpi_discovery=True)
    rank, world = dist.get_rank(), dist.get_world_size()
    out = args.output_dir
    ckdir = os.path.join(out, "checkpoints")
    has_ckpt = os.path.isfile(os.path.join(ckdir, "latest"))
    if rank == 0:
        if os.path.isdir(out) and not (args.resume == "auto" and has_ckpt):
            if args.overwrite:
                shutil.rmtree(out)
            elif os.listdir(out) and args.resume != "auto":
                sys.exit(f"output dir {out} is not empty (use --overwrite or --resume auto)")
        os.makedirs(ckdir, exist_ok=True)
    dist.barrier()

    stage = args.stage
    if args.deepspeed_config:
        with open(args.deepspeed_config) as f:
            stage = json.load(f).get("zero_optimization", {}).get("stage", stage)
    groups = tm.HYBRID_BERT if args.model == "bert" else {
        "all": {"params": {"granularity": "unstructured"},
                "modules": [r"(h|layers)\.\d+\..*(c_fc|c_proj|c_attn|_proj)$"]}}
    micro = args.global_batch // world
    cfg = tm.ds_config(stage, micro, 1, world, leap=tm.leap_section(groups))
    engine, *_ = leap_ds.initialize(model=tm.MODELS[args.model](seed=args.seed), config=cfg)

    start = 0
    if args.resume == "auto" and os.path.isfile(os.path.join(ckdir, "latest")):
        path, _ = engine.load_checkpoint(ckdir)
        assert path is not None, f"could not load the checkpoint in {ckdir}"
        start = engine.global_steps
        # Same wording as leap_ds.train ("[leap-ds] resumed from PATH at step N").
        print(f"[resumable_tiny] rank {rank}: resumed from {path} at step {start}", flush=True)
    else:
        print(f"[resumable_tiny] rank {rank}: starting at step 0", flush=True)
    if rank == 0:
        with open(os.path.join(out, "starts.jsonl"), "a") as f:
            f.write(json.dumps({"resumed_from_step": start, "world": world,
                                "slurm_restart_count": os.environ.get("SLURM_RESTART_COUNT"),
                                "time": time.time()}) + "\n")

    data = tm.batches(args.max_steps, args.global_batch)
    per_rank = args.global_batch // world
    rows = slice(rank * per_rank, (rank + 1) * per_rank)
    losses, densities = [], []
    progress = open(os.path.join(out, f"progress.rank{rank}"), "a")
    with StopOnSignal() as stop:  # the protocol of leap_ds.train's train_loop
        for step in range(start, args.max_steps):
            ids, labels = data[step]
            loss = engine(input_ids=ids[rows], labels=labels[rows]).loss
            engine.backward(loss)
            engine.step()
            loss = loss.detach().clone()
            dist.all_reduce(loss)
            losses.append(loss.item() / world)
            densities.append(leap_ds.report(engine)["global_density"])
            progress.write(f"{engine.global_steps}\n")
            progress.flush()
            saved = args.save_steps and engine.global_steps % args.save_steps == 0
            if saved:
                engine.save_checkpoint(ckdir, tag=f"step{engine.global_steps}")
            if stop.requested(engine.device):
                if not saved:
                    engine.save_checkpoint(ckdir, tag=f"step{engine.global_steps}")
                stop.exit(f"step {engine.global_steps}", checkpoint_saved=True,
                          log=lambda msg: print(f"[resumable_tiny] rank {rank}: {msg}", flush=True))
            if args.step_sleep:
                time.sleep(args.step_sleep)
    if args.save_steps and engine.global_steps % args.save_steps:
        engine.save_checkpoint(ckdir, tag=f"step{engine.global_steps}")
    rep = leap_ds.report(engine)
    if rank == 0:
        metrics = {"world": world, "global_steps": engine.global_steps, "resumed_from_step": start,
                   "final_loss": losses[-1] if losses else None, "losses": losses,
                   "density": rep["global_density"], "densities": densities,
                   "thresholds": [g["threshold"] for g in rep["groups"]]}
        with open(os.path.join(out, "metrics.json"), "w") as f:
            json.dump(metrics, f)
    engine.destroy()
    dist.barrier()


if __name__ == "__main__":
    main()
