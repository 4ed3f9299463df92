#!/usr/bin/env bash
# Bring up / tear down a real one-node SLURM cluster on this machine, for the
# integration test that sends Hydra `submitit_slurm` sweeps to it.
#
#   scripts/slurm_local.sh start    # install (if needed), configure, start daemons
#   scripts/slurm_local.sh status   # which daemons run + sinfo
#   scripts/slurm_local.sh stop     # cancel jobs, stop ONLY the daemons started here
#
# Everything (config, state, spool, logs, pid files, munge key) lives in the
# state folder ${SLURM_LOCAL_DIR:-/tmp/dglstm-slurm}; the only things outside it
# are the Debian packages and munged's socket dir /run/munge.
# Clients need `export SLURM_CONF=<state>/etc/slurm.conf` (or `source <state>/env.sh`),
# and `scripts/slurm` on PATH for the sacct stand-in (accounting is off).
# Jobs survive stop/start (state is saved in <state>/ctld); deleting the state
# folder resets job ids to 1, so use a fresh submitit folder per test run.
set -euo pipefail

SCRIPT_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO_DIR=$(cd "$SCRIPT_DIR/.." && pwd)
STATE=${SLURM_LOCAL_DIR:-/tmp/dglstm-slurm}
PARTITION=debug
SLURM_CONF_FILE=$STATE/etc/slurm.conf
PID_DIR=$STATE/run
LOG_DIR=$STATE/log
MUNGE_DIR=$STATE/munge           # key, seed (owned by munge, 0700: munged insists)
MUNGE_SOCKET_DIR=/run/munge      # munged's default socket dir; clients look there
NODE=$(hostname -s)
export SLURM_CONF=$SLURM_CONF_FILE   # daemons and clients read this instead of /etc/slurm/slurm.conf

say() { printf 'slurm_local: %s\n' "$*"; }
die() { printf 'slurm_local: ERROR: %s\n' "$*" >&2; exit 1; }

# ---------------------------------------------------------------- pid files
# A process counts as alive only if it exists and is not a zombie: PID 1 in
# this container does not reap orphans, so dead daemons linger as zombies.
alive() {
    local st
    st=$(awk '{print $3}' "/proc/$1/stat" 2>/dev/null) || return 1
    [[ -n $st && $st != Z && $st != X ]]
}

# A pid file counts as "alive" only if the pid is alive AND is the expected
# program, so a recycled pid is never signalled.
pid_of() {  # name -> prints pid if alive, returns 1 otherwise
    local f=$PID_DIR/$1.pid pid
    [[ -s $f ]] || return 1
    pid=$(tr -dc '0-9' <"$f")
    [[ -n $pid ]] && alive "$pid" || return 1
    [[ $(cat "/proc/$pid/comm" 2>/dev/null) == "$1" ]] || return 1
    echo "$pid"
}

wait_pidfile() {  # name timeout_s
    local i
    for ((i = 0; i < $2 * 10; i++)); do
        pid_of "$1" >/dev/null && return 0
        sleep 0.1
    done
    return 1
}

stop_one() {  # name: TERM, wait up to 20 s, then KILL; remove pid file
    local name=$1 pid i
    if ! pid=$(pid_of "$name"); then
        [[ -e $PID_DIR/$name.pid ]] && say "$name: stale pid file removed"
        rm -f "$PID_DIR/$name.pid"
        return 0
    fi
    kill -TERM "$pid" 2>/dev/null || true
    for ((i = 0; i < 200; i++)); do
        alive "$pid" || break
        sleep 0.1
    done
    if alive "$pid"; then
        say "$name (pid $pid) ignored TERM for 20 s, sending KILL"
        kill -KILL "$pid" 2>/dev/null || true
        sleep 0.5
    fi
    rm -f "$PID_DIR/$name.pid"
    say "$name (pid $pid) stopped"
}

