"""One-shot magnitude pruning at a given density, through LEAP's own unit layouts.

Every LEAP group (a matrix, an attention layer's KV groups, an FFN's channels)
keeps its k largest units by L2 norm (by |w| for unstructured groups), the same
scores LEAP's ``magnitude`` option ranks by. One keep ratio r is shared by all
groups, chosen so that the global density (ceil(r n_g) units per group) is the
closest to the target; nothing is trained.
"""
from __future__ import annotations

import copy
import math

import torch


def _global_density(groups, ratio: float) -> float:
    kept = sum(min(g.num_units, math.ceil(ratio * g.num_units)) * g.weights_per_unit for g in groups)
    return kept / sum(g.num_weights for g in groups)


def oneshot_magnitude(model, section, target: float):
    """A pruned copy of ``model`` (a plain module, not an engine) and its global density."""
    from leap_ds.integration.engine import attach
    pruned = copy.deepcopy(model)
    pruner = attach(pruned, section)
    groups = pruner.groups
    if any(g.learned for g in groups):
        raise ValueError("one-shot magnitude pruning ranks by magnitude; a group uses learned scores")
    # every distinct keep ratio k/n of some group; the one whose density is closest to the target
    candidates = sorted({k / g.num_units for g in groups for k in range(1, g.num_units + 1)})
    ratio = min(candidates, key=lambda r: (abs(_global_density(groups, r) - target), r))
    with torch.no_grad():
        for g in groups:
            k = min(g.num_units, math.ceil(ratio * g.num_units))
            # theta whose ceil(sigmoid(theta) n) is exactly k, whatever the float rounding
            keep = (k - 0.5) / g.num_units
            g.module.threshold.fill_(math.log(keep / (1 - keep)))
    pruner.finalize()
    return pruned, _global_density(groups, ratio)
