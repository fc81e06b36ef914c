"""File-system helpers without heavy imports: durable renames (:func:`fsync_dir`, owned by ``data_pipeline`` whose
shard and manifest writers need it too) and JSON-lines reading (metrics, Slurm job events; ``pretrain status`` must
not import torch)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from data_pipeline.fsutil import fsync_dir

__all__ = ["fsync_dir", "read_jsonl"]


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
