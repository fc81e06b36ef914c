"""Durable renames for the shard and manifest writers (and, through :mod:`pretrain.fsutil`, the checkpoint writer),
and writes that stay inside the folder they are meant for."""

from __future__ import annotations

import os
from pathlib import Path, PurePosixPath

__all__ = ["fsync_dir", "inside_check", "write_file_inside"]


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


def inside_check(root: str | Path, rel: str) -> Path:
    """``root/rel``, once it is sure to lie inside ``root``: ``rel`` is relative without ``..``, and the deepest
    folder of it that exists resolves (symbolic links followed) inside ``root``.

    Raises:
        PermissionError: It would lie outside ``root`` (the message names the link or the part to change).
    """
    parts = PurePosixPath(rel).parts
    if not parts or PurePosixPath(rel).is_absolute() or ".." in parts:
        raise PermissionError(f"refusing to write {rel!r}: not a path inside {root}")
    base = Path(root).resolve()
    path = Path(root, *parts)
    folder = path.parent
    while not folder.exists() and folder != Path(root):
        folder = folder.parent
    if not folder.exists():
        return path  # nothing of it exists yet: it is made inside root
    real = folder.resolve()
    if real != base and base not in real.parents:
        raise PermissionError(
            f"refusing to write {path}: {folder} leads to {real}, outside {base} (a symbolic link); remove the link "
            "or write elsewhere"
        )
    return path  # a link at `path` itself is replaced by the rename, not followed


def write_file_inside(root: str | Path, rel: str, data: bytes) -> Path:
    """Writes ``root/rel`` atomically (temp file, fsync, rename, fsync of the folder), never outside ``root``: see
    :func:`inside_check`; the temp file is created anew (a link planted in its place is removed, not followed).

    Raises:
        PermissionError: ``root/rel`` would lie outside ``root``.
        OSError: The write failed (the final file is then unchanged).
    """
    path = inside_check(root, rel)
    path.parent.mkdir(parents=True, exist_ok=True)
    inside_check(root, rel)  # the folders just made: a link raced in meanwhile is refused too
    tmp = path.with_name(path.name + ".tmp")
    tmp.unlink(missing_ok=True)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0), 0o666)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)
    return path
