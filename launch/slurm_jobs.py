"""A run's jobs: Slurm's view of them (``scontrol``, ``sacct``, ``sinfo``), their event log and their task logs.

- ``RUN_DIR/slurm/jobs.jsonl`` (written by ``pretrain submit`` and by the job itself): the job id, each attempt,
  each requeue and why, and how the job ended;
- Slurm: ``scontrol show job`` knows pending, running and recently finished jobs; ``sacct`` only answers where a
  cluster has accounting (optional);
- submitit's task logs ``RUN_DIR/slurm/<job>_<task>_log.{out,err}``: what a job printed, and submitit's own line saying
  whether the job's function returned or raised.

Nothing here unpickles: submitit's result pickles (``<job>_<task>_result.pkl``) are never read, because loading a
pickle runs whatever code its author put in it; the same outcome is in the task logs as plain text.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pretrain.fsutil import read_jsonl

__all__ = [
    "JOBS_FILE",
    "QUEUED_SLURM_STATES",
    "SLURM_CMD_TIMEOUT_S",
    "SLURM_SUBDIR",
    "TERMINAL_SLURM_STATES",
    "SlurmJobInfo",
    "append_job_event",
    "job_error_log",
    "local_job_alive",
    "log_tail",
    "parse_slurm_duration",
    "read_job_events",
    "slurm_job_gone",
    "slurm_job_info",
    "slurm_partitions",
    "submitit_outcome",
]

logger = logging.getLogger(__name__)

SLURM_SUBDIR = "slurm"
"""submitit's folder inside the run directory: scripts, pickles, per-task logs, ``jobs.jsonl``."""
JOBS_FILE = "jobs.jsonl"
"""One JSON object per line: ``submit``, ``start``, ``requeue``, ``cancel`` and ``end`` events of the run's jobs."""
TERMINAL_SLURM_STATES = frozenset(
    {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "OUT_OF_MEMORY", "NODE_FAIL", "BOOT_FAIL", "DEADLINE"}
)
QUEUED_SLURM_STATES = frozenset({"PENDING", "REQUEUED", "REQUEUE_HOLD", "REQUEUE_FED", "SUSPENDED", "RESV_DEL_HOLD"})
SLURM_CMD_TIMEOUT_S = 30
"""Seconds one Slurm client command may take (a slurmctld under load answers slowly)."""

# submitit's log lines at the end of a job's function (submitit/core/submission.py: process_job): the first goes to
# the task's .out, the second to its .err, right after it wrote the result pickle.
_SUBMITIT_SUCCESS = "Exiting after successful completion"
_SUBMITIT_ERROR = "Submitted job triggered an exception"
_LOG_TAIL_BYTES = 256 * 1024


# -------------------------------------------------------------------------------------------------------- job events


def append_job_event(run_dir: str | Path, event: str, **fields: Any) -> None:
    """Append one event to ``RUN_DIR/slurm/jobs.jsonl`` (a single ``write`` on an O_APPEND file: lines never mix)."""
    path = Path(run_dir) / SLURM_SUBDIR / JOBS_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    record = {"event": event, "time": time.time(), **fields}
    line = json.dumps(record, default=str) + "\n"
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, line.encode())
    finally:
        os.close(fd)


def read_job_events(run_dir: str | Path) -> list[dict[str, Any]]:
    """All events of ``RUN_DIR/slurm/jobs.jsonl`` in order (a torn line, or one that is no object, is skipped)."""
    return [e for e in read_jsonl(Path(run_dir) / SLURM_SUBDIR / JOBS_FILE) if isinstance(e, dict)]


# ------------------------------------------------------------------------------------------------------ Slurm queries


@dataclass
class SlurmJobInfo:
    """What Slurm says about one job (from ``scontrol show job``, or ``sacct`` where accounting exists)."""

    job_id: str
    state: str
    """Slurm job state, e.g. PENDING, RUNNING, COMPLETED, FAILED, CANCELLED, TIMEOUT."""
    reason: str = ""
    """Why it is pending or why it ended (Slurm's Reason field)."""
    restarts: int = 0
    """How many times Slurm requeued it."""
    run_time_s: int | None = None
    """Run time of the current (or last) attempt."""
    time_limit_s: int | None = None
    """Time limit of an attempt; None when unlimited."""
    nodes: str = ""
    partition: str = ""
    exit_code: str = ""
    source: str = "scontrol"

    @property
    def time_left_s(self) -> int | None:
        if self.time_limit_s is None or self.run_time_s is None:
            return None
        return self.time_limit_s - self.run_time_s


def parse_slurm_duration(text: str) -> int | None:
    """Seconds in a Slurm duration (``MM:SS``, ``HH:MM:SS``, ``D-HH:MM:SS``, ``MM``); None for UNLIMITED/INVALID."""
    text = text.strip()
    m = re.fullmatch(r"(?:(\d+)-)?(\d+)(?::(\d+))?(?::(\d+))?", text)
    if not m:
        return None
    days, a, b, c = m.groups()
    parts = [int(x) for x in (a, b, c) if x is not None]
    if days is not None:  # D-HH[:MM[:SS]]
        parts += [0] * (3 - len(parts))
        h, mi, s = parts
        return int(days) * 86400 + h * 3600 + mi * 60 + s
    if len(parts) == 1:  # minutes
        return parts[0] * 60
    if len(parts) == 2:  # MM:SS
        return parts[0] * 60 + parts[1]
    return parts[0] * 3600 + parts[1] * 60 + parts[2]


def _run_quiet(argv: list[str]) -> str | None:
    if shutil.which(argv[0]) is None:
        return None
    try:
        out = subprocess.run(argv, capture_output=True, text=True, timeout=SLURM_CMD_TIMEOUT_S)
    except (OSError, subprocess.SubprocessError) as e:
        logger.debug("%s failed: %s", argv, e)
        return None
    return out.stdout if out.returncode == 0 else None


