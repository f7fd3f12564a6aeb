"""``leap_ds.initialize``: ``deepspeed.initialize`` with LEAP hooked into the engine.

DeepSpeed has no per-step callback registry, so LEAP follows the signals every
training path shares:

- the regulariser: built from the forward pass; added to the model's output
  ``loss`` when it has one, else by the wrapped ``engine.backward`` /
  ``engine.scale``; a step whose regulariser never reached a backward raises;
- the optimizer step: pre/post hooks on the inner torch optimizer, which runs
  once per gradient-accumulation boundary (managed or not) and not at all on
  an fp16 overflow; LEAP's lrs follow the weights' schedule there;
- ``save_checkpoint`` / ``load_checkpoint`` carry LEAP's counters in
  ``client_state`` (thresholds and scores are parameters and travel anyway).

The same pieces serve engines built by others (HF Trainer, Accelerate):
:func:`attach`, :func:`param_groups`, :func:`follow_optimizer`.
"""
from __future__ import annotations

import argparse
import copy
import logging

import deepspeed
import torch

from ..algorithm.pruner import LEAP_BETAS, LEAP_KIND, LEAP_LR, LeapPruner, LeapUsageError, sync_leap_param_groups
from ..algorithm.selection import LeapConfigError
from .config import LeapSection, load_ds_config, parse_leap_section, split_config
from .zero import zero_ops

logger = logging.getLogger("leap_ds")

CLIENT_STATE_KEY = "leap"


def attach(model: torch.nn.Module, config) -> LeapPruner:
    """Attach LEAP to ``model`` before any engine exists.

    ``config``: a DeepSpeed config (dict or JSON path) holding
    ``compression_training.leap``, or that ``leap`` section alone. The pruner
    reads and reduces parameters ZeRO-aware by itself (whatever engine wraps
    the model later, or none).
    """
    if isinstance(config, LeapSection):
        section = config
    else:
        raw = load_ds_config(config)
        if "compression_training" in raw:
            _, section = split_config(raw)
            if section is None:
                raise LeapConfigError("compression_training.leap.shared_parameters.enabled is false")
        else:
            section = parse_leap_section({"leap": raw})
    pruner = LeapPruner(model, section.rules(), **section.pruner_settings(), ops=zero_ops())
    pruner.section = section
    return pruner


def param_groups(params, pruner: LeapPruner, threshold_lr: float | None = None,
                 score_lr: float | None = None) -> list[dict]:
    """The model's parameter groups, with LEAP's thresholds and scores in their own groups.

    ``params``: ``model.parameters()``, or a list of parameter-group dicts.
    LEAP's groups carry no weight decay and their own learning rate: the
    arguments, else the config's ``threshold_lr`` / ``score_lr``, else their defaults.
    """
    from .config import SharedParameters
    section = getattr(pruner, "section", None)
    defaults = section.shared_parameters if section else SharedParameters(target_density=pruner.target_density)
    threshold_lr = defaults.threshold_lr if threshold_lr is None else threshold_lr
    score_lr = defaults.score_lr if score_lr is None else score_lr
    leap_ids = {id(p) for p in pruner.parameters()}
    params = list(params)
    if params and isinstance(params[0], dict):
        groups = [{**g, "params": [p for p in g["params"] if id(p) not in leap_ids]} for g in params]
    else:
        groups = [{"params": [p for p in params if id(p) not in leap_ids]}]
    groups = [g for g in groups if g["params"]]
    for kind, lr in (("threshold", threshold_lr), ("scores", score_lr)):
        owned = list(pruner.parameters(kind))
        if owned:  # never an empty group: ZeRO cannot flatten one
            group = {"params": owned, "lr": lr, LEAP_LR: lr, LEAP_KIND: kind, "weight_decay": 0.0,
                     "name": f"leap_{kind}"}
            if kind == "threshold":
                group["betas"] = group[LEAP_BETAS] = tuple(defaults.threshold_betas)
            groups.append(group)
    return groups


# the peak lr of the DeepSpeed schedulers that set one lr for every parameter group
_SCHEDULER_PEAK = {"WarmupLR": "warmup_max_lr", "WarmupDecayLR": "warmup_max_lr", "OneCycle": "cycle_max_lr"}


def warn_if_unclipped(max_norm, setting: str) -> bool:
    """Warn (and return True) when gradient clipping is off. LEAP's shipped settings were tuned
    and measured with clipping at 1.0 over every parameter, thresholds included: while lambda is
    large the regulariser's gradient dominates that norm, which normalises the thresholds' steps.
    Unclipped, Adam's second moment keeps the early gradients for tens of steps after lambda falls
    and the thresholds stall above the target (a 60-step test run: density 0.584 for target 0.5)."""
    if max_norm == "auto" or (isinstance(max_norm, (int, float)) and max_norm > 0):
        return False   # "auto": the HF integration fills it from max_grad_norm, checked there
    logger.warning("%s is %s: LEAP's threshold settings are tuned with gradient clipping at 1.0 over every "
                   "parameter; without it the thresholds can stall above the target density. Set %s to 1.0 "
                   "(README, Settings: gradient clipping).", setting, max_norm, setting)
    return True


