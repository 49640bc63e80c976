#!/usr/bin/env bash
# A real one-node SLURM cluster on this machine, for the tests and for trying
# the job scripts by hand (as root):
#
#   slurm/local-cluster.sh install   # apt-get install slurmctld slurmd slurm-client munge
#   slurm/local-cluster.sh start     # munged + slurmctld + slurmd; waits until the node is idle
#   slurm/local-cluster.sh status    # sinfo
#   slurm/local-cluster.sh stop
#
# The node is this host (hostname -s) with all its CPUs, in one partition
# "debug". State, spool and logs live in $PEGASUS_SLURM_STATE
# (default /var/lib/pegasus-slurm); the config is written to /etc/slurm/slurm.conf.
set -euo pipefail

STATE=${PEGASUS_SLURM_STATE:-/var/lib/pegasus-slurm}
CONF=/etc/slurm/slurm.conf
HOST=$(hostname -s)

die() { echo "local-cluster: $*" >&2; exit 1; }

install() {
    [ "$(id -u)" = 0 ] || die "installing SLURM needs root (apt-get); run as root"
    if command -v slurmctld >/dev/null && command -v slurmd >/dev/null \
        && command -v sbatch >/dev/null && command -v munged >/dev/null; then
        return 0
    fi
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq || die "apt-get update failed: is a Debian package mirror reachable?"
    apt-get install -y -qq slurmctld slurmd slurm-client munge >/dev/null \
        || die "apt-get install slurmctld slurmd slurm-client munge failed"
}

write_config() {
    local cpus mem_mb
    cpus=$(nproc)
    # Leave some memory to the system; slurmd refuses a node that claims more than it has.
    mem_mb=$(( $(awk '/MemTotal/ {print $2}' /proc/meminfo) / 1024 * 9 / 10 ))
    mkdir -p "$STATE/ctld" "$STATE/spool" /etc/slurm
    cat > "$CONF" <<EOF
# Written by pegasus-dist slurm/local-cluster.sh: a one-node cluster for tests.
ClusterName=pegasus-local
SlurmctldHost=$HOST
SlurmUser=root
AuthType=auth/munge
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
ReturnToService=2
JobRequeue=1
MpiDefault=none
StateSaveLocation=$STATE/ctld
SlurmdSpoolDir=$STATE/spool
SlurmctldPidFile=$STATE/slurmctld.pid
SlurmdPidFile=$STATE/slurmd.pid
SlurmctldLogFile=$STATE/slurmctld.log
SlurmdLogFile=$STATE/slurmd.log
SlurmctldTimeout=30
SlurmdTimeout=30
InactiveLimit=0
KillWait=30
NodeName=$HOST CPUs=$cpus RealMemory=$mem_mb State=UNKNOWN
PartitionName=debug Nodes=$HOST Default=YES MaxTime=INFINITE State=UP
EOF
}

start_munge() {
    pgrep -x munged >/dev/null && return 0
    [ -s /etc/munge/munge.key ] || runuser -u munge -- mungekey --create --keyfile /etc/munge/munge.key
    mkdir -p /run/munge && chown munge:munge /run/munge
    runuser -u munge -- /usr/sbin/munged || die "munged did not start (see /var/log/munge/munged.log)"
}

start() {
    command -v slurmctld >/dev/null || die "SLURM is not installed; run: $0 install"
    if sinfo -h -o %T 2>/dev/null | grep -qE '^(idle|mixed|allocated)'; then
        return 0  # already up
    fi
    write_config
    start_munge
    pgrep -x slurmctld >/dev/null || slurmctld || die "slurmctld did not start (see $STATE/slurmctld.log)"
    pgrep -x slurmd >/dev/null || slurmd || die "slurmd did not start (see $STATE/slurmd.log)"
    for _ in $(seq 60); do
        if sinfo -h -o %T 2>/dev/null | grep -qE '^(idle|mixed|allocated)'; then
            sinfo
            return 0
        fi
        sleep 1
    done
    sinfo || true
    die "the node did not become idle within 60 s (see $STATE/slurmctld.log and $STATE/slurmd.log)"
}

stop() {
    pkill -x slurmd || true
    pkill -x slurmctld || true
}

case "${1:-}" in
    install) install ;;
    start) start ;;
    stop) stop ;;
    status) sinfo ;;
    *) echo "usage: $0 {install|start|stop|status}" >&2; exit 2 ;;
esac
