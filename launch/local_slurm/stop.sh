#!/usr/bin/env bash
# Stop the local single-machine Slurm started by start.sh: slurmd, slurmctld, then munged, each by the pid it
# recorded. Running job steps are left to Slurm (slurmstepd keeps them; a later start.sh reattaches to them); cancel
# them first with `scancel` if you want them gone. Idempotent: stopping a stopped cluster is a no-op success.
set -euo pipefail

LOCK=/run/lock/pretrain-local-slurm.lock

log() { echo "local Slurm: $*"; }

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

if [ "$(id -u)" != 0 ]; then
    if pid_alive /run/slurmctld.pid slurmctld || pid_alive /run/slurmd.pid slurmd; then
        echo "local Slurm: ERROR: stopping it needs root: sudo make slurm-down" >&2
        exit 1
    fi
    log "not running"
    exit 0
fi
if ! { exec 9>"$LOCK"; } 2>/dev/null; then exec 9>"/tmp/pretrain-local-slurm.lock"; fi
flock -w 600 9 || { echo "local Slurm: ERROR: another start.sh/stop.sh holds the lock" >&2; exit 1; }
stop_daemon /run/slurmd.pid slurmd
stop_daemon /run/slurmctld.pid slurmctld
stop_daemon /run/munge/munged.pid munged
log "stopped"
