"""Structures real models have: grouped-query attention, fused QKV, coupled FFN channels, and
the dead-weight rule for row/column pruning. One process, tiny random models."""
import copy

import pytest
import torch
import torch.nn.functional as F

from leap_ds import GroupRule, LeapConfigError, LeapPruner, attach
from tests import tiny_models as tm

HEADS = {"heads": {"params": {"granularity": "head"}, "modules": [r"o_proj"],
                   "related_modules": ["q_proj", "k_proj", "v_proj"]}}
LLAMA_CHANNELS = {"mlp": {"params": {"granularity": "channel"}, "modules": ["down_proj"],
                          "related_modules": ["gate_proj", "up_proj"]}}


def llama(heads, kv_heads, head_dim, layers=1, seed=0):
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=64, hidden_size=heads * head_dim, num_hidden_layers=layers,
                      num_attention_heads=heads, num_key_value_heads=kv_heads, head_dim=head_dim,
                      intermediate_size=24, max_position_embeddings=32)
    return LlamaForCausalLM(cfg).eval()


def expected_kv_group_rows(heads, kv_heads, head_dim, unit):
    """Independent of leap_ds: Llama's repeat_kv gives query head h the KV head h // (heads / kv)."""
    q_rows = [r for h in range(heads) if h // (heads // kv_heads) == unit
              for r in range(h * head_dim, (h + 1) * head_dim)]
    kv_rows = list(range(unit * head_dim, (unit + 1) * head_dim))
    return q_rows, kv_rows


def _rows_cols(layout, unit):
    one_hot = torch.zeros(layout.num_units)
    one_hot[unit] = 1
    m = layout.expand(one_hot).expand(layout.rows, layout.cols)
    return (sorted(torch.nonzero(m.any(1)).flatten().tolist()),
            sorted(torch.nonzero(m.any(0)).flatten().tolist()))


@pytest.mark.parametrize("heads,kv_heads,head_dim", [(9, 3, 64), (32, 8, 8), (8, 2, 4), (4, 4, 8)],
                         ids=["smollm2", "llama-32-8", "8-2", "mha"])
def test_head_units_are_kv_groups(heads, kv_heads, head_dim):
    model = llama(heads, kv_heads, head_dim)
    pruner = attach(model, {"compression_training": tm.leap_section(HEADS)})
    (g,) = pruner.groups
    assert g.num_units == kv_heads
    q, k, v, o = g.members
    assert [m.name.split(".")[-1] for m in g.members] == ["q_proj", "k_proj", "v_proj", "o_proj"]
    for unit in range(kv_heads):
        q_rows, kv_rows = expected_kv_group_rows(heads, kv_heads, head_dim, unit)
        assert _rows_cols(q.layout, unit)[0] == q_rows
        assert _rows_cols(k.layout, unit)[0] == kv_rows
        assert _rows_cols(v.layout, unit)[0] == kv_rows
        assert _rows_cols(o.layout, unit)[1] == q_rows   # the query heads' output columns
        assert _rows_cols(q.layout, unit)[1] == list(range(heads * head_dim))


def test_pruning_a_kv_group_equals_deleting_it_by_hand():
    heads, kv_heads, head_dim = 8, 2, 4
    model = llama(heads, kv_heads, head_dim, layers=2, seed=1)
    dense = copy.deepcopy(model)
    pruner = attach(model, {"compression_training": tm.leap_section(HEADS)})
    for g in pruner.groups:   # keep 1 of 2 KV groups: sigmoid(-1) * 2 rounds up to 1
        g.module.threshold.data.fill_(-1.0)
    masks = pruner.unit_masks()
    assert all(int(m.sum()) == 1 for m in masks)
    with torch.no_grad():
        for layer, mask in enumerate(masks):
            (pruned,) = torch.nonzero(mask == 0).flatten().tolist()
            q_rows, kv_rows = expected_kv_group_rows(heads, kv_heads, head_dim, pruned)
            attn = dense.model.layers[layer].self_attn
            attn.q_proj.weight[q_rows] = 0
            attn.k_proj.weight[kv_rows] = 0
            attn.v_proj.weight[kv_rows] = 0
            attn.o_proj.weight[:, q_rows] = 0
    ids = torch.randint(0, 64, (2, 12), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, dense(ids).logits, rtol=1e-5, atol=1e-5)
        assert not torch.allclose(model(ids).logits, llama(heads, kv_heads, head_dim, 2, seed=1)(ids).logits)


def test_head_count_is_read_from_the_config_and_wrong_counts_are_refused():
    model = llama(8, 2, 4)
    with pytest.raises(LeapConfigError, match=r"num_kv_heads.*do not divide|need"):
        attach(model, {"compression_training": tm.leap_section(
            {"heads": {**HEADS["heads"], "params": {"granularity": "head", "num_heads": 8, "num_kv_heads": 3}}})})
    with pytest.raises(LeapConfigError, match="K projection.*num_heads"):
        attach(llama(8, 2, 4), {"compression_training": tm.leap_section(
            {"heads": {**HEADS["heads"], "params": {"granularity": "head", "num_heads": 8, "num_kv_heads": 4}}})})


