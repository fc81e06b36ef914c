#!/usr/bin/env bash
# Stop the local Slurm started by start.sh: every node's slurmd, slurmctld, then munged, each by the pid it recorded.
# Running job steps are left to Slurm (slurmstepd keeps them; a later start.sh reattaches to them); cancel them first
# with `scancel` if you want them gone. The node names stay in /etc/hosts (start.sh keeps them up to date). Idempotent:
# stopping a stopped cluster is a no-op success.
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
# shellcheck source=common.sh
source "$HERE/common.sh"

if [ "$(id -u)" != 0 ]; then
    if pid_alive /run/slurmctld.pid slurmctld || any_slurmd_alive; then
        echo "local Slurm: ERROR: stopping it needs root: sudo make slurm-down" >&2
        exit 1
    fi
    log "not running"
    exit 0
fi
take_lock
stop_slurmds
stop_daemon /run/slurmctld.pid slurmctld
stop_daemon /run/munge/munged.pid munged
log "stopped"
