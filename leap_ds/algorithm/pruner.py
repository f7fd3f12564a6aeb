"""``LeapPruner``: LEAP attached to an unmodified model.

Like ``torch.nn.utils.parametrize``, the model's code is untouched: each pruned
linear layer's class is swapped for a masked subclass (:mod:`masked`) and a
small ``LeapGroup`` module owns each learnable threshold. ``finalize``
multiplies the masks into the weights and restores the original classes.

The regulariser reaches the thresholds through autograd whichever backward
the user calls: it is added to the model's output ``loss`` when the model
returns one (Hugging Face models given labels), else by ``engine.backward`` or
by the user (:meth:`LeapPruner.regularization_loss`). A step whose regulariser
never reached a backward pass raises (:meth:`on_optimizer_step`).

Everything distributed is behind :class:`DistributedOps`, so this file imports
no DeepSpeed; the integration layer plugs in ZeRO-aware versions.
"""
from __future__ import annotations

import contextlib
import re
from dataclasses import dataclass

import torch
from torch import nn

from .group import LeapGroup
from .masked import LeapMasked, mask_module, unmask_module
from .mask import topk_bool
from .regularizer import DEFAULT_DENSITY_TOLERANCE, adaptive_lambda, density_regularizer, global_density
from .selection import GroupPlan, GroupRule, LeapConfigError, Member, plan_groups

LEAP_LR = "leap_lr"          # param-group key: LEAP's own base learning rate
LEAP_BETAS = "leap_betas"    # param-group key: LEAP's own Adam betas (schedulers may cycle momentum)
LEAP_KIND = "leap_kind"      # param-group key: "threshold" or "scores"


class LeapUsageError(RuntimeError):
    """LEAP used in a way that would silently train the wrong thing; the message says the fix."""


def _whole(param):
    return param.detach().flatten(), 0


def _no_reduce(tensor):
    return tensor


def _no_gather(params):
    return contextlib.nullcontext()


def _no_write(param):
    return None


def _never(param):
    return False


@dataclass
class DistributedOps:
    """How to read parameters and combine values across ranks.

    ``local_slice(param) -> (flat values, start)``: the part of the flattened
    parameter this rank is responsible for. ``all_reduce_sum(tensor)``: sum
    over ranks, in place. ``gather(params)``: a context in which the full
    parameters are readable (and writable: changes are kept).
    ``after_write(param)``: copy a changed parameter to the optimizer's master.
    ``is_partitioned(param)``: only part of it is on this rank (ZeRO-3).
    Defaults: one process holding everything. Plain functions, so a pruner
    (and a model holding one) can be pickled.
    """
    local_slice: object = _whole
    all_reduce_sum: object = _no_reduce
    gather: object = _no_gather
    after_write: object = _no_write
    is_partitioned: object = _never


