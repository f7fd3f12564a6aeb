"""The ``compression_training.leap`` section of a DeepSpeed config.

Validated with pydantic, as DeepSpeed validates its own sections. DeepSpeed
0.19.7+ rejects a config holding ``compression_training``, so
:func:`split_config` takes the section out and hands the rest to DeepSpeed.
"""
from __future__ import annotations

import copy
import json
import os
from typing import Annotated, Literal, Union

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from ..algorithm.regularizer import DEFAULT_DENSITY_TOLERANCE
from ..algorithm.selection import DEFAULT_SCORE_INIT, SCORE_INITS, GroupRule, LeapConfigError

SECTION = "compression_training"


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


# strict: JSON true is not the number 1, "0.3" is not 0.3 (ints are still fine for floats);
# finite (each field bounds its own range so that float32 tensors stay finite)
Float = Annotated[float, Field(strict=True, allow_inf_nan=False)]
Int = Annotated[int, Field(strict=True)]
Beta = Annotated[float, Field(strict=True, allow_inf_nan=False, ge=0.0, lt=1.0)]


class GroupParams(_Strict):
    granularity: Literal["unstructured", "block", "row", "column", "head", "channel"] = "unstructured"
    score: Literal["magnitude", "learned"] | None = None  # default: shared_parameters.score
    score_init: Literal[SCORE_INITS] | None = None        # default: shared_parameters.score_init
    block_size: tuple[Int, Int] | None = None             # (rows, cols), block granularity only
    # head granularity; default from the model config (num_attention_heads, num_key_value_heads)
    num_heads: Int | None = Field(default=None, gt=0)
    num_kv_heads: Int | None = Field(default=None, gt=0)
    # row / column pruning of a matrix whose units feed (or are fed by) another pruned matrix
    # of the same layer is refused unless this is set (dead weights would count as kept)
    allow_dead_weights: Annotated[bool, Field(strict=True)] = False
    # head / channel: one threshold for every matched layer, so every layer keeps the same
    # number of units (a compact model that plain transformers configs can express)
    uniform: Annotated[bool, Field(strict=True)] = False
    # head / channel: each matrix keeps a multiple of this many units (hardware-friendly widths;
    # all of them when there are fewer); values above a matrix's unit count are refused at attach
    multiple_of: Int = Field(default=1, ge=1)

    @model_validator(mode="after")
    def _block(self):
        if self.granularity == "block":
            if self.block_size is None:
                raise ValueError("granularity 'block' needs block_size, e.g. [32, 32]")
            if min(self.block_size) <= 0:
                raise ValueError(f"block_size {list(self.block_size)} must be two positive integers")
        elif self.block_size is not None:
            raise ValueError(f"block_size is only used with granularity 'block', not {self.granularity!r}")
        if self.granularity != "head" and (self.num_heads or self.num_kv_heads):
            raise ValueError(f"num_heads / num_kv_heads are only used with granularity 'head', "
                             f"not {self.granularity!r}")
        if self.granularity not in ("row", "column") and self.allow_dead_weights:
            raise ValueError("allow_dead_weights is only used with granularity 'row' or 'column'")
        if self.granularity not in ("head", "channel") and self.uniform:
            raise ValueError("uniform is only used with granularity 'head' or 'channel'")
        if self.granularity not in ("head", "channel") and self.multiple_of != 1:
            raise ValueError(f"multiple_of is only used with granularity 'head' or 'channel', not "
                             f"{self.granularity!r}: remove it, or set granularity 'head' or 'channel'")
        return self


class GroupConfig(_Strict):
    params: GroupParams = GroupParams()
    modules: list[str] = Field(min_length=1)
    related_modules: list[Union[str, list[str]]] = []

    @field_validator("related_modules")
    @classmethod
    def _flatten(cls, v):
        # DeepSpeed's old schema nests them one list per module pattern
        return [p for item in v for p in ([item] if isinstance(item, str) else item)]

    @model_validator(mode="after")
    def _related_only_for_coupled(self):
        if self.related_modules and self.params.granularity not in ("head", "channel"):
            raise ValueError(f"related_modules is only used with params.granularity 'head' or 'channel', "
                             f"but params.granularity is {self.params.granularity!r} (the default when "
                             f"unset): set params.granularity, or remove related_modules")
        return self


class SharedParameters(_Strict):
    enabled: Annotated[bool, Field(strict=True)] = True
    target_density: Float = Field(gt=0.0, le=1.0)
    # bounded so that lambda * L_reg stays finite in float32 / bf16 losses
    lambda_max: Float = Field(default=20000.0, gt=0.0, le=1e12)
    # lambda drops to its floor (10) once R - R_t < density_tolerance, i.e. L_reg < its
    # square; the paper's 3e-4 on L_reg is 0.0173 above the target
    density_tolerance: Float = Field(default=DEFAULT_DENSITY_TOLERANCE, gt=0.0, lt=1.0)
    # least lambda while the density is more than density_tolerance above the target (paper: 50)
    lambda_min: Float = Field(default=50.0, gt=0.0, le=1e12)
    # "one_sided" (the paper): no pull below the target; "two_sided": (R - R_t)^2 either way
    regularizer: Literal["one_sided", "two_sided"] = "one_sided"
    # |theta| <= 30: sigmoid saturates in float32 well before (a larger start only delays pruning)
    threshold_init: Float = Field(default=10.0, ge=-30.0, le=30.0)
    threshold_lr: Float = Field(default=1e-2, gt=0.0, le=1e3)
    score_lr: Float = Field(default=1e-2, gt=0.0, le=1e3)
    schedule_offset: Int = Field(default=0, ge=0)
    # Adam betas of the thresholds' group: no momentum, so theta stops within about
    # one step once the one-sided regulariser lets go at the target (no overshoot);
    # a short second-moment memory, or the early gradients (lambda ~ 2e4) freeze theta later
    threshold_betas: tuple[Beta, Beta] = (0.0, 0.9)
    score: Literal["magnitude", "learned"] = "magnitude"
    # where learned scores start (groups with magnitude scores ignore it): "magnitude", the
    # units' L2 norms scaled to mean 1 per matrix, or "zero", the authors' (whose ties collapse)
    score_init: Literal[SCORE_INITS] = DEFAULT_SCORE_INIT


