"""LEAP's algorithm layer against independent re-computations.

Every expectation here is computed in this file or tests/leap_reference.py with plain loops / numpy /
explicit formulas from /work/shared/LEAP_ALGORITHM.md, never with the
package's own helpers (layout, mask, regulariser):

- which units the hard top-k mask keeps, for every granularity
  (unstructured, block, row, column, head), on nn.Linear and on GPT-2 Conv1D;
- that the masked forward is F.linear with the masked weight (and bias for
  whole-row units);
- the straight-through gradients of learned scores and thresholds;
- global density, L_reg, the adaptive lambda and the gradient of lambda*L_reg;
- schedule_offset, report() and finalize().

The effective (masked) weight of a pruned layer is read off its forward as a
black box: W~[:, j] = layer(e_j) - layer(0), b~ = layer(0).
"""
import copy
import itertools
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from leap_ds import GroupRule, LeapPruner, attach
from leap_ds.algorithm.masked import LeapMasked
from leap_ds.algorithm.selection import LeapConfigError
from tests import tiny_models as tm
# the independent masks (also used by the multi-rank finalize check): tests/leap_reference.py
from tests.leap_reference import (HEAD_ROLES, bert_hybrid_spec, bias_of, is_conv1d, logical_weight,
                                  reference_group, reference_masks, sigmoid64)

# ----------------------------------------------------------------------------------------------
# thresholds for the tests
# ----------------------------------------------------------------------------------------------


def theta_for(k: int, n: int) -> float:
    """A threshold whose ceil(sigmoid(theta) * n) is k, well inside the interval."""
    p = (k - 0.5) / n
    return math.log(p / (1 - p))


def safe_theta(theta: float, n: int) -> float:
    """Nudge theta until sigmoid(theta) * n is well away from an integer."""
    while True:
        prod = sigmoid64(theta) * n
        if abs(prod - round(prod)) > 1e-2:
            return float(np.float32(theta))
        theta += 0.0137


def effective_linear(module):
    """The weight and bias a layer really applies, read off its forward (logical layout)."""
    in_features = module.weight.shape[0] if is_conv1d(module) else module.weight.shape[1]
    dtype = module.weight.dtype
    with torch.no_grad():
        b = module(torch.zeros(1, in_features, dtype=dtype))[0]
        w = (module(torch.eye(in_features, dtype=dtype)) - b).t()
    return w.double().numpy(), b.double().numpy()


def group_of(pruner, module_name):
    hits = [g for g in pruner.groups if module_name in [m.name for m in g.members]]
    assert len(hits) == 1, (module_name, [g.name for g in pruner.groups])
    return hits[0].module


def set_theta(pruner, module_name, theta):
    group_of(pruner, module_name).threshold.data.fill_(float(theta))


# ----------------------------------------------------------------------------------------------
# small models with BERT-like names
# ----------------------------------------------------------------------------------------------


class OneLinear(nn.Module):
    def __init__(self, in_f=24, out_f=16, bias=True):
        super().__init__()
        self.lin = nn.Linear(in_f, out_f, bias=bias)
        with torch.no_grad():  # biases large enough that masking them is visible
            if bias:
                self.lin.bias.normal_()

    def forward(self, x):
        return self.lin(x)


class Attn(nn.Module):
    """attention.self.{query,key,value}: 12 -> 16 (4 heads of 4); attention.output.dense: 16 -> 12."""

    def __init__(self, hidden=12, width=16, conv1d=False):
        super().__init__()
        if conv1d:  # GPT-2's layer type: weight stored (in, out)
            from transformers.pytorch_utils import Conv1D

            def linear(i, o):
                layer = Conv1D(o, i)
                nn.init.normal_(layer.weight, std=0.3)
                return layer
        else:
            linear = nn.Linear
        self.attention = nn.Module()
        self.attention.self = nn.Module()
        for name in ("query", "key", "value"):
            setattr(self.attention.self, name, linear(hidden, width))
        self.attention.output = nn.Module()
        self.attention.output.dense = linear(width, hidden)
        with torch.no_grad():
            for name in HEAD_NAMES:
                self.get_submodule(name).bias.normal_()

    def forward(self, x, z):
        s = self.attention.self
        return s.query(x), s.key(x), s.value(x), self.attention.output.dense(z)


class Mixed(nn.Module):
    """Heads + an FFN in rows + a block-pruned projection + a column-pruned head layer."""

    def __init__(self):
        super().__init__()
        self.attention = nn.Module()
        self.attention.self = nn.Module()
        for name in ("query", "key", "value"):
            setattr(self.attention.self, name, nn.Linear(12, 16))
        self.attention.output = nn.Module()
        self.attention.output.dense = nn.Linear(16, 12)
        self.ffn = nn.Linear(12, 24)
        self.proj = nn.Linear(24, 12)
        self.extra = nn.Linear(12, 6)

    def forward(self, x):
        s = self.attention.self
        h = self.attention.output.dense(torch.tanh(s.query(x)) * s.key(x) + s.value(x))
        f = torch.relu(self.ffn(h + x))
        return self.extra(self.proj(f) + h)


HEAD_RULE = GroupRule("heads", modules=[r"attention\.output\.dense"], granularity="head",
                      num_heads=4, related_modules=["self.query", "self.key", "self.value"])
HEAD_NAMES = ["attention.self.query", "attention.self.key", "attention.self.value",
              "attention.output.dense"]

MIXED_RULES = [HEAD_RULE,
               # connected row / column pruning, allowed on purpose: this model tests the masks
               GroupRule("ffn", modules=[r"^ffn$"], granularity="row", allow_dead_weights=True),
               GroupRule("proj", modules=[r"^proj$"], granularity="block", block=(4, 8)),
               GroupRule("extra", modules=[r"^extra$"], granularity="column", allow_dead_weights=True)]
# (granularity, member names, roles, kwargs) of each group, written independently of the pruner
MIXED_SPEC = [("head", HEAD_NAMES, HEAD_ROLES, {"num_heads": 4}),
              ("row", ["ffn"], None, {}),
              ("block", ["proj"], None, {"block": (4, 8)}),
              ("column", ["extra"], None, {})]


