"""A size-bounded local cache of remote shards, shared by every loader process of a node (``data.cache_dir``).

Why: range reads fetch each epoch's samples again; with a cache, the second and later epochs read local files. Each
shard is cached whole, under its sha256 from the manifest (``<cache_dir>/<sha256>.tar``): content-addressed, so two
data sets sharing a shard share its copy, a shard replaced in the store is never served from an old copy, and every
copy is checked against that sha256 before it is used.

Filling is shared and never blocks a batch: the first process that needs a shard takes ``<sha256>.tar.lock``
(``O_CREAT | O_EXCL``) and downloads it in a background thread into a private temp file, checks its sha256 and
renames it into place (atomic; readers never see a partial file); every process, the downloader included, keeps
reading that shard by ranges until the file is there. A lock whose process is gone (same host) or that is older than
an hour is taken over. After each fill the cache is cut to ``max_bytes`` by removing the least recently used shards
(a process touches a shard's mtime when it starts reading it); a process that has a removed shard open keeps
reading it (POSIX), one that finds it gone reads by ranges again.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
from pathlib import Path

from data_pipeline.manifest import file_sha256
from data_pipeline.remote import Store

__all__ = ["ShardCache"]

logger = logging.getLogger(__name__)

_STALE_LOCK_S = 3600.0  # a lock older than this is taken over (a downloader on another host, or a stuck one)
_STALE_TMP_S = 3600.0  # temp files of dead downloaders older than this are removed
_RECHECK_S = 2.0  # how often a process looks again for a shard it found missing or locked


class ShardCache:
    """Whole-shard copies of remote shards in a local folder, at most ``max_bytes`` in all.

    Args:
        cache_dir: The folder (created); node-local disk is best (several nodes writing one NFS folder work, but
            each downloads its own copy).
        max_bytes: Upper bound of the cached shards' total size; a shard larger than it is never cached.
    """

    def __init__(self, cache_dir: str | os.PathLike, max_bytes: int):
        self.dir = Path(cache_dir)
        self.max_bytes = int(max_bytes)
        self._found: dict[str, Path] = {}
        self._checked: dict[str, float] = {}
        self._filling: set[str] = set()
        self._lock = threading.Lock()
        self._pid = os.getpid()

    def __getstate__(self) -> dict:
        return {"dir": self.dir, "max_bytes": self.max_bytes}

    def __setstate__(self, state: dict) -> None:
        self.__init__(state["dir"], state["max_bytes"])

    def _reset_after_fork(self) -> None:
        if self._pid != os.getpid():  # a forked worker: the parent's threads and in-flight fills are not ours
            self.__init__(self.dir, self.max_bytes)

    def path(self, sha256: str) -> Path:
        return self.dir / f"{sha256}.tar"

    def lookup(self, sha256: str, size: int) -> Path | None:
        """The cached copy of a shard, if one is there with the right size (else None, cheaply: one stat every few
        seconds per shard)."""
        self._reset_after_fork()
        found = self._found.get(sha256)
        if found is not None:
            return found
        now = time.monotonic()
        if now - self._checked.get(sha256, -_RECHECK_S) < _RECHECK_S:
            return None
        self._checked[sha256] = now
        path = self.path(sha256)
        try:
            if path.stat().st_size != size:
                return None
            os.utime(path)  # least recently used goes first
        except OSError:
            return None
        self._found[sha256] = path
        return path

    def forget(self, sha256: str) -> None:
        """The copy went away (evicted by another process): read by ranges until it is back."""
        self._found.pop(sha256, None)

    def fill(self, store: Store, rel: str, sha256: str, size: int) -> None:
        """Starts fetching the shard into the cache in the background, unless it is there, too large, or another
        process (or thread) is fetching it."""
        self._reset_after_fork()
        if size > self.max_bytes or sha256 in self._filling or self.lookup(sha256, size) is not None:
            return
        self.dir.mkdir(parents=True, exist_ok=True)
        lock = self.dir / f"{sha256}.tar.lock"
        if not _take_lock(lock):
            return
        with self._lock:
            self._filling.add(sha256)
        thread = threading.Thread(
            target=self._fill, args=(store, rel, sha256, lock), name=f"shard-cache-{sha256[:8]}", daemon=True
        )
        thread.start()

    def _fill(self, store: Store, rel: str, sha256: str, lock: Path) -> None:
        tmp = self.dir / f"{sha256}.tar.{socket.gethostname()}.{os.getpid()}.tmp"
        try:
            t0 = time.perf_counter()
            store.download(rel, tmp)
            if file_sha256(tmp) != sha256:
                logger.warning(
                    "not caching %s: its sha256 differs from the manifest's (the shard changed in the store since it "
                    "was indexed; `pretrain data inspect` tells which)",
                    store.path(rel),
                )
                return
            mb = tmp.stat().st_size / 1e6
            os.replace(tmp, self.path(sha256))
            logger.info("cached %s (%.1f MB in %.1f s)", rel, mb, time.perf_counter() - t0)
            self._checked.pop(sha256, None)
            self.evict(keep=sha256)
        except Exception as e:  # a failed fill costs nothing: the shard is read by ranges meanwhile
            logger.warning("could not cache %s: %s: %s", store.path(rel), type(e).__name__, e)
        finally:
            tmp.unlink(missing_ok=True)
            lock.unlink(missing_ok=True)
            with self._lock:
                self._filling.discard(sha256)

    def evict(self, keep: str = "") -> list[Path]:
        """Removes least recently used shards until the cache holds at most ``max_bytes`` (never ``keep``), and
        temp files left by dead downloaders; returns the removed shards."""
        entries = []
        now = time.time()
        for p in self.dir.iterdir():
            try:
                st = p.stat()
            except OSError:
                continue
            if p.name.endswith(".tmp") and now - st.st_mtime > _STALE_TMP_S:
                p.unlink(missing_ok=True)
            elif p.name.endswith(".tar"):
                entries.append((st.st_mtime, st.st_size, p))
        total = sum(size for _, size, _ in entries)
        removed = []
        for _, size, p in sorted(entries):
            if total <= self.max_bytes:
                break
            if p.stem == keep:
                continue
            p.unlink(missing_ok=True)
            total -= size
            removed.append(p)
        if removed:
            logger.info("shard cache %s: removed %d least recently used shards", self.dir, len(removed))
        return removed


def _take_lock(lock: Path) -> bool:
    """Creates ``lock`` exclusively (content: host and pid); takes over a stale one. False: someone holds it."""
    for _ in range(2):
        try:
            fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            if not _stale(lock):
                return False
            lock.unlink(missing_ok=True)  # two processes may both do this: O_EXCL lets one of them win
            continue
        with os.fdopen(fd, "w") as f:
            f.write(f"{socket.gethostname()} {os.getpid()}\n")
        return True
    return False


def _stale(lock: Path) -> bool:
    try:
        host, pid = lock.read_text().split()
        age = time.time() - lock.stat().st_mtime
    except (OSError, ValueError):
        return True  # unreadable or half-written: its writer died between create and write
    if age > _STALE_LOCK_S:
        return True
    if host != socket.gethostname():
        return False
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return True
    except (PermissionError, ValueError):
        return False
    return False
