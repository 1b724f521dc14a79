#!/usr/bin/env bash
# Start a real one-node SLURM cluster on this machine, for the project's tests (tests/test_slurm.py).
#
#   sudo tests/slurm/setup_cluster.sh          # -> last stdout line: SLURM_CONF=/tmp/dmae-slurm/slurm.conf
#   export SLURM_CONF=/tmp/dmae-slurm/slurm.conf; sbatch ...; squeue; scontrol show job <id>
#   tests/slurm/stop_cluster.sh                # stops slurmctld/slurmd (munged too with --all)
#
# Idempotent: installs Debian's slurm-wlm + munge only if missing, creates the munge key only if missing,
# starts munged/slurmctld/slurmd only if they are not already running, and rewrites slurm.conf only
# when the daemons are not running. Concurrent callers are serialised with flock.
#
# Environment knobs:
#   DMAE_SLURM_DIR       state dir (default /tmp/dmae-slurm): slurm.conf, cgroup.conf, logs, pids, spool
#   DMAE_SLURM_CTLD_PORT / DMAE_SLURM_SLURMD_PORT   (default 6817 / 6818)
#   DMAE_SLURM_NO_INSTALL=1   never call apt-get (fail if the packages are missing)
#
# Exit codes: 0 cluster up; 2 cannot be set up here: packages missing and not installable, or not root
# while something must be started (the last stderr line says why; the tests skip with it); 3 a daemon
# did not start or the node did not become idle (the message names the logs).
#
# Pitfalls found on Debian 12 (Slurm 22.05.8, munge 0.5.15) in a VM/container without systemd:
#  * No systemd as PID 1: the packages' services are never started for us (and a Docker-style
#    /usr/sbin/policy-rc.d 'exit 101' blocks init scripts); we start every daemon by hand.
#  * munged refuses to start unless /run/munge exists and is owned by the munge user (it is a tmpfs dir,
#    gone after a reboot), /etc/munge/munge.key is munge:munge 0400, and /var/{lib,log}/munge belong to
#    munge. It must run AS munge (runuser -u munge), not as root.
#  * slurmd must be told its node name (-N $(hostname -s)) when the hostname does not resolve to the
#    NodeName, and the node's NodeAddr must resolve: we pin NodeAddr/SlurmctldHost to 127.0.0.1.
#  * cgroups: proctrack/cgroup and task/cgroup need a writable, delegated cgroup tree (not in a
#    container); we use proctrack/linuxproc + task/none + jobacct_gather/none, so no cgroup plugin is
#    loaded. Slurm 22.05 only reads cgroup.conf when a cgroup plugin is loaded and does not know
#    CgroupPlugin=disabled (23.02+), so we write a cgroup.conf with only harmless keys, in case.
#  * CR_CPU (not CR_Core): with ThreadsPerCore=2 hardware, CR_Core would hand a whole core (2 CPUs) to
#    each task and 2 tasks would not fit on a 2-vCPU machine. The node line only gives CPUs= so Slurm
#    counts every CPU as a core either way.
#  * RealMemory must not exceed what slurmd measures, else the node is DRAINed ("Low RealMemory"): we use
#    90 % of MemTotal. Memory is not a consumable resource (CR_CPU, not CR_CPU_Memory).
#  * A requeued job is held with BeginTime = (end of its last step) + cred_expire + 1 (default 120 s!) so
#    that old job credentials expire: AuthInfo=cred_expire=10 makes it restart ~11 s after it has ended.
#    Lightning ignores SIGTERM under auto-requeue, so the tasks end only at SIGKILL, KillWait after the
#    requeue: KillWait=5 (default 30; see below). SIGUSR1 -> restarted tasks measured at ~16 s
#    (5 s COMPLETING + 11 s PENDING Reason=BeginTime); a job that exits on SIGTERM restarts in ~12 s. The main scheduler only
#    wakes on events or every sched_interval (default 60 s): sched_interval=1 / bf_interval=1 make it
#    notice the BeginTime promptly.
#  * No accounting DB: sacct does not work; poll `scontrol show job -o <id>` (kept for MinJobAge=300 s
#    after the job ends) or squeue instead.
#  * The daemons are started with the flock fd closed (9>&-): a daemon that inherits it holds the setup
#    lock for its whole life and the next setup_cluster.sh waits forever.
#  * PropagateResourceLimits=NONE: propagating the submitter's ulimits fails noisily in sandboxes.
set -euo pipefail

STATE_DIR=${DMAE_SLURM_DIR:-/tmp/dmae-slurm}
CTLD_PORT=${DMAE_SLURM_CTLD_PORT:-6817}
SLURMD_PORT=${DMAE_SLURM_SLURMD_PORT:-6818}
CONF="$STATE_DIR/slurm.conf"
NODE=$(hostname -s)
T0=$(date +%s.%N)

