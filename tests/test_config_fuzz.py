"""Config fuzzing (issue 10): mutate the ``compression_training.leap`` section of every
shipped config in ds_configs/ and attach it to a tiny random model.

Every mutated config must either be accepted (and then train: one forward,
lambda * L_reg, backward and an AdamW step over ``param_groups`` give finite numbers)
or be refused with :class:`leap_ds.LeapConfigError` whose message names the mutated
key, the object holding it, or the section. Any other exception is a failure.
Some mutations must be refused (unknown keys, wrong types, NaN/inf, regexes that are
invalid or match nothing, sections that are not objects): accepting them is a failure.

Each shipped config gets CASES_PER_CONFIG cases drawn with a fixed seed (per config, so
adding a config does not change the others' cases), every kind of mutation represented.
``LEAP_FUZZ_ALL=1`` runs every generated case instead (a few thousand; minutes).
Run with ``-s`` to see the case count and how many were accepted and refused.

Known failures are listed, each with the traceback line, in KNOWN_CRASHES (another
exception than LeapConfigError) and KNOWN_SILENT_ACCEPTS (accepted but should be
refused); they are strict xfails, so fixing one fails the test until it is removed.
"""
from __future__ import annotations

import copy
import functools
import glob
import json
import os
import random
import traceback
from collections import Counter
from dataclasses import dataclass

import pytest
import torch

import leap_ds
from leap_ds import LeapConfigError
from leap_ds.integration.config import split_config
from tests import tiny_models as tm

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SEED = 10
CASES_PER_CONFIG = 40
RUN_ALL = os.environ.get("LEAP_FUZZ_ALL") == "1"
SECTION, LEAP = "compression_training", "leap"


def tiny_llama_gqa(seed=0):
    """Grouped-query attention: 4 query heads sharing 2 key/value heads."""
    from transformers import LlamaConfig, LlamaForSequenceClassification
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, intermediate_size=64, max_position_embeddings=32,
                      num_labels=2, pad_token_id=0)
    return LlamaForSequenceClassification(cfg)


# tried in this order; the first one the unmutated config attaches to is used
TINY_MODELS = {"bert": tm.tiny_bert, "llama": tm.tiny_llama, "llama_gqa": tiny_llama_gqa,
               "gpt2": tm.tiny_gpt2}

# Cases that raise another exception than LeapConfigError: id -> exception, where, message.
# Root cause: shared_parameters' floats accept NaN, inf and values that overflow float32
# (threshold_init, threshold_lr, score_lr, lambda_max, lambda_min), and threshold_betas has
# no [0, 1) range. Remove an entry once fixed (strict xfail: a fixed case fails until removed).
KNOWN_CRASHES: dict[str, str] = {}

# Cases accepted although they must be refused: id -> what goes wrong. The same root cause,
# plus related_modules being ignored (not refused, as block_size is) when a group's
# granularity is not head.
KNOWN_SILENT_ACCEPTS: dict[str, str] = {}


# ----------------------------------------------------------------------------------------------
# mutations
# ----------------------------------------------------------------------------------------------

DELETE = object()          # sentinel: remove the key
UNKNOWN_KEY = "zz_unknown_key"


@dataclass(frozen=True)
class Mutation:
    kind: str              # delete, type, range, unknown_key, regex, structure, list
    path: tuple            # keys / list indices from the root of the DeepSpeed config
    value: object          # the new value, or DELETE
    label: str             # short text for the case id
    must_reject: bool      # True: accepting it is a failure

    def apply(self, config: dict) -> dict:
        config = copy.deepcopy(config)
        node = config
        for key in self.path[:-1]:
            node = node[key]
        last = self.path[-1]
        if self.value is DELETE:
            del node[last]
        elif isinstance(node, list) and last == len(node):
            node.append(copy.deepcopy(self.value))
        else:
            node[last] = copy.deepcopy(self.value)
        return config

    def names(self) -> list[str]:
        """Words one of which the error message must contain: the mutated key, the object
        holding it, or for the section itself its dotted name."""
        keys = [k for k in self.path if isinstance(k, str)]
        if len(keys) <= 2:             # the section, leap, or a sibling of leap
            return [SECTION]
        if keys[-2] == LEAP:           # "leap" is in every message: it does not count
            return [keys[-1]]
        return [keys[-1], keys[-2]]

    @property
    def id(self) -> str:
        keys = ".".join(str(k) for k in self.path[2:]) or ".".join(self.path)
        return f"{self.kind}:{keys}={self.label}"


