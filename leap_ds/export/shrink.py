"""Physically remove pruned attention units and FFN channels from a plain (unmasked) model.

The map is the one the masks use: every member of a head or channel group has
a :class:`~leap_ds.algorithm.layout.TileLayout` whose unit ``u`` owns rows
``[u*tile_rows, (u+1)*tile_rows)`` (producers: Q, K, V, FFN in / gate / up)
or input columns ``[u*tile_cols, ...)`` (consumers: attention output, FFN
out / down). Keeping the rows and biases of the kept units in every producer
and the same units' columns in the consumer is exact: a pruned unit's rows
and bias are zero in the masked model, so its activation is act(0) and its
consumer column is zero, and the unit contributes nothing (the shape of
``torch.ao.pruning``'s ``prune_linear_activation_linear``).

A group with every unit pruned keeps one unit, zero in every member: the
sublayer then adds only the consumer's bias, exactly as the masked model
does, and no layer has zero rows (which some kernels and loaders reject).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..algorithm.layout import TileLayout
from ..algorithm.selection import COUPLED, GroupPlan, LeapConfigError

# attributes an attention module may keep for its head counts / widths; updated when present
QUERY_HEAD_ATTRS = ("num_attention_heads", "num_heads")
KV_HEAD_ATTRS = ("num_key_value_heads", "num_kv_heads")
QUERY_WIDTH_ATTRS = ("all_head_size",)
HEAD_SIZE_ATTRS = ("head_dim", "attention_head_size")
FFN_WIDTH_ATTRS = ("intermediate_size",)


@dataclass
class MemberSpec:
    """What shrinking needs from a group member (no reference to a live module)."""
    name: str
    layout: TileLayout


@dataclass
class StructuredGroup:
    name: str
    granularity: str          # "head" or "channel"
    members: list[MemberSpec]  # producers first, consumer last (as planned)

    @classmethod
    def of(cls, plan: GroupPlan) -> "StructuredGroup":
        return cls(plan.name, plan.rule.granularity, [MemberSpec(m.name, m.layout) for m in plan.members])


def structured(plans: list[GroupPlan]) -> list[int]:
    """Indices of the plans that compaction shrinks (head and channel groups)."""
    return [i for i, p in enumerate(plans) if p.rule.granularity in COUPLED]


def require_structured(granularities) -> None:
    """Refuse, saying why, when no group is a head or channel group (nothing changes shape)."""
    found = sorted(set(granularities))
    if not set(found) & set(COUPLED):
        raise LeapConfigError(
            f"nothing to compact: the LEAP config has only {', '.join(found)} groups, which zero weights "
            f"inside matrices that keep their shape. Only 'head' (attention) and 'channel' (FFN) groups "
            f"remove whole units; use ds_configs/structured.json or channel.json to get a smaller model.")


def _unit_index(layout: TileLayout, kept_units: torch.Tensor, along_rows: bool) -> torch.Tensor:
    size = layout.tile_rows if along_rows else layout.tile_cols
    return (kept_units.view(-1, 1) * size + torch.arange(size).view(1, -1)).flatten()


def _shrink_module(module: nn.Module, layout: TileLayout, kept_units: torch.Tensor) -> None:
    """Keep the kept units' rows (and bias) or input columns of one Linear / Conv1D, in place."""
    along_rows = layout.tile_cols == layout.cols
    if not along_rows and layout.tile_rows != layout.rows:
        raise LeapConfigError(f"a {layout.tile_rows}x{layout.tile_cols} tile of a {layout.rows}x"
                              f"{layout.cols} weight is neither whole rows nor whole columns")
    index = _unit_index(layout, kept_units, along_rows).to(module.weight.device)
    weight = module.weight.detach()
    # logical (out, in) dimension -> stored dimension (Conv1D stores (in, out))
    dim = (0 if along_rows else 1) if not layout.transposed else (1 if along_rows else 0)
    module.weight = nn.Parameter(weight.index_select(dim, index).clone(), requires_grad=module.weight.requires_grad)
    if along_rows and module.bias is not None:
        module.bias = nn.Parameter(module.bias.detach().index_select(0, index).clone(),
                                   requires_grad=module.bias.requires_grad)
    out_features, in_features = (layout.rows, layout.cols)
    if along_rows:
        out_features = index.numel()
    else:
        in_features = index.numel()
    if isinstance(module, nn.Linear):
        module.out_features, module.in_features = out_features, in_features
    else:  # transformers Conv1D
        module.nf, module.nx = out_features, in_features


def _parent(model: nn.Module, name: str) -> tuple[str, nn.Module]:
    parent = name.rpartition(".")[0]
    return parent, model.get_submodule(parent)


def _set_present(module: nn.Module, names, value: int, changed: dict) -> None:
    for attr in names:
        if isinstance(getattr(module, attr, None), int):
            setattr(module, attr, value)
            changed[attr] = value


def kept_unit_indices(unit_mask: torch.Tensor) -> tuple[torch.Tensor, bool]:
    """(indices of kept units, whether one zero unit had to be kept because all were pruned)."""
    kept = torch.nonzero(unit_mask.flatten() > 0).flatten().cpu()
    if kept.numel():
        return kept, False
    return torch.zeros(1, dtype=torch.long), True


