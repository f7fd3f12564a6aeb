"""``leap_ds.initialize``: ``deepspeed.initialize`` with LEAP hooked into the engine.

DeepSpeed has no per-step callback registry, so the engine's own methods are
wrapped on the instance:

- ``backward(loss)`` adds lambda * L_reg from the forward pass just run;
- ``step()`` keeps LEAP's learning rates on the weights' schedule and, when the
  optimizer step was really applied (a gradient-accumulation boundary and no
  fp16 overflow), advances LEAP's step counter;
- ``save_checkpoint`` / ``load_checkpoint`` carry LEAP's counters in
  ``client_state`` (thresholds and scores are parameters and travel anyway).
"""
from __future__ import annotations

import argparse
import copy
import logging

import deepspeed
import torch

from ..algorithm.pruner import LeapPruner
from ..algorithm.selection import LeapConfigError
from .config import LeapSection, load_ds_config, parse_leap_section, split_config
from .zero import zero_ops

logger = logging.getLogger("leap_ds")

LEAP_LR = "leap_lr"            # param-group key: LEAP's own base learning rate
CLIENT_STATE_KEY = "leap"


def attach(model: torch.nn.Module, config) -> LeapPruner:
    """Attach LEAP to ``model`` before any engine exists.

    ``config``: a DeepSpeed config (dict or JSON path) holding
    ``compression_training.leap``, or that ``leap`` section alone.
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
    pruner = LeapPruner(model, section.rules(), **section.pruner_settings())
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
            group = {"params": owned, "lr": lr, LEAP_LR: lr, "weight_decay": 0.0, "name": f"leap_{kind}"}
            if kind == "threshold":
                group["betas"] = tuple(defaults.threshold_betas)
            groups.append(group)
    return groups


def _reference_lr(ds_config: dict, optimizer) -> float | None:
    """The weights' configured (peak) learning rate, against which LEAP's lrs are scheduled."""
    opt = ds_config.get("optimizer")
    if opt and "lr" in opt.get("params", {}):
        return float(opt["params"]["lr"])
    if isinstance(optimizer, torch.optim.Optimizer):
        g = next((g for g in optimizer.param_groups if LEAP_LR not in g), None)
        if g is not None:
            return float(g.get("initial_lr", g["lr"]))
    return None


def _sync_leap_lrs(optimizer, reference_lr: float | None) -> None:
    """LEAP lr = its base lr x (weights' current lr / weights' configured lr)."""
    groups = getattr(optimizer, "param_groups", [])
    weight_group = next((g for g in groups if LEAP_LR not in g), None)
    if weight_group is None or not reference_lr:
        return
    factor = weight_group["lr"] / reference_lr
    for g in groups:
        if LEAP_LR in g:
            g["lr"] = g[LEAP_LR] * factor


def _install_hooks(engine, pruner: LeapPruner, reference_lr: float | None) -> None:
    backward, step = engine.backward, engine.step
    save, load = engine.save_checkpoint, engine.load_checkpoint

    def leap_backward(loss, *args, **kwargs):
        if pruner._keep and not pruner.finalized:
            loss = loss + pruner.regularization_loss().to(loss.dtype)
        return backward(loss, *args, **kwargs)

    def leap_step(*args, **kwargs):
        boundary = engine.is_gradient_accumulation_boundary()
        if boundary:
            _sync_leap_lrs(engine.optimizer, reference_lr)
        out = step(*args, **kwargs)
        if boundary and engine.was_step_applied() and not pruner.finalized:
            pruner.on_optimizer_step()
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

    engine.backward, engine.step = leap_backward, leap_step
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

    pruner = None
    if section is not None:
        pruner = attach(model, section)
        if isinstance(optimizer, torch.optim.Optimizer):
            for g in param_groups([], pruner):
                optimizer.add_param_group(g)
        else:
            model_parameters = param_groups(
                model_parameters if model_parameters is not None else model.parameters(), pruner)
    reference_lr = _reference_lr(ds_config, optimizer)

    engine, opt, loader, scheduler = deepspeed.initialize(
        args=args, model=model, optimizer=optimizer, model_parameters=model_parameters,
        training_data=training_data, lr_scheduler=lr_scheduler, config=ds_config, **kwargs)
    engine.leap = pruner
    if pruner is not None:
        pruner.ops = zero_ops()
        pruner.refresh_scores()
        _install_hooks(engine, pruner, reference_lr)
    return engine, opt, loader, scheduler


def _pruner(engine) -> LeapPruner:
    pruner = getattr(engine, "leap", None)
    if pruner is None:
        raise ValueError("this engine has no LEAP attached: build it with leap_ds.initialize "
                         "and a compression_training.leap section with enabled: true")
    return pruner


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
