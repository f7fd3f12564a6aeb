"""LEAP under Hugging Face Accelerate: ``LeapAccelerator`` instead of ``Accelerator``.

The DeepSpeed plugin's config (``accelerate launch --config_file``, or
``DeepSpeedPlugin(hf_ds_config=...)``) may hold ``compression_training.leap``:
it is validated and taken out when the accelerator is built, before DeepSpeed
sees it. :meth:`LeapAccelerator.prepare` attaches LEAP to the model before the
engine exists (so ZeRO partitions thresholds and scores with the weights),
puts them into their own optimizer groups, and makes LEAP follow the prepared
optimizer's applied steps. HF Trainer's accelerator is one of these too
(:class:`leap_ds.hf.LeapTrainer`).
"""
from __future__ import annotations

import torch
from accelerate import Accelerator
from accelerate.optimizer import AcceleratedOptimizer
from accelerate.utils import DummyOptim

from ..algorithm.pruner import LEAP_LR, LeapPruner, LeapUsageError
from ..algorithm.selection import LeapConfigError
from ..integration.config import SECTION, LeapSection, split_config
from ..integration.engine import attach, follow_optimizer, param_groups, pruner_of

# where the taken-out section is kept on a config holder (HfDeepSpeedConfig, DeepSpeedPlugin),
# so a second Trainer or accelerator built from the same arguments finds it
_KEPT = "leap_section"


def take_leap_section(holder) -> LeapSection | None:
    """Validate ``compression_training.leap`` in a DeepSpeed config holder (``HfDeepSpeedConfig``,
    accelerate's ``DeepSpeedPlugin``) and remove it from the dict DeepSpeed will get, in place.

    The section (``None``: absent or ``enabled: false``) is remembered on the holder."""
    if hasattr(holder, _KEPT):
        return getattr(holder, _KEPT)
    configs = [c for c in (getattr(holder, "config", None), getattr(holder, "deepspeed_config", None),
                           getattr(getattr(holder, "hf_ds_config", None), "config", None),
                           getattr(getattr(holder, "dschf", None), "config", None), _zero_init_config())
               if isinstance(c, dict)]
    section = None
    for config in configs:
        if SECTION in config:
            _, section = split_config(config)   # raises LeapConfigError, naming the key and the fix
    for config in configs:
        config.pop(SECTION, None)
    setattr(holder, _KEPT, section)
    return section


def _zero_init_config() -> dict | None:
    """The config transformers' from_pretrained hands to zero.Init (a weak reference to the latest
    HfDeepSpeedConfig): DeepSpeed rejects it while it holds compression_training."""
    from transformers.integrations.deepspeed import deepspeed_config
    return deepspeed_config()


def _plugin_section(accelerator) -> LeapSection | None:
    plugin = getattr(accelerator.state, "deepspeed_plugin", None)
    return take_leap_section(plugin) if plugin is not None else None


def add_leap_groups(optimizer, pruner: LeapPruner):
    """Put LEAP's parameters into their own groups of ``optimizer``: accelerate's ``DummyOptim``
    (DeepSpeed builds the optimizer from its params) or a torch optimizer with no state yet."""
    leap_ids = {id(p) for p in pruner.parameters()}
    if isinstance(optimizer, DummyOptim):
        params = list(optimizer.params)
        if not any(isinstance(g, dict) and LEAP_LR in g for g in params):
            optimizer.params = param_groups(params, pruner)
        return
    groups = optimizer.param_groups
    if any(LEAP_LR in g for g in groups):
        return
    held = {id(p) for g in groups for p in g["params"]}
    if not leap_ids & held:
        raise LeapUsageError("this optimizer was built before LEAP was attached, so it does not train "
                             "LEAP's thresholds: attach first (pruner = accelerator.attach_leap(model)), then "
                             "build it from leap_ds.param_groups(model.parameters(), pruner)")
    if optimizer.state:
        raise LeapUsageError("this optimizer has already stepped with LEAP's thresholds among the weights: "
                             "build it from leap_ds.param_groups(model.parameters(), pruner)")
    for g in groups:
        g["params"] = [p for p in g["params"] if id(p) not in leap_ids]
    groups[:] = [g for g in groups if g["params"]]
    for g in param_groups([], pruner):
        optimizer.add_param_group(g)


class LeapAccelerator(Accelerator):
    """``accelerate.Accelerator`` with LEAP.

    ``leap_config``: a DeepSpeed-style config (dict or JSON path) holding
    ``compression_training.leap``, or that ``leap`` section alone, for runs
    without DeepSpeed; with DeepSpeed the plugin's config holds it.
    """

    def __init__(self, *args, leap_config=None, **kwargs):
        super().__init__(*args, **kwargs)
        self._init_leap(leap_config)

    def _init_leap(self, leap_config=None, pruner: LeapPruner | None = None) -> None:
        section = _plugin_section(self)
        if leap_config is not None:
            if section is not None:
                raise LeapConfigError("LEAP is configured twice: in the DeepSpeed config's "
                                      f"{SECTION}.leap and in leap_config=; keep one")
            section = leap_config
        self.leap_config = section
        self.leap = pruner

    @classmethod
    def adopt(cls, accelerator: Accelerator, pruner: LeapPruner) -> "LeapAccelerator":
        """Turn an Accelerator built by someone else (HF Trainer) into a LeapAccelerator for ``pruner``."""
        accelerator.__class__ = cls
        accelerator.leap_config = getattr(pruner, "section", None)
        accelerator.leap = pruner
        return accelerator

    def attach_leap(self, model: torch.nn.Module) -> LeapPruner:
        """Attach LEAP to ``model`` (before its optimizer is built); returns the pruner. The
        pruner's step counter and lambda then travel in ``save_state`` / ``load_state``."""
        try:
            pruner = pruner_of(model)
        except ValueError:
            if self.leap_config is None:
                raise LeapConfigError(
                    f"no LEAP configuration: put a {SECTION}.leap section into the DeepSpeed config, or "
                    f"pass LeapAccelerator(leap_config=<config dict or JSON path>)") from None
            pruner = attach(model, self.leap_config)
        if self.leap is not pruner:
            self.leap = pruner
            self.register_for_checkpointing(pruner)
        return pruner

    def prepare(self, *args, device_placement=None):
        models = [a for a in args if isinstance(a, torch.nn.Module)]
        optimizer_at = [i for i, a in enumerate(args) if isinstance(a, (torch.optim.Optimizer, DummyOptim))]
        if self.leap is None and self.leap_config is not None and models:
            self.attach_leap(models[0])
        if self.leap is not None:
            for i in optimizer_at:
                add_leap_groups(args[i], self.leap)   # before DeepSpeed builds its optimizer from them
        result = super().prepare(*args, device_placement=device_placement)
        if self.leap is not None and optimizer_at:
            prepared = result if len(args) > 1 else (result,)
            plugin = getattr(self.state, "deepspeed_plugin", None)
            ds_config = plugin.deepspeed_config if plugin is not None else None
            for i in optimizer_at:
                follow_optimizer(self.leap, unwrap_optimizer(prepared[i]), ds_config)
            self.leap.refresh_scores()
        return result


def unwrap_optimizer(optimizer):
    """The optimizer inside accelerate's wrappers: AcceleratedOptimizer subclasses torch's Optimizer
    without being the one that steps (leap_ds.integration.engine.inner_optimizer stops at the
    first torch Optimizer it meets)."""
    while isinstance(optimizer, AcceleratedOptimizer):
        optimizer = optimizer.optimizer
    return optimizer
