"""Every way users drive a model with LEAP attached either works like the supported path or
stops with a clear error: copies, pickling, other hooks, activation checkpointing, backward
without the regulariser, learning-rate schedulers. One process (the multi-rank paths are in
test_distributed.py)."""
import copy
import io
import pickle

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import leap_ds
from leap_ds import LeapConfigError, LeapUsageError
from leap_ds.algorithm.masked import LeapMasked
from tests import tiny_models as tm

SECTION = {"compression_training": tm.leap_section(tm.HYBRID_BERT, target=0.3)}
IDS = torch.randint(1, 64, (4, 10), generator=torch.Generator().manual_seed(5))
LABELS = torch.tensor([0, 1, 1, 0])


def attached_bert(seed=0):
    model = tm.tiny_bert(seed=seed).eval()
    pruner = leap_ds.attach(model, SECTION)
    for g in pruner.groups:
        g.module.threshold.data.fill_(-0.3)   # prune visibly
    return model, pruner


def logits(model):
    with torch.no_grad():
        return model(input_ids=IDS).logits


@pytest.mark.parametrize("how", ["deepcopy", "pickle", "torch.save"])
def test_copies_mask_their_own_weights(how):
    model, pruner = attached_bert()
    before = logits(model)
    if how == "deepcopy":
        clone = copy.deepcopy(model)
    elif how == "pickle":
        clone = pickle.loads(pickle.dumps(model))
    else:
        buf = io.BytesIO()
        torch.save(model, buf)
        buf.seek(0)
        clone = torch.load(buf, weights_only=False)
    assert sum(isinstance(m, LeapMasked) for m in clone.modules()) == sum(
        isinstance(m, LeapMasked) for m in model.modules()) > 0
    torch.testing.assert_close(logits(clone), before, rtol=0, atol=0)
    assert list(clone.state_dict()) == list(model.state_dict())
    with torch.no_grad():   # the copy computes with its own weights and thresholds ...
        clone.bert.encoder.layer[0].intermediate.dense.weight.mul_(3.0)
        for p in clone.parameters():
            if p.shape == (1,):
                p.fill_(0.5)
    changed = logits(clone)
    assert not torch.allclose(changed, before)
    torch.testing.assert_close(logits(model), before, rtol=0, atol=0)   # ... the original is untouched
    # and it still trains: its own regulariser, its own thresholds
    clone.train()
    out = clone(input_ids=IDS, labels=LABELS)
    out.loss.backward()
    clone_thresholds = [m.threshold for m in clone.modules() if type(m).__name__ == "LeapGroup"]
    assert all(t.grad is not None for t in clone_thresholds)
    assert all(g.module.threshold.grad is None for g in pruner.groups)


def test_state_dict_keys_are_the_model_keys_plus_leap_parameters():
    plain = tm.tiny_bert()
    model, _ = attached_bert()
    keys, plain_keys = set(model.state_dict()), set(plain.state_dict())
    assert plain_keys <= keys
    assert all(".leap_" in k for k in keys - plain_keys)


def test_masks_compose_with_other_forward_hooks():
    model, pruner = attached_bert()
    layer = model.bert.encoder.layer[0].intermediate.dense
    base = logits(model)
    handle = layer.register_forward_pre_hook(lambda m, args: (args[0] * 2.0,))
    doubled = logits(model)
    handle.remove()
    assert not torch.allclose(doubled, base)
    # the same as the masked layer applied to twice its input
    x = torch.randn(3, layer.in_features)
    with torch.no_grad():
        h = layer.register_forward_pre_hook(lambda m, args: (args[0] * 2.0,))
        torch.testing.assert_close(layer(x), layer.__class__.forward(layer, 2.0 * x))
        h.remove()
    # a hook registered before LEAP was attached still runs
    fresh = tm.tiny_bert()
    calls = []
    fresh.bert.encoder.layer[0].output.dense.register_forward_hook(lambda m, a, o: calls.append(1))
    leap_ds.attach(fresh, SECTION)
    logits(fresh)
    assert calls == [1]


def test_linear_subclasses_and_wrapped_forwards_are_refused():
    class QuantLinear(nn.Linear):
        def forward(self, x):
            return super().forward(x.round())
    model = tm.tiny_bert()
    model.bert.encoder.layer[0].intermediate.dense.__class__ = QuantLinear
    with pytest.raises(LeapConfigError, match="QuantLinear.*subclass of nn.Linear"):
        leap_ds.attach(model, SECTION)
    model = tm.tiny_bert()
    dense = model.bert.encoder.layer[1].output.dense
    dense.forward = lambda x: x
    with pytest.raises(LeapConfigError, match="instance-level forward"):
        leap_ds.attach(model, SECTION)
    model, _ = attached_bert()
    with pytest.raises(LeapConfigError, match="already attached"):
        leap_ds.attach(model, SECTION)


