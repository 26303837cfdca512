#!/usr/bin/env bash
# A one-node SLURM cluster on this machine, for tests/test_slurm.py and for trying
# `cfx run -m ... hydra/launcher=slurm` without a cluster: Debian's slurmctld, slurmd and munge, started
# directly (a container has no systemd), configured by a slurm.conf this script writes (this host, its CPUs
# and memory, one partition "debug"). Run as root. Idempotent: with the cluster already answering it does
# nothing. Prints one line on success; exits non-zero with the reason when it cannot.
#
#   bash scripts/slurm_local.sh          # start (installs the packages if missing)
#   bash scripts/slurm_local.sh stop     # stop the daemons it started
#
# Munge rather than auth/none (which Debian 12's 22.05 still ships): with auth/none anyone who reaches
# slurmctld's port could run commands as root.
set -uo pipefail

CONF=/etc/slurm/slurm.conf
MARK="# written by cfx scripts/slurm_local.sh"
STATE=/var/spool/cfx-slurm          # slurmctld's state, slurmd's spool, logs, pid files
PARTITION=debug

die() { echo "slurm_local: $*" >&2; exit 1; }

answering() {  # the controller answers and the node takes jobs
  timeout 10 scontrol ping 2>/dev/null | grep -q "is UP" || return 1
  local state
  state=$(timeout 10 sinfo -h -N -o %T 2>/dev/null | head -1)
  [[ $state =~ ^(idle|mixed|allocated|completing)$ ]]
}

pid_alive() { [[ -f $1 ]] && kill -0 "$(cat "$1")" 2>/dev/null; }

if [[ ${1:-} == stop ]]; then
  for p in "$STATE/slurmd.pid" "$STATE/slurmctld.pid"; do pid_alive "$p" && kill "$(cat "$p")"; done
  [[ -f $STATE/munged.pid ]] && pid_alive "$STATE/munged.pid" && kill "$(cat "$STATE/munged.pid")"
  echo "slurm_local: stopped"
  exit 0
fi

[[ $(id -u) == 0 ]] || die "needs root (it installs packages and starts slurmctld/slurmd as root); run it with sudo"

# Ours answering: its daemons alive too (sinfo says idle for SlurmdTimeout, 5 min, after slurmd dies).
if command -v sinfo >/dev/null && [[ -f $CONF ]] && answering &&
   { ! grep -qF "$MARK" "$CONF" || { pid_alive "$STATE/slurmctld.pid" && pid_alive "$STATE/slurmd.pid"; }; }; then
  echo "slurm_local: already running: $(sinfo -h -o '%P %D node(s) %c CPUs %m MB %T' | head -1)"
  exit 0
fi

if [[ -f $CONF ]] && ! grep -qF "$MARK" "$CONF"; then
  die "$CONF exists and was not written by this script; move it away to let the script write its own, or start that cluster yourself"
fi

