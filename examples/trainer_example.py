"""LEAP in a Hugging Face Trainer script: a causal LM pruned to a target density.

The only changes to a Trainer script: ``LeapTrainer`` and ``LeapTrainingArguments``
from ``leap_ds.hf`` instead of ``Trainer`` and ``TrainingArguments``, and a
``compression_training.leap`` section in the DeepSpeed config given to
``--deepspeed`` (``"auto"`` values keep working). ``LeapTrainingArguments``
takes the section out as the arguments are read, so a model loaded afterwards
under ZeRO-3 (``from_pretrained`` partitions it) works; with plain
``TrainingArguments`` the trainer takes it out, which is enough at ZeRO 0-2.
``trainer.save_model()`` after ``train()`` writes the pruned model (masks in the
weights), loadable by plain transformers, and ``leap_report.json``.

    deepspeed --num_gpus 2 examples/trainer_example.py --deepspeed ds_config.json --output_dir out
    torchrun --nproc_per_node 2 examples/trainer_example.py --deepspeed ds_config.json --output_dir out
    python examples/trainer_example.py --leap_config leap.json --output_dir out      # no DeepSpeed

``--model`` is a causal-LM directory or hub name; without it a tiny random
Llama is built (a smoke run, offline). ``--text_file``: one training text per
line (needs the model's tokenizer); without it, random token sequences.
Without ``--deepspeed`` and ``--leap_config`` the script uses its own example
config (unstructured pruning of every attention and MLP projection, target 0.5).
"""
import argparse
import json
import os

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

# was: from transformers import Trainer, TrainingArguments
from leap_ds.hf import LeapTrainer, LeapTrainingArguments as TrainingArguments

EXAMPLE_LEAP = {"leap": {
    "shared_parameters": {"target_density": 0.5, "threshold_init": 3.0, "threshold_lr": 0.1},
    "different_groups": {"proj": {"params": {"granularity": "unstructured"},
                                  "modules": [r"layers\.\d+\.(self_attn|mlp)\.\w+_proj$"]}}}}

EXAMPLE_DEEPSPEED = {   # what --deepspeed usually points to, with "auto" for the Trainer to fill
    "train_batch_size": "auto", "train_micro_batch_size_per_gpu": "auto", "gradient_accumulation_steps": "auto",
    "optimizer": {"type": "AdamW", "params": {"lr": "auto", "weight_decay": "auto", "torch_adam": True}},
    "zero_optimization": {"stage": 2}, "zero_allow_untested_optimizer": True,
    "compression_training": EXAMPLE_LEAP,
}


def tiny_llama():
    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(vocab_size=128, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                        num_key_value_heads=2, intermediate_size=128, max_position_embeddings=64))


def dataset(args, model):
    if args.text_file:
        tokenizer = AutoTokenizer.from_pretrained(args.model)
        lines = [line.strip() for line in open(args.text_file) if line.strip()]
        ids = tokenizer(lines, truncation=True, max_length=args.seq_len, padding="max_length",
                        return_tensors="pt")["input_ids"]
    else:
        g = torch.Generator().manual_seed(1)
        ids = torch.randint(1, model.config.vocab_size, (args.samples, args.seq_len), generator=g)
    return [{"input_ids": row, "labels": row} for row in ids]


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None)
    ap.add_argument("--text_file", default=None)
    ap.add_argument("--deepspeed", default=None, help="DeepSpeed config JSON with compression_training.leap")
    ap.add_argument("--leap_config", default=None, help="without DeepSpeed: a JSON holding compression_training.leap")
    ap.add_argument("--output_dir", required=True)
    ap.add_argument("--max_steps", type=int, default=20)
    ap.add_argument("--batch_size", type=int, default=4)
    ap.add_argument("--samples", type=int, default=64)
    ap.add_argument("--seq_len", type=int, default=32)
    ap.add_argument("--local_rank", type=int, default=-1)
    args = ap.parse_args()

    leap_config = args.leap_config
    deepspeed_config = args.deepspeed
    if deepspeed_config is None and leap_config is None:
        deepspeed_config = EXAMPLE_DEEPSPEED if int(os.environ.get("WORLD_SIZE", "0")) else None
        leap_config = None if deepspeed_config else {"compression_training": EXAMPLE_LEAP}

    training_args = TrainingArguments(
        output_dir=args.output_dir, deepspeed=deepspeed_config, per_device_train_batch_size=args.batch_size,
        max_steps=args.max_steps, learning_rate=1e-3, weight_decay=0.01, logging_steps=5,
        save_steps=max(1, args.max_steps // 2), report_to=[])
    # created after TrainingArguments: at ZeRO-3, from_pretrained partitions the model (zero.Init)
    model = AutoModelForCausalLM.from_pretrained(args.model) if args.model else tiny_llama()
    trainer = LeapTrainer(model=model, args=training_args, train_dataset=dataset(args, model),
                          leap_config=leap_config)
    trainer.train()
    trainer.save_model()     # after train(): LEAP finalized, a plain transformers model
    if trainer.is_world_process_zero():
        report = json.load(open(os.path.join(args.output_dir, "leap_report.json")))
        print(f"density {report['global_density']:.3f} (target {report['target_density']}), "
              f"model in {args.output_dir}")


if __name__ == "__main__":
    main()
