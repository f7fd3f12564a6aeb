"""The ``compression_training.leap`` config section: split_config, validation
errors (LeapConfigError naming the key path and the bad value), attach and
param_groups."""
import copy
import json
import re

import pytest
import torch

from leap_ds import GroupRule, LeapConfigError, LeapPruner, attach, param_groups
from leap_ds.integration.config import load_ds_config, split_config
from tests import tiny_models as tm

# heads, FFN rows and FFN-out blocks: every kind of group parameter in one config (the rows feed
# the blocks' columns, which is allowed here on purpose)
HYBRID_ROWS = {
    **tm.ATTN_HEADS,
    "ffn_rows": {"params": {"granularity": "row", "allow_dead_weights": True}, "modules": [r"intermediate\.dense"]},
    "ffn_out": {"params": {"granularity": "block", "block_size": [4, 8]},
                "modules": [r"layer\.\d+\.output\.dense"]},
}
BASE = tm.ds_config(leap=tm.leap_section(HYBRID_ROWS, target=0.25))


def cfg(mutate=None):
    c = copy.deepcopy(BASE)
    if mutate:
        mutate(c["compression_training"]["leap"])
    return c


def shared(**kw):
    return cfg(lambda leap: leap["shared_parameters"].update(kw))


def group(name, fn):
    return cfg(lambda leap: fn(leap["different_groups"][name]))


def assert_error(fn, path, *values):
    """fn raises LeapConfigError; its message has a line naming `path` and every value."""
    with pytest.raises(LeapConfigError) as info:
        fn()
    msg = str(info.value)
    lines = [line for line in msg.splitlines() if path in line]
    assert lines, f"{path!r} not in message:\n{msg}"
    for v in values:
        assert any(v in line for line in lines), f"{v!r} not on the line naming {path!r}:\n{msg}"
    return msg


def build(config):
    return attach(tm.tiny_bert(), config)


# ----------------------------------------------------------------------------------------------
# split_config / load_ds_config
# ----------------------------------------------------------------------------------------------


def _check_split(ds_config, section, source):
    expected = {k: v for k, v in source.items() if k != "compression_training"}
    assert ds_config == expected
    assert "compression_training" not in ds_config
    s = section.shared_parameters
    assert (s.target_density, s.threshold_init, s.threshold_lr, s.score_lr) == (0.25, 3.0, 0.1, 0.05)
    assert (s.lambda_max, s.schedule_offset, s.score, s.enabled) == (20000.0, 0, "magnitude", True)
    rules = {r.name: r for r in section.rules()}
    assert set(rules) == {"head", "ffn_rows", "ffn_out"}
    assert rules["head"].granularity == "head"
    assert rules["head"].related_modules == ["self.query", "self.key", "self.value"]
    assert rules["ffn_rows"].granularity == "row"
    assert rules["ffn_out"].granularity == "block" and tuple(rules["ffn_out"].block) == (4, 8)
    assert all(r.score == "magnitude" for r in rules.values())


def test_split_config_removes_the_section_and_validates_it():
    source = cfg()
    before = copy.deepcopy(source)
    ds_config, section = split_config(source)
    _check_split(ds_config, section, source)
    assert source == before      # the caller's dict is left alone


def test_split_config_from_a_json_file(tmp_path):
    path = tmp_path / "ds.json"
    path.write_text(json.dumps(cfg()))
    ds_config, section = split_config(str(path))
    _check_split(ds_config, section, cfg())
    ds_config2, _ = split_config(path)   # os.PathLike
    assert ds_config2 == ds_config


def test_config_without_the_section_passes_through_unchanged(tmp_path):
    plain = tm.ds_config()
    before = copy.deepcopy(plain)
    ds_config, section = split_config(plain)
    assert section is None and ds_config == before and plain == before
    path = tmp_path / "plain.json"
    path.write_text(json.dumps(plain))
    assert split_config(str(path)) == (before, None)


