#!/usr/bin/env bash
# launch/local.sh -- run N ranks of a program on this machine with the `deepspeed` launcher.
#
# Usage: launch/local.sh [options] [--] [PROGRAM [ARGS...]]
#
#   PROGRAM   -m MODULE | path/to/script.py | dotted.module   (default: -m leap_ds.train)
#             If the first word after `--` is an option (e.g. --deepspeed_config), all
#             words go to the default program.
# Options:
#   -n, --nproc N         ranks to start (default: number of GPUs, or of
#                         CUDA_VISIBLE_DEVICES; 1 on CPU)                    [env NPROC]
#   -p, --master-port P   rendezvous port on 127.0.0.1 (default: a free port)  [env MASTER_PORT]
#   -d, --device D        cpu | gpu | auto (default auto: gpu when nvidia-smi lists a GPU)
#                                                                            [env LEAP_DEVICE]
#   -l, --log-dir DIR     one log file per rank in DIR (deepspeed --enable_each_rank_log)
#       --dry-run         print the launcher command and exit
#   -h, --help            this text
#
# CPU (no GPU, or --device cpu): `deepspeed --num_gpus N` starts N CPU processes that
# talk over gloo; OMP_NUM_THREADS defaults to 1 so ranks do not fight over cores.
# GPU (nvidia-smi lists a GPU, or --device gpu): one rank per GPU, N at most the number of
# GPUs. `deepspeed --num_gpus N` (or, when CUDA_VISIBLE_DEVICES is set, its first N GPUs)
# starts rank i with LOCAL_RANK=i; the program (leap_ds.train: deepspeed.init_distributed
# with DeepSpeed's backend for CUDA) talks over NCCL and DeepSpeed puts rank i on device
# cuda:LOCAL_RANK, i.e. the i-th GPU of CUDA_VISIBLE_DEVICES.
# TORCH_EXTENSIONS_DIR defaults to ~/.cache/leap_ds/torch_extensions so DeepSpeed's C++
# ops are compiled once and reused. PYTHON selects the interpreter.
# Each rank runs through launch/rank_exec.sh, which names the rank that failed; when any
# rank fails the launcher stops the others and this script exits non-zero.
#
# Examples:
#   launch/local.sh -n 2 -- --deepspeed_config ds_configs/x.json --output-dir runs/a
#   launch/local.sh -n 2 -- tests/workers/train_tiny.py --steps 20 --out /tmp/t
set -euo pipefail
# shellcheck source=launch/_common.sh
source "$(dirname "${BASH_SOURCE[0]}")/_common.sh"

NPROC=${NPROC:-}
PORT=${MASTER_PORT:-}
LOG_DIR=""
while [ $# -gt 0 ]; do
    case "$1" in
        -n|--nproc) leap_need_value "$1" $#; NPROC=$2; shift 2 ;;
        --nproc=*) NPROC=${1#*=}; shift ;;
        -p|--master-port) leap_need_value "$1" $#; PORT=$2; shift 2 ;;
        --master-port=*) PORT=${1#*=}; shift ;;
        -d|--device) leap_need_value "$1" $#; LEAP_DEVICE=$2; shift 2 ;;
        --device=*) LEAP_DEVICE=${1#*=}; shift ;;
        -l|--log-dir) leap_need_value "$1" $#; LOG_DIR=$2; shift 2 ;;
        --log-dir=*) LOG_DIR=${1#*=}; shift ;;
        --dry-run) LEAP_DRY_RUN=1; shift ;;
        -h|--help) usage; exit 0 ;;
        --) shift; break ;;
        -m) break ;;
        -*) leap_die_usage "unknown option '$1'" ;;
        *) break ;;
    esac
done
leap_parse_program "$@"
leap_resolve_device
leap_setup_env

visible=()
if [ "$LEAP_DEVICE" = gpu ] && [ -n "${CUDA_VISIBLE_DEVICES:-}" ]; then
    IFS=, read -r -a visible <<<"$CUDA_VISIBLE_DEVICES"
fi
if [ -z "$NPROC" ]; then
    if [ ${#visible[@]} -gt 0 ]; then NPROC=${#visible[@]}
    elif [ "$LEAP_DEVICE" = gpu ]; then NPROC=$LEAP_NGPUS
    else NPROC=1; fi
fi
leap_valid_int "--nproc" "$NPROC" 1
[ -n "$PORT" ] || PORT=$(leap_free_port)
leap_valid_int "--master-port" "$PORT" 1

launcher=("$(leap_python)" -u -m deepspeed.launcher.runner --master_port "$PORT")
if [ ${#visible[@]} -gt 0 ]; then
    # deepspeed's own single-node rule: with no count flag it uses exactly the
    # CUDA_VISIBLE_DEVICES GPUs, so keep the first NPROC of them.
    [ "$NPROC" -le "${#visible[@]}" ] || leap_die_usage "--nproc $NPROC > ${#visible[@]} visible GPUs"
    CUDA_VISIBLE_DEVICES=$(IFS=,; echo "${visible[*]:0:$NPROC}")
    export CUDA_VISIBLE_DEVICES
else
    if [ "$LEAP_DEVICE" = gpu ] && [ "$NPROC" -gt "$LEAP_NGPUS" ]; then
        leap_die_usage "--nproc $NPROC > $LEAP_NGPUS GPUs"
    fi
    launcher+=(--num_gpus "$NPROC")
fi
if [ -n "$LOG_DIR" ]; then mkdir -p "$LOG_DIR"; launcher+=(--enable_each_rank_log "$LOG_DIR"); fi
launcher+=(--no_python "$LEAP_LAUNCH_DIR/rank_exec.sh" "${PROG_CMD[@]}" "${PROG_ARGS[@]}")

echo "[leap-launch] local: $NPROC rank(s) on $LEAP_DEVICE, program: $PROG_DESC" >&2
rc=0
leap_run "${launcher[@]}" || rc=$?
if [ "$rc" -ne 0 ]; then
    echo "[leap-launch] local: job FAILED with status $rc (see the rank_exec lines above for the rank)" >&2
fi
exit "$rc"
