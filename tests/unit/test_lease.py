"""The run directory's lease: one owner at a time, taken over only from a provably dead holder (real processes): every
process of the run must be gone, and a stale heartbeat is judged by the file system's clock, never the holder's."""

from __future__ import annotations

import dataclasses
import json
import multiprocessing
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from pretrain.lease import EXIT_WAIT_S, LeaseHeld, LeaseProcess, acquire_lease, lease_holder, watch_lease
from pretrain.rundir import LEASE


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


_HELD_IN_EXIT = r"""
import ctypes, os, signal, sys, time
libc = ctypes.CDLL(None, use_errno=True)
libc.ptrace.argtypes = [ctypes.c_long, ctypes.c_long, ctypes.c_void_p, ctypes.c_void_p]
TRACEME, CONT, SETOPTIONS, O_TRACEEXIT = 0, 7, 0x4200, 0x40
pid = os.fork()
if pid == 0:
    if libc.ptrace(TRACEME, 0, None, None) != 0:
        os._exit(3)
    os.kill(os.getpid(), signal.SIGSTOP)
    time.sleep(600)
    os._exit(0)
_, st = os.waitpid(pid, 0)
if not os.WIFSTOPPED(st) or libc.ptrace(SETOPTIONS, pid, None, ctypes.c_void_p(O_TRACEEXIT)) != 0:
    print("no ptrace", flush=True)
    sys.exit(0)
libc.ptrace(CONT, pid, None, None)
print(pid, flush=True)
_, st = os.waitpid(pid, 0)  # the tracee was killed: it stops on its way out, before it exits
print("held", st >> 16 == 6, flush=True)  # PTRACE_EVENT_EXIT
sys.stdin.readline()
libc.ptrace(CONT, pid, None, None)
os.waitpid(pid, 0)
print("exited", flush=True)
"""
"""Forks a traced process and holds it in exit, once killed, until a line comes on stdin: what a process killed in
uninterruptible sleep (``fsync`` of a checkpoint) looks like to another process until the call returns."""


def test_a_killed_holder_not_yet_exited_is_waited_for_then_taken_over(tmp_path: Path) -> None:
    tracer = subprocess.Popen([sys.executable, "-c", _HELD_IN_EXIT], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                              text=True)  # fmt: skip
    pid = None
    try:
        first = tracer.stdout.readline().strip()
        if first == "no ptrace":
            pytest.skip("ptrace is not allowed here: a killed process cannot be held in exit")
        pid = int(first)
        acquire_lease(tmp_path, pid=pid)._stop.set()
        with pytest.raises(LeaseHeld, match=rf"in use by another run \(pid {pid} on "):
            acquire_lease(tmp_path)  # alive and not killed: it keeps the run directory
        os.kill(pid, signal.SIGKILL)
        assert tracer.stdout.readline().split() == ["held", "True"]
        holder = lease_holder(tmp_path)[0]
        assert LeaseProcess.of(pid).alive() is True and LeaseProcess.of(pid).killed() is True
        assert holder.dead_because(exit_wait_s=0) is None  # still there: not gone yet
        assert f"killed but not yet exited: {pid}" in holder.describe()
        t0 = time.monotonic()
        with pytest.raises(LeaseHeld, match=f"killed but not yet exited: {pid}"):
            acquire_lease(tmp_path, exit_wait_s=0.5)  # a process stuck in the kernel is named
        assert 0.5 <= time.monotonic() - t0 < 5
        threading.Timer(1.0, lambda: (tracer.stdin.write("go\n"), tracer.stdin.flush())).start()
        t0 = time.monotonic()
        with acquire_lease(tmp_path) as lease:  # waits for the killed holder to exit, then takes over
            assert 0.9 <= time.monotonic() - t0 < EXIT_WAIT_S
            assert lease.took_over == f"process {pid} on this host is gone"
        assert tracer.stdout.readline().strip() == "exited"
    finally:
        if pid is not None and LeaseProcess.of(pid).alive():
            os.kill(pid, signal.SIGKILL)
        tracer.kill()
        tracer.wait()


