"""How ``pretrain train`` holds its run directory: the lease taken first, kept by every process, and what a run that
is stopped before its ranks start leaves behind.

- :func:`hold_run_dir`: the ``--nproc`` launcher (or a one-process run) takes the lease before anything slow, so a
  second run is told who holds the directory from the first second; if the checks that follow fail, the lease is
  released and the folders it created are removed (a config error leaves no run directory behind).
- :func:`take_joined_lease`: rank 0 of a Slurm or torchrun world takes it once the process group exists, and it
  lists every rank of every node.
- :func:`lease_lost`: a process whose lease is gone or names another run stops at once, writing nothing more.
- :func:`pretrain.plan.refuse_if_held` (a pre-start check): a live run's own history (before its first
  checkpoint) is named as in use, not as an earlier run without a usable checkpoint.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from pretrain.lease import Lease, LeaseHeld, LeaseProcess, acquire_lease
from pretrain.lifecycle import stop_outcome
from pretrain.rundir import EXIT_FAILED, EXIT_PREEMPTED, STATUS

__all__ = ["hold_run_dir", "lease_lost", "record_stop_before_start", "take_joined_lease"]

logger = logging.getLogger(__name__)


def acquire(run_dir: Path, slurm_job_id: str | None) -> Lease:
    """Take the lease of ``run_dir`` (:func:`pretrain.lease.acquire_lease`), saying so when it took one over."""
    lease = acquire_lease(run_dir, slurm_job_id=slurm_job_id)
    if lease.took_over:
        logger.warning("took over the lease of %s: its holder is dead (%s)", run_dir, lease.took_over)
    return lease


@contextlib.contextmanager
def hold_run_dir(run_dir: Path) -> Iterator[Lease]:
    """Take the lease of ``run_dir`` for the ``with`` body's checks; if they raise, release it and remove the folders
    taking it created. The caller releases it otherwise (``with lease:``).

    Raises:
        LeaseHeld: A live run holds the directory.
    """
    created = []
    path = run_dir
    while not path.exists() and path != path.parent:
        created.append(path)  # deepest first
        path = path.parent
    try:
        lease = acquire(run_dir, None)
    except LeaseHeld:
        _remove_empty(created)
        raise
    try:
        yield lease
    except BaseException:
        lease.release()
        _remove_empty(created)
        raise


def _remove_empty(dirs: list[Path]) -> None:
    for d in dirs:
        try:
            d.rmdir()
        except OSError:
            return


def take_joined_lease(run_dir: Path, dist: Any) -> tuple[Lease | None, str, str]:
    """Rank 0 of a Slurm/torchrun world takes the lease; every rank learns its token or the refusal, and the lease
    records every rank of every node.

    Returns:
        ``(lease, token, refusal)``: the lease this process holds (None on other ranks), the lease's token, and, when
        the directory belongs to a live run, the message naming it.
    """
    from pretrain.distributed import all_gather_object, broadcast_object

    lease, refused = None, ""
    if dist.rank == 0:
        try:
            lease = acquire(run_dir, dist.slurm_job_id)
        except LeaseHeld as e:
            refused = str(e)
    refused, token = broadcast_object((refused, lease.info.token if lease is not None else ""))
    if not refused:
        processes = all_gather_object(LeaseProcess.of())
        if lease is not None:
            lease.set_processes(processes)
    return lease, str(token), str(refused)


def lease_lost(why: str) -> None:
    """A process whose lease is gone or taken stops at once: no checkpoint, no status, no metrics."""
    print(f"pretrain train: the run's lease is lost ({why}); stopping now, nothing more is written",
          file=sys.stderr, flush=True)  # fmt: skip
    os._exit(EXIT_FAILED)


def record_stop_before_start(
    run_dir: Path, signum: int, resume_from: Path | None, max_steps: int, world_size: int
) -> int:
    """A stop signal came before the ranks started: say so in status.json (the directory resumes as it is); exit 3."""
    from pretrain.checkpoint import read_meta
    from pretrain.metrics import StatusFile

    message = f"stopped by {signal.Signals(signum).name} before training started"
    step = int(read_meta(resume_from).get("step", 0)) if resume_from is not None else 0
    status = StatusFile(run_dir / STATUS, max_steps=max_steps, world_size=world_size, run_dir=str(run_dir))
    status.update(
        state=stop_outcome(signum),
        step=step,
        exit_code=EXIT_PREEMPTED,
        message=message,
        last_checkpoint=str(resume_from) if resume_from is not None else None,
    )
    logger.warning("%s: no step was trained; run the same command to continue", message)
    return EXIT_PREEMPTED
