#!/usr/bin/env bash
# launch/mpirun.sh -- run a program under OpenMPI's mpirun; ranks find each other through
# mpi4py (the program calls deepspeed.init_distributed(..., auto_mpi_discovery=True)),
# and communicate over gloo (CPU) or NCCL (GPU): MPI only starts the processes.
#
# Usage: launch/mpirun.sh [options] [--] [PROGRAM [ARGS...]]
#
#   PROGRAM   -m MODULE | path/to/script.py | dotted.module   (default: -m leap_ds.train)
# Options:
#   -n, --np N             total ranks (default: sum of hostfile slots; else number of
#                          GPUs; else 1)                                       [env NP]
#   -H, --hostfile FILE    OpenMPI hostfile (`host slots=N` lines); default: this machine
#   -N, --npernode N       ranks per node (mpirun --npernode N)
#       --rank-env         do not rely on mpi4py: launch/rank_exec.sh sets RANK,
#                          WORLD_SIZE, LOCAL_RANK from OMPI_COMM_WORLD_* and MASTER_ADDR /
#                          MASTER_PORT come from the options below
#       --master-addr A    rendezvous address with --rank-env (default: first hostfile
#                          host, else 127.0.0.1)                         [env MASTER_ADDR]
#       --master-port P    rendezvous port with --rank-env (default: free port, 29500
#                          with a hostfile)                              [env MASTER_PORT]
#                          With mpi4py discovery the flag (not the env var) exports
#                          MASTER_PORT, which only counts if the program passes it on
#                          as init_distributed(distributed_port=...).
#   -x, --export VAR       also export VAR to the ranks (repeatable)
#       --mpi-arg ARG      extra argument for mpirun, e.g. --mpi-arg=--mca (repeatable)
#   -d, --device D         cpu | gpu | auto (default auto)                 [env LEAP_DEVICE]
#       --dry-run          print the mpirun command and exit
#   -h, --help             this text
#
# mpi4py discovery (the default) takes MASTER_ADDR from `hostname -I` on rank 0 and
# MASTER_PORT from the program's init_distributed(distributed_port=...), 29500 unless the
# program passes another; RANK/WORLD_SIZE/LOCAL_RANK/MASTER_ADDR/MASTER_PORT are removed
# from the environment so discovery always runs. Use --rank-env to pick the port with any
# program.
# Always: OMP_NUM_THREADS=1 on CPU, --bind-to none, --oversubscribe on CPU (ranks may
# outnumber cores), --allow-run-as-root when run as root; TORCH_EXTENSIONS_DIR, PATH,
# PYTHONPATH, LD_LIBRARY_PATH and every LEAP_*, NCCL_*, GLOO_*, DEEPSPEED_*, DS_*, TORCH_*
# variable are exported to remote ranks. mpirun stops all ranks when one fails and
# names it; launch/rank_exec.sh prints a line naming the failed rank too. With a hostfile,
# the repository (launch/rank_exec.sh, the program) and the Python environment must be at
# the same paths on every host, and mpirun must reach them by passwordless ssh.
set -euo pipefail
# shellcheck source=launch/_common.sh
source "$(dirname "${BASH_SOURCE[0]}")/_common.sh"

NP=${NP:-}
HOSTFILE=""
NPERNODE=""
RANK_ENV=0
ADDR=${MASTER_ADDR:-}
PORT=${MASTER_PORT:-}
PORT_GIVEN=0
EXTRA_EXPORTS=()
MPI_ARGS=()
while [ $# -gt 0 ]; do
    case "$1" in
        -n|--np) leap_need_value "$1" $#; NP=$2; shift 2 ;;
        --np=*) NP=${1#*=}; shift ;;
        -H|--hostfile) leap_need_value "$1" $#; HOSTFILE=$2; shift 2 ;;
        --hostfile=*) HOSTFILE=${1#*=}; shift ;;
        -N|--npernode) leap_need_value "$1" $#; NPERNODE=$2; shift 2 ;;
        --npernode=*) NPERNODE=${1#*=}; shift ;;
        --rank-env) RANK_ENV=1; shift ;;
        --master-addr) leap_need_value "$1" $#; ADDR=$2; shift 2 ;;
        --master-addr=*) ADDR=${1#*=}; shift ;;
        --master-port) leap_need_value "$1" $#; PORT=$2; PORT_GIVEN=1; shift 2 ;;
        --master-port=*) PORT=${1#*=}; PORT_GIVEN=1; shift ;;
        -x|--export) leap_need_value "$1" $#; EXTRA_EXPORTS+=("$2"); shift 2 ;;
        --export=*) EXTRA_EXPORTS+=("${1#*=}"); shift ;;
        --mpi-arg) leap_need_value "$1" $#; MPI_ARGS+=("$2"); shift 2 ;;
        --mpi-arg=*) MPI_ARGS+=("${1#*=}"); shift ;;
        -d|--device) leap_need_value "$1" $#; LEAP_DEVICE=$2; shift 2 ;;
        --device=*) LEAP_DEVICE=${1#*=}; shift ;;
        --dry-run) LEAP_DRY_RUN=1; shift ;;
        -h|--help) usage; exit 0 ;;
        --) shift; break ;;
        -m) break ;;
        -*) leap_die_usage "unknown option '$1'" ;;
        *) break ;;
    esac