def reference_lr(ds_config: dict, optimizer=None) -> float | None:
    """The weights' peak learning rate, against which LEAP's lrs are scheduled."""
    sched = ds_config.get("scheduler") or {}
    peak = _SCHEDULER_PEAK.get(sched.get("type"))
    if peak and isinstance(sched.get("params", {}).get(peak), (int, float)):
        return float(sched["params"][peak])
    opt = ds_config.get("optimizer")
    if opt and isinstance(opt.get("params", {}).get("lr"), (int, float)):
        return float(opt["params"]["lr"])
    groups = getattr(optimizer, "param_groups", None) or []
    g = next((g for g in groups if LEAP_LR not in g), None)
    if g is not None:
        return float(g.get("initial_lr", g.get("max_lr", g["lr"])))
    return None


def _optimizer_chain(optimizer) -> list:
    """[outermost wrapper, ..., the torch optimizer] through DeepSpeed's wrappers (ZeRO, fp16,
    bf16) and accelerate's."""
    chain = [optimizer]
    # accelerate's AcceleratedOptimizer is itself a torch Optimizer wrapping another: go down
    while getattr(chain[-1], "optimizer", None) not in (None, chain[-1]):
        chain.append(chain[-1].optimizer)
    if not isinstance(chain[-1], torch.optim.Optimizer):
        raise LeapUsageError(f"cannot find the torch optimizer inside {type(optimizer).__name__}; "
                             f"LEAP must follow its steps (pass a torch optimizer or a DeepSpeed one)")
    return chain


def inner_optimizer(optimizer) -> torch.optim.Optimizer:
    """The torch optimizer inside DeepSpeed's wrappers (ZeRO, fp16, bf16) or accelerate's."""
    return _optimizer_chain(optimizer)[-1]


def follow_optimizer(pruner: LeapPruner, optimizer, ds_config: dict | None = None) -> None:
    """Make LEAP follow an optimizer (a torch one, or DeepSpeed's/accelerate's wrapper): LEAP's
    lrs and betas are set before each step, LEAP advances after each step actually applied."""
    chain = _optimizer_chain(optimizer)
    inner = chain[-1]
    if not any(g.get(LEAP_KIND) == "threshold" for g in inner.param_groups):
        raise LeapUsageError("LEAP's thresholds are not in their own parameter group of this "
                             "optimizer: build it from leap_ds.param_groups(model.parameters(), pruner)")
    for handle in getattr(pruner, "_optimizer_hooks", []):
        handle.remove()
    pruner.reference_lr = reference_lr(ds_config or {}, inner)
    pruner._optimizer_hooks = pruner.hook_optimizer(inner)
    if len(chain) > 1:
        _sync_before_wrapper_steps(chain[-2], pruner)


def _sync_before_wrapper_steps(wrapper, pruner: LeapPruner) -> None:
    """ZeRO 1-2 steps its torch optimizer one parameter group at a time, so the inner pre-hook
    cannot see the weights' lr next to LEAP's: sync all groups before the wrapper's step."""
    if getattr(wrapper, "_leap_synced_step", False):
        return
    step = wrapper.step

    def synced_step(*args, **kwargs):
        sync_leap_param_groups(wrapper.param_groups, pruner.reference_lr)
        return step(*args, **kwargs)
    wrapper.step = synced_step
    wrapper._leap_synced_step = True


def _install_hooks(engine, pruner: LeapPruner) -> None:
    backward, scale, step = engine.backward, engine.scale, engine.step
    save, load = engine.save_checkpoint, engine.load_checkpoint

    def with_regularizer(loss):
        if pruner.has_pending_forward():
            loss = loss + pruner.regularization_loss().to(loss.dtype)
        return loss

    def leap_backward(loss, *args, **kwargs):
        return backward(with_regularizer(loss), *args, **kwargs)

    def leap_scale(loss, *args, **kwargs):   # torch-style fp16: engine.scale(loss).backward()
        return scale(with_regularizer(loss), *args, **kwargs)

    def leap_step(*args, **kwargs):
        before = pruner.step
        out = step(*args, **kwargs)
        if pruner.step != before:
            _write_monitor(engine, pruner)
        return out

    def leap_save_checkpoint(save_dir, tag=None, client_state=None, *args, **kwargs):
        client_state = dict(client_state or {})
        client_state[CLIENT_STATE_KEY] = pruner.state_dict()
        return save(save_dir, tag, client_state, *args, **kwargs)

    def leap_load_checkpoint(*args, **kwargs):
        path, client_state = load(*args, **kwargs)
        if path is not None:
            state = (client_state or {}).pop(CLIENT_STATE_KEY, None)
            if state is None:
                logger.warning("checkpoint %s holds no LEAP state; LEAP's step counter restarts", path)
            else:
                pruner.load_state_dict(state)
            pruner.refresh_scores()
        return path, client_state

    engine.backward, engine.scale, engine.step = leap_backward, leap_scale, leap_step
    engine.save_checkpoint, engine.load_checkpoint = leap_save_checkpoint, leap_load_checkpoint


