"""``compact``: a smaller model with the attention units and FFN channels LEAP pruned removed.

Three sources, one result (a plain Hugging Face model with smaller Linear /
Conv1D layers, its head counts updated, and the widths in ``model.leap_compact``):

- an engine or model with LEAP attached (before or after ``finalize``): the
  pruner's own groups and unit masks decide what goes. A collective at
  ZeRO-3 (call it on every rank): parameters are gathered module by module and
  copied to the CPU on rank 0 only, which builds and returns the compact
  model; other ranks get ``None``. The engine's model is left untouched.
- a model directory exported with the masks multiplied in (the main job's
  ``model/``), with the LEAP config it was trained with: the groups are planned
  again from the config, and a unit counts as pruned when all its weights and
  biases are exactly zero (:func:`~leap_ds.export.shrink.masks_from_zeros`).
- such a masked model already in memory (no LEAP attached), with the config.

Only head and channel groups change shapes; other groups' masks are multiplied
in and their matrices keep their shape. A config with neither raises
:class:`~leap_ds.algorithm.LeapConfigError` saying why.
"""
from __future__ import annotations

import copy
import os

import torch
from torch import nn

from ..algorithm.pruner import LeapPruner
from ..algorithm.selection import GroupRule, LeapConfigError, plan_groups
from .shrink import StructuredGroup, apply_masks, masks_from_zeros, require_structured, shrink_model, structured

COMPACT_ATTR = "leap_compact"   # the record shrink_model returns, kept on the compact model


def _is_leap_name(name: str) -> bool:
    return any(part.startswith("leap_") for part in name.split("."))


def _rank() -> int:
    return torch.distributed.get_rank() if torch.distributed.is_available() and torch.distributed.is_initialized() else 0


def _attached_pruner(source) -> LeapPruner | None:
    from ..integration.engine import pruner_of
    try:
        return pruner_of(source)
    except ValueError:
        return None


def leap_rules(config) -> list[GroupRule]:
    """The group rules of a DeepSpeed config (dict or JSON path) or of its ``leap`` section."""
    from ..integration.config import load_ds_config, parse_leap_section, split_config
    raw = load_ds_config(config)
    if "compression_training" in raw:
        _, section = split_config(raw)
        if section is None:
            raise LeapConfigError("compression_training.leap.shared_parameters.enabled is false: "
                                  "no LEAP groups to compact")
    else:
        section = parse_leap_section({"leap": raw})
    return section.rules()


def _gathered(params):
    """A context in which ZeRO-3 partitioned ``params`` are whole on every rank (one module's worth)."""
    zero3 = [p for p in params if hasattr(p, "ds_tensor")]
    if not zero3:
        import contextlib
        return contextlib.nullcontext()
    import deepspeed
    return deepspeed.zero.GatheredParameters(zero3, modifier_rank=None)


@torch.no_grad()
def parameters_on_rank0(model: nn.Module) -> dict[str, torch.Tensor] | None:
    """Every (non-LEAP) parameter of ``model`` as a CPU tensor on rank 0, None elsewhere.
    At ZeRO-3 one module's parameters are gathered at a time (a collective)."""
    rank0 = _rank() == 0
    values, seen = {}, set()
    for prefix, module in model.named_modules():
        if _is_leap_name(prefix):
            continue
        # tied parameters once, under the name named_parameters() gives them (its first owner)
        own = [(n, p) for n, p in module.named_parameters(recurse=False) if id(p) not in seen]
        seen.update(id(p) for _, p in own)
        if not own:
            continue
        with _gathered([p for _, p in own]):
            if rank0:
                for n, p in own:
                    values[f"{prefix}.{n}" if prefix else n] = p.detach().clone().cpu()
    return values if rank0 else None


@torch.no_grad()
def load_parameters(model: nn.Module, values: dict[str, torch.Tensor], buffers: bool = False) -> None:
    """Put ``values`` into ``model``'s parameters (and buffers if asked) by name, shapes checked;
    tied parameters are set once. Raises naming any parameter missing or left over."""
    targets = dict(model.named_parameters())
    if buffers:
        targets.update({n: b for n, b in model.named_buffers() if n in values})
    missing = sorted(set(targets) - set(values))
    extra = sorted(set(values) - set(targets))
    if missing or extra:
        raise LeapConfigError(f"parameters do not match the model: missing {missing[:5]}, "
                              f"unexpected {extra[:5]}")
    for name, target in targets.items():
        value = values[name]
        if tuple(value.shape) != tuple(target.shape):
            raise LeapConfigError(f"{name}: stored shape {tuple(value.shape)} but the model has "
                                  f"{tuple(target.shape)}")
        target.data = value.to(target.device).clone()


