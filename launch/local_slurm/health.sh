#!/usr/bin/env bash
# Health check of the local single-machine Slurm started by start.sh.
#
# Healthy means: slurmctld answers `scontrol ping`, this host's node is idle or mixed in `sinfo`, and a one-task
# step (`srun -N1 true`) runs within a timeout. A node that is fully allocated by running jobs is healthy too (the
# srun check is skipped: it would wait for the jobs to end).
#
# Usage: health.sh [--quiet]      exit 0 healthy, 1 not (the reason goes to stderr unless --quiet)
set -uo pipefail

QUIET=0
[ "${1:-}" = "--quiet" ] && QUIET=1
HOST="$(hostname)"
SRUN_TIMEOUT_S="${PRETRAIN_SLURM_SRUN_TIMEOUT_S:-60}"

say() { [ "$QUIET" = 1 ] || echo "local Slurm health: $*" >&2; }

# A check run from inside a job must not attach to that job's allocation.
unset SLURM_JOB_ID SLURM_JOBID SLURM_NODELIST SLURM_JOB_NODELIST SLURM_NTASKS SLURM_NPROCS SLURM_STEP_ID

for cmd in scontrol sinfo srun; do
    command -v "$cmd" >/dev/null 2>&1 || { say "'$cmd' not found (Slurm client not installed)"; exit 1; }
done

if ! timeout 15 scontrol ping 2>/dev/null | grep -q "is UP"; then
    say "slurmctld does not answer 'scontrol ping'"
    exit 1
fi

state="$(timeout 15 sinfo -h -N -n "$HOST" -o %T 2>/dev/null | head -n1)"
case "$state" in
    idle | mixed)
        if ! out="$(timeout "$SRUN_TIMEOUT_S" srun -N1 -n1 -t 1 --immediate=30 -J pretrain-health true 2>&1)"; then
            say "node $HOST is $state but 'srun -N1 true' failed or took over ${SRUN_TIMEOUT_S}s: $out"
            exit 1
        fi
        say "ok: node $HOST is $state, srun works"
        ;;
    allocated | completing)
        say "ok: node $HOST is $state (busy with jobs; srun check skipped)"
        ;;
    "")
        say "node $HOST is not known to slurmctld (sinfo shows nothing for it)"
        exit 1
        ;;
    *)
        reason="$(timeout 15 sinfo -h -N -n "$HOST" -o %E 2>/dev/null | head -n1)"
        say "node $HOST is '$state' (reason: ${reason:-none}); expected idle or mixed"
        exit 1
        ;;
esac
exit 0