# ---------------------------------------------------------------- install
ensure_installed() {
    if [[ -x /usr/sbin/slurmctld && -x /usr/sbin/slurmd && -x /usr/sbin/munged ]]; then
        return 0
    fi
    [[ $(id -u) -eq 0 ]] || die "slurmctld/slurmd/munged are not installed; run as root so 'apt-get install slurm-wlm munge' can install them"
    say "installing slurm-wlm munge with apt-get ..."
    local t0=$SECONDS tmp_policy=
    # Keep the packages' init scripts from starting system-wide daemons that
    # this script would not own (Docker images usually have this already).
    if [[ ! -e /usr/sbin/policy-rc.d ]]; then
        printf '#!/bin/sh\nexit 101\n' >/usr/sbin/policy-rc.d
        chmod 755 /usr/sbin/policy-rc.d
        tmp_policy=1
    fi
    local apt=(env DEBIAN_FRONTEND=noninteractive apt-get -y -qq -o Dpkg::Use-Pty=0
        --no-install-recommends install slurm-wlm munge)
    local apt_log=$LOG_DIR/apt-install.log
    mkdir -p "$LOG_DIR"
    if ! "${apt[@]}" >"$apt_log" 2>&1; then
        # package lists may be missing or stale: refresh once and retry
        apt-get update -qq >>"$apt_log" 2>&1 || true
        "${apt[@]}" >>"$apt_log" 2>&1 || {
            [[ -n $tmp_policy ]] && rm -f /usr/sbin/policy-rc.d
            die "apt-get install failed, see $apt_log"
        }
    fi
    [[ -n $tmp_policy ]] && rm -f /usr/sbin/policy-rc.d
    say "installed in $((SECONDS - t0)) s"
}

# ---------------------------------------------------------------- config
write_config() {
    local cores mem_mb
    cores=$(nproc)
    # "a bit below" the physical total so slurmd never drains the node
    # for "Low RealMemory"
    mem_mb=$(awk '/^MemTotal:/ {printf "%d", $2 / 1024 * 0.95}' /proc/meminfo)

    mkdir -p "$STATE"/{etc,run,log,ctld,spool/slurmd} "$MUNGE_DIR"
    chmod 755 "$STATE" "$STATE"/{etc,run,spool}
    # slurmctld drops to SlurmUser=slurm: it must write its state, log and pid
    chown slurm:slurm "$STATE/ctld" "$STATE/spool"
    chmod 755 "$STATE/ctld"
    chmod 1777 "$PID_DIR" "$LOG_DIR"    # root (slurmd), slurm, munge all write here
    chown munge:munge "$MUNGE_DIR"
    chmod 700 "$MUNGE_DIR"

    cat >"$SLURM_CONF_FILE" <<EOF
# Generated by scripts/slurm_local.sh -- one-node test cluster, do not edit.
ClusterName=dglstm
SlurmctldHost=${NODE}(127.0.0.1)
# Daemons run as: slurmctld -> slurm (unprivileged), slurmd -> root (it must
# start jobs as the submitting user).
SlurmUser=slurm
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
MpiDefault=none
SwitchType=switch/none
# No cgroups in this container: track job processes via /proc, no task binding.
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
# Accounting off (no slurmdbd): sacct does not work, see scripts/slurm/sacct.
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/none
# Schedule cores and memory separately so two 1-CPU jobs run side by side.
SchedulerType=sched/backfill
# Re-check pending jobs every 5 s instead of 60/30 s: a requeued job becomes
# eligible at a BeginTime and would otherwise sit idle up to a minute.
SchedulerParameters=sched_interval=5,bf_interval=5
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
DefMemPerCPU=1024
# Keep finished jobs visible to scontrol (the sacct stand-in reads them) for 1 h.
MinJobAge=3600
# Allow 'scontrol requeue' and submitit's self-requeue on preemption/timeout.
JobRequeue=1
# A requeued job may only restart after cred_expire (default 120 s); 30 s keeps
# requeue tests short while leaving ample time for a local step launch.
AuthInfo=cred_expire=30
# SIGTERM->SIGKILL grace on cancel/requeue/timeout (default 30 s). submitit
# jobs ignore SIGTERM, so they always use all of it, and the node takes no new
# jobs while one is COMPLETING: keep it short.
KillWait=5
# Node comes back on its own after a restart instead of staying DOWN.
ReturnToService=2
# Trust the node line below even if the hardware/container reports differ.
SlurmdParameters=config_overrides
MailProg=/bin/true
# Everything under the state folder ($STATE).
StateSaveLocation=$STATE/ctld
SlurmdSpoolDir=$STATE/spool/slurmd
SlurmctldPidFile=$PID_DIR/slurmctld.pid
SlurmdPidFile=$PID_DIR/slurmd.pid
SlurmctldLogFile=$LOG_DIR/slurmctld.log
SlurmdLogFile=$LOG_DIR/slurmd.log
SlurmctldDebug=info
SlurmdDebug=info
NodeName=${NODE} NodeAddr=127.0.0.1 Sockets=1 CoresPerSocket=${cores} ThreadsPerCore=1 RealMemory=${mem_mb} State=UNKNOWN
PartitionName=${PARTITION} Nodes=${NODE} Default=YES MaxTime=INFINITE State=UP
EOF
    chmod 644 "$SLURM_CONF_FILE"

    cat >"$STATE/env.sh" <<EOF
# source this to use the local cluster (sbatch/squeue/scontrol + sacct stand-in)
export SLURM_CONF=$SLURM_CONF_FILE
export PATH=$SCRIPT_DIR/slurm:\$PATH
EOF
}

