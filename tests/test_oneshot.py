"""One-shot magnitude pruning (the causal-LM job's and the LLM benchmark's baseline): the keep
ratio it picks is the one an exhaustive search over every k/n picks, and the density it reports
is the model's own count of kept weights."""
import copy
import math

import pytest
import torch

from leap_ds.apps.tasks.oneshot import closest_ratio, oneshot_magnitude
from leap_ds.integration.config import split_config
from leap_ds.integration.engine import attach
from tests import tiny_models as tm

UNSTRUCTURED_FFN = {"ffn_weights": {"params": {"granularity": "unstructured"},
                                    "modules": [r"layer\.\d+\.(intermediate|output)\.dense$"]}}
CASES = {
    "hybrid": tm.HYBRID_BERT,
    "heads+unstructured": {**tm.ATTN_HEADS, **UNSTRUCTURED_FFN},
    "channels_multiple_of_16": {"ffn": {**tm.FFN_CHANNELS["ffn"],
                                        "params": {"granularity": "channel", "multiple_of": 16}}},
}


def section_of(groups, target):
    _, section = split_config({"train_batch_size": 8, "compression_training": tm.leap_section(groups, target)})
    return section


def exhaustive_density(groups, target):
    """The old definition: every distinct k/n of some group; the closest density, smaller ratio on a tie."""
    def density(r):
        kept = 0
        for g in groups:
            m = getattr(g.module, "multiple_of", 1)
            k = min(g.num_units, math.ceil(r * g.num_units))
            kept += min(g.num_units, -(-k // m) * m) * g.weights_per_unit
        return kept / sum(g.num_weights for g in groups)
    candidates = sorted({k / g.num_units for g in groups for k in range(1, g.num_units + 1)})
    return density(min(candidates, key=lambda r: (abs(density(r) - target), r)))


@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("target", [0.05, 0.3, 0.5, 0.77, 1.0])
def test_closest_ratio_matches_exhaustive_search_and_live_weights(case, target):
    model = tm.tiny_bert()
    section = section_of(CASES[case], target)
    groups = attach(copy.deepcopy(model), section).groups
    pruned, density = oneshot_magnitude(model, section, target)
    assert density == pytest.approx(exhaustive_density(groups, target), abs=1e-12)
    # the density reported is the pruned model's own: count the nonzero prunable weights
    names = sorted({m for g in attach(copy.deepcopy(model), section).report()["groups"] for m in g["modules"]})
    modules = dict(pruned.named_modules())
    live = sum(int(torch.count_nonzero(modules[n].weight)) for n in names)
    total = sum(modules[n].weight.numel() for n in names)
    if case != "hybrid":   # (the hybrid's channels also cover biases: count weights only where exact)
        assert live / total == pytest.approx(density, abs=1e-12)


def test_closest_ratio_is_fast_for_llm_sized_unstructured_groups():
    """210 groups of ~1M single-weight units (SmolLM2's projections): the exhaustive search hung."""
    class G:
        def __init__(self, n):
            self.num_units, self.weights_per_unit, self.num_weights = n, 1, n
            self.module = None
    groups = [G(n) for n in (576 * 576, 576 * 192, 576 * 1536) for _ in range(70)]
    ratio = closest_ratio(groups, 0.3)
    kept = sum(math.ceil(ratio * g.num_units) for g in groups) / sum(g.num_units for g in groups)
    assert abs(kept - 0.3) < 1e-5
