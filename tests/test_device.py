"""Every input batch, extra model (the teacher, the exported model) and collective tensor of
the main job goes through leap_ds/apps/device.py, where a GPU run puts it on the engine's
device. On CPU the engine's device is already cpu, so comparing devices could not fail:
this test records what passes through the helper instead, runs the main job (teacher,
distillation, evaluations, export and its re-evaluation) in this process in a world of one,
and fails on any model input, model or all-reduce that did not come from the helper."""
import sys

import pytest
import torch
import torch.distributed as tdist

from tests.conftest import free_port

MARK = "_placed_by_device_helper"


def tensors_in(obj):
    if isinstance(obj, torch.Tensor):
        yield obj
    elif isinstance(obj, dict):
        for v in obj.values():
            yield from tensors_in(v)
    elif isinstance(obj, (list, tuple)):
        for v in obj:
            yield from tensors_in(v)


class Recorder:
    """Wraps device.to_device, torch.distributed.all_reduce, deepspeed.initialize and the tiny
    model's forward; collects every violation."""

    def __init__(self, monkeypatch):
        import deepspeed
        from transformers import BertForSequenceClassification
        from leap_ds.apps import device as placement
        self.devices, self.moved_modules, self.engine_modules = [], [], []
        self.forwards, self.reduced, self.problems = [], [], []
        real_to_device, real_all_reduce = placement.to_device, tdist.all_reduce
        real_initialize, real_forward = deepspeed.initialize, BertForSequenceClassification.forward

        def to_device(obj, device):
            out = real_to_device(obj, device)
            self.devices.append(torch.device(device))
            for t in tensors_in(out):
                setattr(t, MARK, True)
            if isinstance(out, torch.nn.Module):
                self.moved_modules.append(out)
            return out

        def all_reduce(tensor, *args, **kwargs):
            frame = sys._getframe(1)        # the first caller outside torch's and DeepSpeed's comm layers
            while frame and any(s in frame.f_code.co_filename for s in ("/torch/distributed/", "/deepspeed/comm/")):
                frame = frame.f_back
            caller = frame.f_code.co_filename if frame else "?"
            if caller.endswith("leap_ds/apps/device.py"):
                self.reduced.append(tensor)
                if not getattr(tensor, MARK, False):
                    self.problems.append("all_reduce_ reduced a tensor it did not place")
            elif "/leap_ds/apps/" in caller:
                self.problems.append(f"all_reduce called from {caller}, not through the device helper")
            return real_all_reduce(tensor, *args, **kwargs)

        def initialize(*args, **kwargs):
            out = real_initialize(*args, **kwargs)
            self.engine_modules.append(out[0].module)   # DeepSpeed places its own module
            return out

        def forward(model, *args, **kwargs):
            self.forwards.append(model)
            bypass = [k for k, v in [*enumerate(args), *kwargs.items()]
                      for t in tensors_in(v) if not getattr(t, MARK, False)]
            if bypass:
                self.problems.append(f"model input(s) {bypass} bypassed the device helper")
            if not any(model is m for m in self.moved_modules + self.engine_modules):
                self.problems.append("a model neither an engine's nor placed by the device helper ran")
            return real_forward(model, *args, **kwargs)

        monkeypatch.setattr(placement, "to_device", to_device)
        monkeypatch.setattr(tdist, "all_reduce", all_reduce)
        monkeypatch.setattr(deepspeed, "initialize", initialize)
        monkeypatch.setattr(BertForSequenceClassification, "forward", forward)


@pytest.fixture
def world_of_one(monkeypatch):
    for k, v in {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1",
                 "MASTER_PORT": str(free_port())}.items():
        monkeypatch.setenv(k, v)
    yield
    import deepspeed.comm.comm as ds_comm
    if tdist.is_initialized():
        tdist.destroy_process_group()
    ds_comm.cdb = None


def test_inputs_models_and_collectives_go_through_the_device_helper(world_of_one, monkeypatch,
                                                                     tiny_model_dir, tmp_path):
    from leap_ds.apps.evaluate import evaluate
    from leap_ds.apps.train import run_job
    rec = Recorder(monkeypatch)
    metrics = run_job(["--model", str(tiny_model_dir), "--max-train-samples", "64", "--max-eval-samples", "32",
                       "--teacher-max-steps", "2", "--max-steps", "2", "--eval-interval", "1",
                       "--allow-missed-target", "--output-dir", str(tmp_path / "run")])
    assert metrics["steps"] == 2 and metrics["distillation"] and metrics["exported_model_accuracy"] is not None
    # evaluate()'s own all-reduce runs when it spans several ranks: half the rows of a 2-rank split here
    from transformers import AutoModelForSequenceClassification
    from leap_ds.apps import device as placement
    model = placement.to_device(AutoModelForSequenceClassification.from_pretrained(tmp_path / "run" / "model"),
                                "cpu")
    rows = {"input_ids": torch.randint(1000, 2000, (10, 8)), "labels": torch.randint(0, 2, (10,))}
    dataset = type("Rows", (), {"__len__": lambda self: 10,
                                "__getitem__": lambda self, idx: {k: v[idx] for k, v in rows.items()}})()
    reduced_before = len(rec.reduced)
    result = evaluate(lambda b: model(**b).logits, dataset, 4, 2, rank=0, world=2, module=model, device="cpu")
    assert result["examples"] == 5 and len(rec.reduced) == reduced_before + 1

    assert rec.problems == []
    engine_device = torch.device("cpu")
    assert rec.devices and set(rec.devices) == {engine_device}
    # what the check covered: the student engine, the teacher engine, the distillation teacher
    # and the exported model all ran; the training loss and the counts were all-reduced
    moved_that_ran = {id(m) for m in rec.forwards} & {id(m) for m in rec.moved_modules}
    assert len(moved_that_ran) >= 3          # teacher, exported model (main job), the model above
    assert {id(m) for m in rec.engine_modules} <= {id(m) for m in rec.forwards}
    assert len(rec.reduced) >= 3 + 1 + 1     # losses of teacher and LEAP steps, the counts above


def test_helper_moves_nested_batches_and_reduces():
    from leap_ds.apps import device as placement
    batch = {"a": torch.ones(2), "b": [torch.zeros(1), (torch.ones(1), "text")], "c": 3}
    out = placement.to_device(batch, "meta")      # a device other than the tensors' own
    assert out["a"].device.type == out["b"][0].device.type == out["b"][1][0].device.type == "meta"
    assert out["b"][1][1] == "text" and out["c"] == 3 and isinstance(out["b"][1], tuple)
    module = placement.to_device(torch.nn.Linear(2, 2), "meta")
    assert placement.module_device(module).type == "meta"
