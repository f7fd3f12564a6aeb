"""Can the thresholds reach the target in the steps a run has? Checked before any training.

Each group keeps sigmoid(theta) of its units; theta starts at ``threshold_init`` and must
fall to about logit(target) (the smallest keep ratio any group needs when every group
prunes equally). The thresholds' Adam group has no momentum (``threshold_betas`` [0, b2]),
so one applied step moves theta by about its learning rate at most, and that rate follows
the weights' schedule: lr_t = threshold_lr x (weights' lr_t / weights' configured lr), as
``leap_ds.integration.engine`` sets it before every step. The whole run can therefore move
theta by at most threshold_lr x sum_t (lr_t / lr) over the steps where pruning is active.
"""
from __future__ import annotations

import logging
import math
from typing import Callable

TARGET_TOLERANCE = 0.01   # |achieved - target density| the README documents for the shipped settings

# The bound above is the best case: every step moving theta by its whole lr, all in the
# same direction. Real runs fall short of it: lambda, hence the regulariser's gradient,
# shrinks as the density nears the target while the second moment still remembers the
# larger early gradients (a step of |g|/sqrt(v) < 1 lr), and the task loss pulls the other
# way. Measured: the tiny-BERT test run (drop 2.0, 60 steps, a bound of 3.0 = 1.5x the drop)
# ends within the tolerance; the shipped default job (198 steps) has 2.7x. A run with less than 1.5x
# cannot be expected to reach the target.
BUDGET_SAFETY = 1.5
SEARCH_LIMIT = 1 << 17    # steps; beyond this the schedule, not the length, is the problem


def logit(p: float) -> float:
    return math.log(p / (1 - p))


def threshold_drop(threshold_init: float, target_density: float) -> float:
    """How far theta must fall: threshold_init - logit(target) (0 when nothing is to prune)."""
    if target_density >= 1:
        return 0.0
    return max(0.0, threshold_init - logit(target_density))


def lr_factors(ds_config: dict, steps: int) -> list[float]:
    """Weights' lr / configured lr at each of the first ``steps`` optimizer steps: the
    config's scheduler (DeepSpeed's, else torch's, as the engine builds it) stepped on a
    dummy optimizer; a constant 1 without a scheduler or a configured lr."""
    import torch
    reference = ds_config.get("optimizer", {}).get("params", {}).get("lr")
    sched = ds_config.get("scheduler")
    if not reference or not sched:
        return [1.0] * steps
    from deepspeed.runtime import lr_schedules
    from deepspeed.utils import logger as ds_logger
    name = sched["type"]
    factory = getattr(lr_schedules, name, None) or getattr(torch.optim.lr_scheduler, name)
    optimizer = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=float(reference))
    level = ds_logger.level   # its schedulers warn when built, which the engine does again anyway
    ds_logger.setLevel(logging.ERROR)
    try:
        scheduler = factory(optimizer, **sched.get("params", {}))
    finally:
        ds_logger.setLevel(level)
    factors = []
    for _ in range(steps):       # the engine reads the lr before each step, steps the scheduler after
        factors.append(optimizer.param_groups[0]["lr"] / float(reference))
        optimizer.step()         # no gradient: changes nothing, keeps torch's schedulers in order
        scheduler.step()
    return factors


def threshold_travel(ds_config: dict, threshold_lr: float, steps: int, schedule_offset: int = 0) -> float:
    """The most theta can move in ``steps`` optimizer steps (pruning starts at ``schedule_offset``)."""
    return threshold_lr * sum(lr_factors(ds_config, steps)[schedule_offset:])


def budget_is_enough(config_for_steps: Callable[[int], dict], shared, steps: int) -> bool:
    need = threshold_drop(shared.threshold_init, shared.target_density) * BUDGET_SAFETY
    return need == 0 or threshold_travel(config_for_steps(steps), shared.threshold_lr, steps,
                                         shared.schedule_offset) >= need


def fewest_steps(config_for_steps: Callable[[int], dict], shared) -> int | None:
    """The fewest pruning steps whose budget is enough (None: not within SEARCH_LIMIT).

    ``config_for_steps(n)``: the DeepSpeed config of an n-step run (schedulers sized by the run)."""
    if budget_is_enough(config_for_steps, shared, 1):
        return 1
    high = 2
    while not budget_is_enough(config_for_steps, shared, high):
        if high >= SEARCH_LIMIT:
            return None
        high *= 2
    low = high // 2               # not enough at low, enough at high
    while high - low > 1:
        mid = (low + high) // 2
        low, high = (low, mid) if budget_is_enough(config_for_steps, shared, mid) else (mid, high)
    return high
