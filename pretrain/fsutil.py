"""File-system helpers without heavy imports: JSON-lines reading (metrics, Slurm job events; ``pretrain status`` must
not import torch) and the check that a file can be written before the work that produces it. Durable renames are
:func:`data_pipeline.fsutil.fsync_dir`."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Any

__all__ = ["read_jsonl", "unwritable_reason"]


def read_jsonl(path: str | Path) -> list[dict[str, Any]]:
    """All events of a JSON-lines file in order ([] when it is missing; a torn, garbled, non-UTF-8 or absurdly nested
    line is skipped)."""
    out = []
    try:
        lines = Path(path).read_bytes().decode(errors="replace").splitlines()
    except OSError:
        return []
    for line in lines:
        try:
            out.append(json.loads(line))
        except (ValueError, RecursionError):
            continue
    return out


def unwritable_reason(path: str | Path) -> str:
    """Why a file cannot be written at ``path`` (missing folders created on the way), or "" when a test file can be
    created in the nearest existing folder. ``os.access`` says yes to root on a read-only mount; a real write tells."""
    path = Path(path)
    if path.is_dir():
        return f"{path} is a directory"
    folder = path.absolute().parent
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    if not folder.is_dir():
        return f"{folder} is a file, not a folder"
    try:
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".write-check-"):
            pass
    except OSError as e:
        return f"{folder} is not writable ({e.strerror or e})"
    return ""
