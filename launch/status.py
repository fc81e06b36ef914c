"""``pretrain status RUN_DIR [--watch] [--json]`` and ``pretrain cancel RUN_DIR``: a run as the user sees it.

A run's state comes from three places, each trusted for what it knows:

- ``RUN_DIR/status.json`` (written by the trainer's rank 0): state, step, images/s, last checkpoint, last eval;
- ``RUN_DIR/slurm/jobs.jsonl`` (written by ``pretrain submit`` and by the job itself): the job id, each attempt,
  each requeue and why (time limit or preemption);
- Slurm (``scontrol show job``: pending, running and recently finished jobs; ``sacct`` only where a cluster has
  accounting, it is optional): the job's state, reason, run time and restarts. submitit's result pickle of rank 0
  settles jobs Slurm no longer remembers.

For a failed job the tail of its error log (submitit's ``RUN_DIR/slurm/<job>_<task>_log.err``) is shown.
Exit codes: 0 shown/cancelled, 1 cancel failed, 2 no such run directory or nothing to cancel.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from pretrain.fsutil import read_jsonl

__all__ = [
    "JOBS_FILE",
    "SLURM_SUBDIR",
    "TERMINAL_SLURM_STATES",
    "RunStatus",
    "SlurmJobInfo",
    "append_job_event",
    "cancel_main",
    "format_status",
    "log_tail",
    "main",
    "parse_slurm_duration",
    "read_job_events",
    "read_run_status",
    "register",
    "slurm_job_info",
    "slurm_partitions",
]

logger = logging.getLogger(__name__)

SLURM_SUBDIR = "slurm"
"""submitit's folder inside the run directory: scripts, pickles, per-task logs, ``jobs.jsonl``."""
JOBS_FILE = "jobs.jsonl"
"""One JSON object per line: ``submit``, ``start``, ``requeue`` and ``end`` events of the run's jobs."""
TERMINAL_SLURM_STATES = frozenset(
    {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "OUT_OF_MEMORY", "NODE_FAIL", "BOOT_FAIL", "DEADLINE"}
)
_QUEUED_SLURM_STATES = frozenset({"PENDING", "REQUEUED", "REQUEUE_HOLD", "REQUEUE_FED", "SUSPENDED", "RESV_DEL_HOLD"})
_TERMINAL_RUN_STATES = frozenset({"finished", "failed", "cancelled"})
_SLURM_CMD_TIMEOUT_S = 30
_EXIT_USAGE = 2


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
    """All events of ``RUN_DIR/slurm/jobs.jsonl`` in order (a torn last line is ignored)."""
    return read_jsonl(Path(run_dir) / SLURM_SUBDIR / JOBS_FILE)


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
        out = subprocess.run(argv, capture_output=True, text=True, timeout=_SLURM_CMD_TIMEOUT_S)
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


def _local_job_alive(job_id: str) -> bool | None:
    """A LocalExecutor job id is the pid of submitit's controller process on this machine."""
    if not job_id.isdigit():
        return None
    try:
        cmdline = Path(f"/proc/{job_id}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        parent = int(Path(f"/proc/{job_id}/stat").read_text().rsplit(")", 1)[1].split()[1])
    except (OSError, ValueError, IndexError):
        return False
    # a controller we just forked may not have exec'd yet (it still shows our own command line)
    return "submitit" in cmdline or parent == os.getpid()


# -------------------------------------------------------------------------------------------------------- the status


@dataclass
class RunStatus:
    """Everything ``pretrain status`` shows (``--json`` prints it as is)."""

    run_dir: str
    state: str
    """queued, starting, running, preempted, finished, failed, cancelled or unknown."""
    step: int | None = None
    max_steps: int | None = None
    epoch: int | None = None
    img_per_s: float | None = None
    eta_s: float | None = None
    last_checkpoint: str | None = None
    last_eval: dict[str, Any] = field(default_factory=dict)
    trainer_state: str | None = None
    """``state`` in status.json."""
    message: str = ""
    host: str | None = None
    cluster: str | None = None
    job_id: str | None = None
    slurm_state: str | None = None
    slurm_reason: str = ""
    slurm_run_time_s: int | None = None
    slurm_time_limit_s: int | None = None
    slurm_nodes: str = ""
    restarts: int = 0
    """Requeues of the current job (Slurm's count, or the requeues recorded in jobs.jsonl)."""
    requeues: list[dict[str, Any]] = field(default_factory=list)
    """``{reason, step, time}`` of each requeue recorded by the job."""
    resumes: int | None = None
    """How often the trainer resumed from a checkpoint (status.json ``restarts``)."""
    error_log: str | None = None
    error_tail: list[str] = field(default_factory=list)
    updated: str | None = None


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _last_train_event(metrics: Path, max_bytes: int = 65536) -> dict[str, Any]:
    """The newest ``event: train`` line of metrics.jsonl, reading only the file's tail."""
    try:
        with open(metrics, "rb") as f:
            f.seek(0, os.SEEK_END)
            size = f.tell()
            f.seek(max(0, size - max_bytes))
            lines = f.read().decode(errors="replace").splitlines()
    except OSError:
        return {}
    for line in reversed(lines):
        try:
            event = json.loads(line)
        except ValueError:
            continue
        if isinstance(event, dict) and event.get("event") == "train":
            return event
    return {}


