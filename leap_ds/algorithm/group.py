"""``LeapGroup``: the learnable state of one group of prunable units."""
from __future__ import annotations

import torch
from torch import nn

from .mask import keep_ratio, kept_units, kept_units_tensor, masked_weight, select_on_host, topk_mask


def _in_backward() -> bool:
    """True while autograd runs a backward pass: an activation-checkpointing recompute."""
    return torch._C._current_graph_task_id() != -1


class LeapGroup(nn.Module):
    """One threshold logit theta (keep ratio sigmoid(theta)) and, for learned
    (movement-style) scoring, one score per unit.

    Both are ``nn.Parameter`` so ZeRO partitions them like any weight. The
    module is called inside the forward of the layers it masks, so ZeRO-3
    gathers its parameters there, and its outputs carry ZeRO-3's backward hooks.

    Scores: ``learned`` (the ``scores`` parameter); ``fused`` (one unit per
    weight, |W| applied inside the masked weight); ``weight`` (unit norms of
    the one matrix, passed in by the layer); ``shared`` (unit norms over
    several matrices, kept in the ``unit_scores`` buffer and refreshed by the
    pruner after each optimizer step).
    """

    multiple_of = 1   # (class default: groups pickled before the setting existed)

    def __init__(self, num_units: int, threshold_init: float = 10.0, learned_scores: bool = False,
                 fused: bool = False, shared_scores: bool = False, num_sets: int = 1, multiple_of: int = 1):
        super().__init__()
        self.num_units = num_units
        # k rounded up to a multiple of this (hardware-friendly widths), at most num_units
        self.multiple_of = multiple_of
        # uniform groups: num_sets layers share the threshold, each with its own scores
        self.num_sets = num_sets
        self.threshold = nn.Parameter(torch.full((1,), float(threshold_init)))
        self.scores = nn.Parameter(torch.zeros(num_sets * num_units)) if learned_scores else None
        self.fused = fused
        self.needs_weight_scores = not (learned_scores or fused or shared_scores)
        if shared_scores and not learned_scores:
            self.register_buffer("unit_scores", torch.zeros(num_sets * num_units), persistent=False)
        else:
            self.unit_scores = None
        self.pruning_active = True  # False before schedule_offset: everything kept
        self.pending_keep: dict[int, torch.Tensor] = {}   # per set: keep ratio of the last training forward

    def __getstate__(self):
        # the pending keep ratios belong to this process's autograd graph: not copied or pickled
        state = dict(super().__getstate__())
        state["pending_keep"] = {}
        return state

    def take_keep(self, set_index: int = 0) -> torch.Tensor | None:
        return self.pending_keep.pop(set_index, None)

    def _of_set(self, values: torch.Tensor | None, set_index: int) -> torch.Tensor | None:
        if values is None or self.num_sets == 1:
            return values
        return values.view(self.num_sets, self.num_units)[set_index]

    def forward(self, magnitude_scores: torch.Tensor | None = None, *,
                weight: torch.Tensor | None = None, record: bool = True, set_index: int = 0):
        """Returns (unit mask, keep ratio), both float32; or, given the ``weight``
        of a group whose units are single weights, (masked weight, keep ratio).

        The keep ratio's value is the exact fraction kept, k / n (k = ceil(sigmoid(theta) n),
        rounded up to a multiple of ``multiple_of``),
        its gradient that of sigmoid(theta) (straight-through): the regulariser
        then sees the weights actually kept. With coarse units (12 heads) the
        ceiling alone would otherwise leave the model up to a unit per group
        above its target. ``record``: keep the keep ratio of a training forward
        for the regulariser (once per forward; a checkpointing recompute in
        the backward pass is not a new forward).
        """
        keep = keep_ratio(self.threshold)
        if weight is not None:
            scores = self.scores            # None: magnitude |W|, computed inside
        else:
            scores = self._of_set(self.scores, set_index) if self.scores is not None else magnitude_scores
            if scores is None:
                scores = self._of_set(self.unit_scores, set_index)
            if scores is None:
                raise RuntimeError("LeapGroup with magnitude scores called without scores")
        if not self.pruning_active:
            # all kept; multiplying by zero keeps every LEAP parameter in the graph
            # so optimizers and ZeRO see a (zero) gradient rather than none
            zero = 0.0 * self.threshold.sum()
            if self.scores is not None:
                zero = zero + 0.0 * self.scores.sum()
            self._record(keep, record, set_index)
            if weight is not None:
                return weight + zero.to(weight.dtype), keep
            return torch.ones(self.num_units, device=keep.device) + zero.float(), keep
        if weight is not None:
            # one unit per weight: on the CPU the bracketed k-th magnitude (k read on the host)
            # is fastest; on an accelerator k and the cut stay on the device
            k = self.kept_units() if select_on_host(weight) else self.kept_units_tensor()
            keep = keep + (k / self.num_units - keep).detach()
            self._record(keep, record, set_index)
            return masked_weight(weight, self.threshold, scores, k), keep
        k = self.kept_units_tensor()
        keep = keep + (k / self.num_units - keep).detach()
        self._record(keep, record, set_index)
        return topk_mask(scores, self.threshold, k), keep

    def kept_units_tensor(self) -> torch.Tensor:
        """Units kept (per set) at the current threshold, on its device."""
        return kept_units_tensor(self.threshold, self.num_units, self.multiple_of)

    def kept_units(self, threshold_value: float | None = None) -> int:
        """Units kept (per set) at ``threshold_value`` (default: the current threshold), on the host."""
        if threshold_value is None:
            threshold_value = float(self.threshold.detach().float())
        return kept_units(threshold_value, self.num_units, self.multiple_of)

    def _record(self, keep: torch.Tensor, record: bool, set_index: int) -> None:
        if record and set_index not in self.pending_keep and torch.is_grad_enabled() and not _in_backward():
            self.pending_keep[set_index] = keep

    def extra_repr(self) -> str:
        kind = "learned" if self.scores is not None else "magnitude"
        multiple = f", multiple_of={self.multiple_of}" if self.multiple_of > 1 else ""
        return f"units={self.num_units}, scores={kind}{multiple}"
