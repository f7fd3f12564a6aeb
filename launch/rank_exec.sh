#!/usr/bin/env bash
# launch/rank_exec.sh -- runs ONE rank for launch/{local,multinode,mpirun}.sh and
# launch/slurm/leap.sbatch. You normally do not call it yourself.
#
# Usage: rank_exec.sh [--local_rank=N] PYTHON [-u] (-m MODULE | SCRIPT) [ARGS...]
#
#  * --local_rank=N, put first by the deepspeed launcher (which starts this script with
#    --no_python), is moved to right after MODULE/SCRIPT: the program sees the same
#    command line as under plain `deepspeed prog.py`.
#  * LEAP_RANK_ENV=mpi   : RANK/WORLD_SIZE/LOCAL_RANK/LOCAL_SIZE from OpenMPI
#                          (OMPI_COMM_WORLD_*) or MPICH/Hydra (PMI_RANK/PMI_SIZE,
#                          MPI_LOCALRANKID); MASTER_ADDR/MASTER_PORT must be exported.
#    LEAP_RANK_ENV=slurm : the same from SLURM_PROCID/SLURM_NTASKS/SLURM_LOCALID.
#    (unset)             : leave the environment alone (deepspeed launcher already set
#                          it, or the program discovers ranks through mpi4py).
#  * Defaults: OMP_NUM_THREADS=1 when LEAP_DEVICE=cpu; TORCH_EXTENSIONS_DIR under ~/.cache.
#  * LEAP_DEVICE=gpu: the program's GPU is cuda:LOCAL_RANK (DeepSpeed's rule). When the task
#    sees a single GPU (CUDA_VISIBLE_DEVICES with one entry, e.g. srun --gpus-per-task=1)
#    LOCAL_RANK is set to 0 (the node-local rank stays in LEAP_NODE_LOCAL_RANK); a task that
#    sees several GPUs but not LOCAL_RANK+1 stops with an error.
#  * The program runs as a child; TERM/HUP/USR1/USR2 are forwarded to it (INT as TERM). When it
#    fails this prints one line to stderr naming the rank, e.g.
#      [leap-launch] rank 1 (local rank 1 on vm, pid 1234) FAILED: killed by signal 9 (KILL)
#    and exits with the program's status (128+N for signal N). When it was stopped by a
#    signal sent to this wrapper (a launcher tearing down the job) the line says so
#    instead of FAILED; a program that checkpointed on a signal and exited with
#    leap_ds/apps/preemption.py's status (75) is reported as "checkpointed and stopped".
set -uo pipefail

if [ $# -eq 0 ] || [ "${1:-}" = -h ] || [ "${1:-}" = --help ]; then
    sed -n '2,27p' "$0" | sed 's/^# \{0,1\}//'
    [ $# -eq 0 ] && exit 2 || exit 0
fi

local_rank_arg=()
if [[ $1 == --local_rank=* ]]; then local_rank_arg=("$1"); shift; fi

# Split "PYTHON [-u] (-m MODULE | SCRIPT)" from the program's own arguments.
cmd=("$1"); shift
if [ "${1:-}" = -u ]; then cmd+=("$1"); shift; fi
if [ "${1:-}" = -m ]; then cmd+=("$1" "$2"); shift 2; elif [ $# -gt 0 ]; then cmd+=("$1"); shift; fi
cmd+=("${local_rank_arg[@]}" "$@")

case "${LEAP_RANK_ENV:-}" in
    mpi)
        export RANK=${OMPI_COMM_WORLD_RANK:-${PMI_RANK:-${PMIX_RANK:-}}}
        export WORLD_SIZE=${OMPI_COMM_WORLD_SIZE:-${PMI_SIZE:-}}
        export LOCAL_RANK=${OMPI_COMM_WORLD_LOCAL_RANK:-${MPI_LOCALRANKID:-${PALS_LOCAL_RANKID:-}}}
        export LOCAL_SIZE=${OMPI_COMM_WORLD_LOCAL_SIZE:-${MPI_LOCALNRANKS:-}}
        if [ -z "$RANK" ] || [ -z "$WORLD_SIZE" ] || [ -z "$LOCAL_RANK" ]; then
            echo "[leap-launch] LEAP_RANK_ENV=mpi but no OMPI_COMM_WORLD_*/PMI_* rank variables" >&2
            exit 2
        fi
        [ -n "$LOCAL_SIZE" ] || unset LOCAL_SIZE ;;
    slurm)
        export RANK=$SLURM_PROCID WORLD_SIZE=$SLURM_NTASKS LOCAL_RANK=$SLURM_LOCALID
        # Tasks on this node (SLURM_NTASKS_PER_NODE may be "2(x3)" or unset).
        if [ -n "${SLURM_STEP_TASKS_PER_NODE:-}" ]; then export LOCAL_SIZE=${SLURM_STEP_TASKS_PER_NODE%%(*}; fi ;;
    "") ;;
    *) echo "[leap-launch] LEAP_RANK_ENV must be mpi or slurm (got '$LEAP_RANK_ENV')" >&2; exit 2 ;;