NUMBER_REPLACEMENTS = [  # (value, label, must_reject)
    ("0.5", "str", True), ([], "list", True), ({}, "dict", True), (None, "null", False),
    (True, "true", True), (False, "false", True),
]
RANGE_REPLACEMENTS = [
    (-1, "-1", False), (0, "0", False), (1.5, "1.5", False), (1e308, "1e308", False),
    (float("nan"), "nan", True), (float("inf"), "inf", True), (float("-inf"), "-inf", True),
]
STRING_REPLACEMENTS = [
    (7, "number", True), (0.5, "float", True), (True, "true", True), ({}, "dict", True),
    (None, "null", False), ("zz_not_a_choice", "other-string", True),
]
BAD_REGEXES = [  # (pattern, label, must_reject)
    ("(", "unbalanced", True), ("[a-", "open-class", True), ("a{2,1}", "bad-range", True),
    ("zz_no_such_module", "matches-nothing", True), ("embeddings", "non-linear-only", False),
    ("", "empty", False), (".*", "everything", False), (r"\.", "any-dot", False),
]
ANY_VALUES = [("x", "str", True), (7, "number", True), ([], "list", True), (None, "null", True),
              (True, "true", True)]


def _is_number(v):
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _regex_list(path) -> bool:
    return bool(path) and path[-1] in ("modules", "related_modules")


def _walk(node, path):
    """Yield (path, value) for every value below node, depth first."""
    if isinstance(node, dict):
        for k, v in node.items():
            yield (*path, k), v
            yield from _walk(v, (*path, k))
    elif isinstance(node, list):
        for i, v in enumerate(node):
            yield (*path, i), v
            yield from _walk(v, (*path, i))


def _orphans_related_modules(leap: dict, path: tuple) -> bool:
    """Deleting this key leaves a group with related_modules but without head granularity
    (related_modules would be ignored, as block_size would be: both must be refused)."""
    keys = path[2:]
    if len(keys) < 3 or keys[0] != "different_groups" or keys[2] != "params":
        return False
    group = leap["different_groups"][keys[1]]
    return bool(group.get("related_modules")) and len(keys) in (3, 4) and keys[-1] in ("params", "granularity")


