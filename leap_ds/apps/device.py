"""The one place where the main job, the benchmarks and the test workers put things on the
engine's device: input batches, the teacher and other extra models, and every tensor handed
to a collective (NCCL refuses CPU tensors). tests/test_device.py records what passes
through here, so call these through the module (``device.to_device``), never a copy.
"""
from __future__ import annotations

from collections.abc import Mapping

import torch
import torch.distributed as tdist


def to_device(obj, device):
    """A tensor, a module (moved in place and returned), or a dict / list / tuple of them
    on ``device``; anything else is returned unchanged."""
    if isinstance(obj, (torch.Tensor, torch.nn.Module)):
        return obj.to(device)
    if isinstance(obj, Mapping):
        return {k: to_device(v, device) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(to_device(v, device) for v in obj)
    return obj


def all_reduce_(tensor: torch.Tensor, device, op=tdist.ReduceOp.SUM) -> torch.Tensor:
    """All-reduce ``tensor`` over the default group on ``device``; returns the result, on
    ``device`` (``tensor`` itself is reduced in place only when it is already there)."""
    on_device = to_device(tensor, device)
    tdist.all_reduce(on_device, op=op)
    return on_device


def module_device(module: torch.nn.Module) -> torch.device:
    """Where a plain (not ZeRO-3 partitioned) model's parameters are."""
    return next(module.parameters()).device