def train(model_fn, steps, *, checkpointing=False, regulariser="labels", seed=0):
    """A plain torch loop on the pieces: attach, param_groups, follow_optimizer."""
    model = model_fn(seed=seed)
    if checkpointing:
        model.gradient_checkpointing_enable()
    model.train()
    groups = {"bert": tm.HYBRID_BERT, "llama": {**LLAMA_HEADS, **LLAMA_CHANNELS}}[model.config.model_type]
    pruner = leap_ds.attach(model, {"compression_training": tm.leap_section(groups, target=0.3)})
    opt = torch.optim.AdamW(leap_ds.param_groups(model.parameters(), pruner), lr=1e-3)
    leap_ds.follow_optimizer(pruner, opt)
    losses = []
    for ids, labels in tm.batches(steps, 8):
        if regulariser == "labels":
            loss = model(input_ids=ids, labels=labels).loss          # carries the regulariser
        else:
            loss = F.cross_entropy(model(input_ids=ids).logits, labels)
            if regulariser == "explicit":
                loss = loss + leap_ds.regularization_loss(model)
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(float(loss))
    return losses, pruner.thresholds(), pruner.report()["global_density"], pruner.step


LLAMA_HEADS = {"heads": {"params": {"granularity": "head"}, "modules": ["o_proj"],
                         "related_modules": ["q_proj", "k_proj", "v_proj"]}}
LLAMA_CHANNELS = {"mlp": {"params": {"granularity": "channel"}, "modules": ["down_proj"],
                          "related_modules": ["gate_proj", "up_proj"]}}


@pytest.mark.parametrize("kind", ["bert", "llama"])
def test_activation_checkpointing_gives_the_same_trajectory(kind):
    model_fn = {"bert": tm.tiny_bert, "llama": tm.tiny_llama}[kind]
    plain = train(model_fn, 10)
    ckpt = train(model_fn, 10, checkpointing=True)
    assert plain[2] < 0.95 and plain[3] == 10            # it pruned, and stepped every time
    assert ckpt[0] == pytest.approx(plain[0], rel=1e-5)
    assert ckpt[1] == pytest.approx(plain[1], rel=1e-5)
    assert ckpt[2] == plain[2]


def test_regulariser_in_output_loss_equals_adding_it_explicitly():
    by_labels = train(tm.tiny_bert, 8, regulariser="labels")
    explicit = train(tm.tiny_bert, 8, regulariser="explicit")
    assert explicit[0] == pytest.approx(by_labels[0], rel=1e-6)
    assert explicit[1] == pytest.approx(by_labels[1], rel=1e-6)


def test_a_backward_without_the_regulariser_stops_at_the_first_step():
    with pytest.raises(LeapUsageError, match="did not reach a backward pass.*engine.backward"):
        train(tm.tiny_bert, 3, regulariser="none")


def test_a_loss_that_never_reaches_backward_is_caught():
    model = tm.tiny_bert().train()
    pruner = leap_ds.attach(model, SECTION)
    opt = torch.optim.AdamW(leap_ds.param_groups(model.parameters(), pruner), lr=1e-3)
    leap_ds.follow_optimizer(pruner, opt)
    out = model(input_ids=IDS, labels=LABELS)             # out.loss carries the regulariser ...
    F.cross_entropy(out.logits, LABELS).backward()        # ... but another loss is backpropagated
    with pytest.raises(LeapUsageError, match="did not reach a backward pass"):
        opt.step()


def _schedulers():
    from deepspeed.runtime import lr_schedules as ds
    return {
        "WarmupLR": (lambda o: ds.WarmupLR(o, warmup_min_lr=0.0, warmup_max_lr=1e-3, warmup_num_steps=4),
                     {"type": "WarmupLR", "params": {"warmup_max_lr": 1e-3}}),
        "WarmupDecayLR": (lambda o: ds.WarmupDecayLR(o, total_num_steps=10, warmup_min_lr=0.0,
                                                     warmup_max_lr=1e-3, warmup_num_steps=3),
                          {"type": "WarmupDecayLR", "params": {"warmup_max_lr": 1e-3}}),
        "OneCycle": (lambda o: ds.OneCycle(o, cycle_min_lr=1e-4, cycle_max_lr=1e-3, cycle_first_step_size=3,
                                           cycle_momentum=True, cycle_min_mom=0.8, cycle_max_mom=0.9),
                     {"type": "OneCycle", "params": {"cycle_max_lr": 1e-3}}),
        "torch LambdaLR": (lambda o: torch.optim.lr_scheduler.LambdaLR(o, lambda s: 1.0 / (1 + s)), {}),
    }


