#!/usr/bin/env bash
# Fill .whl/ with the wheels benchmarks/gpu_check.sh installs on the lent GPU machine
# (x86-64, CPython 3.12, no package index reachable). Run here, where PyPI is reachable:
#
#   bash benchmarks/gpu_prepare.sh [PYTHON]
#
# PYTHON (default .venv/bin/python, else python3) runs pip; it needs torch when deepspeed has to
# be built from its sdist (DS_BUILD_OPS=0: DeepSpeed JIT-builds any op it needs there, with the
# image's nvcc). Only what the GPU image lacks travels: DeepSpeed, pydantic, datasets and their
# needs that are not on it. The image already holds torch, transformers, huggingface_hub, numpy,
# pandas, pyarrow, matplotlib, psutil, py-cpuinfo, ninja, msgpack, einops, tqdm, xxhash, mpi4py
# (tests/test_gpu_prep.py lists the image and checks that every requirement is met). fsspec,
# dill, multiprocess and typing_extensions travel too, at the versions datasets and pydantic pin.
# Versions are those this project is tested with. .whl/ is git-ignored; carry it: [".whl"].
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${1:-${PYTHON:-}}
if [ -z "$PY" ]; then
  if [ -x .venv/bin/python ]; then PY=.venv/bin/python; else PY=python3; fi
fi
DEST=.whl
WHEELS=(
  pydantic==2.14.4 pydantic_core==2.50.5 annotated-types==0.8.0 typing-inspection==0.4.5
  typing_extensions==4.16.0 hjson==3.1.0
  datasets==5.2.0 dill==0.4.1 multiprocess==0.70.19 fsspec==2026.9.0
)
DEEPSPEED=deepspeed==0.19.8
mkdir -p "$DEST"
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
  -d "$DEST" "${WHEELS[@]}"
if ! ls "$DEST"/deepspeed-0.19.8-*.whl >/dev/null 2>&1; then
  DS_BUILD_OPS=0 "$PY" -m pip wheel -q --no-deps --no-build-isolation "$DEEPSPEED" -w "$DEST"
fi
ls -l "$DEST"
du -ch "$DEST"/*.whl | tail -1
