"""Hard top-k mask with a learnable keep ratio (straight-through gradients).

    r = sigmoid(theta),  k = ceil(r * n),  m = 1 on the k highest scores
    (with ``multiple_of`` N > 1: k rounded up to a multiple of N, at most n)
    dL/dscores = dL/dm,  dL/dtheta = sum(dL/dm * m)

as in the authors' ``TopKBinarizer`` (MLPruning, binarizer.py).
"""
from __future__ import annotations

import math
import threading

import numpy as np
import torch
import torch.nn.functional as F


def keep_ratio(threshold: torch.Tensor) -> torch.Tensor:
    # float32 even when the engine casts parameters to fp16/bf16
    return torch.sigmoid(threshold.float())


def kept_units_tensor(threshold: torch.Tensor, num_units: int, multiple_of: int = 1) -> torch.Tensor:
    """k = min(n, N ceil(ceil(sigmoid(theta) n) / N)) as an int64 tensor on theta's device (no
    host synchronisation); N = ``multiple_of`` (1: k = ceil(sigmoid(theta) n)). The one place k
    is computed: :func:`kept_units` reads this back on the host."""
    k = torch.ceil(keep_ratio(threshold.detach()).reshape(()).double() * num_units).to(torch.int64)
    return round_up_to_multiple(k, multiple_of).clamp(max=num_units)


