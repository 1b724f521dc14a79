#!/usr/bin/env bash
# Stop the test cluster started by tests/slurm/setup_cluster.sh: slurmd and slurmctld, by their PID files
# under $DMAE_SLURM_DIR (default /tmp/dmae-slurm). With --all, munged too (by /run/munge/munged.pid).
# Idempotent: daemons that are not running are skipped. Jobs still running are killed with slurmd.
set -uo pipefail

STATE_DIR=${DMAE_SLURM_DIR:-/tmp/dmae-slurm}

stop_pidfile() {  # name pidfile
    local name=$1 pidfile=$2 pid
    [[ -s $pidfile ]] || return 0
    pid=$(cat "$pidfile")
    if ! kill -0 "$pid" 2>/dev/null; then
        rm -f "$pidfile"
        return 0
    fi
    kill -TERM "$pid" 2>/dev/null
    for _ in $(seq 100); do
        kill -0 "$pid" 2>/dev/null || { echo "[stop_cluster] stopped $name ($pid)" >&2; rm -f "$pidfile"; return 0; }
        sleep 0.1
    done
    echo "[stop_cluster] $name ($pid) ignored SIGTERM for 10 s: SIGKILL" >&2
    kill -KILL "$pid" 2>/dev/null
    rm -f "$pidfile"
}

if [[ -s $STATE_DIR/slurm.conf ]]; then
    # Cancel leftover jobs first so that slurmd does not leave orphaned slurmstepd/task processes.
    SLURM_CONF=$STATE_DIR/slurm.conf scancel --quiet --full --state=RUNNING,PENDING "--user=$(id -un)" 2>/dev/null || true
fi
stop_pidfile slurmd "$STATE_DIR/slurmd.pid"
stop_pidfile slurmctld "$STATE_DIR/slurmctld.pid"
if [[ ${1:-} == --all ]]; then
    stop_pidfile munged /run/munge/munged.pid
fi
exit 0