# ---------------------------------------------------------------- daemons
munge_works() { munge -n </dev/null 2>/dev/null | unmunge >/dev/null 2>&1; }

start_munged() {
    if pid_of munged >/dev/null; then return 0; fi
    if munge_works; then
        # someone else's munged already serves /run/munge: slurm only needs a
        # working socket, so use it rather than fight over the socket
        say "munged: using the already running munged on $MUNGE_SOCKET_DIR (not started by this script)"
        return 0
    fi
    if [[ ! -s $MUNGE_DIR/munge.key ]]; then
        if command -v mungekey >/dev/null; then
            mungekey --create --keyfile="$MUNGE_DIR/munge.key"
        else
            dd if=/dev/urandom of="$MUNGE_DIR/munge.key" bs=1024 count=1 status=none
        fi
    fi
    chown munge:munge "$MUNGE_DIR/munge.key"
    chmod 600 "$MUNGE_DIR/munge.key"
    # munged refuses to run unless its socket dir is owned by munge, not world-writable
    mkdir -p "$MUNGE_SOCKET_DIR"
    chown munge:munge "$MUNGE_SOCKET_DIR"
    chmod 755 "$MUNGE_SOCKET_DIR"
    runuser -u munge -- /usr/sbin/munged \
        --key-file="$MUNGE_DIR/munge.key" --seed-file="$MUNGE_DIR/munged.seed" \
        --pid-file="$PID_DIR/munged.pid" --log-file="$LOG_DIR/munged.log" \
        || die "munged failed to start, see $LOG_DIR/munged.log"
    wait_pidfile munged 10 || die "munged did not write $PID_DIR/munged.pid, see $LOG_DIR/munged.log"
    munge_works || die "munged runs but munge/unmunge fails, see $LOG_DIR/munged.log"
    say "munged started (pid $(pid_of munged))"
}

start_slurm_daemon() {  # slurmctld|slurmd
    local name=$1
    if pid_of "$name" >/dev/null; then return 0; fi
    rm -f "$PID_DIR/$name.pid"
    # both fork into the background and write their own pid file
    "/usr/sbin/$name" -f "$SLURM_CONF_FILE" \
        || die "$name failed to start, see $LOG_DIR/$name.log"
    wait_pidfile "$name" 15 \
        || { tail -n 20 "$LOG_DIR/$name.log" >&2 || true; die "$name did not come up, see $LOG_DIR/$name.log"; }
    say "$name started (pid $(pid_of "$name"))"
}

all_running() {
    pid_of slurmctld >/dev/null && pid_of slurmd >/dev/null &&
        { pid_of munged >/dev/null || munge_works; }
}

print_usage() {
    cat <<EOF
slurm_local: cluster is up: node '$NODE', partition '$PARTITION' (default).
  State folder: $STATE   (logs: $LOG_DIR)
  To use it from a shell / test:
    export SLURM_CONF=$SLURM_CONF_FILE     # required by sbatch/squeue/scontrol/sinfo
    export PATH=$SCRIPT_DIR/slurm:\$PATH    # sacct stand-in for submitit (accounting is off)
  (or: source $STATE/env.sh)
  e.g. sbatch -p $PARTITION --wrap 'hostname'; Hydra: hydra/launcher=submitit_slurm hydra.launcher.partition=$PARTITION
  Stop with: $SCRIPT_DIR/slurm_local.sh stop
EOF
}

