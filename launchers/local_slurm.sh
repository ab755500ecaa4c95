#!/usr/bin/env bash
# A single-node SLURM cluster on this machine, for the `slurm` tests and for trying the SLURM launchers locally.
#
#   sudo launchers/local_slurm.sh start    # writes /etc/slurm/slurm.conf, starts munged, slurmctld, slurmd
#   launchers/local_slurm.sh status        # exit 0 when the node accepts jobs
#   sudo launchers/local_slurm.sh stop     # stops the daemons this script started
#
# Needs Debian's `slurm-wlm` and `munge` (apt-get install slurm-wlm munge) and root: the daemons run as root
# (SlurmUser=root). No cgroup plugins (ProctrackType=proctrack/linuxproc, TaskPlugin=task/none, no cgroup.conf),
# because containers and CI machines usually cannot delegate cgroups; no accounting, so `sacct` fails and
# submitit warns about it, harmlessly.
set -euo pipefail

CONF=/etc/slurm/slurm.conf
MARK="# written by neco launchers/local_slurm.sh"
NODE=$(hostname -s)
RUN=/run/neco-slurm             # pid files of the daemons started here
LOGS=/var/log/slurm

die() { echo "local_slurm: $*" >&2; exit 1; }

need_root() { [ "$(id -u)" = 0 ] || die "run as root (the daemons run with SlurmUser=root)"; }

write_conf() {
    # Never overwrite a slurm.conf this script did not write: this may be a real cluster's node.
    if [ -f "$CONF" ] && ! grep -qF "$MARK" "$CONF"; then
        die "$CONF exists and was not written by this script; refusing to overwrite it"
    fi
    local cpus mem_mb
    cpus=$(nproc)
    # Leave 1 GiB to the system; jobs that ask for more memory than the node has would never start.
    mem_mb=$(awk '/MemTotal/ {m = int($2 / 1024) - 1024; print (m > 512 ? m : 512)}' /proc/meminfo)
    mkdir -p /etc/slurm /var/spool/slurmctld /var/spool/slurmd "$LOGS" "$RUN"
    rm -f /etc/slurm/cgroup.conf  # its presence alone makes slurmd try to set up cgroups
    cat > "$CONF" <<EOF
$MARK
ClusterName=neco-local
SlurmctldHost=$NODE
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
StateSaveLocation=/var/spool/slurmctld
SlurmdSpoolDir=/var/spool/slurmd
SlurmctldPidFile=$RUN/slurmctld.pid
SlurmdPidFile=$RUN/slurmd.pid
SlurmctldLogFile=$LOGS/slurmctld.log
SlurmdLogFile=$LOGS/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
SelectType=select/cons_tres
# CPUs are the only consumable: jobs that do not ask for memory can share the node.
SelectTypeParameters=CR_CPU
SchedulerType=sched/backfill
# Look for startable jobs every second: a requeued job waits for its begin time, then for the next pass.
SchedulerParameters=sched_interval=1,bf_interval=1
MpiDefault=none
ReturnToService=2
JobRequeue=1
# A job killed by a requeue or a timeout gets SIGTERM, then SIGKILL this many seconds later.
KillWait=5
# A requeued job may start again after the credential lifetime (default 120 s); keep requeues quick here.
AuthInfo=cred_expire=5
MinJobAge=300
NodeName=$NODE CPUs=$cpus RealMemory=$mem_mb State=UNKNOWN
PartitionName=local Nodes=$NODE Default=YES MaxTime=INFINITE State=UP
EOF
}

start_munge() {
    if pgrep -u munge -x munged >/dev/null; then return; fi
    if [ ! -s /etc/munge/munge.key ]; then
        mkdir -p /etc/munge
        dd if=/dev/urandom of=/etc/munge/munge.key bs=1 count=1024 status=none
    fi
    chown munge:munge /etc/munge/munge.key && chmod 400 /etc/munge/munge.key
    mkdir -p /run/munge /var/lib/munge /var/log/munge
    chown munge:munge /run/munge /var/lib/munge /var/log/munge
    runuser -u munge -- /usr/sbin/munged
    for _ in $(seq 50); do munge -n >/dev/null 2>&1 && return; sleep 0.1; done
    die "munged did not start"
}

ready() {
    # The node accepts jobs once slurmctld answers and reports it idle or partly allocated.
    scontrol ping 2>/dev/null | grep -q "is UP" || return 1
    sinfo -h -n "$NODE" -o %T 2>/dev/null | grep -Eq "^(idle|mixed|allocated)"
}

start() {
    need_root
    command -v slurmctld >/dev/null || die "slurm-wlm is not installed (apt-get install slurm-wlm munge)"
    if ready; then echo "local_slurm: already running"; return; fi
    write_conf
    start_munge
    # slurmctld first: slurmd registers with it on start.
    [ -f "$RUN/slurmctld.pid" ] && kill -0 "$(cat "$RUN/slurmctld.pid")" 2>/dev/null || slurmctld
    [ -f "$RUN/slurmd.pid" ] && kill -0 "$(cat "$RUN/slurmd.pid")" 2>/dev/null || slurmd
    for _ in $(seq 60); do
        if ready; then echo "local_slurm: node $NODE up ($(nproc) CPUs)"; return; fi
        sleep 0.5
    done
    scontrol update NodeName="$NODE" State=RESUME >/dev/null 2>&1 || true
    sleep 1
    ready || { tail -n 20 "$LOGS"/slurmctld.log "$LOGS"/slurmd.log >&2; die "the node did not come up"; }
    echo "local_slurm: node $NODE up"
}

stop_pid() {  # stop_pid NAME PIDFILE: TERM the daemon, wait for it, KILL if it lingers
    local pid
    [ -f "$2" ] || return 0
    pid=$(cat "$2")
    if kill -0 "$pid" 2>/dev/null; then
        kill "$pid"
        for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
        kill -0 "$pid" 2>/dev/null && kill -9 "$pid"
    fi
    rm -f "$2"
    echo "local_slurm: stopped $1"
}

stop() {
    need_root
    grep -qsF "$MARK" "$CONF" || die "$CONF was not written by this script; not stopping anything"
    # Cancel what is still queued or running so that it does not come back on the next start.
    scancel --full --quiet "--nodelist=$NODE" 2>/dev/null || true
    stop_pid slurmd "$RUN/slurmd.pid"
    stop_pid slurmctld "$RUN/slurmctld.pid"
    stop_pid munged /run/munge/munged.pid
}

status() {
    if ready; then sinfo -N -n "$NODE"; else echo "local_slurm: not running"; return 1; fi
}

case "${1:-}" in
    start) start ;;
    stop) stop ;;
    status) status ;;
    *) echo "usage: $0 start|stop|status" >&2; exit 2 ;;
esac
