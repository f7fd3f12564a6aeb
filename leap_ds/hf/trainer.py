"""``LeapTrainer``: Hugging Face ``Trainer`` with LEAP. Change one class, keep the rest:

    from leap_ds.hf import LeapTrainer        # was: from transformers import Trainer
    trainer = LeapTrainer(model=model, args=args, train_dataset=...)   # args.deepspeed holds
    trainer.train()                                                    #   compression_training.leap
    trainer.save_model()                      # the pruned model: masks in the weights, plain transformers

- The LEAP section is validated and taken out of ``args``' DeepSpeed config when
  the trainer is built (on every rank, before any engine); ``"auto"`` values
  stay for the Trainer to fill. Without DeepSpeed: ``LeapTrainer(..., leap_config=...)``.
- LEAP attaches to the model then, before ``deepspeed.initialize``: at ZeRO-3
  a model partitioned by ``from_pretrained`` works, DeepSpeed partitions the
  thresholds it adds.
- Thresholds and scores get their own optimizer groups, whether DeepSpeed
  builds the optimizer from its config or the Trainer builds it; their lrs
  follow the schedule; LEAP advances on applied optimizer steps only.
- The regulariser rides in the model's output loss (the Trainer's default
  ``compute_loss``). The loss is each micro batch's mean, averaged over
  accumulation steps and ranks as in the DeepSpeed engine loop (Trainer's
  ``num_items_in_batch`` token weighting is off), so lambda means the same
  under every launcher. A custom ``compute_loss`` that builds its own loss must
  add ``leap_ds.regularization_loss(model)``; LEAP raises if it is dropped.
- Logs carry ``leap/density``, ``leap/lambda``, ``leap/reg_loss`` and each
  group's density; the progress bar shows the density.
- Checkpoints keep LEAP attached and hold ``leap_state.json`` (step counter,
  lambda); ``resume_from_checkpoint`` restores it. ``save_model()`` after
  ``train()`` finalizes: the masks go into the weights and the model is saved
  without LEAP's modules, loadable by plain transformers.
"""
from __future__ import annotations

import inspect
import json
import os

from dataclasses import dataclass

from transformers import Trainer, TrainerCallback, TrainingArguments
from transformers.trainer_callback import ProgressCallback
from transformers.trainer_utils import get_last_checkpoint

from ..algorithm.pruner import LEAP_LR, LeapPruner, LeapUsageError
from ..algorithm.selection import LeapConfigError
from ..integration.config import SECTION
from ..integration.engine import attach, pruner_of, warn_if_unclipped
from .accelerator import LeapAccelerator, add_leap_groups, take_leap_section
from .export import LEAP_REPORT_NAME, plain_state_dict

LEAP_STATE_NAME = "leap_state.json"
_TRAINER_SIGNATURE = inspect.signature(Trainer.__init__)


def _leap_section_of(args, leap_config):
    """The LEAP section: from ``args``' DeepSpeed config (taken out of it) or ``leap_config``."""
    holder = getattr(args, "hf_deepspeed_config", None) if args is not None else None
    section = take_leap_section(holder) if holder is not None else None
    plugin = getattr(args, "deepspeed_plugin", None) if args is not None else None
    if plugin is not None:
        take_leap_section(plugin)   # the same dict, usually; never leave the section in either
    if leap_config is not None:
        if section is not None:
            raise LeapConfigError(f"LEAP is configured twice: in the DeepSpeed config's {SECTION}.leap "
                                  f"and in leap_config=; keep one")
        return leap_config
    return section


@dataclass
class LeapTrainingArguments(TrainingArguments):
    """``TrainingArguments`` that take the LEAP section out of ``deepspeed`` as they read it.

    Needed when the model is loaded after the arguments and before the Trainer at ZeRO-3
    (``from_pretrained`` partitions it under the arguments' DeepSpeed config, which DeepSpeed
    refuses while it holds ``compression_training``); it also validates the section before the
    model is loaded. :class:`LeapTrainer` accepts these or plain ``TrainingArguments``."""

    def __post_init__(self):
        super().__post_init__()
        _leap_section_of(self, None)


def density_per_config_group(report: dict) -> dict:
    """Each different_groups entry's density (its matrices' groups are named '<entry>:<module>')."""
    kept, total = {}, {}
    for g in report["groups"]:
        name = g["name"].split(":")[0]
        kept[name] = kept.get(name, 0) + g["kept_weights"]
        total[name] = total.get(name, 0) + g["weights"]
    return {name: kept[name] / total[name] for name in kept}


class _LeapTrainBegin(TrainerCallback):
    """Runs after the engine exists and a checkpoint is loaded."""

    def __init__(self, trainer: "LeapTrainer"):
        self.trainer = trainer

    def on_train_begin(self, args, state, control, **kwargs):
        self.trainer._leap_train_begin()