def log_tail(path: str | Path, lines: int = 20) -> list[str]:
    """Last ``lines`` lines of a log; carriage-return progress bars collapse to their last frame."""
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - 256 * 1024))
            text = f.read().decode(errors="replace")
    except OSError:
        return []
    out = [line.rsplit("\r", 1)[-1] for line in text.splitlines()]
    return [line for line in out if line.strip()][-lines:]


def _error_log(run_dir: Path, job_id: str) -> Path | None:
    """The error log to show for a failed job: the first task's log with a traceback, else task 0's."""
    folder = run_dir / SLURM_SUBDIR
    logs = sorted(folder.glob(f"{job_id}_*_log.err"), key=lambda p: _task_number(p, job_id))
    for p in logs:
        try:
            if "Traceback" in p.read_text(errors="replace"):
                return p
        except OSError:
            continue
    return logs[0] if logs else None


def _task_number(path: Path, job_id: str) -> int:
    m = re.match(rf"{re.escape(job_id)}_(\d+)_log\.err$", path.name)
    return int(m.group(1)) if m else 1 << 30


def _result_of_rank0(run_dir: Path, job_id: str) -> str | None:
    """``success`` or ``error`` from submitit's result pickle of task 0; None if the job wrote none."""
    path = run_dir / SLURM_SUBDIR / f"{job_id}_0_result.pkl"
    if not path.is_file():
        return None
    try:
        import pickle

        with open(path, "rb") as f:
            outcome = pickle.load(f)[0]
    except Exception:  # a pickle from another Python or submitit version: not worth failing `status` over
        return None
    return str(outcome)


def read_run_status(run_dir: str | Path, query_slurm: bool = True) -> RunStatus:
    """Combine status.json, metrics.jsonl, jobs.jsonl and Slurm into one :class:`RunStatus`.

    Raises:
        FileNotFoundError: ``run_dir`` is not a directory.
    """
    run_dir = Path(run_dir).resolve()
    if not run_dir.is_dir():
        raise FileNotFoundError(f"no run directory {run_dir}")
    status = _read_json(run_dir / "status.json")
    events = read_job_events(run_dir)
    submits = [e for e in events if e.get("event") == "submit"]
    job = submits[-1] if submits else {}
    job_id = str(job["job_id"]) if job.get("job_id") is not None else status.get("slurm_job_id")
    cluster = job.get("cluster") or ("slurm" if status.get("slurm_job_id") else None)
    this_job = [e for e in events if str(e.get("job_id")) == str(job_id)] if job_id else []
    requeues = [
        {k: e.get(k) for k in ("reason", "step", "time", "checkpoint")} for e in this_job if e.get("event") == "requeue"
    ]
    ends = [e for e in this_job if e.get("event") == "end"]
    if ends and ends[-1].get("requeue_refused") and requeues:
        requeues.pop()  # submitit called checkpoint() but then refused to requeue (timeout budget spent)

    rs = RunStatus(
        run_dir=str(run_dir),
        state="unknown",
        step=status.get("step"),
        max_steps=status.get("max_steps"),
        epoch=status.get("epoch"),
        img_per_s=status.get("img_per_s"),
        last_checkpoint=status.get("last_checkpoint"),
        last_eval=status.get("last_eval") or {},
        trainer_state=status.get("state"),
        message=status.get("message") or "",
        host=status.get("host"),
        cluster=cluster,
        job_id=job_id,
        requeues=requeues,
        restarts=len(requeues),
        resumes=status.get("restarts"),
        updated=status.get("updated"),
    )
    last = _last_train_event(run_dir / "metrics.jsonl")
    if rs.step is not None and rs.max_steps and last.get("step_time_s"):
        rs.eta_s = max(0, rs.max_steps - rs.step) * float(last["step_time_s"])

    info = slurm_job_info(job_id) if (query_slurm and job_id and cluster == "slurm") else None
    if info is not None:
        rs.slurm_state, rs.slurm_reason = info.state, info.reason
        rs.slurm_run_time_s, rs.slurm_time_limit_s, rs.slurm_nodes = info.run_time_s, info.time_limit_s, info.nodes
        rs.restarts = max(rs.restarts, info.restarts)
    cancelled = any(e.get("event") == "cancel" for e in this_job)
    rs.state = _merge_state(rs, run_dir, info, ends, query_slurm, cancelled)
    if rs.state == "failed" and job_id:
        if ends and ends[-1].get("message") and rs.trainer_state != "failed":
            rs.message = str(ends[-1]["message"])  # why the job ended (the trainer's own message is older)
        err = _error_log(run_dir, job_id)
        if err is not None:
            rs.error_log, rs.error_tail = str(err), log_tail(err)
    return rs


