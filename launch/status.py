"""``pretrain status RUN_DIR [--watch] [--json]`` and ``pretrain cancel RUN_DIR``: a run as the user sees it.

A run's state comes from several places, each trusted for what it knows:

- ``RUN_DIR/status.json`` (written by the trainer's rank 0): state, step, images/s, last checkpoint, last eval, and
  the host and pid of rank 0;
- ``RUN_DIR/lease.json`` (held by the run that owns the directory): whether that run is provably dead;
- the run's jobs (:mod:`launch.slurm_jobs`): ``jobs.jsonl`` (the job id, each attempt, each requeue and why, how it
  ended), Slurm's job state, reason, run time and restarts, and submitit's task logs (whether the job's function
  raised, and the error tail shown for a failed job).

Nothing is unpickled: reading a status must not run code someone put into a file of the run directory.
A run whose status.json says ``running`` but whose process is provably gone (its lease holder is dead, or, without a
lease, its recorded pid on this host is gone) is shown as ``dead`` with the reason. A file that cannot be used (any
bytes: not UTF-8, truncated, not an object, nested without end, huge; a field of the wrong type or not finite) is
named on a ``problem:`` line, and text from the files is shown with control characters escaped.

``--watch`` refreshes until the state will not change by itself, and its exit code says which state that is
(:data:`WATCH_EXIT_CODES`): 0 finished, 1 failed (or dead: its process is gone without an end state), 3 preempted
with no requeue pending (run the same command to resume), 4 stopped or cancelled, 5 unknown (a Slurm job Slurm no
longer knows, whose trainer never wrote an end state). ``preempted`` is not final while its Slurm job is queued or
running again, its local job or its process lives; ``unknown`` is not final while Slurm cannot be asked.
Exit codes without ``--watch``: 0 shown/cancelled, 1 cancel failed, 2 no such run directory, a bad ``--interval-s``
or nothing to cancel.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from launch.slurm_jobs import (
    JOBS_FILE,
    QUEUED_SLURM_STATES,
    SLURM_CMD_TIMEOUT_S,
    SLURM_SUBDIR,
    TERMINAL_SLURM_STATES,
    SlurmJobInfo,
    append_job_event,
    job_error_log,
    local_job_alive,
    log_tail,
    parse_slurm_duration,
    read_job_events,
    slurm_job_gone,
    slurm_job_info,
    slurm_partitions,
    submitit_outcome,
)
from pretrain.lease import LeaseInfo, LeaseProcess, lease_holder, process_start_time
from pretrain.rundir import EXIT_USAGE, LEASE, METRICS, STATUS, read_status

__all__ = [
    "TERMINAL_RUN_STATES",
    "WATCH_EXIT_CODES",
    "RunStatus",
    "format_status",
    "main",
    "read_run_status",
    "register",
    # the run's jobs, re-exported for the modules that import them from here (launch.submit, launch.sweep_trial)
    "JOBS_FILE",
    "SLURM_SUBDIR",
    "TERMINAL_SLURM_STATES",
    "SlurmJobInfo",
    "append_job_event",
    "log_tail",
    "parse_slurm_duration",
    "read_job_events",
    "slurm_job_info",
    "slurm_partitions",
]

TERMINAL_RUN_STATES = frozenset({"finished", "stopped", "failed", "cancelled", "dead"})
"""States after which a run changes no more by itself, whatever else is known."""
WATCH_EXIT_CODES = {"finished": 0, "failed": 1, "dead": 1, "preempted": 3, "stopped": 4, "cancelled": 4, "unknown": 5}
"""Exit code of ``pretrain status --watch`` by the final state it ended on."""
_TRAINER_STATES = frozenset({"running", "finished", "failed", "preempted", "stopped"})  # what status.json may say
_INTERVAL_RANGE_S = (0.5, 86400.0)
_PID_START_SLACK_S = 2.0  # status.json's "started" has whole seconds and is written after its process started

# status.json fields as the trainer writes them (pretrain.metrics.StatusFile); a value of another type is ignored
_STATUS_TYPES: dict[str, tuple[type, ...]] = {
    "state": (str,),
    "step": (int,),
    "max_steps": (int,),
    "epoch": (int,),
    "img_per_s": (int, float),
    "last_checkpoint": (str,),
    "last_eval": (dict,),
    "message": (str,),
    "host": (str,),
    "pid": (int,),
    "slurm_job_id": (str, int),
    "restarts": (int,),
    "started": (str,),
    "updated": (str,),
}
_TYPE_NAMES = {(str,): "a string", (int,): "an integer", (int, float): "a number", (dict,): "an object",
               (str, int): "a job id"}  # fmt: skip


@dataclass
class RunStatus:
    """Everything ``pretrain status`` shows (``--json`` prints it as is)."""

    run_dir: str
    state: str
    """queued, starting, running, preempted, finished, failed, cancelled, dead or unknown."""
    state_reason: str = ""
    """Why the state is not the trainer's own (e.g. why a ``running`` run is ``dead``)."""
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
    pid: int | None = None
    """Rank 0's process id (status.json)."""
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
    problems: list[str] = field(default_factory=list)
    """Files of the run that could not be used, and why (a truncated status.json, a field of the wrong type)."""
    final: bool = False
    """The state will not change by itself (``--watch`` ends on it, with :data:`WATCH_EXIT_CODES`)."""


