"""Train tiny Llama (GQA) with head + channel LEAP groups at ZeRO-3, compact on rank 0, and
compare with a one-process compact of the same state; write the numbers to JSON (rank 0)."""
import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

import deepspeed  # noqa: E402
import deepspeed.comm as dist  # noqa: E402
import torch  # noqa: E402

import leap_ds  # noqa: E402
from leap_ds.algorithm import LeapPruner  # noqa: E402
from leap_ds.export import compact, load_compact, parameter_count  # noqa: E402
from leap_ds.export.job import export_compact  # noqa: E402
from leap_ds.integration.config import split_config  # noqa: E402
from tests import tiny_models as tm  # noqa: E402
from tests.test_compact import LLAMA_GROUPS  # noqa: E402


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--out", required=True)
    ap.add_argument("--local_rank", type=int, default=-1)
    args = ap.parse_args()
    deepspeed.init_distributed(dist_backend="gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    global_batch = 8
    leap = tm.leap_section(LLAMA_GROUPS, target=0.3, threshold_lr=0.5)
    cfg = tm.ds_config(3, global_batch // world, 1, world, leap=leap)
    engine, *_ = leap_ds.initialize(model=tm.tiny_llama(), config=cfg)
    per_rank = global_batch // world
    for ids, labels in tm.batches(args.steps, global_batch):
        rows = slice(rank * per_rank, (rank + 1) * per_rank)
        loss = engine(input_ids=ids[rows], labels=labels[rows]).loss
        engine.backward(loss)
        engine.step()
    engine.eval()
    probe = tm.batches(1, 4, seed=7)[0][0]
    with torch.no_grad():
        masked_logits = engine(input_ids=probe).logits      # every rank: ZeRO-3 forward
    kept = [int(m.sum()) for m in engine.leap.unit_masks()]

    small = compact(engine)                                  # every rank; rank 0 gets the model
    # what the main job calls: the compact model saved beside the masked one, and its metrics
    compact_dir = os.path.join(os.path.dirname(args.out), "model-compact")
    metrics = export_compact(engine, None, compact_dir, is_main=rank == 0)
    # the same state in one process: whole parameters and thresholds on rank 0
    params = list(engine.module.parameters())
    with deepspeed.zero.GatheredParameters(params):
        state = {k: v.detach().clone() for k, v in engine.module.state_dict().items()}
    if rank != 0:
        assert small is None and metrics == {}
        return
    reloaded = load_compact(compact_dir)
    reference_model = tm.tiny_llama()
    _, section = split_config(cfg)
    pruner = LeapPruner(reference_model, section.rules(), **section.pruner_settings())   # one process
    reference_model.load_state_dict(state)
    pruner.load_state_dict(engine.leap.state_dict())   # step counter; recomputes the magnitude scores
    reference = compact(reference_model.eval())
    with torch.no_grad():
        small_logits, reference_logits = small(input_ids=probe).logits, reference(input_ids=probe).logits
        reloaded_logits = reloaded(input_ids=probe).logits
    result = {
        "kept_units": kept,
        "shapes": {k: list(v.shape) for k, v in small.state_dict().items()},
        "reference_shapes": {k: list(v.shape) for k, v in reference.state_dict().items()},
        "max_diff_reference": (small_logits - reference_logits).abs().max().item(),
        "max_diff_masked": (small_logits - masked_logits).abs().max().item(),
        "parameters": parameter_count(small), "reference_parameters": parameter_count(reference),
        "dense_parameters": parameter_count(reference_model),
        "layers": small.leap_compact["layers"],
        "max_diff_reloaded": (reloaded_logits - reference_logits).abs().max().item(),
        "metrics": metrics,
    }
    with open(args.out, "w") as f:
        json.dump(result, f)


if __name__ == "__main__":
    main()
