#!/usr/bin/env bash
# A real one-node SLURM cluster on this machine (Debian/Ubuntu, as root), for
# the tests (tests/test_slurm.py) and for trying the job scripts by hand:
#
#   slurm/local-cluster.sh install   # apt-get install slurmctld slurmd slurm-client munge (if missing)
#   slurm/local-cluster.sh start     # munge key, munged, slurm.conf, slurmctld, slurmd; waits for "idle"
#   slurm/local-cluster.sh status    # sinfo and squeue
#   slurm/local-cluster.sh stop      # stops the daemons started by `start`
#
# The node is this host (hostname -s) with its CPUs as slurmd -C sees them and
# 90% of its memory, in one partition "debug". Cores are scheduled one by one
# (select/cons_tres + CR_Core), so N one-CPU jobs run at once on N CPUs.
# start and install do nothing when already done, so both are safe to repeat.
#
# Environment:
#   PEGASUS_SLURM_STATE   state, spool, pid and log files   [/var/lib/pegasus-slurm]
# The config goes where Debian's SLURM and every client (sbatch, squeue...)
# look for it, /etc/slurm/slurm.conf; a slurm.conf that this script did not
# write is never overwritten.
set -euo pipefail

STATE=${PEGASUS_SLURM_STATE:-/var/lib/pegasus-slurm}
CONF=/etc/slurm/slurm.conf
MARKER="# Written by pegasus-dist slurm/local-cluster.sh"
MUNGE_KEY=/etc/munge/munge.key
MUNGE_PID=/run/munge/munged.pid
HOST=$(hostname -s)
PACKAGES=(slurmctld slurmd slurm-client munge)

die() { echo "local-cluster: $*" >&2; exit 1; }
need_root() { [ "$(id -u)" = 0 ] || die "'$1' needs root (apt-get, daemons, /etc/slurm): run it as root"; }

# The pid in FILE runs a process named NAME (not just any process reusing the
# pid, nor a zombie: in some containers pid 1 never reaps the daemons).
alive() {
    local file=$1 name=$2 pid
    [ -s "$file" ] || return 1
    pid=$(cat "$file")
    [ -r "/proc/$pid/comm" ] && [ "$(cat "/proc/$pid/comm" 2>/dev/null)" = "$name" ] \
        && ! grep -qE '^State:[[:space:]]+Z' "/proc/$pid/status" 2>/dev/null
}

# The node answers and can take jobs (idle, mixed or allocated; also mid-job
# states like completing).
node_up() {
    local state
    state=$(sinfo -h -n "$HOST" -o %T 2>/dev/null | head -n 1) || return 1
    [[ $state =~ ^(idle|mixed|allocated|completing)$ ]]
}

install() {
    need_root install
    local missing=() p
    for p in "${PACKAGES[@]}"; do
        dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "ok installed" || missing+=("$p")
    done
    if [ "${#missing[@]}" = 0 ]; then
        echo "local-cluster: ${PACKAGES[*]} already installed"
        return 0
    fi
    command -v apt-get >/dev/null || die "apt-get not found: install ${missing[*]} with this system's package manager"
    echo "local-cluster: installing ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq \
        || die "apt-get update failed: is a Debian package mirror reachable (see /etc/apt/sources.list*)?"
    # The daemons' postinst scripts may try to start services; `start` below
    # starts what is missing itself, with our config.
    apt-get install -y -qq --no-install-recommends -o Dpkg::Use-Pty=0 "${missing[@]}" >/dev/null \
        || die "apt-get install ${missing[*]} failed (run it by hand to see why)"
}

# This host as a slurm.conf node line. The CPU layout is slurmd's own reading of
# the hardware (slurmd -C), not nproc: nproc answers OMP_NUM_THREADS, which the
# tests set to 1, and a node configured with fewer CPUs than it has leaves a
# job that asks for all of them pending forever. 90% of the memory: slurmd
# drains a node that claims more than it has.
node_line() {
    local layout mem_mb
    layout=$(slurmd -C | head -n 1 \
        | grep -oE '(CPUs|Boards|SocketsPerBoard|CoresPerSocket|ThreadsPerCore)=[0-9]+' | tr '\n' ' ')
    [ -n "$layout" ] || die "slurmd -C did not print this host's CPU layout"
    mem_mb=$(( $(awk '/MemTotal/ {print $2}' /proc/meminfo) * 9 / 10 / 1024 ))
    echo "NodeName=$HOST ${layout}RealMemory=$mem_mb State=UNKNOWN"
}

write_config() {
    if [ -e "$CONF" ] && ! grep -qF "$MARKER" "$CONF"; then
        die "$CONF exists and was not written by this script: refusing to overwrite a real cluster's config"
    fi
    mkdir -p "$STATE/ctld" "$STATE/spool" /etc/slurm
    cat > "$CONF" <<EOF
$MARKER: a one-node cluster
# (this host) for the tests and for trying the job scripts.
ClusterName=pegasus-local
SlurmctldHost=$HOST
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
# No cgroups needed (containers, CI): track processes by parent pid, no binding.
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
# Schedule single cores, so two one-CPU jobs (or tasks) run side by side.
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
# A node that was down comes back by itself once its slurmd registers.
ReturnToService=2
# Jobs may be requeued (sbatch --requeue, scontrol requeue, preemption);
# requeue and --signal need nothing else. Keep finished jobs visible to
# \`scontrol show job\` for an hour (there is no accounting database for sacct).
JobRequeue=1
MinJobAge=3600
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
$(node_line)
PartitionName=debug Nodes=$HOST Default=YES MaxTime=INFINITE State=UP
EOF
}

