"""Which modules a rule prunes: regexes over ``named_modules()`` and module types.

Follows DeepSpeed's compression conventions: ``modules`` are regexes matched
with ``re.search``. Units that span several matrices name the consumer in
``modules`` and its producers in ``related_modules``: heads (the attention
output projection; Q, K, V) and channels (the FFN output projection; FFN in,
or gate and up). No model file is forked: any model whose prunable layers are
``nn.Linear`` (BERT, RoBERTa, Llama, Qwen, ...) or Hugging Face ``Conv1D``
(GPT-2) works.
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass, field

from torch import nn

from .layout import TileLayout, layout_for

GRANULARITIES = ("unstructured", "block", "row", "column", "head", "channel")
# granularities whose unit spans several matrices: modules = the consumer (attention output /
# FFN down projection), related_modules = its producers (Q, K, V / FFN in, gate, up)
COUPLED = ("head", "channel")


class LeapConfigError(ValueError):
    """A LEAP setting that does not fit the model; the message says how to fix it."""


SCORE_INITS = ("magnitude", "zero")
# zero-initialised learned scores tie, so while the density first falls the masks keep units by
# index, whatever their weights (benchmarks/results/quality.md: LEAP learned scores, zero init)
DEFAULT_SCORE_INIT = "magnitude"


@dataclass
class GroupRule:
    """One ``different_groups`` entry, in plain Python."""
    name: str
    modules: list[str]
    granularity: str = "unstructured"
    score: str = "magnitude"
    # learned scores start at the units' magnitudes (mean 1 per matrix) or at zero (the authors')
    score_init: str = DEFAULT_SCORE_INIT
    block: tuple[int, int] | None = None
    num_heads: int | None = None
    num_kv_heads: int | None = None
    related_modules: list[str] = field(default_factory=list)
    allow_dead_weights: bool = False
    uniform: bool = False      # head/channel: one threshold for every matched layer
    multiple_of: int = 1       # head/channel: keep a multiple of this many units per matrix


@dataclass
class Member:
    """One weight matrix inside a group."""
    name: str
    module: nn.Module
    layout: TileLayout


@dataclass
class GroupPlan:
    name: str
    rule: GroupRule
    members: list[Member]
    owner_name: str          # where the LeapGroup module is attached
    set_index: int = 0       # uniform groups: this layer's index among the layers sharing a threshold
    num_sets: int = 1        # uniform groups: how many layers share the threshold


def is_prunable(module: nn.Module) -> bool:
    """Exactly nn.Linear, or Hugging Face's Conv1D (GPT-2: a linear layer stored as (in, out))."""
    if type(module) is nn.Linear:
        return True
    return type(module).__name__ == "Conv1D" and type(module).__module__.startswith("transformers")


def _refuse_unmaskable(name: str, module: nn.Module, where: str) -> None:
    if isinstance(module, nn.Linear) and type(module) is not nn.Linear:
        raise LeapConfigError(
            f"{where}: {name!r} is a {type(module).__module__}.{type(module).__name__}, a subclass of "
            f"nn.Linear whose forward may not be a plain linear map (quantised or fused linears); LEAP "
            f"masks plain nn.Linear/Conv1D only. Narrow the regex to exclude it, or prune before "
            f"converting the layer.")
    if "forward" in vars(module):
        raise LeapConfigError(
            f"{where}: {name!r} has an instance-level forward (set by accelerate's dispatch hooks, "
            f"torch.compile or another tool): attach LEAP before wrapping or dispatching the model.")


def logical_shape(module: nn.Module) -> tuple[int, int, bool]:
    """(out_features, in_features, stored_transposed)."""
    rows, cols = module.weight.ds_shape if hasattr(module.weight, "ds_shape") else module.weight.shape
    if isinstance(module, nn.Linear):
        return rows, cols, False
    return cols, rows, True