log() { echo "[setup_cluster] $*" >&2; }
die() { local code=$1; shift; echo "[setup_cluster] ERROR: $*" >&2; exit "$code"; }
elapsed() { python3 -c "import sys; print(f'{float(sys.argv[2]) - float(sys.argv[1]):.1f}')" "$1" "$(date +%s.%N)" 2>/dev/null \
    || echo "?"; }

pid_alive() { [[ -s "$1" ]] && kill -0 "$(cat "$1")" 2>/dev/null; }

mkdir -p "$STATE_DIR" 2>/dev/null || true
# Serialise concurrent callers (a non-root caller of a root-made cluster may not be able to open the lock).
if { exec 9>>"$STATE_DIR/.setup.lock"; } 2>/dev/null; then
    flock -w 300 9 || die 3 "another setup_cluster.sh holds $STATE_DIR/.setup.lock for 300 s"
fi

# ---------------------------------------------------------------- 1. packages
need_install=0
for bin in slurmctld slurmd sbatch srun scontrol sinfo munged munge; do
    command -v "$bin" >/dev/null 2>&1 || [[ -x /usr/sbin/$bin ]] || need_install=1
done
if (( need_install )); then
    [[ ${DMAE_SLURM_NO_INSTALL:-0} == 1 ]] && die 2 "slurm-wlm/munge not installed and DMAE_SLURM_NO_INSTALL=1"
    [[ $(id -u) == 0 ]] || die 2 "slurm-wlm/munge not installed and not root: cannot apt-get install them"
    command -v apt-get >/dev/null || die 2 "slurm-wlm/munge not installed and no apt-get (not Debian/Ubuntu)"
    log "installing slurm-wlm munge with apt-get ..."
    t=$(date +%s.%N)
    # Keep the packages' init scripts from starting daemons with the default config (we start our own).
    added_policy=0
    if [[ ! -e /usr/sbin/policy-rc.d ]]; then
        printf '#!/bin/sh\nexit 101\n' >/usr/sbin/policy-rc.d && chmod +x /usr/sbin/policy-rc.d && added_policy=1
    fi
    apt_install() {
        DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends \
            -o Dpkg::Options::=--force-confdef -o Dpkg::Options::=--force-confold slurm-wlm munge \
            >"$STATE_DIR/apt.log" 2>&1
    }
    ok=1
    if ! apt_install; then
        log "apt-get install failed; running apt-get update and retrying"
        { DEBIAN_FRONTEND=noninteractive apt-get update >>"$STATE_DIR/apt.log" 2>&1 && apt_install; } || ok=0
    fi
    (( added_policy )) && rm -f /usr/sbin/policy-rc.d
    (( ok )) || die 2 "apt-get install slurm-wlm munge failed (see $STATE_DIR/apt.log): $(tail -n 3 "$STATE_DIR/apt.log" | tr '\n' ' ')"
    log "installed in $(elapsed "$t") s"
fi
SLURM_VERSION=$(slurmd -V 2>/dev/null || true)

# ---------------------------------------------------------------- 2. munge
if ! munge -n 2>/dev/null | unmunge >/dev/null 2>&1; then
    [[ $(id -u) == 0 ]] || die 2 "munged is not running and not root: cannot start it"
    id munge >/dev/null 2>&1 || die 2 "no 'munge' user (is the munge package installed correctly?)"
    install -d -o munge -g munge -m 0700 /etc/munge /var/lib/munge /var/log/munge
    install -d -o munge -g munge -m 0755 /run/munge
    if [[ ! -s /etc/munge/munge.key ]]; then
        log "creating /etc/munge/munge.key"
        if command -v mungekey >/dev/null; then
            mungekey --create --keyfile=/etc/munge/munge.key --force
        else
            dd if=/dev/urandom of=/etc/munge/munge.key bs=1 count=1024 status=none
        fi
    fi
    chown munge:munge /etc/munge/munge.key
    chmod 0400 /etc/munge/munge.key
    # A stale pid/socket from a killed munged makes the new one refuse to start.
    if [[ -s /run/munge/munged.pid ]] && ! kill -0 "$(cat /run/munge/munged.pid)" 2>/dev/null; then
        rm -f /run/munge/munged.pid /run/munge/munge.socket.2 /run/munge/munge.socket.2.lock
    fi
    runuser -u munge -- /usr/sbin/munged 9>&- || die 3 "munged failed to start (see /var/log/munge/munged.log)"
    for _ in $(seq 50); do munge -n 2>/dev/null | unmunge >/dev/null 2>&1 && break; sleep 0.1; done
    munge -n | unmunge >/dev/null 2>&1 || die 3 "munged started but munge -n | unmunge fails"
    log "munged started"
fi

# ---------------------------------------------------------------- 3. slurm.conf
export SLURM_CONF="$CONF"
ctld_up=0; slurmd_up=0
pid_alive "$STATE_DIR/slurmctld.pid" && ctld_up=1
pid_alive "$STATE_DIR/slurmd.pid" && slurmd_up=1

