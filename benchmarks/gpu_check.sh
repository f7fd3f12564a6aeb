#!/usr/bin/env bash
# A prepared GPU check (issue 9): one script, under 5 minutes on one lent GPU machine.
#
#   bash benchmarks/gpu_prepare.sh          # here, once: wheels into .whl/ (git-ignored)
#   bash benchmarks/gpu_check.sh            # there: device tool, carry [".whl"], timeout_s 420
#   LEAP_GPU_CHECK_DEVICE=cpu PYTHON=.venv/bin/python bash benchmarks/gpu_check.sh   # CPU smoke
#
# Stages, each with its own timeout, each run even when an earlier one failed:
#   0 install  the carried wheels into a private target (CPython 3.12 only) and record versions
#   1 main     `leap_ds.train` on a tiny random BERT + a WordLevel tokenizer built here, on a
#              CSV written here: ZeRO-0 and ZeRO-3, bf16, NCCL, 1 rank (cpu: fp32, gloo)
#   2 fp16     tests/workers/train_tiny.py --precision fp16 --overflow-at N: one step skipped,
#              LEAP's step counter not advanced (cpu: fp16 is refused, --skip-step-at instead)
#   3 cost     benchmarks/cost.py's timing worker: LEAP vs dense step time, unstructured /
#              block 32x32 / head, random BERT-base (cpu: a tiny BERT), fp32 and bf16
# Results go to $OUT (default ./gpu_out) as each stage ends: results.json, gpu.md and one log
# per stage (6 files: the device tool returns at most 8).
set -uo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
cd "$ROOT"
OUT=${OUT:-$ROOT/gpu_out}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
DEVICE=${LEAP_GPU_CHECK_DEVICE:-cuda}
case "$DEVICE" in cuda|cpu) ;; *) echo "LEAP_GPU_CHECK_DEVICE must be cuda or cpu, not $DEVICE" >&2; exit 2;; esac
PY=${PYTHON:-python3}
WORK=$(mktemp -d "${TMPDIR:-/tmp}/leap_gpu_check.XXXXXX")
SITE=$WORK/site
# the repository first: its leap_ds and tests packages win over anything installed
export PYTHONPATH="$ROOT:$SITE${PYTHONPATH:+:$PYTHONPATH}"
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1 HF_HOME=$WORK/hf
export TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1
export TORCH_EXTENSIONS_DIR=${TORCH_EXTENSIONS_DIR:-$WORK/torch_extensions}
if [ "$DEVICE" = cuda ]; then export OMP_NUM_THREADS=${OMP_NUM_THREADS:-4}; else export OMP_NUM_THREADS=1; fi
# seconds per stage; 45 + 150 + 60 + 120 = 375 s at most, inside the 420 s the device call gets
T_INSTALL=${T_INSTALL:-45} T_MAIN=${T_MAIN:-150} T_FP16=${T_FP16:-60} T_COST=${T_COST:-120}
RESULTS=$OUT/results.json
START=$(date +%s)

