"""CI-sized smoke runs of benchmarks/quality.py and benchmarks/cost.py.

Both run end to end (a few steps, one density, a tiny slice, tiny random BERTs)
and must write their table, plot and JSON with sane contents.
"""
import importlib.util
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.conftest import ROOT, dist_env

BENCH = Path(ROOT) / "benchmarks"


def _load(name):
    spec = importlib.util.spec_from_file_location(f"bench_{name}", BENCH / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _run(*args, timeout=600):
    cmd = [sys.executable, *map(str, args)]
    proc = subprocess.run(cmd, cwd=ROOT, env=dist_env(), capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n"
                             f"{proc.stderr[-6000:]}")
    return proc


def test_schedules_and_masks():
    q = _load("quality")
    assert q.cubic_density(0, 100, 0.1, 0.7) == pytest.approx(1.0)
    assert q.cubic_density(70, 100, 0.1, 0.7) == pytest.approx(0.1)
    assert q.cubic_density(99, 100, 0.1, 0.7) == pytest.approx(0.1)
    mid = [q.cubic_density(t, 100, 0.2, 0.7) for t in range(71)]
    assert all(a >= b for a, b in zip(mid, mid[1:]))           # monotone to the target
    assert q.lr_factor(0, 100) == pytest.approx(0.1) and q.lr_factor(9, 100) == pytest.approx(1.0)
    assert q.lr_factor(99, 100) > 0 and q.lr_factor(99, 100) < 0.02
    w = torch.randn(64, 32)
    m = q.magnitude_mask(w, 0.25)
    assert int(m.sum()) == 512
    assert (w.abs()[m == 1].min() >= w.abs()[m == 0].max())


def test_quality_smoke(tmp_path, tiny_model_dir):
    out = tmp_path / "quality"
    _run(BENCH / "quality.py", "--smoke", "--model", tiny_model_dir, "--out", out)
    for name in ("quality.md", "quality.png", "quality.json"):
        assert (out / name).is_file() and (out / name).stat().st_size > 0, name
    res = json.loads((out / "quality.json").read_text())
    q = _load("quality")
    assert sorted(r["method"] for r in res["results"]) == sorted(q.METHODS)   # every method ran
    assert 0.0 <= res["dense"]["accuracy"] <= 1.0
    for r in res["results"]:
        assert r["target_density"] == 0.2
        assert 0.0 < r["achieved_density"] <= 1.0, r
        assert 0.0 <= r["accuracy"] <= 1.0, r
        assert r["steps"] == 4 and r["history"]
        if r["method"] in ("oneshot", "gmp", "movement"):    # exact top-k at the target
            assert abs(r["achieved_density"] - 0.2) < 1e-3, r
        if r["method"].startswith("leap"):
            assert math.isfinite(r["leap_reported_density"])
    md = (out / "quality.md").read_text()
    assert "SMOKE RUN" in md and "## Observations" in md
    for label in q.LABELS.values():
        assert label in md, label
    assert (out / "cache").is_dir()   # teacher cached under --out unless --work-dir


def test_cost_smoke(tmp_path):
    out = tmp_path / "cost"
    _run(BENCH / "cost.py", "--smoke", "--out", out)
    for name in ("cost.md", "cost.png", "cost.json"):
        assert (out / name).is_file() and (out / name).stat().st_size > 0, name
    res = json.loads((out / "cost.json").read_text())
    timing = res["a_timing"]["timing"]
    assert set(timing) == {"dense", "unstructured", "block32x32", "head"}
    assert all(v["median_s"] > 0 for v in timing.values())
    assert all(m["peak_rss_mb"] > 0 for m in res["a_memory"].values())
    one, two = res["b_state"]["1"], res["b_state"]["2"]
    total = sum(one[0]["owned_elements"].values())
    per_rank = [sum(r["owned_elements"].values()) for r in two]
    assert sum(per_rank) == total                       # partitions cover the state exactly once
    assert max(per_rank) < total                        # and each rank holds less than all of it
    assert all(r["zero_stage"] == 3 for r in one + two)
    assert res["c_sizes"] and all(v["timing"]["unstructured"]["median_s"] > 0 for v in res["c_sizes"].values())
    md = (out / "cost.md").read_text()
    assert "SMOKE RUN" in md and "no GPU" in md and "## Observations" in md
