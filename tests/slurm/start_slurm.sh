#!/bin/bash
# A throwaway single-host Slurm for the slow tests: munged, slurmctld and two slurmd (-N n1, -N n2)
# on this machine, every file under DIR, ports from BASE_PORT. Needs root and the Debian packages
# `munge slurmctld slurmd slurm-client` (apt-get install -y munge slurmctld slurmd slurm-client).
#
#   tests/slurm/start_slurm.sh DIR [BASE_PORT]   # prints SLURM_CONF=DIR/slurm.conf when the nodes are idle
#   tests/slurm/stop_slurm.sh DIR                # stops them by the pids in DIR
set -euo pipefail

dir=${1:?usage: start_slurm.sh DIR [BASE_PORT]}
base=${2:-16800}
for tool in munged slurmctld slurmd sinfo; do
  command -v "$tool" >/dev/null 2>&1 || [[ -x "/usr/sbin/$tool" ]] || {
    echo "start_slurm.sh: $tool missing (apt-get install munge slurmctld slurmd slurm-client)" >&2
    exit 3
  }
done
[[ "$(id -u)" == 0 ]] || {
  echo "start_slurm.sh: needs root (slurmd runs jobs as their user)" >&2
  exit 3
}
mkdir -p "$dir"
dir=$(cd "$dir" && pwd)
# The launch scripts use Slurm's node names (n1, n2) as host names (the deepspeed --master_addr, the
# hostfile), as on a real cluster. Make them resolve for the daemons and their jobs only: run them in
# a private mount namespace with /etc/hosts + "127.0.0.1 n1 n2" bind-mounted over /etc/hosts.
if [[ -z "${MP_SLURM_NS:-}" ]] && command -v unshare >/dev/null 2>&1 &&
  unshare --mount --propagation private true 2>/dev/null; then
  exec unshare --mount --propagation private env MP_SLURM_NS=1 "$0" "$dir" "$base"
fi
if [[ -n "${MP_SLURM_NS:-}" ]]; then
  { cat /etc/hosts; printf '127.0.0.1 n1 n2\n'; } >"$dir/hosts"
  mount --bind "$dir/hosts" /etc/hosts || echo "start_slurm.sh: cannot bind-mount $dir/hosts; n1/n2 do not resolve inside jobs" >&2
else
  echo "start_slurm.sh: no private mount namespace (unshare); n1/n2 do not resolve inside jobs" >&2
fi
mkdir -p "$dir/state" "$dir/spool/n1" "$dir/spool/n2" "$dir/munge" "$dir/log"
chown munge:munge "$dir/munge"
chmod 711 "$dir"

socket="$dir/munge/munge.socket"
runuser -u munge -- /usr/sbin/munged --socket="$socket" --pid-file="$dir/munge/munged.pid" \
  --log-file="$dir/munge/munged.log" --seed-file="$dir/munge/seed" --force

cat >"$dir/slurm.conf" <<CONF
ClusterName=maskprunetest
SlurmctldHost=localhost(127.0.0.1)
SlurmctldPort=$base
SlurmdPort=$((base + 1))
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
AuthInfo=socket=$socket
CredType=cred/munge
StateSaveLocation=$dir/state
SlurmdSpoolDir=$dir/spool/%n
SlurmctldPidFile=$dir/slurmctld.pid
SlurmdPidFile=$dir/slurmd-%n.pid
SlurmctldLogFile=$dir/log/slurmctld.log
SlurmdLogFile=$dir/log/slurmd-%n.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
ReturnToService=2
MpiDefault=none
SlurmdTimeout=30
InactiveLimit=0
KillWait=10
MinJobAge=600
NodeName=n1 NodeHostname=localhost NodeAddr=127.0.0.1 Port=$((base + 2)) CPUs=2 RealMemory=1000 State=UNKNOWN
NodeName=n2 NodeHostname=localhost NodeAddr=127.0.0.1 Port=$((base + 3)) CPUs=2 RealMemory=1000 State=UNKNOWN
PartitionName=debug Nodes=n1,n2 Default=YES MaxTime=INFINITE State=UP OverSubscribe=NO
CONF

export SLURM_CONF="$dir/slurm.conf"
/usr/sbin/slurmctld -f "$SLURM_CONF" -i
/usr/sbin/slurmd -f "$SLURM_CONF" -N n1
/usr/sbin/slurmd -f "$SLURM_CONF" -N n2
for _ in $(seq 60); do
  if [[ "$(sinfo -h -o '%T' 2>/dev/null | sort -u)" == "idle" ]]; then
    echo "SLURM_CONF=$SLURM_CONF"
    exit 0
  fi
  sleep 0.5
done
echo "start_slurm.sh: nodes did not come up idle; see $dir/log" >&2
sinfo >&2 || true
exit 1
