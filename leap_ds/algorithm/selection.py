"""Which modules a rule prunes: regexes over ``named_modules()`` and module types.

Follows DeepSpeed's compression conventions: ``modules`` are regexes matched
with ``re.search``; for heads, ``modules`` match the attention output
projection and ``related_modules`` match its Q, K and V projections. No model
file is forked: any model whose prunable layers are ``nn.Linear`` (BERT,
RoBERTa, Llama, ...) or Hugging Face ``Conv1D`` (GPT-2) works.
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass, field

from torch import nn

from .layout import TileLayout, layout_for

GRANULARITIES = ("unstructured", "block", "row", "column", "head")


class LeapConfigError(ValueError):
    """A LEAP setting that does not fit the model; the message says how to fix it."""


@dataclass
class GroupRule:
    """One ``different_groups`` entry, in plain Python."""
    name: str
    modules: list[str]
    granularity: str = "unstructured"
    score: str = "magnitude"
    block: tuple[int, int] | None = None
    num_heads: int | None = None
    related_modules: list[str] = field(default_factory=list)


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


def is_prunable(module: nn.Module) -> bool:
    if isinstance(module, nn.Linear):
        return True
    # transformers.pytorch_utils.Conv1D (GPT-2): a linear layer stored as (in, out)
    return type(module).__name__ == "Conv1D" and hasattr(module, "nf") and hasattr(module, "weight")


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
        if rule.granularity != "head":
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
            raise LeapConfigError(f"{where}.related_modules: head granularity needs the Q, K, V "
                                  f"projections, e.g. [\"self.query\", \"self.key\", \"self.value\"]")
        related = [_match(modules, p, f"{where}.related_modules") for p in rule.related_modules]
        heads = rule.num_heads or getattr(getattr(model, "config", None), "num_attention_heads", None)
        if not heads:
            raise LeapConfigError(f"{where}.params.num_heads: not set and the model has no "
                                  f"config.num_attention_heads; set num_heads")
        for out_name in matched:
            qkv = [_closest(cands, out_name) for cands in related]
            members = []
            for name in [*qkv, out_name]:
                claim(name, rule)
                rows, cols, transposed = logical_shape(modules[name])
                width = cols if name == out_name else rows
                if width % heads:
                    raise LeapConfigError(
                        f"{where}.params.num_heads: {heads} heads do not divide the width {width} "
                        f"of {name!r}; set num_heads to the model's attention head count")
                role = "out" if name == out_name else "qkv"
                members.append(Member(name, modules[name], layout_for(
                    "head", rows, cols, head_dim=width // heads, head_role=role, transposed=transposed)))
            if len({m.layout.num_units for m in members}) != 1 or members[0].layout.num_units != heads:
                raise LeapConfigError(f"{where}: Q, K, V and output of {out_name!r} do not have "
                                      f"{heads} heads each (grouped-query attention is not supported "
                                      f"by head granularity; use row granularity for K/V)")
            plans.append(GroupPlan(f"{rule.name}:{_common_parent([m.name for m in members])}",
                                   rule, members, _common_parent([m.name for m in members])))
    if not plans:
        raise LeapConfigError("compression_training.leap.different_groups is empty: name at least "
                              "one group of modules to prune")
    return plans
