# shellcheck shell=bash
# launch/_common.sh -- helpers sourced by launch/local.sh, multinode.sh and mpirun.sh.
# Not meant to be run by itself.
#
# Program syntax shared by all launch scripts (everything after the script's own
# options, best after a `--`):
#     (nothing)                    -> python -m leap_ds.train
#     -m MODULE [ARGS...]          -> python -m MODULE ARGS
#     path/to/script.py [ARGS...]  -> python path/to/script.py ARGS
#     dotted.module [ARGS...]      -> python -m dotted.module ARGS (when no such file exists)
#     --flag ... (first token an option other than -m)
#                                  -> python -m leap_ds.train --flag ...
# Environment honoured everywhere:
#     PYTHON                 interpreter for the ranks and the launcher (default: python on PATH)
#     LEAP_DEVICE            cpu | gpu | auto (default auto: gpu when nvidia-smi lists a GPU)
#     TORCH_EXTENSIONS_DIR   DeepSpeed/torch C++ op cache (default ~/.cache/leap_ds/torch_extensions)
#     OMP_NUM_THREADS        default 1 on CPU (several ranks share the cores)

LEAP_LAUNCH_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
LEAP_REPO_ROOT=$(dirname "$LEAP_LAUNCH_DIR")
LEAP_DEFAULT_MODULE=${LEAP_DEFAULT_MODULE:-leap_ds.train}

usage() {  # the comment block at the top of the running script, without the '#'
    awk 'NR == 1 { next } /^#/ { sub(/^# ?/, ""); print; next } { exit }' "$0"
}

leap_die_usage() {  # leap_die_usage MESSAGE: print message + usage to stderr, exit 2
    echo "$(basename "$0"): $1" >&2
    usage >&2
    exit 2
}

leap_need_value() {  # leap_need_value FLAG "$#": the flag needs an argument
    [ "$2" -ge 2 ] || leap_die_usage "option $1 needs a value"
}

leap_python() {
    if [ -n "${PYTHON:-}" ]; then command -v "$PYTHON" || echo "$PYTHON"; return; fi
    command -v python 2>/dev/null || command -v python3 2>/dev/null || echo python3
}

# shellcheck disable=SC2034  # PROG_* are read by the scripts that source this file
# leap_parse_program ARGS...: sets PROG_CMD (array: python -u [-m MOD | SCRIPT]),
# PROG_DESC (text) and PROG_ARGS (array).
leap_parse_program() {
    local py
    py=$(leap_python)
    PROG_ARGS=()
    if [ $# -eq 0 ]; then
        PROG_CMD=("$py" -u -m "$LEAP_DEFAULT_MODULE")
    elif [ "$1" = "-m" ]; then
        [ $# -ge 2 ] || leap_die_usage "-m needs a module name"
        PROG_CMD=("$py" -u -m "$2"); shift 2; PROG_ARGS=("$@")
    elif [[ $1 == -* ]]; then
        PROG_CMD=("$py" -u -m "$LEAP_DEFAULT_MODULE"); PROG_ARGS=("$@")
    elif [[ $1 == *.py ]] || [ -f "$1" ]; then
        PROG_CMD=("$py" -u "$1"); shift; PROG_ARGS=("$@")
    elif [[ $1 =~ ^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*$ ]]; then
        PROG_CMD=("$py" -u -m "$1"); shift; PROG_ARGS=("$@")
    else
        leap_die_usage "cannot tell whether '$1' is a script or a module (no such file)"
    fi
    PROG_DESC="${PROG_CMD[*]:2}"
}

leap_gpu_count() {  # number of GPUs nvidia-smi lists (0 without nvidia-smi)
    command -v nvidia-smi >/dev/null 2>&1 || { echo 0; return; }
    local n
    n=$(nvidia-smi -L 2>/dev/null | grep -c '^GPU ' || true)
    echo "${n:-0}"
}

# leap_resolve_device: sets LEAP_DEVICE to cpu or gpu (from auto) and LEAP_NGPUS.
leap_resolve_device() {
    LEAP_DEVICE=${LEAP_DEVICE:-auto}
    LEAP_NGPUS=$(leap_gpu_count)
    case "$LEAP_DEVICE" in
        auto) if [ "$LEAP_NGPUS" -gt 0 ]; then LEAP_DEVICE=gpu; else LEAP_DEVICE=cpu; fi ;;
        cpu|gpu) ;;
        *) leap_die_usage "device must be cpu, gpu or auto (got '$LEAP_DEVICE')" ;;
    esac
    if [ "$LEAP_DEVICE" = gpu ] && [ "$LEAP_NGPUS" -eq 0 ]; then
        echo "$(basename "$0"): --device gpu but nvidia-smi lists no GPU" >&2; exit 2
    fi
    export LEAP_DEVICE
}

# leap_setup_env: environment every rank should see.
leap_setup_env() {
    export TORCH_EXTENSIONS_DIR=${TORCH_EXTENSIONS_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/leap_ds/torch_extensions}
    mkdir -p "$TORCH_EXTENSIONS_DIR"
    if [ "$LEAP_DEVICE" = cpu ]; then
        export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
        # DeepSpeed picks its CPU accelerator (gloo) by itself on a GPU-less machine;
        # on a GPU machine asked to run on CPU it must be told.
        if [ "$LEAP_NGPUS" -gt 0 ]; then export DS_ACCELERATOR=cpu CUDA_VISIBLE_DEVICES=""; fi
    fi
    # The repository root, so `-m leap_ds.train` imports without an installed package.
    export PYTHONPATH="$LEAP_REPO_ROOT${PYTHONPATH:+:$PYTHONPATH}"
}

leap_free_port() {
    "$(leap_python)" - <<'EOF'
import socket
s = socket.socket()
s.bind(("", 0))
print(s.getsockname()[1])
s.close()
EOF
}

leap_valid_int() {  # leap_valid_int NAME VALUE [MIN]
    [[ $2 =~ ^[0-9]+$ ]] || leap_die_usage "$1 must be a non-negative integer (got '$2')"
    [ "$2" -ge "${3:-0}" ] || leap_die_usage "$1 must be >= ${3:-0} (got '$2')"
}

leap_run() {  # print the command; run it unless LEAP_DRY_RUN=1 (then just print it)
    if [ "${LEAP_DRY_RUN:-0}" = 1 ]; then
        printf '%q ' "$@"; echo
        return 0
    fi
    echo "[leap-launch] $(printf '%q ' "$@")" >&2
    "$@"
}
