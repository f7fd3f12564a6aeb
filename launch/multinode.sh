#!/usr/bin/env bash
# launch/multinode.sh -- run a program on several hosts with the `deepspeed` launcher.
#
# Usage:
#   (a) from one node, reaching the others over ssh (pdsh):
#       launch/multinode.sh -H HOSTFILE [options] [--] [PROGRAM [ARGS...]]
#   (b) no ssh: run the same command once on every node, with that node's --node-rank:
#       launch/multinode.sh --no-ssh --nnodes K --node-rank I --master-addr A \
#           [--master-port P] [options] [--] [PROGRAM [ARGS...]]
#
#   PROGRAM   -m MODULE | path/to/script.py | dotted.module   (default: -m leap_ds.train)
# Options:
#   -H, --hostfile FILE     `hostname slots=N` lines (launch/hostfile.example). (a): the
#                           hosts, node 0 first. (b): optional, only its order and slot
#                           counts are used; default K nodes with N slots each.
#   -n, --nproc-per-node N  ranks per node (default: hostfile slots; in (b) without a
#                           hostfile: number of GPUs, or 1 on CPU)
#       --num-nodes K       (a): use only the first K hosts of the hostfile
#       --no-ssh            form (b) (deepspeed --no_ssh)
#       --nnodes K          (b): number of nodes
#       --node-rank I       (b): this node's index, 0..K-1 (node 0 hosts the rendezvous)
#       --master-addr A     address of node 0, reachable from every node; required in
#                           (b); in (a) default: the first address of `hostname -I` on
#                           the first host                               [env MASTER_ADDR]
#       --master-port P     rendezvous port (default 29500)              [env MASTER_PORT]
#       --ifname IF         network interface for collectives: sets GLOO_SOCKET_IFNAME and
#                           NCCL_SOCKET_IFNAME (needed when the hostname resolves to an
#                           address the other nodes cannot reach, e.g. 127.0.0.1)
#       --launcher L        (a): deepspeed's multi-node backend: pdsh (default), openmpi,
#                           mpich, impi, mvapich, slurm
#       --launcher-args S   (a): extra arguments for that backend (one string)
#       --ssh-port P        (a): ssh port
#   -d, --device D          cpu | gpu | auto (default auto)              [env LEAP_DEVICE]
#       --dry-run           print the launcher command and exit
#   -h, --help              this text
#
# GPU nodes (nvidia-smi lists a GPU, or --device gpu): one rank per GPU; -n (or the
# hostfile's slots) must not exceed a node's GPUs. Rank j on a node gets LOCAL_RANK=j;
# the program (leap_ds.train) talks over NCCL (DeepSpeed's backend for CUDA) and DeepSpeed
# puts it on device cuda:LOCAL_RANK. --ifname applies to NCCL as to gloo. CPU nodes: gloo,
# OMP_NUM_THREADS=1 unless set.
# (a) needs passwordless ssh from this node to every host, pdsh installed, and the
# repository and its Python environment at the same path on every host (shared file
# system). The remote ranks get LEAP_*, OMP_NUM_THREADS, TORCH_EXTENSIONS_DIR, GLOO_*,
# NCCL_*, DEEPSPEED_*, DS_ACCELERATOR, PYTHON* from this shell (through deepspeed's DS_ENV_FILE).
# (b) is for clusters without ssh between nodes (containers, batch systems): the
# deepspeed launcher's --no_ssh --node_rank mode works on CPU (gloo) as on GPU; each node
# starts its own ranks and they meet at --master-addr:--master-port. A rank that dies
# stops the other ranks on its node (launcher) and the ranks on other nodes see their
# gloo/NCCL connections close and fail; every node's command exits non-zero.
set -euo pipefail
# shellcheck source=launch/_common.sh
source "$(dirname "${BASH_SOURCE[0]}")/_common.sh"