def test_enabled_false_gives_none_and_still_strips_the_section():
    source = shared(enabled=False)
    ds_config, section = split_config(source)
    assert section is None
    assert ds_config == {k: v for k, v in source.items() if k != "compression_training"}
    with pytest.raises(LeapConfigError, match="enabled"):
        build(source)


def test_group_score_defaults_to_shared_score_and_related_modules_are_flattened():
    def mutate(leap):
        leap["shared_parameters"]["score"] = "learned"
        leap["different_groups"]["ffn_rows"]["params"]["score"] = "magnitude"
        leap["different_groups"]["head"]["related_modules"] = [["self.query", "self.key"], "self.value"]
    _, section = split_config(cfg(mutate))
    rules = {r.name: r for r in section.rules()}
    assert rules["head"].score == "learned" and rules["ffn_out"].score == "learned"
    assert rules["ffn_rows"].score == "magnitude"
    assert rules["head"].related_modules == ["self.query", "self.key", "self.value"]


def test_attach_accepts_a_full_config_or_the_leap_section_alone():
    a = build(cfg())
    b = build(cfg()["compression_training"]["leap"])
    assert [g.name for g in a.groups] == [g.name for g in b.groups]
    assert len(a.groups) == 6   # 2 layers x (heads, FFN rows, FFN-out blocks)
    assert a.target_density == 0.25


# ----------------------------------------------------------------------------------------------
# bad inputs
# ----------------------------------------------------------------------------------------------

LEAP = "compression_training.leap"


def test_unknown_shared_key():
    assert_error(lambda: split_config(shared(taget_density=0.3)),
                 f"{LEAP}.shared_parameters.taget_density")


def test_unknown_group_keys():
    assert_error(lambda: split_config(group("ffn_rows", lambda g: g.update(granularty="row"))),
                 f"{LEAP}.different_groups.ffn_rows.granularty")
    assert_error(lambda: split_config(group("ffn_out", lambda g: g["params"].update(blocksize=[4, 8]))),
                 f"{LEAP}.different_groups.ffn_out.params.blocksize")
    assert_error(lambda: split_config(cfg(lambda leap: leap.update(sharedparameters={}))),
                 f"{LEAP}.sharedparameters")


@pytest.mark.parametrize("where,make,path,value", [
    ("target_density", lambda: shared(target_density="high"), "shared_parameters.target_density", "'high'"),
    ("target_density", lambda: shared(target_density=[0.3]), "shared_parameters.target_density", "[0.3]"),
    ("schedule_offset", lambda: shared(schedule_offset=2.5), "shared_parameters.schedule_offset", "2.5"),
    ("modules", lambda: group("ffn_rows", lambda g: g.update(modules="intermediate")),
     "different_groups.ffn_rows.modules", "'intermediate'"),
    ("num_heads", lambda: group("head", lambda g: g["params"].update(num_heads="four")),
     "different_groups.head.params.num_heads", "'four'"),
    ("granularity", lambda: group("ffn_rows", lambda g: g["params"].update(granularity="rows")),
     "different_groups.ffn_rows.params.granularity", "'rows'"),
    ("score", lambda: shared(score="learnt"), "shared_parameters.score", "'learnt'"),
    ("block_size", lambda: group("ffn_out", lambda g: g["params"].update(block_size="4x8")),
     "different_groups.ffn_out.params.block_size", "'4x8'"),
    ("enabled", lambda: shared(enabled="sometimes"), "shared_parameters.enabled", "'sometimes'"),
])
def test_wrong_type(where, make, path, value):
    assert_error(lambda: split_config(make()), f"{LEAP}.{path}", value)


def test_block_size_of_wrong_length():
    assert_error(lambda: split_config(group("ffn_out", lambda g: g["params"].update(block_size=[4]))),
                 f"{LEAP}.different_groups.ffn_out.params.block_size")
    assert_error(lambda: split_config(group("ffn_out", lambda g: g["params"].update(block_size=[4, 8, 2]))),
                 f"{LEAP}.different_groups.ffn_out.params.block_size")