@dataclass
class GroupHandle:
    """A planned group and its LeapGroup module."""
    index: int
    plan: GroupPlan
    module: LeapGroup

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
    SHARED_ATTR = {"head": "leap_heads", "channel": "leap_channels"}

    def __init__(self, model: nn.Module, rules: list[GroupRule], *, target_density: float,
                 lambda_max: float = 20000.0, threshold_init: float = 10.0,
                 density_tolerance: float = DEFAULT_DENSITY_TOLERANCE, lambda_min: float = 50.0,
                 two_sided: bool = False,
                 schedule_offset: int = 0, ops: DistributedOps | None = None):
        if any(isinstance(m, LeapMasked) for m in model.modules()):
            raise LeapConfigError("LEAP is already attached to this model; attach it once "
                                  "(leap_ds.initialize attaches it for you)")
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
        self.reference_lr: float | None = None   # the weights' peak lr, for LEAP's lr schedule
        self._reg_built = 0              # regulariser terms built since the last optimizer step
        self._reg_backpropagated = 0     # ... and how many of them a backward pass reached
        self._reg_in_output_loss = False  # the last one went into the model's output loss

        self.groups: list[GroupHandle] = []
        uniform: dict[str, LeapGroup] = {}   # rule name -> the group its layers share
        for i, plan in enumerate(plan_groups(model, rules)):
            shared = len(plan.members) > 1
            learned = plan.rule.score == "learned"
            layout = plan.members[0].layout
            fused = not shared and layout.weights_per_unit == 1 and not layout.masks_bias
            multiple_of = getattr(plan.rule, "multiple_of", 1)
            if multiple_of > layout.num_units:
                raise LeapConfigError(
                    f"compression_training.leap.different_groups.{plan.rule.name}.params.multiple_of: "
                    f"{multiple_of} exceeds the {layout.num_units} {plan.rule.granularity} units of "
                    f"{plan.name!r}, so every unit would always be kept; choose a value <= "
                    f"{layout.num_units} (e.g. a divisor of it), or remove multiple_of")
            if plan.set_index > 0:
                group = uniform[plan.rule.name]
            else:
                group = LeapGroup(layout.num_units, threshold_init, learned_scores=learned, fused=fused,
                                  shared_scores=shared, num_sets=plan.num_sets, multiple_of=multiple_of
                                  ).to(plan.members[0].module.weight.device)
                if shared:
                    owner = model.get_submodule(plan.owner_name)
                    attr = self.SHARED_ATTR[plan.rule.granularity]
                    if plan.num_sets > 1:
                        attr = "leap_uniform_" + re.sub(r"\W", "_", plan.rule.name)
                        uniform[plan.rule.name] = group
                    if hasattr(owner, attr):
                        raise LeapConfigError(f"{plan.owner_name!r} already has a {attr!r}: two "
                                              f"{plan.rule.granularity} groups share one parent module")
                    owner.add_module(attr, group)
            for j, member in enumerate(plan.members):
                mask_module(member.module, member.layout, j, group, shared, plan.set_index)
            self.groups.append(GroupHandle(i, plan, group))
        self._scores_stale = False
        self._hooks = [model.register_forward_pre_hook(self._before_model_forward),
                       model.register_forward_hook(self._add_regularizer_to_loss),
                       model.register_load_state_dict_post_hook(self._after_load_state_dict)]
        self._set_active()
        self.refresh_scores()
        self._init_learned_scores()

    # ----------------------------------------------------------------- forward
    def _before_model_forward(self, module, args):
        # scores follow the weights of the last optimizer step, read once the step has
        # written them back (ZeRO copies its fp32 master into the model after the inner step)
        if self._scores_stale:
            self.refresh_scores()

    def _after_load_state_dict(self, module, incompatible_keys):
        self._scores_stale = True   # new weights: the unit scores follow at the next forward

    def _add_regularizer_to_loss(self, module, args, output):
        """A Hugging Face output with a ``loss`` (the model was given labels) carries the
        regulariser, so any backward of that loss trains the thresholds."""
        loss = getattr(output, "loss", None) if not isinstance(output, (tuple, list)) else None
        if torch.is_tensor(loss) and loss.requires_grad and self.has_pending_forward():
            output.loss = loss + self.regularization_loss().to(loss.dtype)
            self._reg_in_output_loss = True
        return output

    def has_pending_forward(self) -> bool:
        """A training forward ran whose regulariser has not been built yet."""
        return not self.finalized and any(g.module.pending_keep for g in self.groups)

    # ------------------------------------------------------------- regulariser
    @property
    def pruning_active(self) -> bool:
        return self.step >= self.schedule_offset

    def regularization_loss(self) -> torch.Tensor:
        """lambda * L_reg for the last training forward pass; add it to the task loss
        (``engine.backward`` and a model output ``loss`` do it for you).

        R = sum_g kept_g / sum_g N_g counts the weights each group keeps,
        ceil(sigmoid(theta_g) n_g) units (rounded up to a multiple of the group's
        ``multiple_of``), with the gradient of the closed form
        sum_g sigmoid(theta_g) N_g / sum_g N_g. The keep ratios come from the
        forward pass, where ZeRO-3 had gathered each threshold anyway.
        """
        keep = [g.module.take_keep(g.plan.set_index) for g in self.groups]
        in_output, self._reg_in_output_loss = self._reg_in_output_loss, False
        missing = [g.name for g, k in zip(self.groups, keep) if k is None]
        if len(missing) == len(self.groups) and in_output:
            raise LeapUsageError(
                "the regulariser of the last forward pass is already in the model's output loss "
                "(the model was given labels): backpropagate that loss, do not add "
                "regularization_loss() to it again")
        if missing:
            raise LeapUsageError(
                f"LEAP groups {missing[:3]} did not run in a training forward pass with gradients "
                f"enabled since the regulariser was last built. Call regularization_loss() once per "
                f"training forward, after it. Reentrant activation checkpointing (DeepSpeed's "
                f"checkpointing, or use_reentrant=True) runs the forward without gradients: use "
                f"model.gradient_checkpointing_enable() (non-reentrant) instead.")
        density = global_density(keep, [g.num_weights for g in self.groups])
        reg = density_regularizer(density, self.target_density, self.two_sided)
        self.last_reg_loss = float(reg.detach())
        if not self.pruning_active:
            self.last_lambda = 0.0
            term = 0.0 * density
        else:
            self.last_lambda = adaptive_lambda(self.last_reg_loss, self.target_density, self.lambda_max,
                                               lambda_min=self.lambda_min,
                                               density_tolerance=self.density_tolerance)
            term = self.last_lambda * reg
        if term.requires_grad:
            self._reg_built += 1
            term.register_hook(self._count_backpropagated)
        return term

    def _count_backpropagated(self, grad):
        self._reg_backpropagated += 1
        return grad

    def check_regularizer_reached_backward(self) -> None:
        """Raise if a training forward since the last optimizer step trained without its
        regulariser (it was never built, or never reached a backward pass)."""
        dropped = self.has_pending_forward() or self._reg_backpropagated < self._reg_built
        self._reg_built = self._reg_backpropagated = 0
        if dropped:
            for g in self.groups:
                g.module.pending_keep.clear()
            raise LeapUsageError(
                "LEAP's density regulariser did not reach a backward pass before this optimizer "
                "step, so the thresholds would train on the task loss alone. Use "
                "engine.backward(loss) (leap_ds adds the regulariser), or give the model labels so "
                "its output loss carries it, or add leap_ds.regularization_loss(model) to the loss "
                "you call backward() on.")

    # ----------------------------------------------------------------- stepping
    def on_optimizer_step(self) -> None:
        """Call once per optimizer step actually applied (:meth:`hook_optimizer` does)."""
        if self.finalized:
            return
        self.check_regularizer_reached_backward()
        self.step += 1
        self._set_active()
        self._scores_stale = True

    def hook_optimizer(self, optimizer: torch.optim.Optimizer) -> list:
        """Follow a torch optimizer: before each step LEAP's groups get their scheduled lr and
        own betas; after each step that updated the thresholds (an fp16 overflow skips the
        inner step, and gradient accumulation calls it once per boundary) LEAP advances.
        Returns the hook handles."""
        return [optimizer.register_step_pre_hook(self._before_optimizer_step),
                optimizer.register_step_post_hook(self._after_optimizer_step)]

    def _before_optimizer_step(self, optimizer, args, kwargs):
        sync_leap_param_groups(optimizer.param_groups, self.reference_lr)

    def _after_optimizer_step(self, optimizer, args, kwargs):
        # ZeRO steps its inner optimizer once per parameter group (stages 1-2) or sub-group
        # (stage 3), with only that group's parameters in place: advance once, with the thresholds
        if any(g.get(LEAP_KIND) == "threshold" and g["params"] for g in optimizer.param_groups):
            self.on_optimizer_step()

    def _set_active(self):
        for g in self.groups:
            g.module.pruning_active = self.pruning_active

    def refresh_scores(self) -> None:
        """Recompute magnitude scores of groups spanning several matrices (heads, channels)."""
        self._scores_stale = False
        groups = [g for g in self.groups if g.module.unit_scores is not None]
        for g, sq_norms in zip(groups, self._unit_sq_norms(groups)):
            self._set_unit_scores(g, sq_norms)

    @torch.no_grad()
    def _init_learned_scores(self) -> None:
        """Learned scores with ``score_init`` "magnitude" start at their units' L2 norms (|w| for
        single weights), scaled to mean 1 per matrix: the first masks are magnitude pruning's, and
        the scores' lr (1e-2) re-ranks units near the cut rather than overturning the order."""
        groups = [g for g in self.groups if g.learned and g.plan.rule.score_init == "magnitude"]
        for g, sq_norms in zip(groups, self._unit_sq_norms(groups)):
            norms = sq_norms.sqrt()
            scores = g.module.scores.view(g.module.num_sets, g.num_units)[g.plan.set_index]
            scores.copy_((norms / norms.mean().clamp(min=1e-12)).to(scores.device, scores.dtype))

    def _unit_sq_norms(self, groups: list[GroupHandle]) -> list[torch.Tensor]:
        """Each group's units' squared L2 norms over its matrices.

        A rank holding whole weights computes them alone (no collective, so a forward on one
        rank is possible); with ZeRO-3 partitions each rank sums squares over the part it holds
        and one all-reduce combines them: no weight is gathered.
        """
        partitioned = [g for g in groups if any(self.ops.is_partitioned(m.module.weight) for m in g.members)]
        out = {g.index: sum(m.layout.unit_sq_norms(_logical_weight(m)) for m in g.members)
               for g in groups if g not in partitioned}
        if partitioned:
            parts = []
            for g in partitioned:
                total = None
                for m in g.members:
                    flat, start = self.ops.local_slice(m.module.weight)
                    part = m.layout.unit_sq_norms_of_slice(flat, start)
                    total = part if total is None else total + part.to(total.device)
                parts.append(total)
            device = parts[0].device
            flat_scores = self.ops.all_reduce_sum(torch.cat([p.to(device) for p in parts]))
            out.update({g.index: s for g, s in zip(partitioned, flat_scores.split([g.num_units for g in partitioned]))})
        return [out[g.index] for g in groups]

    @staticmethod
    def _set_unit_scores(g: GroupHandle, scores: torch.Tensor) -> None:
        target = g.module.unit_scores.view(g.module.num_sets, g.num_units)[g.plan.set_index]
        target.copy_(scores.to(target.device))

    # ---------------------------------------------------------------- reporting
    def thresholds(self) -> list[float]:
        """Every group's theta, identical on all ranks (one all-reduce, one host copy)."""
        device = self.groups[0].module.threshold.device
        values = torch.zeros(len(self.groups), dtype=torch.float64, device=device)
        for g in self.groups:
            flat, start = self.ops.local_slice(g.module.threshold)
            if start == 0 and flat.numel() > 0:
                values[g.index] = flat[0].to(device, torch.float64)
        return self.ops.all_reduce_sum(values).cpu().tolist()

    def report(self) -> dict:
        thetas = self.thresholds()
        rows, kept_total, total = [], 0, 0
        for g, theta in zip(self.groups, thetas):
            k = g.module.kept_units(theta) if self.pruning_active else g.num_units
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
    def unit_masks(self) -> list[torch.Tensor]:
        """Every group's current 0/1 unit mask (float32, on the CPU); a collective at ZeRO-3.
        Unstructured groups give their weight-sized mask, flattened."""
        masks = []
        if self._scores_stale:
            self.refresh_scores()
        for g in self.groups:
            with self.ops.gather(self._group_params(g)):
                masks.append(self._unit_mask(g).float().cpu())
        return masks

    def _group_params(self, g: GroupHandle) -> list:
        params = [g.module.threshold] + ([g.module.scores] if g.learned else [])
        for m in g.members:
            params += [p for p in (m.module.weight, m.module.bias) if p is not None]
        return params

    def _unit_mask(self, g: GroupHandle) -> torch.Tensor:
        """Inside gather(): the group's unit mask (for fused groups, the bool weight mask)."""
        if g.module.fused:
            w = _logical_weight(g.members[0])
            if not g.module.pruning_active:
                return torch.ones_like(w, dtype=torch.bool)
            k = g.module.kept_units()
            return topk_bool(g.module.scores.view(w.shape) if g.learned else w.abs(), k)
        scores = g.members[0].layout.unit_sq_norms(_logical_weight(g.members[0])) \
            if g.module.needs_weight_scores else None
        mask, _ = g.module(scores, record=False, set_index=g.plan.set_index)
        return mask

    @torch.no_grad()
    def finalize(self) -> None:
        """Multiply the hard masks into the weights (and the optimizer's master copy) and take
        LEAP out of every forward. A collective at ZeRO-3: call it on every rank."""
        if self.finalized:
            return
        if self._scores_stale:
            self.refresh_scores()
        for g in self.groups:
            with self.ops.gather(self._group_params(g)):
                if g.module.fused:
                    # the fused forward gives the masked weight itself
                    w = _logical_weight(g.members[0])
                    masked, _ = g.module(weight=w, record=False)
                    w.copy_(masked)
                    self.ops.after_write(g.members[0].module.weight)
                    continue
                mask = self._unit_mask(g)
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
        """Restore every module's own class and forward (the LeapGroup modules stay, unused)."""
        for g in self.groups:
            g.module.pending_keep.clear()
            for m in g.members:
                unmask_module(m.module)
        for hook in self._hooks:
            hook.remove()

    def state_dict(self) -> dict:
        return {"step": self.step, "lambda": self.last_lambda, "reg_loss": self.last_reg_loss}

    def load_state_dict(self, state: dict) -> None:
        self.step = int(state["step"])
        self.last_lambda = float(state["lambda"])
        self.last_reg_loss = float(state["reg_loss"])
        self._set_active()
        self.refresh_scores()
        self._init_learned_scores()

    def parameters(self, kind: str | None = None):
        """LEAP's own parameters (each once): kind 'threshold', 'scores' or None for both."""
        seen = set()
        for g in self.groups:
            for p in ((g.module.threshold,) if kind in (None, "threshold") else ()) + \
                     ((g.module.scores,) if kind in (None, "scores") and g.learned else ()):
                if id(p) not in seen:
                    seen.add(id(p))
                    yield p