def _match(modules: dict[str, nn.Module], pattern: str, where: str) -> list[str]:
    try:
        regex = re.compile(pattern)
    except re.error as e:
        raise LeapConfigError(f"{where}: {pattern!r} is not a valid regular expression ({e})") from None
    names = [n for n, m in modules.items() if n and regex.search(n)]
    if not names:
        raise LeapConfigError(f"{where}: regex {pattern!r} matches no module of the model. "
                              f"Check the module names with `leap-ds train --dry-run` or "
                              f"model.named_modules(); e.g. 'attention.self.query' for BERT.")
    for n in names:
        _refuse_unmaskable(n, modules[n], where)
    prunable = [n for n in names if is_prunable(modules[n])]
    if not prunable:
        raise LeapConfigError(f"{where}: regex {pattern!r} matches {names[:3]}..., but none is a "
                              f"Linear/Conv1D layer; LEAP prunes linear layers only.")
    return prunable


def _closest(candidates: list[str], anchor: str) -> str:
    """The candidate sharing the longest dotted prefix with anchor (same layer)."""
    def shared(n):
        return len(os.path.commonprefix([n.split("."), anchor.split(".")]))
    best = max(shared(c) for c in candidates)
    winners = [c for c in candidates if shared(c) == best]
    if len(winners) != 1:
        raise LeapConfigError(f"cannot tell which of {winners} belongs with {anchor!r}; "
                              f"make related_modules more specific")
    return winners[0]


def _common_parent(names: list[str]) -> str:
    return ".".join(os.path.commonprefix([n.split(".") for n in names]))


def _layer_of(name: str) -> str:
    """'encoder.layer.3.output.dense' -> 'encoder.layer.3': up to the first numeric component."""
    parts = name.split(".")
    for i, part in enumerate(parts):
        if part.isdigit():
            return ".".join(parts[:i + 1])
    return ".".join(parts[:-1])


def _config_value(model: nn.Module, *names):
    config = getattr(model, "config", None)
    for n in names:
        value = getattr(config, n, None)
        if value:
            return value
    return None


