"""CI-sized smoke runs of benchmarks/quality.py and benchmarks/cost.py.

Both run end to end (a few steps, one density, a tiny slice, tiny random BERTs)
and must write their table, plot and JSON with sane contents.
"""
import importlib.util
import json
import math
import random
import statistics
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


def test_quality_schedules_and_masks():
    q = _load("quality")
    from benchmarks import quality_methods as qm
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
    # soft movement: tau 0 for one warmup (15 of 150 steps), tau_final for the last two, lambda ~ tau
    sched = [qm.soft_movement_schedule(t, 150, 400.0) for t in range(150)]
    assert sched[0] == (0.0, 0.0) and sched[15] == (0.0, 0.0)
    assert sched[121][0] == pytest.approx(0.1) and sched[149] == pytest.approx((0.1, 400.0))
    assert all(a[0] <= b[0] for a, b in zip(sched, sched[1:]))
    assert all(lam == pytest.approx(4000 * tau) for tau, lam in sched)


def test_quality_structured_and_leap_variant_mechanics(tmp_path, tiny_model_dir):
    """The structured baselines keep whole heads/channels at the target; the LEAP variants rank
    as they say (magnitude init, |W| (1 + s) with its gradient reaching s)."""
    from transformers import AutoModelForSequenceClassification
    import leap_ds
    q = _load("quality")
    from benchmarks import quality_methods as qm
    args = q.resolve_args(q.build_parser().parse_args(["--smoke", "--model", str(tiny_model_dir),
                                                        "--out", str(tmp_path)]))
    model = AutoModelForSequenceClassification.from_pretrained(tiny_model_dir, num_labels=2)
    masks = qm.structured_masks(model)(0.2)
    kept = sum(int(masks[m.weight].sum()) for _, m in qm.prunable_modules(model))
    total = sum(m.weight.numel() for _, m in qm.prunable_modules(model))
    assert abs(kept / total - 0.2) < 0.01
    for name, mod in qm.prunable_modules(model):
        wm = masks[mod.weight]
        if name.endswith("output.dense"):                                  # attention output, FFN out
            assert torch.equal(wm, wm[:1].expand_as(wm))                  # whole input columns
        else:
            assert torch.equal(wm, wm[:, :1].expand_as(wm))               # whole output rows
            assert torch.equal(masks[mod.bias], wm[:, 0])                 # and their biases

    model = AutoModelForSequenceClassification.from_pretrained(tiny_model_dir, num_labels=2)
    pruner = leap_ds.attach(model, qm.leap_section(args, qm.LEAP_VARIANTS["leap_learned_maginit"], 0.5))
    qm.init_scores_from_magnitude(pruner)
    g = pruner.groups[0]
    w = g.members[0].module.weight
    assert torch.allclose(g.module.scores, (w.abs() / w.abs().mean()).flatten())

    model = AutoModelForSequenceClassification.from_pretrained(tiny_model_dir, num_labels=2)
    pruner = leap_ds.attach(model, qm.leap_section(args, qm.LEAP_VARIANTS["leap_learned_x_mag"], 0.5))
    qm.rank_by_magnitude_times_learned(pruner)
    g = pruner.groups[0]
    w = g.members[0].module.weight
    with torch.no_grad():
        g.module.threshold.fill_(0.0)                                      # keep half
        g.module.scores.copy_(torch.randn(w.numel()))
    masked, _ = g.module(weight=w, record=False)
    expected = w * qm.exact_topk((w.abs() * (1 + g.module.scores.view_as(w))).detach(), w.numel() // 2)
    assert torch.equal(masked, expected)
    upstream = torch.randn_like(w)
    (masked * upstream).sum().backward()
    # straight-through: dL/dscore = upstream * W, times d(|W| (1 + s))/ds = |W|
    assert torch.allclose(g.module.scores.grad, (upstream * w * w.abs()).flatten().detach())
    assert isinstance(g.module._parameters["scores"], torch.nn.Parameter)  # the lent product was given back


def _md_rows(md: str, header: str) -> list[list[str]]:
    """The cells of the Markdown table whose header row starts with ``header``."""
    lines = md.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(header))
    rows = []
    for line in lines[start + 2:]:
        if not line.startswith("|"):
            break
        rows.append([c.strip() for c in line.strip("|").split("|")])
    return rows


def _mean_std_text(values) -> str:
    """What the report must print for these values, computed here with statistics."""
    if len(values) == 1:
        return f"{values[0]:.4f}"
    return f"{statistics.fmean(values):.4f} ± {statistics.stdev(values):.4f}"