def apply_masks_to_copy(model, masks):
    """A deep copy of the (unpruned) model with the reference masks multiplied in."""
    ref = copy.deepcopy(model)
    with torch.no_grad():
        for name, (wm, bm) in masks.items():
            m = ref.get_submodule(name)
            wmask = torch.from_numpy(wm.T.copy() if is_conv1d(m) else wm).to(m.weight.dtype)
            m.weight.mul_(wmask)
            if bm is not None and m.bias is not None:
                m.bias.mul_(torch.from_numpy(bm).to(m.bias.dtype))
    return ref


def check_effective(model, masks, originals):
    """Each pruned layer applies exactly the reference-masked weight (zeros where pruned)."""
    for name, (wm, bm) in masks.items():
        w_eff, b_eff = effective_linear(model.get_submodule(name))
        w0, b0 = originals[name]
        np.testing.assert_array_equal(w_eff == 0, wm == 0, err_msg=f"pruned pattern of {name}")
        np.testing.assert_allclose(w_eff, w0 * wm, rtol=1e-5, atol=1e-6, err_msg=name)
        if b0 is not None:
            expected_b = b0 * bm if bm is not None else b0
            np.testing.assert_allclose(b_eff, expected_b, rtol=1e-6, atol=1e-7, err_msg=f"bias of {name}")


def snapshot(model, names):
    return {n: (logical_weight(model.get_submodule(n)), bias_of(model.get_submodule(n))) for n in names}


# ----------------------------------------------------------------------------------------------
# the mask, per granularity
# ----------------------------------------------------------------------------------------------

