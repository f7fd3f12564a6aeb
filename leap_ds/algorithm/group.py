"""``LeapGroup``: the learnable state of one group of prunable units."""
from __future__ import annotations

import torch
from torch import nn

from .mask import keep_ratio, topk_mask


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

    def forward(self, magnitude_scores: torch.Tensor | None = None):
        """Returns (unit mask, keep ratio sigmoid(theta)), both float32."""
        keep = keep_ratio(self.threshold)
        scores = self.scores if self.scores is not None else magnitude_scores
        if scores is None:
            raise RuntimeError("LeapGroup with magnitude scores called without scores")
        if not self.pruning_active:
            # all kept; multiplying by zero keeps every LEAP parameter in the graph
            # so optimizers and ZeRO see a (zero) gradient rather than none
            mask = torch.ones(self.num_units, device=keep.device) + 0.0 * scores.float()
            return mask, keep
        return topk_mask(scores, self.threshold), keep

    def extra_repr(self) -> str:
        kind = "learned" if self.scores is not None else "magnitude"
        return f"units={self.num_units}, scores={kind}"
