"""Ranks on this host: ``pretrain train --nproc N`` and ``pretrain eval --nproc N`` start N processes and watch them.

:func:`start_local_ranks` starts the ranks with a torchrun-style environment on a free port, from the calling (main)
thread, with their stop signals blocked until they have installed handlers, and tells each its launcher's pid, so
that it dies with the launcher (:mod:`pretrain.lifecycle`). :func:`watch_ranks` fails fast: when one rank dies, the
others are killed and the rank is named. :func:`run_train_ranks` is the training launcher around both: it records
the ranks in the run's lease, forwards stop signals to them (a Ctrl-C on a terminal reaches them itself; a second one
kills them), and kills them at once if the lease is lost.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import time

from pretrain.distributed import cpu_allotment, find_free_port
from pretrain.lease import Lease, LeaseProcess, lease_holder, watch_lease
from pretrain.lifecycle import LAUNCHER_PID_ENV, LEASE_TOKEN_ENV, StopSignals, resume_gc, stop_signals_blocked
from pretrain.rundir import EXIT_FAILED, EXIT_OK, EXIT_PREEMPTED

__all__ = ["run_train_ranks", "start_local_ranks", "watch_ranks"]

logger = logging.getLogger(__name__)

_KILL_GRACE_S = 10.0


def start_local_ranks(argv: list[str], nproc: int, extra_env: dict[str, str] | None = None) -> list[subprocess.Popen]:
    """Start ``nproc`` local ranks of ``argv`` with a torchrun-style environment on a free port.

    The ranks share this process's CPUs (affinity, Slurm task, OMP_NUM_THREADS): each gets its part of them. Call it
    from the main thread: a rank's parent-death signal fires when the thread that started it ends.
    """
    port = find_free_port()
    threads = max(1, cpu_allotment() // nproc)
    base_env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    procs = []
    with stop_signals_blocked():  # a signal forwarded before a rank has its handlers waits for them
        for rank in range(nproc):
            env = dict(
                base_env,
                RANK=str(rank),
                WORLD_SIZE=str(nproc),
                LOCAL_RANK=str(rank),
                LOCAL_WORLD_SIZE=str(nproc),
                MASTER_ADDR="127.0.0.1",
                MASTER_PORT=str(port),
                OMP_NUM_THREADS=str(threads),
                **{LAUNCHER_PID_ENV: str(os.getpid())},
                **(extra_env or {}),
            )
            procs.append(subprocess.Popen(argv, env=env))
    logger.info("started %d ranks (pids %s), rendezvous 127.0.0.1:%d", nproc, [p.pid for p in procs], port)
    return procs


def run_train_ranks(argv: list[str], nproc: int, lease: Lease, stop: StopSignals) -> int:
    """Start ``nproc`` training ranks under ``lease`` and wait for them; the exit code of the run.

    Stop signals received here (also before the ranks existed) are forwarded to them; a second Ctrl-C kills them. If
    the lease is lost (removed, or taken by a run that judged this one dead), the ranks are killed and this process
    exits at once.
    """
    procs = start_local_ranks(argv, nproc, {LEASE_TOKEN_ENV: lease.info.token})
    lease.set_processes(LeaseProcess.of(p.pid) for p in procs)
    resume_gc()  # this process has imported what it needs: from here on it watches

    def forward(signum: int) -> None:
        if signum == signal.SIGINT:  # a terminal's Ctrl-C reaches the ranks too; `pretrain cancel` signals them all
            logger.warning("interrupted: the ranks checkpoint and stop at the end of this step (Ctrl-C again to kill)")
        else:
            logger.warning("forwarding %s to the ranks", signal.Signals(signum).name)
        for p in procs:
            if p.poll() is None:
                p.send_signal(signum)

    def lost(why: str) -> None:
        print(f"pretrain train: the run's lease is lost ({why}); killing the ranks, nothing more is written",
              file=sys.stderr, flush=True)  # fmt: skip
        _stop_all(procs)
        os._exit(EXIT_FAILED)

    stop.add_listener(forward)
    if stop.received is not None:  # arrived while the ranks were being started
        forward(stop.received)
    watching = watch_lease(lease.run_dir, lease.info.token, lost)
    try:
        code = watch_ranks(procs)
    except KeyboardInterrupt:
        _stop_all(procs)
        return 130
    finally:
        watching.set()
    current, _ = lease_holder(lease.run_dir)
    if current is None or current.token != lease.info.token:  # a rank saw it first and stopped: say why, not "failed"
        lost("it was removed" if current is None else f"it now names another run ({current.describe()})")
    return code


def watch_ranks(
    procs: list[subprocess.Popen], command: str = "train", ok: tuple[int, ...] = (EXIT_OK, EXIT_PREEMPTED)
) -> int:
    """Wait for local ranks; when one exits with a code outside ``ok``, kill the others and return its code (1 for a
    signal). Otherwise the preempted code if any rank was preempted, else 0."""
    while True:
        codes = [p.poll() for p in procs]
        failed = [(r, c) for r, c in enumerate(codes) if c is not None and c not in ok]
        if failed:
            rank, code = failed[0]
            how = f"was killed by {signal.Signals(-code).name}" if code < 0 else f"exited with code {code}"
            others = [r for r, c in enumerate(codes) if c is None]
            logger.error("rank %d %s; stopping the other ranks %s", rank, how, others)
            print(f"pretrain {command}: rank {rank} {how}; stopped the other ranks", file=sys.stderr)
            _stop_all(procs)
            return code if code > 0 else EXIT_FAILED
        if all(c is not None for c in codes):
            return EXIT_PREEMPTED if EXIT_PREEMPTED in codes else EXIT_OK
        time.sleep(0.2)


def _stop_all(procs: list[subprocess.Popen]) -> None:
    for p in procs:
        if p.poll() is None:
            p.send_signal(signal.SIGKILL)
    deadline = time.monotonic() + _KILL_GRACE_S
    for p in procs:
        try:
            p.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            pass
