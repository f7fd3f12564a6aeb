"""benchmarks/llm.py on a tiny random Llama: every leg's rows, densities counted from the weights,
perplexity against an independent computation, Wanda against a brute-force recomputation, and the
piece cache."""
import importlib.util
import json
import math
import re
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from tests.conftest import ROOT, dist_env

BENCH = Path(ROOT) / "benchmarks"


def _load():
    spec = importlib.util.spec_from_file_location("bench_llm", BENCH / "llm.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def llm():
    return _load()


@pytest.fixture(scope="module")
def tiny_llama(llm):
    return llm.tiny_model_dir()


def _smoke(tiny_llama, out, work):
    cmd = [sys.executable, str(BENCH / "llm.py"), "--smoke", "--model", tiny_llama, "--jobs", "2",
           "--out", str(out), "--work-dir", str(work)]
    proc = subprocess.run(cmd, cwd=ROOT, env=dist_env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    return proc


def _test_split(tiny_llama):
    """The test split as the benchmark builds it (smoke sizes: blocks of 32, 8 per split)."""
    from leap_ds.apps.tasks import create_task
    targs = SimpleNamespace(task="causal-lm", model=tiny_llama, block_size=32, train_file=None,
                            validation_file=None, text_column="text", validation_fraction=0.1, seed=42,
                            alpha_ce=0.1, alpha_kd=0.9, temperature=2.0, max_train_samples=None,
                            max_eval_samples=16)
    task = create_task(targs)
    _, held_out = task.prepare(task.load_data(), task.load_tokenizer())
    return held_out.select(range(len(held_out) // 2, len(held_out)))


def test_smoke_rows_densities_perplexity_and_cache(llm, tiny_llama, tmp_path):
    out, work = tmp_path / "out", tmp_path / "cache"
    _smoke(tiny_llama, out, work)
    for name in ("llm.md", "llm.png", "llm.json"):
        assert (out / name).stat().st_size > 0
    saved = json.loads((out / "llm.json").read_text())
    rows = saved["results"]
    expected = {("unstructured", 0.5): {"magnitude", "magnitude+ft", "wanda", "wanda+ft", "leap"},
                ("structured", 0.7): {"magnitude", "magnitude+ft", "leap"},
                ("structured", 0.5): {"magnitude", "magnitude+ft", "leap"}}
    for leg, methods in expected.items():
        assert {r["method"] for r in rows if (r["leg"], r["target_density"]) == leg} == methods
    for r in rows:
        if r["method"] == "dense":
            continue
        # the density each method reports is what the weights hold
        assert r["counted_density"] == pytest.approx(r["density"], abs=2e-3), r
        if r["method"] in ("magnitude", "wanda"):
            assert r["density"] == pytest.approx(r["target_density"], abs=0.01), r
        if r["method"].endswith("+ft"):   # the mask stays fixed through fine-tuning
            base = next(b for b in rows if (b["leg"], b["target_density"], b["method"])
                        == (r["leg"], r["target_density"], r["method"][:-3]))
            assert r["counted_density"] == pytest.approx(base["counted_density"], abs=1e-9)
            assert r["test_perplexity"] != base["test_perplexity"]   # and the weights did train
        if r["method"] == "leap":
            assert len(r["history"]) == 1 and r["history"][-1]["density"] == pytest.approx(r["density"])
            groups = r["history"][-1]["groups"].values()   # the learned allocation adds up to the density
            assert sum(g["density"] * g["weights"] for g in groups) / sum(g["weights"] for g in groups) == \
                pytest.approx(r["density"])

    # dense perplexity: every block has the same length, so it is exp(mean HF loss) over the test blocks
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(tiny_llama).eval()
    test = _test_split(tiny_llama)
    with torch.no_grad():
        losses = [float(model(input_ids=test[i:i + 1]["input_ids"], labels=test[i:i + 1]["input_ids"]).loss)
                  for i in range(len(test))]
    dense = next(r for r in rows if r["method"] == "dense")
    assert dense["test_perplexity"] == pytest.approx(math.exp(sum(losses) / len(losses)), rel=1e-4)
    md = (out / "llm.md").read_text()
    assert f"{dense['test_perplexity']:.2f}" in md and "unstructured 0.5: LEAP density" in md

    _check_allocation_experiment(tiny_llama, work, rows, tmp_path)

    # a rerun with the same settings runs no piece and reports the same rows
    (out / "llm.json").unlink()
    proc = _smoke(tiny_llama, out, work)
    assert not re.search(r"^  \S+ [\d.]+ \S+: \d+ s$", proc.stdout, re.M)   # a piece that ran prints this
    assert json.loads((out / "llm.json").read_text())["results"] == rows


def _check_allocation_experiment(tiny_llama, work, rows, tmp_path):
    """llm_allocation.py on the smoke LEAP piece: one-shot magnitude at LEAP's per-matrix densities keeps
    each matrix's largest |w| (recomputed here), exactly as many as LEAP kept, and the mask stays fixed."""
    from transformers import AutoModelForCausalLM
    leap = next(r for r in rows if r["method"] == "leap" and r["leg"] == "unstructured")
    piece = next(work.glob("unstructured-0.5-leap-*.json"))
    out = tmp_path / "allocation.json"
    cmd = [sys.executable, str(BENCH / "llm_allocation.py"), "--leap-piece", str(piece), "--out", str(out),
           "--model", tiny_llama, "--smoke", "--threads", "1"]
    proc = subprocess.run(cmd, cwd=ROOT, env=dist_env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    oneshot, tuned = json.loads(out.read_text())["rows"]
    assert (oneshot["method"], tuned["method"]) == ("magnitude@leap", "magnitude@leap+ft")
    assert oneshot["counted_density"] == pytest.approx(leap["density"], abs=1e-9)
    assert tuned["counted_density"] == pytest.approx(oneshot["counted_density"], abs=1e-9)
    assert tuned["test_perplexity"] != oneshot["test_perplexity"]

    # the pruning itself, against a recomputation from the dense weights
    from benchmarks.llm_allocation import allocation_of
    from leap_ds.apps.tasks.oneshot import oneshot_magnitude_per_group
    from leap_ds.integration.config import split_config
    _, kept = allocation_of(json.loads(piece.read_text()))
    assert len(set(kept.values())) > 1   # LEAP's allocation is not uniform: the check below is not the uniform cut
    model = AutoModelForCausalLM.from_pretrained(tiny_llama).eval().requires_grad_(False)
    _, section = split_config(_load().leg_config("unstructured", 0.5))
    pruned, _ = oneshot_magnitude_per_group(model, section, kept)
    for name, k in kept.items():
        name = name.split(":", 1)[1]   # a group's name: "<config group>:<module>"
        w = model.get_submodule(name).weight.flatten()
        expected = torch.zeros_like(w)
        top = w.abs().topk(k).indices
        expected[top] = w[top]
        assert torch.equal(pruned.get_submodule(name).weight.flatten(), expected), name
    with pytest.raises(ValueError, match="missing"):
        oneshot_magnitude_per_group(model, section, dict(list(kept.items())[1:]))


def test_wanda_keeps_each_rows_largest_weight_times_input_norm(llm, tiny_llama):
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(tiny_llama).eval().requires_grad_(False)
    raw = llm.leg_config("unstructured", 0.5)
    torch.manual_seed(0)
    calib = torch.randint(0, model.config.vocab_size, (3, 16))
    seen = {}
    name = "model.layers.1.mlp.down_proj"
    handle = model.get_submodule(name).register_forward_hook(
        lambda mod, args, out: seen.setdefault("x", []).append(args[0].reshape(-1, args[0].shape[-1])))
    with torch.no_grad():
        for ids in calib:
            model(input_ids=ids[None])
    handle.remove()
    pruned, density = llm.wanda(model, raw, calib, 0.5)
    w = model.get_submodule(name).weight
    norm = torch.linalg.vector_norm(torch.cat(seen["x"]).double(), dim=0)
    metric = w.double().abs() * norm
    keep = math.ceil(0.5 * w.shape[1])
    expected = torch.zeros_like(w)
    for row in range(w.shape[0]):
        order = sorted(range(w.shape[1]), key=lambda j: -float(metric[row, j]))[:keep]
        expected[row, order] = w[row, order]
    assert torch.equal(pruned.get_submodule(name).weight, expected)
    assert density == pytest.approx(0.5, abs=0.01)
    assert torch.count_nonzero(model.get_submodule(name).weight) == w.numel()   # the dense model untouched
