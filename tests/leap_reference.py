"""Independent re-computation of LEAP's hard masks, shared by the single-process tests
(test_algorithm.py) and the multi-rank finalize check (workers/train_tiny.py).

Written from /work/shared/LEAP_ALGORITHM.md with plain loops and numpy, never with
leap_ds's own layout / mask helpers: a group keeps k = ceil(sigmoid(theta) * n) of its n
units, those with the largest squared L2 norm summed over the group's matrices.
"""
import math

import numpy as np

HEAD_ROLES = ["qkv", "qkv", "qkv", "out"]


def sigmoid64(theta: float) -> float:
    theta = float(np.float32(theta))  # thresholds are float32 parameters
    return 1.0 / (1.0 + math.exp(-theta))


def expected_k(theta: float, n: int) -> int:
    r = sigmoid64(theta)
    prod = r * n
    # the test chooses thresholds away from integer products, so float32 vs
    # float64 evaluation of sigmoid cannot change the ceiling
    assert abs(prod - round(prod)) > 1e-3 or prod >= n, (theta, n, prod)
    return min(n, math.ceil(prod))


def is_conv1d(module) -> bool:
    from transformers.pytorch_utils import Conv1D
    return isinstance(module, Conv1D)


def logical_weight(module) -> np.ndarray:
    """(out_features, in_features) as float64 numpy."""
    w = module.weight.detach().double().cpu().numpy()
    return w.T.copy() if is_conv1d(module) else w.copy()


def bias_of(module):
    return None if module.bias is None else module.bias.detach().double().cpu().numpy().copy()


def unit_slices(gran, rows, cols, block=None, role=None, head_dim=None):
    """The units of one (rows, cols) matrix as (row slice, col slice), in a fixed order."""
    if gran == "unstructured":
        return [(slice(i, i + 1), slice(j, j + 1)) for i in range(rows) for j in range(cols)]
    if gran == "block":
        br, bc = block
        return [(slice(a * br, (a + 1) * br), slice(b * bc, (b + 1) * bc))
                for a in range(rows // br) for b in range(cols // bc)]
    if gran == "row":
        return [(slice(i, i + 1), slice(0, cols)) for i in range(rows)]
    if gran == "column":
        return [(slice(0, rows), slice(j, j + 1)) for j in range(cols)]
    if gran == "head":
        if role == "qkv":
            return [(slice(h * head_dim, (h + 1) * head_dim), slice(0, cols)) for h in range(rows // head_dim)]
        return [(slice(0, rows), slice(h * head_dim, (h + 1) * head_dim)) for h in range(cols // head_dim)]
    raise ValueError(gran)


def reference_group(weights, gran, theta, *, block=None, num_heads=None, roles=None, scores=None):
    """Independent top-k mask of one group.

    weights: list of logical (rows, cols) float64 arrays (several for heads: Q, K, V, out).
    Returns (list of weight masks, list of bias masks or None, kept unit indices, k, n,
    per-member unit slices).
    """
    if gran == "channel":   # a channel is a head of width one: producer rows, consumer columns
        gran = "head"
    roles = roles or [None] * len(weights)
    per_member = []
    for w, role in zip(weights, roles):
        rows, cols = w.shape
        head_dim = None
        if gran == "head":
            head_dim = (rows if role == "qkv" else cols) // num_heads
        per_member.append(unit_slices(gran, rows, cols, block, role, head_dim))
    n = len(per_member[0])
    assert all(len(s) == n for s in per_member)
    if scores is None:
        scores = np.zeros(n)
        for w, slices in zip(weights, per_member):
            for u, (rs, cs) in enumerate(slices):
                total = 0.0
                for i in range(rs.start, rs.stop):
                    for j in range(cs.start, cs.stop):
                        total += w[i, j] * w[i, j]
                scores[u] += total
    scores = np.asarray(scores, dtype=np.float64)
    k = expected_k(theta, n)
    order = sorted(range(n), key=lambda u: -scores[u])
    if 0 < k < n:  # a clear winner set: no near-ties at the cut
        assert scores[order[k - 1]] - scores[order[k]] > 1e-5 * abs(scores[order[k - 1]]) + 1e-12
    kept = sorted(order[:k])
    wmasks, bmasks = [], []
    for w, role, slices in zip(weights, roles, per_member):
        m = np.zeros_like(w)
        for u in kept:
            rs, cs = slices[u]
            m[rs, cs] = 1.0
        wmasks.append(m)
        whole_rows = gran == "row" or (gran == "head" and role == "qkv")
        if whole_rows:
            bm = np.zeros(w.shape[0])
            for u in kept:
                bm[slices[u][0]] = 1.0
            bmasks.append(bm)
        else:
            bmasks.append(None)
    return wmasks, bmasks, kept, k, n, per_member


def reference_masks(model, spec, thetas):
    """{module name: (weight mask, bias mask or None)} of every group in spec, plus per-group (k, n).

    model: a module (its weights are read) or {module name: logical float64 weight}."""
    out, counts = {}, []
    for (gran, names, roles, kw), theta in zip(spec, thetas):
        weights = [model[n] if isinstance(model, dict) else logical_weight(model.get_submodule(n)) for n in names]
        wm, bm, _, k, n, _ = reference_group(weights, gran, theta, roles=roles, **kw)
        for name, a, b in zip(names, wm, bm):
            out[name] = (a, b)
        counts.append((k, n))
    return out, counts


def bert_hybrid_spec():
    """The groups of tm.HYBRID_BERT on tm.tiny_bert, written by hand: heads in layer 0, 4x8 blocks in
    layer 1's attention, FFN channels; (granularity, member names, roles, kwargs) of each group."""
    p0, p1 = "bert.encoder.layer.0.", "bert.encoder.layer.1."
    spec = [("head", [p0 + "attention.self.query", p0 + "attention.self.key",
                      p0 + "attention.self.value", p0 + "attention.output.dense"], HEAD_ROLES, {"num_heads": 4})]
    spec += [("block", [p1 + n], None, {"block": (4, 8)})
             for n in ("attention.self.query", "attention.self.key", "attention.self.value", "attention.output.dense")]
    for p in (p0, p1):
        spec.append(("channel", [p + "intermediate.dense", p + "output.dense"], ["qkv", "out"], {"num_heads": 64}))
    return spec