esac

if [ "${LEAP_DEVICE:-}" = cpu ]; then export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}; fi
# GPU: DeepSpeed puts the rank on device LOCAL_RANK (cuda:LOCAL_RANK), counted among the
# GPUs in CUDA_VISIBLE_DEVICES. When the launcher shows each task only its own GPU
# (srun --gpus-per-task=1) that list has one entry and LOCAL_RANK > 0 would point past it.
if [ "${LEAP_DEVICE:-}" = gpu ] && [ -n "${CUDA_VISIBLE_DEVICES:-}" ] && [[ ${LOCAL_RANK:-} =~ ^[0-9]+$ ]]; then
    IFS=, read -r -a visible_gpus <<<"$CUDA_VISIBLE_DEVICES"
    if [ "$LOCAL_RANK" -ge "${#visible_gpus[@]}" ]; then
        if [ "${#visible_gpus[@]}" -ne 1 ]; then
            echo "[leap-launch] rank ${RANK:-?}: local rank $LOCAL_RANK but this task sees only" \
                 "${#visible_gpus[@]} GPUs (CUDA_VISIBLE_DEVICES=$CUDA_VISIBLE_DEVICES); one rank per GPU:" \
                 "give each task one GPU (srun --gpus-per-task=1) or every task all of the node's GPUs" >&2
            exit 2
        fi
        export LEAP_NODE_LOCAL_RANK=$LOCAL_RANK LOCAL_RANK=0
    fi
fi
export TORCH_EXTENSIONS_DIR=${TORCH_EXTENSIONS_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/leap_ds/torch_extensions}

rank=${RANK:-${OMPI_COMM_WORLD_RANK:-${PMI_RANK:-${SLURM_PROCID:-?}}}}
lrank=${LOCAL_RANK:-${OMPI_COMM_WORLD_LOCAL_RANK:-${SLURM_LOCALID:-?}}}
host=$(hostname 2>/dev/null || echo '?')

stopped_by=""
first_signal=""
# shellcheck disable=SC2317
stopped_status() {  # the status of a program that checkpointed on a stop request (leap_ds/apps/preemption.py)
    "${cmd[0]}" "$(dirname "$(cd "$(dirname "$0")" && pwd)")/leap_ds/apps/preemption.py" --exit-status 2>/dev/null || echo none
}
# shellcheck disable=SC2317  # called by the traps below
forward() {  # forward SIG: pass a signal on to the program
    stopped_by=$1
    first_signal=${first_signal:-$1}
    # A background child of a non-interactive shell ignores SIGINT: send TERM instead.
    local sig=$1; [ "$sig" = INT ] && sig=TERM
    [ -n "${child:-}" ] && kill -s "$sig" "$child" 2>/dev/null
}
for sig in TERM INT HUP USR1 USR2; do
    # shellcheck disable=SC2064
    trap "forward $sig" "$sig"
done

"${cmd[@]}" &
child=$!
status=0
while :; do
    wait "$child"; status=$?
    # wait returns early (status > 128) when a trapped signal arrives; the program
    # may still be running then.
    kill -0 "$child" 2>/dev/null || break
done

if [ "$status" -ne 0 ]; then
    if [ "$status" -gt 128 ] && [ "$status" -lt 160 ]; then
        what="killed by signal $((status - 128)) ($(kill -l $((status - 128)) 2>/dev/null || echo '?'))"
    else
        what="exit status $status"
    fi
    if [ "$status" = "$(stopped_status)" ]; then
        echo "[leap-launch] rank $rank (local rank $lrank on $host, pid $child) checkpointed and stopped" \
             "on a stop request${first_signal:+ (SIG$first_signal)}: $what" >&2
    elif [ -n "$stopped_by" ] && [ "$stopped_by" != USR1 ] && [ "$stopped_by" != USR2 ]; then
        echo "[leap-launch] rank $rank (local rank $lrank on $host, pid $child) stopped after SIG$stopped_by from the launcher: $what" >&2
    else
        echo "[leap-launch] rank $rank (local rank $lrank on $host, pid $child) FAILED: $what" >&2
    fi
fi
exit "$status"
