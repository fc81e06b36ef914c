"""File-system helpers without heavy imports: durable renames (checkpoint and manifest writers) and JSON-lines
reading (metrics, Slurm job events; ``pretrain status`` must not import torch)."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

__all__ = ["fsync_dir", "read_jsonl"]


def fsync_dir(path: str | Path) -> None:
    """Makes a rename in ``path`` durable (best effort: some file systems refuse to open or fsync folders)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def read_jsonl(path: str | Path) -> list[dict[str, Any]]:
    """All events of a JSON-lines file in order ([] when it is missing; a torn or garbled line is skipped)."""
    out = []
    try:
        lines = Path(path).read_text().splitlines()
    except OSError:
        return []
    for line in lines:
        try:
            out.append(json.loads(line))
        except ValueError:
            continue
    return out