# ---------------------------------------------------------------- commands
cmd_start() {
    # never write into the repository (another process edits it)
    local real_state
    real_state=$(realpath -m "$STATE")
    [[ $real_state != "$REPO_DIR" && $real_state != "$REPO_DIR"/* ]] \
        || die "SLURM_LOCAL_DIR=$STATE is inside the repository; pick a folder outside it"
    if [[ $(id -u) -ne 0 ]]; then
        ensure_installed   # dies with the one-line "not installed" error if missing
        die "start must run as root (munged runs as munge, slurmd as root)"
    fi
    if all_running; then
        say "already running (slurmctld pid $(pid_of slurmctld), slurmd pid $(pid_of slurmd)); nothing to do"
        print_usage
        return 0
    fi
    local t0=$SECONDS
    ensure_installed
    local t1=$SECONDS
    # write the config only when slurmctld is not running, so a live daemon
    # never sees its config change underneath it
    pid_of slurmctld >/dev/null || write_config
    start_munged
    start_slurm_daemon slurmctld
    start_slurm_daemon slurmd

    # wait (up to 60 s) for the node to register and become schedulable
    local i state=
    for ((i = 0; i < 120; i++)); do
        state=$(sinfo -h -n "$NODE" -o '%T' 2>/dev/null | head -n1) || true
        [[ $state == idle || $state == mixed || $state == allocated ]] && break
        sleep 0.5
    done
    if [[ $state != idle && $state != mixed && $state != allocated ]]; then
        sinfo -N -l >&2 || true
        die "node '$NODE' not idle after 60 s (state '${state:-?}'); see $LOG_DIR/slurmctld.log and $LOG_DIR/slurmd.log"
    fi
    say "node '$NODE' is $state (daemons up in $((SECONDS - t1)) s, total $((SECONDS - t0)) s)"
    print_usage
}

cmd_stop() {
    local name
    if [[ ! -d $PID_DIR ]]; then
        say "nothing running (no $PID_DIR)"
        return 0
    fi
    # Cancel this cluster's jobs first, so no job steps (slurmstepd) outlive slurmd.
    if pid_of slurmctld >/dev/null && pid_of slurmd >/dev/null; then
        local jobs i
        jobs=$(squeue -h -o '%A' 2>/dev/null | tr '\n' ' ') || jobs=
        if [[ -n ${jobs// /} ]]; then
            say "cancelling jobs: $jobs"
            # shellcheck disable=SC2086
            scancel $jobs 2>/dev/null || true
            for ((i = 0; i < 60; i++)); do   # KillWait (5 s) + ample margin
                [[ -z $(squeue -h -o '%A' 2>/dev/null) ]] && break
                sleep 1
            done
        fi
    fi
    local any=
    for name in slurmd slurmctld munged; do pid_of "$name" >/dev/null && any=1; done
    stop_one slurmd
    stop_one slurmctld
    stop_one munged
    if [[ -n $any ]]; then say "stopped"; else say "nothing was running"; fi
}

cmd_status() {
    local name pid
    for name in munged slurmctld slurmd; do
        if pid=$(pid_of "$name"); then
            say "$name: running (pid $pid)"
        elif [[ $name == munged ]] && munge_works; then
            say "munged: not started by this script, but a munged answers on $MUNGE_SOCKET_DIR"
        else
            say "$name: not running"
        fi
    done
    say "SLURM_CONF=$SLURM_CONF_FILE"
    if pid_of slurmctld >/dev/null; then
        sinfo || true
        squeue || true
    fi
}

case "${1:-}" in
    start) cmd_start ;;
    stop) cmd_stop ;;
    status) cmd_status ;;
    *) echo "usage: $0 {start|stop|status}   (state folder: \${SLURM_LOCAL_DIR:-/tmp/dglstm-slurm})" >&2; exit 2 ;;
esac
