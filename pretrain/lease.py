"""The run directory's lease (``lease.json``): one run owns a run directory at a time. Torch-free.

The process that starts a run (the ``--nproc`` launcher, a one-process run, or rank 0 of a Slurm or torchrun job)
takes the lease before anything slow and before it writes anything, and holds it for the run's whole life, refreshing
its heartbeat (a counter and a time). The lease lists every process of the run, each with its host, pid and start time
(launcher and ranks, every node's own). The file is created with ``os.link`` of a private temporary file, which is
atomic also on NFS, so two starts on one directory (a requeued job and a manual resubmission, a job array with one
name) cannot both win. A run that cannot take the lease exits with :data:`~pretrain.rundir.EXIT_USAGE`, naming the
holder. The lease passes to a new run only when its holder is provably gone:

- every process it lists is on this host and gone (pid and start time, so a reused pid is not mistaken for it);
- its Slurm job is no longer running, or the new run is the same Slurm job after a requeue;
- the lease file has not changed for the timeout it states, judged on one clock: the file system's time of the lease
  file against that of a file the new run has just written beside it, never the holder's clock against ours. A lease
  dated ahead of that clock is timed by observation (the first run that sees it records it in ``.lease.json.seen``),
  so a skewed clock cannot lock a directory for good.

A process of the run that is alive on this host keeps the lease whatever else is said; one that was killed and has
not exited yet (a SIGKILL waits for an ``fsync`` to return) is waited for, up to :data:`EXIT_WAIT_S`. Every process of
the run watches its lease (:func:`watch_lease`) and stops at once, writing nothing more, when it is gone or names
another run.

No library does this: ``filelock``/``fcntl`` locks are not reliable on the network file systems clusters share across
nodes, and a lock held by a dead node must be broken by a rule (heartbeat, Slurm job state) a plain lock lacks.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import signal
import socket
import subprocess
import threading
import time
import uuid
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from data_pipeline.fsutil import fsync_dir
from pretrain.rundir import LEASE, write_atomic

__all__ = [
    "EXIT_WAIT_S",
    "HEARTBEAT_S",
    "LEASE_TIMEOUT_S",
    "LEASE_WATCH_S",
    "Lease",
    "LeaseHeld",
    "LeaseInfo",
    "LeaseProcess",
    "acquire_lease",
    "lease_holder",
    "process_start_time",
    "watch_lease",
]

HEARTBEAT_S = 30.0
"""Seconds between refreshes of a held lease."""
LEASE_TIMEOUT_S = 600.0
"""A lease unchanged for this long is stale (its holder's node died or froze); stated in every lease."""


def _proc_stat(pid: int) -> list[str] | None:
    """The fields of ``/proc/PID/stat`` from field 3 (state) on; None when there is no such process."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, ValueError):
        return None


def _proc_start(pid: int) -> int | None:
    fields = _proc_stat(pid)
    if fields is None or fields[0] in ("Z", "X"):  # a zombie is gone
        return None
    return int(fields[19])  # field 22 of proc(5): starttime


_PF_EXITING = 0x4  # <linux/sched.h>: the process is in exit
_SIGKILL_PENDING = 1 << (signal.SIGKILL - 1)  # its bit in /proc/PID/status SigPnd/ShdPnd


def _proc_killed(pid: int) -> bool:
    """Whether process ``pid`` of this host is on its way out: in exit, or with a SIGKILL the kernel has not acted on
    yet (a process in uninterruptible sleep, say in ``fsync``, dies only when that call returns)."""
    fields = _proc_stat(pid)
    if fields is None:
        return False
    if int(fields[6]) & _PF_EXITING:  # field 9 of proc(5): flags
        return True
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except (OSError, ValueError):
        return False
    pending = (line.split()[1] for line in status.splitlines() if line.startswith(("SigPnd:", "ShdPnd:")))
    return any(int(mask, 16) & _SIGKILL_PENDING for mask in pending)


EXIT_WAIT_S = 30.0
"""How long a starting run waits for the killed processes of the run before it to exit."""


def _boot_id() -> str | None:
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip() or None
    except OSError:
        return None


@dataclasses.dataclass(frozen=True)
class LeaseProcess:
    """One process of a run: the host it runs on and which process it is there."""

    host: str
    pid: int
    start: int | None
    """Start time in clock ticks since boot (``/proc/PID/stat``), so a reused pid is told apart."""
    boot_id: str | None = None
    """The host's boot id: the start time counts from that boot, and a host booted since has none of the run left."""

    @classmethod
    def of(cls, pid: int | None = None) -> LeaseProcess:
        """Process ``pid`` of this host (default: this process)."""
        pid = os.getpid() if pid is None else pid
        return cls(socket.gethostname(), pid, _proc_start(pid), _boot_id())

    def alive(self) -> bool | None:
        """Whether it runs: True or False for a process of this host (its pid with the same start time, not a zombie);
        None for one of another host, which only its heartbeat or its Slurm job tell about."""
        if self.host != socket.gethostname():
            return None
        if self.boot_id and self.boot_id != _boot_id():
            return False
        start = _proc_start(self.pid)
        return start is not None and (self.start is None or start == self.start)

    def killed(self) -> bool:
        """Whether this live process of this host was killed (or is exiting) and has not exited yet."""
        return self.alive() is True and _proc_killed(self.pid)

    def send(self, signum: int) -> bool:
        """Send ``signum`` if this is a live process of this host; whether it was sent. Its identity is checked again
        while a pidfd holds it, so a pid reused in the meantime is never signalled."""
        try:
            fd = os.pidfd_open(self.pid) if self.alive() else None
        except OSError:  # gone meanwhile
            fd = None
        if fd is None:
            return False
        try:
            if self.alive():
                signal.pidfd_send_signal(fd, signum)
                return True
            return False
        except ProcessLookupError:
            return False
        finally:
            os.close(fd)


@dataclasses.dataclass(frozen=True)
class LeaseInfo:
    """What a lease file says about its holder (and, not stored, how long it has been unchanged)."""

    host: str
    pid: int
    """The process that holds the lease (the ``--nproc`` launcher, a one-process run, or rank 0)."""
    pid_start: int | None
    slurm_job_id: str | None
    heartbeat: float
    """Unix time of the last refresh by the holder's clock: shown, never compared with another host's clock."""
    timeout_s: float
    token: str
    """Unique per holder; a refresh or release touches only a lease with its own token."""
    beat: int = 0
    """Refresh counter: every heartbeat changes the file, which is what a new run watches."""
    processes: tuple[LeaseProcess, ...] = ()
    """Every process of the run, the holder first (launcher and ranks, each with its own host)."""
    unchanged_s: float | None = dataclasses.field(default=None, compare=False)
    """Not stored: how long the lease file had not changed when it was read, by the clock of the file system (or of
    this host, for a reader that writes nothing); None when that cannot be told (its time is ahead of that clock)."""

    def describe(self) -> str:
        job = f", Slurm job {self.slurm_job_id}" if self.slurm_job_id else ""
        ranks = [f"{p.pid} on {p.host}" for p in self.processes if (p.host, p.pid) != (self.host, self.pid)]
        killed = [str(p.pid) for p in self._processes() if p.killed()]
        ahead = self.heartbeat > time.time() + _CLOCK_SLACK_S
        beat = ", heartbeat stamped ahead of this clock" if ahead else ""
        if self.unchanged_s is not None:
            beat += (
                f", unchanged for {self.unchanged_s:.0f} s" if ahead else f", heartbeat {self.unchanged_s:.0f} s ago"
            )
        dying = f", killed but not yet exited: {', '.join(killed)}" if killed else ""
        return (
            f"pid {self.pid} on {self.host}" + (f", ranks {', '.join(ranks)}" if ranks else "") + f"{job}{beat}{dying}"
        )

    def _processes(self) -> tuple[LeaseProcess, ...]:
        return self.processes or (LeaseProcess(self.host, self.pid, self.pid_start),)

    def dead_because(self, slurm_job_id: str | None = None, exit_wait_s: float = EXIT_WAIT_S) -> str | None:
        """Why the holder is provably gone (or is this Slurm job's earlier life), or None if it may be alive.

        A process of the run alive on this host keeps the lease whatever else is said. Otherwise the lease passes on
        when every process of the run is on this host and gone, when its Slurm job ended, or when the lease has not
        changed for ``timeout_s`` (:attr:`unchanged_s`, never the holder's clock against ours). When every process
        still alive was killed (``kill -9`` of the run, then the same command at once), it waits up to ``exit_wait_s``
        for them to exit: a process in uninterruptible sleep (``fsync`` of a checkpoint) dies only when that returns.
        """
        if slurm_job_id and self.slurm_job_id == slurm_job_id:
            return f"the same Slurm job {slurm_job_id} (requeued)"
        procs = self._processes()
        alive = [p.alive() for p in procs]
        deadline = time.monotonic() + exit_wait_s
        while _only_killed_alive(procs, alive) and time.monotonic() < deadline:
            time.sleep(0.05)
            alive = [p.alive() for p in procs]
        if any(a is True for a in alive):
            return None
        if all(a is False for a in alive):
            pids = ", ".join(str(p.pid) for p in procs)
            return (
                f"process {pids} on this host is gone" if len(procs) == 1 else f"processes {pids} on this host are gone"
            )
        if self.slurm_job_id and _slurm_job_ended(self.slurm_job_id):
            return f"Slurm job {self.slurm_job_id} is no longer running"
        if self.unchanged_s is not None and self.unchanged_s > self.timeout_s:
            return f"its heartbeat has not changed for {self.unchanged_s:.0f} s (timeout {self.timeout_s:.0f} s)"
        return None

    def held(self, run_dir: str | Path) -> LeaseHeld:
        """The refusal of a start on ``run_dir``, which this live holder owns: who holds it and what the user can do."""
        return LeaseHeld(
            f"run directory {run_dir} is in use by another run ({self.describe()}); wait for it to end, stop it "
            f"(pretrain cancel {run_dir}), or pick another run.name=..."
        )


def _only_killed_alive(procs: tuple[LeaseProcess, ...], alive: list[bool | None]) -> bool:
    """Whether some of ``procs`` are alive on this host (``alive``: theirs, in order) and every one of those was
    killed."""
    live = [p for p, a in zip(procs, alive) if a is True]
    return bool(live) and all(_proc_killed(p.pid) for p in live)


class LeaseHeld(RuntimeError):
    """The run directory is owned by a live run."""


def process_start_time(pid: int) -> float | None:
    """Unix time at which process ``pid`` of this host started; None when there is none (or only its zombie)."""
    ticks = _proc_start(pid)
    if ticks is None:
        return None
    try:
        boot = next(
            float(line.split()[1]) for line in Path("/proc/stat").read_text().splitlines() if line[:6] == "btime "
        )
    except (OSError, StopIteration, IndexError, ValueError):
        return None
    return boot + ticks / os.sysconf("SC_CLK_TCK")


def _slurm_job_ended(job_id: str) -> bool:
    """True only when Slurm says so; without Slurm (or on error) the job is not known to have ended."""
    if shutil.which("squeue") is None:
        return False
    try:
        out = subprocess.run(
            ["squeue", "-h", "-j", job_id, "-o", "%T"], capture_output=True, text=True, timeout=30, check=False
        )
    except (OSError, subprocess.TimeoutExpired):
        return False
    if out.returncode != 0:
        return "Invalid job id" in out.stderr  # purged from the queue long ago
    states = out.stdout.split()
    return not states or all(s in ("COMPLETED", "CANCELLED", "FAILED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY",
                                                "BOOT_FAIL", "DEADLINE", "PREEMPTED") for s in states)  # fmt: skip


_LEASE_TYPES = {"host": str, "pid": int, "slurm_job_id": (str, type(None)), "heartbeat": (int, float),
                "timeout_s": (int, float), "token": str, "beat": int, "processes": list}  # fmt: skip


def _load_lease(path: Path) -> LeaseInfo:
    """The lease stored in ``path``. Raises FileNotFoundError, or ValueError for a file that is not a lease."""
    try:
        data = json.loads(path.read_text())
    except UnicodeDecodeError as e:
        raise ValueError("not UTF-8") from e
    if not isinstance(data, dict) or any(not isinstance(data.get(k), t) for k, t in _LEASE_TYPES.items()):
        raise ValueError("not a lease")
    try:
        procs = tuple(LeaseProcess(p["host"], int(p["pid"]), p["start"], p.get("boot_id")) for p in data["processes"])
        stored = {f.name: data[f.name] for f in dataclasses.fields(LeaseInfo) if f.name != "unchanged_s"}
        return LeaseInfo(**{**stored, "processes": procs})
    except (KeyError, TypeError, ValueError) as e:
        raise ValueError("not a lease") from e


def _read_lease(path: Path) -> tuple[LeaseInfo | None, str]:
    try:
        return _load_lease(path), ""
    except (OSError, ValueError) as e:
        return None, f"{path} is unreadable ({type(e).__name__})"


def _lease_json(info: LeaseInfo) -> str:
    return json.dumps({k: v for k, v in dataclasses.asdict(info).items() if k != "unchanged_s"})


def lease_holder(run_dir: str | Path) -> tuple[LeaseInfo | None, str]:
    """``(info, problem)``: the lease of ``run_dir`` (None when there is none, or with why it is unreadable).

    Its :attr:`~LeaseInfo.unchanged_s` compares the file's time with this host's clock (a reader writes nothing);
    :func:`acquire_lease` judges by the file system's own clock instead.
    """
    path = Path(run_dir) / LEASE
    if not path.exists():
        return None, ""
    info, problem = _read_lease(path)
    if info is None:
        return None, problem
    try:
        age = time.time() - path.stat().st_mtime
    except OSError:
        return info, ""
    return dataclasses.replace(info, unchanged_s=max(0.0, age) if age > -_CLOCK_SLACK_S else None), ""


_CLOCK_SLACK_S = 2.0
"""A file time this far ahead of the clock it is compared with still counts as now (coarse file-system times)."""


def _judge(run_dir: Path, fs_now: float) -> tuple[LeaseInfo | None, str]:
    """The lease as a starting run judges it: :attr:`~LeaseInfo.unchanged_s` from the lease file's time against
    ``fs_now``, the time of a file this run has just written next to it (one clock: the file system's).

    A lease file dated ahead of that clock (its holder's clock is ahead, on a file system that keeps the writer's
    times) is timed by observation: the first run that sees it records its token and beat in ``.lease.json.seen``,
    and it has been unchanged for as long as that record is old.
    """
    path = run_dir / LEASE
    info, problem = _read_lease(path)
    if info is None:
        return None, problem
    try:
        mtime = path.stat().st_mtime
    except OSError:
        return info, ""
    if mtime <= fs_now + _CLOCK_SLACK_S:
        return dataclasses.replace(info, unchanged_s=max(0.0, fs_now - mtime)), ""
    seen, key = run_dir / f".{LEASE}.seen", f"{info.token} {info.beat}"
    try:
        if seen.exists() and seen.read_text() == key:
            return dataclasses.replace(info, unchanged_s=max(0.0, fs_now - seen.stat().st_mtime)), ""
        write_atomic(seen, key)
    except OSError:
        pass  # a read-only directory: the lease stays its holder's until it changes hands another way
    return dataclasses.replace(info, unchanged_s=0.0), ""


LEASE_WATCH_S = 1.0
"""Seconds between a run's looks at its own lease: a process whose lease is gone or taken stops within about this."""


def watch_lease(
    run_dir: str | Path, token: str, on_lost: Callable[[str], None], interval_s: float = LEASE_WATCH_S
) -> threading.Event:
    """Call ``on_lost(why)`` once, from a daemon thread, as soon as ``run_dir``'s lease is gone or names another
    holder than ``token``. Set the returned event to stop watching (before the holder releases the lease).

    A lease missing at one look is looked at again 0.2 s later (a starting run moves a lease aside for an instant
    while it checks it); an unreadable one counts as lost at the third look in a row.
    """
    path, stop = Path(run_dir) / LEASE, threading.Event()

    def watch() -> None:
        missing = unreadable = 0
        while not stop.wait(0.2 if missing else interval_s):
            try:
                info = _load_lease(path)
            except FileNotFoundError:
                missing, why = missing + 1, f"{path} was removed"
            except (OSError, ValueError) as e:
                missing, unreadable, why = 0, unreadable + 1, f"{path} is unreadable ({type(e).__name__})"
            else:
                missing = unreadable = 0
                why = "" if info.token == token else f"{path} now names another run ({info.describe()})"
            if (why and not missing and not unreadable) or missing >= 2 or unreadable >= 3:
                if not stop.is_set():
                    on_lost(why)
                return

    threading.Thread(target=watch, name="run-lease-watch", daemon=True).start()
    return stop


class Lease:
    """A held lease: refreshes its heartbeat in a daemon thread until :meth:`release`."""

    def __init__(self, run_dir: Path, info: LeaseInfo, took_over: str | None):
        self.run_dir, self.info, self.took_over = run_dir, info, took_over
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._beat, name="run-lease-heartbeat", daemon=True)
        self._thread.start()

    def _beat(self) -> None:
        while not self._stop.wait(min(HEARTBEAT_S, self.info.timeout_s / 4)):
            if not self._write():
                return  # taken over (our holder was judged dead) or removed: nothing of ours to refresh

    def _write(self, **changes: Any) -> bool:
        """Rewrite the lease with ``changes`` and a new beat, if it is still ours."""
        with self._lock:
            current, _ = _read_lease(self.run_dir / LEASE)
            if current is None or current.token != self.info.token:
                return False
            self.info = dataclasses.replace(self.info, **changes, beat=self.info.beat + 1, heartbeat=time.time())
            try:
                write_atomic(self.run_dir / LEASE, _lease_json(self.info))
            except OSError:
                pass  # a full or vanished disk: the run's own writes will report it
            return True

    def set_processes(self, processes: Iterable[LeaseProcess]) -> None:
        """Record every process of the run (the holder stays first): the lease passes on only when all are gone."""
        holder = self.info.processes[0]
        self._write(processes=(holder, *dict.fromkeys(p for p in processes if p != holder)))

    def release(self) -> None:
        """Stop the heartbeat and remove the lease if it is still ours."""
        self._stop.set()
        with self._lock:
            current, _ = lease_holder(self.run_dir)
            if current is not None and current.token == self.info.token:
                (self.run_dir / LEASE).unlink(missing_ok=True)
        (self.run_dir / f".{LEASE}.seen").unlink(missing_ok=True)

    def __enter__(self) -> Lease:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


