#!/bin/bash
# The whole pipeline on one machine (no Slurm):
#
#   launch/local.sh configs/tiny.toml runs/tiny [maskprune run options...]
#
# Distributed stages use the config's launcher (deepspeed on this machine's GPUs, or CPU ranks).
# `kill -USR1 <pid of this script>` (or SIGTERM, or `touch RUN/STOP`) stops the run gracefully: the
# running stage saves a checkpoint at its next step boundary and the driver starts no further stage;
# the same command resumes. Ctrl-C does the same; a second Ctrl-C kills the running stage (the run
# resumes from its last checkpoint).
set -euo pipefail
# shellcheck source=launch/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

(($# >= 2)) || mp_die "usage: launch/local.sh CONFIG RUN_DIR [maskprune run options...]"
config=$1 run_dir=$2
shift 2
bin=$(mp_maskprune_bin) || exit 2
mp_default_env
mp_arm_stop "$run_dir"
rc=0
mp_run_child "$bin" run "$config" --run-dir "$run_dir" "$@" || rc=$?
if [[ "$MP_STOP_REQUESTED" == 1 && "$rc" != 0 ]]; then
  mp_log "stopped with a checkpoint; run the same command again to resume"
fi
exit "$rc"
