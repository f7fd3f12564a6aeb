"""LEAP in Hugging Face training scripts (layer 3, beside :mod:`leap_ds.apps`).

- :class:`LeapTrainer`: ``transformers.Trainer`` with LEAP; keep ``--deepspeed ds_config.json``
  with its ``compression_training.leap`` section (or pass ``leap_config=`` without DeepSpeed).
- :class:`LeapAccelerator`: ``accelerate.Accelerator`` with LEAP, for hand-written loops.
"""
from .accelerator import LeapAccelerator, take_leap_section
from .export import LEAP_REPORT_NAME, plain_state_dict
from .trainer import LEAP_STATE_NAME, LeapTrainer, LeapTrainingArguments

__all__ = ["LeapTrainer", "LeapTrainingArguments", "LeapAccelerator", "take_leap_section", "plain_state_dict",
           "LEAP_STATE_NAME", "LEAP_REPORT_NAME"]
