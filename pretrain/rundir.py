"""The run directory: its layout, exit codes, atomic writes, status reading and the run's lease. Torch-free.

Layout of ``<run.output_dir>/<run.name>/``::

    config.yaml        the resolved config
    metrics.jsonl      one JSON object per event
    tb/                TensorBoard event files
    checkpoints/<tag>/ checkpoints; checkpoints/latest names the newest complete one
    status.json        state, step, last checkpoint, host, Slurm job id
    lease.json         the lease of the run that owns the directory now (see below)
    previous/<stamp>/  history a ``--restart`` or a PBT exploit set aside (never deleted)
    sweep/             a sweep trial's files (hook: :mod:`pretrain.sweep_hook`; the run's pid, its log, the trial's log)

The lease. One run owns a run directory at a time: rank 0 (or the ``--nproc`` launcher) takes ``lease.json`` before it
writes anything and holds it for the run's whole life, refreshing its heartbeat. The file is created with
``os.link`` of a private temporary file, which is atomic also on NFS, so two starts on one directory (a requeued job
and a manual resubmission, a job array with one name) cannot both win. A lease passes to a new run only when its
holder is provably dead: the same host and its process gone (pid and start time, so a reused pid is not mistaken for
it), its heartbeat older than the timeout the lease states, its Slurm job no longer running, or the new run is the same
Slurm job after a requeue. A run that cannot take the lease exits with :data:`EXIT_USAGE`, naming the holder.

No library does this: ``filelock``/``fcntl`` locks are not reliable on the network file systems clusters share across
nodes, and a lock held by a dead node must be broken by a rule (heartbeat, Slurm job state) a plain lock lacks.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import socket
import subprocess
import threading
import time
import uuid
from pathlib import Path
from typing import Any

from pretrain.fsutil import fsync_dir, read_jsonl

__all__ = [
    "CHECKPOINTS",
    "COMPLETE_MARKER",
    "CONFIG_YAML",
    "EXIT_FAILED",
    "EXIT_OK",
    "EXIT_PREEMPTED",
    "EXIT_USAGE",
    "LEASE",
    "LATEST",
    "METRICS",
    "PREVIOUS",
    "STATUS",
    "SWEEP",
    "TB",
    "Lease",
    "LeaseHeld",
    "LeaseInfo",
    "acquire_lease",
    "lease_holder",
    "process_start_time",
    "read_latest",
    "read_status",
    "run_history",
    "set_aside_history",
    "write_atomic",
    "write_latest",
]

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_PREEMPTED = 0, 1, 2, 3
"""Exit codes of ``pretrain train``: finished; failed; bad config, usage or a held run dir (nothing written);
preempted (a checkpoint was saved: run the same command to continue)."""

CONFIG_YAML, METRICS, STATUS, TB, CHECKPOINTS, LATEST, LEASE, PREVIOUS, SWEEP = (
    "config.yaml", "metrics.jsonl", "status.json", "tb", "checkpoints", "latest", "lease.json", "previous", "sweep",
)  # fmt: skip
COMPLETE_MARKER = "COMPLETE"
"""The file a checkpoint's tag directory holds once every rank's files are written (with their sha256)."""

HEARTBEAT_S = 30.0
"""Seconds between refreshes of a held lease."""
LEASE_TIMEOUT_S = 600.0
"""A lease whose heartbeat is older than this is stale (its holder's node died or froze); stated in every lease."""


def write_atomic(path: str | Path, text: str) -> None:
    """Replace ``path`` by ``text`` at once (temporary file, fsync, rename): a reader sees the old or the new file."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        with open(tmp, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    fsync_dir(path.parent)


def write_latest(ckpt_root: str | Path, tag: str) -> None:
    """Atomically point ``checkpoints/latest`` at ``tag``."""
    write_atomic(Path(ckpt_root) / LATEST, tag + "\n")


def read_latest(ckpt_root: str | Path) -> str | None:
    """The tag named by ``checkpoints/latest``, or None."""
    try:
        return (Path(ckpt_root) / LATEST).read_text().strip() or None
    except OSError:
        return None


def read_status(run_dir: str | Path) -> tuple[dict[str, Any] | None, str]:
    """``(status, problem)``: the run's ``status.json`` as a dict, or None with why it could not be used."""
    path = Path(run_dir) / STATUS
    try:
        text = path.read_text()
    except FileNotFoundError:
        return None, f"{path} does not exist"
    except OSError as e:
        return None, f"{path} is unreadable ({e.strerror or e})"
    try:
        data = json.loads(text)
    except ValueError:
        return None, f"{path} is not valid JSON (truncated or overwritten?)"
    if not isinstance(data, dict):
        return None, f"{path} does not hold a JSON object"
    return data, ""


def run_history(run_dir: str | Path) -> list[str]:
    """What a run directory holds of earlier lives (metrics events, TensorBoard logs, checkpoints), as phrases; []
    for a new or empty one."""
    run_dir = Path(run_dir)
    found = []
    events = read_jsonl(run_dir / METRICS)
    if events:
        steps = [e.get("step") for e in events if isinstance(e.get("step"), int)]
        found.append(f"{METRICS} with {len(events)} events" + (f" up to step {max(steps)}" if steps else ""))
    if (run_dir / TB).is_dir() and any((run_dir / TB).iterdir()):
        found.append(f"{TB}/ (TensorBoard logs)")
    ckpts = (
        sorted(p.name for p in (run_dir / CHECKPOINTS).glob("*") if p.is_dir())
        if (run_dir / CHECKPOINTS).is_dir()
        else []
    )
    if ckpts:
        found.append(f"{CHECKPOINTS}/: {', '.join(ckpts)}")
    return found


def set_aside_history(run_dir: str | Path) -> Path | None:
    """Move a run directory's history (metrics, TensorBoard logs, checkpoints, status, config) into
    ``previous/<time>/`` for a ``--restart``; nothing is deleted. Returns the folder (None if there was nothing)."""
    run_dir = Path(run_dir)
    names = [n for n in (METRICS, TB, CHECKPOINTS, STATUS, CONFIG_YAML) if (run_dir / n).exists()]
    if not names:
        return None
    dest = run_dir / PREVIOUS / time.strftime("%Y%m%d-%H%M%S")
    n = 1
    while dest.exists():
        n += 1
        dest = dest.with_name(f"{dest.name.split('.')[0]}.{n}")
    dest.mkdir(parents=True)
    for name in names:
        os.rename(run_dir / name, dest / name)
    fsync_dir(run_dir)
    return dest


# ---------------------------------------------------------------------------------------------------------- lease


@dataclasses.dataclass(frozen=True)
class LeaseInfo:
    """What a lease file says about its holder."""

    host: str
    pid: int
    pid_start: int | None
    """The holder's start time in clock ticks since boot (``/proc/PID/stat``), so a reused pid is told apart."""
    slurm_job_id: str | None
    heartbeat: float
    """Unix time of the holder's last refresh."""
    timeout_s: float
    token: str
    """Unique per holder; a refresh or release touches only a lease with its own token."""

    def describe(self) -> str:
        job = f", Slurm job {self.slurm_job_id}" if self.slurm_job_id else ""
        age = max(0.0, time.time() - self.heartbeat)
        return f"pid {self.pid} on {self.host}{job}, heartbeat {age:.0f} s ago"

    def dead_because(self, slurm_job_id: str | None = None) -> str | None:
        """Why the holder is provably dead (or is this Slurm job's earlier life), or None if it may be alive."""
        if slurm_job_id and self.slurm_job_id == slurm_job_id:
            return f"the same Slurm job {slurm_job_id} (requeued)"
        if self.host == socket.gethostname():
            if _proc_start(self.pid) is None or (
                self.pid_start is not None and _proc_start(self.pid) != self.pid_start
            ):
                return f"process {self.pid} on this host is gone"
        if time.time() - self.heartbeat > self.timeout_s:
            return f"its heartbeat is {time.time() - self.heartbeat:.0f} s old (timeout {self.timeout_s:.0f} s)"
        if self.slurm_job_id and _slurm_job_ended(self.slurm_job_id):
            return f"Slurm job {self.slurm_job_id} is no longer running"
        return None


class LeaseHeld(RuntimeError):
    """The run directory is owned by a live run."""


def _proc_start(pid: int) -> int | None:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat.rsplit(")", 1)[1].split()
    return None if fields[0] == "Z" else int(fields[19])  # field 22 of proc(5): starttime; a zombie is gone


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


def lease_holder(run_dir: str | Path) -> tuple[LeaseInfo | None, str]:
    """``(info, problem)``: the lease of ``run_dir`` (None when there is none, or with why it is unreadable)."""
    path = Path(run_dir) / LEASE
    return _read_lease(path) if path.exists() else (None, "")


def _read_lease(path: Path) -> tuple[LeaseInfo | None, str]:
    try:
        data = json.loads(path.read_text())
        return LeaseInfo(**{f.name: data[f.name] for f in dataclasses.fields(LeaseInfo)}), ""
    except (OSError, ValueError, KeyError, TypeError) as e:
        return None, f"{path} is unreadable ({type(e).__name__})"


class Lease:
    """A held lease: refreshes its heartbeat in a daemon thread until :meth:`release`."""

    def __init__(self, run_dir: Path, info: LeaseInfo, took_over: str | None):
        self.run_dir, self.info, self.took_over = run_dir, info, took_over
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._beat, name="run-lease-heartbeat", daemon=True)
        self._thread.start()

    def _beat(self) -> None:
        while not self._stop.wait(min(HEARTBEAT_S, self.info.timeout_s / 4)):
            current, _ = lease_holder(self.run_dir)
            if current is None or current.token != self.info.token:
                return  # taken over (our holder was judged dead) or removed: nothing of ours to refresh
            self.info = dataclasses.replace(self.info, heartbeat=time.time())
            try:
                write_atomic(self.run_dir / LEASE, json.dumps(dataclasses.asdict(self.info)))
            except OSError:
                pass  # a full or vanished disk: the run's own writes will report it

    def release(self) -> None:
        """Stop the heartbeat and remove the lease if it is still ours."""
        self._stop.set()
        current, _ = lease_holder(self.run_dir)
        if current is not None and current.token == self.info.token:
            (self.run_dir / LEASE).unlink(missing_ok=True)

    def __enter__(self) -> Lease:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


