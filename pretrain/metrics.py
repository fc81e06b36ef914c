"""Metrics of a run: one sink (``metrics.jsonl`` + TensorBoard on rank 0, a null sink elsewhere), ``status.json``,
throughput/MFU helpers and top-k counting.

Every event is one JSON object per line in ``<run>/metrics.jsonl``; the same numeric fields go to TensorBoard under
``train/<key>`` (step events) or ``eval/<key>`` (eval events, keys starting with ``val_``). Flags (``skipped``,
``resumed_in_window``) are not scalars and stay in ``metrics.jsonl``.

A write that fails (a full disk, a read-only or failing file system) does not raise where it happens: the sink or the
status file keeps it as ``failure`` (a :class:`RunWriteError` naming the file, the reason and what to do) and writes
no more, and the trainer ends the run on it at the next point where every rank agrees on how to go on. A torn line of
``metrics.jsonl`` is cut off again; ``status.json``, if it cannot be replaced, is rewritten in place (compact, so it
fits in the space the file already has), so that a full disk still leaves the true final state.
"""

from __future__ import annotations

import datetime
import errno
import json
import logging
import math
import os
import resource
import socket
import sys
import threading
from pathlib import Path
from typing import Any

import torch

from pretrain.fsutil import read_jsonl
from pretrain.rundir import METRICS, PREVIOUS, TB, write_atomic

__all__ = [
    "PEAK_FLOPS",
    "JsonlSink",
    "MetricsSink",
    "NullSink",
    "RunWriteError",
    "StatusFile",
    "TensorBoardSink",
    "build_metrics_sink",
    "device_peak_flops",
    "peak_memory_mb",
    "topk_correct",
    "truncate_jsonl",
]

logger = logging.getLogger(__name__)

# Dense peak FLOP/s per device by precision (vendor datasheets; torchtitan uses the same H100/A100 figures).
PEAK_FLOPS: dict[str, dict[str, float]] = {
    "H200": {"bf16": 989e12, "fp16": 989e12, "fp32": 494e12},  # fp32 entry = TF32 tensor cores
    "H100": {"bf16": 989e12, "fp16": 989e12, "fp32": 494e12},
    "A100": {"bf16": 312e12, "fp16": 312e12, "fp32": 156e12},
    "L40S": {"bf16": 362e12, "fp16": 362e12, "fp32": 183e12},
    "A10": {"bf16": 125e12, "fp16": 125e12, "fp32": 62.5e12},
    "V100": {"bf16": 125e12, "fp16": 125e12, "fp32": 15.7e12},
}


def device_peak_flops(device: torch.device, precision: str) -> float | None:
    """Peak FLOP/s of ``device`` at ``precision`` from :data:`PEAK_FLOPS`; None on CPU or an unknown GPU."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device).upper()
    for key, table in PEAK_FLOPS.items():
        if key in name:
            return table.get(precision)
    return None


def peak_memory_mb(device: torch.device) -> float:
    """Peak memory of this rank: CUDA max allocated on GPU, the process's max RSS on CPU (MiB)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    return rss / (2**20 if sys.platform == "darwin" else 2**10)


def topk_correct(logits: torch.Tensor, labels: torch.Tensor, valid: torch.Tensor, ks: tuple[int, ...] = (1, 5)):
    """Number of valid rows whose label is in the top-k logits, for each k (k is capped at the class count).

    Args:
        logits: (B, num_classes).
        labels: (B,) int64.
        valid: (B,) bool; False rows (padding, corrupt samples) are not counted.

    Returns:
        A list of 0-dim tensors, one per k.
    """
    kmax = min(max(ks), logits.shape[-1])
    top = logits.topk(kmax, dim=-1).indices  # (B, kmax)
    hit = top.eq(labels.unsqueeze(-1)) & valid.unsqueeze(-1)  # (B, kmax)
    return [hit[:, : min(k, kmax)].any(dim=-1).sum() for k in ks]


# ----------------------------------------------------------------------------------------------------------- sinks


class RunWriteError(OSError):
    """A file of the run directory could not be written; the message names it, the reason and what to do."""

    _ADVICE = {
        errno.ENOSPC: "free space on that file system",
        errno.EDQUOT: "free space within your disk quota",
        errno.EROFS: "the file system is read-only: make it writable",
        errno.EACCES: "fix the permissions of the run directory",
        errno.EPERM: "fix the permissions of the run directory",
    }

    def __init__(self, path: str | Path, error: BaseException):
        code = getattr(error, "errno", None)
        reason = getattr(error, "strerror", None) or str(error) or type(error).__name__
        super().__init__(f"could not write {path} ({reason})")
        self.errno, self.path = code, Path(path)
        self.advice = self._ADVICE.get(code, "check the disk and the file system")  # type: ignore[arg-type]

    def run_ended(self, step: int, last_checkpoint: str | None) -> str:
        """The one message of a run that this failure ended at ``step``: what failed, what is kept, what to do."""
        if last_checkpoint:
            kept, then = f"its checkpoints up to {Path(last_checkpoint).name} are intact", "run the same command again"
        else:
            kept, then = "no checkpoint was saved yet", "start it again with --restart"
        return f"{self} at step {step}; the run stopped and {kept}. To go on, {self.advice}, then {then}"