@pytest.mark.parametrize("name", ["WarmupLR", "WarmupDecayLR", "OneCycle", "torch LambdaLR"])
def test_leap_lrs_follow_each_scheduler_and_keep_their_betas(name):
    make, sched_cfg = _schedulers()[name]
    model = tm.tiny_bert().train()
    pruner = leap_ds.attach(model, SECTION)
    opt = torch.optim.AdamW(leap_ds.param_groups(model.parameters(), pruner), lr=1e-3)
    scheduler = make(opt)
    leap_ds.follow_optimizer(pruner, opt, {"scheduler": sched_cfg, "optimizer": {"params": {"lr": 1e-3}}})
    base = {g["name"]: g["leap_lr"] for g in opt.param_groups if "leap_lr" in g}
    seen = []
    opt.register_step_pre_hook(lambda o, a, k: seen.append(
        [(g["lr"], tuple(g["betas"])) for g in o.param_groups]))   # after LEAP's own pre-hook
    for ids, labels in tm.batches(8, 4):
        model(input_ids=ids, labels=labels).loss.backward()
        opt.step()
        opt.zero_grad()
        scheduler.step()
    assert len(seen) == 8
    for groups in seen:
        (w_lr, _), leap = groups[0], groups[1:]
        factor = w_lr / 1e-3
        for (lr, betas), g in zip(leap, [g for g in opt.param_groups if "leap_lr" in g]):
            assert lr == pytest.approx(base[g["name"]] * factor, rel=1e-9, abs=1e-15)
            assert betas == tuple(g["leap_betas"]) == (0.0, 0.9)
    lrs = [groups[0][0] for groups in seen]
    assert len(set(lrs)) > 2   # the schedule really moved
    if name == "OneCycle":
        assert len({groups[0][1] for groups in seen}) > 1   # it cycled the weights' momentum


def run_as_rank_zero(script: str):
    """Run a Python script as rank 0 of a one-process group (a pipeline module, DeepSpeed's
    initialize need one); fail with its stderr if it fails."""
    import subprocess
    import sys
    from tests.conftest import ROOT, dist_env, free_port
    env = {**dist_env(), "RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1",
           "MASTER_PORT": str(free_port())}
    proc = subprocess.run([sys.executable, "-c", script], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


PIPELINE_CHECK = r"""
import deepspeed, leap_ds
from torch import nn
from deepspeed.pipe import PipelineModule
from tests import tiny_models as tm
deepspeed.init_distributed(dist_backend="gloo")
model = PipelineModule(layers=[nn.Linear(8, 8), nn.Linear(8, 2)], num_stages=1)
section = tm.leap_section({"all": {"params": {"granularity": "unstructured"}, "modules": [r"^\d+$"]}})
try:
    leap_ds.initialize(model=model, config=tm.ds_config(leap=section))
except leap_ds.LeapConfigError as e:
    print("refused:", e)
"""


def test_pipeline_engine_is_refused_at_initialize():
    """PipelineEngine.train_batch bypasses the hooks LEAP needs: refused before any engine exists
    (in a subprocess: a pipeline module needs a process group)."""
    proc = run_as_rank_zero(PIPELINE_CHECK)
    assert "refused:" in proc.stdout and "pipeline engine" in proc.stdout, proc.stdout[-2000:]


CLIPPING_CHECK = r"""
import logging, sys, deepspeed, leap_ds
from torch import nn
from tests import tiny_models as tm
logging.basicConfig(stream=sys.stdout, level=logging.WARNING)
deepspeed.init_distributed(dist_backend="gloo")
section = tm.leap_section({"all": {"params": {"granularity": "unstructured"}, "modules": [r"^\d+$"]}})
for clip in (0.0, 1.0):
    print("clip", clip, flush=True)
    leap_ds.initialize(model=nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 2)),
                       config={**tm.ds_config(leap=section), "gradient_clipping": clip})
"""


def test_unclipped_training_is_warned_about(caplog):
    """LEAP's settings are tuned with gradient clipping at 1.0: the engine hook and the HF Trainer
    (max_grad_norm) warn when it is off, naming the setting and the fix."""
    from leap_ds.integration.engine import warn_if_unclipped
    with caplog.at_level("WARNING", logger="leap_ds"):
        assert [warn_if_unclipped(v, "max_grad_norm") for v in (1.0, 0.5, "auto", 0, 0.0, None)] == \
            [False, False, False, True, True, True]
    assert caplog.text.count("Set max_grad_norm to 1.0") == 3


def test_leap_trainer_warns_when_max_grad_norm_is_off(tmp_path, caplog):
    from transformers import TrainingArguments
    from leap_ds.hf import LeapTrainer
    section = tm.leap_section(tm.HYBRID_BERT)
    for max_grad_norm, warned in ((0.0, True), (1.0, False)):
        caplog.clear()
        args = TrainingArguments(output_dir=str(tmp_path / str(max_grad_norm)), max_grad_norm=max_grad_norm,
                                 report_to=[], use_cpu=True)
        with caplog.at_level("WARNING", logger="leap_ds"):
            LeapTrainer(model=tm.tiny_bert(), args=args, leap_config={"compression_training": section})
        assert ("max_grad_norm is 0.0" in caplog.text and "Set max_grad_norm to 1.0" in caplog.text) == warned


def test_initialize_warns_when_gradient_clipping_is_off():
    proc = run_as_rank_zero(CLIPPING_CHECK)
    unclipped, clipped = proc.stdout.split("clip 1.0")
    assert "gradient_clipping is 0.0" in unclipped and "Set gradient_clipping to 1.0" in unclipped, proc.stdout[-2000:]
    assert "gradient_clipping is" not in clipped
