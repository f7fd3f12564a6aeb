"""Train a tiny model with leap_ds under any launcher; write a JSON trajectory.

Rank r of W takes rows [r*B/W, (r+1)*B/W) of each global batch of B rows, so
runs with different rank counts see the same global batches.
"""
import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

import deepspeed  # noqa: E402
import deepspeed.comm as dist  # noqa: E402

import leap_ds  # noqa: E402
from leap_ds.apps import device as placement  # noqa: E402
from leap_ds.integration.engine import inner_optimizer  # noqa: E402
from tests import tiny_models as tm  # noqa: E402


def finalize_check(engine):
    """finalize, then compare the positions of exact zeros with masks computed independently.

    Before finalize: every group's threshold and the full (gathered) weights and biases, and from
    them the hard masks by tests/leap_reference.py (k = ceil(sigmoid(theta) n) units of largest
    squared L2 norm, unit layout written by hand), not by leap_ds's mask code. After finalize: in
    the module weights and the fp32 master (safe_get_full_fp32_param) exactly the positions the
    reference prunes are zero; kept weights are unchanged; biases of pruned rows are zero (module
    and master), every other bias unchanged (a bias may be 0 by itself: HF initialises them so).
    Counts per module of every disagreement go to the result (all 0 when finalize is right)."""
    import numpy as np
    from deepspeed.utils import safe_get_full_fp32_param
    from leap_ds.algorithm.masked import LeapMasked
    from tests.leap_reference import bert_hybrid_spec, bias_of, is_conv1d, logical_weight, reference_masks

    model = engine.module
    spec = bert_hybrid_spec()
    modules = {n: model.get_submodule(n) for _, names, _, _ in spec for n in names}
    thresholds = []
    for _, names, _, _ in spec:   # the LEAP group made of exactly these matrices: its threshold
        (g,) = [g for g in engine.leap.groups if sorted(m.name for m in g.members) == sorted(names)]
        thresholds.append(g.module.threshold)
    params = thresholds + [p for m in modules.values() for p in (m.weight, m.bias) if p is not None]
    with deepspeed.zero.GatheredParameters(params):    # ZeRO-3: full tensors on every rank
        thetas = [float(t.detach().float()) for t in thresholds]
        before = {n: (logical_weight(m), bias_of(m)) for n, m in modules.items()}
    masks, _ = reference_masks({n: w for n, (w, _) in before.items()}, spec, thetas)

    engine.leap.finalize()

    def logical(t, module):
        t = t.detach().double().cpu().numpy()
        return t.T if is_conv1d(module) and t.ndim == 2 else t

    wrong = {k: {} for k in ("zeros", "master_zeros", "kept_changed", "bias", "master_bias")}
    zeros = master_zeros = total = expected_zeros = 0
    missing_master = []
    for n, m in modules.items():
        wm, bm = masks[n]
        w0, b0 = before[n]
        with deepspeed.zero.GatheredParameters([p for p in (m.weight, m.bias) if p is not None]):
            w, b = logical_weight(m), bias_of(m)
        master = safe_get_full_fp32_param(m.weight)
        master_b = safe_get_full_fp32_param(m.bias) if m.bias is not None else None
        bias_keep = bm if bm is not None else np.ones_like(b0)   # only whole-row units mask the bias
        wrong["zeros"][n] = int(np.sum((w == 0) != (wm == 0)))
        wrong["kept_changed"][n] = int(np.sum(w[wm == 1] != w0[wm == 1]))
        wrong["bias"][n] = int(np.sum(b != b0 * bias_keep))
        if master is None or master_b is None:
            missing_master.append(n)
        else:
            mw = logical(master, m)
            wrong["master_zeros"][n] = int(np.sum((mw == 0) != (wm == 0)))
            wrong["master_bias"][n] = int(np.sum(logical(master_b, m)[bias_keep == 0] != 0))
            master_zeros += int((mw == 0).sum())
        zeros += int((w == 0).sum())
        total += w.size
        expected_zeros += int((wm == 0).sum())
    assert not any(isinstance(m.module, LeapMasked) for g in engine.leap.groups for m in g.members)
    return {"zeros": zeros, "master_zeros": master_zeros, "total": total, "expected_zeros": expected_zeros,
            "checked_modules": sorted(modules), "wrong": wrong, "missing_master": missing_master}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="bert")
    ap.add_argument("--groups", default="hybrid", choices=["hybrid", "unstructured", "learned", "heads", "uniform"])
    ap.add_argument("--stage", type=int, default=0)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--global-batch", type=int, default=8)
    ap.add_argument("--grad-accum", type=int, default=1)
    ap.add_argument("--save", default=None)
    ap.add_argument("--save-at", type=int, default=None, help="checkpoint after this many steps")
    ap.add_argument("--finalize", action="store_true")
    ap.add_argument("--precision", default="fp32", choices=["fp32", "fp16", "bf16"])
    ap.add_argument("--overflow-at", type=int, default=None, help="make this micro-step overflow")
    ap.add_argument("--skip-step-at", type=int, default=None,
                    help="skip the inner torch optimizer's step at this optimizer step, as DeepSpeed "
                         "does on an fp16 overflow (fp16 is refused on CPU)")
    ap.add_argument("--backward", default="engine", choices=["engine", "torch"],
                    help="engine.backward(loss), or torch-style loss.backward() (ZeRO 1-3)")
    ap.add_argument("--pieces", action="store_true",
                    help="leap_ds.attach + param_groups + follow_optimizer on a plain deepspeed.initialize")
    ap.add_argument("--unmanaged", action="store_true",
                    help='"managed_gradient_accumulation": false: step() only at our own boundaries')
    ap.add_argument("--load", default=None)
    ap.add_argument("--out", required=True)
    ap.add_argument("--local_rank", type=int, default=-1)
    args = ap.parse_args()
    if args.finalize and (args.model, args.groups) != ("bert", "hybrid"):
        ap.error("--finalize checks against the hand-written masks of the hybrid BERT groups only")

    # the accelerator's backend: gloo on CPU, NCCL on GPUs (the GPU check runs this worker)
    deepspeed.init_distributed(dist_backend=None, auto_mpi_discovery=True)
    rank, world = dist.get_rank(), dist.get_world_size()
    groups = {
        "hybrid": tm.HYBRID_BERT,
        "heads": tm.ATTN_HEADS,
        # one threshold per structure shared by both layers: no single layer's forward owns it
        "uniform": {name: {**g, "params": {**g["params"], "uniform": True}}
                    for name, g in {**tm.ATTN_HEADS, **tm.FFN_CHANNELS}.items()},
        "unstructured": {"all": {"params": {"granularity": "unstructured"},
                                 "modules": [r"encoder\.layer\.\d+\..*dense|query|key|value"]}},
        # rows of every dense layer (some feed each other: allowed here, the test is about partitions)
        "learned": {"all": {"params": {"granularity": "row", "score": "learned", "allow_dead_weights": True},
                            "modules": [r"encoder\.layer\.\d+\..*dense"]}},
    }[args.groups]
    if args.model != "bert":
        groups = {"all": {"params": {"granularity": "unstructured"},
                          "modules": [r"(h|layers)\.\d+\..*(c_fc|c_proj|c_attn|_proj)$"]}}
    micro = args.global_batch // world // args.grad_accum
    cfg = tm.ds_config(args.stage, micro, args.grad_accum, world, leap=tm.leap_section(groups))
    if args.unmanaged:
        cfg["managed_gradient_accumulation"] = False
    if args.precision != "fp32":
        cfg[args.precision] = {"enabled": True, **({"initial_scale_power": 8} if args.precision == "fp16" else {})}
    model = tm.MODELS[args.model]()
    if args.pieces:
        # what HF Trainer / Accelerate users do: the pieces, and an engine built by plain DeepSpeed
        from leap_ds.integration.config import split_config
        ds_cfg, _ = split_config(cfg)
        pruner = leap_ds.attach(model, cfg)
        engine, *_ = deepspeed.initialize(model=model, config=ds_cfg,
                                          model_parameters=leap_ds.param_groups(model.parameters(), pruner))
        leap_ds.follow_optimizer(pruner, engine.optimizer, ds_cfg)
        engine.leap = pruner     # only so this worker reads it like the other paths
    else:
        engine, *_ = leap_ds.initialize(model=model, config=cfg)

    start = 0
    if args.load:
        path, _ = engine.load_checkpoint(args.load)
        assert path is not None, f"no checkpoint in {args.load}"
        start = engine.global_steps
    data = tm.batches(args.steps, args.global_batch)
    per_rank = args.global_batch // world
    losses, densities, micro_losses = [], [], []
    for i in range(start * args.grad_accum, args.steps * args.grad_accum):
        ids, labels = data[i // args.grad_accum]
        rows = slice(rank * per_rank, (rank + 1) * per_rank)
        ids, labels = placement.to_device((ids[rows], labels[rows]), engine.device)
        sub = per_rank // args.grad_accum
        j = i % args.grad_accum
        if args.save and args.save_at is not None and i == args.save_at * args.grad_accum:
            engine.save_checkpoint(args.save, tag=f"step{args.save_at}")
        out = engine(input_ids=ids[j * sub:(j + 1) * sub], labels=labels[j * sub:(j + 1) * sub])
        loss = out.loss
        if i == args.overflow_at:
            loss = loss * float("inf")  # a real fp16 overflow: DeepSpeed skips this step
        if args.backward == "torch":
            loss.backward()
        else:
            engine.backward(loss)
        if args.unmanaged and (i + 1) % args.grad_accum:
            pass   # our own accumulation: step() only at the boundary
        elif args.skip_step_at is not None and i // args.grad_accum == args.skip_step_at:
            # what an fp16 overflow does: the wrapper skips the inner torch optimizer's step
            inner = inner_optimizer(engine.optimizer)
            inner.step = lambda *a, **k: None
            engine.step()
            del inner.step
        else:
            engine.step()
        loss = placement.all_reduce_(out.loss.detach().float().clone(), engine.device)
        micro_losses.append(loss.item() / world)
        if (i + 1) % args.grad_accum == 0:  # an optimizer step: the mean loss of its global batch
            losses.append(sum(micro_losses) / len(micro_losses))
            micro_losses = []
            densities.append(engine.leap.report()["global_density"])
    rep = engine.leap.report()
    # DeepSpeed's own record of what this rank holds (padded to a multiple of the world size)
    local = sum(p.ds_tensor.numel() if hasattr(p, "ds_tensor") else p.numel() for p in engine.leap.parameters())
    full = sum(getattr(p, "ds_numel", p.numel()) for p in engine.leap.parameters())
    if args.save and args.save_at is None:
        engine.save_checkpoint(args.save, tag="ckpt")
    final = finalize_check(engine) if args.finalize else None
    result = {"rank": rank, "world": world, "losses": losses, "densities": densities,
              "thresholds": [g["threshold"] for g in rep["groups"]], "report": rep,
              "leap_local_numel": local, "leap_full_numel": full, "global_steps": engine.global_steps,
              "leap_step": engine.leap.step, "leap_param_count": len(list(engine.leap.parameters())), "finalize": final,
              "skipped_steps": getattr(engine, "skipped_steps", 0)}
    with open(f"{args.out}.rank{rank}.json", "w") as f:
        json.dump(result, f)
    engine.destroy()
    dist.barrier()


if __name__ == "__main__":
    main()
