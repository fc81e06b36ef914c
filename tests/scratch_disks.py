"""Real small file systems for tests of full and read-only disks: a tmpfs of a given size, mounted by the test and
unmounted at its end (root only; elsewhere the test is skipped, and under ``CI=true`` it fails)."""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

__all__ = ["fill", "tmpfs_mounts"]


def tmpfs_mounts(root: Path) -> Iterator[Callable[..., Path]]:
    """Generator for a fixture: yields ``mount(size_bytes, ro=False) -> Path``; every mount is undone afterwards."""
    mounts: list[Path] = []

    def mount(size: int, ro: bool = False) -> Path:
        where = root / f"disk{len(mounts)}"
        where.mkdir(parents=True)
        opts = f"size={size}" + (",ro" if ro else "")
        done = subprocess.run(["mount", "-t", "tmpfs", "-o", opts, "tmpfs", str(where)], capture_output=True)
        if done.returncode != 0:
            if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
                pytest.fail(f"CI=true and a tmpfs mount is needed: {done.stderr.decode()}")
            pytest.skip(f"cannot mount a tmpfs here (needs root): {done.stderr.decode().strip()}")
        mounts.append(where)
        return where

    yield mount
    for where in mounts:
        subprocess.run(["umount", "-l", str(where)], capture_output=True)


def fill(disk: Path, leave_bytes: int = 0) -> Path:
    """Fill ``disk`` with one file until it is full (at once: allocated in one call, then topped up), then give
    ``leave_bytes`` back; returns the file (delete it to free the space)."""
    filler = disk / "filler"
    with open(filler, "wb", buffering=0) as f:
        try:
            os.posix_fallocate(f.fileno(), 0, max(1, shutil.disk_usage(disk).free - (1 << 16)))
        except OSError:  # another writer took some of it meanwhile: the writes below fill what is left
            pass
        f.seek(0, os.SEEK_END)
        block = b"\0" * (1 << 16)
        try:
            while True:
                f.write(block)
        except OSError:
            pass
    if leave_bytes:
        os.truncate(filler, max(0, filler.stat().st_size - leave_bytes))
    return filler