def acquire_lease(
    run_dir: str | Path, slurm_job_id: str | None = None, timeout_s: float = LEASE_TIMEOUT_S, pid: int | None = None
) -> Lease:
    """Take the lease of ``run_dir`` (creating the folder), or raise :class:`LeaseHeld` naming its live holder.

    Args:
        run_dir: The run directory.
        slurm_job_id: This run's Slurm job (a lease of the same job is its own earlier life, requeued).
        timeout_s: Heartbeat age after which this lease counts as stale for others.
        pid: The process the lease stands for (default: this one).
    """
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    pid = os.getpid() if pid is None else pid
    info = LeaseInfo(
        host=socket.gethostname(),
        pid=pid,
        pid_start=_proc_start(pid),
        slurm_job_id=slurm_job_id,
        heartbeat=time.time(),
        timeout_s=float(timeout_s),
        token=uuid.uuid4().hex,
    )
    path = run_dir / LEASE
    took_over = None
    for _ in range(3):
        tmp = run_dir / f".{LEASE}.{info.token}.tmp"
        tmp.write_text(json.dumps(dataclasses.asdict(info)))
        try:
            os.link(tmp, path)  # atomic create-if-absent, also on NFS
            fsync_dir(run_dir)
            return Lease(run_dir, info, took_over)
        except FileExistsError:
            pass
        finally:
            tmp.unlink(missing_ok=True)
        holder, problem = lease_holder(run_dir)
        if holder is None and problem:
            # a torn lease (its writer died while creating it is impossible with link; an edited or corrupt file):
            # it proves nothing about a holder, so it is set aside like a dead one
            why = problem
        elif holder is None:
            continue  # released meanwhile: try again
        else:
            why = holder.dead_because(slurm_job_id)
            if why is None:
                raise LeaseHeld(
                    f"run directory {run_dir} is in use by another run ({holder.describe()}); wait for it to end, "
                    f"stop it (pretrain cancel {run_dir}), or pick another run.name=..."
                )
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