def generate(config: dict) -> list[Mutation]:
    """Every mutation of config's compression_training.leap section, in a fixed order."""
    out: list[Mutation] = []
    root = (SECTION,)
    leap = config[SECTION][LEAP]

    # the section and leap themselves
    for value, label, _ in ANY_VALUES + [({}, "empty-object", True)]:
        out.append(Mutation("structure", root, value, label, True))
        out.append(Mutation("structure", (*root, LEAP), value, label, True))
    out.append(Mutation("structure", root, DELETE, "deleted", False))
    out.append(Mutation("unknown_key", (*root, "quantization"), {"enabled": True}, "sibling", True))
    groups_path = (*root, LEAP, "different_groups")
    for value, label in (({}, "empty"), ([], "list"), ("encoder", "str"), (None, "null")):
        out.append(Mutation("structure", groups_path, value, label, True))
    first_group = next(iter(leap["different_groups"]))
    for value, label in (({}, "empty"), ([], "list"), ("x", "str"), (None, "null")):
        out.append(Mutation("structure", (*groups_path, first_group), value, label, True))
    # the same modules in a second group
    out.append(Mutation("structure", (*groups_path, "zz_copy"),
                        leap["different_groups"][first_group], "duplicate-group", True))
    out.append(Mutation("structure", (*root, LEAP, "shared_parameters", "enabled"),
                        False, "disabled", True))

    nodes = [((*root, LEAP), leap)] + [((*root, LEAP, *p), v) for p, v in _walk(leap, ())]
    for path, value in nodes:
        parent_is_list = isinstance(path[-1], int)
        if isinstance(value, dict):
            out.append(Mutation("unknown_key", (*path, UNKNOWN_KEY), 1, "added", True))
        if not parent_is_list and path[-1] != LEAP:
            out.append(Mutation("delete", path, DELETE, "deleted", _orphans_related_modules(leap, path)))
        if _is_number(value):
            for new, label, reject in NUMBER_REPLACEMENTS:
                out.append(Mutation("type", path, new, label, reject))
            # Adam's betas lie in [0, 1): -1, 1.5 and 1e308 are no betas either
            betas = len(path) >= 2 and path[-2] == "threshold_betas"
            for new, label, reject in RANGE_REPLACEMENTS:
                out.append(Mutation("range", path, new, label, reject or (betas and not 0 <= new < 1)))
        elif isinstance(value, str):
            if parent_is_list and _regex_list(path[:-1]):
                for new, label, reject in BAD_REGEXES:
                    out.append(Mutation("regex", path, new, label, reject))
                for new, label, reject in ((7, "number", True), ({}, "dict", True), (None, "null", True)):
                    out.append(Mutation("type", path, new, label, reject))
            else:
                for new, label, reject in STRING_REPLACEMENTS:
                    out.append(Mutation("type", path, new, label, reject))
        elif isinstance(value, list):
            for new, label, reject in (("x", "str", True), ({}, "dict", True), (None, "null", False),
                                       (7, "number", True), ([], "empty", False)):
                out.append(Mutation("list", path, new, label, reject))
            extra = "zz_no_such_module" if _regex_list(path) else value[-1] if value else 1
            out.append(Mutation("list", (*path, len(value)), extra, "extra-item",
                                _regex_list(path) or path[-1] in ("block_size", "threshold_betas")))
        elif isinstance(value, dict) and path[-1] == "params":
            for new, label, reject in (({"granularity": "block"}, "block-without-size", True),
                                       ({"granularity": "block", "block_size": [3, 5]},
                                        "block-not-dividing", True),
                                       ({"granularity": "head", "num_heads": 3},
                                        "heads-not-dividing", True),
                                       ({"granularity": "channel"}, "granularity-channel", False),
                                       ({"granularity": "head", "num_heads": 0}, "zero-heads", True)):
                out.append(Mutation("structure", path, new, label, reject))
    return out


def select(config_path: str, mutations: list[Mutation]) -> list[Mutation]:
    """CASES_PER_CONFIG of them, drawn with a fixed per-config seed, round-robin over kinds."""
    if RUN_ALL:
        return mutations
    rng = random.Random(f"{SEED}:{os.path.basename(config_path)}")
    by_kind: dict[str, list[Mutation]] = {}
    for m in mutations:
        by_kind.setdefault(m.kind, []).append(m)
    for ms in by_kind.values():
        rng.shuffle(ms)
    chosen: list[Mutation] = []
    while len(chosen) < CASES_PER_CONFIG and any(by_kind.values()):
        for kind in sorted(by_kind):
            if by_kind[kind] and len(chosen) < CASES_PER_CONFIG:
                chosen.append(by_kind[kind].pop())
    return chosen


def load(path: str) -> dict:
    with open(path) as f:
        return json.load(f)


# every shipped config that holds a LEAP section (a plain DeepSpeed config has nothing to fuzz)
CONFIGS = [p for p in sorted(glob.glob(os.path.join(ROOT, "ds_configs", "*.json")))
           if isinstance(load(p).get(SECTION), dict) and LEAP in load(p)[SECTION]]


# ----------------------------------------------------------------------------------------------
# tiny models
# ----------------------------------------------------------------------------------------------

@functools.lru_cache(maxsize=None)
def template_for(config_path: str):
    """(model name, unattached model) of the first tiny model the unmutated config attaches
    to, or (None, errors)."""
    errors = {}
    for name, make in TINY_MODELS.items():
        model = make()
        try:
            exercise(leap_ds.attach(copy.deepcopy(model), load(config_path)), model.config.vocab_size)
        except LeapConfigError as e:
            errors[name] = str(e).splitlines()[0]
            continue
        return name, model
    return None, errors


class NonFinite(AssertionError):
    """An accepted config whose first training step gives non-finite numbers."""


