"""Tiny random-initialised transformers and LEAP configs for fast tests."""
import copy

import torch

ATTN_HEADS = {"head": {"params": {"granularity": "head"},
                       "modules": [r"attention\.output\.dense"],
                       "related_modules": ["self.query", "self.key", "self.value"]}}


def tiny_bert(seed=0, num_labels=2):
    from transformers import BertConfig, BertForSequenceClassification
    torch.manual_seed(seed)
    cfg = BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                     intermediate_size=64, max_position_embeddings=32, num_labels=num_labels,
                     hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    return BertForSequenceClassification(cfg)


def tiny_gpt2(seed=0):
    from transformers import GPT2Config, GPT2ForSequenceClassification
    torch.manual_seed(seed)
    cfg = GPT2Config(vocab_size=64, n_embd=32, n_layer=2, n_head=4, n_positions=32, num_labels=2,
                     resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, pad_token_id=0)
    return GPT2ForSequenceClassification(cfg)


def tiny_llama(seed=0):
    from transformers import LlamaConfig, LlamaForSequenceClassification
    torch.manual_seed(seed)
    # grouped-query attention: 4 query heads share 2 key/value heads
    cfg = LlamaConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, intermediate_size=64, max_position_embeddings=32,
                      num_labels=2, pad_token_id=0)
    return LlamaForSequenceClassification(cfg)


MODELS = {"bert": tiny_bert, "gpt2": tiny_gpt2, "llama": tiny_llama}


def leap_section(groups, target=0.3, **shared):
    base = {"target_density": target, "threshold_init": 3.0, "threshold_lr": 0.1, "score_lr": 0.05}
    base.update(shared)
    return {"leap": {"shared_parameters": base, "different_groups": copy.deepcopy(groups)}}


FFN_CHANNELS = {"ffn": {"params": {"granularity": "channel"}, "modules": [r"layer\.\d+\.output\.dense"],
                        "related_modules": [r"intermediate\.dense"]}}

# every structure at once: heads in layer 0, 4x8 blocks in layer 1's attention, FFN channels
HYBRID_BERT = {
    "head": {**ATTN_HEADS["head"], "modules": [r"layer\.0\.attention\.output\.dense"]},
    "attn_blocks": {"params": {"granularity": "block", "block_size": [4, 8]},
                    "modules": [r"layer\.1\.attention\.(self\.(query|key|value)|output\.dense)"]},
    **FFN_CHANNELS,
}


WARMUP_STEPS = 3   # the tiny configs' WarmupLR (HF Trainer's warmup_steps must match it)


def ds_config(stage=0, micro_batch=8, grad_accum=1, world=1, leap=None, lr=1e-3):
    cfg = {
        "train_batch_size": micro_batch * grad_accum * world,
        "train_micro_batch_size_per_gpu": micro_batch,
        "gradient_accumulation_steps": grad_accum,
        "optimizer": {"type": "AdamW", "params": {"lr": lr, "weight_decay": 0.01, "torch_adam": True}},
        # a schedule that sets one lr for every group: LEAP's lrs are re-scaled at every stage
        "scheduler": {"type": "WarmupLR", "params": {"warmup_min_lr": 0.0, "warmup_max_lr": lr,
                                                    "warmup_num_steps": WARMUP_STEPS}},
        "zero_optimization": {"stage": stage},
        "steps_per_print": 10 ** 6,
        "wall_clock_breakdown": False,
    }
    if stage == 3:
        cfg["zero_optimization"]["stage3_param_persistence_threshold"] = 0
    if stage > 0:
        cfg["zero_allow_untested_optimizer"] = True
    if leap is not None:
        cfg["compression_training"] = leap
    return cfg


def batches(num, batch_size, seq=12, vocab=64, seed=123):
    """A fixed stream of global batches whose labels depend on the tokens (learnable)."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(num):
        ids = torch.randint(1, vocab, (batch_size, seq), generator=g)
        labels = (ids[:, :4].sum(1) % 2).long()
        out.append((ids, labels))
    return out
