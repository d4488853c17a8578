#!/usr/bin/env bash
# A one-node Slurm on localhost for development and CI: installs Debian's slurm packages, configures and
# starts munge, slurmctld and slurmd as root without systemd, with fake GPUs (GRES on /dev/null aliases).
#
#   hpc/slurm/local-cluster.sh start        # idempotent; returns when the node is idle
#   hpc/slurm/local-cluster.sh wait JOBID   # until the job (and its array tasks) left the queue; prints states
#   hpc/slurm/local-cluster.sh stop
#
# Settings (environment): LOCAL_SLURM_CPUS (default: nproc, at least 4: the node may declare more CPUs than
# the machine has), LOCAL_SLURM_GPUS (default 2 fake GPUs), LOCAL_SLURM_MEM_MB (default 8000).
set -euo pipefail

CONF_DIR=/etc/slurm
STATE=/var/spool/slurm-local
LOG=/var/log/slurm-local
HOST=$(hostname -s)
CPUS=${LOCAL_SLURM_CPUS:-$(( $(nproc) < 4 ? 4 : $(nproc) ))}
GPUS=${LOCAL_SLURM_GPUS:-2}
MEM=${LOCAL_SLURM_MEM_MB:-8000}

need_root() { [ "$(id -u)" = 0 ] || { echo "local-cluster.sh: must run as root" >&2; exit 1; }; }

install_packages() {
  if ! command -v slurmctld >/dev/null || ! command -v slurmd >/dev/null || ! command -v munged >/dev/null; then
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends slurmctld slurmd slurm-client munge >/dev/null
  fi
}

write_config() {
  mkdir -p "$CONF_DIR" "$STATE/ctld" "$STATE/d" "$LOG" /run/slurm-fakegpu
  for i in $(seq 0 $((GPUS - 1))); do
    [ -c /run/slurm-fakegpu/gpu$i ] || mknod -m 666 /run/slurm-fakegpu/gpu$i c 1 3  # aliases of /dev/null
  done
  cat > "$CONF_DIR/slurm.conf" <<EOF
ClusterName=local
SlurmctldHost=$HOST(127.0.0.1)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
AuthInfo=cred_expire=10
StateSaveLocation=$STATE/ctld
SlurmdSpoolDir=$STATE/d
SlurmctldPidFile=/run/slurmctld.pid
SlurmdPidFile=/run/slurmd.pid
SlurmctldLogFile=$LOG/slurmctld.log
SlurmdLogFile=$LOG/slurmd.log
ProctrackType=proctrack/pgid
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
GresTypes=gpu
SchedulerType=sched/backfill
SchedulerParameters=sched_interval=2,bf_interval=5
DependencyParameters=kill_invalid_depend
EnforcePartLimits=ALL
SlurmdParameters=config_overrides
ReturnToService=2
MinJobAge=3600
MaxJobCount=10000
KillWait=5
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/filetxt
JobCompLoc=$LOG/jobcomp.txt
JobAcctGatherType=jobacct_gather/none
MailProg=/bin/true
NodeName=$HOST NodeAddr=127.0.0.1 CPUs=$CPUS RealMemory=$MEM Gres=gpu:$GPUS State=UNKNOWN
PartitionName=local Nodes=$HOST Default=YES MaxTime=INFINITE State=UP OverSubscribe=NO
EOF
  {
    echo "AutoDetect=off"
    for i in $(seq 0 $((GPUS - 1))); do echo "NodeName=$HOST Name=gpu File=/run/slurm-fakegpu/gpu$i"; done
  } > "$CONF_DIR/gres.conf"
}

start_munge() {
  mkdir -p /run/munge /var/log/munge /var/lib/munge /etc/munge
  chown munge:munge /run/munge /var/log/munge /var/lib/munge /etc/munge
  chmod 0755 /run/munge
  [ -s /etc/munge/munge.key ] || { dd if=/dev/urandom of=/etc/munge/munge.key bs=1024 count=1 status=none;
                                   chown munge:munge /etc/munge/munge.key; chmod 0400 /etc/munge/munge.key; }
  pgrep -x munged >/dev/null || runuser -u munge -- munged --force
}

start() {
  need_root
  install_packages
  write_config
  start_munge
  pgrep -x slurmctld >/dev/null || slurmctld -c  # -c: a fresh start forgets jobs of an earlier run
  pgrep -x slurmd >/dev/null || slurmd -N "$HOST"
  for _ in $(seq 1 60); do
    state=$(sinfo -h -N -n "$HOST" -o %t 2>/dev/null || true)
    case "$state" in
      idle|mix|alloc) echo "local Slurm up: node $HOST ($CPUS CPUs, $GPUS fake GPUs), partition local"; return 0 ;;
      drain*|down*) scontrol update nodename="$HOST" state=resume >/dev/null 2>&1 || true ;;
    esac
    sleep 0.5
  done
  echo "local-cluster.sh: node did not become idle; see $LOG/" >&2
  exit 1
}

stop() {
  need_root
  pkill -x slurmd || true
  pkill -x slurmctld || true
  for _ in $(seq 1 40); do { pgrep -x slurmd || pgrep -x slurmctld; } >/dev/null || break; sleep 0.25; done
  rm -rf "$STATE"
  echo "local Slurm stopped"
}

wait_job() {
  local job=$1
  while squeue -h -j "$job" 2>/dev/null | grep -q .; do sleep 1; done
  # one line per job or array task: JobId [ArrayTaskId] JobState ExitCode Restarts
  scontrol -o show job "$job" 2>/dev/null | while read -r line; do
    grep -oE '(^| )(JobId|ArrayTaskId|JobState|ExitCode|Restarts)=[^ ]+' <<<"$line" | sed 's/^ //' | paste -sd' '
  done
}

case "${1:-}" in
  start) start ;;
  stop) stop ;;
  wait) [ $# -eq 2 ] || { echo "usage: $0 wait JOBID" >&2; exit 2; }; wait_job "$2" ;;
  *) echo "usage: $0 start|stop|wait JOBID" >&2; exit 2 ;;
esac