def _fresh_copy(model: nn.Module, values: dict[str, torch.Tensor]) -> nn.Module:
    """A plain model of the same Hugging Face class and config holding ``values``."""
    config = getattr(model, "config", None)
    if config is None:
        raise LeapConfigError(f"compact needs a Hugging Face model (with .config) to rebuild; "
                              f"{type(model).__name__} has none")
    fresh = type(model)(copy.deepcopy(config))
    load_parameters(fresh, values)
    return fresh.eval()


def _shrink(model: nn.Module, plans, masks) -> nn.Module:
    chosen = structured(plans)
    record = shrink_model(model, [StructuredGroup.of(plans[i]) for i in chosen], [masks[i] for i in chosen])
    setattr(model, COMPACT_ATTR, record)
    return model


def compact(source, config=None, *, keep_masked: bool = False):
    """Return ``source`` with pruned attention units (KV groups) and FFN channels removed.

    ``source``: a DeepSpeed engine or model with LEAP attached (``config`` unused), a masked
    model directory, or a masked in-memory model (both need ``config``: the DeepSpeed config
    or leap section it was trained with). Returns the compact model in eval mode (from an
    engine / LEAP model: on the CPU, and ``None`` on ranks other than 0; from a masked model:
    on that model's device). ``keep_masked``: return ``(masked, compact)``, the
    full-size masked model as well (what the compact one must equal).
    """
    if isinstance(source, (str, os.PathLike)):
        return compact_directory(source, config, keep_masked=keep_masked)
    pruner = _attached_pruner(source)
    model = getattr(source, "module", source)
    if pruner is None:
        if config is None:
            raise LeapConfigError("no LEAP attached to this model: pass config= (the DeepSpeed config "
                                  "or leap section it was trained with) to compact a masked model")
        rules = leap_rules(config)
        require_structured(r.granularity for r in rules)
        if any(hasattr(p, "ds_tensor") for p in model.parameters()):
            raise LeapConfigError("this model's parameters are ZeRO-3 partitions and no LEAP is attached: "
                                  "compact the engine LEAP trained (leap_ds.compact(engine)) or the "
                                  "exported model directory")
        masked = copy.deepcopy(model).eval()
        plans = plan_groups(masked, rules)
        masks = [None] * len(plans)
        for i, m in zip(structured(plans), masks_from_zeros(masked, [plans[i] for i in structured(plans)])):
            masks[i] = m
        result = _shrink(copy.deepcopy(masked), plans, masks)
        return (masked, result) if keep_masked else result
    plans = [g.plan for g in pruner.groups]
    require_structured(p.rule.granularity for p in plans)   # every rank, before any collective
    masks = pruner.unit_masks()                    # a collective at ZeRO-3
    values = parameters_on_rank0(model)            # a collective at ZeRO-3
    if values is None:
        return None
    masked = _fresh_copy(model, values)
    apply_masks(masked, plans, masks)
    result = _shrink(copy.deepcopy(masked) if keep_masked else masked, plans, masks)
    return (masked, result) if keep_masked else result


def compact_directory(path, config, *, keep_masked: bool = False):
    """Compact a model directory saved with the masks multiplied in (see :func:`compact`)."""
    if config is None:
        raise LeapConfigError(f"compacting the directory {os.fspath(path)!r} needs config= (the DeepSpeed "
                              f"config or leap section the model was trained with) to plan its groups")
    rules = leap_rules(config)
    require_structured(r.granularity for r in rules)               # before loading anything
    import transformers
    hf_config = transformers.AutoConfig.from_pretrained(path)
    architectures = getattr(hf_config, "architectures", None) or []
    cls = getattr(transformers, architectures[0], None) if architectures else None
    if cls is None:
        raise LeapConfigError(f"{os.fspath(path)}/config.json names no transformers model class "
                              f"(architectures={architectures}); save the model with save_pretrained")
    model = cls.from_pretrained(path).eval()
    plans = plan_groups(model, rules)
    chosen = structured(plans)
    masks = [None] * len(plans)
    for i, m in zip(chosen, masks_from_zeros(model, [plans[i] for i in chosen])):
        masks[i] = m
    masked = copy.deepcopy(model) if keep_masked else None
    result = _shrink(model, plans, masks)
    getattr(result, COMPACT_ATTR)["source"] = os.fspath(path)
    return (masked, result) if keep_masked else result


def parameter_count(model: nn.Module) -> int:
    """Parameters of the model itself (tied ones once, LEAP's thresholds and scores excluded)."""
    return sum(p.numel() for n, p in model.named_parameters() if not _is_leap_name(n))
