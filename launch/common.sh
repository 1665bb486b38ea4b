# shellcheck shell=bash
# Functions shared by the scripts in launch/. Sourcing this file defines functions and nothing else.
#
# Conventions: every command is built as a bash array and run as "${argv[@]}"; nothing from the
# user is ever evaluated as shell text. Names are prefixed mp_ (maskprune) to stay out of the way.

mp_log() { printf '[maskprune-launch %s] %s\n' "$(date +%H:%M:%S)" "$*" >&2; }

mp_die() {
  mp_log "error: $*"
  exit 2
}

# The repository root: MASKPRUNE_HOME, else the parent of the folder holding this file. (sbatch runs
# a *copy* of the batch script from its spool folder, so the batch scripts find common.sh through
# MASKPRUNE_HOME or SLURM_SUBMIT_DIR first; see mp_find_root in pipeline.sbatch.)
mp_root() {
  if [[ -n "${MASKPRUNE_HOME:-}" ]]; then
    printf '%s\n' "$MASKPRUNE_HOME"
  else
    (cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
  fi
}

# The `maskprune` entry point: MASKPRUNE_BIN, else the repository's venv, else PATH.
mp_maskprune_bin() {
  local root
  root=$(mp_root)
  if [[ -n "${MASKPRUNE_BIN:-}" ]]; then
    printf '%s\n' "$MASKPRUNE_BIN"
  elif [[ -x "$root/.venv/bin/maskprune" ]]; then
    printf '%s\n' "$root/.venv/bin/maskprune"
  elif command -v maskprune >/dev/null 2>&1; then
    command -v maskprune
  else
    mp_die "no maskprune executable: set MASKPRUNE_BIN or create $root/.venv (tools/setup.sh)"
  fi
}

# ------------------------------------------------------------------------------ allocation

# The node list of this step (inside srun) or of the job (in the batch script).
mp_nodelist() {
  local nodelist="${1:-${SLURM_STEP_NODELIST:-${SLURM_JOB_NODELIST:-}}}"
  [[ -n "$nodelist" ]] || mp_die "SLURM_JOB_NODELIST is not set: run this inside a Slurm job"
  printf '%s\n' "$nodelist"
}

# mp_hostnames [NODELIST]: one hostname per line, in Slurm's node order (node 0 first).
mp_hostnames() {
  local nodelist
  nodelist=$(mp_nodelist "${1:-}") || exit 2
  scontrol show hostnames "$nodelist" || mp_die "scontrol show hostnames $nodelist failed"
}

# mp_master_addr [NODELIST]: the first hostname, where rank 0 runs.
mp_master_addr() {
  local hosts
  hosts=$(mp_hostnames "${1:-}") || exit 2
  [[ -n "$hosts" ]] || mp_die "scontrol show hostnames returned no host"
  printf '%s\n' "${hosts%%$'\n'*}"
}

# mp_write_hostfile FILE SLOTS [NODELIST]: a DeepSpeed hostfile, "HOST slots=SLOTS" per node.
mp_write_hostfile() {
  local file=$1 slots=$2 hosts host tmp
  [[ "$slots" =~ ^[1-9][0-9]*$ ]] || mp_die "hostfile slots must be a positive integer, got '$slots'"
  hosts=$(mp_hostnames "${3:-}") || exit 2
  tmp="$file.tmp$$"
  : >"$tmp"
  while IFS= read -r host; do
    [[ -n "$host" ]] && printf '%s slots=%s\n' "$host" "$slots" >>"$tmp"
  done <<<"$hosts"
  mv -f "$tmp" "$file"
}

# GPUs (ranks) per node: MASKPRUNE_GPUS_PER_NODE, else what Slurm says, else nvidia-smi, else 1.
mp_gpus_per_node() {
  local n="${MASKPRUNE_GPUS_PER_NODE:-${SLURM_GPUS_ON_NODE:-${SLURM_GPUS_PER_NODE:-}}}"
  n=${n##*:}  # SLURM_GPUS_PER_NODE may read "a100:4"
  if [[ -z "$n" ]] && command -v nvidia-smi >/dev/null 2>&1; then
    n=$(nvidia-smi -L 2>/dev/null | grep -c '^GPU' || true)
  fi
  [[ "$n" =~ ^[1-9][0-9]*$ ]] || n=1
  printf '%s\n' "$n"
}

# A rendezvous port that differs between jobs sharing a node: MASTER_PORT, else 20000 + job id % 20000.
mp_master_port() {
  if [[ -n "${MASTER_PORT:-}" ]]; then
    printf '%s\n' "$MASTER_PORT"
  else
    printf '%s\n' "$((20000 + ${SLURM_JOB_ID:-0} % 20000))"
  fi
}

# Defaults for the distributed environment; a value already set wins. See docs/launch.md.
mp_default_env() {
  export TORCH_NCCL_ASYNC_ERROR_HANDLING="${TORCH_NCCL_ASYNC_ERROR_HANDLING:-1}"
  export NCCL_ASYNC_ERROR_HANDLING="${NCCL_ASYNC_ERROR_HANDLING:-1}"
  export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
  export PYTHONUNBUFFERED=1
}

# ------------------------------------------------------------------------------ stop and requeue
#
# A stop request (SIGUSR1 from `--signal=B:USR1@N`, or SIGTERM) must reach every rank on every node
# at the same step boundary. The batch shell writes RUN/STOP (the run directory is on a shared file
# system; every rank's StopFlag checks the file and all-reduces the flag at the step boundary), and
# forwards the signal to the `maskprune run` driver, which writes the same file and, once the stage
# has saved its checkpoint and exited, starts no further stage. Then the batch script requeues.

MP_STOP_FILE=""
MP_CHILD=""
MP_STOP_REQUESTED=0

mp_on_signal() {
  local sig=$1
  MP_STOP_REQUESTED=1
  mp_log "SIG$sig: stop requested; writing $MP_STOP_FILE and waiting for the checkpoint"
  [[ -n "$MP_STOP_FILE" ]] && : >"$MP_STOP_FILE"
  if [[ -n "$MP_CHILD" ]]; then
    kill -s "$sig" "$MP_CHILD" 2>/dev/null || true
  fi
}

# Ctrl-C: the terminal sends SIGINT to the driver too (same process group), which stops at the next
# step boundary and kills the stage on a second Ctrl-C; forwarding it would count as that second one.
mp_on_interrupt() {
  MP_STOP_REQUESTED=1
  mp_log "Ctrl-C: stop requested; the running stage saves a checkpoint at its next step boundary"
  [[ -n "$MP_STOP_FILE" ]] && : >"$MP_STOP_FILE"
}

# mp_arm_stop RUN_DIR: remove a stop file left by an earlier job, then trap USR1, TERM and INT.
mp_arm_stop() {
  MP_STOP_FILE="$1/STOP"
  mkdir -p "$1"
  rm -f "$MP_STOP_FILE"
  trap 'mp_on_signal USR1' USR1
  trap 'mp_on_signal TERM' TERM
  trap 'mp_on_interrupt' INT
}

# mp_run_child CMD...: run CMD in the background and wait for it, through any number of trapped
# signals (a trap interrupts `wait`); returns CMD's exit status.
mp_run_child() {
  local rc=0
  "$@" &
  MP_CHILD=$!
  while :; do
    wait "$MP_CHILD" || true
    kill -0 "$MP_CHILD" 2>/dev/null || break
  done
  wait "$MP_CHILD" || rc=$?  # bash keeps the status of a reaped child
  MP_CHILD=""
  return "$rc"
}

# mp_requeue_or_exit RC: after the driver exited with RC. A stop request with work left (RC != 0)
# requeues the job (at most MASKPRUNE_MAX_REQUEUES times) and exits 0; otherwise exit RC.
mp_requeue_or_exit() {
  local rc=$1 max="${MASKPRUNE_MAX_REQUEUES:-50}" restarts="${SLURM_RESTART_COUNT:-0}"
  if [[ "$MP_STOP_REQUESTED" != 1 ]]; then
    exit "$rc"
  fi
  if [[ "$rc" == 0 ]]; then
    mp_log "stop requested, but the run finished; not requeueing"
    rm -f "$MP_STOP_FILE"
    exit 0
  fi
  if ((restarts >= max)); then
    mp_die "stopped after $restarts requeues (MASKPRUNE_MAX_REQUEUES=$max); resubmit to continue"
  fi
  [[ -n "${SLURM_JOB_ID:-}" ]] || mp_die "stopped, but not in a Slurm job: run the same command again to resume"
  mp_log "checkpoint saved (driver exit $rc); requeueing job $SLURM_JOB_ID (restart $((restarts + 1)))"
  scontrol requeue "$SLURM_JOB_ID" || mp_die "scontrol requeue $SLURM_JOB_ID failed; resubmit to resume"
  exit 0
}

# ------------------------------------------------------------------------------ batch scripts

# mp_batch_main MODE_ARGS... -- CONFIG RUN_DIR [maskprune run options...]
# The body of pipeline.sbatch and stage.sbatch: the driver runs on the batch host and starts each
# distributed stage through srun (launcher.kind = srun: one task per node running the deepspeed
# launcher; MASKPRUNE_LAUNCH=per_gpu: launcher.kind = srun_tasks, one task per GPU).
mp_batch_main() {
  local extra=()
  while (($#)) && [[ "$1" != "--" ]]; do
    extra+=("$1")
    shift
  done
  [[ "${1:-}" == "--" ]] && shift
  (($# >= 2)) || mp_die "usage: sbatch [options] $(basename "$0") CONFIG RUN_DIR ${extra[*]:+[${extra[*]}]} [maskprune run options...]"
  local config=$1 run_dir=$2 kind bin nodes gpus port
  shift 2
  case "${MASKPRUNE_LAUNCH:-per_node}" in
    per_node) kind=srun ;;
    per_gpu) kind=srun_tasks ;;
    *) mp_die "MASKPRUNE_LAUNCH must be per_node or per_gpu, got '${MASKPRUNE_LAUNCH}'" ;;
  esac
  bin=$(mp_maskprune_bin) || exit 2
  nodes="${SLURM_JOB_NUM_NODES:-${SLURM_NNODES:-1}}"
  gpus=$(mp_gpus_per_node)
  port=$(mp_master_port)
  mp_default_env
  # srun (Slurm >= 22.05) no longer inherits the job's --cpus-per-task: give each task its node's
  # share of the cores, or every rank of a node ends up bound to one core.
  if [[ -z "${SRUN_CPUS_PER_TASK:-}" && "${SLURM_CPUS_ON_NODE:-}" =~ ^[1-9][0-9]*$ ]]; then
    local per_task=$SLURM_CPUS_ON_NODE
    [[ "$kind" == srun_tasks ]] && per_task=$((SLURM_CPUS_ON_NODE / gpus))
    ((per_task >= 1)) || per_task=1
    export SRUN_CPUS_PER_TASK=$per_task
  fi
  mp_arm_stop "$run_dir"
  local argv=("$bin" run "$config" --run-dir "$run_dir"
    --set "launcher.kind=$kind" --set "launcher.num_nodes=$nodes"
    --set "launcher.num_gpus=$gpus" --set "launcher.master_port=$port"
    "${extra[@]}" "$@")
  mp_log "job ${SLURM_JOB_ID:-?} restart ${SLURM_RESTART_COUNT:-0} on ${SLURM_JOB_NODELIST:-?}: ${argv[*]}"
  local rc=0
  mp_run_child "${argv[@]}" || rc=$?
  mp_requeue_or_exit "$rc"
}