def exercise(pruner, vocab_size: int) -> None:
    """What the first training step does with the pruner: forward, lambda * L_reg,
    backward, an AdamW step over param_groups; every number must be finite."""
    model = pruner.model
    model.train()
    ids = torch.randint(1, vocab_size, (2, 8), generator=torch.Generator().manual_seed(0))
    out = model(input_ids=ids, labels=torch.tensor([0, 1]))
    loss = out.loss                        # given labels, the output loss carries lambda * L_reg
    if not torch.isfinite(loss):
        raise NonFinite(f"loss with LEAP is {loss.item()}")
    loss.backward()
    optimizer = torch.optim.AdamW(leap_ds.param_groups(model.parameters(), pruner))
    optimizer.step()
    pruner.on_optimizer_step()
    bad = [n for n, p in model.named_parameters() if not torch.isfinite(p).all()]
    if bad:
        raise NonFinite(f"non-finite parameters after one step: {bad[:3]}")


# ----------------------------------------------------------------------------------------------
# the cases
# ----------------------------------------------------------------------------------------------

def _cases():
    params = []
    for path in CONFIGS:
        name = os.path.basename(path)
        for m in select(path, generate(load(path))):
            case_id = f"{name}|{m.id}"
            marks = []
            if case_id in KNOWN_CRASHES:
                marks.append(pytest.mark.xfail(strict=True, reason="KNOWN_CRASHES: " + KNOWN_CRASHES[case_id]))
            if case_id in KNOWN_SILENT_ACCEPTS:
                marks.append(pytest.mark.xfail(strict=True, reason="KNOWN_SILENT_ACCEPTS: "
                                               + KNOWN_SILENT_ACCEPTS[case_id]))
            params.append(pytest.param(path, m, id=case_id, marks=marks))
    return params


CASES = _cases()
OUTCOMES: Counter = Counter()


@pytest.fixture(scope="module", autouse=True)
def summary():
    yield
    total = sum(OUTCOMES.values())
    print(f"\nconfig fuzz: {total} cases over {len(CONFIGS)} shipped configs: "
          + ", ".join(f"{k} {v}" for k, v in sorted(OUTCOMES.items())))


def test_there_are_shipped_configs_and_a_few_hundred_cases():
    assert CONFIGS, "no ds_configs/*.json holds a compression_training.leap section"
    assert len(CASES) >= min(200, CASES_PER_CONFIG * len(CONFIGS))


@pytest.mark.parametrize("config_path", CONFIGS, ids=os.path.basename)
def test_shipped_config_attaches_to_a_tiny_model(config_path):
    name, detail = template_for(config_path)
    assert name is not None, (f"{os.path.basename(config_path)} attaches to none of the tiny models "
                              f"{list(TINY_MODELS)}; add one whose module names it matches to "
                              f"TINY_MODELS in {__file__}. Errors: {detail}")


def test_known_failure_lists_name_existing_cases():
    ids = {p.id for p in CASES}
    stale = [c for c in [*KNOWN_CRASHES, *KNOWN_SILENT_ACCEPTS] if c not in ids]
    assert not stale, f"listed cases that are not generated (config or seed changed?): {stale}"


@pytest.mark.parametrize("config_path,mutation", CASES)
def test_mutated_config_is_accepted_or_refused_by_name(config_path, mutation):
    name, template = template_for(config_path)
    if name is None:
        pytest.skip("no tiny model for this config: see test_shipped_config_attaches_to_a_tiny_model")
    config = mutation.apply(load(config_path))
    try:
        split_config(config)
        pruner = leap_ds.attach(copy.deepcopy(template), config)
        exercise(pruner, template.config.vocab_size)
    except LeapConfigError as e:
        OUTCOMES["refused"] += 1
        message = str(e)
        assert any(n in message for n in mutation.names()), (
            f"LeapConfigError does not name any of {mutation.names()}:\n{message}")
        return
    except NonFinite as e:
        OUTCOMES["accepted, then non-finite"] += 1
        pytest.fail(f"{mutation.id} on {os.path.basename(config_path)} (tiny {name}) was accepted, "
                    f"but {e}; it must be refused with LeapConfigError naming {mutation.names()}")
    except Exception:  # noqa: BLE001 - any other type is the failure this test looks for
        OUTCOMES["crashed"] += 1
        pytest.fail(f"{mutation.id} on {os.path.basename(config_path)} "
                    f"(tiny {name}) raised another error than LeapConfigError:\n{traceback.format_exc()}")
    OUTCOMES["accepted"] += 1
    assert not mutation.must_reject, (
        f"{mutation.id} was accepted; it must be refused with LeapConfigError naming {mutation.names()}")