class MetricsSink:
    """Where metric events go. The base class is the null backend (non-zero ranks, disabled logging)."""

    failure: RunWriteError | None = None
    """The first write that failed; nothing more is written after it."""

    def log(self, event: dict[str, Any]) -> None:
        """Record one event (a flat dict with at least ``step``); a failed write sets :attr:`failure`."""

    def close(self) -> None:
        """Flush and release files (never raises: a failure is in :attr:`failure` already)."""


NullSink = MetricsSink


def _jsonable(v: Any) -> Any:
    if isinstance(v, torch.Tensor):
        v = v.item()
    if isinstance(v, float) and not math.isfinite(v):
        return str(v)  # JSON has no NaN/Inf; keep the information as text
    return v


class JsonlSink(MetricsSink):
    """Appends one JSON object per event to ``path``, each in one unbuffered write (in the OS at once); a line that
    could be written only in part is cut off again.

    Raises:
        RunWriteError: ``path`` cannot be opened for appending.
    """

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.failure = None
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._f = open(self.path, "ab", buffering=0)
        except OSError as e:
            raise RunWriteError(self.path, e) from None

    def log(self, event: dict[str, Any]) -> None:
        if self.failure is not None:
            return
        line = memoryview((json.dumps({k: _jsonable(v) for k, v in event.items()}) + "\n").encode())
        size = os.fstat(self._f.fileno()).st_size
        try:
            while line:
                line = line[self._f.write(line) :]
        except OSError as e:
            self.failure = RunWriteError(self.path, e)
            try:
                os.ftruncate(self._f.fileno(), size)  # no torn line: frees space, needs none
            except OSError:
                pass

    def close(self) -> None:
        try:
            self._f.close()
        except OSError:
            pass


class TensorBoardSink(MetricsSink):
    """Writes the numeric fields of each event as TensorBoard scalars in ``log_dir``.

    Args:
        log_dir: ``<run>/tb``.
        purge_step: On resume, events at or after this step from the interrupted run are hidden by TensorBoard.
    """

    _SKIP = {"step", "event", "time"}

    def __init__(self, log_dir: str | Path, purge_step: int | None = None):
        from torch.utils.tensorboard import SummaryWriter

        _quiet_tensorboard_writer_threads()
        self.log_dir = Path(log_dir)
        self.failure = None
        try:
            self._w = SummaryWriter(log_dir=str(log_dir), purge_step=purge_step)
        except OSError as e:
            raise RunWriteError(self.log_dir, e) from None

    def log(self, event: dict[str, Any]) -> None:
        if self.failure is not None:
            return
        step = int(event["step"])
        prefix = "eval" if event.get("event") == "eval" else "train"
        try:
            for k, v in event.items():
                if k in self._SKIP or isinstance(v, bool) or not isinstance(v, (int, float)):
                    continue
                if math.isfinite(v):
                    self._w.add_scalar(f"{prefix}/{k}", v, step)
            self._w.flush()  # raises what its writer thread met
        except OSError as e:
            self.failure = RunWriteError(self.log_dir, e)

    def close(self) -> None:
        try:
            self._w.close()
        except OSError:
            pass


def _quiet_tensorboard_writer_threads() -> None:
    """TensorBoard writes event files in a thread that re-raises its error (printed as a traceback by
    ``threading.excepthook``) after keeping it for the next ``flush``, where :class:`TensorBoardSink` reports it: an
    ``OSError`` of that thread is logged at debug level instead of printed."""
    previous = threading.excepthook
    if getattr(previous, "_quiets_tensorboard", False):
        return

    def hook(args: Any) -> None:
        thread = type(args.thread)
        if thread.__module__.startswith("tensorboard.") and issubclass(args.exc_type, OSError):
            logger.debug("TensorBoard writer thread: %s", args.exc_value)
            return
        previous(args)

    hook._quiets_tensorboard = True  # type: ignore[attr-defined]
    threading.excepthook = hook


class _MultiSink(MetricsSink):
    def __init__(self, sinks: list[MetricsSink]):
        self.sinks = sinks

    @property
    def failure(self) -> RunWriteError | None:  # type: ignore[override]
        return next((s.failure for s in self.sinks if s.failure is not None), None)

    def log(self, event: dict[str, Any]) -> None:
        for s in self.sinks:
            s.log(event)

    def close(self) -> None:
        for s in self.sinks:
            s.close()