@pytest.mark.parametrize("make,path", [
    (lambda: shared(target_density=True), "shared_parameters.target_density"),
    (lambda: group("head", lambda g: g["params"].update(num_heads=True)), "different_groups.head.params.num_heads"),
], ids=["target_density", "num_heads"])
def test_boolean_for_a_number_is_rejected(make, path):
    assert_error(lambda: split_config(make()), f"{LEAP}.{path}", "True")


@pytest.mark.parametrize("value", [0, 1.5, -0.1, 0.0])
def test_target_density_out_of_range(value):
    msg = assert_error(lambda: split_config(shared(target_density=value)),
                       f"{LEAP}.shared_parameters.target_density")
    line = next(line for line in msg.splitlines() if "target_density" in line)
    # the bad value itself, not as part of another number
    assert re.search(rf"(?<![\d.]){re.escape(repr(value))}(?![\d])", line), msg


@pytest.mark.parametrize("value", [0.0, -5.0])
def test_lambda_min_out_of_range(value):
    assert_error(lambda: split_config(shared(lambda_min=value)), f"{LEAP}.shared_parameters.lambda_min", repr(value))


@pytest.mark.parametrize("value", [0.0, 1.0, -0.01])
def test_density_tolerance_out_of_range(value):
    assert_error(lambda: split_config(shared(density_tolerance=value)),
                 f"{LEAP}.shared_parameters.density_tolerance", repr(value))


def test_density_tolerance_and_lambda_min_reach_the_pruner():
    _, section = split_config(shared(density_tolerance=0.004, lambda_min=300.0))
    assert section.pruner_settings()["density_tolerance"] == 0.004
    assert section.pruner_settings()["lambda_min"] == 300.0
    assert split_config(shared())[1].pruner_settings()["lambda_min"] == 50.0   # the paper's
    assert split_config(shared())[1].pruner_settings()["two_sided"] is False   # the paper's
    assert split_config(shared(regularizer="two_sided"))[1].pruner_settings()["two_sided"] is True
    assert_error(lambda: split_config(shared(regularizer="both")), f"{LEAP}.shared_parameters.regularizer", "'both'")
    # the paper's switch, L_reg < 3e-4, when not given
    _, section = split_config(shared())
    assert section.pruner_settings()["density_tolerance"] ** 2 == pytest.approx(3e-4, rel=1e-12)


def test_target_density_bounds_are_accepted():
    assert split_config(shared(target_density=1.0))[1].shared_parameters.target_density == 1.0
    assert split_config(shared(target_density=1e-3))[1].shared_parameters.target_density == 1e-3


def test_missing_target_density():
    def drop(leap):
        del leap["shared_parameters"]["target_density"]
    msg = assert_error(lambda: split_config(cfg(drop)), f"{LEAP}.shared_parameters.target_density")
    assert "missing" in msg


def test_block_without_block_size():
    msg = assert_error(lambda: split_config(group("ffn_out", lambda g: g["params"].pop("block_size"))),
                       f"{LEAP}.different_groups.ffn_out.params", "'block'")
    assert "block_size" in msg


def test_block_size_on_other_granularity_or_not_positive():
    assert_error(lambda: split_config(group("ffn_rows", lambda g: g["params"].update(block_size=[4, 4]))),
                 f"{LEAP}.different_groups.ffn_rows.params", "'row'")
    assert_error(lambda: split_config(group("ffn_out", lambda g: g["params"].update(block_size=[0, 8]))),
                 f"{LEAP}.different_groups.ffn_out.params", "[0, 8]")


