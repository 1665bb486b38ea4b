#!/bin/bash
# Stop what tests/slurm/start_slurm.sh DIR started, by the pids it recorded under DIR.
set -uo pipefail

dir=${1:?usage: stop_slurm.sh DIR}
pids=()
for file in "$dir/slurmd-n1.pid" "$dir/slurmd-n2.pid" "$dir/slurmctld.pid" "$dir/munge/munged.pid"; do
  [[ -s "$file" ]] || continue
  pid=$(<"$file")
  if [[ "$pid" =~ ^[0-9]+$ ]] && kill -0 "$pid" 2>/dev/null; then
    kill -TERM "$pid" && pids+=("$pid")
  fi
done
for _ in $(seq 40); do
  alive=0
  for pid in "${pids[@]}"; do
    kill -0 "$pid" 2>/dev/null && alive=1
  done
  ((alive)) || exit 0
  sleep 0.25
done
for pid in "${pids[@]}"; do
  kill -KILL "$pid" 2>/dev/null || true
done
exit 0