def _checked_status(run_dir: Path) -> tuple[dict[str, Any], list[str]]:
    """status.json's fields of the expected types, and a line for each thing that could not be used."""
    status, problem = read_status(run_dir)
    if status is None:
        return {}, ([problem] if (run_dir / STATUS).exists() else [])  # none yet (a queued job) is no problem
    out, problems = {}, []
    for key, types in _STATUS_TYPES.items():
        value = status.get(key)
        if value is None:
            continue
        shown = repr(value) if len(repr(value)) <= 40 else repr(value)[:37] + "..."
        if isinstance(value, bool) or not isinstance(value, types):
            problems.append(f"{run_dir / STATUS}: {key}={shown} is not {_TYPE_NAMES[types]}; ignored")
        elif isinstance(value, float) and not math.isfinite(value):
            problems.append(f"{run_dir / STATUS}: {key}={shown} is not a finite number; ignored")
        elif key == "state" and value not in _TRAINER_STATES:
            problems.append(f"{run_dir / STATUS}: {key}={shown} is not a run state; ignored")
        else:
            out[key] = value
    if "last_eval" in out:  # numbers shown and printed as JSON: finite ones only
        out["last_eval"] = {
            str(k): v
            for k, v in out["last_eval"].items()
            if isinstance(v, (int, str)) or (isinstance(v, float) and math.isfinite(v))
        }
    return out, problems


def _number(value: Any) -> float | None:
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


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
        except (ValueError, RecursionError):
            continue
        if isinstance(event, dict) and event.get("event") == "train":
            return event
    return {}