def test_block_size_not_dividing_the_weight_names_module_and_shape():
    # FFN-out of tiny BERT: logical 32 x 64 (out x in); 5 does not divide 32
    msg = assert_error(lambda: build(group("ffn_out", lambda g: g["params"].update(block_size=[5, 8]))),
                       f"{LEAP}.different_groups.ffn_out.params.block_size", "[5, 8]",
                       "bert.encoder.layer.0.output.dense")
    assert re.search(r"32\s*[x×,]\s*64", msg), msg
    # and the columns side: 64 % 12 != 0
    msg = assert_error(lambda: build(group("ffn_out", lambda g: g["params"].update(block_size=[4, 12]))),
                       f"{LEAP}.different_groups.ffn_out.params.block_size", "[4, 12]", "output.dense")
    assert re.search(r"32\s*[x×,]\s*64", msg), msg


def test_num_heads_not_dividing_the_width():
    assert_error(lambda: build(group("head", lambda g: g["params"].update(num_heads=5))),
                 f"{LEAP}.different_groups.head.params.num_heads", "5", "32")


def test_num_heads_must_be_positive():
    assert_error(lambda: split_config(group("head", lambda g: g["params"].update(num_heads=0))),
                 f"{LEAP}.different_groups.head.params.num_heads", "0")


def test_head_without_related_modules():
    assert_error(lambda: build(group("head", lambda g: g.update(related_modules=[]))),
                 f"{LEAP}.different_groups.head.related_modules")


def test_regex_matching_no_module():
    assert_error(lambda: build(group("ffn_rows", lambda g: g.update(modules=["no_such_layer"]))),
                 f"{LEAP}.different_groups.ffn_rows.modules", "'no_such_layer'")
    assert_error(lambda: build(group("head", lambda g: g.update(related_modules=["self.query", "nope_k", "self.value"]))),
                 f"{LEAP}.different_groups.head.related_modules", "'nope_k'")


def test_regex_matching_only_non_linear_modules():
    assert_error(lambda: build(group("ffn_rows", lambda g: g.update(modules=["LayerNorm"]))),
                 f"{LEAP}.different_groups.ffn_rows.modules", "'LayerNorm'")


def test_invalid_regex():
    assert_error(lambda: build(group("ffn_rows", lambda g: g.update(modules=["inter(["]))),
                 f"{LEAP}.different_groups.ffn_rows.modules", "'inter(['")


def test_module_matched_by_two_groups():
    def overlap(leap):
        leap["different_groups"]["extra"] = {"params": {"granularity": "unstructured"},
                                             "modules": [r"layer\.1\.intermediate"]}
    msg = assert_error(lambda: build(cfg(overlap)), "bert.encoder.layer.1.intermediate.dense")
    assert "'ffn_rows'" in msg and "'extra'" in msg


def test_empty_different_groups():
    assert_error(lambda: split_config(cfg(lambda leap: leap.update(different_groups={}))),
                 f"{LEAP}.different_groups", "{}")


def test_empty_modules_list():
    assert_error(lambda: split_config(group("ffn_rows", lambda g: g.update(modules=[]))),
                 f"{LEAP}.different_groups.ffn_rows.modules", "[]")


def test_json_file_with_duplicate_keys(tmp_path):
    path = tmp_path / "dup.json"
    text = json.dumps(cfg(), indent=1)
    # a duplicate key deep inside the LEAP section
    text = text.replace('"target_density": 0.25', '"target_density": 0.25, "target_density": 0.5')
    assert text.count('"target_density"') == 2
    path.write_text(text)
    for fn in (lambda: load_ds_config(str(path)), lambda: split_config(str(path))):
        assert_error(fn, str(path), "target_density")


def test_invalid_json_file(tmp_path):
    path = tmp_path / "broken.json"
    path.write_text('{"train_batch_size": 8,')
    assert_error(lambda: split_config(str(path)), str(path))


def test_missing_file_path(tmp_path):
    path = str(tmp_path / "does_not_exist.json")
    assert_error(lambda: split_config(path), path)
    assert_error(lambda: build(path), path)


def test_config_of_wrong_type():
    assert_error(lambda: split_config(42), "config", "int")


def test_compression_training_without_leap():
    source = tm.ds_config()
    source["compression_training"] = {"sparse_pruning": {"shared_parameters": {"enabled": True}}}
    msg = assert_error(lambda: split_config(source), "compression_training")
    assert "'leap'" in msg
    source["compression_training"] = "leap"
    assert_error(lambda: split_config(source), "compression_training")


