"""Masked linear layers: LEAP attached to a module without forking the model's code.

Like ``torch.nn.utils.parametrize``, the module's class is swapped for a
subclass (``LeapLinear`` for ``nn.Linear``, ``LeapConv1D`` for GPT-2's
``Conv1D``) whose forward multiplies the weight (and, for row-shaped units,
the bias) by the group's mask. Parameters stay where they were, so
state-dict keys, ZeRO-3's per-module gathering and other forward hooks on the
module (accelerate's, a user's) are unchanged. Everything the forward needs
lives on the module itself, so ``copy.deepcopy``, ``pickle`` and
``torch.save(model)`` give a copy that masks its own weights.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .group import LeapGroup
from .layout import TileLayout

_CLASSES: dict[type, type] = {}


class LeapMasked:
    """Mixin for a pruned linear layer; see the module docstring.

    ``leap_layout``: how the group's units tile this matrix; ``leap_member``:
    this matrix's index in its group (0 records the keep ratio); ``leap_set``:
    its layer's index when several layers share the group (``uniform``). The group is
    the child ``leap_group`` (one-matrix groups) or shared with the other
    matrices of a head/channel group, held unregistered so its parameters
    are owned once, by the common parent.
    """

    leap_layout: TileLayout
    leap_member: int
    leap_set: int

    @property
    def leap_unit_group(self) -> LeapGroup:
        return self.__dict__["_leap_shared_group"] if "_leap_shared_group" in self.__dict__ else self.leap_group

    def leap_logical_weight(self) -> torch.Tensor:
        return self.weight.t() if self.leap_layout.transposed else self.weight

    def leap_masked_weight_and_bias(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        group, layout, weight = self.leap_unit_group, self.leap_layout, self.leap_logical_weight()
        record, set_index = self.leap_member == 0, self.leap_set
        if group.fused:
            return group(weight=weight, record=record)[0], self.bias
        unit_mask, _ = group(layout.unit_sq_norms(weight) if group.needs_weight_scores else None,
                             record=record, set_index=set_index)
        w = weight * layout.expand(unit_mask).to(weight.dtype)
        bias, bias_mask = self.bias, layout.bias_mask(unit_mask)
        if bias is not None and bias_mask is not None:
            bias = bias * bias_mask.to(bias.dtype)
        return w, bias

    def forward(self, x):
        weight, bias = self.leap_masked_weight_and_bias()
        return F.linear(x, weight, bias)

    def __reduce_ex__(self, protocol):
        # the subclass is made at run time: rebuild it from the original class when unpickling
        return _rebuild, (type(self).__mro__[2],), self.__getstate__()


def _rebuild(base: type):
    cls = masked_class(base)
    return cls.__new__(cls)


def masked_class(base: type) -> type:
    if base not in _CLASSES:
        _CLASSES[base] = type(f"Leap{base.__name__}", (LeapMasked, base), {"__module__": __name__})
    return _CLASSES[base]


def mask_module(module: nn.Module, layout: TileLayout, member: int, group: LeapGroup, shared: bool,
                set_index: int = 0) -> None:
    """Swap ``module`` to its masked class in place. ``shared``: the group belongs to several
    matrices and is registered on their common parent, not on this module."""
    module.__class__ = masked_class(type(module))
    module.leap_layout, module.leap_member, module.leap_set = layout, member, set_index
    if shared:
        module.__dict__["_leap_shared_group"] = group   # unregistered: no duplicate parameters
    else:
        module.add_module("leap_group", group)


def unmask_module(module: nn.Module) -> None:
    """The module's own class and forward again (its weights are left as they are)."""
    if isinstance(module, LeapMasked):
        module.__class__ = type(module).__mro__[2]
        for attr in ("leap_layout", "leap_member", "leap_set", "_leap_shared_group"):
            module.__dict__.pop(attr, None)


def masked_modules(model: nn.Module):
    """(name, module) of every masked layer of ``model``."""
    return [(n, m) for n, m in model.named_modules() if isinstance(m, LeapMasked)]
