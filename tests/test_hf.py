"""LEAP in Hugging Face Trainer and Accelerate scripts (leap_ds.hf), real DeepSpeed on CPU ranks."""
import json
import os
import sys

import pytest
import torch

from tests.conftest import ROOT, dist_env, load_ranks, torchrun

REL = 1e-4
# What depends on the data and the task loss (the logged loss is ~8164, almost all lambda * L_reg,
# over a task loss ~0.69; Adam moves each threshold by about its lr per step whatever the batch:
# losses, thresholds and densities agree even when a path trains on other batches). Measured on
# the tiny BERT (2 CPU ranks, 6 steps): the Trainer at ZeRO-2 and ZeRO-3 and its resumed run give
# bit-identical task losses, probe logits and parameters to the leap_ds.initialize loop and the
# uninterrupted run; gradient accumulation 2 differs by summation order: task losses 4e-8 rel,
# logits 4e-9 abs, parameters 2.4e-7 abs (a threshold ~3), 1.7e-5 rel on tiny weights; DDP against
# one process (30 steps): task losses 1.3e-7 rel, logits 1.3e-8 abs, parameters 2.6e-7 abs. Other
# batches (another seed), or a halved, dropped or unevenly accumulated task loss, move task losses
# by >= 1e-4 rel and the weights (which move ~4e-3 in 6 steps) by far more than WEIGHTS_TOL.
TASK_REL = 1e-6                           # per-step task loss (mean over micro batches and ranks)
LOGITS_TOL = dict(rtol=1e-5, atol=1e-6)   # logits ~0.1 on the probe batch
WEIGHTS_TOL = dict(rtol=1e-5, atol=2e-6)  # every final parameter, LEAP's thresholds included
# the logged loss is a float32 ~8164 (ulp 1e-3): minus lambda * L_reg it is the task loss to within
# 3.3e-4 measured; allow 4 float32 eps of the loss (3.9e-3), far below a halved task loss (0.35)
LOGGED_TASK_EPS = 4 * torch.finfo(torch.float32).eps


def close(a, b, rel=REL):
    assert len(a) == len(b), (a, b)
    for x, y in zip(a, b):
        assert abs(x - y) <= rel * max(abs(x), abs(y), 1e-6), (a, b)


def assert_same_weights(got, want, rtol=1e-4, atol=1e-5):
    """Two state dicts hold the same tensors: the same names, the same zeros (pruned positions in
    an export), the same values."""
    assert sorted(got) == sorted(want)
    for name in want:
        assert torch.equal(got[name] == 0, want[name] == 0), name
        torch.testing.assert_close(got[name], want[name], rtol=rtol, atol=atol, msg=name)


def check_task_loss_in_logged_loss(run):
    """The loss a path logged (and backpropagated) is its model's task loss plus lambda * L_reg:
    catches a path that drops or rescales the task loss after the model computed it."""
    assert len(run["losses"]) == len(run["reg_terms"]) == len(run["task_losses"]) > 0
    for logged, reg, task in zip(run["losses"], run["reg_terms"], run["task_losses"]):
        assert abs(logged - reg - task) <= LOGGED_TASK_EPS * abs(logged), (run["losses"], run["reg_terms"],
                                                                           run["task_losses"])


def check_same_training(got, want, skip_steps=0):
    """got trained on the same data with the same task loss as want (want's last steps when got
    resumed after skip_steps): per-step task losses, logits on a fixed probe batch, all final
    parameters (the workers gathered them at ZeRO-3)."""
    close(got["task_losses"], want["task_losses"][skip_steps:], rel=TASK_REL)
    for run in (got, want):
        check_task_loss_in_logged_loss(run)
    torch.testing.assert_close(torch.tensor(got["probe_logits"]), torch.tensor(want["probe_logits"]),
                               **LOGITS_TOL, msg="probe logits")
    assert_same_weights(torch.load(got["params_file"]), torch.load(want["params_file"]), **WEIGHTS_TOL)


def check_weights_trained(run):
    """The compared parameters moved by far more than the tolerance: the comparison has teeth."""
    from tests import tiny_models as tm
    init = dict(tm.tiny_bert().named_parameters())
    final = torch.load(run["params_file"])
    moved = max(float((final[n] - p.detach()).abs().max()) for n, p in init.items())
    assert moved > 100 * WEIGHTS_TOL["atol"], moved