def _write_foreign_lease(run_dir: Path, mtime: float | None = None, **fields: object) -> None:
    proc = {"host": "another-node", "pid": 1234, "start": 1, "boot_id": None}
    base = {"host": "another-node", "pid": 1234, "pid_start": 1, "slurm_job_id": None, "heartbeat": time.time(),
            "timeout_s": 600.0, "token": "theirs", "beat": 7, "processes": [proc]}  # fmt: skip
    (run_dir / LEASE).write_text(json.dumps({**base, **fields}))
    if mtime is not None:
        os.utime(run_dir / LEASE, (mtime, mtime))


def test_a_lease_of_another_host_needs_a_stale_heartbeat_or_the_same_slurm_job(tmp_path: Path) -> None:
    _write_foreign_lease(tmp_path)
    with pytest.raises(LeaseHeld, match="pid 1234 on another-node"):
        acquire_lease(tmp_path)
    _write_foreign_lease(tmp_path, slurm_job_id="77")
    with acquire_lease(tmp_path, slurm_job_id="77") as lease:  # the same job, requeued: its earlier life is over
        assert lease.took_over == "the same Slurm job 77 (requeued)"
    _write_foreign_lease(tmp_path, mtime=time.time() - 700)  # its file unchanged for 700 s (the file system's clock)
    with acquire_lease(tmp_path) as lease:
        assert lease.took_over.startswith("its heartbeat has not changed for 70") and "timeout 600 s" in lease.took_over
    (tmp_path / LEASE).write_text('{"host": "x", "pi')  # torn or edited: proves no holder
    with acquire_lease(tmp_path) as lease:
        assert "unreadable" in lease.took_over


def test_the_holders_clock_is_never_compared_with_ours(tmp_path: Path) -> None:
    # a heartbeat stamped a day ahead (the holder's clock is skewed) in a file the file system dated long ago: stale
    _write_foreign_lease(tmp_path, heartbeat=time.time() + 86400, mtime=time.time() - 700)
    with acquire_lease(tmp_path) as lease:
        assert lease.took_over.startswith("its heartbeat has not changed for 70")
    # a heartbeat stamped long ago in a file written just now: fresh, whatever the holder's clock said
    _write_foreign_lease(tmp_path, heartbeat=time.time() - 86400)
    with pytest.raises(LeaseHeld, match="heartbeat 0 s ago"):
        acquire_lease(tmp_path)


def test_a_lease_dated_ahead_of_the_file_systems_clock_cannot_lock_the_directory_for_good(tmp_path: Path) -> None:
    # the holder's node (its clock a day ahead, on a file system that keeps the writer's times) died: its lease file
    # is dated in the future. It is timed by observation: unchanged for its timeout since first seen, it passes on.
    ahead = time.time() + 86400
    _write_foreign_lease(tmp_path, heartbeat=ahead, mtime=ahead, timeout_s=1.0)
    with pytest.raises(LeaseHeld, match="heartbeat stamped ahead of this clock"):
        acquire_lease(tmp_path)
    time.sleep(1.5)
    with acquire_lease(tmp_path) as lease:
        assert lease.took_over.startswith("its heartbeat has not changed for ") and "s (timeout 1 s)" in lease.took_over
    assert not list(tmp_path.glob(".lease.json.*"))  # the observation is cleaned up with the takeover
    # a holder that keeps beating (a new beat each time we look) is never stale, however far ahead its clock
    for beat in range(3):
        _write_foreign_lease(tmp_path, heartbeat=ahead, mtime=ahead, timeout_s=1.0, beat=beat)
        with pytest.raises(LeaseHeld):
            acquire_lease(tmp_path)
        time.sleep(0.6)


def test_a_future_heartbeat_of_a_dead_process_on_this_host_is_taken_over_at_once(tmp_path: Path) -> None:
    holder = _sleeper()
    acquire_lease(tmp_path, pid=holder.pid)._stop.set()
    data = json.loads((tmp_path / LEASE).read_text())
    (tmp_path / LEASE).write_text(json.dumps({**data, "heartbeat": time.time() + 86400}))
    os.utime(tmp_path / LEASE, (time.time() + 86400,) * 2)
    os.kill(holder.pid, signal.SIGKILL)
    holder.wait()
    with acquire_lease(tmp_path) as lease:
        assert lease.took_over == f"process {holder.pid} on this host is gone"