def acquire_lease(
    run_dir: str | Path,
    slurm_job_id: str | None = None,
    timeout_s: float = LEASE_TIMEOUT_S,
    pid: int | None = None,
    exit_wait_s: float = EXIT_WAIT_S,
) -> Lease:
    """Take the lease of ``run_dir`` (creating the folder), or raise :class:`LeaseHeld` naming its live holder.

    Args:
        run_dir: The run directory.
        slurm_job_id: This run's Slurm job (a lease of the same job is its own earlier life, requeued).
        timeout_s: How long this lease may stay unchanged before others count it as stale.
        pid: The process the lease stands for (default: this one).
        exit_wait_s: How long to wait for a holder whose live processes were all killed to exit.
    """
    run_dir = Path(run_dir)
    holder_proc = LeaseProcess.of(pid)
    info = LeaseInfo(
        host=holder_proc.host,
        pid=holder_proc.pid,
        pid_start=holder_proc.start,
        slurm_job_id=slurm_job_id,
        heartbeat=time.time(),
        timeout_s=float(timeout_s),
        token=uuid.uuid4().hex,
        processes=(holder_proc,),
    )
    path = run_dir / LEASE
    took_over = None
    for _ in range(3):
        run_dir.mkdir(parents=True, exist_ok=True)
        tmp = run_dir / f".{LEASE}.{info.token}.tmp"
        tmp.write_text(_lease_json(info))
        try:
            os.link(tmp, path)  # atomic create-if-absent, also on NFS
            fsync_dir(run_dir)
            (run_dir / f".{LEASE}.seen").unlink(missing_ok=True)
            return Lease(run_dir, info, took_over)
        except FileExistsError:
            fs_now = tmp.stat().st_mtime  # the file system's clock, the one that dated the lease file
        finally:
            tmp.unlink(missing_ok=True)
        holder, problem = _judge(run_dir, fs_now)
        if holder is None and problem:
            # an unreadable lease (an edited or corrupt file; os.link never leaves a torn one) proves nothing about a
            # holder, so it is set aside like a dead one
            why = problem
        elif holder is None:
            continue  # released meanwhile: try again
        else:
            why = holder.dead_because(slurm_job_id, exit_wait_s)
            if why is None:
                raise holder.held(run_dir)
        # Break the dead lease by renaming it to a unique name: of two runs doing this at once, only one renames the
        # dead holder's file; the other would rename the winner's fresh lease, sees that, and puts it back.
        aside = run_dir / f".{LEASE}.{info.token}.broken"
        try:
            os.rename(path, aside)
        except FileNotFoundError:
            continue
        moved, _ = _read_lease(aside)
        if holder is not None and (moved is None or moved.token != holder.token):
            try:
                os.link(aside, path)
            except FileExistsError:
                pass
            aside.unlink(missing_ok=True)
            raise LeaseHeld(f"run directory {run_dir} was just taken by another run starting at the same time")
        aside.unlink(missing_ok=True)
        took_over = why
    raise LeaseHeld(f"could not take the lease of {run_dir}: it changed hands three times while trying")
