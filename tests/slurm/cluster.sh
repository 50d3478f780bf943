#!/usr/bin/env bash
# A real single-node Slurm cluster for the workflow's Slurm test, everything in one private folder.
#
#   tests/slurm/cluster.sh start DIR    write DIR/slurm.conf, link /etc/slurm/slurm.conf to it, start munged,
#                                       slurmctld and slurmd, wait until the node is idle
#   tests/slurm/cluster.sh status DIR   sinfo + squeue of that cluster
#   tests/slurm/cluster.sh stop DIR     stop the three daemons by the pids in their pid files, remove the link
#
# Needs the Debian packages slurmctld slurmd slurm-client munge (Slurm 22.05) and root (slurmd runs jobs as
# their submitter). Everything lives in DIR (its own munge key and socket, state, spool, logs) except the link
# /etc/slurm/slurm.conf -> DIR/slurm.conf: Snakemake's job step clears SLURM_* variables (SLURM_CONF too)
# before its srun, so Slurm's commands inside a job find the configuration only at the default path. An
# existing /etc/slurm/slurm.conf that is not such a link (a real cluster's) is left alone: start fails.
# The daemons listen on 127.0.0.1 (ports 6817/6818, or SLURM_TEST_CTLD_PORT / SLURM_TEST_SLURMD_PORT).
# No accounting database: job status comes from squeue (the profile's slurm-status-command), so finished
# jobs stay visible for MinJobAge seconds (3600 here: `scontrol show job` lists every job of a test run).
# Partitions: `cpu` (default) and `gpu`, both on this node, as profiles/slurm/partitions.yaml names them; the
# node declares one GPU (gres.conf: File=/dev/null, so Slurm sets CUDA_VISIBLE_DEVICES in a GPU job; torch
# sees no CUDA device and the job computes on the CPU).
set -euo pipefail

cmd=${1:-}
dir=${2:-}
if [ -z "$cmd" ] || [ -z "$dir" ]; then
  echo "usage: $0 start|status|stop DIR" >&2
  exit 2
fi
mkdir -p "$dir"
dir=$(cd "$dir" && pwd)
etc_conf=/etc/slurm/slurm.conf
export SLURM_CONF="$dir/slurm.conf"

log() { echo "cluster.sh: $*" >&2; }

pid_of() { # the live pid in pid file $1 (a process named like the file: slurmctld.pid -> slurmctld), else nothing
  local p want
  [ -s "$1" ] || return 0
  p=$(cat "$1")
  want=$(basename "$1" .pid)
  kill -0 "$p" 2>/dev/null || return 0
  # a stale pid file (a killed test run) whose number another process now has is not a running daemon
  if [ -r "/proc/$p/comm" ] && [ "$(cat "/proc/$p/comm")" != "$want" ]; then return 0; fi
  echo "$p"
}

write_config() {
  local host cpus mem_kb real_mb
  host=$(hostname -s)
  cpus=$(nproc)
  mem_kb=$(awk '/^MemTotal:/ {print $2}' /proc/meminfo)
  real_mb=$((mem_kb / 1024 - 2048)) # leave 2 GiB to the system
  [ "$real_mb" -gt 1024 ] || real_mb=1024
  mkdir -p "$dir/munge" "$dir/state" "$dir/spool"
  chmod 700 "$dir/munge"
  cat >"$dir/slurm.conf" <<EOF
# written by tests/slurm/cluster.sh
ClusterName=epmqtest
SlurmctldHost=$host(127.0.0.1)
SlurmctldPort=${SLURM_TEST_CTLD_PORT:-6817}
SlurmdPort=${SLURM_TEST_SLURMD_PORT:-6818}
AuthType=auth/munge
AuthInfo=socket=$dir/munge/munge.socket
CredType=cred/munge
SlurmUser=root
SlurmdUser=root
StateSaveLocation=$dir/state
SlurmdSpoolDir=$dir/spool
SlurmctldPidFile=$dir/slurmctld.pid
SlurmdPidFile=$dir/slurmd.pid
SlurmctldLogFile=$dir/slurmctld.log
SlurmdLogFile=$dir/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
MpiDefault=none
MailProg=/bin/true
ReturnToService=2
MinJobAge=3600
GresTypes=gpu
NodeName=$host NodeAddr=127.0.0.1 CPUs=$cpus RealMemory=$real_mb Gres=gpu:1 State=UNKNOWN
PartitionName=cpu Nodes=ALL Default=YES MaxTime=INFINITE State=UP
PartitionName=gpu Nodes=ALL MaxTime=INFINITE State=UP
EOF
  echo "NodeName=$host Name=gpu File=/dev/null" >"$dir/gres.conf"
  if [ ! -s "$dir/munge/munge.key" ]; then
    if command -v mungekey >/dev/null; then
      mungekey --create --keyfile="$dir/munge/munge.key"
    else
      dd if=/dev/urandom of="$dir/munge/munge.key" bs=1024 count=1 status=none
    fi
    chmod 400 "$dir/munge/munge.key"
  fi
}

