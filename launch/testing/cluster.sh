#!/usr/bin/env bash
# A real SLURM cluster of separate network hosts on this machine (root only), for tests and trials.
#
#   launch/testing/cluster.sh up       # munge + slurmctld (root namespace) + one slurmd per host namespace
#   launch/testing/cluster.sh status   # daemons, hosts, sinfo
#   launch/testing/cluster.sh heal     # restart the slurmd of a host whose processes were all killed
#   launch/testing/cluster.sh down     # stop the daemons, delete the namespaces and the bridge
#   launch/testing/cluster.sh env      # print `export SLURM_CONF=...` for a shell that wants to sbatch
#
# Every SLURM node hN is its own network namespace with its own address 10.77.0.1N on a bridge
# (10.77.0.1 in the root namespace, where slurmctld listens). Traffic stays between these
# addresses and loopback. Losing host N: `ip netns pids hN | xargs kill -9`.
# Knobs (environment): SKIPFREE_CLUSTER_HOSTS (3), SKIPFREE_CLUSTER_DIR (/tmp/skipfree-cluster),
# SKIPFREE_CLUSTER_CPUS (CPUs per node, 2; more than the machine has is accepted: config_overrides).
# Recipe and measurements: docs/slurm.md.
set -euo pipefail

N=${SKIPFREE_CLUSTER_HOSTS:-3}
DIR=${SKIPFREE_CLUSTER_DIR:-/tmp/skipfree-cluster}
CPUS=${SKIPFREE_CLUSTER_CPUS:-2}
BR=sfbr0
NET=10.77.0
CONF=$DIR/slurm.conf
CTL=$(hostname -s)

die() { echo "cluster.sh: $*" >&2; exit 2; }

need_root() {
  [ "$(id -u)" = 0 ] || die "needs root (network namespaces, slurmd); run it as root or use a real cluster"
  for b in slurmctld slurmd munged nsenter ip scontrol sinfo; do
    command -v "$b" >/dev/null || die "$b not found: apt-get install -y slurm-wlm munge (or run .ci/run)"
  done
}

hosts() { seq 1 "$N" | sed 's/^/h/'; }

write_conf() {
  mkdir -p "$DIR/state" "$DIR/log"
  {
    echo "ClusterName=skipfree"
    echo "SlurmctldHost=$CTL($NET.1)"
    echo "SlurmUser=root"
    echo "AuthType=auth/munge"
    echo "CredType=cred/munge"
    echo "ProctrackType=proctrack/linuxproc"
    echo "TaskPlugin=task/none"
    echo "SelectType=select/cons_tres"
    echo "SelectTypeParameters=CR_CPU"
    echo "ReturnToService=2"
    echo "MpiDefault=none"
    echo "SlurmdParameters=config_overrides"
    echo "SwitchType=switch/none"
    echo "JobAcctGatherType=jobacct_gather/none"
    echo "AccountingStorageType=accounting_storage/none"
    echo "SchedulerType=sched/backfill"
    echo "SlurmctldPort=16817"
    echo "SlurmdPort=16818"
    echo "StateSaveLocation=$DIR/state"
    echo "SlurmdSpoolDir=$DIR/spool/%n"
    echo "SlurmctldPidFile=$DIR/slurmctld.pid"
    echo "SlurmdPidFile=$DIR/slurmd.%n.pid"
    echo "SlurmctldLogFile=$DIR/log/slurmctld.log"
    echo "SlurmdLogFile=$DIR/log/slurmd.%n.log"
    # A lost host must be noticed within seconds, and its node come back when its slurmd does.
    echo "SlurmdTimeout=10"
    echo "SlurmctldTimeout=10"
    echo "MessageTimeout=5"
    echo "KillWait=5"
    echo "InactiveLimit=0"
    echo "MinJobAge=30"
    for i in $(seq 1 "$N"); do
      echo "NodeName=h$i NodeAddr=$NET.1$i Port=16818 CPUs=$CPUS State=UNKNOWN"
    done
    echo "PartitionName=debug Nodes=h[1-$N] Default=YES MaxTime=INFINITE State=UP OverSubscribe=FORCE"
  } > "$CONF"
}

net_up() {
  ip link show "$BR" >/dev/null 2>&1 || {
    ip link add "$BR" type bridge
    ip addr add "$NET.1/24" dev "$BR"
  }
  ip link set "$BR" up
  for i in $(seq 1 "$N"); do
    local h=h$i
    ip netns list | grep -qw "^$h" || ip netns add "$h"
    if ! ip link show "sfv$i" >/dev/null 2>&1; then
      ip link add "sfv$i" type veth peer name "sfe$i"
      ip link set "sfe$i" netns "$h"
      ip link set "sfv$i" master "$BR"
    fi
    ip link set "sfv$i" up
    ip netns exec "$h" sh -c "ip addr show sfe$i | grep -q '$NET.1$i/' || ip addr add $NET.1$i/24 dev sfe$i;
                              ip link set sfe$i up; ip link set lo up"
  done
}