start_munge() {
    if [ ! -s "$MUNGE_KEY" ]; then
        echo "local-cluster: creating $MUNGE_KEY"
        mkdir -p /etc/munge
        mungekey --create --keyfile "$MUNGE_KEY" || die "could not create $MUNGE_KEY (mungekey --create)"
        chown munge:munge "$MUNGE_KEY" && chmod 0400 "$MUNGE_KEY"
    fi
    if ! alive "$MUNGE_PID" munged; then
        mkdir -p /run/munge /var/log/munge /var/lib/munge
        chown munge:munge /run/munge /var/log/munge /var/lib/munge
        runuser -u munge -- /usr/sbin/munged \
            || die "munged did not start: see /var/log/munge/munged.log (a key readable only by user munge is required)"
        touch "$STATE/munged.ours"  # so that `stop` stops it too
    fi
    munge -n | unmunge >/dev/null 2>&1 || die "munge does not work: see /var/log/munge/munged.log"
}

start() {
    need_root start
    local cmd
    for cmd in slurmctld slurmd munged sinfo; do
        command -v "$cmd" >/dev/null || die "$cmd not found: SLURM or munge is not installed; run '$0 install' first"
    done
    getent hosts "$HOST" >/dev/null \
        || die "this host's name '$HOST' does not resolve: add '127.0.1.1 $HOST' to /etc/hosts"
    # Our cluster, started with a node line this host no longer matches (an older
    # version of this script, another machine's image): start it afresh.
    if grep -qF "$MARKER" "$CONF" 2>/dev/null && ! grep -qxF "$(node_line)" "$CONF"; then
        echo "local-cluster: $CONF does not describe this host as slurmd -C sees it: restarting with a new one"
        stop
    fi
    if alive "$STATE/slurmctld.pid" slurmctld && alive "$STATE/slurmd.pid" slurmd && node_up; then
        echo "local-cluster: already running"
        sinfo
        return 0
    fi
    mkdir -p "$STATE"
    start_munge
    # Rewrite the config only while no daemon reads it.
    if ! alive "$STATE/slurmctld.pid" slurmctld && ! alive "$STATE/slurmd.pid" slurmd; then
        write_config
    fi
    if ! alive "$STATE/slurmctld.pid" slurmctld; then
        slurmctld || die "slurmctld did not start: see $STATE/slurmctld.log"
    fi
    if ! alive "$STATE/slurmd.pid" slurmd; then
        slurmd || die "slurmd did not start: see $STATE/slurmd.log"
    fi
    local started=$SECONDS resumed=0
    while [ $(( SECONDS - started )) -lt 60 ]; do
        if node_up; then
            echo "local-cluster: up after $(( SECONDS - started )) s"
            sinfo
            return 0
        fi
        # A node left drained or down by an earlier run (e.g. killed jobs): resume it once.
        if [ "$resumed" = 0 ] && sinfo -h -n "$HOST" -o %T 2>/dev/null | grep -qE '^(drain|drained|down)'; then
            scontrol update NodeName="$HOST" State=RESUME >/dev/null 2>&1 || true
            resumed=1
        fi
        sleep 1
    done
    sinfo -R || true
    die "node $HOST did not become idle within 60 s: see $STATE/slurmctld.log and $STATE/slurmd.log"
}

# Stop the daemon whose pid is in FILE: SIGTERM, up to 15 s, then SIGKILL.
stop_daemon() {
    local file=$1 name=$2 pid
    alive "$file" "$name" || return 0
    pid=$(cat "$file")
    kill "$pid" 2>/dev/null || true
    for _ in $(seq 30); do
        alive "$file" "$name" || { echo "local-cluster: stopped $name ($pid)"; return 0; }
        sleep 0.5
    done
    kill -KILL "$pid" 2>/dev/null || true
    echo "local-cluster: killed $name ($pid)"
}

stop() {
    need_root stop
    stop_daemon "$STATE/slurmd.pid" slurmd
    stop_daemon "$STATE/slurmctld.pid" slurmctld
    if [ -e "$STATE/munged.ours" ]; then
        stop_daemon "$MUNGE_PID" munged
        rm -f "$STATE/munged.ours"
    fi
}

status() {
    if ! alive "$STATE/slurmctld.pid" slurmctld; then
        echo "local-cluster: not running (start it with: $0 start)"
        return 3
    fi
    sinfo
    squeue
}

case "${1:-}" in
    install) install ;;
    start) start ;;
    stop) stop ;;
    status) status ;;
    *) echo "usage: $0 {install|start|stop|status}" >&2; exit 2 ;;
esac
