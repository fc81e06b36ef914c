"""Durable renames for the shard and manifest writers (and, through :mod:`pretrain.fsutil`, the checkpoint writer)."""

from __future__ import annotations

import os
from pathlib import Path

__all__ = ["fsync_dir"]


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