def truncate_jsonl(path: str | Path, max_step: int) -> int:
    """Keep only events with ``step <= max_step`` (atomically), so a resumed run's history has no duplicates.

    The events cut off (logged by a life of the run after the checkpoint it resumes from) are not lost: they are
    appended to ``previous/<file stem>.after-step-<max_step>.jsonl`` next to ``path``.

    Returns:
        The number of events dropped.

    Raises:
        RunWriteError: A file could not be written.
    """
    path = Path(path)
    if not path.exists():
        return 0
    events = [e for e in read_jsonl(path) if isinstance(e, dict)]
    kept = [e for e in events if not isinstance(e.get("step"), int) or e["step"] <= max_step]
    dropped = [e for e in events if isinstance(e.get("step"), int) and e["step"] > max_step]
    if dropped:
        aside = path.parent / PREVIOUS / f"{path.stem}.after-step-{max_step}.jsonl"
        try:
            aside.parent.mkdir(exist_ok=True)
            with open(aside, "a") as f:
                f.write("".join(json.dumps(e) + "\n" for e in dropped))
        except OSError as e:
            raise RunWriteError(aside, e) from None
    try:
        write_atomic(path, "".join(json.dumps(e) + "\n" for e in kept))
    except OSError as e:
        raise RunWriteError(path, e) from None
    return len(dropped)


def build_metrics_sink(run_dir: str | Path, is_main: bool, tensorboard: bool, resume_step: int) -> MetricsSink:
    """The run's sink: on rank 0 ``metrics.jsonl`` (cut back to ``resume_step``) plus TensorBoard; null elsewhere.

    Raises:
        RunWriteError: A file of the run directory could not be written or opened.
    """
    if not is_main:
        return NullSink()
    run_dir = Path(run_dir)
    dropped = truncate_jsonl(run_dir / METRICS, resume_step)
    if dropped:
        logger.info(
            "metrics.jsonl: dropped %d events after step %d (logged before the interruption)", dropped, resume_step
        )
    sinks: list[MetricsSink] = [JsonlSink(run_dir / METRICS)]
    if tensorboard:
        try:
            sinks.append(TensorBoardSink(run_dir / TB, purge_step=resume_step + 1 if resume_step > 0 else None))
        except RunWriteError:
            sinks[0].close()
            raise
    return _MultiSink(sinks)


# ---------------------------------------------------------------------------------------------------------- status


class StatusFile:
    """``<run>/status.json``, rewritten atomically on every update (rank 0 only; a no-op elsewhere).

    Fields: ``state`` (running/finished/failed/preempted), ``step``, ``max_steps``, ``epoch``, ``last_checkpoint``,
    ``last_eval`` (dict), ``img_per_s``, ``host``, ``pid``, ``slurm_job_id``, ``restarts``, ``world_size``,
    ``started``, ``updated`` (ISO-8601 UTC), ``exit_code`` and ``message`` (set when the run ends).

    An update never raises: a write that fails is kept in :attr:`failure` (the first one), and the file is then
    rewritten in place, compact, which needs no new space on a full disk.
    """

    def __init__(self, path: str | Path, enabled: bool = True, **fields: Any):
        self.path = Path(path)
        self.enabled = enabled
        self.failure: RunWriteError | None = None
        """The first update that could not replace the file."""
        self.fields: dict[str, Any] = {
            "state": "running",
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "slurm_job_id": os.environ.get("SLURM_JOB_ID"),
            "slurm_restart_count": int(os.environ.get("SLURM_RESTART_COUNT") or 0),
            "started": _now(),
        }
        self.fields.update(fields)

    def update(self, **fields: Any) -> bool:
        """Merge ``fields`` and rewrite the file.

        Returns:
            Whether the file now holds them (replaced, or else rewritten in place).
        """
        self.fields.update(fields)
        if not self.enabled:
            return True
        self.fields["updated"] = _now()
        shown = {k: _jsonable(v) for k, v in self.fields.items()}
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            write_atomic(self.path, json.dumps(shown, indent=1, default=str))
            return True
        except OSError as e:
            if self.failure is None:
                self.failure = RunWriteError(self.path, e)
        return self._rewrite_in_place(json.dumps(shown, separators=(",", ":"), default=str).encode())

    def _rewrite_in_place(self, data: bytes) -> bool:
        """Overwrite the existing file (no new file, so no new inode; compact, so within the blocks it has)."""
        try:
            fd = os.open(self.path, os.O_WRONLY)
        except OSError:
            return False
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view) :]
            os.ftruncate(fd, len(data))
            os.fsync(fd)
            return True
        except OSError as e:
            logger.warning("could not record the run's state in %s either (%s)", self.path, e.strerror or e)
            return False
        finally:
            os.close(fd)


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