# --------------------------------------------------------------------------- bookkeeping
# record STAGE STATUS SECONDS [JSON file with the stage's figures]; then rewrite gpu.md
record() {
  "$PY" - "$RESULTS" "$1" "$2" "$3" "${4:-}" "$DEVICE" <<'PY'
import json, os, sys
path, stage, status, seconds, figures, device = sys.argv[1:7]
res = json.load(open(path)) if os.path.exists(path) else {"device": device, "stages": {}}
entry = {"status": status, "seconds": int(seconds)}
if figures and os.path.exists(figures):
    entry.update(json.load(open(figures)))
res["stages"][stage] = entry
json.dump(res, open(path, "w"), indent=1)
PY
  "$PY" - "$RESULTS" "$OUT/gpu.md" <<'PY'
import json, sys
res = json.load(open(sys.argv[1]))
L = [f"# GPU check ({res['device']})", "",
     "Written by benchmarks/gpu_check.sh after each stage; results.json holds every figure, "
     "stage*.log the output.", "", "| stage | status | seconds |", "|---|---|---:|"]
for name, s in res["stages"].items():
    L.append(f"| {name} | {s['status']} | {s['seconds']} |")
st = res["stages"]
if "0_install" in st:
    s = st["0_install"]
    L += ["", "## 0 install", "", f"python {s.get('python')}, {s.get('install', '')}", "",
          "| package | version |", "|---|---|"]
    L += [f"| {k} | {v} |" for k, v in s.get("versions", {}).items()]
    if s.get("cuda"):
        L += ["", f"CUDA: {s['cuda']}"]
if "1_main" in st:
    L += ["", "## 1 main job (`python -m leap_ds.train`, 1 rank)", "",
          "| run | precision | ZeRO | backend | steps | target | achieved density | accuracy | "
          "exported model accuracy | dense teacher accuracy | wall (s) |", "|---|---|---:|---|---:|---:|---:|---:|---:|---:|---:|"]
    for name, r in st["1_main"].get("runs", {}).items():
        m = r.get("metrics") or {}
        f = lambda k: "" if m.get(k) is None else (f"{m[k]:.4f}" if isinstance(m[k], float) else m[k])
        L.append(f"| {name} | {r.get('precision')} | {m.get('zero_stage', r.get('zero'))} | {r.get('backend')} | "
                 f"{f('steps')} | {f('target_density')} | {f('achieved_density')} | {f('accuracy')} | "
                 f"{f('exported_model_accuracy')} | {f('dense_accuracy')} | {f('wall_time_s')} |")
        if r.get("error"):
            L.append(f"| {name}: {r['error']} |")
if "2_fp16" in st:
    s = st["2_fp16"]
    L += ["", "## 2 fp16 overflow", "", s.get("note", ""), "",
          f"steps {s.get('steps')}, global_steps {s.get('global_steps')}, skipped_steps {s.get('skipped_steps')}, "
          f"leap_step {s.get('leap_step')} (want leap_step {s.get('expected_leap_step')}, "
          f"skipped_steps {s.get('expected_skipped_steps')})"]
if "3_cost" in st:
    s = st["3_cost"]
    L += ["", "## 3 cost: LEAP vs dense step time (benchmarks/cost.py timing worker, ZeRO-0, 1 rank)", "",
          s.get("note", ""), "", "| precision | configuration | median step (ms) | vs dense (median of paired rounds) | "
          "density after the timed steps |", "|---|---|---:|---:|---:|"]
    for prec, r in s.get("runs", {}).items():
        if "error" in r:
            L.append(f"| {prec} | failed: {r['error']} | | | |")
            continue
        for cfg, t in r["timing"].items():
            d = r.get("densities", {}).get(cfg)
            L.append(f"| {prec} | {cfg} | {1000 * t['median_s']:.1f} | {t.get('paired_ratio', 1.0):.3f} | "
                     f"{'' if d is None else f'{d:.3f}'} |")
open(sys.argv[2], "w").write("\n".join(L) + "\n")
PY
}

# run_stage NAME TIMEOUT FUNCTION: the function's output to $OUT/NAME.log; status from its exit code
run_stage() {
  local name=$1 limit=$2 fn=$3 t0 rc status
  t0=$(date +%s)
  echo "== stage $name (timeout ${limit}s)"
  timeout -k 10 "$limit" bash -c "$fn" >"$OUT/$name.log" 2>&1
  rc=$?
  case $rc in
    0) status=pass;;
    124|137) status="fail: timed out after ${limit}s";;
    *) status="fail: exit code $rc";;
  esac
  record "$name" "$status" "$(( $(date +%s) - t0 ))" "$WORK/$name.json"
  echo "   $status ($(( $(date +%s) - t0 )) s); log: $OUT/$name.log"
  tail -n 5 "$OUT/$name.log" | sed 's/^/   | /'
}
export ROOT OUT DEVICE PY WORK SITE RESULTS T_MAIN T_COST

