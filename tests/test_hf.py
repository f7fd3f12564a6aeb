"""LEAP in Hugging Face Trainer and Accelerate scripts (leap_ds.hf), real DeepSpeed on CPU ranks."""
import json
import os
import sys

import pytest
import torch

from tests.conftest import ROOT, dist_env, load_ranks, torchrun

REL = 1e-4


def close(a, b, rel=REL):
    assert len(a) == len(b), (a, b)
    for x, y in zip(a, b):
        assert abs(x - y) <= rel * max(abs(x), abs(y), 1e-6), (a, b)


def check_against_reference(res, steps, save_at):
    full, ref = res["full"], res["reference"]
    # same thresholds, density and loss as the leap_ds.initialize loop on the same batches
    close(full["thresholds"], ref["thresholds"])
    close(full["losses"], ref["losses"])
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
    for res in ddp:
        assert res["wrapped_in"] == "DistributedDataParallel"
        close(res["thresholds"], one["thresholds"])
        close(res["losses"], one["losses"])
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
    got, want = load_file(ddp_dir / "export" / "model.safetensors"), load_file(one_dir / "export" / "model.safetensors")
    assert sorted(got) == sorted(want)
    for name in want:
        assert torch.equal(got[name] == 0, want[name] == 0), name
        torch.testing.assert_close(got[name], want[name], rtol=1e-4, atol=1e-5, msg=name)


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
