"""LEAP in a Hugging Face Accelerate training loop.

The changes to an Accelerate script: ``LeapAccelerator`` instead of
``Accelerator``, and ``pruner = accelerator.attach_leap(model)`` before the
optimizer, which is built from ``leap_ds.param_groups(model.parameters(), pruner)``
(or is accelerate's ``DummyOptim`` when the DeepSpeed config has an optimizer).
The DeepSpeed config (``accelerate launch --config_file``, or
``DeepSpeedPlugin(hf_ds_config=...)`` as here) holds ``compression_training.leap``.
The model's output loss (labels given) carries LEAP's regulariser;
``accelerator.save_state`` / ``load_state`` carry LEAP's counters;
``pruner.finalize()`` puts the masks into the weights before export.

    accelerate launch --config_file accel_deepspeed.yaml examples/accelerate_example.py --output_dir out
    torchrun --nproc_per_node 2 examples/accelerate_example.py --deepspeed ds_config.json --output_dir out

Without ``--deepspeed`` the script uses its own example config (ZeRO-2, head
pruning of a tiny random BERT classifier on random tokens: a smoke run, offline).
"""
import argparse
import json
import os

import torch
from accelerate.utils import DeepSpeedPlugin, DummyOptim
from transformers import BertConfig, BertForSequenceClassification

from leap_ds.hf import LeapAccelerator, plain_state_dict   # was: from accelerate import Accelerator

EXAMPLE_DEEPSPEED = {
    "train_micro_batch_size_per_gpu": 8, "gradient_accumulation_steps": 1,
    "optimizer": {"type": "AdamW", "params": {"lr": 1e-3, "weight_decay": 0.01, "torch_adam": True}},
    "zero_optimization": {"stage": 2}, "zero_allow_untested_optimizer": True,
    "compression_training": {"leap": {
        "shared_parameters": {"target_density": 0.5, "threshold_init": 1.5, "threshold_lr": 0.1},
        "different_groups": {"heads": {"params": {"granularity": "head"},
                                       "modules": [r"attention\.output\.dense"],
                                       "related_modules": ["self.query", "self.key", "self.value"]}}}},
}


def data(steps, batch, seed=1):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, 64, (steps * batch, 12), generator=g)
    labels = (ids[:, :4].sum(1) % 2).long()
    return torch.utils.data.TensorDataset(ids, labels)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--deepspeed", default=None, help="DeepSpeed config JSON with compression_training.leap")
    ap.add_argument("--output_dir", required=True)
    ap.add_argument("--steps", type=int, default=20)
    args = ap.parse_args()

    plugin = DeepSpeedPlugin(hf_ds_config=args.deepspeed or EXAMPLE_DEEPSPEED)
    accelerator = LeapAccelerator(deepspeed_plugin=plugin)    # was: Accelerator(deepspeed_plugin=plugin)
    torch.manual_seed(0)
    model = BertForSequenceClassification(BertConfig(
        vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
        max_position_embeddings=32, num_labels=2))
    pruner = accelerator.attach_leap(model)                   # new: before the optimizer
    micro = plugin.deepspeed_config["train_micro_batch_size_per_gpu"]
    loader = torch.utils.data.DataLoader(data(args.steps * accelerator.num_processes, micro), batch_size=micro)
    optimizer = DummyOptim(model.parameters())                # the config's optimizer; LEAP's groups added
    model, optimizer, loader = accelerator.prepare(model, optimizer, loader)

    model.train()
    for step, (ids, labels) in enumerate(loader, 1):
        loss = model(input_ids=ids, labels=labels).loss     # carries lambda * L_reg
        accelerator.backward(loss)
        optimizer.step()
        optimizer.zero_grad()
        if step == args.steps // 2:
            accelerator.save_state(os.path.join(args.output_dir, "state"))   # LEAP's counters too
        rep = pruner.report()                                 # collective: every rank
        if step % 5 == 0:
            accelerator.print(f"step {step} loss {loss.item():.4f} density {rep['global_density']:.3f} "
                              f"lambda {rep['lambda']:.1f}")

    report = pruner.report()
    pruner.finalize()                                         # collective: masks into the weights
    engine = model if accelerator.state.deepspeed_plugin is not None else None
    state = plain_state_dict(accelerator.unwrap_model(model), engine)
    if accelerator.is_main_process:
        export = os.path.join(args.output_dir, "model")
        accelerator.unwrap_model(model).save_pretrained(export, state_dict=state)
        with open(os.path.join(export, "leap_report.json"), "w") as f:
            json.dump(report, f, indent=1)
        print(f"density {report['global_density']:.3f} (target {report['target_density']}), model in {export}")
    accelerator.wait_for_everyone()


if __name__ == "__main__":
    main()
