"""Metrics of a run: one sink (``metrics.jsonl`` + TensorBoard on rank 0, a null sink elsewhere), ``status.json``,
throughput/MFU helpers and top-k counting.

Every event is one JSON object per line in ``<run>/metrics.jsonl``; the same numeric fields go to TensorBoard under
``train/<key>`` (step events) or ``eval/<key>`` (eval events, keys starting with ``val_``). Flags (``skipped``,
``resumed_in_window``) are not scalars and stay in ``metrics.jsonl``.
"""

from __future__ import annotations

import datetime
import json
import logging
import math
import os
import resource
import socket
import sys
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
    "StatusFile",
    "TensorBoardSink",
    "build_metrics_sink",
    "device_peak_flops",
    "peak_memory_mb",
    "read_jsonl",
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


class MetricsSink:
    """Where metric events go. The base class is the null backend (non-zero ranks, disabled logging)."""

    def log(self, event: dict[str, Any]) -> None:
        """Record one event (a flat dict with at least ``step``)."""

    def close(self) -> None:
        """Flush and release files."""


NullSink = MetricsSink


def _jsonable(v: Any) -> Any:
    if isinstance(v, torch.Tensor):
        v = v.item()
    if isinstance(v, float) and not math.isfinite(v):
        return str(v)  # JSON has no NaN/Inf; keep the information as text
    return v


class JsonlSink(MetricsSink):
    """Appends one JSON object per event to ``path`` (line-buffered, flushed every event)."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._f = open(self.path, "a", buffering=1)

    def log(self, event: dict[str, Any]) -> None:
        self._f.write(json.dumps({k: _jsonable(v) for k, v in event.items()}) + "\n")
        self._f.flush()

    def close(self) -> None:
        self._f.close()


class TensorBoardSink(MetricsSink):
    """Writes the numeric fields of each event as TensorBoard scalars in ``log_dir``.

    Args:
        log_dir: ``<run>/tb``.
        purge_step: On resume, events at or after this step from the interrupted run are hidden by TensorBoard.
    """

    _SKIP = {"step", "event", "time"}

    def __init__(self, log_dir: str | Path, purge_step: int | None = None):
        from torch.utils.tensorboard import SummaryWriter

        self._w = SummaryWriter(log_dir=str(log_dir), purge_step=purge_step)

    def log(self, event: dict[str, Any]) -> None:
        step = int(event["step"])
        prefix = "eval" if event.get("event") == "eval" else "train"
        for k, v in event.items():
            if k in self._SKIP or isinstance(v, bool) or not isinstance(v, (int, float)):
                continue
            if math.isfinite(v):
                self._w.add_scalar(f"{prefix}/{k}", v, step)
        self._w.flush()

    def close(self) -> None:
        self._w.close()


class _MultiSink(MetricsSink):
    def __init__(self, sinks: list[MetricsSink]):
        self.sinks = sinks

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
    """
    path = Path(path)
    if not path.exists():
        return 0
    events = read_jsonl(path)
    kept = [e for e in events if not isinstance(e.get("step"), int) or e["step"] <= max_step]
    dropped = [e for e in events if isinstance(e.get("step"), int) and e["step"] > max_step]
    if dropped:
        aside = path.parent / PREVIOUS / f"{path.stem}.after-step-{max_step}.jsonl"
        aside.parent.mkdir(exist_ok=True)
        with open(aside, "a") as f:
            f.write("".join(json.dumps(e) + "\n" for e in dropped))
    write_atomic(path, "".join(json.dumps(e) + "\n" for e in kept))
    return len(dropped)


def build_metrics_sink(run_dir: str | Path, is_main: bool, tensorboard: bool, resume_step: int) -> MetricsSink:
    """The run's sink: on rank 0 ``metrics.jsonl`` (cut back to ``resume_step``) plus TensorBoard; null elsewhere."""
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
        sinks.append(TensorBoardSink(run_dir / TB, purge_step=resume_step + 1 if resume_step > 0 else None))
    return _MultiSink(sinks)


# ---------------------------------------------------------------------------------------------------------- status


class StatusFile:
    """``<run>/status.json``, rewritten atomically on every update (rank 0 only; a no-op elsewhere).

    Fields: ``state`` (running/finished/failed/preempted), ``step``, ``max_steps``, ``epoch``, ``last_checkpoint``,
    ``last_eval`` (dict), ``img_per_s``, ``host``, ``pid``, ``slurm_job_id``, ``restarts``, ``world_size``,
    ``started``, ``updated`` (ISO-8601 UTC), ``exit_code`` and ``message`` (set when the run ends).
    """

    def __init__(self, path: str | Path, enabled: bool = True, **fields: Any):
        self.path = Path(path)
        self.enabled = enabled
        self.fields: dict[str, Any] = {
            "state": "running",
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "slurm_job_id": os.environ.get("SLURM_JOB_ID"),
            "slurm_restart_count": int(os.environ.get("SLURM_RESTART_COUNT") or 0),
            "started": _now(),
        }
        self.fields.update(fields)

    def update(self, **fields: Any) -> None:
        """Merge ``fields`` and rewrite the file."""
        self.fields.update(fields)
        if not self.enabled:
            return
        self.fields["updated"] = _now()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        write_atomic(self.path, json.dumps({k: _jsonable(v) for k, v in self.fields.items()}, indent=1, default=str))


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
