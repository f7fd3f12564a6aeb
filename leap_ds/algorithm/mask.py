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


class _TopKMask(torch.autograd.Function):
    @staticmethod
    def forward(ctx, scores, threshold):
        k = kept_units(threshold.detach().float().item(), scores.numel())
        mask = torch.zeros(scores.numel(), dtype=torch.float32, device=scores.device)
        if k > 0:
            mask[torch.topk(scores.detach().float().flatten(), k, sorted=False).indices] = 1.0
        mask = mask.view_as(scores)
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