def test_quality_smoke(tmp_path, tiny_model_dir):
    out = tmp_path / "quality"
    smoke = ["--smoke", "--model", tiny_model_dir, "--out", out]
    _run(BENCH / "quality.py", *smoke)
    for name in ("quality.md", "quality.png", "quality.json"):
        assert (out / name).is_file() and (out / name).stat().st_size > 0, name
    q = _load("quality")
    res = json.loads((out / "quality.json").read_text())
    records = res["results"]
    assert 0.0 <= res["dense"]["accuracy"] <= 1.0 and 0.0 <= res["dense"]["dev_accuracy"] <= 1.0
    assert set(r["method"] for r in records) == set(q.METHODS)              # every method ran

    # the plan's pieces: contenders with both smoke seeds, the rest with one; soft movement per lambda;
    # the budget point at 3x steps
    pieces = {(r["method"], r["target_density"], r.get("soft_lambda"), r["seed"], r["steps"]) for r in records}
    assert len(pieces) == len(records)                                       # one record per run
    for m in q.METHODS:
        seeds = {r["seed"] for r in records if r["method"] == m and r["steps"] == 4}
        contender = m in ("leap_unstructured", "oneshot", "gmp", "movement", "soft_movement")
        assert seeds == ({42, 43} if contender else {42}), (m, seeds)
    assert {(r["soft_lambda"], r["seed"]) for r in records if r["method"] == "soft_movement"} == \
        {(lam, s) for lam in (1.0, 100000.0) for s in (42, 43)}
    assert {(r["method"], r["target_density"], r["seed"]) for r in records if r["steps"] == 12} == \
        {(m, 0.1, 42) for m in ("leap_unstructured", "movement", "gmp")}

    cached = {}
    for f in (out / "cache").glob("runs-*/*/*.json"):
        r = json.loads(f.read_text())
        cached[(r["method"], r["target_density"], r.get("soft_lambda"), r["seed"], r["steps"])] = (f, r)
    assert set(cached) == pieces
    for r in records:
        for key in ("method", "target_density", "seed", "accuracy", "dev_accuracy", "achieved_density", "steps"):
            assert key in r, key
        assert 0.0 <= r["accuracy"] <= 1.0 and 0.0 <= r["dev_accuracy"] <= 1.0, r
        assert r["history"] and r["history"][-1]["step"] == r["steps"]
        # achieved density: the zeros of the run's final weights, counted here
        f, _ = cached[(r["method"], r["target_density"], r.get("soft_lambda"), r["seed"], r["steps"])]
        weights = torch.load(f.with_suffix(".weights.pt"))
        nonzero = sum(int((w != 0).sum()) for w in weights.values())
        total = sum(w.numel() for w in weights.values())
        assert (nonzero, total) == (r["nonzero_weights"], r["prunable_weights"]), r["method"]
        assert nonzero / total == r["achieved_density"], r["method"]
        if r["method"] in ("oneshot", "gmp", "movement"):                  # exact top-k at the target
            assert abs(r["achieved_density"] - r["target_density"]) < 1e-3, r["method"]
        if r["method"] in ("oneshot_structured", "gmp_structured"):        # whole units: close to it
            assert abs(r["achieved_density"] - r["target_density"]) < 0.01, r["method"]
        if r["method"].startswith("leap"):
            assert math.isfinite(r["leap_reported_density"])
    # thresholds frozen for the first 20% of the steps (1 of 4): the density is still sigmoid(3.0)'s
    first = {r["method"]: r["history"][0]["leap_density"] for r in records
             if r["method"].startswith("leap_learned") and r["steps"] == 4}
    assert first["leap_learned_warmup"] == pytest.approx(1 / (1 + math.exp(-3.0)), abs=2e-3)
    assert first["leap_learned"] < first["leap_learned_warmup"]
    md = (out / "quality.md").read_text()
    assert "SMOKE RUN" in md and "## Observations" in md and "## Paired differences" in md
    assert "## LEAP settings re-checked on dev" in md and "## Soft movement" in md and "## Budget point" in md

    # A tiny random model predicts the majority class whatever it is, so every accuracy is the
    # same: give the cached runs distinct accuracies (and one soft-movement lambda a density that
    # fits the target), rewrite the report from the cache, and check its statistics against ours.
    rng = random.Random(0)
    for f, r in cached.values():
        r["accuracy"], r["dev_accuracy"] = round(rng.uniform(0.5, 0.9), 4), round(rng.uniform(0.5, 0.9), 4)
        if r["method"] == "soft_movement" and r["soft_lambda"] == 1.0:
            r["achieved_density"] = 0.15 + 0.01 * (r["seed"] - 42)
        f.write_text(json.dumps(r))
    _run(BENCH / "quality.py", *smoke, "--report-only")
    records = json.loads((out / "quality.json").read_text())["results"]
    md = (out / "quality.md").read_text()
    label_of = {v: k for k, v in q.LABELS.items()}
    runs = {}
    for r in records:
        if r["steps"] == 4:
            point = r["soft_lambda"] if r["method"] == "soft_movement" else r["target_density"]
            runs.setdefault((r["method"], point), []).append(r)

    table = _md_rows(md, "| method | target density |")
    assert table[0][0] == q.LABELS["dense"]
    seen = set()
    for label, target, seeds, density, acc, dev, *_ in table[1:]:
        method, _, lam = label.partition(", lambda ")
        method = label_of[method]
        mine = sorted(runs[(method, float(lam) if lam else float(target))], key=lambda r: r["seed"])
        assert seeds == ",".join(str(r["seed"]) for r in mine), label
        assert acc == _mean_std_text([r["accuracy"] for r in mine]), label
        assert dev == _mean_std_text([r["dev_accuracy"] for r in mine]), label
        assert density == f"{statistics.fmean(r['achieved_density'] for r in mine):.4f}", label
        seen.add(method)
    assert seen == set(q.METHODS)
    # soft movement's row: the lambda whose mean density fits 0.2 + 0.01 with the best mean dev accuracy
    fits = {lam: rs for (m, lam), rs in runs.items()
            if m == "soft_movement" and statistics.fmean(r["achieved_density"] for r in rs) <= 0.21}
    best = max(fits, key=lambda lam: statistics.fmean(r["dev_accuracy"] for r in fits[lam]))
    assert any(row[0] == f"{q.LABELS['soft_movement']}, lambda {best:g}" for row in table)

    paired = _md_rows(md, "| target | LEAP | baseline |")
    assert {label_of[row[2]] for row in paired} == {m for m in q.METHODS if not m.startswith("leap")}
    # against the shipped LEAP and, for unstructured baselines, the LEAP setting best on dev (mean over targets)
    targets = sorted({t for (m, t) in runs if m == "leap_unstructured"})
    family = [m for m in q.METHODS if m.startswith("leap_") and m not in ("leap_structured", "leap_hybrid")]
    best_dev = max(family, key=lambda m: statistics.fmean(
        statistics.fmean(r["dev_accuracy"] for r in runs[(m, t)]) for t in targets))
    expected = set()
    for (m, point) in runs:
        if m.startswith("leap") or (m == "soft_movement" and point != best):
            continue
        refs = ["leap_structured"] if m.endswith("_structured") else {"leap_unstructured", best_dev}
        expected |= {(m, ref) for ref in refs}
    assert {(label_of[row[2]], label_of[row[1]]) for row in paired} == expected
    assert len(paired) == len(expected) * len(targets)
    for target, leap_label, base_label, n, diff, ratio in paired:
        base, leap = label_of[base_label], label_of[leap_label]
        key = (base, best) if base == "soft_movement" else (base, float(target))
        leap_acc = {r["seed"]: r["accuracy"] for r in runs[(leap, float(target))]}
        diffs = [leap_acc[r["seed"]] - r["accuracy"] for r in sorted(runs[key], key=lambda r: r["seed"])
                 if r["seed"] in leap_acc]
        assert int(n) == len(diffs) and diffs, base
        if len(diffs) == 1:
            assert diff == f"{diffs[0]:+.4f}" and ratio == ""
        else:
            mean, std = statistics.fmean(diffs), statistics.stdev(diffs)
            assert diff == f"{mean:+.4f} ± {std:.4f}", base
            assert ratio == f"{mean / std:+.1f}", base
    assert (out / "cache").is_dir()   # teacher cached under --out unless --work-dir


def test_quality_plan_fits_the_budget():
    """The full plan: its run count and estimate, as written in quality.py's docstring."""
    proc = _run(BENCH / "quality.py", "--plan", "--work-dir", "/nonexistent-quality-cache")
    last = proc.stdout.strip().splitlines()[-1]
    assert last.startswith("74 runs (80 run-equivalents of 150 steps), 74 to run; teacher to train.")
    minutes = int(last.split("--jobs 2 on the 2-core machine (full-size model): ")[1].split(" min")[0])
    assert minutes < 150                                                   # under 2.5 h


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
