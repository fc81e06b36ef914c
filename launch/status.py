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
lease, its recorded pid on this host is gone) is shown as ``dead`` with the reason, and ``--watch`` ends there. A file
that cannot be used (a truncated status.json, a field of the wrong type) is named on a ``problem:`` line.
Exit codes: 0 shown/cancelled, 1 cancel failed, 2 no such run directory or nothing to cancel.
"""

from __future__ import annotations

import argparse
import datetime
import json
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
    slurm_job_info,
    slurm_partitions,
    submitit_outcome,
)
from pretrain.rundir import EXIT_USAGE, METRICS, STATUS, lease_holder, process_start_time, read_status

__all__ = [
    "TERMINAL_RUN_STATES",
    "RunStatus",
    "cancel_main",
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
"""States after which a run changes no more by itself (``--watch`` ends on them)."""
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
        if isinstance(value, bool) or not isinstance(value, types):
            shown = repr(value) if len(repr(value)) <= 40 else repr(value)[:37] + "..."
            problems.append(f"{run_dir / STATUS}: {key}={shown} is not {_TYPE_NAMES[types]}; ignored")
        else:
            out[key] = value
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
        except ValueError:
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
    rs.state, rs.state_reason = _merge_state(rs, run_dir, info, ends, query_slurm, cancelled, status.get("started"))
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
    if trainer == "running" and rs.cluster == "slurm" and query_slurm and info is None:
        return "unknown", "Slurm forgot the job and the trainer never wrote an end state"
    return trainer or ("queued" if rs.job_id else "unknown"), ""


def _run_process_alive(run_dir: Path, rs: RunStatus, started: str | None) -> tuple[bool | None, str]:
    """``(alive, why)``: False when the run's process is provably dead, True when a lease holder may be alive, None
    when nothing tells (no lease, and status.json names another host or no pid)."""
    holder, problem = lease_holder(run_dir)
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
            return EXIT_USAGE
        if args.json:
            print(json.dumps(asdict(rs), default=str))
        else:
            print(format_status(rs))
        sys.stdout.flush()
        if not args.watch or rs.state in TERMINAL_RUN_STATES:
            return 0
        time.sleep(max(0.5, args.interval_s))
        if not args.json:
            print("-" * 60)


def _cancel(args: argparse.Namespace) -> int:
    run_dir = Path(args.run_dir).resolve()
    if not run_dir.is_dir():
        print(f"pretrain cancel: no run directory {run_dir}", file=sys.stderr)
        return EXIT_USAGE
    rs = read_run_status(run_dir)
    if not rs.job_id:
        print(f"pretrain cancel: {run_dir} has no recorded job (not started by `pretrain submit`?)", file=sys.stderr)
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