def read_run_status(run_dir: str | Path, query_slurm: bool = True) -> RunStatus:
    """Combine status.json, metrics.jsonl, the lease, jobs.jsonl, the task logs and Slurm into one :class:`RunStatus`.

    Args:
        run_dir: The run directory.
        query_slurm: Ask Slurm and check whether the run's processes live (False: the files only, no subprocess).

    Raises:
        FileNotFoundError: ``run_dir`` is not a directory.
    """
    run_dir = Path(run_dir).resolve()
    if not run_dir.is_dir():
        raise FileNotFoundError(f"no run directory {run_dir}")
    status, problems = _checked_status(run_dir)
    events = read_job_events(run_dir)
    submits = [e for e in events if e.get("event") == "submit"]
    job = submits[-1] if submits else {}
    slurm_job_id = str(status["slurm_job_id"]) if "slurm_job_id" in status else None
    job_id = str(job["job_id"]) if job.get("job_id") is not None else slurm_job_id
    cluster = job.get("cluster") or ("slurm" if slurm_job_id else None)
    cluster = str(cluster) if cluster is not None else None
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
        pid=status.get("pid"),
        cluster=cluster,
        job_id=job_id,
        requeues=requeues,
        restarts=len(requeues),
        resumes=status.get("restarts"),
        updated=status.get("updated"),
        problems=problems,
    )
    step_time_s = _number(_last_train_event(run_dir / METRICS).get("step_time_s"))
    if rs.step is not None and rs.max_steps and step_time_s:
        rs.eta_s = max(0, rs.max_steps - rs.step) * step_time_s

    info = slurm_job_info(job_id) if (query_slurm and job_id and cluster == "slurm") else None
    if info is not None:
        rs.slurm_state, rs.slurm_reason = info.state, info.reason
        rs.slurm_run_time_s, rs.slurm_time_limit_s, rs.slurm_nodes = info.run_time_s, info.time_limit_s, info.nodes
        rs.restarts = max(rs.restarts, info.restarts)
    cancelled = any(e.get("event") == "cancel" for e in this_job)
    gone = bool(query_slurm and info is None and cluster == "slurm" and job_id and slurm_job_gone(job_id))
    started = status.get("started")
    rs.state, rs.state_reason = _merge_state(rs, run_dir, info, ends, query_slurm, cancelled, started, gone)
    rs.final = _is_final(rs, run_dir, info, gone) if query_slurm else rs.state in TERMINAL_RUN_STATES
    if rs.state == "failed" and job_id:
        if ends and ends[-1].get("message") and rs.trainer_state != "failed":
            rs.message = str(ends[-1]["message"])  # why the job ended (the trainer's own message is older)
        err = job_error_log(run_dir, job_id)
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
    started: str | None,
    gone: bool = False,
) -> tuple[str, str]:
    """One state for the user and why, from the trainer's state, Slurm's view, the job's own records, the lease
    and `pretrain cancel`."""
    trainer = rs.trainer_state
    if trainer in ("finished", "stopped"):  # stopped: a sweep's scheduler ended the run at an eval
        return trainer, ""
    if cancelled and (info is None or info.state.split()[0] in ("COMPLETING", "CANCELLED")):
        return "cancelled", ""
    if info is not None:  # Slurm vouches for the job: a new attempt may still be taking over from a dead process
        st = info.state.split()[0].rstrip("+")
        if st in QUEUED_SLURM_STATES:
            return "queued", ""
        if st == "RUNNING" or st in ("CONFIGURING", "COMPLETING", "STAGE_OUT", "RESIZING", "SIGNALING"):
            if st == "COMPLETING" and trainer == "failed":
                return "failed", ""
            return (trainer if trainer in ("running", "preempted", "failed") else "starting"), ""
        if st == "CANCELLED":
            return "cancelled", ""
        if st in TERMINAL_SLURM_STATES and st != "COMPLETED":
            return "failed", ""
        if st == "COMPLETED":
            return trainer or ("failed" if ends and ends[-1].get("state") == "failed" else "unknown"), ""
        if st == "PREEMPTED":
            return "preempted", ""
    if ends:
        return str(ends[-1].get("state", "unknown")), ""
    if rs.job_id:
        outcome = submitit_outcome(run_dir, rs.job_id)
        if outcome == "error":
            return "failed", "submitit logged an exception of the job"
        if rs.cluster == "local" and query_slurm:
            alive = local_job_alive(rs.job_id)
            if alive:
                return (trainer if trainer in ("running", "preempted") else "starting"), ""
            if alive is False and trainer in (None, "running"):
                return ("failed" if outcome != "success" else (trainer or "unknown")), ""
    if query_slurm and trainer in (None, "running"):
        alive, why = _run_process_alive(run_dir, rs, started)
        if alive is False:
            return "dead", why
        if alive and trainer is None:  # the lease is taken before status.json is first written
            return ("running" if (run_dir / STATUS).exists() else "starting"), why
    if gone and trainer in (None, "running"):
        return "unknown", f"Slurm no longer knows job {rs.job_id} and the trainer never wrote an end state"
    if trainer == "running" and rs.cluster == "slurm" and query_slurm and info is None:
        return "unknown", "Slurm could not be asked about the job"
    return trainer or ("queued" if rs.job_id else "unknown"), ""


