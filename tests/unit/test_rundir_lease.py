"""The run directory's lease: one owner at a time, taken over only from a provably dead holder (real processes)."""

from __future__ import annotations

import dataclasses
import json
import multiprocessing
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pretrain.rundir import LEASE, LeaseHeld, acquire_lease, lease_holder


def _sleeper() -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])


def test_a_live_holder_keeps_the_lease_and_is_named(tmp_path: Path) -> None:
    holder = _sleeper()
    try:
        lease = acquire_lease(tmp_path, pid=holder.pid)
        before = (tmp_path / LEASE).read_text()
        with pytest.raises(LeaseHeld, match=rf"in use by another run \(pid {holder.pid} on "):
            acquire_lease(tmp_path)
        assert (tmp_path / LEASE).read_text() == before  # the refused run changed nothing
        lease.release()
        assert not (tmp_path / LEASE).exists()
    finally:
        holder.kill()
        holder.wait()


def test_a_killed_holder_on_this_host_is_taken_over_at_once(tmp_path: Path) -> None:
    holder = _sleeper()
    acquire_lease(tmp_path, pid=holder.pid)._stop.set()  # its heartbeat is fresh: only the dead pid can free it
    os.kill(holder.pid, signal.SIGKILL)
    holder.wait()
    t0 = time.monotonic()
    with acquire_lease(tmp_path) as lease:
        assert time.monotonic() - t0 < 5
        assert lease.took_over == f"process {holder.pid} on this host is gone"
        assert lease_holder(tmp_path)[0].pid == os.getpid()


def _write_foreign_lease(run_dir: Path, **fields: object) -> None:
    base = {"host": "another-node", "pid": 1234, "pid_start": 1, "slurm_job_id": None, "heartbeat": time.time(),
            "timeout_s": 600.0, "token": "theirs"}  # fmt: skip
    (run_dir / LEASE).write_text(json.dumps({**base, **fields}))


def test_a_lease_of_another_host_needs_a_stale_heartbeat_or_the_same_slurm_job(tmp_path: Path) -> None:
    _write_foreign_lease(tmp_path)
    with pytest.raises(LeaseHeld, match="pid 1234 on another-node"):
        acquire_lease(tmp_path)
    _write_foreign_lease(tmp_path, slurm_job_id="77")
    with acquire_lease(tmp_path, slurm_job_id="77") as lease:  # the same job, requeued: its earlier life is over
        assert lease.took_over == "the same Slurm job 77 (requeued)"
    _write_foreign_lease(tmp_path, heartbeat=time.time() - 700)
    with acquire_lease(tmp_path) as lease:
        assert lease.took_over.startswith("its heartbeat is 70") and "timeout 600 s" in lease.took_over
    (tmp_path / LEASE).write_text('{"host": "x", "pi')  # torn or edited: proves no holder
    with acquire_lease(tmp_path) as lease:
        assert "unreadable" in lease.took_over


def test_release_removes_only_its_own_lease(tmp_path: Path) -> None:
    lease = acquire_lease(tmp_path)
    info = dataclasses.replace(lease.info, token="someone-else")  # taken over after we were judged dead
    (tmp_path / LEASE).write_text(json.dumps(dataclasses.asdict(info)))
    lease.release()
    assert lease_holder(tmp_path)[0].token == "someone-else"


def _race(run_dir: str, start: float, queue: multiprocessing.Queue) -> None:
    while time.time() < start:
        pass
    try:
        lease = acquire_lease(run_dir)
        queue.put("won")
        time.sleep(1.0)  # hold it while the other one tries
        lease.release()
    except LeaseHeld as e:
        queue.put(f"lost: {e}")


@pytest.mark.parametrize("dead_holder", [False, True])
def test_two_runs_starting_together_never_both_win(tmp_path: Path, dead_holder: bool) -> None:
    ctx = multiprocessing.get_context("fork")
    for attempt in range(5):
        run_dir = tmp_path / f"run{attempt}"
        run_dir.mkdir()
        if dead_holder:  # both race to break the same dead lease
            _write_foreign_lease(run_dir, host=os.uname().nodename, pid=2**22 + 17)
        queue = ctx.Queue()
        start = time.time() + 0.3
        procs = [ctx.Process(target=_race, args=(str(run_dir), start, queue)) for _ in range(2)]
        for p in procs:
            p.start()
        for p in procs:
            p.join(timeout=30)
        results = sorted(queue.get(timeout=5) for _ in procs)
        assert results[0].startswith("lost: ") and results[1] == "won", results