def _merge_state(
    rs: RunStatus,
    run_dir: Path,
    info: SlurmJobInfo | None,
    ends: list[dict[str, Any]],
    query_slurm: bool,
    cancelled: bool,
) -> str:
    """One state for the user, from the trainer's state, Slurm's view, the job's own records and `pretrain cancel`."""
    trainer = rs.trainer_state
    if trainer == "finished":
        return "finished"
    if cancelled and (info is None or info.state.split()[0] in ("COMPLETING", "CANCELLED")):
        return "cancelled"
    if info is not None:
        st = info.state.split()[0].rstrip("+")
        if st in _QUEUED_SLURM_STATES:
            return "queued"
        if st == "RUNNING" or st in ("CONFIGURING", "COMPLETING", "STAGE_OUT", "RESIZING", "SIGNALING"):
            if st == "COMPLETING" and trainer == "failed":
                return "failed"
            return trainer if trainer in ("running", "preempted", "failed") else "starting"
        if st == "CANCELLED":
            return "cancelled"
        if st in TERMINAL_SLURM_STATES and st != "COMPLETED":
            return "failed"
        if st == "COMPLETED":
            return trainer or ("failed" if ends and ends[-1].get("state") == "failed" else "unknown")
        if st == "PREEMPTED":
            return "preempted"
    if ends:
        return str(ends[-1].get("state", "unknown"))
    if rs.job_id:
        outcome = _result_of_rank0(run_dir, rs.job_id)
        if outcome == "error":
            return "failed"
        if rs.cluster == "local" and query_slurm:
            alive = _local_job_alive(rs.job_id)
            if alive:
                return trainer if trainer in ("running", "preempted") else "starting"
            if alive is False and trainer in (None, "running"):
                return "failed" if outcome != "success" else (trainer or "unknown")
    if trainer == "running" and rs.cluster == "slurm" and query_slurm and info is None:
        return "unknown"  # Slurm forgot the job (no accounting) and the trainer never wrote an end state
    return trainer or ("queued" if rs.job_id else "unknown")


# ------------------------------------------------------------------------------------------------------- formatting


def _fmt_duration(seconds: float | None) -> str:
    if seconds is None:
        return "?"
    seconds = int(round(seconds))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}h{m:02d}m{s:02d}s" if h else (f"{m}m{s:02d}s" if m else f"{s}s")


def format_status(rs: RunStatus) -> str:
    """The human-readable status block."""
    lines = [f"run:        {rs.run_dir}", f"state:      {rs.state}"]
    if rs.step is not None:
        pct = f" ({100.0 * rs.step / rs.max_steps:.1f}%)" if rs.max_steps else ""
        epoch = f", epoch {rs.epoch}" if rs.epoch is not None else ""
        lines.append(f"step:       {rs.step}/{rs.max_steps if rs.max_steps else '?'}{pct}{epoch}")
    if rs.img_per_s:
        eta = f", ETA {_fmt_duration(rs.eta_s)}" if rs.eta_s is not None and rs.state == "running" else ""
        lines.append(f"throughput: {rs.img_per_s:.1f} img/s{eta}")
    if rs.last_checkpoint:
        lines.append(f"checkpoint: {rs.last_checkpoint}")
    ev = rs.last_eval
    if ev:
        shown = ", ".join(f"{k} {v:.4f}" for k, v in ev.items() if k.startswith("val_") and isinstance(v, float))
        lines.append(f"last eval:  {shown} (step {ev.get('step')})")
    if rs.job_id:
        where = f"{rs.cluster} job {rs.job_id}" if rs.cluster else f"job {rs.job_id}"
        if rs.slurm_state:
            detail = rs.slurm_state
            if rs.slurm_reason:
                detail += f" ({rs.slurm_reason})"
            if rs.slurm_run_time_s is not None:
                limit = _fmt_duration(rs.slurm_time_limit_s) if rs.slurm_time_limit_s is not None else "unlimited"
                detail += f", ran {_fmt_duration(rs.slurm_run_time_s)} of {limit}"
            if rs.slurm_nodes:
                detail += f", on {rs.slurm_nodes}"
            where += f": {detail}"
        elif rs.cluster == "slurm":
            where += ": not known to Slurm any more (no accounting to ask)"
        lines.append(f"job:        {where}")
    if rs.restarts or rs.requeues:
        why = ", ".join(f"{r.get('reason')} at step {r.get('step')}" for r in rs.requeues)
        lines.append(f"restarts:   {rs.restarts}" + (f" ({why})" if why else ""))
    if rs.message and rs.state != "finished":
        lines.append(f"message:    {rs.message}")
    if rs.error_log:
        lines.append(f"error log:  {rs.error_log} (last {len(rs.error_tail)} lines)")
        lines.extend(f"  | {line}" for line in rs.error_tail)
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------------------- commands


