"""LeapTrainer on a tiny BERT under DeepSpeed, against the leap_ds.initialize loop; one launch, several runs.

Runs (each rank writes <out>.rank<r>.json):
- errors:    bad LEAP configs through leap_ds.initialize and through LeapTrainer (messages);
- full:      LeapTrainer, --steps steps, a checkpoint after --save-at, then save_model() (the export);
- resumed:   LeapTrainer resumed from that checkpoint to --steps;
- accum:     (--accum-check) gradient accumulation 2 with half the micro batch;
- reference: the leap_ds.initialize loop fed the same global batches in the same order.
With --no-deepspeed only `full` runs, LEAP given by leap_config=: plain Trainer (python, one
process) or DDP (torchrun, gloo on CPU); the test compares the two.
Each run also records what depends on the data and the task loss, which the logged loss
(mostly lambda * L_reg) and the thresholds (Adam moves each by about its lr per step) hardly do:
the task loss of each optimizer step apart from the regulariser (averaged over micro batches and
ranks), logits on a fixed probe batch after training, and all the final parameters (gathered at
ZeRO-3) in <run dir>/final_params.pt.
Trainer's sampler is sequential and accelerate gives rank r the r-th micro batch of each
global batch: rows [r*B/W, (r+1)*B/W), as the reference loop takes them.
"""
import argparse
import copy
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

import deepspeed  # noqa: E402
import deepspeed.comm as dist  # noqa: E402
import torch  # noqa: E402
from transformers import BertForSequenceClassification, TrainerCallback, TrainingArguments  # noqa: E402

import leap_ds  # noqa: E402
from leap_ds.hf import LeapTrainer, LeapTrainingArguments  # noqa: E402
from leap_ds.hf.accelerator import unwrap_optimizer  # noqa: E402
from leap_ds.integration.engine import inner_optimizer  # noqa: E402
from tests import tiny_models as tm  # noqa: E402
from tests.workers import hf_cpu  # noqa: E402,F401  (accelerate + DeepSpeed on CPU ranks)

LR = 1e-3


class RecordLoss(TrainerCallback):
    """The loss of each optimizer step, unrounded, from the Trainer's own logs (logging_steps=1)."""

    def __init__(self):
        self.losses, self.densities, self.reg_terms = [], [], []

    def on_log(self, args, state, control, logs=None, **kwargs):
        if "loss" in logs:
            self.losses.append(logs["loss"])
            self.densities.append(logs["leap/density"])
            self.reg_terms.append(logs["leap/lambda"] * logs["leap/reg_loss"])   # lambda * L_reg in the loss


class TaskLoss:
    """The model's output loss before LEAP adds its regulariser: a forward hook registered
    before LEAP attaches runs before LEAP's own (hooks run in registration order)."""

    def __init__(self, model):
        self.values = []
        model.register_forward_hook(self)

    def __call__(self, module, args, output):
        loss = getattr(output, "loss", None)
        if module.training and torch.is_grad_enabled() and torch.is_tensor(loss):
            self.values.append(float(loss.detach()))
        return output

    def per_step(self, accum):
        """Each optimizer step's task loss: the mean over its micro batches and over the ranks."""
        assert len(self.values) % accum == 0, (len(self.values), accum)
        t = torch.tensor(self.values, dtype=torch.float64).view(-1, accum).mean(1)
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.all_reduce(t)
            t /= torch.distributed.get_world_size()
        return t.tolist()


PROBE = tm.batches(1, 8, seed=7)[0][0]   # a fixed batch no run trains on


def data_dependent(model, run_dir, rank):
    """Logits on the probe batch (eval, LEAP's masks on) and every parameter, gathered at ZeRO-3
    (a collective: every rank calls it); rank 0 writes the parameters to run_dir/final_params.pt."""
    was_training = model.training
    model.eval()
    with torch.no_grad():
        logits = model(input_ids=PROBE).logits.float()
    model.train(was_training)
    with deepspeed.zero.GatheredParameters(list(model.parameters()), modifier_rank=None):
        params = {n: p.detach().float().clone() for n, p in model.named_parameters()}
    path = os.path.join(run_dir, "final_params.pt")
    if rank == 0:
        os.makedirs(run_dir, exist_ok=True)
        torch.save(params, path)
    return {"probe_logits": logits.tolist(), "params_file": path}


def samples(batches):
    return [{"input_ids": ids, "labels": label} for b_ids, b_labels in batches
            for ids, label in zip(b_ids, b_labels)]


