"""``LeapGroup``: the learnable state of one group of prunable units."""
from __future__ import annotations

import torch
from torch import nn

from .mask import keep_ratio, kept_units, masked_weight, topk_mask


class LeapGroup(nn.Module):
    """One threshold logit theta (keep ratio sigmoid(theta)) and, for learned
    (movement-style) scoring, one score per unit.

    Both are ``nn.Parameter`` so ZeRO partitions them like any weight. The
    module is called inside the forward of the module it masks, so ZeRO-3
    gathers its parameters there, and its outputs carry ZeRO-3's backward hooks.
    """

    def __init__(self, num_units: int, threshold_init: float = 10.0, learned_scores: bool = False):
        super().__init__()
        self.num_units = num_units
        self.threshold = nn.Parameter(torch.full((1,), float(threshold_init)))
        self.scores = nn.Parameter(torch.zeros(num_units)) if learned_scores else None
        self.pruning_active = True  # False before schedule_offset: everything kept

    def forward(self, magnitude_scores: torch.Tensor | None = None, *,
                weight: torch.Tensor | None = None):
        """Returns (unit mask, keep ratio), both float32; or, given the ``weight``
        of a group whose units are single weights, (masked weight, keep ratio).

        The keep ratio's value is the exact fraction kept, ceil(sigmoid(theta) n) / n,
        its gradient that of sigmoid(theta) (straight-through): the regulariser
        then sees the weights actually kept. With coarse units (12 heads) the
        ceiling alone would otherwise leave the model up to a unit per group
        above its target.
        """
        keep = keep_ratio(self.threshold)
        if weight is not None:
            scores = self.scores            # None: magnitude |W|, computed inside
        else:
            scores = self.scores if self.scores is not None else magnitude_scores
            if scores is None:
                raise RuntimeError("LeapGroup with magnitude scores called without scores")
        if not self.pruning_active:
            # all kept; multiplying by zero keeps every LEAP parameter in the graph
            # so optimizers and ZeRO see a (zero) gradient rather than none
            zero = 0.0 * self.threshold.sum()
            if self.scores is not None:
                zero = zero + 0.0 * self.scores.sum()
            if weight is not None:
                return weight + zero.to(weight.dtype), keep
            return torch.ones(self.num_units, device=keep.device) + zero.float(), keep
        k = kept_units(float(self.threshold.detach().float()), self.num_units)
        keep = keep + (k / self.num_units - keep).detach()
        if weight is not None:
            return masked_weight(weight, self.threshold, scores, k), keep
        return topk_mask(scores, self.threshold, k), keep

    def extra_repr(self) -> str:
        kind = "learned" if self.scores is not None else "magnitude"
        return f"units={self.num_units}, scores={kind}"