# --------------------------------------------------------------------------- stage 0
stage_install() {
  set -e
  local install="no wheels installed: "
  if [ "$("$PY" -c 'import sys, platform; print(sys.implementation.name, sys.version_info[:2] == (3, 12), platform.machine())')" != "cpython True x86_64" ]; then
    install+="$PY is not CPython 3.12 on x86-64 (the wheels' platform); using its own packages"
  elif ! ls "$ROOT"/.whl/*.whl >/dev/null 2>&1; then
    install+=".whl/ is empty or missing: run benchmarks/gpu_prepare.sh here and carry .whl"
  else
    "$PY" -m pip install -q --no-index --no-deps --no-compile --target "$SITE" "$ROOT"/.whl/*.whl
    install="installed $(ls "$ROOT"/.whl/*.whl | wc -l) wheels from .whl/ into $SITE"
  fi
  echo "$install"
  "$PY" - "$WORK/0_install.json" "$install" <<'PY'
import importlib, importlib.metadata as md, json, platform, sys
out = {"python": platform.python_version(), "install": sys.argv[2], "versions": {}}
for dist in ("torch", "transformers", "deepspeed", "pydantic", "pydantic_core", "datasets", "pyarrow", "pandas",
             "huggingface_hub", "tokenizers", "numpy", "fsspec", "dill", "multiprocess", "hjson", "matplotlib"):
    try:
        out["versions"][dist] = md.version(dist)
    except md.PackageNotFoundError:
        out["versions"][dist] = "MISSING"
failed = []
for mod in ("torch", "transformers", "deepspeed", "pydantic", "datasets", "matplotlib", "leap_ds.integration.engine"):
    try:
        importlib.import_module(mod)
    except Exception as e:  # recorded, then the stage fails below
        failed.append(f"{mod}: {type(e).__name__}: {e}")
import torch
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    out["cuda"] = (f"{p.name}, {p.total_memory / 2**30:.0f} GiB, torch CUDA {torch.version.cuda}, "
                   f"bf16 {torch.cuda.is_bf16_supported()}, NCCL {'.'.join(map(str, torch.cuda.nccl.version()))}")
out["import_errors"] = failed
json.dump(out, open(sys.argv[1], "w"), indent=1)
print(json.dumps(out, indent=1))
sys.exit(1 if failed else 0)
PY
}

# --------------------------------------------------------------------------- stage 1
stage_main() {
  "$PY" - "$WORK" "$DEVICE" <<'PY'
"""Tiny random BERT with a WordLevel tokenizer built here, a learnable CSV, bf16 configs."""
import csv, json, random, sys
from pathlib import Path
import torch
from tokenizers import Tokenizer, models, pre_tokenizers, processors
from transformers import BertConfig, BertForSequenceClassification, PreTrainedTokenizerFast
work, device = Path(sys.argv[1]), sys.argv[2]
words = [f"w{i:03d}" for i in range(200)]
special = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
vocab = {t: i for i, t in enumerate(special + words)}
tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
tok.pre_tokenizer = pre_tokenizers.Whitespace()
tok.post_processor = processors.TemplateProcessing(
    single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1",
    special_tokens=[("[CLS]", vocab["[CLS]"]), ("[SEP]", vocab["[SEP]"])])
fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]", cls_token="[CLS]",
                               sep_token="[SEP]", mask_token="[MASK]", model_max_length=64)
model_dir = work / "tiny_bert"
fast.save_pretrained(model_dir)
torch.manual_seed(0)
BertForSequenceClassification(BertConfig(
    vocab_size=len(vocab), hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
    max_position_embeddings=64, num_labels=2)).save_pretrained(model_dir)
rng = random.Random(0)
for name, rows in (("train", 640), ("validation", 128)):
    with open(work / f"{name}.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["text", "label"])
        for _ in range(rows):
            text = [rng.choice(words) for _ in range(12)]
            w.writerow([" ".join(text), int(sum(int(t[1:]) < 100 for t in text) > 6)])  # learnable label
root = Path.cwd()
for zero, shipped in ((0, "default.json"), (3, "zero3.json")):
    cfg = json.load(open(root / "ds_configs" / shipped))
    if device == "cuda":
        cfg["bf16"] = {"enabled": True}
    json.dump(cfg, open(work / f"zero{zero}.json", "w"), indent=1)
print("wrote", model_dir, work / "train.csv", work / "zero0.json", work / "zero3.json")
PY
  [ $? -eq 0 ] || return 1
  local rc_all=0 zero rc t0
  for zero in 0 3; do   # half the stage's time each, so the check below still runs after a hang
    t0=$(date +%s)
    timeout -k 5 $(( T_MAIN / 2 - 5 )) "$PY" -m torch.distributed.run --standalone --nproc_per_node=1 -m leap_ds.train \
      --model "$WORK/tiny_bert" --train-file "$WORK/train.csv" --validation-file "$WORK/validation.csv" \
      --deepspeed_config "$WORK/zero$zero.json" --max-steps 12 --teacher-max-steps 6 --max-seq-length 16 \
      --eval-interval 0 --checkpoint-interval 0 --output-dir "$WORK/run_zero$zero" --overwrite \
      --allow-missed-target   # 12 steps: a smoke run of the GPU path, not a pruning run
    rc=$?
    [ $rc -eq 0 ] || rc_all=$rc
    echo "zero $zero: exit code $rc, $(( $(date +%s) - t0 )) s"
  done
  "$PY" - "$WORK" "$DEVICE" <<'PY'
import json, math, sys
from pathlib import Path
work, device = Path(sys.argv[1]), sys.argv[2]
out, bad = {"runs": {}}, []
for zero in (0, 3):
    p = work / f"run_zero{zero}" / "metrics.json"
    r = {"zero": zero, "precision": "bf16" if device == "cuda" else "fp32",
         "backend": "nccl" if device == "cuda" else "gloo"}
    if p.exists():
        r["metrics"] = m = json.load(open(p))
        if not (m.get("zero_stage") == zero and math.isfinite(m["achieved_density"])
                and 0 < m["achieved_density"] <= 1 and m.get("steps") == 12):
            r["error"] = "metrics.json does not show 12 steps at this ZeRO stage with a density in (0, 1]"
    else:
        r["error"] = "no metrics.json (see stage log)"
    bad += [f"zero{zero}"] if "error" in r else []
    out["runs"][f"zero{zero}"] = r
json.dump(out, open(work / "1_main.json", "w"), indent=1)
sys.exit(1 if bad else 0)
PY
  local rc_check=$?
  [ $rc_all -eq 0 ] && [ $rc_check -eq 0 ]
}

# --------------------------------------------------------------------------- stage 2
stage_fp16() {
  local steps=8 at=3
  if [ "$DEVICE" = cuda ]; then
    # train_tiny.py builds its batches on the CPU and inits gloo: move each batch to the GPU, use NCCL
    cat > "$WORK/train_tiny_on_gpu.py" <<'PY'
import runpy, sys
import deepspeed
from tests import tiny_models as tm
_init = deepspeed.init_distributed
deepspeed.init_distributed = lambda *a, **k: _init(**{**k, "dist_backend": "nccl"})
_batches = tm.batches
tm.batches = lambda *a, **k: [(i.cuda(), l.cuda()) for i, l in _batches(*a, **k)]
sys.argv = ["train_tiny.py", *sys.argv[1:]]
runpy.run_path("tests/workers/train_tiny.py", run_name="__main__")
PY
    "$PY" -m torch.distributed.run --standalone --nproc_per_node=1 "$WORK/train_tiny_on_gpu.py" \
      --precision fp16 --overflow-at $at --steps $steps --out "$WORK/fp16" || return 1
    note="real fp16: micro-step $at's loss multiplied by inf; DeepSpeed's loss scaler must skip that step"
  else
    "$PY" -m torch.distributed.run --standalone --nproc_per_node=1 tests/workers/train_tiny.py \
      --skip-step-at $at --steps $steps --out "$WORK/fp16" || return 1
    note="CPU: DeepSpeed refuses fp16 on CPU, so step $at is reported as skipped through engine.was_step_applied() (fp32); this checks the hook, not a real overflow"
  fi
  "$PY" - "$WORK/fp16.rank0.json" "$WORK/2_fp16.json" "$steps" "$note" "$DEVICE" <<'PY'
import json, sys
r = json.load(open(sys.argv[1]))
steps, note, device = int(sys.argv[3]), sys.argv[4], sys.argv[5]
out = {"steps": steps, "global_steps": r["global_steps"], "skipped_steps": r["skipped_steps"],
       "leap_step": r["leap_step"], "expected_leap_step": steps - 1,
       "expected_skipped_steps": 1 if device == "cuda" else 0, "note": note}
json.dump(out, open(sys.argv[2], "w"), indent=1)
print(out)
ok = r["leap_step"] == steps - 1 and r["skipped_steps"] == out["expected_skipped_steps"]
sys.exit(0 if ok else 1)
PY
}

# --------------------------------------------------------------------------- stage 3
stage_cost() {
  # cost.py's worker builds CPU batches, inits gloo and times steps without synchronising:
  # this wrapper moves batches to the GPU, uses NCCL, synchronises after each step and adds bf16.
  cat > "$WORK/cost_on_device.py" <<'PY'
import json, sys
import deepspeed, torch
sys.path.insert(0, "benchmarks")
import cost
precision, device = sys.argv[1], sys.argv[2]
if device == "cuda":
    _init = deepspeed.init_distributed
    deepspeed.init_distributed = lambda *a, **k: _init(**{**k, "dist_backend": "nccl"})
    _batch = cost.batch_for
    cost.batch_for = lambda *a, **k: {n: t.cuda() for n, t in _batch(*a, **k).items()}
    _step = cost.train_step
    cost.train_step = lambda e, b: (_step(e, b), torch.cuda.synchronize())[0]
if precision == "bf16":
    _cfg = cost.ds_config
    cost.ds_config = lambda *a, **k: {**_cfg(*a, **k), "bf16": {"enabled": True}}
cost.main(sys.argv[3:])
PY
  local spec rc_all=0 precisions note
  if [ "$DEVICE" = cuda ]; then
    spec='{"model": "bert", "hidden": 768, "layers": 12, "vocab": 30522, "batch": 32, "seq": 128, "warmup": 3, "steps": 15, "configs": ["dense", "unstructured", "block32x32", "head"], "tag": "a"}'
    precisions="bf16 fp32"
    note="random-initialised BERT-base (12 layers, hidden 768, 12 heads, FFN 3072, vocab 30522), batch 32 x 128 tokens, AdamW (torch), 3 warm-up + 15 timed steps, engines stepped round-robin, torch.cuda.synchronize() after each step"
  else
    spec='{"model": "bert", "hidden": 64, "layers": 2, "vocab": 1024, "batch": 8, "seq": 16, "warmup": 1, "steps": 2, "configs": ["dense", "unstructured", "block32x32", "head"], "tag": "a"}'
    precisions="fp32"
    note="CPU smoke: a tiny random BERT, 2 timed steps; measures nothing"
  fi
  local n=$(wc -w <<<"$precisions")
  for p in $precisions; do   # an equal share of the stage's time each, so the summary below still runs
    timeout -k 5 $(( T_COST / n - 5 )) "$PY" -m torch.distributed.run --standalone --nproc_per_node=1 "$WORK/cost_on_device.py" "$p" "$DEVICE" \
      --worker timing --spec "$spec" --result "$WORK/cost_$p" || rc_all=1
  done
  "$PY" - "$WORK" "$WORK/3_cost.json" "$note" $precisions <<'PY'
import json, sys
from pathlib import Path
work, out_path, note, precisions = Path(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4:]
out = {"note": note, "runs": {}}
for p in precisions:
    f = work / f"cost_{p}.rank0.json"
    if f.exists():
        r = json.load(open(f))
        for t in r["timing"].values():
            t.pop("times_s", None)
        out["runs"][p] = {k: r.get(k) for k in ("timing", "densities", "model_params", "prunable_weights")}
    else:
        out["runs"][p] = {"error": "no result (see stage log)"}
json.dump(out, open(out_path, "w"), indent=1)
PY
  return $rc_all
}
export -f stage_install stage_main stage_fp16 stage_cost

echo "GPU check: device $DEVICE, python $PY, results in $OUT, work in $WORK"
rm -f "$RESULTS"
run_stage 0_install "$T_INSTALL" stage_install
run_stage 1_main "$T_MAIN" stage_main
run_stage 2_fp16 "$T_FP16" stage_fp16
run_stage 3_cost "$T_COST" stage_cost
echo "done in $(( $(date +%s) - START )) s: $OUT/gpu.md"
cat "$OUT/gpu.md"