class LeapSection(_Strict):
    shared_parameters: SharedParameters
    different_groups: dict[str, GroupConfig] = Field(min_length=1)

    @model_validator(mode="after")
    def _score_init_only_for_learned(self):
        for name, g in self.different_groups.items():
            if g.params.score_init is not None and (g.params.score or self.shared_parameters.score) != "learned":
                raise ValueError(f"different_groups.{name}.params.score_init applies to learned scores, but "
                                 f"this group ranks by magnitude: set its score to 'learned', or remove score_init")
        return self

    def rules(self) -> list[GroupRule]:
        shared = self.shared_parameters
        return [GroupRule(name=name, modules=g.modules, granularity=g.params.granularity,
                          score=g.params.score or shared.score,
                          score_init=g.params.score_init or shared.score_init, block=g.params.block_size,
                          num_heads=g.params.num_heads, num_kv_heads=g.params.num_kv_heads,
                          related_modules=g.related_modules, allow_dead_weights=g.params.allow_dead_weights,
                          uniform=g.params.uniform, multiple_of=g.params.multiple_of)
                for name, g in self.different_groups.items()]

    def pruner_settings(self) -> dict:
        s = self.shared_parameters
        return dict(target_density=s.target_density, lambda_max=s.lambda_max,
                    density_tolerance=s.density_tolerance, lambda_min=s.lambda_min,
                    two_sided=s.regularizer == "two_sided",
                    threshold_init=s.threshold_init, schedule_offset=s.schedule_offset)


class CompressionTraining(_Strict):
    leap: LeapSection


def _format(error: ValidationError, prefix: str) -> str:
    lines = []
    for e in error.errors():
        loc = ".".join(str(p) for p in (prefix, *e["loc"]) if p != "")
        if e["type"] == "extra_forbidden":
            lines.append(f"{loc}: unknown key (remove it or check its spelling)")
        elif e["type"] == "missing":
            lines.append(f"{loc}: required key is missing")
        elif e["type"] == "value_error" and isinstance(e["input"], dict):   # a section-wide check: its message names the keys
            lines.append(f"{loc}: {e['msg']}")
        else:
            lines.append(f"{loc}: {e['input']!r} is not allowed: {e['msg']}")
    return "invalid LEAP config:\n  " + "\n  ".join(lines)


def load_ds_config(config) -> dict:
    """A DeepSpeed config given as a dict or a JSON path, as a fresh dict."""
    if isinstance(config, dict):
        return copy.deepcopy(config)
    if isinstance(config, (str, os.PathLike)):
        if not os.path.isfile(config):
            raise LeapConfigError(f"DeepSpeed config file {os.fspath(config)!r} does not exist; "
                                  f"pass a JSON file path (see ds_configs/)")

        def no_duplicates(pairs):
            keys = [k for k, _ in pairs]
            dup = {k for k in keys if keys.count(k) > 1}
            if dup:
                raise LeapConfigError(f"{os.fspath(config)}: duplicate JSON key(s) {sorted(dup)}")
            return dict(pairs)
        try:
            with open(config) as f:
                return json.load(f, object_pairs_hook=no_duplicates)
        except json.JSONDecodeError as e:
            raise LeapConfigError(f"{os.fspath(config)} is not valid JSON: {e}") from None
    raise LeapConfigError(f"config must be a dict or a JSON file path, not {type(config).__name__}")


def parse_leap_section(section) -> LeapSection:
    try:
        return CompressionTraining.model_validate(section).leap
    except ValidationError as e:
        raise LeapConfigError(_format(e, SECTION)) from None


def split_config(config) -> tuple[dict, LeapSection | None]:
    """(config for DeepSpeed without compression_training, validated LEAP section or None)."""
    ds_config = load_ds_config(config)
    section = ds_config.pop(SECTION, None)
    if section is None:
        return ds_config, None
    if not isinstance(section, dict) or "leap" not in section:
        found = sorted(section) if isinstance(section, dict) else type(section).__name__
        raise LeapConfigError(f"{SECTION} holds {found}, not a 'leap' section; leap_ds implements "
                              f"LEAP only (DeepSpeed 0.19.7+ removed its other compression "
                              f"techniques): move the settings under {SECTION}.leap")
    leap = parse_leap_section(section)
    return ds_config, (leap if leap.shared_parameters.enabled else None)
