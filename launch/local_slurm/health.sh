#!/usr/bin/env bash
# Health check of the local Slurm started by start.sh (one node or several).
#
# Healthy means: slurmctld answers `scontrol ping`, it knows at least one node, every node is idle, mixed or busy in
# `sinfo`, and on every idle or mixed node a one-task step (`srun -N1 -w NODE true`) runs within a timeout. A node that
# is fully allocated by running jobs is healthy too (its srun check is skipped: it would wait for the jobs to end).
#
# Usage: health.sh [--quiet]      exit 0 healthy, 1 not (the reason goes to stderr unless --quiet)
set -uo pipefail

QUIET=0
[ "${1:-}" = "--quiet" ] && QUIET=1
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

# "NODE STATE", one line per node (sinfo -N repeats a node for each of its partitions)
nodes="$(timeout 15 sinfo -h -N -o '%N %T' 2>/dev/null | sort -u)"
if [ -z "$nodes" ]; then
    say "slurmctld knows no nodes (sinfo -N shows none)"
    exit 1
fi

while read -r node state; do
    case "$state" in
        idle | mixed)
            # </dev/null: srun forwards its stdin to the task, and would swallow the rest of the node list
            if ! out="$(timeout "$SRUN_TIMEOUT_S" srun -N1 -n1 -w "$node" -t 1 --immediate=30 -J pretrain-health true \
                </dev/null 2>&1)"; then
                say "node $node is $state but 'srun -N1 -w $node true' failed or took over ${SRUN_TIMEOUT_S}s: $out"
                exit 1
            fi
            say "ok: node $node is $state, srun works"
            ;;
        allocated | completing)
            say "ok: node $node is $state (busy with jobs; srun check skipped)"
            ;;
        *)
            reason="$(timeout 15 sinfo -h -N -n "$node" -o %E 2>/dev/null | head -n1)"
            say "node $node is '$state' (reason: ${reason:-none}); expected idle or mixed"
            exit 1
            ;;
    esac
done <<<"$nodes"
exit 0
