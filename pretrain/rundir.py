"""The run directory: its layout, exit codes, atomic writes, status reading and history. Torch-free.

Layout of ``<run.output_dir>/<run.name>/``::

    config.yaml        the resolved config
    metrics.jsonl      one JSON object per event
    tb/                TensorBoard event files
    checkpoints/<tag>/ checkpoints; checkpoints/latest names the newest complete one
    status.json        state, step, last checkpoint, host, Slurm job id
    lease.json         the lease of the run that owns the directory now (:mod:`pretrain.lease`)
    previous/<stamp>/  history a ``--restart`` or a PBT exploit set aside (never deleted)
    sweep/             a sweep trial's files (hook: :mod:`pretrain.sweep_hook`; the run's pid, its log, the trial's log)

The run's lease (``lease.json``) is :mod:`pretrain.lease`.
"""

from __future__ import annotations

import json
import os
import time
import uuid
from pathlib import Path
from typing import Any

from data_pipeline.fsutil import fsync_dir
from pretrain.fsutil import read_jsonl

__all__ = [
    "CHECKPOINTS",
    "COMPLETE_MARKER",
    "CONFIG_YAML",
    "EMA_FILE",
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
EMA_FILE = "ema.pt"
"""The EMA weights' file in a checkpoint's tag directory (a run with ``trainer.ema_decay`` > 0)."""


def write_atomic(path: str | Path, text: str | bytes) -> None:
    """Replace ``path`` by ``text`` at once (temporary file, fsync, rename): a reader sees the old or the new file."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        with open(tmp, "wb" if isinstance(text, bytes) else "w") as f:
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


_STATUS_MAX_BYTES = 1 << 20  # the trainer's status.json is ~1 KiB


def read_status(run_dir: str | Path) -> tuple[dict[str, Any] | None, str]:
    """``(status, problem)``: the run's ``status.json`` as a dict, or None with why it could not be used (any bytes:
    not UTF-8, nested without end, larger than a status file can be)."""
    path = Path(run_dir) / STATUS
    try:
        with open(path, "rb") as f:
            raw = f.read(_STATUS_MAX_BYTES + 1)
    except FileNotFoundError:
        return None, f"{path} does not exist"
    except OSError as e:
        return None, f"{path} is unreadable ({e.strerror or e})"
    if len(raw) > _STATUS_MAX_BYTES:
        return None, f"{path} is larger than {_STATUS_MAX_BYTES >> 20} MiB, which no status file is (overwritten?)"
    try:
        data = json.loads(raw.decode())
    except UnicodeDecodeError:
        return None, f"{path} is not UTF-8 text (overwritten?)"
    except (ValueError, RecursionError):
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
