"""The pruning budget (leap_ds/apps/budget.py) against loops written here from the
schedules' definitions, and the shipped configs against the default --min-steps."""
import json
import math
from pathlib import Path

import pytest

from leap_ds.apps import budget
from leap_ds.apps.train import MIN_PRUNING_STEPS, fill_auto
from leap_ds.integration.config import split_config
from tests.conftest import ROOT

CONFIGS = sorted((Path(ROOT) / "ds_configs").glob("*.json"))


def warmup_decay_factors(steps, warmup, total, peak, floor=0.0, reference=None):
    """WarmupDecayLR (log warmup, linear decay) as DeepSpeed documents it: the lr in use at
    each optimizer step is the one set before it, starting from warmup_min_lr."""
    reference = reference or peak
    warmup = max(2, warmup)
    lrs = [floor]
    for it in range(steps - 1):
        gamma = (math.log(it + 1) / math.log(warmup) if it < warmup
                 else max(0.0, (total - it) / max(1.0, total - warmup)))
        lrs.append(floor + (peak - floor) * gamma)
    return [lr / reference for lr in lrs]


def shared(**kw):
    return type("Shared", (), {"threshold_init": 3.0, "target_density": 0.3, "threshold_lr": 0.1,
                               "schedule_offset": 0, **kw})


def config_with(scheduler=None, lr=1e-4):
    cfg = {"optimizer": {"type": "AdamW", "params": {"lr": lr}}}
    if scheduler:
        cfg["scheduler"] = scheduler
    return cfg


@pytest.mark.parametrize("steps,warmup,total", [(31, 3, 31), (198, 19, 198), (60, 6, 100), (40, 1, 40)])
def test_travel_matches_warmup_decay_by_hand(steps, warmup, total):
    cfg = config_with({"type": "WarmupDecayLR", "params": {
        "warmup_min_lr": 1e-6, "warmup_max_lr": 2e-4, "warmup_num_steps": warmup, "total_num_steps": total}})
    expected = 0.1 * sum(warmup_decay_factors(steps, warmup, total, 2e-4, 1e-6, reference=1e-4)[2:])
    assert budget.threshold_travel(cfg, 0.1, steps, schedule_offset=2) == pytest.approx(expected, rel=1e-12)


def test_travel_without_scheduler_and_with_a_torch_scheduler():
    assert budget.threshold_travel(config_with(), 0.05, 40) == pytest.approx(0.05 * 40)
    step_lr = config_with({"type": "StepLR", "params": {"step_size": 10, "gamma": 0.5}})
    expected = 0.1 * sum(0.5 ** (t // 10) for t in range(35))
    assert budget.threshold_travel(step_lr, 0.1, 35) == pytest.approx(expected, rel=1e-12)


def test_fewest_steps_is_the_first_length_with_enough_budget(monkeypatch):
    """Against a linear scan with the hand-written schedule and the drop threshold_init - logit(target)."""
    raw = {**config_with({"type": "WarmupDecayLR", "params": {"warmup_min_lr": 0, "warmup_max_lr": 1e-4,
                                                              "warmup_num_steps": "auto",
                                                              "total_num_steps": "auto"}})}
    for s in (shared(), shared(threshold_init=2.0, target_density=0.5, threshold_lr=0.2)):
        need = (s.threshold_init - math.log(s.target_density / (1 - s.target_density))) * budget.BUDGET_SAFETY
        scan = next(n for n in range(1, 1000)
                    if s.threshold_lr * sum(warmup_decay_factors(n, max(1, n // 10), n, 1e-4)) >= need)
        assert budget.fewest_steps(lambda n: fill_auto(raw, n), s) == scan
        assert not budget.budget_is_enough(lambda n: fill_auto(raw, n), s, scan - 1)
    assert budget.fewest_steps(lambda n: raw, shared(target_density=1.0)) == 1
    decays_away = config_with({"type": "WarmupDecayLR", "params": {"warmup_num_steps": 2, "total_num_steps": 10,
                                                                   "warmup_max_lr": 1e-4}})
    monkeypatch.setattr(budget, "SEARCH_LIMIT", 1024)      # the search gives up, it does not loop
    assert budget.fewest_steps(lambda n: decays_away, shared()) is None


@pytest.mark.parametrize("config", CONFIGS, ids=[c.stem for c in CONFIGS])
def test_shipped_configs_fit_the_default_min_steps(config):
    raw = json.load(open(config))
    _, section = split_config(raw)
    need = budget.fewest_steps(lambda n: fill_auto(raw, n), section.shared_parameters)
    assert need is not None and need <= MIN_PRUNING_STEPS
    # the case: 1,886 rows at 0.55 epoch was 31 steps, which cannot reach the target
    assert not budget.budget_is_enough(lambda n: fill_auto(raw, n), section.shared_parameters, 31)


def _job_args(argv, task="classification"):
    from leap_ds.apps.tasks import fill_defaults
    from leap_ds.apps.train import build_parser
    args = build_parser().parse_args(argv)
    fill_defaults(args, task)
    return args


def test_default_pruning_length():
    """Epochs with a floor of --min-steps: the embedded job keeps its 198 steps, small data gets the floor."""
    from leap_ds.apps.train import pruning_steps
    default = json.load(open(Path(ROOT) / "ds_configs" / "default.json"))
    args = _job_args([])
    assert pruning_steps(args, 11527, default, 2) == int(11527 // 32 * 0.55) == 198
    assert pruning_steps(args, 1886, default, 2) == MIN_PRUNING_STEPS
    assert pruning_steps(_job_args(["--max-steps", "20"]), 1886, default, 2) == 20
    assert pruning_steps(_job_args(["--min-steps", "40"]), 1886, default, 2) == 40


@pytest.mark.parametrize("task", ["classification", "causal-lm"])
def test_each_task_default_job_reaches_its_target_in_its_steps(task):
    """Each task's default config and minimum steps pass the budget check, and an explicit flag
    wins over the task's default."""
    from leap_ds.apps.tasks import task_classes
    from leap_ds.apps.train import load_ds_config
    defaults = task_classes()[task].defaults
    args = _job_args([], task)
    assert (args.deepspeed_config, args.min_steps, args.epochs) == (
        defaults["deepspeed_config"], defaults["min_steps"], defaults["epochs"])
    raw, section = load_ds_config(args)
    assert budget.budget_is_enough(lambda n: fill_auto(raw, n), section.shared_parameters, args.min_steps)
    assert _job_args(["--min-steps", "7", "--deepspeed_config", "head"], task).min_steps == 7
    assert _job_args(["--deepspeed_config", "head"], task).deepspeed_config == "head"