done
leap_parse_program "$@"
command -v mpirun >/dev/null 2>&1 || { echo "mpirun.sh: mpirun not found (apt-get install openmpi-bin)" >&2; exit 127; }
leap_resolve_device
leap_setup_env

first_host=""
slots_total=0
if [ -n "$HOSTFILE" ]; then
    [ -f "$HOSTFILE" ] || leap_die_usage "no hostfile '$HOSTFILE'"
    while read -r host rest; do
        case "$host" in ''|\#*) continue ;; esac
        [ -n "$first_host" ] || first_host=$host
        s=$(sed -n 's/.*slots=\([0-9]\+\).*/\1/p' <<<"$rest")
        slots_total=$((slots_total + ${s:-1}))
    done <"$HOSTFILE"
fi
if [ -z "$NP" ]; then
    if [ "$slots_total" -gt 0 ]; then NP=$slots_total
    elif [ "$LEAP_DEVICE" = gpu ]; then NP=$LEAP_NGPUS
    else NP=1; fi
fi
leap_valid_int "--np" "$NP" 1

if [ "$RANK_ENV" = 1 ]; then
    ADDR=${ADDR:-${first_host:-127.0.0.1}}
    if [ -z "$PORT" ]; then
        if [ -n "$HOSTFILE" ]; then PORT=29500; else PORT=$(leap_free_port); fi
    fi
    leap_valid_int "--master-port" "$PORT" 1
    export MASTER_ADDR=$ADDR MASTER_PORT=$PORT LEAP_RANK_ENV=mpi
else
    # Let the program's mpi4py discovery fill these (it only runs when one is missing).
    unset RANK WORLD_SIZE LOCAL_RANK LOCAL_SIZE MASTER_ADDR MASTER_PORT LEAP_RANK_ENV
    # Discovery sets MASTER_PORT to init_distributed's distributed_port; a program that
    # passes distributed_port=int(os.environ.get("MASTER_PORT", 29500)) honours this.
    if [ "$PORT_GIVEN" = 1 ]; then leap_valid_int "--master-port" "$PORT" 1; export MASTER_PORT=$PORT; fi
fi

cmd=(mpirun -np "$NP" --bind-to none)
[ "$(id -u)" -eq 0 ] && cmd+=(--allow-run-as-root)
[ "$LEAP_DEVICE" = cpu ] && cmd+=(--oversubscribe)
[ -n "$HOSTFILE" ] && cmd+=(--hostfile "$HOSTFILE")
[ -n "$NPERNODE" ] && { leap_valid_int "--npernode" "$NPERNODE" 1; cmd+=(--npernode "$NPERNODE"); }
# Environment for ranks on other hosts (local ranks inherit it anyway).
exports=(PATH PYTHONPATH LD_LIBRARY_PATH OMP_NUM_THREADS TORCH_EXTENSIONS_DIR VIRTUAL_ENV
         CUDA_VISIBLE_DEVICES MASTER_ADDR MASTER_PORT)
while IFS='=' read -r name _; do
    case "$name" in LEAP_*|NCCL_*|GLOO_*|DEEPSPEED_*|DS_*|TORCH_*) exports+=("$name") ;; esac
done < <(env)
exports+=("${EXTRA_EXPORTS[@]}")
declare -A seen=()
for v in "${exports[@]}"; do
    [ -n "${seen[$v]:-}" ] && continue
    seen[$v]=1
    if [ -n "${!v+x}" ]; then cmd+=(-x "$v"); fi
done
cmd+=("${MPI_ARGS[@]}" "$LEAP_LAUNCH_DIR/rank_exec.sh" "${PROG_CMD[@]}" "${PROG_ARGS[@]}")

echo "[leap-launch] mpirun: $NP rank(s) on $LEAP_DEVICE, $([ "$RANK_ENV" = 1 ] && echo "rank env from OMPI, master $ADDR:$PORT" || echo "mpi4py discovery"), program: $PROG_DESC" >&2
rc=0
leap_run "${cmd[@]}" || rc=$?
if [ "$rc" -ne 0 ]; then
    echo "[leap-launch] mpirun: job FAILED with status $rc (mpirun and rank_exec name the rank above)" >&2
fi
exit "$rc"