start() {
  local need
  for need in munged slurmctld slurmd sinfo sbatch squeue scontrol; do
    command -v "$need" >/dev/null || { log "$need not found (apt-get install slurmctld slurmd slurm-client munge)"; exit 3; }
  done
  [ "$(id -u)" = 0 ] || { log "needs root (slurmd)"; exit 3; }
  if [ -n "$(pid_of "$dir/slurmctld.pid")" ]; then
    log "already running in $dir"
    return 0
  fi
  if [ -L "$etc_conf" ]; then # a link: ours if its target is gone or carries our first line
    local target
    target=$(readlink "$etc_conf")
    if [ -e "$target" ] && ! grep -q '^# written by tests/slurm/cluster.sh' "$target"; then
      log "$etc_conf links to $target, not written by this script: leaving it alone"
      exit 5
    fi
    if [ "$(dirname "$target")" != "$dir" ] && [ -n "$(pid_of "$(dirname "$target")/slurmctld.pid")" ]; then
      log "another test cluster is running from $(dirname "$target")"
      exit 5
    fi
  elif [ -e "$etc_conf" ]; then
    log "$etc_conf exists (a real Slurm configuration?): leaving it alone"
    exit 5
  fi
  write_config
  mkdir -p "$(dirname "$etc_conf")"
  ln -sfn "$dir/slurm.conf" "$etc_conf"
  if [ -z "$(pid_of "$dir/munge/munged.pid")" ]; then
    munged --force --socket="$dir/munge/munge.socket" --key-file="$dir/munge/munge.key" \
      --pid-file="$dir/munge/munged.pid" --log-file="$dir/munge/munged.log" --seed-file="$dir/munge/munged.seed"
  fi
  slurmctld -f "$SLURM_CONF"
  slurmd -f "$SLURM_CONF"
  local i state=""
  for i in $(seq 1 60); do
    state=$(sinfo -h -N -o %t 2>/dev/null | head -1 || true)
    if [ "$state" = idle ]; then
      log "node idle after ${i} check(s); configuration $SLURM_CONF"
      return 0
    fi
    sleep 0.5
  done
  log "node not idle after 30 s (state '${state}'); logs:"
  tail -n 20 "$dir/slurmctld.log" "$dir/slurmd.log" "$dir/munge/munged.log" >&2 2>/dev/null || true
  stop
  exit 4
}

stop() {
  local f p i
  for f in "$dir/slurmd.pid" "$dir/slurmctld.pid" "$dir/munge/munged.pid"; do
    p=$(pid_of "$f")
    [ -n "$p" ] || continue
    kill "$p" 2>/dev/null || true
    for i in $(seq 1 50); do
      kill -0 "$p" 2>/dev/null || break
      sleep 0.1
    done
    if kill -0 "$p" 2>/dev/null; then
      log "pid $p ($f) did not stop; killing it"
      kill -9 "$p" 2>/dev/null || true
    fi
  done
  if [ -L "$etc_conf" ] && [ "$(readlink "$etc_conf")" = "$dir/slurm.conf" ]; then
    rm -f "$etc_conf"
  fi
}

case "$cmd" in
  start) start ;;
  stop) stop ;;
  status)
    sinfo
    squeue
    ;;
  *)
    echo "usage: $0 start|status|stop DIR" >&2
    exit 2
    ;;
esac
