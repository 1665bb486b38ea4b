#!/bin/bash
# Run by `srun --ntasks-per-node=GPUS` as every rank of a distributed stage (launcher.kind =
# "srun_tasks", the one-task-per-GPU pattern for clusters where a per-node launcher is unwanted):
#
#   task_rank_wrapper.sh MASTER_PORT CMD [args...]
#
# exports RANK / LOCAL_RANK / WORLD_SIZE / NODE_RANK from SLURM_PROCID / SLURM_LOCALID /
# SLURM_NTASKS / SLURM_NODEID, MASTER_ADDR (the step's first host) and MASTER_PORT, then execs CMD.
# Every task must see all GPUs of its node (no --gpus-per-task): the rank picks cuda:LOCAL_RANK.
set -euo pipefail
# shellcheck source=launch/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

(($# >= 2)) || mp_die "usage: task_rank_wrapper.sh MASTER_PORT CMD [args...]"
port=$1
shift
: "${SLURM_PROCID:?task_rank_wrapper.sh must run under srun (SLURM_PROCID unset)}"
export RANK="$SLURM_PROCID"
export LOCAL_RANK="${SLURM_LOCALID:?SLURM_LOCALID unset}"
export WORLD_SIZE="${SLURM_NTASKS:?SLURM_NTASKS unset}"
export NODE_RANK="${SLURM_NODEID:-0}"
MASTER_ADDR=$(mp_master_addr) || exit 2
export MASTER_ADDR
export MASTER_PORT="$port"
mp_default_env
exec "$@"