def _is_final(rs: RunStatus, run_dir: Path, info: SlurmJobInfo | None, gone: bool) -> bool:
    """Whether ``rs.state`` will not change by itself: a preempted run is final only when nothing will requeue or
    resume it (its Slurm job ended or is gone, its local job and its own process are gone)."""
    if rs.state in TERMINAL_RUN_STATES:
        return True
    if rs.state == "unknown":
        return gone
    if rs.state != "preempted":
        return False
    if rs.cluster == "slurm":
        state = info.state.split()[0].rstrip("+") if info is not None else ""
        return gone or state in TERMINAL_SLURM_STATES or state == "PREEMPTED"
    if rs.cluster == "local" and rs.job_id and local_job_alive(rs.job_id):
        return False
    holder, _ = _lease(run_dir)
    return holder is None or holder.dead_because() is not None


def _lease(run_dir: Path) -> tuple[LeaseInfo | None, str]:
    """:func:`lease_holder`, for any bytes in lease.json."""
    try:
        return lease_holder(run_dir)
    except (ValueError, RecursionError, TypeError):
        return None, f"{run_dir / LEASE} is unreadable (not a lease)"


def _run_process_alive(run_dir: Path, rs: RunStatus, started: str | None) -> tuple[bool | None, str]:
    """``(alive, why)``: False when the run's process is provably dead, True when a lease holder may be alive, None
    when nothing tells (no lease, and status.json names another host or no pid)."""
    holder, problem = _lease(run_dir)
    if holder is not None:
        why = holder.dead_because()
        if why is not None:
            return False, f"its lease holder ({holder.describe()}) is dead: {why}"
        return True, f"lease held by {holder.describe()}"
    if problem:  # a torn lease proves nothing about its holder: judge by status.json
        rs.problems.append(problem)
    if rs.trainer_state != "running" or rs.pid is None or rs.host != socket.gethostname():
        return None, ""
    start = process_start_time(rs.pid)
    if start is None:
        return False, f"no lease, and its process {rs.pid} on this host is gone"
    began = _unix_time(started)
    if began is not None and start > began + _PID_START_SLACK_S:
        return False, f"no lease, and its process {rs.pid} on this host is gone (the pid now belongs to a newer one)"
    return None, ""


def _unix_time(iso: str | None) -> float | None:
    try:
        return datetime.datetime.fromisoformat(iso).timestamp() if iso else None
    except ValueError:
        return None


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
    reason = f" ({rs.state_reason})" if rs.state_reason else ""
    lines = [f"run:        {rs.run_dir}", f"state:      {rs.state}{reason}"]
    lines += [f"problem:    {p}" for p in rs.problems]
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
    return "\n".join(_printable(line) for line in lines)


def _printable(text: str) -> str:
    """``text`` with control characters escaped: what the files say must not drive the terminal."""
    return "".join(c if c.isprintable() or c == "\t" else repr(c)[1:-1] for c in text)


# ---------------------------------------------------------------------------------------------------------- commands


def register(subparsers: Any) -> None:
    """Add the ``status`` and ``cancel`` subcommands."""
    p = subparsers.add_parser("status", help="show a run: state, step, img/s, ETA, checkpoint, Slurm job")
    p.add_argument("run_dir", help="run directory, e.g. runs/digits_sepvit_lite")
    p.add_argument(
        "--watch",
        action="store_true",
        help="refresh until the state will not change by itself; exit 0 finished, 1 failed or dead, 3 preempted, "
        "4 stopped or cancelled, 5 unknown (Slurm forgot the job)",
    )
    p.add_argument("--interval-s", type=float, default=10.0, help="seconds between refreshes with --watch")
    p.add_argument("--json", action="store_true", help="print one JSON object (one per refresh with --watch)")
    p.set_defaults(func=_status)
    c = subparsers.add_parser("cancel", help="stop a run: its Slurm (or local) job, or a `pretrain train`")
    c.add_argument("run_dir", help="run directory, e.g. runs/digits_sepvit_lite")
    c.set_defaults(func=_cancel)


def _status(args: argparse.Namespace) -> int:
    low, high = _INTERVAL_RANGE_S
    if not low <= args.interval_s <= high:  # NaN too
        print(f"pretrain status: --interval-s {args.interval_s} must be in [{low}, {high:.0f}]", file=sys.stderr)
        return EXIT_USAGE
    while True:
        try:
            rs = read_run_status(args.run_dir)
        except FileNotFoundError as e:
            print(f"pretrain status: {e}", file=sys.stderr)
            return EXIT_USAGE
        if args.json:
            print(json.dumps(asdict(rs), default=str))
        else:
            print(format_status(rs))
        sys.stdout.flush()
        if not args.watch:
            return 0
        if rs.final:
            return WATCH_EXIT_CODES.get(rs.state, 1)
        time.sleep(args.interval_s)
        if not args.json:
            print("-" * 60)


