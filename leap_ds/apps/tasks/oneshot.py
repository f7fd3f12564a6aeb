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

from leap_ds.algorithm.mask import round_up_to_multiple


def kept_units(group, ratio: float) -> int:
    """ceil(ratio n) units, rounded up as the group rounds its own k (``multiple_of``)."""
    n, multiple = group.num_units, getattr(group.module, "multiple_of", 1)
    return min(n, round_up_to_multiple(min(n, math.ceil(ratio * n)), multiple))


def _global_density(groups, ratio: float) -> float:
    kept = sum(kept_units(g, ratio) * g.weights_per_unit for g in groups)
    return kept / sum(g.num_weights for g in groups)


def closest_ratio(groups, target: float) -> float:
    """The keep ratio whose global density is the closest to ``target`` (the smaller on a tie).

    The density is a non-decreasing step function of the ratio, so bisection finds the step
    that crosses the target: ``low`` (density below it) and ``high`` (at or above it). Listing
    every k/n instead is millions of candidates for unstructured groups of an LLM.
    """
    low, high = 0.0, 1.0
    if _global_density(groups, high) < target:
        return high
    for _ in range(64):   # far below any 1/n: the two ends sit on either side of one step
        mid = (low + high) / 2
        if _global_density(groups, mid) >= target:
            high = mid
        else:
            low = mid
    if low > 0 and abs(_global_density(groups, low) - target) <= abs(_global_density(groups, high) - target):
        return low
    return high


def oneshot_magnitude(model, section, target: float):
    """A pruned copy of ``model`` (a plain module, not an engine) and its global density."""
    def uniform(groups):
        ratio = closest_ratio(groups, target)
        return {g.name: kept_units(g, ratio) for g in groups}
    return _prune_by_magnitude(model, section, uniform)


def oneshot_magnitude_per_group(model, section, kept: dict[str, int]):
    """A pruned copy of ``model`` keeping ``kept[name]`` units of each group (an allocation another
    method chose, e.g. LEAP's final one), ranked by magnitude as :func:`oneshot_magnitude` ranks."""
    def given(groups):
        names = {g.name for g in groups}
        if names != set(kept):
            raise ValueError(f"kept units name {len(set(kept))} groups, the config makes {len(names)}: "
                             f"missing {sorted(names - set(kept))[:3]}, unknown {sorted(set(kept) - names)[:3]}")
        return {g.name: int(kept[g.name]) for g in groups}
    return _prune_by_magnitude(model, section, given)


def _prune_by_magnitude(model, section, allocation):
    from leap_ds.integration.engine import attach
    pruned = copy.deepcopy(model)
    pruner = attach(pruned, section)
    groups = pruner.groups
    if any(g.learned for g in groups):
        raise ValueError("one-shot magnitude pruning ranks by magnitude; a group uses learned scores")
    kept = allocation(groups)
    with torch.no_grad():
        for g in groups:
            k = kept[g.name]
            if not 0 < k <= g.num_units:
                raise ValueError(f"group {g.name}: {k} kept units, it has {g.num_units}")
            # theta whose ceil(sigmoid(theta) n) is exactly k, whatever the float rounding
            keep = (k - 0.5) / g.num_units
            g.module.threshold.fill_(math.log(keep / (1 - keep)))
    pruner.finalize()
    return pruned, sum(kept[g.name] * g.weights_per_unit for g in groups) / sum(g.num_weights for g in groups)