def test_the_lease_passes_on_only_when_every_process_of_the_run_is_gone(tmp_path: Path) -> None:
    launcher, rank = _sleeper(), _sleeper()
    try:
        lease = acquire_lease(tmp_path, pid=launcher.pid)
        lease.set_processes([LeaseProcess.of(rank.pid)])
        lease._stop.set()
        info = lease_holder(tmp_path)[0]
        assert [p.pid for p in info.processes] == [launcher.pid, rank.pid]
        os.kill(launcher.pid, signal.SIGKILL)
        launcher.wait()
        # the launcher is gone but its rank still runs (an orphan): the directory stays its run's
        with pytest.raises(LeaseHeld, match=rf"pid {launcher.pid} on \S+, ranks {rank.pid} on "):
            acquire_lease(tmp_path)
        os.kill(rank.pid, signal.SIGKILL)
        rank.wait()
        with acquire_lease(tmp_path) as taken:
            assert taken.took_over == f"processes {launcher.pid}, {rank.pid} on this host are gone"
    finally:
        for p in (launcher, rank):
            if p.poll() is None:
                p.kill()
                p.wait()


def test_a_reused_pid_is_not_the_runs_process_and_is_never_signalled(tmp_path: Path) -> None:
    proc = _sleeper()
    try:
        me = LeaseProcess.of(proc.pid)
        assert me.alive() is True
        impostor = LeaseProcess(me.host, me.pid, me.start - 1, me.boot_id)  # same pid, another start time
        assert impostor.alive() is False and impostor.send(signal.SIGTERM) is False
        assert proc.poll() is None
        assert LeaseProcess("another-node", proc.pid, me.start).alive() is None  # unknown: not judged by this /proc
        assert me.send(signal.SIGTERM) is True
        assert proc.wait(timeout=10) == -signal.SIGTERM
        assert me.alive() is False and me.send(signal.SIGTERM) is False
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_watch_lease_reports_a_removed_or_taken_lease_and_nothing_else(tmp_path: Path) -> None:
    lost: list[str] = []
    lease = acquire_lease(tmp_path)
    stop = watch_lease(tmp_path, lease.info.token, lost.append, interval_s=0.1)
    for _ in range(5):  # heartbeats rewrite the file: still ours
        lease._write()
        time.sleep(0.1)
    assert lost == []
    info = dataclasses.replace(lease.info, token="someone-else")
    (tmp_path / LEASE).write_text(json.dumps({**json.loads((tmp_path / LEASE).read_text()), "token": "someone-else"}))
    deadline = time.monotonic() + 5
    while not lost and time.monotonic() < deadline:
        time.sleep(0.05)
    assert len(lost) == 1 and "now names another run" in lost[0], lost
    stop.set()

    lost.clear()
    (tmp_path / LEASE).unlink()
    with acquire_lease(tmp_path) as lease:
        stop = watch_lease(tmp_path, lease.info.token, lost.append, interval_s=0.1)
        (tmp_path / LEASE).unlink()
        t0 = time.monotonic()
        while not lost and time.monotonic() - t0 < 5:
            time.sleep(0.05)
        assert lost == [f"{tmp_path / LEASE} was removed"]
        assert time.monotonic() - t0 < 2
    del info

    lost.clear()
    with acquire_lease(tmp_path) as lease:
        stop = watch_lease(tmp_path, lease.info.token, lost.append, interval_s=0.1)
        stop.set()  # what a run does before it releases its lease
    time.sleep(0.5)
    assert lost == []


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
            dead = {"host": os.uname().nodename, "pid": 2**22 + 17, "start": 1, "boot_id": None}
            _write_foreign_lease(run_dir, host=dead["host"], pid=dead["pid"], processes=[dead])
        queue = ctx.Queue()
        start = time.time() + 0.3
        procs = [ctx.Process(target=_race, args=(str(run_dir), start, queue)) for _ in range(2)]
        for p in procs:
            p.start()
        for p in procs:
            p.join(timeout=30)
        results = sorted(queue.get(timeout=5) for _ in procs)
        assert results[0].startswith("lost: ") and results[1] == "won", results