def check_against_reference(res, steps, save_at):
    full, ref = res["full"], res["reference"]
    # same thresholds, density and loss as the leap_ds.initialize loop on the same batches
    close(full["thresholds"], ref["thresholds"])
    close(full["losses"], ref["losses"])
    # ... which the data and the task loss hardly move: also what they do move
    check_weights_trained(full)
    check_same_training(full, ref)
    assert full["densities"] == ref["densities"]
    assert full["report"]["global_density"] == ref["report"]["global_density"] < 1.0  # it pruned
    assert full["global_step"] == steps and full["leap_step"] == ref["leap_step"] == steps
    # LEAP's own groups in the optimizer DeepSpeed built from its config: own lr, no weight decay
    assert full["leap_groups"] and all(g["weight_decay"] == 0.0 and g["lr"] == pytest.approx(0.1)
                                       for g in full["leap_groups"])
    assert {"leap/density", "leap/lambda", "leap/reg_loss"} <= set(full["log_keys"])
    # resumed from the checkpoint after save_at steps: the uninterrupted run's end, LEAP's counters restored
    per_step = full["leap_step"] // steps
    assert res["checkpoint_leap_state"]["step"] == save_at * per_step
    resumed = res["resumed"]
    assert resumed["leap_step"] == full["leap_step"]
    close(resumed["thresholds"], full["thresholds"])
    close(resumed["losses"], full["losses"][save_at:])
    check_same_training(resumed, full, skip_steps=save_at)


def check_export(export_dir, report):
    """The exported model loads with plain transformers, has no LEAP keys, and is exactly as sparse."""
    from safetensors.torch import load_file
    from transformers import BertForSequenceClassification
    state = load_file(os.path.join(export_dir, "model.safetensors"))
    assert not [k for k in state if "leap_" in k]
    model = BertForSequenceClassification.from_pretrained(export_dir)
    weights = dict(model.named_parameters())
    saved = json.load(open(os.path.join(export_dir, "leap_report.json")))
    assert saved["global_density"] == report["global_density"]
    names = {m for g in saved["groups"] for m in g["modules"]}
    zeros = sum(int((weights[f"{n}.weight"] == 0).sum()) for n in names)
    # structured groups may mask a weight through two matrices' units: count kept weights per group
    assert zeros >= saved["prunable_weights"] - saved["kept_weights"] > 0