def slurm_job_info(job_id: str) -> SlurmJobInfo | None:
    """Slurm's view of ``job_id``: ``scontrol`` for live and recently ended jobs, then ``sacct`` if it works.

    Returns:
        None when neither knows the job (ended longer ago than MinJobAge on a cluster without accounting).
    """
    out = _run_quiet(["scontrol", "show", "job", "-o", str(job_id)])
    if out and out.strip():
        fields = dict(re.findall(r"(\w+)=(\S*)", out.splitlines()[0]))
        restarts = fields.get("Restarts", "0")
        return SlurmJobInfo(
            job_id=str(job_id),
            state=fields.get("JobState", "UNKNOWN"),
            reason=fields.get("Reason", "") if fields.get("Reason") != "None" else "",
            restarts=int(restarts) if restarts.isdigit() else 0,
            run_time_s=parse_slurm_duration(fields.get("RunTime", "")),
            time_limit_s=parse_slurm_duration(fields.get("TimeLimit", "")),
            nodes=fields.get("NodeList", "") if fields.get("NodeList") != "(null)" else "",
            partition=fields.get("Partition", ""),
            exit_code=fields.get("ExitCode", ""),
        )
    # ended longer than MinJobAge ago: only accounting remembers it (absent on the local cluster; that is fine)
    out = _run_quiet(["sacct", "-n", "-X", "-P", "-j", str(job_id), "-o", "State,ElapsedRaw,Timelimit,NodeList"])
    if out and out.strip():
        state, elapsed, limit, nodes = (out.strip().splitlines()[-1].split("|") + ["", "", "", ""])[:4]
        return SlurmJobInfo(
            job_id=str(job_id),
            state=state.split()[0] if state else "UNKNOWN",
            run_time_s=int(elapsed) if elapsed.isdigit() else None,
            time_limit_s=parse_slurm_duration(limit),
            nodes=nodes,
            source="sacct",
        )
    return None


def slurm_job_gone(job_id: str) -> bool:
    """True only when Slurm answers that it does not know ``job_id`` (it ended longer ago than MinJobAge, or never
    was); False when it knows it or cannot be asked (no client, no controller), where the job may still run."""
    if shutil.which("scontrol") is None:
        return False
    try:
        out = subprocess.run(
            ["scontrol", "show", "job", "-o", str(job_id)], capture_output=True, text=True, timeout=SLURM_CMD_TIMEOUT_S
        )
    except (OSError, subprocess.SubprocessError):
        return False
    return out.returncode != 0 and "invalid job id" in out.stderr.lower()


def slurm_partitions() -> dict[str, int] | None:
    """``{partition: node count}`` from ``sinfo``; None when Slurm cannot be asked."""
    out = _run_quiet(["sinfo", "-h", "-o", "%R|%D"])
    if out is None:
        return None
    parts: dict[str, int] = {}
    for line in out.splitlines():
        name, _, count = line.strip().partition("|")
        if name:
            parts[name] = parts.get(name, 0) + (int(count) if count.isdigit() else 0)
    return parts


def local_job_alive(job_id: str) -> bool | None:
    """Whether the controller of a submitit LocalExecutor job (its id is the controller's pid) still runs here.

    Returns:
        None when ``job_id`` is no pid (not a local job).
    """
    if not job_id.isdigit():
        return None
    try:
        cmdline = Path(f"/proc/{job_id}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        parent = int(Path(f"/proc/{job_id}/stat").read_text().rsplit(")", 1)[1].split()[1])
    except (OSError, ValueError, IndexError):
        return False
    # a controller we just forked may not have exec'd yet (it still shows our own command line)
    return "submitit" in cmdline or parent == os.getpid()


# --------------------------------------------------------------------------------------------------------- task logs


def _read_tail(path: Path, max_bytes: int = _LOG_TAIL_BYTES) -> str | None:
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - max_bytes))
            return f.read().decode(errors="replace")
    except OSError:
        return None


def log_tail(path: str | Path, lines: int = 20) -> list[str]:
    """Last ``lines`` lines of a log; carriage-return progress bars collapse to their last frame."""
    text = _read_tail(Path(path))
    if text is None:
        return []
    out = [line.rsplit("\r", 1)[-1] for line in text.splitlines()]
    return [line for line in out if line.strip()][-lines:]


def submitit_outcome(run_dir: str | Path, job_id: str) -> str | None:
    """``"error"`` or ``"success"`` as submitit logged it for task 0 of ``job_id``; None if it logged neither (yet).

    This is what submitit's result pickle says, read from the plain-text lines it logs next to writing the pickle.
    """
    folder = Path(run_dir) / SLURM_SUBDIR
    err = _read_tail(folder / f"{job_id}_0_log.err") or ""
    if _SUBMITIT_ERROR in err:
        return "error"
    out = _read_tail(folder / f"{job_id}_0_log.out") or ""
    return "success" if _SUBMITIT_SUCCESS in out else None


def job_error_log(run_dir: str | Path, job_id: str) -> Path | None:
    """The error log to show for a failed job: the first task's log with a traceback, else task 0's."""
    folder = Path(run_dir) / SLURM_SUBDIR
    logs = sorted(folder.glob(f"{job_id}_*_log.err"), key=lambda p: _task_number(p, job_id))
    for p in logs:
        if "Traceback" in (_read_tail(p) or ""):
            return p
    return logs[0] if logs else None


def _task_number(path: Path, job_id: str) -> int:
    m = re.match(rf"{re.escape(job_id)}_(\d+)_log\.err$", path.name)
    return int(m.group(1)) if m else 1 << 30