def test_compression_training_without_leap_names_what_it_found():
    source = tm.ds_config()
    source["compression_training"] = {"sparse_pruning": {"shared_parameters": {"enabled": True}}}
    assert_error(lambda: split_config(source), "compression_training", "sparse_pruning")


# ----------------------------------------------------------------------------------------------
# param_groups
# ----------------------------------------------------------------------------------------------

GROUPS_WITH_LEARNED = {
    **HYBRID_ROWS,
    "ffn_rows": {"params": {"granularity": "row", "score": "learned", "allow_dead_weights": True},
                 "modules": [r"intermediate\.dense"]},
}


def _leap_params(model_factory, groups):
    """Attach, and find LEAP's parameters as the ones attach added to the model."""
    model = model_factory()
    before = {id(p) for p in model.parameters()}
    pruner = attach(model, {"compression_training": tm.leap_section(groups, threshold_lr=0.1, score_lr=0.05)})
    added = [(n, p) for n, p in model.named_parameters() if id(p) not in before]
    return model, pruner, before, added


def _ids(ps):
    return [id(p) for p in ps]


def test_param_groups_separate_thresholds_and_scores():
    model, pruner, model_ids, added = _leap_params(tm.tiny_bert, GROUPS_WITH_LEARNED)
    thresholds = {id(p) for n, p in added if n.endswith("threshold")}
    scores = {id(p) for n, p in added if n.endswith("scores")}
    assert len(thresholds) == 6 and len(scores) == 2 and len(added) == 8
    assert all(p.numel() == 64 for n, p in added if n.endswith("scores"))   # one per FFN row

    groups = param_groups(model.parameters(), pruner)
    by_ids = [set(_ids(g["params"])) for g in groups]
    th_groups = [g for g, ids in zip(groups, by_ids) if ids & thresholds]
    sc_groups = [g for g, ids in zip(groups, by_ids) if ids & scores]
    assert len(th_groups) == 1 and set(_ids(th_groups[0]["params"])) == thresholds
    assert len(sc_groups) == 1 and set(_ids(sc_groups[0]["params"])) == scores
    assert th_groups[0]["lr"] == 0.1 and th_groups[0]["weight_decay"] == 0.0
    assert sc_groups[0]["lr"] == 0.05 and sc_groups[0]["weight_decay"] == 0.0
    # the rest: exactly the model's own parameters, none lost, none twice
    all_ids = [i for g in groups for i in _ids(g["params"])]
    assert len(all_ids) == len(set(all_ids))
    assert set(all_ids) == model_ids | thresholds | scores == {id(p) for p in model.parameters()}
    for g, ids in zip(groups, by_ids):
        if g not in th_groups and g not in sc_groups:
            assert not ids & (thresholds | scores)
            assert ids <= model_ids
    # a real optimizer accepts them (it rejects a parameter in two groups)
    opt = torch.optim.AdamW(groups, lr=1e-3, weight_decay=0.01)
    assert [g["lr"] for g in opt.param_groups][-2:] == [0.1, 0.05]


def test_param_groups_keep_the_callers_groups():
    model, pruner, model_ids, added = _leap_params(tm.tiny_bert, GROUPS_WITH_LEARNED)
    leap_ids = set(_ids(p for _, p in added))
    decay = [p for n, p in model.named_parameters() if "bias" not in n and "LayerNorm" not in n]
    no_decay = [p for n, p in model.named_parameters() if "bias" in n or "LayerNorm" in n]
    groups = param_groups([{"params": decay, "weight_decay": 0.01},
                           {"params": no_decay, "weight_decay": 0.0, "lr": 3e-5}], pruner)
    model_groups = [g for g in groups if not set(_ids(g["params"])) & leap_ids]
    assert len(model_groups) == 2
    assert model_groups[0]["weight_decay"] == 0.01
    assert model_groups[1]["weight_decay"] == 0.0 and model_groups[1]["lr"] == 3e-5
    assert set(_ids(model_groups[0]["params"])) == set(_ids(decay)) - leap_ids
    assert set(_ids(model_groups[1]["params"])) == set(_ids(no_decay)) - leap_ids
    all_ids = [i for g in groups for i in _ids(g["params"])]
    assert len(all_ids) == len(set(all_ids)) and set(all_ids) == {id(p) for p in model.parameters()}
    assert not [g for g in groups if not g["params"]]