def sync_leap_param_groups(param_groups: list[dict], reference_lr: float | None) -> None:
    """Before an optimizer step: LEAP's groups get their own betas back (OneCycle-style
    schedulers cycle every group's momentum) and follow the weights' lr schedule.

    Schedulers that set one lr for every group (DeepSpeed's WarmupLR, WarmupDecayLR, OneCycle,
    torch's OneCycleLR with a single max_lr) leave LEAP's group at the weights' lr: it is set to
    LEAP's base lr x (weights' lr / reference_lr). Schedulers that scale each group's own
    initial lr (torch's LambdaLR, CosineAnnealingLR, DeepSpeed's WarmupCosineLR) already
    schedule LEAP's lr and are left alone."""
    weights = next((g for g in param_groups if LEAP_LR not in g), None)
    if weights is None:
        return   # ZeRO stepping LEAP's group alone: its wrapper synced all groups before
    for g in param_groups:
        if LEAP_LR not in g:
            continue
        if LEAP_BETAS in g and "betas" in g:
            g["betas"] = tuple(g[LEAP_BETAS])
        if weights is not None and reference_lr and g["lr"] == weights["lr"] and g[LEAP_LR] != reference_lr:
            g["lr"] = g[LEAP_LR] * weights["lr"] / reference_lr