def register(subparsers: Any) -> None:
    """Add the ``status`` and ``cancel`` subcommands."""
    p = subparsers.add_parser("status", help="show a run: state, step, img/s, ETA, checkpoint, Slurm job")
    p.add_argument("run_dir", help="run directory, e.g. runs/digits_sepvit_lite")
    p.add_argument("--watch", action="store_true", help="refresh until the run finishes, fails or is cancelled")
    p.add_argument("--interval-s", type=float, default=10.0, help="seconds between refreshes with --watch")
    p.add_argument("--json", action="store_true", help="print one JSON object (one per refresh with --watch)")
    p.set_defaults(func=_status)
    c = subparsers.add_parser("cancel", help="cancel the Slurm (or local) job of a run")
    c.add_argument("run_dir", help="run directory, e.g. runs/digits_sepvit_lite")
    c.set_defaults(func=_cancel)


def _status(args: argparse.Namespace) -> int:
    while True:
        try:
            rs = read_run_status(args.run_dir)
        except FileNotFoundError as e:
            print(f"pretrain status: {e}", file=sys.stderr)
            return _EXIT_USAGE
        if args.json:
            print(json.dumps(asdict(rs), default=str))
        else:
            print(format_status(rs))
        sys.stdout.flush()
        if not args.watch or rs.state in _TERMINAL_RUN_STATES:
            return 0
        time.sleep(max(0.5, args.interval_s))
        if not args.json:
            print("-" * 60)


def _cancel(args: argparse.Namespace) -> int:
    run_dir = Path(args.run_dir).resolve()
    if not run_dir.is_dir():
        print(f"pretrain cancel: no run directory {run_dir}", file=sys.stderr)
        return _EXIT_USAGE
    rs = read_run_status(run_dir)
    if not rs.job_id:
        print(f"pretrain cancel: {run_dir} has no recorded job (not started by `pretrain submit`?)", file=sys.stderr)
        return _EXIT_USAGE
    if rs.state in _TERMINAL_RUN_STATES:
        print(f"pretrain cancel: {rs.cluster or ''} job {rs.job_id} already ended ({rs.state}); nothing to cancel")
        return 0
    if rs.cluster == "local":
        if not _local_job_alive(rs.job_id):
            print(f"pretrain cancel: local job {rs.job_id} is not running")
            return 0
        os.kill(int(rs.job_id), signal.SIGTERM)  # submitit's local controller forwards it to the tasks
    else:
        if shutil.which("scancel") is None:
            print("pretrain cancel: scancel not found (is the Slurm client installed?)", file=sys.stderr)
            return 1
        out = subprocess.run(["scancel", rs.job_id], capture_output=True, text=True, timeout=_SLURM_CMD_TIMEOUT_S)
        if out.returncode != 0:
            print(f"pretrain cancel: scancel {rs.job_id} failed: {out.stderr.strip()}", file=sys.stderr)
            return 1
    append_job_event(run_dir, "cancel", job_id=rs.job_id, cluster=rs.cluster)
    print(f"pretrain cancel: cancelled {rs.cluster or ''} job {rs.job_id} of {run_dir}")
    return 0


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``python -m launch.status RUN_DIR`` (same as ``pretrain status``)."""
    from launch.cli import main as cli_main

    return cli_main(["status", *(sys.argv[1:] if argv is None else argv)])


def cancel_main(argv: list[str] | None = None) -> int:
    """Same as ``pretrain cancel RUN_DIR``."""
    from launch.cli import main as cli_main

    return cli_main(["cancel", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    sys.exit(main())
