"""Train tiny causal LMs with the causal-LM task's loss (distillation from the unpruned model) under
every shipped Llama config; write one JSON trajectory per rank.

Rank r of W takes rows [r*B/W, (r+1)*B/W) of each global batch, so runs with different rank counts
see the same global batches and can be compared.
"""
import argparse
import copy
import json
import os
import sys
from types import SimpleNamespace

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, ROOT)

import deepspeed  # noqa: E402
import deepspeed.comm as dist  # noqa: E402
import torch  # noqa: E402

import leap_ds  # noqa: E402
from leap_ds.apps.tasks.causal_lm import CausalLMTask  # noqa: E402
from tests import tiny_models as tm  # noqa: E402

VOCAB = 64
GPT2_GROUPS = {"attention": {"params": {"granularity": "unstructured"}, "modules": [r"h\.\d+\.attn\.(c_attn|c_proj)$"]},
               "ffn": {"params": {"granularity": "channel"}, "modules": [r"h\.\d+\.mlp\.c_proj$"],
                       "related_modules": [r"mlp\.c_fc$"]}}


def tiny_causal_lm(kind, seed=0):
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM, Qwen2Config, \
        Qwen2ForCausalLM
    torch.manual_seed(seed)
    common = dict(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, intermediate_size=64, max_position_embeddings=32)
    if kind == "llama":      # grouped-query attention, tied embeddings
        return LlamaForCausalLM(LlamaConfig(**common, tie_word_embeddings=True))
    if kind == "qwen2":      # grouped-query attention with q/k/v biases
        return Qwen2ForCausalLM(Qwen2Config(**common, tie_word_embeddings=False))
    return GPT2LMHeadModel(GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=32,
                                      resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                                      bos_token_id=None, eos_token_id=None))


def cases():
    """(model kind, config name, LEAP groups): every shipped Llama config on Llama and Qwen2; GPT-2's own."""
    out = []
    for name in ("llama_unstructured", "llama_structured", "llama_hybrid"):
        groups = json.load(open(os.path.join(ROOT, "ds_configs", f"{name}.json")))
        for kind in ("llama", "qwen2"):
            out.append((kind, name, groups["compression_training"]))
    out.append(("gpt2", "gpt2_hybrid", {"leap": {
        "shared_parameters": groups["compression_training"]["leap"]["shared_parameters"],
        "different_groups": GPT2_GROUPS}}))
    return out


def run_case(kind, leap, stage, steps, rank, world, global_batch=8, seq=16):
    model = tiny_causal_lm(kind)
    teacher = copy.deepcopy(model).eval().requires_grad_(False)
    cfg = tm.ds_config(stage, global_batch // world, 1, world, leap=copy.deepcopy(leap), lr=1e-3)
    engine, *_ = leap_ds.initialize(model=model, config=cfg)
    task = CausalLMTask(SimpleNamespace(alpha_ce=0.1, alpha_kd=0.9, temperature=2.0), "unused")
    g = torch.Generator().manual_seed(123)
    per_rank = global_batch // world
    losses, densities = [], []
    for _ in range(steps):
        ids = torch.randint(0, VOCAB, (global_batch, seq), generator=g)[rank * per_rank:(rank + 1) * per_rank]
        loss = task.loss(engine, {"input_ids": ids}, teacher)
        engine.backward(loss)
        engine.step()
        mean = loss.detach().clone()
        dist.all_reduce(mean)
        losses.append(mean.item() / world)
        densities.append(leap_ds.report(engine)["global_density"])
    rep = leap_ds.report(engine)
    engine.destroy()
    return {"losses": losses, "densities": densities, "thresholds": [g["threshold"] for g in rep["groups"]],
            "groups": [g["name"] for g in rep["groups"]]}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--stage", type=int, default=0)
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--out", required=True)
    ap.add_argument("--local_rank", type=int, default=-1)
    args = ap.parse_args()
    deepspeed.init_distributed(dist_backend="gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    result = {f"{kind}/{name}": run_case(kind, leap, args.stage, args.steps, rank, world)
              for kind, name, leap in cases()}
    with open(f"{args.out}.rank{rank}.json", "w") as f:
        json.dump(result, f)
    dist.barrier()


if __name__ == "__main__":
    main()
