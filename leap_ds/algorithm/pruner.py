"""``LeapPruner``: LEAP attached to an unmodified model.

Like ``torch.nn.utils.parametrize``, the model's code is untouched: each pruned
linear layer gets an instance-level ``forward`` that multiplies its weight (and
bias, for row-shaped units) by the group's mask, and a small ``LeapGroup``
child module that owns the learnable threshold. ``finalize`` multiplies the
masks into the weights and removes all of it.

Everything distributed is behind :class:`DistributedOps`, so this file imports
no DeepSpeed; the integration layer plugs in ZeRO-aware versions.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from .group import LeapGroup
from .mask import kept_units
from .regularizer import DEFAULT_DENSITY_TOLERANCE, adaptive_lambda, density_regularizer, global_density
from .selection import GroupPlan, GroupRule, Member, plan_groups


@dataclass
class DistributedOps:
    """How to read parameters and combine values across ranks.

    ``local_slice(param) -> (flat values, start)``: the part of the flattened
    parameter this rank is responsible for. ``all_reduce_sum(tensor)``: sum
    over ranks, in place. ``gather(params)``: a context in which the full
    parameters are readable (and writable: changes are kept).
    Defaults: one process holding everything.
    """
    local_slice: Callable = lambda p: (p.detach().flatten(), 0)
    all_reduce_sum: Callable = lambda t: t
    gather: Callable = lambda params: contextlib.nullcontext()
    after_write: Callable = lambda p: None


@dataclass
class GroupHandle:
    """A planned group plus its LeapGroup module and per-forward bookkeeping."""
    index: int
    plan: GroupPlan
    module: LeapGroup
    magnitude_scores: torch.Tensor | None = None   # cached for multi-matrix groups
    _cache_forward: int = -1
    _cache: tuple | None = field(default=None, repr=False)

    @property
    def name(self) -> str:
        return self.plan.name

    @property
    def members(self) -> list[Member]:
        return self.plan.members

    @property
    def num_units(self) -> int:
        return self.members[0].layout.num_units

    @property
    def num_weights(self) -> int:
        return sum(m.layout.numel for m in self.members)

    @property
    def weights_per_unit(self) -> int:
        return sum(m.layout.weights_per_unit for m in self.members)

    @property
    def learned(self) -> bool:
        return self.plan.rule.score == "learned"

    @property
    def fused(self) -> bool:
        """One matrix whose units are single weights: LeapGroup masks the weight itself
        (mask._MaskedWeight) instead of returning a unit mask."""
        layout = self.members[0].layout
        return len(self.members) == 1 and layout.weights_per_unit == 1 and not layout.masks_bias


def _logical_weight(member: Member) -> torch.Tensor:
    w = member.module.weight
    return w.t() if member.layout.transposed else w


class LeapPruner:
    """LEAP state for one model: groups, regulariser, step counter."""

    GROUP_ATTR = "leap_group"

    def __init__(self, model: nn.Module, rules: list[GroupRule], *, target_density: float,
                 lambda_max: float = 20000.0, threshold_init: float = 10.0,
                 density_tolerance: float = DEFAULT_DENSITY_TOLERANCE, lambda_min: float = 50.0,
                 two_sided: bool = False,
                 schedule_offset: int = 0, ops: DistributedOps | None = None):
        self.model = model
        self.target_density = float(target_density)
        self.lambda_max = float(lambda_max)
        self.density_tolerance = float(density_tolerance)
        self.lambda_min = float(lambda_min)
        self.two_sided = bool(two_sided)
        self.schedule_offset = int(schedule_offset)
        self.ops = ops or DistributedOps()
        self.step = 0                    # optimizer steps actually applied
        self.last_lambda = 0.0
        self.last_reg_loss = 0.0
        self.finalized = False
        self._forward_id = 0
        self._keep: dict[int, torch.Tensor] = {}

        self.groups: list[GroupHandle] = []
        for i, plan in enumerate(plan_groups(model, rules)):
            group = LeapGroup(plan.members[0].layout.num_units, threshold_init,
                              learned_scores=plan.rule.score == "learned")
            owner = model.get_submodule(plan.owner_name)
            attr = self.GROUP_ATTR if len(plan.members) == 1 else "leap_heads"
            if hasattr(owner, attr):
                raise ValueError(f"{plan.owner_name!r} already has a {attr!r}: LEAP attached twice?")
            owner.add_module(attr, group)
            handle = GroupHandle(i, plan, group)
            self.groups.append(handle)
            for member in plan.members:
                member.module.forward = self._masked_forward(handle, member)
        self._hook = model.register_forward_pre_hook(self._on_model_forward)
        self._set_active()
        self.refresh_scores()

    # ----------------------------------------------------------------- forward
    def _on_model_forward(self, module, args):
        self._forward_id += 1

    def _masked_forward(self, handle: GroupHandle, member: Member):
        if handle.fused:
            def forward(x):
                w, keep = handle.module(weight=_logical_weight(member))
                self._record_keep(handle, keep)
                return F.linear(x, w, member.module.bias)
            return forward

        def forward(x):
            weight = _logical_weight(member)
            unit_mask = self._unit_mask(handle, weight)
            w = weight * member.layout.expand(unit_mask).to(weight.dtype)
            bias = member.module.bias
            bias_mask = member.layout.bias_mask(unit_mask)
            if bias is not None and bias_mask is not None:
                bias = bias * bias_mask.to(bias.dtype)
            return F.linear(x, w, bias)
        return forward

    def _unit_mask(self, handle: GroupHandle, weight: torch.Tensor) -> torch.Tensor:
        if len(handle.members) == 1:
            scores = None if handle.learned else handle.members[0].layout.unit_sq_norms(weight)
            mask, keep = handle.module(scores)
        elif handle._cache_forward == self._forward_id and handle._cache is not None:
            return handle._cache[0]   # Q, K, V and output share one mask per forward
        else:
            mask, keep = handle.module(handle.magnitude_scores)
            handle._cache_forward, handle._cache = self._forward_id, (mask, keep)
        self._record_keep(handle, keep)
        return mask

    def _record_keep(self, handle: GroupHandle, keep: torch.Tensor) -> None:
        """Keep ratios of training forwards, for regularization_loss()."""
        if torch.is_grad_enabled():
            self._keep.setdefault(handle.index, keep)

    # ------------------------------------------------------------- regulariser
    @property
    def pruning_active(self) -> bool:
        return self.step >= self.schedule_offset

    def regularization_loss(self) -> torch.Tensor:
        """lambda * L_reg for the last forward pass; add it to the task loss.

        R = sum_g kept_g / sum_g N_g counts the weights each group keeps,
        ceil(sigmoid(theta_g) n_g) units, with the gradient of the closed form
        sum_g sigmoid(theta_g) N_g / sum_g N_g. The keep ratios come from the
        forward pass, where ZeRO-3 had gathered each threshold anyway.
        """
        missing = [g.name for g in self.groups if g.index not in self._keep]
        if missing:
            raise RuntimeError(f"LEAP groups {missing[:3]} did not run in the last forward pass "
                               f"with gradients enabled; call regularization_loss() once per "
                               f"training forward, after it")
        keep = [self._keep[g.index] for g in self.groups]
        self._keep = {}
        for g in self.groups:
            g._cache = None
        density = global_density(keep, [g.num_weights for g in self.groups])
        reg = density_regularizer(density, self.target_density, self.two_sided)
        self.last_reg_loss = float(reg.detach())
        if not self.pruning_active:
            self.last_lambda = 0.0
            return 0.0 * density
        self.last_lambda = adaptive_lambda(self.last_reg_loss, self.target_density, self.lambda_max,
                                           lambda_min=self.lambda_min,
                                           density_tolerance=self.density_tolerance)
        return self.last_lambda * reg

    # ----------------------------------------------------------------- stepping
    def on_optimizer_step(self) -> None:
        """Call once per optimizer step actually applied."""
        self.step += 1
        self._set_active()
        self.refresh_scores()

    def _set_active(self):
        for g in self.groups:
            g.module.pruning_active = self.pruning_active

    def refresh_scores(self) -> None:
        """Recompute magnitude scores of groups spanning several matrices (heads).

        Each rank sums squares over the weights it holds, then one all-reduce
        combines them: no weight is gathered.
        """
        groups = [g for g in self.groups if len(g.members) > 1 and not g.learned]
        if not groups:
            return
        parts = []
        for g in groups:
            total = torch.zeros(g.num_units)
            for m in g.members:
                flat, start = self.ops.local_slice(m.module.weight)
                total += m.layout.unit_sq_norms_of_slice(flat.cpu(), start)
            parts.append(total)
        flat_scores = torch.cat(parts)
        device = groups[0].members[0].module.weight.device
        flat_scores = self.ops.all_reduce_sum(flat_scores.to(device)).cpu()
        for g, scores in zip(groups, flat_scores.split([g.num_units for g in groups])):
            g.magnitude_scores = scores.to(device)

    # ---------------------------------------------------------------- reporting
    def thresholds(self) -> list[float]:
        """Every group's theta, identical on all ranks (one all-reduce)."""
        values = torch.zeros(len(self.groups), dtype=torch.float64)
        for g in self.groups:
            flat, start = self.ops.local_slice(g.module.threshold)
            if start == 0 and flat.numel() > 0:
                values[g.index] = float(flat[0])
        device = self.groups[0].module.threshold.device
        return self.ops.all_reduce_sum(values.to(device)).cpu().tolist()

    def report(self) -> dict:
        thetas = self.thresholds()
        rows, kept_total, total = [], 0, 0
        for g, theta in zip(self.groups, thetas):
            k = kept_units(theta, g.num_units) if self.pruning_active else g.num_units
            kept = k * g.weights_per_unit
            kept_total, total = kept_total + kept, total + g.num_weights
            rows.append({
                "name": g.name, "granularity": g.plan.rule.granularity, "score": g.plan.rule.score,
                "modules": [m.name for m in g.members], "units": g.num_units,
                "kept_units": k, "weights": g.num_weights, "kept_weights": kept,
                "density": kept / g.num_weights, "threshold": theta,
                "keep_ratio": float(torch.sigmoid(torch.tensor(theta))),
            })
        return {"target_density": self.target_density, "global_density": kept_total / total,
                "prunable_weights": total, "kept_weights": kept_total, "lambda": self.last_lambda,
                "reg_loss": self.last_reg_loss, "step": self.step,
                "pruning_active": self.pruning_active, "groups": rows}

    # ------------------------------------------------------------------ export
    @torch.no_grad()
    def finalize(self) -> None:
        """Multiply the hard masks into the weights and take LEAP out of every forward."""
        if self.finalized:
            return
        for g in self.groups:
            params = [g.module.threshold] + ([g.module.scores] if g.learned else [])
            for m in g.members:
                params += [p for p in (m.module.weight, m.module.bias) if p is not None]
            with self.ops.gather(params):
                if len(g.members) == 1:
                    scores = None if g.learned else g.members[0].layout.unit_sq_norms(_logical_weight(g.members[0]))
                else:
                    scores = g.magnitude_scores
                mask, _ = g.module(scores)
                for m in g.members:
                    w = m.module.weight
                    wmask = m.layout.expand(mask)
                    w.data.mul_((wmask.t() if m.layout.transposed else wmask).to(w.dtype))
                    bmask = m.layout.bias_mask(mask)
                    changed = [w]
                    if m.module.bias is not None and bmask is not None:
                        m.module.bias.data.mul_(bmask.to(m.module.bias.dtype))
                        changed.append(m.module.bias)
                    for p in changed:
                        self.ops.after_write(p)
        self.detach()
        self.finalized = True

    def detach(self) -> None:
        """Restore every module's own forward (the LeapGroup modules stay, unused)."""
        for g in self.groups:
            for m in g.members:
                m.module.__dict__.pop("forward", None)
        self._hook.remove()

    def state_dict(self) -> dict:
        return {"step": self.step, "lambda": self.last_lambda, "reg_loss": self.last_reg_loss,
                "forward_id": self._forward_id}

    def load_state_dict(self, state: dict) -> None:
        self.step = int(state["step"])
        self.last_lambda = float(state["lambda"])
        self.last_reg_loss = float(state["reg_loss"])
        self._set_active()
        self.refresh_scores()

    def parameters(self, kind: str | None = None):
        """LEAP's own parameters: kind 'threshold', 'scores' or None for both."""
        for g in self.groups:
            if kind in (None, "threshold"):
                yield g.module.threshold
            if kind in (None, "scores") and g.learned:
                yield g.module.scores