if (( ! ctld_up && ! slurmd_up )); then
    [[ $(id -u) == 0 ]] || die 2 "the SLURM daemons are not running and not root: cannot start them"
    CPUS=$(nproc)
    MEM_MB=$(awk '/MemTotal/ {printf "%d", $2 / 1024 * 0.9}' /proc/meminfo)
    mkdir -p "$STATE_DIR/state" "$STATE_DIR/spool" "$STATE_DIR/log"
    cat >"$CONF" <<EOF
# Written by tests/slurm/setup_cluster.sh ($SLURM_VERSION) - a one-node test cluster.
ClusterName=dmae-test
SlurmctldHost=$NODE(127.0.0.1)
SlurmctldPort=$CTLD_PORT
SlurmdPort=$SLURMD_PORT
SlurmUser=root
SlurmdUser=root
MailProg=/bin/true
AuthType=auth/munge
CredType=cred/munge
# Requeued jobs wait cred_expire seconds before they may start again (default 120).
AuthInfo=cred_expire=10
StateSaveLocation=$STATE_DIR/state
SlurmdSpoolDir=$STATE_DIR/spool
SlurmctldPidFile=$STATE_DIR/slurmctld.pid
SlurmdPidFile=$STATE_DIR/slurmd.pid
SlurmctldLogFile=$STATE_DIR/log/slurmctld.log
SlurmdLogFile=$STATE_DIR/log/slurmd.log
SlurmctldDebug=info
SlurmdDebug=info
# No cgroups (containers/VMs without a delegated cgroup tree), no accounting DB.
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
MpiDefault=none
SwitchType=switch/none
PropagateResourceLimits=NONE
SchedulerType=sched/backfill
SchedulerParameters=sched_interval=1,bf_interval=1
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
ReturnToService=2
JobRequeue=1
# Keep finished jobs visible to 'scontrol show job' for 5 minutes (there is no sacct).
MinJobAge=300
# SIGTERM -> SIGKILL grace on cancel/requeue/time limit (default 30 s). Lightning with auto_requeue
# ignores SIGTERM ('Bypassing SIGTERM'), so every requeue waits this long before the job ends. Not lower:
# measured, KillWait<=3 is SLOWER (7.5 s instead of 5 s) - srun gives up after KillWait+2 s before the
# tasks are killed and slurmstepd then retries its exit message to the dead srun for ~5 s.
KillWait=5
InactiveLimit=0
SlurmdTimeout=60
SlurmctldTimeout=60
NodeName=$NODE NodeAddr=127.0.0.1 CPUs=$CPUS RealMemory=$MEM_MB State=UNKNOWN
PartitionName=debug Nodes=$NODE Default=YES MaxTime=INFINITE State=UP
EOF
    # Only read if a cgroup plugin were loaded (none is); CgroupPlugin=disabled is unknown to 22.05.
    cat >"$STATE_DIR/cgroup.conf" <<EOF
ConstrainCores=no
ConstrainRAMSpace=no
ConstrainDevices=no
EOF
    # Fresh state: a previous run's saved jobs/node state would only confuse the tests.
    rm -rf "${STATE_DIR:?}/state/"* "${STATE_DIR:?}/spool/"*
fi

# ---------------------------------------------------------------- 4. daemons
t=$(date +%s.%N)
if ! pid_alive "$STATE_DIR/slurmctld.pid"; then
    log "starting slurmctld"
    # -i: ignore errors reading the (empty) saved state; daemonizes and writes SlurmctldPidFile.
    slurmctld -f "$CONF" -i 9>&- || die 3 "slurmctld failed to start (see $STATE_DIR/log/slurmctld.log)"
fi
if ! pid_alive "$STATE_DIR/slurmd.pid"; then
    log "starting slurmd -N $NODE"
    slurmd -f "$CONF" -N "$NODE" 9>&- || die 3 "slurmd failed to start (see $STATE_DIR/log/slurmd.log)"
fi

state=""
for _ in $(seq 120); do
    state=$(sinfo -h -n "$NODE" -o %T 2>/dev/null | head -n 1 || true)
    [[ $state == idle || $state == mixed || $state == allocated ]] && break
    # A node left DOWN/DRAIN by an earlier run: bring it back.
    if [[ $state == down* || $state == drain* ]]; then
        scontrol update NodeName="$NODE" State=RESUME >/dev/null 2>&1 || true
    fi
    sleep 0.5
done
[[ $state == idle || $state == mixed || $state == allocated ]] \
    || die 3 "node $NODE not idle after 60 s (state '$state'); see $STATE_DIR/log/slurmctld.log and slurmd.log"
log "cluster up ($SLURM_VERSION, node $NODE $state): daemons in $(elapsed "$t") s, total $(elapsed "$T0") s"
echo "SLURM_CONF=$CONF"
