#!/bin/bash
# Run by `srun --ntasks-per-node=1` on every node of a distributed stage (launcher.kind = "srun"):
#
#   node_rank_wrapper.sh SLOTS DEEPSPEED [deepspeed options...] SCRIPT [script args...]
#
# writes a node-local DeepSpeed hostfile from the step's node list ("HOST slots=SLOTS" per node) and
# execs DEEPSPEED --hostfile FILE --no_ssh --node_rank $SLURM_NODEID --master_addr FIRST_HOST ...,
# so each node's launcher starts its SLOTS ranks with the right global ranks and nothing uses ssh.
set -euo pipefail
# shellcheck source=launch/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

(($# >= 2)) || mp_die "usage: node_rank_wrapper.sh SLOTS DEEPSPEED [deepspeed args...]"
slots=$1 launcher=$2
shift 2
node_rank="${SLURM_NODEID:?node_rank_wrapper.sh must run under srun (SLURM_NODEID unset)}"
nodelist=$(mp_nodelist) || exit 2
hostfile="${MASKPRUNE_HOSTFILE_DIR:-${TMPDIR:-/tmp}}/maskprune-hostfile.${SLURM_JOB_ID:-0}.${SLURM_STEP_ID:-0}.${node_rank}"
mp_write_hostfile "$hostfile" "$slots" "$nodelist"
master_addr=$(mp_master_addr "$nodelist") || exit 2
mp_default_env
exec "$launcher" --hostfile "$hostfile" --no_ssh --node_rank "$node_rank" \
  --master_addr "$master_addr" "$@"
