"""Hard top-k mask with a learnable keep ratio (straight-through gradients).

    r = sigmoid(theta),  k = ceil(r * n),  m = 1 on the k highest scores
    dL/dscores = dL/dm,  dL/dtheta = sum(dL/dm * m)

as in the authors' ``TopKBinarizer`` (MLPruning, binarizer.py).
"""
from __future__ import annotations

import math

import torch


def keep_ratio(threshold: torch.Tensor) -> torch.Tensor:
    # float32 even when the engine casts parameters to fp16/bf16
    return torch.sigmoid(threshold.float())


def kept_units(threshold_value: float, num_units: int) -> int:
    """k = ceil(sigmoid(theta) * n), computed the same way everywhere."""
    r = float(torch.sigmoid(torch.tensor(float(threshold_value), dtype=torch.float32)))
    return min(num_units, math.ceil(r * num_units))


_SAMPLE = 8192


def kth_largest(values: torch.Tensor, k: int) -> torch.Tensor:
    """The exact k-th largest of a flat tensor (1 <= k <= n), cheaply for large n.

    A full selection over every weight of every matrix in every forward was
    the whole of LEAP's step overhead. A fixed-stride sample brackets the
    answer; an exact selection then runs on the values inside the bracket
    only. If the bracket missed (it cannot silently), select over everything.
    """
    n = values.numel()
    if n <= 8 * _SAMPLE:
        return torch.kthvalue(values, n - k + 1).values
    sample = values[:: n // _SAMPLE].sort().values
    m = sample.numel()
    pos, margin = (n - k + 1) / n * m, 4 * math.sqrt(m) + 8
    lo = sample[max(0, int(pos - margin))]
    hi = sample[min(m - 1, int(pos + margin))]
    above = int((values > hi).sum())
    band = values[(values >= lo) & (values <= hi)]
    r = k - above  # the answer is the r-th largest inside the bracket
    if 1 <= r <= band.numel():
        return torch.kthvalue(band, band.numel() - r + 1).values
    return torch.kthvalue(values, n - k + 1).values


def topk_indicator(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Float32 0/1 tensor with exactly k ones on the highest scores (ties: lowest index first)."""
    flat = scores.detach().float().flatten()
    if k <= 0:
        return torch.zeros_like(flat).view_as(scores)
    if k >= flat.numel():
        return torch.ones_like(flat).view_as(scores)
    t = kth_largest(flat, k)
    keep = flat > t
    short = k - int(keep.sum())
    if short:
        keep[(flat == t).nonzero().flatten()[:short]] = True
    return keep.float().view_as(scores)


class _TopKMask(torch.autograd.Function):
    @staticmethod
    def forward(ctx, scores, threshold):
        k = kept_units(threshold.detach().float().item(), scores.numel())
        mask = topk_indicator(scores, k)
        ctx.save_for_backward(mask)
        ctx.threshold_shape = threshold.shape
        return mask

    @staticmethod
    def backward(ctx, grad_mask):
        (mask,) = ctx.saved_tensors
        grad_scores = grad_mask if ctx.needs_input_grad[0] else None
        grad_threshold = (grad_mask * mask).sum().reshape(ctx.threshold_shape)
        return grad_scores, grad_threshold


def topk_mask(scores: torch.Tensor, threshold: torch.Tensor) -> torch.Tensor:
    """Float32 0/1 mask keeping the ceil(sigmoid(threshold) * n) highest scores."""
    return _TopKMask.apply(scores, threshold)