def _write_monitor(engine, pruner: LeapPruner) -> None:
    """LEAP's scalars to DeepSpeed's own monitors (tensorboard, csv_monitor, wandb)."""
    monitor = getattr(engine, "monitor", None)
    if monitor is None or not getattr(monitor, "enabled", False):
        return
    rep = pruner.report()  # collective: every rank runs step()
    x = engine.global_samples
    events = [("Train/leap/global_density", rep["global_density"], x),
              ("Train/leap/lambda", rep["lambda"], x),
              ("Train/leap/reg_loss", rep["reg_loss"], x)]
    events += [(f"Train/leap/density/{g['name']}", g["density"], x) for g in rep["groups"]]
    if engine.global_rank == 0:
        monitor.write_events(events)


def initialize(args=None, model=None, optimizer=None, model_parameters=None, training_data=None,
               lr_scheduler=None, config=None, config_params=None, **kwargs):
    """``deepspeed.initialize`` with LEAP: same arguments, same four return values.

    The config (``config``, ``config_params`` or ``args.deepspeed_config``, a
    dict or a JSON path) may hold ``compression_training.leap``. It is
    validated, LEAP is attached to ``model`` (so ZeRO partitions its
    parameters with the model's), and DeepSpeed gets the config without it.
    """
    raw = config if config is not None else config_params
    if raw is None and args is not None:
        raw = getattr(args, "deepspeed_config", None)
    if raw is None:
        raise LeapConfigError("no DeepSpeed config: pass config=<dict or JSON path> or "
                              "--deepspeed_config <path>")
    ds_config, section = split_config(raw)
    if args is not None and getattr(args, "deepspeed_config", None) is not None:
        args = copy.copy(args) if isinstance(args, argparse.Namespace) else args
        args.deepspeed_config = None  # DeepSpeed refuses a config given twice

    if section is not None:
        warn_if_unclipped(ds_config.get("gradient_clipping"), "gradient_clipping")
        from deepspeed.pipe import PipelineModule
        if isinstance(model, PipelineModule):
            raise LeapConfigError("LEAP does not support DeepSpeed's pipeline engine (PipelineModule: "
                                  "train_batch bypasses the hooks LEAP needs); train with ZeRO data "
                                  "parallelism, or remove compression_training.leap")
    pruner = None
    if section is not None:
        pruner = attach(model, section)
        if isinstance(optimizer, torch.optim.Optimizer):
            for g in param_groups([], pruner):
                optimizer.add_param_group(g)
        else:
            model_parameters = param_groups(
                model_parameters if model_parameters is not None else model.parameters(), pruner)

    engine, opt, loader, scheduler = deepspeed.initialize(
        args=args, model=model, optimizer=optimizer, model_parameters=model_parameters,
        training_data=training_data, lr_scheduler=lr_scheduler, config=ds_config, **kwargs)
    engine.leap = pruner
    if pruner is not None:
        if engine.optimizer is None:
            raise LeapConfigError("LEAP trains thresholds: the engine needs an optimizer (an "
                                  "'optimizer' section in the config, or optimizer=...)")
        follow_optimizer(pruner, engine.optimizer, ds_config)
        pruner.refresh_scores()
        _install_hooks(engine, pruner)
    return engine, opt, loader, scheduler


def _pruner(engine) -> LeapPruner:
    try:
        return pruner_of(engine)
    except ValueError:
        raise ValueError("this engine has no LEAP attached: build it with leap_ds.initialize "
                         "and a compression_training.leap section with enabled: true") from None


def report(engine) -> dict:
    """Density, lambda, regulariser and per-group state; the same on every rank.

    A collective (one all-reduce): call it on every rank.
    """
    rep = _pruner(engine).report()
    rep["zero_stage"] = engine.zero_optimization_stage()
    rep["world_size"] = engine.world_size
    return rep


def finalize(engine) -> None:
    """Make the hard masks permanent in the weights (fp32 master too) and remove
    LEAP from every forward. A collective: call it on every rank."""
    _pruner(engine).finalize()


def regularization_loss(model_or_engine) -> torch.Tensor:
    """lambda * L_reg of the last training forward, to add to a loss you build yourself."""
    return pruner_of(model_or_engine).regularization_loss()


def pruner_of(model_or_engine) -> LeapPruner:
    """The LeapPruner attached to an engine or model (found through the model's hooks)."""
    pruner = getattr(model_or_engine, "leap", None)
    if isinstance(pruner, LeapPruner):
        return pruner
    model = getattr(model_or_engine, "module", model_or_engine)
    for hook in getattr(model, "_forward_hooks", {}).values():
        owner = getattr(hook, "__self__", None)
        if isinstance(owner, LeapPruner):
            return owner
    raise ValueError("no LEAP attached to this model or engine: use leap_ds.initialize or leap_ds.attach")
