# Shared by start.sh and stop.sh (sourced, not run): messages, the pid checks and the lock of the local Slurm.
# shellcheck shell=bash

LOCK=/run/lock/pretrain-local-slurm.lock

log() { echo "local Slurm: $*"; }

# pid_alive PIDFILE NAME: the pid in PIDFILE is a live process called NAME.
pid_alive() {
    local pid
    [ -r "$1" ] || return 1
    pid="$(cat "$1" 2>/dev/null)"
    [ -n "$pid" ] && [ -r "/proc/$pid/comm" ] && [ "$(cat "/proc/$pid/comm")" = "$2" ]
}

stop_daemon() { # stop_daemon PIDFILE NAME: TERM the recorded pid, KILL it after 15 s
    local pid
    pid_alive "$1" "$2" || return 0
    pid="$(cat "$1")"
    log "stopping $2 (pid $pid)"
    kill -TERM "$pid" 2>/dev/null || true
    for _ in $(seq 1 30); do
        [ -d "/proc/$pid" ] || return 0
        sleep 0.5
    done
    log "$2 (pid $pid) ignored SIGTERM for 15 s; killing it"
    kill -KILL "$pid" 2>/dev/null || true
}

any_slurmd_alive() {
    local f
    for f in /run/slurmd.pid /run/slurmd-*.pid; do
        pid_alive "$f" slurmd && return 0
    done
    return 1
}

stop_slurmds() { # every slurmd this script started, under any layout (one node: slurmd.pid before %n pid files)
    local f
    for f in /run/slurmd.pid /run/slurmd-*.pid; do
        [ -e "$f" ] && stop_daemon "$f" slurmd
    done
    return 0
}

# take_lock: one start.sh or stop.sh at a time (fd 9, released when the script exits). The 2>/dev/null is scoped to
# the group: on `exec` alone it would silence the script's stderr for good.
take_lock() {
    if ! { exec 9>"$LOCK"; } 2>/dev/null; then exec 9>"/tmp/pretrain-local-slurm.lock"; fi
    flock -w 600 9 || { echo "local Slurm: ERROR: another start.sh/stop.sh holds the lock" >&2; exit 1; }
}