def _cancel(args: argparse.Namespace) -> int:
    run_dir = Path(args.run_dir).resolve()
    if not run_dir.is_dir():
        print(f"pretrain cancel: no run directory {run_dir}", file=sys.stderr)
        return EXIT_USAGE
    rs = read_run_status(run_dir)
    holder, _ = lease_holder(run_dir)
    if holder is not None and holder.dead_because() is None and not _job_holds(rs, holder):
        return _cancel_lease_holder(run_dir, holder)  # `pretrain train` (or srun), not a job `pretrain submit` recorded
    if not rs.job_id:
        print(f"pretrain cancel: no live run holds {run_dir} and it has no recorded job: nothing to cancel",
              file=sys.stderr)  # fmt: skip
        return EXIT_USAGE
    if rs.state in TERMINAL_RUN_STATES:
        print(f"pretrain cancel: {rs.cluster or ''} job {rs.job_id} already ended ({rs.state}); nothing to cancel")
        return 0
    if rs.cluster == "local":
        if not local_job_alive(rs.job_id):
            print(f"pretrain cancel: local job {rs.job_id} is not running")
            return 0
        os.kill(int(rs.job_id), signal.SIGTERM)  # submitit's local controller forwards it to the tasks
    else:
        if shutil.which("scancel") is None:
            print("pretrain cancel: scancel not found (is the Slurm client installed?)", file=sys.stderr)
            return 1
        out = subprocess.run(["scancel", rs.job_id], capture_output=True, text=True, timeout=SLURM_CMD_TIMEOUT_S)
        if out.returncode != 0:
            print(f"pretrain cancel: scancel {rs.job_id} failed: {out.stderr.strip()}", file=sys.stderr)
            return 1
    append_job_event(run_dir, "cancel", job_id=rs.job_id, cluster=rs.cluster)
    print(f"pretrain cancel: cancelled {rs.cluster or ''} job {rs.job_id} of {run_dir}")
    return 0


def _job_holds(rs: RunStatus, holder: LeaseInfo) -> bool:
    """Whether the run holding the lease is the job `pretrain submit` recorded (cancelled through Slurm/submitit)."""
    if not rs.job_id:
        return False
    if rs.cluster == "local":
        return bool(local_job_alive(rs.job_id))
    return holder.slurm_job_id == str(rs.job_id)


def _cancel_lease_holder(run_dir: Path, holder: LeaseInfo) -> int:
    """Stop the run that holds ``run_dir`` as Ctrl-C does: SIGINT to each of its processes on this host (each checked
    to be the run's own by its start time). It stops at the end of its step, checkpointed, as ``stopped``."""
    procs = holder.processes or (LeaseProcess(holder.host, holder.pid, holder.pid_start),)
    sent = [p for p in procs if p.send(signal.SIGINT)]
    elsewhere = [f"{p.pid} on {p.host}" for p in procs if p.host != socket.gethostname()]
    if not sent:
        where = f"its processes run on other hosts ({', '.join(elsewhere)})" if elsewhere else "none of them is running"
        job = f"; `scancel --signal=INT {holder.slurm_job_id}` stops its Slurm job" if holder.slurm_job_id else ""
        print(f"pretrain cancel: could not signal the run holding {run_dir}: {where}{job}", file=sys.stderr)
        return 1
    print(f"pretrain cancel: sent SIGINT to the run holding {run_dir} (pids {', '.join(str(p.pid) for p in sent)} on "
          f"{socket.gethostname()}): it checkpoints at the end of its step and ends as stopped; "
          f"`pretrain status {run_dir}` shows when")  # fmt: skip
    if elsewhere:
        print(f"  not signalled, on other hosts: {', '.join(elsewhere)}")
    return 0


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``python -m launch.status RUN_DIR`` (same as ``pretrain status``)."""
    from launch.cli import main as cli_main

    return cli_main(["status", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    sys.exit(main())
