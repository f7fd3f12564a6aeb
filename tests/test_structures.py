"""Structures real models have: grouped-query attention, fused QKV, coupled FFN channels, and
the dead-weight rule for row/column pruning. One process, tiny random models."""
import copy

import pytest
import torch

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


def test_device_side_k_equals_the_host_formula():
    import random
    from leap_ds.algorithm.mask import kept_units, kept_units_tensor
    rng = random.Random(0)
    for _ in range(5000):
        theta, n = rng.uniform(-8, 8), rng.choice([3, 12, 64, 1536, 2304, 589824])
        t = torch.tensor([theta])
        assert int(kept_units_tensor(t, n)) == kept_units(float(t), n)


def test_uniform_groups_share_one_threshold_and_keep_the_same_count_per_layer():
    model = llama(4, 2, 8, layers=3, seed=5)
    groups = {k: {**v, "params": {**v["params"], "uniform": True}} for k, v in {**HEADS, **LLAMA_CHANNELS}.items()}
    pruner = attach(model, {"compression_training": tm.leap_section(groups)})
    assert len(pruner.groups) == 6                       # one handle per layer and structure ...
    assert len(list(pruner.parameters())) == 2           # ... but one threshold per structure
    assert len({id(g.module) for g in pruner.groups}) == 2
    for p in pruner.parameters():
        p.data.fill_(-0.6)
    masks = pruner.unit_masks()
    channel_masks = [m for g, m in zip(pruner.groups, masks) if g.plan.rule.granularity == "channel"]
    assert len({int(m.sum()) for m in channel_masks}) == 1            # the same count in every layer
    assert len({tuple(m.tolist()) for m in channel_masks}) > 1        # each layer chooses its own
    for layer, m in zip(model.model.layers, channel_masks):           # by its own channel norms
        w = layer.mlp
        norms = (w.gate_proj.weight.pow(2).sum(1) + w.up_proj.weight.pow(2).sum(1)
                 + w.down_proj.weight.pow(2).sum(0)).detach()
        kept = int(m.sum())
        assert set(torch.topk(norms, kept).indices.tolist()) == set(torch.nonzero(m).flatten().tolist())
    # training: one regulariser gradient, summed over the layers sharing the threshold
    model.train()
    out = model(input_ids=torch.randint(0, 64, (2, 8)), labels=torch.randint(0, 64, (2, 8)))
    out.loss.backward()
    assert all(p.grad is not None and float(p.grad) != 0.0 for p in pruner.parameters())
    rep = pruner.report()
    assert rep["kept_weights"] == sum(g["kept_weights"] for g in rep["groups"])
    assert "leap_uniform_mlp" in dict(model.model.named_children())   # not inside the layer list


def test_uniform_needs_equal_unit_counts():
    from transformers import BertConfig, BertForSequenceClassification
    model = BertForSequenceClassification(BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2,
                                                     num_attention_heads=4, intermediate_size=64))
    model.bert.encoder.layer[1].intermediate.dense = torch.nn.Linear(32, 48)
    model.bert.encoder.layer[1].output.dense = torch.nn.Linear(48, 32)
    groups = {"ffn": {**tm.FFN_CHANNELS["ffn"], "params": {"granularity": "channel", "uniform": True}}}
    with pytest.raises(LeapConfigError, match="uniform.*different unit counts"):
        attach(model, {"compression_training": tm.leap_section(groups)})


def _count_host_reads(monkeypatch, fn):
    """Calls that read a tensor back to the host (a device synchronisation on a GPU)."""
    count = {"n": 0}
    originals = {name: getattr(torch.Tensor, name) for name in (
        "item", "tolist", "__float__", "__int__", "__bool__", "__index__", "cpu", "numpy", "nonzero")}
    for name, original in originals.items():
        def counted(self, *a, _original=original, **k):
            count["n"] += 1
            return _original(self, *a, **k)
        setattr(torch.Tensor, name, counted)
    try:
        fn()
    finally:
        for name, original in originals.items():
            setattr(torch.Tensor, name, original)
    return count["n"]


@pytest.mark.parametrize("layers", [2, 4])
def test_host_reads_per_step_do_not_grow_with_the_model(monkeypatch, layers):
    """The device path (what a GPU runs): masks, k and cuts stay on the device; one read per
    training forward (lambda needs L_reg's value), none in an evaluation forward or in LEAP's
    step."""
    from transformers import BertConfig, BertForSequenceClassification
    from leap_ds.algorithm import mask
    monkeypatch.setattr(mask, "HOST_SELECTION_ON_CPU", False)
    torch.manual_seed(0)
    model = BertForSequenceClassification(BertConfig(
        vocab_size=64, hidden_size=32, num_hidden_layers=layers, num_attention_heads=4, intermediate_size=64,
        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0))
    groups = {**tm.ATTN_HEADS, **tm.FFN_CHANNELS,
              "pooler": {"params": {"granularity": "unstructured"}, "modules": [r"pooler\.dense"]}}
    pruner = attach(model, {"compression_training": tm.leap_section(groups)})
    ids, labels = torch.randint(1, 64, (4, 8)), torch.tensor([0, 1, 0, 1])

    def train_forward_backward():
        model(input_ids=ids, labels=labels).loss.backward()

    def evaluate():
        with torch.no_grad():
            model(input_ids=ids)

    reads = [_count_host_reads(monkeypatch, train_forward_backward),
             _count_host_reads(monkeypatch, pruner.on_optimizer_step),
             _count_host_reads(monkeypatch, train_forward_backward),   # refreshes the scores first
             _count_host_reads(monkeypatch, evaluate)]
    assert reads == [1, 0, 1, 0], reads


def test_device_cut_equals_host_topk():
    from leap_ds.algorithm.mask import topk_bool, topk_bool_by_cut
    g = torch.Generator().manual_seed(1)
    for n, k in [(1000, 1), (1000, 999), (5000, 2500), (70000, 12345)]:
        values = torch.randint(0, 50, (n,), generator=g).float()   # many ties at the cut
        assert torch.equal(topk_bool_by_cut(values, torch.tensor(k)), topk_bool(values, k))
    assert not topk_bool_by_cut(torch.ones(10), torch.tensor(0)).any()


def test_unit_scores_follow_a_loaded_state_dict():
    model = llama(4, 2, 8, layers=1, seed=6)
    pruner = attach(model, {"compression_training": tm.leap_section(LLAMA_CHANNELS)})
    pruner.groups[0].module.threshold.data.fill_(0.0)   # keep half the channels
    before = pruner.unit_masks()[0]
    state = {k: v.clone() for k, v in model.state_dict().items()}
    down = state["model.layers.0.mlp.down_proj.weight"]
    flipped = torch.where(before.bool(), torch.zeros(()), torch.full((), 5.0))   # boost the pruned ones
    state["model.layers.0.mlp.down_proj.weight"] = down + flipped[None, :]
    model.load_state_dict(state)
    after = pruner.unit_masks()[0]
    assert torch.equal(after, 1 - before)