def trainer_config(stage, world, global_batch, accum, auto):
    cfg = tm.ds_config(stage, global_batch // world // accum, accum, world,
                       leap=tm.leap_section(tm.HYBRID_BERT), lr=LR)
    if auto:   # what HF examples ship: the Trainer fills these from its arguments
        cfg.update(train_batch_size="auto", train_micro_batch_size_per_gpu="auto", gradient_accumulation_steps="auto")
        cfg["optimizer"]["params"].update(lr="auto", weight_decay="auto")
    return cfg


def run_trainer(a, world, out_dir, accum=1, resume=None, export_dir=None):
    if a.no_deepspeed:
        # no DeepSpeed: LEAP from leap_config=, the optimizer and schedule are the Trainer's own;
        # under torchrun the Trainer wraps the model in DDP (on CPU: use_cpu, gloo, as HF documents;
        # accelerate fails on a backend named for one process)
        ds, leap_config = None, {"compression_training": tm.leap_section(tm.HYBRID_BERT)}
        extra = {} if torch.cuda.is_available() else dict(use_cpu=True, ddp_backend="gloo" if world > 1 else None)
        schedule = "constant_with_warmup"
    else:
        ds, leap_config, extra = trainer_config(a.stage, world, a.global_batch, accum, auto=a.stage == 3), None, {}
        schedule = "constant"   # the DeepSpeed config's WarmupLR schedules
    # ZeRO-3: LeapTrainingArguments, as from_pretrained below partitions the model under their config;
    # ZeRO-2: plain TrainingArguments, LeapTrainer takes the section out
    args = (LeapTrainingArguments if a.stage == 3 and ds else TrainingArguments)(
        output_dir=out_dir, deepspeed=ds, per_device_train_batch_size=a.global_batch // world // accum,
        gradient_accumulation_steps=accum, max_steps=a.steps, learning_rate=LR, weight_decay=0.01,
        lr_scheduler_type=schedule, warmup_steps=tm.WARMUP_STEPS, logging_steps=1, save_strategy="steps",
        save_steps=a.save_at, train_sampling_strategy="sequential", report_to=[], disable_tqdm=True, seed=0,
        **extra)
    # at ZeRO-3 the model is loaded under the Trainer's DeepSpeed config: zero.Init partitions it
    model = BertForSequenceClassification.from_pretrained(a.model_dir) if a.model_dir else tm.tiny_bert()
    partitioned = any(hasattr(p, "ds_tensor") for p in model.parameters())
    task = TaskLoss(model)   # before LeapTrainer attaches LEAP
    record = RecordLoss()
    trainer = LeapTrainer(model=model, args=args, train_dataset=samples(tm.batches(a.steps, a.global_batch)),
                          callbacks=[record], leap_config=leap_config)
    trainer.train(resume_from_checkpoint=resume)
    rep = trainer.leap.report()
    inner = inner_optimizer(unwrap_optimizer(trainer.optimizer))
    # the lrs LEAP's groups get before each step (the schedulers set every group's lr after it)
    from leap_ds.algorithm.pruner import sync_leap_param_groups
    sync_leap_param_groups(inner.param_groups, trainer.leap.reference_lr)
    leap_groups = [{"lr": g["lr"], "weight_decay": g["weight_decay"], "n": len(g["params"])}
                   for g in inner.param_groups if "leap_lr" in g]
    result = {"losses": record.losses, "densities": record.densities, "reg_terms": record.reg_terms, "report": rep,
              "thresholds": [g["threshold"] for g in rep["groups"]], "leap_step": trainer.leap.step,
              "global_step": trainer.state.global_step, "partitioned_at_load": partitioned,
              "leap_groups": leap_groups, "log_keys": sorted(trainer.state.log_history[0]),
              "wrapped_in": type(trainer.model_wrapped).__name__, "task_losses": task.per_step(accum),
              **data_dependent(trainer.model, out_dir, int(os.environ.get("RANK", 0)))}
    if export_dir:
        trainer.save_model(export_dir)
    return result