@torch.no_grad()
def shrink_model(model: nn.Module, groups: list[StructuredGroup], unit_masks: list[torch.Tensor]) -> dict:
    """Shrink ``model`` (plain modules, masks already multiplied in) in place.

    Returns the record :func:`~leap_ds.export.storage.save_compact` stores:
    ``modules`` (name -> stored weight shape), ``attributes`` (module -> updated
    attributes) and ``layers`` (per group: units, kept units, head counts or channels).
    """
    record = {"modules": {}, "attributes": {}, "layers": {}}
    for group, mask in zip(groups, unit_masks):
        kept, all_pruned = kept_unit_indices(mask)
        num_units = group.members[0].layout.num_units
        if all_pruned:   # the masked model has this unit's weights at zero already; make sure
            for spec in group.members:
                _zero_unit(model.get_submodule(spec.name), spec.layout, 0)
        for spec in group.members:
            module = model.get_submodule(spec.name)
            _shrink_module(module, spec.layout, kept)
            record["modules"][spec.name] = list(module.weight.shape)
        n = kept.numel()
        layer = {"granularity": group.granularity, "units": num_units,
                 "kept_units": 0 if all_pruned else n, "all_pruned": all_pruned}
        if group.granularity == "head":
            layer.update(_update_attention(model, group, n, record["attributes"]))
        else:
            consumer = group.members[-1]
            width = n * consumer.layout.tile_cols
            parent_name, parent = _parent(model, consumer.name)
            changed = {}
            _set_present(parent, FFN_WIDTH_ATTRS, width, changed)
            if changed:
                record["attributes"].setdefault(parent_name, {}).update(changed)
            layer["channels"] = width
        record["layers"][group.name] = layer
    return record


def _zero_unit(module: nn.Module, layout: TileLayout, unit: int) -> None:
    along_rows = layout.tile_cols == layout.cols
    size = layout.tile_rows if along_rows else layout.tile_cols
    sl = slice(unit * size, (unit + 1) * size)
    w = module.weight.t() if layout.transposed else module.weight
    if along_rows:
        w[sl].zero_()
        if module.bias is not None:
            module.bias[sl].zero_()
    else:
        w[:, sl].zero_()


def _update_attention(model: nn.Module, group: StructuredGroup, kept: int, attributes: dict) -> dict:
    """Head counts on the module holding Q, K, V (BERT's BertSelfAttention keeps
    num_attention_heads / all_head_size; Llama's derives them from q_proj / head_dim)."""
    q, k = group.members[0], group.members[1]
    parent_name, attention = _parent(model, q.name)
    head_dim = next((getattr(attention, a) for a in HEAD_SIZE_ATTRS if isinstance(getattr(attention, a, None), int)),
                    None)
    if head_dim is None:
        raise LeapConfigError(
            f"cannot compact {parent_name!r} ({type(attention).__name__}): it has none of the head-size "
            f"attributes {HEAD_SIZE_ATTRS}, so its forward's head layout is unknown")
    q_heads = kept * (q.layout.tile_rows // head_dim)
    kv_heads = kept * (k.layout.tile_rows // head_dim)
    changed = {}
    _set_present(attention, QUERY_HEAD_ATTRS, q_heads, changed)
    _set_present(attention, KV_HEAD_ATTRS, kv_heads, changed)
    _set_present(attention, QUERY_WIDTH_ATTRS, q_heads * head_dim, changed)
    if changed:
        attributes.setdefault(parent_name, {}).update(changed)
    return {"heads": q_heads, "kv_heads": kv_heads, "head_dim": head_dim}


@torch.no_grad()
def apply_masks(model: nn.Module, plans: list[GroupPlan], masks: list[torch.Tensor]) -> None:
    """Multiply every group's mask into a plain model's weights (what ``finalize`` does; a
    second application changes nothing). ``masks`` as ``LeapPruner.unit_masks()`` gives them:
    a unit mask, or for single-weight units the weight-shaped mask."""
    for plan, mask in zip(plans, masks):
        for member in plan.members:
            module = model.get_submodule(member.name)
            layout = member.layout
            w = module.weight.t() if layout.transposed else module.weight
            w.mul_(layout.expand(mask.to(w.device)).to(w.dtype))
            bias_mask = layout.bias_mask(mask.to(w.device))
            if module.bias is not None and bias_mask is not None:
                module.bias.mul_(bias_mask.to(module.bias.dtype))


@torch.no_grad()
def masks_from_zeros(model: nn.Module, plans: list[GroupPlan]) -> list[torch.Tensor]:
    """Unit masks of an exported masked model: a unit is pruned when every weight (and
    bias) it owns in every member is exactly zero. ``finalize`` writes exact zeros, and a
    trained unit whose weights are all exactly zero computes nothing either, so removing
    it is exact in both cases."""
    masks = []
    for plan in plans:
        total = None
        for member in plan.members:
            module = model.get_submodule(member.name)
            w = module.weight.t() if member.layout.transposed else module.weight
            # count non-zero weights per unit (squares of tiny weights could underflow to 0)
            nonzero = member.layout.unit_sq_norms((w != 0).float())
            if member.layout.masks_bias and module.bias is not None:
                nonzero = nonzero + (module.bias != 0).float().view(member.layout.num_units, -1).sum(1)
            total = nonzero if total is None else total + nonzero
        masks.append((total > 0).float().cpu())
    return masks