SINGLE = [("unstructured", {}), ("block", {"block": (4, 8)}), ("row", {}), ("column", {})]
N_UNITS = {"unstructured": 16 * 24, "block": (16 // 4) * (24 // 8), "row": 16, "column": 24}


def _single_rule(gran, kw, score="magnitude"):
    return GroupRule("g", modules=["lin"], granularity=gran, score=score, block=kw.get("block"))


@pytest.mark.parametrize("gran,kw", SINGLE, ids=[s[0] for s in SINGLE])
def test_single_matrix_mask_keeps_topk_units_by_l2_norm(gran, kw):
    torch.manual_seed(1)
    model = OneLinear()
    w0, b0 = logical_weight(model.lin), bias_of(model.lin)
    pruner = LeapPruner(model, [_single_rule(gran, kw)], target_density=0.3, threshold_init=10.0)
    n = N_UNITS[gran]
    x = torch.randn(5, 24)
    rng = np.random.default_rng(0)
    thetas = [theta_for(k, n) for k in sorted({1, 2, n // 3, n // 2, n - 1, n})]
    thetas += [safe_theta(t, n) for t in rng.uniform(-4, 4, size=3)]
    for theta in thetas:
        set_theta(pruner, "lin", theta)
        (wm,), (bm,), kept, k, n_ref, slices = reference_group([w0], gran, theta, **kw)
        assert n_ref == n
        with torch.no_grad():
            y = model(x)
        # the forward is F.linear with the independently masked weight (and bias for rows)
        wt = torch.from_numpy(w0 * wm).float()
        bt = torch.from_numpy(b0 * bm if bm is not None else b0).float()
        torch.testing.assert_close(y, F.linear(x, wt, bt), rtol=1e-5, atol=1e-6)
        # exactly k units survive, and they are the k units of largest norm
        w_eff, b_eff = effective_linear(model.lin)
        np.testing.assert_array_equal(w_eff == 0, wm == 0)
        surviving = [u for u, (rs, cs) in enumerate(slices[0]) if np.any(w_eff[rs, cs] != 0)]
        assert surviving == kept and len(surviving) == k == min(n, math.ceil(sigmoid64(theta) * n))
        if gran == "row":
            np.testing.assert_array_equal(b_eff == 0, bm == 0)
        else:  # column / unstructured / block never touch the bias
            np.testing.assert_allclose(b_eff, b0, rtol=1e-6)


def test_threshold_init_10_keeps_everything_and_very_low_threshold_keeps_one_unit():
    torch.manual_seed(2)
    model = OneLinear()
    w0 = logical_weight(model.lin)
    pruner = LeapPruner(model, [_single_rule("row", {})], target_density=0.3, threshold_init=10.0)
    w_eff, _ = effective_linear(model.lin)
    np.testing.assert_allclose(w_eff, w0, rtol=1e-5, atol=1e-6)   # sigmoid(10) * 16 -> 16 rows
    set_theta(pruner, "lin", -12.0)                                # sigmoid * 16 = 9.8e-5 -> 1 row
    w_eff, _ = effective_linear(model.lin)
    norms = [float(np.sum(w0[i] ** 2)) for i in range(16)]
    best = int(np.argmax(norms))
    assert [i for i in range(16) if np.any(w_eff[i] != 0)] == [best]


@pytest.mark.parametrize("conv1d", [False, True], ids=["linear", "conv1d"])
@pytest.mark.parametrize("k", [1, 2, 3, 4])
def test_head_mask_scores_qkv_rows_plus_output_columns(k, conv1d):
    torch.manual_seed(3)
    model = Attn(conv1d=conv1d)
    with torch.no_grad():  # make the heads differ clearly, and Q alone not decide the ranking
        scale = {"query": [1.0, 0.2, 0.6, 0.9], "key": [0.2, 1.3, 0.6, 0.9], "value": [0.5, 0.5, 1.2, 0.3]}
        out_scale = torch.tensor([0.3, 0.4, 0.2, 1.5]).repeat_interleave(4)
        if conv1d:  # logical rows are stored columns
            for name, s in scale.items():
                getattr(model.attention.self, name).weight.mul_(torch.tensor(s).repeat_interleave(4))
            model.attention.output.dense.weight.mul_(out_scale[:, None])
        else:
            for name, s in scale.items():
                getattr(model.attention.self, name).weight.mul_(torch.tensor(s).repeat_interleave(4)[:, None])
            model.attention.output.dense.weight.mul_(out_scale)
    orig = snapshot(model, HEAD_NAMES)
    pruner = LeapPruner(model, [HEAD_RULE], target_density=0.3, threshold_init=10.0)
    assert len(pruner.groups) == 1
    theta = theta_for(k, 4)
    set_theta(pruner, "attention.output.dense", theta)

    weights = [orig[n][0] for n in HEAD_NAMES]
    wms, bms, kept, k_ref, n, _ = reference_group(weights, "head", theta, num_heads=4, roles=HEAD_ROLES)
    assert (k_ref, n) == (k, 4)
    # the expected kept heads by an even more explicit formula
    score = [sum(float(np.sum(orig[nm][0][h * 4:(h + 1) * 4, :] ** 2)) for nm in HEAD_NAMES[:3])
             + float(np.sum(orig["attention.output.dense"][0][:, h * 4:(h + 1) * 4] ** 2)) for h in range(4)]
    assert kept == sorted(np.argsort(score)[::-1][:k].tolist())

    x, z = torch.randn(3, 12), torch.randn(3, 16)
    with torch.no_grad():
        outs = model(x, z)
    for name, out, inp, wm, bm in zip(HEAD_NAMES, outs, [x, x, x, z], wms, bms):
        w0, b0 = orig[name]
        bt = b0 * bm if bm is not None else b0   # Q, K, V biases of pruned heads go; output bias stays
        ref = F.linear(inp, torch.from_numpy(w0 * wm).float(), torch.from_numpy(bt).float())
        torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)
    masks = {nm: (wm, bm) for nm, wm, bm in zip(HEAD_NAMES, wms, bms)}
    check_effective(model, masks, orig)
    # the output projection's bias is never masked
    np.testing.assert_allclose(effective_linear(model.attention.output.dense)[1],
                               orig["attention.output.dense"][1], rtol=1e-6)


def test_head_magnitude_scores_follow_the_weights_after_an_optimizer_step():
    torch.manual_seed(4)
    model = Attn()
    pruner = LeapPruner(model, [HEAD_RULE], target_density=0.3, threshold_init=10.0)
    set_theta(pruner, "attention.output.dense", theta_for(2, 4))
    orig = snapshot(model, HEAD_NAMES)
    _, _, kept, *_ = reference_group([orig[n][0] for n in HEAD_NAMES], "head", theta_for(2, 4),
                                     num_heads=4, roles=HEAD_ROLES)
    weakest_pruned = [h for h in range(4) if h not in kept][0]
    with torch.no_grad():   # what an optimizer step might do: that head becomes the largest
        model.attention.self.value.weight[weakest_pruned * 4:(weakest_pruned + 1) * 4].mul_(50.0)
    pruner.on_optimizer_step()
    assert pruner.step == 1
    new = snapshot(model, HEAD_NAMES)
    wms, bms, kept_new, *_ = reference_group([new[n][0] for n in HEAD_NAMES], "head", theta_for(2, 4),
                                             num_heads=4, roles=HEAD_ROLES)
    assert weakest_pruned in kept_new
    model(torch.randn(2, 12), torch.randn(2, 16))
    check_effective(model, {nm: (a, b) for nm, a, b in zip(HEAD_NAMES, wms, bms)}, new)


# ----------------------------------------------------------------------------------------------
# straight-through gradients
# ----------------------------------------------------------------------------------------------

ST_CASES = [("unstructured", {}, "learned"), ("unstructured", {}, "magnitude"), ("block", {"block": (4, 8)}, "learned"),
            ("row", {}, "learned"), ("column", {}, "learned"), ("head", {}, "learned"),
            ("row", {}, "magnitude"), ("block", {"block": (4, 8)}, "magnitude"),
            ("head", {}, "magnitude")]


@pytest.mark.parametrize("learned", [False, True], ids=["magnitude", "learned"])
@pytest.mark.parametrize("transposed", [False, True], ids=["linear", "conv1d"])
def test_fused_masked_weight_equals_weight_times_topk_mask(learned, transposed):
    """The fused unstructured path gives the values and gradients of the plain composition."""
    from leap_ds.algorithm.mask import masked_weight, topk_mask
    gen = torch.Generator().manual_seed(31)
    stored = torch.randn(24, 40, generator=gen)
    scores0 = torch.randn(24 * 40, generator=gen)
    grad_out = torch.randn(40, 24, generator=gen) if transposed else torch.randn(24, 40, generator=gen)
    results = []
    for fused in (True, False):
        w_param = stored.clone().requires_grad_(True)
        theta = torch.tensor([0.4], requires_grad=True)
        scores = scores0.clone().requires_grad_(True) if learned else None
        w = w_param.t() if transposed else w_param        # logical (out, in) view, as for Conv1D
        if fused:
            out = masked_weight(w, theta, scores)
        else:
            s = scores if learned else w.detach().abs().reshape(-1)
            out = w * topk_mask(s, theta).view(w.shape)
        (out * grad_out).sum().backward()
        results.append((out.detach(), w_param.grad, theta.grad, None if scores is None else scores.grad))
    (o1, gw1, gt1, gs1), (o2, gw2, gt2, gs2) = results
    k = math.ceil(1 / (1 + math.exp(-0.4)) * stored.numel())
    assert int((o1 != 0).sum()) == k
    torch.testing.assert_close(o1, o2, rtol=0, atol=0)
    torch.testing.assert_close(gw1, gw2, rtol=0, atol=0)
    torch.testing.assert_close(gt1, gt2, rtol=1e-5, atol=1e-6)
    if learned:
        torch.testing.assert_close(gs1, gs2, rtol=0, atol=0)


@pytest.mark.parametrize("gran,kw,score", ST_CASES, ids=[f"{c[0]}-{c[2]}" for c in ST_CASES])
def test_straight_through_gradients(gran, kw, score):
    torch.manual_seed(5)
    if gran == "head":
        model = Attn()
        rule = GroupRule("heads", modules=[r"attention\.output\.dense"], granularity="head", score=score,
                         num_heads=4, related_modules=["self.query", "self.key", "self.value"])
        names, roles, n, kw = HEAD_NAMES, HEAD_ROLES, 4, {"num_heads": 4}
        inputs = [torch.randn(3, 12)] * 3 + [torch.randn(3, 16)]
        run = lambda: model(inputs[0], inputs[3])  # noqa: E731
    else:
        model = OneLinear()
        rule = _single_rule(gran, kw, score)
        names, roles, n = ["lin"], None, N_UNITS[gran]
        inputs = [torch.randn(3, 24)]
        run = lambda: (model(inputs[0]),)  # noqa: E731
    orig = snapshot(model, names)
    pruner = LeapPruner(model, [rule], target_density=0.3, threshold_init=10.0)
    group = group_of(pruner, names[-1])
    k = max(1, n // 3)
    theta = theta_for(k, n)
    group.threshold.data.fill_(theta)
    scores = None
    if score == "learned":
        assert group.scores is not None and group.scores.shape == (n,)
        scores = torch.randn(n, generator=torch.Generator().manual_seed(9)).numpy().astype(np.float64)
        group.scores.data.copy_(torch.from_numpy(scores))
    else:
        assert group.scores is None

    weights = [orig[nm][0] for nm in names]
    wms, bms, kept, k_ref, _, slices = reference_group(weights, gran, theta, roles=roles, scores=scores, **kw)
    assert k_ref == k

    grads_out = [torch.randn(3, w.shape[0], generator=torch.Generator().manual_seed(20 + i))
                 for i, w in enumerate(weights)]
    # pruner: loss = sum_i <out_i, G_i>
    outs = run()
    loss = sum((o * g).sum() for o, g in zip(outs, grads_out))
    loss.backward()

    # independent: dL/dW~ and dL/db~ at the masked weights, by autograd on plain F.linear
    dl_dm = np.zeros(n)
    for idx, nm in enumerate(names):
        w0, b0 = orig[nm]
        w_t = torch.tensor(w0 * wms[idx], requires_grad=True)
        b_t = torch.tensor(b0 * bms[idx] if bms[idx] is not None else b0, requires_grad=True)
        out = F.linear(inputs[idx].double(), w_t, b_t)
        gw, gb = torch.autograd.grad((out * grads_out[idx].double()).sum(), [w_t, b_t])
        gw, gb = gw.numpy(), gb.numpy()
        for u, (rs, cs) in enumerate(slices[idx]):
            total = 0.0
            for i in range(rs.start, rs.stop):
                for j in range(cs.start, cs.stop):
                    total += gw[i, j] * w0[i, j]          # dL/dW~ * W over the unit's weights
            if bms[idx] is not None:                       # whole-row units mask the bias too
                for i in range(rs.start, rs.stop):
                    total += gb[i] * b0[i]
            dl_dm[u] += total
    m = np.zeros(n)
    m[kept] = 1.0

    if score == "learned":
        np.testing.assert_allclose(group.scores.grad.double().numpy(), dl_dm, rtol=1e-4, atol=1e-5)
    expected_theta_grad = float(np.sum(dl_dm * m))        # no sigmoid derivative
    assert group.threshold.grad is not None
    assert float(group.threshold.grad) == pytest.approx(expected_theta_grad, rel=1e-4, abs=1e-5)
    # and the weights themselves get dL/dW~ * mask (the usual gradient through the mask)
    for idx, nm in enumerate(names):
        mod = model.get_submodule(nm)
        w_t = torch.tensor(orig[nm][0] * wms[idx], requires_grad=True)
        out = F.linear(inputs[idx].double(), w_t, torch.from_numpy(orig[nm][1]))
        (gw,) = torch.autograd.grad((out * grads_out[idx].double()).sum(), [w_t])
        np.testing.assert_allclose(mod.weight.grad.double().numpy(), gw.numpy() * wms[idx],
                                   rtol=1e-4, atol=1e-6)


# ----------------------------------------------------------------------------------------------
# regulariser and adaptive lambda
# ----------------------------------------------------------------------------------------------

MIXED_N = [3 * 16 * 12 + 12 * 16, 24 * 12, 12 * 24, 6 * 12]   # N_g written out by hand
MIXED_MEMBER = ["attention.output.dense", "ffn", "proj", "extra"]


MIXED_UNITS = [4, 24, (12 // 4) * (24 // 8), 12]                # heads, rows, 4x8 tiles, columns


def _thetas_for_density(density):
    """Thresholds whose exact kept fraction sum_g k_g N_g / (n_g sum N) is closest to density.

    theta_g = logit((k_g - 0.5) / n_g) keeps exactly k_g units: the product sits
    half a unit below the integer the ceiling rounds to.
    """
    total = sum(MIXED_N)
    best = min(itertools.product(*(range(1, n + 1) for n in MIXED_UNITS)),
               key=lambda ks: abs(sum(k / n * w for k, n, w in zip(ks, MIXED_UNITS, MIXED_N)) / total
                                  - density))
    return [math.log(((k - 0.5) / n) / (1 - (k - 0.5) / n)) for k, n in zip(best, MIXED_UNITS)]


REG_CASES = {
    "below_target": [-2.0, -1.5, -3.0, 0.5],                # R < R_t: L_reg = 0
    "lambda_10": _thetas_for_density(0.31),                 # L_reg ~ 1e-4 < 3e-4
    "lambda_floor_50": _thetas_for_density(0.322),          # 20000 * 4.8e-4 / 0.49 = 19.6 -> 50
    "lambda_adaptive": [1.5, 0.3, 2.0, -0.7],               # R ~ 0.77: lambda_max * L / (1-R_t)^2
}


@pytest.mark.parametrize("case", list(REG_CASES))
def test_regulariser_value_lambda_and_gradient(case):
    torch.manual_seed(6)
    target, lambda_max = 0.3, 20000.0
    model = Mixed()
    pruner = LeapPruner(model, MIXED_RULES, target_density=target, lambda_max=lambda_max)
    thetas = [float(np.float32(t)) for t in REG_CASES[case]]
    for name, t in zip(MIXED_MEMBER, thetas):
        set_theta(pruner, name, t)

    sig = [1 / (1 + math.exp(-t)) for t in thetas]
    # R counts the weights actually kept; its gradient is the closed form's
    kept = [min(u, math.ceil(s * u)) / u for s, u in zip(sig, MIXED_UNITS)]
    R = sum(r * n for r, n in zip(kept, MIXED_N)) / sum(MIXED_N)
    L = (R - target) ** 2 if R > target else 0.0
    lam = 10.0 if L < 3e-4 else max(50.0, lambda_max * L / (1 - target) ** 2)
    branch = {"below_target": lambda: L == 0 and lam == 10,
              "lambda_10": lambda: 0 < L < 3e-4 and lam == 10,
              "lambda_floor_50": lambda: L >= 3e-4 and lam == 50,
              "lambda_adaptive": lambda: lam > 1000}[case]
    assert branch(), (R, L, lam)   # the case exercises the branch it is named after

    model(torch.randn(4, 12))
    reg = pruner.regularization_loss()
    assert float(reg.detach()) == pytest.approx(lam * L, rel=1e-3, abs=1e-9)
    assert pruner.last_lambda == pytest.approx(lam, rel=1e-3)
    assert pruner.last_reg_loss == pytest.approx(L, rel=1e-3, abs=1e-10)
    rep = pruner.report()
    assert rep["lambda"] == pytest.approx(lam, rel=1e-3) and rep["reg_loss"] == pytest.approx(L, rel=1e-3, abs=1e-10)

    reg.backward()
    for name, s, n in zip(MIXED_MEMBER, sig, MIXED_N):
        expected = lam * 2 * (R - target) * s * (1 - s) * n / sum(MIXED_N) if R > target else 0.0
        grad = group_of(pruner, name).threshold.grad
        got = 0.0 if grad is None else float(grad)
        assert got == pytest.approx(expected, rel=1e-3, abs=1e-7), name
    # the weights get no gradient from the regulariser
    assert all(p.grad is None or float(p.grad.abs().sum()) == 0 for p in (model.ffn.weight, model.ffn.bias))


def test_density_tolerance_moves_the_lambda_switch():
    """R - R_t ~ 0.01: lambda is the floor (10) under the paper's tolerance, at least lambda_min under 0.005."""
    thetas = [float(np.float32(t)) for t in _thetas_for_density(0.31)]
    for tolerance, lambda_min, expect_floor in ((3e-4 ** 0.5, 50.0, True), (0.005, 50.0, False),
                                                 (0.005, 400.0, False)):
        torch.manual_seed(6)
        model = Mixed()
        pruner = LeapPruner(model, MIXED_RULES, target_density=0.3, density_tolerance=tolerance,
                            lambda_min=lambda_min)
        for name, t in zip(MIXED_MEMBER, thetas):
            set_theta(pruner, name, t)
        model(torch.randn(4, 12))
        reg = pruner.regularization_loss()
        L = pruner.last_reg_loss
        assert 0.005 ** 2 < L < 3e-4
        assert pruner.last_lambda == (10.0 if expect_floor else max(lambda_min, 20000 * L / 0.49))
        assert float(reg.detach()) == pytest.approx(pruner.last_lambda * L, rel=1e-5)


def test_two_sided_regulariser_pulls_up_below_the_target():
    """regularizer two_sided: L_reg = (R - R_t)^2 below the target too, and the gradient raises theta."""
    thetas = [float(np.float32(t)) for t in REG_CASES["below_target"]]
    sig = [1 / (1 + math.exp(-t)) for t in thetas]
    kept = [min(u, math.ceil(s * u)) / u for s, u in zip(sig, MIXED_UNITS)]
    R = sum(r * n for r, n in zip(kept, MIXED_N)) / sum(MIXED_N)
    target = 0.3
    assert R < target - 0.005
    L = (R - target) ** 2
    lam = max(500.0, 20000 * L / (1 - target) ** 2)
    torch.manual_seed(6)
    model = Mixed()
    pruner = LeapPruner(model, MIXED_RULES, target_density=target, density_tolerance=0.005,
                        lambda_min=500.0, two_sided=True)
    for name, t in zip(MIXED_MEMBER, thetas):
        set_theta(pruner, name, t)
    model(torch.randn(4, 12))
    reg = pruner.regularization_loss()
    assert pruner.last_reg_loss == pytest.approx(L, rel=1e-4)
    assert pruner.last_lambda == pytest.approx(lam, rel=1e-4)
    reg.backward()
    for name, s, n in zip(MIXED_MEMBER, sig, MIXED_N):
        expected = lam * 2 * (R - target) * s * (1 - s) * n / sum(MIXED_N)
        assert expected < 0   # gradient descent raises theta: keep more
        assert float(group_of(pruner, name).threshold.grad) == pytest.approx(expected, rel=1e-3), name


def test_regularization_loss_needs_a_training_forward():
    model = Mixed()
    pruner = LeapPruner(model, MIXED_RULES, target_density=0.3)
    with pytest.raises(RuntimeError):
        pruner.regularization_loss()
    with torch.no_grad():
        model(torch.randn(2, 12))
    with pytest.raises(RuntimeError):
        pruner.regularization_loss()


# ----------------------------------------------------------------------------------------------
# schedule_offset, step counter, report
# ----------------------------------------------------------------------------------------------


def test_schedule_offset_delays_pruning_and_the_regulariser():
    torch.manual_seed(7)
    model = Mixed()
    dense = copy.deepcopy(model)
    names = [n for _, ns, _, _ in MIXED_SPEC for n in ns]
    orig = snapshot(model, names)
    pruner = LeapPruner(model, MIXED_RULES, target_density=0.3, schedule_offset=2, threshold_init=10.0)
    thetas = [safe_theta(t, n) for t, n in zip([-0.5, -1.0, 0.2, -0.3], [4, 24, 9, 12])]
    for name, t in zip(MIXED_MEMBER, thetas):
        set_theta(pruner, name, t)
    x = torch.randn(5, 12)
    ones = {n: (np.ones_like(orig[n][0]), None) for n in names}

    for step in range(2):
        assert pruner.step == step
        out = model(x)
        torch.testing.assert_close(out, dense(x), rtol=1e-6, atol=1e-6)   # nothing pruned
        check_effective(model, ones, orig)
        model(x)
        reg = pruner.regularization_loss()
        assert float(reg.detach()) == 0.0
        reg.backward()
        for name in MIXED_MEMBER:
            g = group_of(pruner, name).threshold.grad
            assert g is None or float(g) == 0.0
            group_of(pruner, name).threshold.grad = None
        rep = pruner.report()
        assert rep["pruning_active"] is False and rep["global_density"] == 1.0 and rep["step"] == step
        pruner.on_optimizer_step()

    assert pruner.step == 2
    assert pruner.report()["pruning_active"] is True and pruner.report()["step"] == 2
    masks, counts = reference_masks(model, MIXED_SPEC, thetas)
    assert all(k < n for k, n in counts)
    out = model(x)
    torch.testing.assert_close(out, apply_masks_to_copy(dense, masks)(x), rtol=1e-5, atol=1e-6)
    assert not torch.allclose(out, dense(x))
    check_effective(model, masks, orig)
    reg = pruner.regularization_loss()
    assert float(reg.detach()) > 0     # R > R_t = 0.3 here, and now the loss counts
    reg.backward()
    pruner.on_optimizer_step()
    assert pruner.step == 3 and pruner.report()["step"] == 3


def _count_report(model, pruner, masks_names_by_group):
    """Independent per-group and global counts of what the forward really keeps."""
    per_group, kept_total, total = {}, 0, 0
    for names in masks_names_by_group:
        kept = numel = 0
        for nm in names:
            w_eff, _ = effective_linear(model.get_submodule(nm))
            kept += int(np.count_nonzero(w_eff))
            numel += w_eff.size
        per_group[tuple(names)] = (kept, numel)
        kept_total, total = kept_total + kept, total + numel
    return per_group, kept_total, total


def test_report_matches_exact_counts_of_kept_weights():
    torch.manual_seed(8)
    model = Mixed()
    pruner = LeapPruner(model, MIXED_RULES, target_density=0.3, threshold_init=10.0)
    rng = np.random.default_rng(3)
    for trial in range(3):
        thetas = [safe_theta(t, n) for t, n in zip(rng.uniform(-3, 3, 4), [4, 24, 9, 12])]
        for name, t in zip(MIXED_MEMBER, thetas):
            set_theta(pruner, name, t)
        with torch.no_grad():
            model(torch.randn(2, 12))
        groups = [names for _, names, _, _ in MIXED_SPEC]
        per_group, kept_total, total = _count_report(model, pruner, groups)
        _, counts = reference_masks(model, MIXED_SPEC, thetas)
        rep = pruner.report()
        assert total == sum(MIXED_N) == rep["prunable_weights"]
        assert rep["kept_weights"] == kept_total
        assert rep["global_density"] == pytest.approx(kept_total / total, rel=1e-12)
        assert len(rep["groups"]) == 4
        for row in rep["groups"]:
            names = row["modules"]
            kept, numel = per_group[tuple(names)]
            assert row["weights"] == numel and row["kept_weights"] == kept
            assert row["density"] == pytest.approx(kept / numel, rel=1e-12)
        for (k, n), names in zip(counts, groups):
            row = next(r for r in rep["groups"] if r["modules"] == names)
            assert row["units"] == n and row["kept_units"] == k


# ----------------------------------------------------------------------------------------------
# finalize
# ----------------------------------------------------------------------------------------------


def _check_finalize(model, pruner, run, masks, orig):
    with torch.no_grad():
        before = run(model)
    rep = pruner.report()
    pruner.finalize()
    assert pruner.finalized
    for name in masks:
        assert not isinstance(model.get_submodule(name), LeapMasked), name
    assert not any(isinstance(m, LeapMasked) for m in model.modules())
    assert len(model._forward_pre_hooks) == 0
    with torch.no_grad():
        after = run(model)
    torch.testing.assert_close(after, before, rtol=1e-5, atol=1e-5)
    zeros = total = 0
    for name, (wm, bm) in masks.items():
        mod = model.get_submodule(name)
        w = logical_weight(mod)
        w0, b0 = orig[name]
        np.testing.assert_array_equal(w == 0, wm == 0, err_msg=name)   # exact zeros, nowhere else
        np.testing.assert_array_equal(w[wm == 1], w0[wm == 1])         # kept weights untouched
        if b0 is not None:
            b = bias_of(mod)
            np.testing.assert_array_equal(b, b0 * bm if bm is not None else b0)
        zeros += int(np.sum(w == 0))
        total += w.size
    assert rep["prunable_weights"] == total
    assert rep["kept_weights"] == total - zeros
    assert rep["global_density"] == pytest.approx((total - zeros) / total, rel=1e-12)


def test_finalize_mixed_model():
    torch.manual_seed(9)
    model = Mixed()
    names = [n for _, ns, _, _ in MIXED_SPEC for n in ns]
    orig = snapshot(model, names)
    pruner = LeapPruner(model, MIXED_RULES, target_density=0.3)
    thetas = [safe_theta(t, n) for t, n in zip([0.1, -1.0, 0.5, -0.2], [4, 24, 9, 12])]
    for name, t in zip(MIXED_MEMBER, thetas):
        set_theta(pruner, name, t)
    masks, _ = reference_masks(model, MIXED_SPEC, thetas)
    x = torch.randn(6, 12)
    _check_finalize(model, pruner, lambda m: m(x), masks, orig)


# ----------------------------------------------------------------------------------------------
# real transformers: BERT (hybrid), GPT-2 (Conv1D), Llama (heads on q/k/v/o)
# ----------------------------------------------------------------------------------------------


def _gpt2_spec():
    spec = []
    for layer in range(2):
        p = f"transformer.h.{layer}."
        spec += [("unstructured", [p + "attn.c_attn"], None, {}),
                 ("block", [p + "attn.c_proj"], None, {"block": (4, 8)}),
                 ("channel", [p + "mlp.c_fc", p + "mlp.c_proj"], ["qkv", "out"], {"num_heads": 128})]
    return spec


def _llama_spec():
    spec = []
    for layer in range(2):
        p = f"model.layers.{layer}."
        # grouped-query attention, 4 query / 2 key-value heads: a unit is one KV group
        spec += [("head", [p + "self_attn.q_proj", p + "self_attn.k_proj", p + "self_attn.v_proj",
                           p + "self_attn.o_proj"], HEAD_ROLES, {"num_heads": 2}),
                 ("channel", [p + "mlp.gate_proj", p + "mlp.up_proj", p + "mlp.down_proj"],
                  ["qkv", "qkv", "out"], {"num_heads": 64})]
    return spec


def _units(model, gran, names, roles, kw):
    w = logical_weight(model.get_submodule(names[-1]))
    if gran in ("head", "channel"):
        return kw["num_heads"]
    if gran == "block":
        return (w.shape[0] // kw["block"][0]) * (w.shape[1] // kw["block"][1])
    return {"unstructured": w.size, "row": w.shape[0], "column": w.shape[1]}[gran]


def _attach_model(kind, score="magnitude"):
    """A tiny transformer with LEAP attached; ``score`` "learned": scores that start at the
    units' magnitudes (score_init's default), so the masks are magnitude pruning's."""
    if kind == "bert":
        model = tm.tiny_bert(seed=11)
        pruner = attach(model, {"compression_training": tm.leap_section(tm.HYBRID_BERT, score=score)})
        return model, pruner, bert_hybrid_spec()
    if kind == "gpt2":
        model = tm.tiny_gpt2(seed=12)
        rules = [GroupRule("qkv", [r"attn\.c_attn"], "unstructured", score=score),
                 GroupRule("attn_out", [r"attn\.c_proj"], "block", score=score, block=(4, 8)),
                 GroupRule("ffn", [r"mlp\.c_proj"], "channel", score=score, related_modules=[r"mlp\.c_fc"])]
        return model, LeapPruner(model, rules, target_density=0.3, threshold_init=10.0), _gpt2_spec()
    model = tm.tiny_llama(seed=13)
    groups = {"heads": {"params": {"granularity": "head"}, "modules": ["o_proj"],
                        "related_modules": ["q_proj", "k_proj", "v_proj"]},
              "mlp": {"params": {"granularity": "channel"}, "modules": ["down_proj"],
                      "related_modules": ["gate_proj", "up_proj"]}}
    pruner = attach(model, {"compression_training": tm.leap_section(groups, score=score)})
    return model, pruner, _llama_spec()


@pytest.mark.parametrize("score", ["magnitude", "learned"])
@pytest.mark.parametrize("kind", ["bert", "gpt2", "llama"])
def test_transformer_masked_forward_report_and_finalize(kind, score):
    """Masks against an independent magnitude top-k; learned scores start at the magnitudes
    (score_init "magnitude", the default), so before any training step they mask the same."""
    torch.manual_seed(14)
    model, pruner, spec = _attach_model(kind, score)
    model.eval()
    assert all(g.learned == (score == "learned") for g in pruner.groups)
    assert len(pruner.groups) == len(spec)
    names = [n for _, ns, _, _ in spec for n in ns]
    assert sorted(m.name for g in pruner.groups for m in g.members) == sorted(names)
    if kind == "gpt2":
        assert all(is_conv1d(model.get_submodule(n)) for n in names)
    # an unpruned copy, without LEAP's modules and forwards
    dense = {"bert": tm.tiny_bert, "gpt2": tm.tiny_gpt2, "llama": tm.tiny_llama}[kind](
        seed={"bert": 11, "gpt2": 12, "llama": 13}[kind]).eval()
    orig = snapshot(dense, names)
    for nm in names:
        np.testing.assert_array_equal(logical_weight(model.get_submodule(nm)), orig[nm][0])

    rng = np.random.default_rng(15)
    thetas = []
    for gran, ns, roles, kw in spec:
        t = safe_theta(rng.uniform(-2, 2), _units(dense, gran, ns, roles, kw))
        set_theta(pruner, ns[-1], t)
        thetas.append(t)
    masks, counts = reference_masks(dense, spec, thetas)
    assert any(k < n for k, n in counts)

    ids = torch.randint(1, 64, (3, 10), generator=torch.Generator().manual_seed(16))
    run = lambda m: m(input_ids=ids).logits  # noqa: E731
    ref = apply_masks_to_copy(dense, masks).eval()
    with torch.no_grad():
        got = run(model)
        torch.testing.assert_close(got, run(ref), rtol=1e-5, atol=1e-5)
        assert not torch.allclose(got, run(dense), atol=1e-4)
    check_effective(model, masks, orig)

    # report, against the independent per-group counts
    rep = pruner.report()
    expected_kept = int(sum(np.count_nonzero(wm) for wm, _ in masks.values()))
    expected_total = int(sum(wm.size for wm, _ in masks.values()))
    assert rep["kept_weights"] == expected_kept and rep["prunable_weights"] == expected_total
    assert rep["global_density"] == pytest.approx(expected_kept / expected_total, rel=1e-12)
    for (gran, ns, _, _), (k, n) in zip(spec, counts):
        row = next(r for r in rep["groups"] if sorted(r["modules"]) == sorted(ns))
        kept = int(sum(np.count_nonzero(masks[nm][0]) for nm in ns))
        numel = int(sum(masks[nm][0].size for nm in ns))
        assert (row["kept_units"], row["units"], row["kept_weights"], row["weights"]) == (k, n, kept, numel)
        assert row["density"] == pytest.approx(kept / numel, rel=1e-12)

    _check_finalize(model, pruner, run, masks, orig)
    with torch.no_grad():
        torch.testing.assert_close(run(model), run(ref), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("score_init", ["magnitude", "zero"])
def test_learned_scores_start_at_each_matrixs_unit_norms_over_their_mean(score_init):
    """GPT-2 (Conv1D weights stored transposed): per-weight scores |w| / mean |w| in the logical
    layout; uniform FFN channels (one threshold, a score set per layer): each layer's channel norms
    (its c_fc column + c_proj row) over their mean. "zero": the authors' start, all zero."""
    model = tm.tiny_gpt2(seed=12)
    rules = [GroupRule("qkv", [r"attn\.c_attn"], "unstructured", score="learned", score_init=score_init),
             GroupRule("ffn", [r"mlp\.c_proj"], "channel", score="learned", score_init=score_init,
                       related_modules=[r"mlp\.c_fc"], uniform=True)]
    pruner = LeapPruner(model, rules, target_density=0.3, threshold_init=10.0)
    for layer in range(2):
        h = model.transformer.h[layer]
        w = h.attn.c_attn.weight.detach().t().double()          # logical (out, in)
        qkv = group_of(pruner, f"transformer.h.{layer}.attn.c_attn").scores.detach().double()
        norms = (h.mlp.c_fc.weight.detach().double().pow(2).sum(0)
                 + h.mlp.c_proj.weight.detach().double().pow(2).sum(1)).sqrt()
        ffn = group_of(pruner, f"transformer.h.{layer}.mlp.c_proj")
        ffn_scores = ffn.scores.detach().double().view(ffn.num_sets, -1)[layer]
        if score_init == "zero":
            assert not qkv.any() and not ffn_scores.any()
            continue
        torch.testing.assert_close(qkv, (w.abs() / w.abs().mean()).flatten(), rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(ffn_scores, norms / norms.mean(), rtol=1e-5, atol=1e-6)
    assert ffn.num_sets == 2   # one group, a score set per layer: each set was scaled on its own


def test_score_init_is_refused_on_a_group_that_ranks_by_magnitude():
    groups = {"ffn": {**tm.FFN_CHANNELS["ffn"], "params": {"granularity": "channel", "score_init": "zero"}}}
    with pytest.raises(LeapConfigError, match=r"different_groups\.ffn\.params\.score_init applies to learned"):
        attach(tm.tiny_bert(), {"compression_training": tm.leap_section(groups)})
    # with learned scores it is taken
    attach(tm.tiny_bert(), {"compression_training": tm.leap_section(groups, score="learned")})


def test_training_forward_backward_on_bert_hybrid_reaches_every_threshold():
    """One training step: the regulariser and the task loss reach every group's threshold."""
    model = tm.tiny_bert(seed=17)
    pruner = attach(model, {"compression_training": tm.leap_section(tm.HYBRID_BERT, target=0.3)})
    ids = torch.randint(1, 64, (4, 10), generator=torch.Generator().manual_seed(18))
    out = model(input_ids=ids)
    reg = pruner.regularization_loss()
    # threshold_init 3.0 everywhere: each group keeps ceil(sigmoid(3) n_g) of its units
    s = 1 / (1 + math.exp(-3.0))
    total = sum(g.num_weights for g in pruner.groups)
    R = sum(math.ceil(s * g.num_units) / g.num_units * g.num_weights for g in pruner.groups) / total
    assert R > s > 0.3
    L = (R - 0.3) ** 2
    assert float(reg.detach()) == pytest.approx(max(50.0, 20000.0 * L / 0.49) * L, rel=1e-4)
    (F.cross_entropy(out.logits, torch.tensor([0, 1, 0, 1])) + reg).backward()
    assert len(pruner.groups) == 7
    for g in pruner.groups:
        assert g.module.threshold.grad is not None and torch.isfinite(g.module.threshold.grad).all()
        assert float(g.module.threshold.grad) != 0.0


# ----------------------------------------------------------------------------------------------
# the CPU selection (numpy partition) and the reused |W| buffer of the fused magnitude mask
# ----------------------------------------------------------------------------------------------


def _topk_lowest_index_first(values: np.ndarray, k: int) -> np.ndarray:
    order = np.argsort(-values, kind="stable")   # ties: lowest index first
    keep = np.zeros(values.size, dtype=bool)
    keep[order[:k]] = True
    return keep


@pytest.mark.parametrize("kind", ["normal", "ties", "ties_float64"])
def test_cpu_kth_largest_and_counts_is_exact(kind):
    from leap_ds.algorithm import mask
    rng = np.random.default_rng(5)
    for n in (1, 2, 7, 1000, 70001):
        v = rng.standard_normal(n) if kind == "normal" else rng.integers(0, 6, n).astype(np.float64)
        t = torch.tensor(v, dtype=torch.float64 if kind == "ties_float64" else torch.float32)
        for k in sorted({1, n, max(1, n // 3), max(1, n - 1)}):
            ref = np.sort(t.numpy())[::-1][k - 1]
            for overwrite in (False, True):
                x = t.clone()
                kth, greater, equal = mask._kth_largest_and_counts(x, k, overwrite=overwrite)
                assert float(kth) == float(ref)
                assert (greater, equal) == (int((t.numpy() > ref).sum()), int((t.numpy() == ref).sum()))
                if not overwrite:
                    assert torch.equal(x, t)
            assert np.array_equal(mask.topk_bool(t, k).numpy(), _topk_lowest_index_first(t.float().numpy(), k))


def test_fused_magnitude_mask_through_the_reused_buffer_is_exact(monkeypatch):
    """Matrices of several sizes in turn (the per-thread |W| buffer holds the last one's values), a
    transposed view, ties straddling the cut, a matrix too big for the buffer, weights changed in
    place between forwards and another thread: always exactly the k largest |w| and their gradient."""
    import threading
    from leap_ds.algorithm import mask
    monkeypatch.setattr(mask, "_SCRATCH_MAX", 3000)   # the 40 x 96 matrix allocates its own
    gen = torch.Generator().manual_seed(8)
    mats = [torch.randn(64, 46, generator=gen), torch.randn(8, 5, generator=gen),
            torch.randn(40, 96, generator=gen).t(), torch.randint(-3, 4, (30, 20), generator=gen).float()]

    def check(w0, k):
        w = w0.clone().requires_grad_(True)
        theta = torch.zeros(1, requires_grad=True)
        out = mask.masked_weight(w, theta, k=k)
        keep = _topk_lowest_index_first(w0.abs().reshape(-1).numpy(), k).reshape(w0.shape)
        assert np.array_equal(out.detach().numpy(), np.where(keep, w0.numpy(), 0.0))
        grad_out = torch.randn(w0.shape, generator=gen)
        (out * grad_out).sum().backward()
        assert np.array_equal(w.grad.numpy(), np.where(keep, grad_out.numpy(), 0.0))
        expected = float((grad_out.double() * w0.double() * torch.from_numpy(keep)).sum())
        assert float(theta.grad) == pytest.approx(expected, rel=1e-5, abs=1e-5)

    for changed in (False, True):
        for w0 in mats:
            if changed:   # in place, as an optimizer step does
                w0.mul_(-1.5).add_(torch.randn(w0.shape, generator=gen).round())
            for k in (1, w0.numel() // 2, w0.numel() - 1):
                check(w0, k)
    errors = []

    def in_another_thread():   # its own buffer
        try:
            for w0 in mats:
                check(w0, w0.numel() // 3)
        except BaseException as e:   # noqa: BLE001 (re-raised below)
            errors.append(e)
    thread = threading.Thread(target=in_another_thread)
    thread.start()
    thread.join()
    assert not errors, errors