class LeapTrainer(Trainer):
    """``transformers.Trainer`` with LEAP; the same arguments, plus ``leap_config``: a config
    (dict or JSON path) holding ``compression_training.leap``, or that ``leap`` section, for runs
    whose ``args`` have no DeepSpeed config. A model that already has LEAP attached
    (``leap_ds.attach``) is used as it is."""

    def __init__(self, *args, leap_config=None, **kwargs):
        bound = _TRAINER_SIGNATURE.bind(None, *args, **kwargs).arguments
        model, training_args = bound.get("model"), bound.get("args")
        if bound.get("model_init") is not None:
            raise LeapUsageError("LeapTrainer needs model=..., not model_init: LEAP attaches to the model "
                                 "before the engine is built (hyperparameter search is not supported)")
        if model is None:
            raise LeapUsageError("LeapTrainer needs model=...")
        section = _leap_section_of(training_args, leap_config)
        try:
            self.leap: LeapPruner = pruner_of(model)
        except ValueError:
            if section is None:
                raise LeapConfigError(
                    f"LeapTrainer found no LEAP configuration: put a {SECTION}.leap section (enabled) "
                    f"into the DeepSpeed config of TrainingArguments(deepspeed=...), or pass "
                    f"leap_config=<config dict or JSON path>; for dense training use Trainer") from None
            self.leap = attach(model, section)
        optimizer = (bound.get("optimizers") or (None, None))[0]
        if optimizer is not None and not any(LEAP_LR in g for g in optimizer.param_groups):
            raise LeapUsageError("optimizers=(optimizer, ...) must hold LEAP's thresholds in their own groups: "
                                 "build it from leap_ds.param_groups(model.parameters(), leap_ds.attach(model, "
                                 "config)), or let the Trainer build it (optimizer_cls_and_kwargs=...)")
        self._leap_resume_dir = None
        super().__init__(*args, **kwargs)
        warn_if_unclipped(self.args.max_grad_norm, "max_grad_norm")
        # each micro batch's mean loss, averaged as the DeepSpeed engine loop does: Trainer's
        # num_items_in_batch path multiplies the loss by the rank count and skips the division by
        # the accumulation steps, which would scale the regulariser riding in it (lambda) by both
        self.model_accepts_loss_kwargs = False
        LeapAccelerator.adopt(self.accelerator, self.leap)
        self.add_callback(_LeapTrainBegin(self))

    # ------------------------------------------------------------ optimizer
    def create_optimizer(self, model=None):
        fresh = self.optimizer is None
        optimizer = super().create_optimizer(model)
        if fresh:
            add_leap_groups(getattr(optimizer, "optimizer", optimizer), self.leap)
        return optimizer

    # ------------------------------------------------------------- training
    def train(self, resume_from_checkpoint=None, *args, **kwargs):
        if self.leap.finalized:
            raise LeapUsageError("LEAP was finalized by save_model(); build a new LeapTrainer to train again")
        if resume_from_checkpoint is True:
            found = get_last_checkpoint(self.args.output_dir)
            resume_from_checkpoint = found if found is not None else True   # True: Trainer raises, naming the folder
        self._leap_resume_dir = resume_from_checkpoint if isinstance(resume_from_checkpoint, (str, os.PathLike)) else None
        if self._leap_resume_dir is not None:
            path = os.path.join(self._leap_resume_dir, LEAP_STATE_NAME)
            if not os.path.isfile(path):
                raise LeapUsageError(f"{path} is missing: {self._leap_resume_dir} was not saved by LeapTrainer "
                                     f"(LEAP's step counter and lambda would restart); resume from a "
                                     f"LeapTrainer checkpoint")
        return super().train(resume_from_checkpoint, *args, **kwargs)

    def _leap_train_begin(self) -> None:
        if self._leap_resume_dir is not None:
            with open(os.path.join(self._leap_resume_dir, LEAP_STATE_NAME)) as f:
                self.leap.load_state_dict(json.load(f))   # also refreshes scores from the loaded weights
        else:
            self.leap.refresh_scores()

    # -------------------------------------------------------------- logging
    def log(self, logs: dict, *args, **kwargs) -> None:
        if "loss" in logs and not self.leap.finalized:   # training logs, on every rank: report() is collective
            rep = self.leap.report()
            logs["leap/density"] = rep["global_density"]
            logs["leap/lambda"] = rep["lambda"]
            logs["leap/reg_loss"] = rep["reg_loss"]
            for name, density in density_per_config_group(rep).items():
                logs[f"leap/density/{name}"] = density
            for cb in self.callback_handler.callbacks:
                bar = getattr(cb, "training_bar", None) if isinstance(cb, ProgressCallback) else None
                if bar is not None:
                    bar.set_postfix(density=f"{rep['global_density']:.3f}", refresh=False)
        super().log(logs, *args, **kwargs)

    # --------------------------------------------------------------- saving
    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        """During ``train()`` (checkpoints): the model with LEAP attached plus ``leap_state.json``.
        Afterwards: LEAP finalized (a collective: call it on every rank, as Trainer does) and the
        pruned model saved without LEAP's modules, loadable by plain transformers."""
        output_dir = output_dir if output_dir is not None else self.args.output_dir
        if self.is_in_train:
            super().save_model(output_dir, _internal_call)
            if self.args.should_save:
                os.makedirs(output_dir, exist_ok=True)
                with open(os.path.join(output_dir, LEAP_STATE_NAME), "w") as f:
                    json.dump(self.leap.state_dict(), f)
            return
        report = None
        if not self.leap.finalized:
            report = self.leap.report()
            self.leap.finalize()
        engine = self.model_wrapped if self.is_deepspeed_enabled and self.deepspeed is not None else None
        state = plain_state_dict(self.model, engine)
        self._save(output_dir, state_dict=state)
        if self.args.should_save and report is not None:
            with open(os.path.join(output_dir, LEAP_REPORT_NAME), "w") as f:
                json.dump(report, f, indent=1)
        if self.args.push_to_hub and not _internal_call:
            self.push_to_hub(commit_message="Model save", revision=self.args.hub_revision)
