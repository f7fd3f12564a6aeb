"""ZeRO-aware parameter access: the :class:`DistributedOps` for a DeepSpeed engine.

Every rank reads only the part of a parameter it is responsible for (its ZeRO-3
partition, or an equal share of a replicated parameter at stages 0-2) and one
all-reduce combines the parts: no weight or mask is gathered onto a rank.
"""
from __future__ import annotations

import contextlib
import math

import deepspeed
import deepspeed.comm as dist
from deepspeed.utils import safe_set_full_fp32_param

from ..algorithm.pruner import DistributedOps


def _is_zero3(param) -> bool:
    return hasattr(param, "ds_tensor")


def local_slice(param):
    if _is_zero3(param):
        part = param.ds_tensor.detach().flatten()
        start = dist.get_rank(group=param.ds_process_group) * part.numel()
        count = max(0, min(part.numel(), param.ds_numel - start))
        return part[:count], start
    flat = param.detach().flatten()
    if not dist.is_initialized():
        return flat, 0
    share = math.ceil(flat.numel() / dist.get_world_size())
    start = dist.get_rank() * share
    return flat[start:start + share], start


def all_reduce_sum(tensor):
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(tensor)
    return tensor


def gather(params):
    """Full parameters readable and writable; at ZeRO-3 rank 0's writes are broadcast."""
    zero3 = [p for p in params if _is_zero3(p)]
    if not zero3:
        return contextlib.nullcontext()
    return deepspeed.zero.GatheredParameters(zero3, modifier_rank=0)


def write_master(param):
    """Copy a changed parameter into the optimizer's fp32 master (ZeRO 1-3, bf16)."""
    if _is_zero3(param) or hasattr(param, "_hp_mapping"):
        safe_set_full_fp32_param(param, param.data)


def zero_ops() -> DistributedOps:
    return DistributedOps(local_slice=local_slice, all_reduce_sum=all_reduce_sum,
                          gather=gather, after_write=write_master, is_partitioned=_is_zero3)