def _plan_heads(rule: GroupRule, model, modules, out_name: str, related: list[list[str]], where: str,
                claim) -> GroupPlan:
    """One unit per key/value group: its K and V rows, the rows of the query heads that share
    them, and those query heads' input columns of the output projection (plain multi-head
    attention: one unit per head). Llama's repeat_kv gives query head h the KV head
    h // (heads / kv_heads), so every unit is a contiguous slice of each matrix."""
    heads = rule.num_heads or _config_value(model, "num_attention_heads", "n_head")
    if not heads:
        raise LeapConfigError(f"{where}.params.num_heads: not set and the model has no "
                              f"config.num_attention_heads; set num_heads")
    kv_heads = rule.num_kv_heads or (None if rule.num_heads else _config_value(model, "num_key_value_heads")) \
        or heads
    if heads % kv_heads:
        raise LeapConfigError(f"{where}.params.num_kv_heads: {kv_heads} key/value heads do not divide "
                              f"{heads} query heads; set num_heads and num_kv_heads to the model's counts")
    qkv = [_closest(cands, out_name) for cands in related]
    if len(qkv) != 3 or len(set(qkv)) != 3:
        raise LeapConfigError(
            f"{where}.related_modules: head granularity needs three separate projections Q, K, V for "
            f"{out_name!r}, found {sorted(set(qkv))}. A fused QKV projection (GPT-2 c_attn, Phi-3 "
            f"qkv_proj) interleaves Q, K and V bands and is not supported by head granularity: prune it "
            f"with unstructured or block granularity (and the output projection with its own group).")
    o_rows, o_cols, o_t = logical_shape(modules[out_name])
    if o_cols % heads:
        raise LeapConfigError(f"{where}.params.num_heads: {heads} heads do not divide the input width "
                              f"{o_cols} of {out_name!r}; set num_heads to the model's attention head count")
    head_dim = o_cols // heads
    expected = {qkv[0]: heads * head_dim, qkv[1]: kv_heads * head_dim, qkv[2]: kv_heads * head_dim}
    members = []
    for role, name in zip(("Q", "K", "V"), qkv):
        rows, cols, transposed = logical_shape(modules[name])
        if rows != expected[name]:
            fused = rows == (heads + 2 * kv_heads) * head_dim
            raise LeapConfigError(
                f"{where}: {role} projection {name!r} has {rows} output rows, but {heads} query / "
                f"{kv_heads} key-value heads of size {head_dim} (from {out_name!r}) need "
                f"{expected[name]}. " + (
                    "It looks like a fused QKV projection, which head granularity does not support: "
                    "prune it with unstructured or block granularity." if fused else
                    "Set params.num_heads / params.num_kv_heads to the model's head counts, and list "
                    "related_modules in the order Q, K, V."))
        claim(name, rule)
        members.append(Member(name, modules[name], TileLayout(rows, cols, rows // kv_heads, cols, transposed)))
    claim(out_name, rule)
    members.append(Member(out_name, modules[out_name], TileLayout(o_rows, o_cols, o_rows, o_cols // kv_heads, o_t)))
    owner = _common_parent([m.name for m in members])
    return GroupPlan(f"{rule.name}:{owner}", rule, members, owner)


def _plan_channels(rule: GroupRule, modules, out_name: str, related: list[list[str]], where: str,
                   claim) -> GroupPlan:
    """One unit per FFN hidden channel: its row (and bias) in every producer (FFN in, or gate and
    up) and its input column of the consumer (FFN out / down)."""
    producers = list(dict.fromkeys(_closest(cands, out_name) for cands in related))
    c_rows, c_cols, c_t = logical_shape(modules[out_name])
    members = []
    for name in producers:
        rows, cols, transposed = logical_shape(modules[name])
        if rows != c_cols:
            raise LeapConfigError(
                f"{where}: producer {name!r} has {rows} output rows but consumer {out_name!r} has "
                f"{c_cols} input columns; a channel group needs modules = the FFN output (down) "
                f"projection and related_modules = the projections that feed it (in, or gate and up)")
        claim(name, rule)
        members.append(Member(name, modules[name], TileLayout(rows, cols, 1, cols, transposed)))
    claim(out_name, rule)
    members.append(Member(out_name, modules[out_name], TileLayout(c_rows, c_cols, c_rows, 1, c_t)))
    owner = _common_parent([m.name for m in members])
    return GroupPlan(f"{rule.name}:{owner}", rule, members, owner)


def _share_threshold(plans: list[GroupPlan], modules, where: str) -> None:
    """``uniform``: the layers' groups share one threshold (owned by their common parent), so
    every layer keeps the same number of units, each choosing its own."""
    units = {p.name: p.members[0].layout.num_units for p in plans}
    if len(set(units.values())) != 1:
        raise LeapConfigError(f"{where}.params.uniform: the matched layers have different unit counts "
                              f"{units}; a shared threshold keeps the same number in each. Split the group.")
    owner = _common_parent([m.name for p in plans for m in p.members])
    # never register on a ModuleList/Sequential: the model iterates those as layers
    while owner and isinstance(modules[owner], (nn.ModuleList, nn.Sequential, nn.ModuleDict)):
        owner = owner.rpartition(".")[0]
    for i, plan in enumerate(plans):
        plan.owner_name, plan.set_index, plan.num_sets = owner, i, len(plans)


def _refuse_dead_weights(plans: list[GroupPlan], claimed: dict[str, str], modules) -> None:
    """A pruned row whose output feeds another pruned matrix leaves that matrix's column dead
    but counted as kept (and a pruned column, the producer's row): refuse unless allowed.
    Feeding is judged by shape within one layer, so it is conservative."""
    shapes = {n: logical_shape(modules[n])[:2] for n in claimed}
    for plan in plans:
        rule = plan.rule
        if rule.granularity not in ("row", "column") or rule.allow_dead_weights:
            continue
        (member,) = plan.members
        rows, cols = shapes[member.name]
        for other, (o_rows, o_cols) in shapes.items():
            if other == member.name or _layer_of(other) != _layer_of(member.name):
                continue
            if (rule.granularity == "row" and o_cols == rows) or (rule.granularity == "column" and o_rows == cols):
                side = ("rows", "input columns") if rule.granularity == "row" else ("input columns", "rows")
                raise LeapConfigError(
                    f"compression_training.leap.different_groups.{rule.name}: pruned {side[0]} of "
                    f"{member.name!r} may pair with the {side[1]} of {other!r} (group {claimed[other]!r}, "
                    f"same layer, matching width {rows if rule.granularity == 'row' else cols}); a unit "
                    f"removed on one side leaves the other side's weights dead but counted as kept. "
                    f"Use granularity 'channel' (FFN) or 'head' (attention) to prune both together, "
                    f"prune only one of them, or set params.allow_dead_weights: true if they are not "
                    f"connected (e.g. only through a residual).")


def plan_groups(model: nn.Module, rules: list[GroupRule]) -> list[GroupPlan]:
    """Resolve rules against a model; raise LeapConfigError on any mismatch."""
    modules = dict(model.named_modules())
    claimed: dict[str, str] = {}
    plans: list[GroupPlan] = []

    def claim(name: str, rule: GroupRule):
        if name in claimed:
            raise LeapConfigError(f"module {name!r} is matched by group {claimed[name]!r} and by "
                                  f"group {rule.name!r}; a module may belong to one group only. "
                                  f"Narrow one group's 'modules' regexes.")
        claimed[name] = rule.name

    for rule in rules:
        where = f"compression_training.leap.different_groups.{rule.name}"
        if rule.granularity not in GRANULARITIES:
            raise LeapConfigError(f"{where}.params.granularity: {rule.granularity!r} is not one of "
                                  f"{', '.join(GRANULARITIES)}")
        matched = sorted({n for p in rule.modules for n in _match(modules, p, f"{where}.modules")},
                         key=list(modules).index)
        if rule.granularity not in COUPLED:
            if rule.related_modules:
                raise LeapConfigError(f"{where}.related_modules: only params.granularity "
                                      f"{' and '.join(COUPLED)} use related_modules, not "
                                      f"{rule.granularity!r}; set params.granularity or remove related_modules")
            for name in matched:
                claim(name, rule)
                rows, cols, transposed = logical_shape(modules[name])
                try:
                    layout = layout_for(rule.granularity, rows, cols, block=rule.block,
                                        transposed=transposed)
                except ValueError:
                    raise LeapConfigError(
                        f"{where}.params.block_size: {list(rule.block)} does not divide the "
                        f"{rows}x{cols} weight of {name!r}; choose block rows dividing {rows} "
                        f"and block columns dividing {cols}") from None
                plans.append(GroupPlan(f"{rule.name}:{name}", rule, [Member(name, modules[name], layout)], name))
            continue

        if not rule.related_modules:
            example = ('["self.query", "self.key", "self.value"]' if rule.granularity == "head"
                       else '["intermediate.dense"] or ["gate_proj", "up_proj"]')
            raise LeapConfigError(f"{where}.related_modules: {rule.granularity} granularity needs the "
                                  f"projections feeding the matched modules, e.g. {example}")
        related = [_match(modules, p, f"{where}.related_modules") for p in rule.related_modules]
        rule_plans = []
        for out_name in matched:
            if rule.granularity == "head":
                rule_plans.append(_plan_heads(rule, model, modules, out_name, related, where, claim))
            else:
                rule_plans.append(_plan_channels(rule, modules, out_name, related, where, claim))
        if rule.uniform:
            _share_threshold(rule_plans, modules, where)
        plans += rule_plans
    if not plans:
        raise LeapConfigError("compression_training.leap.different_groups is empty: name at least "
                              "one group of modules to prune")
    _refuse_dead_weights(plans, claimed, modules)
    return plans