HOSTFILE=""
NPER=""
NUM_NODES=""
NO_SSH=0
NNODES=""
NODE_RANK=""
ADDR=${MASTER_ADDR:-}
PORT=${MASTER_PORT:-29500}
IFNAME=""
LAUNCHER=pdsh
LAUNCHER_ARGS=""
SSH_PORT=""
while [ $# -gt 0 ]; do
    case "$1" in
        -H|--hostfile) leap_need_value "$1" $#; HOSTFILE=$2; shift 2 ;;
        --hostfile=*) HOSTFILE=${1#*=}; shift ;;
        -n|--nproc-per-node) leap_need_value "$1" $#; NPER=$2; shift 2 ;;
        --nproc-per-node=*) NPER=${1#*=}; shift ;;
        --num-nodes) leap_need_value "$1" $#; NUM_NODES=$2; shift 2 ;;
        --num-nodes=*) NUM_NODES=${1#*=}; shift ;;
        --no-ssh) NO_SSH=1; shift ;;
        --nnodes) leap_need_value "$1" $#; NNODES=$2; shift 2 ;;
        --nnodes=*) NNODES=${1#*=}; shift ;;
        --node-rank) leap_need_value "$1" $#; NODE_RANK=$2; shift 2 ;;
        --node-rank=*) NODE_RANK=${1#*=}; shift ;;
        --master-addr) leap_need_value "$1" $#; ADDR=$2; shift 2 ;;
        --master-addr=*) ADDR=${1#*=}; shift ;;
        --master-port) leap_need_value "$1" $#; PORT=$2; shift 2 ;;
        --master-port=*) PORT=${1#*=}; shift ;;
        --ifname) leap_need_value "$1" $#; IFNAME=$2; shift 2 ;;
        --ifname=*) IFNAME=${1#*=}; shift ;;
        --launcher) leap_need_value "$1" $#; LAUNCHER=$2; shift 2 ;;
        --launcher=*) LAUNCHER=${1#*=}; shift ;;
        --launcher-args) leap_need_value "$1" $#; LAUNCHER_ARGS=$2; shift 2 ;;
        --launcher-args=*) LAUNCHER_ARGS=${1#*=}; shift ;;
        --ssh-port) leap_need_value "$1" $#; SSH_PORT=$2; shift 2 ;;
        --ssh-port=*) SSH_PORT=${1#*=}; shift ;;
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
leap_valid_int "--master-port" "$PORT" 1
[ -z "$NPER" ] || leap_valid_int "--nproc-per-node" "$NPER" 1
[ -z "$HOSTFILE" ] || [ -f "$HOSTFILE" ] || leap_die_usage "no hostfile '$HOSTFILE'"
leap_resolve_device
leap_setup_env
if [ -n "$IFNAME" ]; then export GLOO_SOCKET_IFNAME=$IFNAME NCCL_SOCKET_IFNAME=$IFNAME; fi

launcher=("$(leap_python)" -u -m deepspeed.launcher.runner --master_port "$PORT")
tmp_files=()
# shellcheck disable=SC2317  # called by the EXIT trap
cleanup() { [ ${#tmp_files[@]} -eq 0 ] || rm -f "${tmp_files[@]}"; }
trap cleanup EXIT

if [ "$NO_SSH" = 1 ]; then
    [ -n "$NNODES" ] || leap_die_usage "--no-ssh needs --nnodes"
    [ -n "$NODE_RANK" ] || leap_die_usage "--no-ssh needs --node-rank"
    [ -n "$ADDR" ] || leap_die_usage "--no-ssh needs --master-addr (address of node 0)"
    leap_valid_int "--nnodes" "$NNODES" 1
    leap_valid_int "--node-rank" "$NODE_RANK" 0
    [ "$NODE_RANK" -lt "$NNODES" ] || leap_die_usage "--node-rank must be < --nnodes"
    if [ -z "$HOSTFILE" ]; then
        # The launcher only needs K entries, in node-rank order, with their slot counts.
        if [ -z "$NPER" ]; then
            if [ "$LEAP_DEVICE" = gpu ]; then NPER=$LEAP_NGPUS; else NPER=1; fi
        fi
        HOSTFILE=$(mktemp "${TMPDIR:-/tmp}/leap_hostfile.XXXXXX"); tmp_files+=("$HOSTFILE")
        for ((i = 0; i < NNODES; i++)); do echo "node$i slots=$NPER"; done >"$HOSTFILE"
    fi
    # --num_nodes K keeps the first K hosts of a longer hostfile.
    launcher+=(--hostfile "$HOSTFILE" --num_nodes "$NNODES" --no_ssh --node_rank "$NODE_RANK"
               --master_addr "$ADDR")
    desc="node $NODE_RANK of $NNODES (no ssh), master $ADDR:$PORT"
else
    [ -n "$HOSTFILE" ] || leap_die_usage "need --hostfile (or --no-ssh ...)"
    [ -z "$NNODES$NODE_RANK" ] || leap_die_usage "--nnodes/--node-rank only go with --no-ssh"
    [ -z "$NUM_NODES" ] || { leap_valid_int "--num-nodes" "$NUM_NODES" 1; launcher+=(--num_nodes "$NUM_NODES"); }
    [ -z "$ADDR" ] || launcher+=(--master_addr "$ADDR")
    launcher+=(--hostfile "$HOSTFILE" --launcher "$LAUNCHER")
    [ -z "$LAUNCHER_ARGS" ] || launcher+=(--launcher_args "$LAUNCHER_ARGS")
    [ -z "$SSH_PORT" ] || launcher+=(--ssh_port "$SSH_PORT")
    # Environment for the remote ranks: deepspeed adds the KEY=VALUE lines of DS_ENV_FILE
    # to the remote command (an absolute path wins over its ~ and . lookup).
    envfile=$(mktemp "${TMPDIR:-/tmp}/leap_ds_env.XXXXXX"); tmp_files+=("$envfile")
    while IFS='=' read -r name _; do
        case "$name" in
            LEAP_*|OMP_NUM_THREADS|TORCH_EXTENSIONS_DIR|GLOO_*|NCCL_*|DEEPSPEED_*|DS_ACCELERATOR|CUDA_VISIBLE_DEVICES)
                printf '%s=%s\n' "$name" "${!name}" ;;
        esac
    done < <(env) >"$envfile"
    export DS_ENV_FILE=$envfile
    desc="hosts from $HOSTFILE via $LAUNCHER"
fi
[ -z "$NPER" ] || launcher+=(--num_gpus "$NPER")
launcher+=(--no_python "$LEAP_LAUNCH_DIR/rank_exec.sh" "${PROG_CMD[@]}" "${PROG_ARGS[@]}")

echo "[leap-launch] multinode: $desc, $LEAP_DEVICE, program: $PROG_DESC" >&2
rc=0
leap_run "${launcher[@]}" || rc=$?
if [ "$rc" -ne 0 ]; then
    echo "[leap-launch] multinode: job FAILED on this node with status $rc" >&2
fi
exit "$rc"