def round_up_to_multiple(k, multiple_of: int):
    """k (an int, or an int64 tensor) rounded up to a multiple of ``multiple_of``: integer
    arithmetic, exact. The rounding rule of ``multiple_of`` groups (callers cap it at n)."""
    return -(-k // multiple_of) * multiple_of


def topk_bool_by_rank(scores: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """Like :func:`topk_bool` (ties: lowest index first) with k a device tensor: a stable
    sort ranks the scores, so nothing is read back to the host."""
    flat = scores.detach().float().reshape(-1)
    order = torch.sort(flat, descending=True, stable=True).indices
    rank = torch.empty_like(order)
    rank[order] = torch.arange(flat.numel(), device=flat.device)
    return (rank < k).view(scores.shape)


def topk_bool_by_cut(values: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """:func:`topk_bool` over many values (one per weight) with k a device tensor: the k-th
    largest from a sort, ties at the cut taken lowest index first, all on the device."""
    flat = values.detach().float().reshape(-1)
    top = torch.sort(flat, descending=True).values
    cut = top.gather(0, (k - 1).clamp(min=0).reshape(1))
    above = flat > cut
    at_cut = flat == cut
    room = k - above.sum()
    keep = above | (at_cut & (torch.cumsum(at_cut, 0) <= room))
    return (keep & (k > 0)).view(values.shape)


def select_on_host(tensor: torch.Tensor) -> bool:
    """Whether to compute k and the cut on the host: free on the CPU (and faster there with the
    bracketed selection); on an accelerator every read-back stalls the device, so not there."""
    return tensor.device.type == "cpu" and HOST_SELECTION_ON_CPU


# tests switch this off to run (and count the synchronisations of) the device path on the CPU
HOST_SELECTION_ON_CPU = True


def kept_units(threshold_value: float, num_units: int, multiple_of: int = 1) -> int:
    """k of :func:`kept_units_tensor` for a threshold value on the host (theta rounded to float32
    first, as the forward computes it)."""
    theta = torch.tensor(float(threshold_value), dtype=torch.float32)
    return int(kept_units_tensor(theta, num_units, multiple_of))


_SAMPLE = 8192


def _kth_largest_and_counts(values: torch.Tensor, k: int, overwrite: bool = False) -> tuple[torch.Tensor, int, int]:
    """(t, greater, equal): the exact k-th largest value t of a flat tensor
    (1 <= k <= n) and how many values are > t and == t, cheaply for large n.

    A full selection over every weight of every matrix in every forward was
    the whole of LEAP's step overhead. On the CPU (float32/64) numpy's
    introselect partitions the values in one O(n) pass (about 5x faster than
    ``torch.kthvalue``, and faster than bracketing a band first); ``overwrite``:
    ``values`` is scratch and may be reordered in place (saves a copy).
    Elsewhere a fixed-stride sample brackets the answer and an exact selection
    runs on the values inside the bracket only; if the bracket missed (it
    cannot silently), select over everything.
    """
    if values.device.type == "cpu" and values.dtype in (torch.float32, torch.float64):
        return _kth_largest_and_counts_numpy(values, k, overwrite)
    n = values.numel()
    if n > 8 * _SAMPLE:
        sample = values[:: n // _SAMPLE].contiguous()
        m = sample.numel()
        pos, margin = (n - k + 1) / n * m, 4 * math.sqrt(m) + 8
        # bracket ends: two order statistics of the sample (kthvalue is 1-based)
        lo = torch.kthvalue(sample, max(1, int(pos - margin) + 1)).values
        hi = torch.kthvalue(sample, min(m, int(pos + margin) + 1)).values
        above_hi = values > hi
        # count_nonzero: sum() over a bool tensor first copies it to int64
        above = int(torch.count_nonzero(above_hi))
        # values >= lo, minus those > hi (a subset): the bracket, in two passes not three
        band = values[torch.logical_xor(values >= lo, above_hi)]
        r = k - above  # the answer is the r-th largest inside the bracket
        if 1 <= r <= band.numel():
            t = torch.kthvalue(band, band.numel() - r + 1).values
            return t, above + int(torch.count_nonzero(band > t)), int(torch.count_nonzero(band == t))
    t = torch.kthvalue(values, n - k + 1).values
    return t, int(torch.count_nonzero(values > t)), int(torch.count_nonzero(values == t))


def _kth_largest_and_counts_numpy(values: torch.Tensor, k: int, overwrite: bool) -> tuple[torch.Tensor, int, int]:
    """:func:`_kth_largest_and_counts` for a CPU float tensor."""
    flat = values.detach().reshape(-1)
    return _select_in_place(flat.numpy() if overwrite else flat.numpy().copy(), k, values.dtype)


def _select_in_place(a: np.ndarray, k: int, dtype: torch.dtype) -> tuple[torch.Tensor, int, int]:
    """(t, greater, equal) of a flat float array (reordered in place): ``ndarray.partition`` puts
    the k-th largest at index n - k, everything below it <= t and everything above it >= t, so
    the counts need a pass over either side only when a min/max reduction shows a tie (or NaN)."""
    j = a.size - k
    a.partition(j)
    t = a[j]
    t_tensor = torch.tensor(float(t), dtype=dtype)
    if t != t:   # NaN (sorted last by both numpy and torch): nothing is > or == NaN
        return t_tensor, 0, 0
    upper, lower = a[j + 1:], a[:j]
    if upper.size == 0 or upper.min() > t:     # no ties above the cut (a NaN fails this test)
        greater, equal = k - 1, 1
    else:
        greater = int(np.count_nonzero(upper > t))
        equal = 1 + int(np.count_nonzero(upper == t))
    if lower.size and not lower.max() < t:
        equal += int(np.count_nonzero(lower == t))
    return t_tensor, greater, equal


# |W| of one matrix at a time goes into this per-thread buffer (reused, so no weight-sized allocation
# and page faults per matrix per forward); matrices above _SCRATCH_MAX elements allocate their own
_SCRATCH = threading.local()
_SCRATCH_MAX = 1 << 22


def _magnitude_kth_largest_and_counts(weight: torch.Tensor, k: int) -> tuple[torch.Tensor, int, int]:
    """:func:`_kth_largest_and_counts` of |weight| (float32 on the CPU, 1 <= k < n)."""
    w = weight.detach()
    n = w.numel()
    if n > _SCRATCH_MAX:
        return _kth_largest_and_counts(w.abs().reshape(-1), k, overwrite=True)
    buf = getattr(_SCRATCH, "buffer", None)
    if buf is None or buf.size < n:
        buf = _SCRATCH.buffer = np.empty(n, dtype=np.float32)
    a = buf[:n]
    np.abs(w.numpy(), out=a.reshape(w.shape))   # any strides in, row-major out
    return _select_in_place(a, k, w.dtype)


def kth_largest(values: torch.Tensor, k: int) -> torch.Tensor:
    """The exact k-th largest of a flat tensor (1 <= k <= n)."""
    return _kth_largest_and_counts(values, k)[0]


def topk_bool(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Bool tensor shaped like scores, True on exactly the k highest (ties: lowest index first)."""
    flat = scores.detach().float().reshape(-1)
    if k <= 0:
        return torch.zeros(scores.shape, dtype=torch.bool, device=scores.device)
    if k >= flat.numel():
        return torch.ones(scores.shape, dtype=torch.bool, device=scores.device)
    t, greater, equal = _kth_largest_and_counts(flat, k)
    if greater + equal == k:          # no tie straddles the cut: one pass
        return (flat >= t).view(scores.shape)
    keep = flat > t
    keep[(flat == t).nonzero().flatten()[:k - greater]] = True
    return keep.view(scores.shape)


def topk_indicator(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Float32 0/1 tensor with exactly k ones on the highest scores (ties: lowest index first)."""
    return topk_bool(scores, k).float()


class _TopKMask(torch.autograd.Function):
    @staticmethod
    def forward(ctx, scores, threshold, k):
        mask = topk_bool_by_rank(scores, k).float() if torch.is_tensor(k) else topk_indicator(scores, k)
        ctx.save_for_backward(mask)
        ctx.threshold_shape = threshold.shape
        return mask

    @staticmethod
    def backward(ctx, grad_mask):
        (mask,) = ctx.saved_tensors
        grad_scores = grad_mask if ctx.needs_input_grad[0] else None
        grad_threshold = (grad_mask * mask).sum().reshape(ctx.threshold_shape)
        return grad_scores, grad_threshold, None


class _MaskedWeight(torch.autograd.Function):
    """W * m for one-weight units, fused: the same values and gradients as
    ``weight * topk_mask(scores, threshold)`` without the weight-sized float
    mask, its weight-sized gradient and their product (LEAP's cost in the
    unstructured case). Scores: the learned ones, or |W| when None.

    With magnitude scores and fp32 weights the mask is a magnitude cut, so one
    ``hardshrink`` kernel applies it forward and one backward, no mask stored.
    """

    @staticmethod
    def forward(ctx, weight, threshold, scores, k):
        n = weight.numel()
        ctx.threshold_shape, ctx.threshold_dtype = threshold.shape, threshold.dtype
        ctx.cut = None
        if torch.is_tensor(k):   # k on the device: no host synchronisation
            ranked = weight.detach().abs() if scores is None else scores.detach().view(weight.shape)
            mask = topk_bool_by_cut(ranked, k)
            ctx.save_for_backward(weight, mask)
            return weight * mask
        if scores is None:
            if k >= n:
                ctx.cut = -1.0
            elif k > 0 and weight.dtype == torch.float32:
                if weight.device.type == "cpu":
                    t, greater, equal = _magnitude_kth_largest_and_counts(weight, k)
                else:
                    t, greater, equal = _kth_largest_and_counts(weight.detach().abs().reshape(-1), k)
                if greater + equal == k:   # keep exactly |w| >= t, i.e. |w| > the float below t
                    ctx.cut = float(torch.nextafter(t, torch.zeros_like(t)))
            if ctx.cut is not None:
                ctx.save_for_backward(weight)
                return F.hardshrink(weight, ctx.cut)
            # a tie straddles the cut (or k = 0, or not float32): the exact top-k
            mask = topk_bool(weight.detach().abs(), k)
        else:
            mask = topk_bool(scores.detach().view(weight.shape), k)
        ctx.save_for_backward(weight, mask)
        return weight * mask

    @staticmethod
    def backward(ctx, grad_out):
        if ctx.cut is not None:
            (weight,) = ctx.saved_tensors
            grad_weight = torch.ops.aten.hardshrink_backward(grad_out, weight, ctx.cut)
        else:
            weight, mask = ctx.saved_tensors
            grad_weight = grad_out * mask
        # dL/dm = grad_out * W;  dL/dtheta = sum(dL/dm * m) = sum(grad_weight * W)
        if grad_weight.dtype == torch.float32:
            grad_threshold = torch.dot(grad_weight.reshape(-1), weight.reshape(-1))
        else:
            grad_threshold = (grad_weight * weight).sum(dtype=torch.float32)
        grad_threshold = grad_threshold.to(ctx.threshold_dtype).reshape(ctx.threshold_shape)
        grad_scores = None
        if ctx.needs_input_grad[2]:
            grad_scores = (grad_out * weight).reshape(-1)
        return grad_weight, grad_threshold, grad_scores, None


def _units_kept(threshold: torch.Tensor, n: int, k: int | None) -> int:
    return kept_units(threshold.detach().float().item(), n) if k is None else k


def masked_weight(weight: torch.Tensor, threshold: torch.Tensor,
                  scores: torch.Tensor | None = None, k: int | None = None) -> torch.Tensor:
    """weight * mask for unstructured groups (one unit per weight), see ``_MaskedWeight``.
    k: units kept, if the caller has it already (else from threshold)."""
    return _MaskedWeight.apply(weight, threshold, scores, _units_kept(threshold, weight.numel(), k))


def topk_mask(scores: torch.Tensor, threshold: torch.Tensor, k: int | None = None) -> torch.Tensor:
    """Float32 0/1 mask keeping the ceil(sigmoid(threshold) * n) highest scores
    (k of them, if the caller has k already)."""
    return _TopKMask.apply(scores, threshold, _units_kept(threshold, scores.numel(), k))