# A pid file names a live daemon only if that pid still runs that program (pids get reused).
alive() { [ -f "$1" ] && [ "$(cat "/proc/$(cat "$1")/comm" 2>/dev/null)" = "$2" ]; }

# Start a daemon without this shell's open files: under `flock /tmp/slurm.lock cluster.sh up` the
# lock's descriptor is inherited, and a daemon that outlives the run (munged stays) would hold the
# lock for good, blocking every later run.
daemon() {
  (
    for fd in /proc/$BASHPID/fd/*; do
      fd=${fd##*/}
      [ "$fd" -gt 2 ] && eval "exec $fd>&-"
    done
    exec "$@"
  )
}

daemons_up() {
  mkdir -p /run/munge && chown munge:munge /run/munge
  pgrep -x munged >/dev/null || daemon munged --force
  alive "$DIR/slurmctld.pid" slurmctld || daemon slurmctld -f "$CONF"
  for i in $(seq 1 "$N"); do
    mkdir -p "$DIR/spool/h$i"
    # nsenter, not `ip netns exec`: the latter remounts /sys and slurmd then finds no cgroup fs.
    alive "$DIR/slurmd.h$i.pid" slurmd || daemon nsenter --net=/run/netns/h$i slurmd -f "$CONF" -N "h$i"
  done
}

wait_idle() {
  local deadline=$((SECONDS + ${1:-60}))
  while [ $SECONDS -lt $deadline ]; do
    local ok
    ok=$(SLURM_CONF=$CONF sinfo -h -N -o '%N %t' 2>/dev/null | grep -cE ' (idle|mix|alloc)$' || true)
    [ "$ok" = "$N" ] && return 0
    if SLURM_CONF=$CONF sinfo -h -N -o '%t' 2>/dev/null | grep -q '^inval'; then
      SLURM_CONF=$CONF sinfo -N -o '%N %t %E' >&2 || true
      die "a node was refused by slurmctld (see the reason above; logs: $DIR/log)"
    fi
    # A node that was lost and came back is DOWN until resumed.
    SLURM_CONF=$CONF sinfo -h -N -o '%N %t' 2>/dev/null | awk '$2 ~ /down|drain/ {print $1}' | while read -r n; do
      SLURM_CONF=$CONF scontrol update NodeName="$n" State=RESUME 2>/dev/null || true
    done
    sleep 0.5
  done
  SLURM_CONF=$CONF sinfo -N >&2 || true
  die "nodes not idle within ${1:-60} s (logs: $DIR/log)"
}

up() {
  need_root
  local t0=$SECONDS
  write_conf
  net_up
  daemons_up
  wait_idle 90
  echo "cluster up: $N hosts ($(hosts | tr '\n' ' ')) in $((SECONDS - t0)) s; export SLURM_CONF=$CONF"
}

heal() {
  need_root
  daemons_up
  wait_idle 90
}

down() {
  need_root
  if [ -f "$CONF" ]; then
    SLURM_CONF=$CONF scancel --full -u root 2>/dev/null || true
  fi
  for i in $(seq 1 "$N"); do
    if [ -e "/run/netns/h$i" ]; then
      ip netns pids "h$i" 2>/dev/null | xargs -r kill -9 2>/dev/null || true
    fi
  done
  if alive "$DIR/slurmctld.pid" slurmctld; then kill "$(cat "$DIR/slurmctld.pid")"; fi
  for i in $(seq 1 "$N"); do
    ip link del "sfv$i" 2>/dev/null || true
    ip netns del "h$i" 2>/dev/null || true
  done
  ip link del "$BR" 2>/dev/null || true
  rm -rf "$DIR/state" "$DIR/spool" "$DIR"/*.pid
  # munged stays: other clusters on this machine may use it; it holds no job state.
  echo "cluster down"
}

status() {
  echo "hosts: $(ip netns list 2>/dev/null | awk '{print $1}' | grep -E '^h[0-9]+$' | tr '\n' ' ')"
  alive "$DIR/slurmctld.pid" slurmctld && echo "slurmctld: pid $(cat "$DIR/slurmctld.pid")" || echo "slurmctld: down"
  for i in $(seq 1 "$N"); do
    alive "$DIR/slurmd.h$i.pid" slurmd && echo "slurmd h$i: pid $(cat "$DIR/slurmd.h$i.pid")" || echo "slurmd h$i: down"
  done
  [ -f "$CONF" ] && SLURM_CONF=$CONF sinfo -N 2>/dev/null || true
}

case "${1:-}" in
  up) up ;;
  down) down ;;
  heal) heal ;;
  status) status ;;
  env) echo "export SLURM_CONF=$CONF" ;;
  *) echo "usage: $0 up|down|status|heal|env" >&2; exit 2 ;;
esac