def run_reference(a, world, rank):
    cfg = tm.ds_config(a.stage, a.global_batch // world, 1, world, leap=tm.leap_section(tm.HYBRID_BERT), lr=LR)
    model = tm.tiny_bert()
    task = TaskLoss(model)   # before leap_ds.initialize attaches LEAP
    engine, *_ = leap_ds.initialize(model=model, config=cfg)
    per_rank = a.global_batch // world
    losses, densities, reg_terms = [], [], []
    for ids, labels in tm.batches(a.steps, a.global_batch):
        rows = slice(rank * per_rank, (rank + 1) * per_rank)
        out = engine(input_ids=ids[rows], labels=labels[rows])
        engine.backward(out.loss)
        engine.step()
        loss = out.loss.detach().float().clone()
        dist.all_reduce(loss)
        losses.append(loss.item() / world)
        step_rep = engine.leap.report()
        densities.append(step_rep["global_density"])
        reg_terms.append(step_rep["lambda"] * step_rep["reg_loss"])
    rep = leap_ds.report(engine)
    extra = data_dependent(engine.module, os.path.join(a.tmp, "reference"), rank)
    engine.destroy()
    return {"losses": losses, "densities": densities, "reg_terms": reg_terms,
            "thresholds": [g["threshold"] for g in rep["groups"]], "report": rep, "leap_step": engine.leap.step, "task_losses": task.per_step(1), **extra}


BAD_CONFIGS = {
    "unknown_key": lambda leap: leap["leap"]["shared_parameters"].update(target_densty=0.3),
    "no_match": lambda leap: leap["leap"]["different_groups"]["ffn"].update(modules=[r"no\.such\.module"]),
    "range": lambda leap: leap["leap"]["shared_parameters"].update(target_density=1.5),
}


def config_errors(a, world):
    found = {}
    for name, spoil in BAD_CONFIGS.items():
        leap = tm.leap_section(tm.HYBRID_BERT)
        spoil(leap)
        cfg = tm.ds_config(a.stage, a.global_batch // world, 1, world, leap=leap, lr=LR)
        messages = {}
        try:
            leap_ds.initialize(model=tm.tiny_bert(), config=copy.deepcopy(cfg))
        except leap_ds.LeapConfigError as e:
            messages["engine"] = str(e)
        try:
            args = TrainingArguments(output_dir=os.path.join(a.tmp, "bad"), deepspeed=copy.deepcopy(cfg),
                                     per_device_train_batch_size=a.global_batch // world, learning_rate=LR,
                                     warmup_steps=tm.WARMUP_STEPS, weight_decay=0.01, report_to=[])
            LeapTrainer(model=tm.tiny_bert(), args=args, train_dataset=[])
        except leap_ds.LeapConfigError as e:
            messages["trainer"] = str(e)
        found[name] = messages
    return found


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--stage", type=int, default=2)
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--save-at", type=int, default=3)
    ap.add_argument("--global-batch", type=int, default=8)
    ap.add_argument("--model-dir", default=None, help="load the tiny BERT with from_pretrained (ZeRO-3: zero.Init)")
    ap.add_argument("--accum-check", action="store_true")
    ap.add_argument("--errors-check", action="store_true")
    ap.add_argument("--no-deepspeed", action="store_true",
                    help="only the full run, without DeepSpeed: one process (python) or DDP (torchrun)")
    ap.add_argument("--tmp", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--local_rank", type=int, default=-1)
    a = ap.parse_args()
    if a.no_deepspeed:   # the Trainer sets up torch.distributed itself under torchrun
        rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
        result = {"rank": rank, "world": world,
                  "full": run_trainer(a, world, os.path.join(a.tmp, "full"), export_dir=os.path.join(a.tmp, "export"))}
        with open(f"{a.out}.rank{rank}.json", "w") as f:
            json.dump(result, f)
        return
    deepspeed.init_distributed(dist_backend="gloo")
    rank, world = dist.get_rank(), dist.get_world_size()

    result = {"rank": rank, "world": world}
    if a.errors_check:
        result["errors"] = config_errors(a, world)
    full_dir = os.path.join(a.tmp, "full")
    result["full"] = run_trainer(a, world, full_dir, export_dir=os.path.join(a.tmp, "export"))
    checkpoint = os.path.join(full_dir, f"checkpoint-{a.save_at}")
    with open(os.path.join(checkpoint, "leap_state.json")) as f:
        result["checkpoint_leap_state"] = json.load(f)
    result["resumed"] = run_trainer(a, world, os.path.join(a.tmp, "resumed"), resume=checkpoint)
    if a.accum_check:
        result["accum"] = run_trainer(a, world, os.path.join(a.tmp, "accum"), accum=2)
    result["reference"] = run_reference(a, world, rank)
    with open(f"{a.out}.rank{rank}.json", "w") as f:
        json.dump(result, f)
    dist.barrier()


if __name__ == "__main__":
    torch.set_num_threads(1)
    main()