def test_param_groups_without_learned_scores_has_no_empty_scores_group():
    model, pruner, model_ids, added = _leap_params(tm.tiny_bert, HYBRID_ROWS)
    groups = param_groups(list(model.parameters()), pruner)
    assert all(g["params"] for g in groups)
    leap_groups = [g for g in groups if set(_ids(g["params"])) & set(_ids(p for _, p in added))]
    assert len(leap_groups) == 1
    assert leap_groups[0]["lr"] == 0.1 and leap_groups[0]["weight_decay"] == 0.0
    assert set(_ids(leap_groups[0]["params"])) == set(_ids(p for _, p in added))


def test_param_groups_with_a_directly_built_pruner():
    model = tm.tiny_bert()
    pruner = LeapPruner(model, [GroupRule("q", [r"query"], "row")], target_density=0.3)
    try:
        groups = param_groups(model.parameters(), pruner)
    except (LeapConfigError, ValueError, TypeError):
        return   # a clear error would do
    ids = [i for g in groups for i in _ids(g["params"])]
    assert len(ids) == len(set(ids)) == len(list(model.parameters()))


# ----------------------------------------------------------------------------------------------
# params.multiple_of
# ----------------------------------------------------------------------------------------------


def test_multiple_of_reaches_the_groups():
    config = group("head", lambda g: g["params"].update(multiple_of=2))
    assert {r.name: r.multiple_of for r in split_config(config)[1].rules()} == {"head": 2, "ffn_rows": 1,
                                                                                 "ffn_out": 1}
    pruner = build(config)
    assert {g.plan.rule.granularity: g.module.multiple_of for g in pruner.groups}["head"] == 2


@pytest.mark.parametrize("value", [0, -4])
def test_multiple_of_must_be_positive(value):
    assert_error(lambda: split_config(group("head", lambda g: g["params"].update(multiple_of=value))),
                 f"{LEAP}.different_groups.head.params.multiple_of", repr(value))


@pytest.mark.parametrize("value", [2.0, "8", True])
def test_multiple_of_must_be_an_integer(value):
    assert_error(lambda: split_config(group("head", lambda g: g["params"].update(multiple_of=value))),
                 f"{LEAP}.different_groups.head.params.multiple_of", repr(value))


@pytest.mark.parametrize("name", ["ffn_rows", "ffn_out"])
def test_multiple_of_only_with_head_or_channel(name):
    msg = assert_error(lambda: split_config(group(name, lambda g: g["params"].update(multiple_of=4))),
                       f"{LEAP}.different_groups.{name}.params", "multiple_of")
    assert "'head' or 'channel'" in msg


def test_multiple_of_above_the_units_per_matrix_is_refused():
    # tiny BERT: 4 heads per attention layer, 64 FFN channels
    assert_error(lambda: build(group("head", lambda g: g["params"].update(multiple_of=5))),
                 f"{LEAP}.different_groups.head.params.multiple_of", "5", "4 head units", "<= 4")
    channels = tm.ds_config(leap=tm.leap_section(
        {"ffn": {**tm.FFN_CHANNELS["ffn"], "params": {"granularity": "channel", "multiple_of": 65}}}))
    assert_error(lambda: build(channels), f"{LEAP}.different_groups.ffn.params.multiple_of", "65", "64")
    # equal to the unit count is allowed (then every unit is kept)
    build(group("head", lambda g: g["params"].update(multiple_of=4)))