@pytest.fixture(scope="module")
def zero2(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("hf_zero2")
    torchrun(2, os.path.join(ROOT, "tests/workers/hf_trainer_tiny.py"), "--stage", 2, "--accum-check",
             "--errors-check", "--tmp", tmp, "--out", tmp / "res")
    return tmp, load_ranks(tmp / "res", 2)


def test_trainer_zero2_matches_engine_loop_resumes_and_accumulates(zero2):
    tmp, ranks = zero2
    for res in ranks:
        check_against_reference(res, steps=6, save_at=3)
        # gradient accumulation 2 of half batches = one batch
        close(res["accum"]["thresholds"], res["full"]["thresholds"])
        close(res["accum"]["losses"], res["full"]["losses"])
        check_same_training(res["accum"], res["full"])
    assert ranks[0]["full"]["thresholds"] == ranks[1]["full"]["thresholds"]
    check_export(tmp / "export", ranks[0]["full"]["report"])


def test_trainer_leap_advances_once_per_optimizer_step_at_zero2(zero2):
    """ZeRO-1/2 step the inner torch optimizer once per parameter group: LEAP counts the step
    that updates its thresholds only."""
    _, ranks = zero2
    assert ranks[0]["full"]["leap_step"] == ranks[0]["full"]["global_step"]


def test_trainer_config_errors_match_engine_path_on_every_rank(zero2):
    _, ranks = zero2
    for res in ranks:
        for name, messages in res["errors"].items():
            assert set(messages) == {"engine", "trainer"}, (name, messages)
            assert messages["engine"] == messages["trainer"], name
    assert "target_densty" in ranks[0]["errors"]["unknown_key"]["trainer"]


def test_trainer_zero3_from_partitioned_model(tmp_path):
    from tests import tiny_models as tm
    model_dir = tmp_path / "tiny_bert"
    tm.tiny_bert().save_pretrained(model_dir)
    torchrun(2, os.path.join(ROOT, "tests/workers/hf_trainer_tiny.py"), "--stage", 3, "--model-dir", model_dir,
             "--tmp", tmp_path, "--out", tmp_path / "res")
    ranks = load_ranks(tmp_path / "res", 2)
    for res in ranks:
        assert res["full"]["partitioned_at_load"]   # zero.Init partitioned it before LEAP attached
        check_against_reference(res, steps=6, save_at=3)
    check_export(tmp_path / "export", ranks[0]["full"]["report"])


def test_trainer_ddp_without_deepspeed_matches_one_process(tmp_path):
    """LeapTrainer without DeepSpeed (leap_config=): DDP on 2 gloo ranks under torchrun equals a
    plain one-process Trainer fed the same global batches (same seed, global batch 8, dropout off),
    checkpoints carry LEAP's state, and the export is a finalized plain transformers model."""
    import subprocess
    from safetensors.torch import load_file
    worker = os.path.join(ROOT, "tests/workers/hf_trainer_tiny.py")
    steps, save_at = 30, 15
    common = ["--no-deepspeed", "--steps", steps, "--save-at", save_at, "--global-batch", 8]
    one_dir, ddp_dir = tmp_path / "one", tmp_path / "ddp"
    # the one-process run (plain python, no launcher) beside the 2-rank one
    cmd = [sys.executable, worker, *map(str, common), "--tmp", one_dir, "--out", one_dir / "res"]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=dist_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        torchrun(2, worker, *common, "--tmp", ddp_dir, "--out", ddp_dir / "res")
    finally:
        out, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, out[-3000:] + err[-6000:]
    (one,) = [r["full"] for r in load_ranks(one_dir / "res", 1)]
    ddp = [r["full"] for r in load_ranks(ddp_dir / "res", 2)]

    assert one["wrapped_in"] == "BertForSequenceClassification"   # one process: no wrapper
    assert one["report"]["global_density"] < 0.7 and one["densities"][0] > one["densities"][-1]   # it pruned
    check_task_loss_in_logged_loss(one)
    for res in ddp:
        assert res["wrapped_in"] == "DistributedDataParallel"
        close(res["thresholds"], one["thresholds"])
        close(res["losses"], one["losses"])
        # the task loss apart from the regulariser: the same batches, the same task loss
        close(res["task_losses"], one["task_losses"], rel=TASK_REL)
        check_task_loss_in_logged_loss(res)
        assert res["densities"] == one["densities"]
        assert res["report"]["global_density"] == one["report"]["global_density"]
        assert res["global_step"] == res["leap_step"] == steps
        # the Trainer's own optimizer: LEAP's groups with their lr (0.1 after warmup), no weight decay
        assert res["leap_groups"] and all(g["weight_decay"] == 0.0 and g["lr"] == pytest.approx(0.1)
                                          for g in res["leap_groups"])
    assert json.load(open(ddp_dir / "full" / f"checkpoint-{save_at}" / "leap_state.json"))["step"] == save_at
    check_export(ddp_dir / "export", ddp[0]["report"])
    # the DDP export is the one-process export: the same pruned positions, the same weights. This is
    # the sharp check: the logged loss is mostly lambda * L_reg and the thresholds move by about their
    # lr each step, so those agree even when the ranks see other batches; the weights do not.
    assert_same_weights(load_file(ddp_dir / "export" / "model.safetensors"),
                        load_file(one_dir / "export" / "model.safetensors"), rtol=1e-4, atol=1e-5)


def run_example(script, *args, nproc=None, timeout=600):
    """An example as a user runs it: under torchrun (DeepSpeed), or plain python."""
    import subprocess
    path = os.path.join(ROOT, "examples", script)
    if nproc:
        return torchrun(nproc, path, *args, timeout=timeout)
    proc = subprocess.run([sys.executable, path, *map(str, args)], cwd=ROOT, env=dist_env(),
                          capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    return proc


def check_plain_export(model_cls, export_dir):
    """Loadable by plain transformers, no LEAP keys, pruned weights exactly zero, as reported."""
    from safetensors.torch import load_file
    assert not [k for k in load_file(os.path.join(export_dir, "model.safetensors")) if "leap_" in k]
    model = model_cls.from_pretrained(export_dir)
    weights = dict(model.named_parameters())
    report = json.load(open(os.path.join(export_dir, "leap_report.json")))
    zeros = sum(int((weights[f"{m}.weight"] == 0).sum()) for g in report["groups"] for m in g["modules"])
    assert report["global_density"] < 1.0
    return report, zeros


@pytest.mark.parametrize("launch", ["deepspeed", "plain"])
def test_trainer_example_prunes_and_exports_tiny_llama_causal_lm(tmp_path, launch):
    from transformers import LlamaForCausalLM
    from tests import tiny_models as tm
    model_dir = tmp_path / "llama"
    LlamaForCausalLM(tm.tiny_llama().config).save_pretrained(model_dir)
    out = tmp_path / "out"
    run_example("trainer_example.py", "--model", model_dir, "--output_dir", out, "--max_steps", 8,
                "--samples", 32, nproc=1 if launch == "deepspeed" else None)
    report, zeros = check_plain_export(LlamaForCausalLM, out)
    assert zeros == report["prunable_weights"] - report["kept_weights"]   # unstructured: exact
    # the checkpoint after half the steps holds half LEAP's final count
    assert json.load(open(out / "checkpoint-4" / "leap_state.json"))["step"] == report["step"] // 2 > 0


def test_accelerate_example_prunes_and_exports(tmp_path):
    from transformers import BertForSequenceClassification
    run_example("accelerate_example.py", "--output_dir", tmp_path, "--steps", 8, nproc=1)
    report, zeros = check_plain_export(BertForSequenceClassification, tmp_path / "model")
    assert zeros >= report["prunable_weights"] - report["kept_weights"] > 0
    saved = torch.load(tmp_path / "state" / "custom_checkpoint_0.pkl", weights_only=False)
    assert saved["step"] == report["step"] // 2 > 0   # saved after half the steps


def test_lower_layers_do_not_import_hf():
    from tests.test_layers import PKG, imported_modules
    for layer in ("algorithm", "integration"):
        for f in (PKG / layer).glob("*.py"):
            assert not any(n.startswith("leap_ds.hf") for n in imported_modules(f)), f