@pytest.mark.parametrize("related", [[r"attn\.c_attn"], [r"attn\.c_attn"] * 3])
def test_fused_qkv_is_refused_with_a_clear_message(related):
    model = tm.tiny_gpt2()
    rules = [GroupRule("heads", [r"attn\.c_proj"], "head", related_modules=related)]
    with pytest.raises(LeapConfigError, match="fused QKV"):
        LeapPruner(model, rules, target_density=0.5)


def test_channels_remove_whole_ffn_channels_and_the_report_counts_live_weights():
    """After finalize, the weights counted as kept are exactly the non-zero weights that are
    not dead (a producer row whose consumer column is zero, or the reverse)."""
    torch.manual_seed(3)
    model = llama(4, 2, 8, layers=2)
    pruner = attach(model, {"compression_training": tm.leap_section({**HEADS, **LLAMA_CHANNELS})})
    for g in pruner.groups:
        g.module.threshold.data.fill_(-0.4)
    rep = pruner.report()
    pruner.finalize()
    live = 0
    for layer in model.model.layers:
        mlp, attn = layer.mlp, layer.self_attn
        channel_alive = (mlp.gate_proj.weight.ne(0).any(1) & mlp.up_proj.weight.ne(0).any(1)
                         & mlp.down_proj.weight.ne(0).any(0))
        for w, rows in ((mlp.gate_proj.weight, True), (mlp.up_proj.weight, True), (mlp.down_proj.weight, False)):
            alive = channel_alive[:, None] if rows else channel_alive[None, :]
            live += int((w.ne(0) & alive).sum())
        heads_alive = attn.o_proj.weight.ne(0).any(0)   # per query-head column of the output
        q_alive = attn.q_proj.weight.ne(0).any(1) & heads_alive
        kv_alive = q_alive.view(2, -1).any(1).repeat_interleave(8)   # 2 KV groups of 8 rows
        live += int((attn.q_proj.weight.ne(0) & q_alive[:, None]).sum())
        live += int((attn.k_proj.weight.ne(0) & kv_alive[:, None]).sum())
        live += int((attn.v_proj.weight.ne(0) & kv_alive[:, None]).sum())
        live += int((attn.o_proj.weight.ne(0) & q_alive[None, :]).sum())
    assert rep["global_density"] < 0.9
    assert rep["kept_weights"] == live


def test_row_pruning_that_feeds_a_pruned_matrix_is_refused_unless_allowed():
    groups = {"ffn_in": {"params": {"granularity": "row"}, "modules": [r"intermediate\.dense"]},
              "ffn_out": {"params": {"granularity": "column"}, "modules": [r"layer\.\d+\.output\.dense"]}}
    with pytest.raises(LeapConfigError, match=r"ffn_in.*intermediate\.dense.*output\.dense.*channel"):
        attach(tm.tiny_bert(), {"compression_training": tm.leap_section(groups)})
    groups["ffn_in"]["params"]["allow_dead_weights"] = True
    groups["ffn_out"]["params"]["allow_dead_weights"] = True
    attach(tm.tiny_bert(), {"compression_training": tm.leap_section(groups)})


def test_channel_widths_that_disagree_are_refused():
    groups = {"ffn": {"params": {"granularity": "channel"}, "modules": [r"layer\.\d+\.output\.dense"],
                      "related_modules": [r"attention\.self\.query"]}}
    with pytest.raises(LeapConfigError, match="producer.*query.*rows.*consumer.*output.dense"):
        attach(tm.tiny_bert(), {"compression_training": tm.leap_section(groups)})


def test_gpt2_channels_use_conv1d_layout():
    model = tm.tiny_gpt2().eval()
    dense = copy.deepcopy(model)
    groups = {"ffn": {"params": {"granularity": "channel"}, "modules": [r"mlp\.c_proj"],
                      "related_modules": [r"mlp\.c_fc"]}}
    pruner = attach(model, {"compression_training": tm.leap_section(groups)})
    for g in pruner.groups:
        g.module.threshold.data.fill_(0.0)   # keep half the channels
    masks = pruner.unit_masks()
    with torch.no_grad():
        for block, mask in zip(dense.transformer.h, masks):
            gone = mask == 0
            block.mlp.c_fc.weight[:, gone] = 0      # Conv1D stores (in, out)
            block.mlp.c_fc.bias[gone] = 0
            block.mlp.c_proj.weight[gone, :] = 0
    ids = torch.randint(1, 64, (2, 10), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, dense(ids).logits, rtol=1e-5, atol=1e-5)
    assert all(int(m.sum()) == 64 for m in masks)
