"""The finalized model's state for ``save_pretrained``: ZeRO-3 partitions gathered, LEAP's modules left out."""
from __future__ import annotations

import torch

LEAP_REPORT_NAME = "leap_report.json"
LEAP_PREFIX = "leap_"   # LeapGroup modules: leap_group, leap_heads, leap_channels


def is_leap_key(key: str) -> bool:
    return any(part.startswith(LEAP_PREFIX) for part in key.split("."))


def plain_state_dict(model: torch.nn.Module, engine=None) -> dict | None:
    """The state a plain transformers model loads: no LEAP keys. A collective at ZeRO-3
    (DeepSpeed gathers one layer at a time onto rank 0; the other ranks get None)."""
    if engine is not None and engine.zero_optimization_partition_weights():
        state = engine._zero3_consolidated_16bit_state_dict()
    else:
        state = model.state_dict()
    if state is None:
        return None
    return {k: v for k, v in state.items() if not is_leap_key(k)}