# --- packages ------------------------------------------------------------------------------------------
need=()
for cmd in slurmctld slurmd sinfo munged; do command -v "$cmd" >/dev/null || need+=("$cmd"); done
if ((${#need[@]})); then
  command -v apt-get >/dev/null || die "missing ${need[*]} and no apt-get to install them (Debian/Ubuntu: slurmctld slurmd slurm-client munge)"
  pkgs=(slurmctld slurmd slurm-client munge)
  export DEBIAN_FRONTEND=noninteractive
  # the package scripts try to start the daemons through init; policy-rc.d (if any) refuses, which is fine
  { apt-get install -y -q --no-install-recommends "${pkgs[@]}" >/tmp/slurm_local_apt.log 2>&1 ||
    { apt-get update -q >>/tmp/slurm_local_apt.log 2>&1 &&
      apt-get install -y -q --no-install-recommends "${pkgs[@]}" >>/tmp/slurm_local_apt.log 2>&1; }; } ||
    die "apt-get install ${pkgs[*]} failed: $(tail -1 /tmp/slurm_local_apt.log) (full log: /tmp/slurm_local_apt.log)"
fi

# --- munge: the daemons and clients authenticate each other through it ---------------------------------
mkdir -p /etc/munge /var/lib/munge /var/log/munge /run/munge "$STATE"
if [[ ! -s /etc/munge/munge.key ]]; then
  mungekey --create --keyfile=/etc/munge/munge.key 2>/dev/null ||
    dd if=/dev/urandom of=/etc/munge/munge.key bs=1 count=1024 status=none || die "cannot create /etc/munge/munge.key"
fi
chown -R munge:munge /etc/munge /var/lib/munge /var/log/munge /run/munge
chmod 0700 /etc/munge && chmod 0400 /etc/munge/munge.key
if ! munge -n 2>/dev/null | unmunge >/dev/null 2>&1; then
  runuser -u munge -- munged --pid-file=/run/munge/munged.pid 2>/tmp/slurm_local_munged.err ||
    die "munged did not start: $(tail -1 /tmp/slurm_local_munged.err)"
  cp /run/munge/munged.pid "$STATE/munged.pid" 2>/dev/null
  for _ in 1 2 3 4 5; do munge -n 2>/dev/null | unmunge >/dev/null 2>&1 && break; sleep 1; done
  munge -n | unmunge >/dev/null 2>&1 || die "munged runs but a credential does not decode (munge -n | unmunge)"
fi

# --- slurm.conf ----------------------------------------------------------------------------------------
host=$(hostname -s)
cpus=$(nproc)
mem_mb=$(awk '/^MemTotal:/ {print int($2 / 1024)}' /proc/meminfo)
mem_mb=$((mem_mb > 2048 ? mem_mb - 1024 : mem_mb))   # leave 1 GB to the system and the daemons
mkdir -p /etc/slurm "$STATE/ctld" "$STATE/d"
cat >"$CONF.new" <<EOF
$MARK: one node, one partition.
ClusterName=cfx
SlurmctldHost=$host(127.0.0.1)
AuthType=auth/munge
CredType=cred/munge
# a one-node test cluster in a container: the daemons run as root
SlurmUser=root
SlurmdUser=root
StateSaveLocation=$STATE/ctld
SlurmdSpoolDir=$STATE/d
SlurmctldPidFile=$STATE/slurmctld.pid
SlurmdPidFile=$STATE/slurmd.pid
SlurmctldLogFile=$STATE/slurmctld.log
SlurmdLogFile=$STATE/slurmd.log
# no cgroups in a container: processes tracked by parent pid, no task binding
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
MpiDefault=none
SchedulerType=sched/backfill
# CPUs and memory are consumable: two 1-CPU jobs share the node
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
# a node that restarts comes back without an operator
ReturnToService=2
# seconds between a job's SIGTERM and its SIGKILL (scancel, scontrol requeue, the time limit)
KillWait=30
NodeName=$host NodeAddr=127.0.0.1 CPUs=$cpus RealMemory=$mem_mb State=UNKNOWN
PartitionName=$PARTITION Nodes=$host Default=YES MaxTime=INFINITE State=UP
EOF
if ! cmp -s "$CONF.new" "$CONF"; then
  mv "$CONF.new" "$CONF"
  # a running daemon with an older slurm.conf: restart it with this one
  for p in "$STATE/slurmd.pid" "$STATE/slurmctld.pid"; do
    pid_alive "$p" && { kill "$(cat "$p")"; sleep 1; }
  done
else
  rm -f "$CONF.new"
fi

# --- the daemons (each forks into the background and writes its pid file) --------------------------------
if ! pid_alive "$STATE/slurmctld.pid"; then
  slurmctld 2>>"$STATE/slurmctld.start.err" || die "slurmctld did not start: $(tail -2 "$STATE/slurmctld.log" 2>/dev/null)"
fi
if ! pid_alive "$STATE/slurmd.pid"; then
  slurmd 2>>"$STATE/slurmd.start.err" || die "slurmd did not start: $(tail -2 "$STATE/slurmd.log" 2>/dev/null)"
fi
for _ in $(seq 30); do answering && break; sleep 1; done
answering || die "slurmctld/slurmd started but the node does not take jobs: $(sinfo -h -N -o '%N %T %E' 2>&1 | head -1); logs: $STATE/slurmctld.log $STATE/slurmd.log"
ran=$(timeout 60 srun -N1 -n1 -t 1 hostname 2>&1) || die "srun hostname failed: $ran"
echo "slurm_local: up: partition $PARTITION on $host ($cpus CPUs, $mem_mb MB), srun hostname -> $ran"
