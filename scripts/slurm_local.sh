#!/usr/bin/env bash
# A one-node SLURM cluster on this machine, for the tests and for trying the SLURM launcher by hand.
#
#   scripts/slurm_local.sh install        # apt-get install slurm-wlm (root; skipped when present)
#   scripts/slurm_local.sh start [DIR]    # write DIR/slurm.conf, start slurmctld + slurmd, wait for idle
#   export SLURM_CONF=DIR/slurm.conf      # then sbatch/srun/squeue/sinfo talk to this cluster
#   scripts/slurm_local.sh status [DIR]
#   scripts/slurm_local.sh stop [DIR]     # stop both daemons by their pid files, keep DIR's logs
#
# Nothing of the system's own SLURM or munge config is read or changed: every file lives in DIR
# (default /tmp/metakd-slurm), the daemons listen on free ports of their own and are started without
# systemd. Authentication is auth/none with cred/none (no munged needed), which is only fit for a
# private, single-user machine. The daemons run as root (SlurmUser=root), as CI does.
set -euo pipefail

cmd="${1:-}"
DIR="${2:-${METAKD_SLURM_DIR:-/tmp/metakd-slurm}}"
CONF="$DIR/slurm.conf"

die() { echo "slurm_local.sh: $*" >&2; exit 1; }

have_slurm() { command -v slurmctld >/dev/null && command -v slurmd >/dev/null && command -v sbatch >/dev/null; }

install() {
    if have_slurm; then echo "slurm_local.sh: slurm-wlm already installed"; return; fi
    [ "$(id -u)" = 0 ] || die "installing slurm-wlm needs root: run 'apt-get install slurm-wlm munge' as root"
    command -v apt-get >/dev/null || die "no apt-get here: install SLURM (slurmctld, slurmd, sbatch) by hand"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends slurm-wlm munge >/dev/null
    have_slurm || die "apt-get installed slurm-wlm but slurmctld/slurmd are not on PATH"
}

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }

pid_alive() { [ -f "$1" ] && kill -0 "$(cat "$1")" 2>/dev/null; }

write_conf() {
    local host cpus mem_mb ctld_port d_port
    host="$(hostname -s)"
    cpus="$(nproc)"
    mem_mb="$(awk '/MemTotal/ {print int($2 / 1024) - 512}' /proc/meminfo)"
    ctld_port="$(free_port)"
    d_port="$(free_port)"
    mkdir -p "$DIR/state" "$DIR/spool"
    cat >"$CONF" <<CONF
# written by scripts/slurm_local.sh: a one-node test cluster, nothing shared with the system's SLURM
ClusterName=metakd-local
SlurmctldHost=$host
SlurmctldPort=$ctld_port
SlurmdPort=$d_port
SlurmUser=root
SlurmdUser=root
AuthType=auth/none
CredType=cred/none
# a requeued job may start again once its credential expired: 5 s instead of the default 120
AuthInfo=cred_expire=5
StateSaveLocation=$DIR/state
SlurmdSpoolDir=$DIR/spool
SlurmctldPidFile=$DIR/slurmctld.pid
SlurmdPidFile=$DIR/slurmd.pid
SlurmctldLogFile=$DIR/slurmctld.log
SlurmdLogFile=$DIR/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/none
MpiDefault=none
ReturnToService=2
SchedulerType=sched/backfill
# look at pending (e.g. requeued) jobs every second, not every 30 s
SchedulerParameters=bf_interval=1,sched_interval=2
# finished jobs stay visible to scontrol/squeue for 10 minutes (there is no sacct here)
MinJobAge=600
KillWait=5
InactiveLimit=0
SlurmctldTimeout=30
SlurmdTimeout=30
NodeName=$host CPUs=$cpus RealMemory=$mem_mb State=UNKNOWN
PartitionName=local Nodes=ALL Default=YES MaxTime=INFINITE State=UP
CONF
}

start() {
    have_slurm || die "SLURM is not installed: run 'scripts/slurm_local.sh install' (root) or 'apt-get install slurm-wlm'"
    if pid_alive "$DIR/slurmctld.pid" && pid_alive "$DIR/slurmd.pid"; then
        echo "slurm_local.sh: already running; export SLURM_CONF=$CONF"; return
    fi
    stop_daemons
    local t0; t0="$(date +%s.%N)"
    write_conf
    export SLURM_CONF="$CONF"
    # -i: ignore state left by an earlier cluster in DIR; -c: clear the job list
    slurmctld -i -c -f "$CONF" || die "slurmctld did not start: see $DIR/slurmctld.log"
    slurmd -f "$CONF" || die "slurmd did not start: see $DIR/slurmd.log"
    local deadline=$(( $(date +%s) + 60 ))
    until sinfo -h -N -o '%T' 2>/dev/null | grep -qx idle; do
        if [ "$(date +%s)" -ge "$deadline" ]; then
            stop_daemons
            die "the node did not become idle within 60 s: see $DIR/slurmctld.log and $DIR/slurmd.log"
        fi
        sleep 0.2
    done
    echo "slurm_local.sh: up in $(awk -v a="$t0" -v b="$(date +%s.%N)" 'BEGIN {printf "%.1f", b - a}') s;" \
        "export SLURM_CONF=$CONF"
}

stop_daemons() {
    local name pidfile pid
    for name in slurmd slurmctld; do
        pidfile="$DIR/$name.pid"
        if pid_alive "$pidfile"; then
            pid="$(cat "$pidfile")"
            kill "$pid"
            for _ in $(seq 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
            kill -0 "$pid" 2>/dev/null && kill -9 "$pid"
        fi
        rm -f "$pidfile"
    done
}

status() {
    [ -f "$CONF" ] || die "no cluster in $DIR (start it first)"
    pid_alive "$DIR/slurmctld.pid" || die "slurmctld is not running (see $DIR/slurmctld.log)"
    pid_alive "$DIR/slurmd.pid" || die "slurmd is not running (see $DIR/slurmd.log)"
    SLURM_CONF="$CONF" sinfo -N -o '%N %T %c %m'
    SLURM_CONF="$CONF" squeue
}

case "$cmd" in
    install) install ;;
    start) start ;;
    stop) stop_daemons; echo "slurm_local.sh: stopped ($DIR)" ;;
    status) status ;;
    *) die "usage: scripts/slurm_local.sh install|start|stop|status [DIR]" ;;
esac
