"""Data locations: a local folder or a remote prefix (``s3://bucket/prefix``, ``https://host/path``), one interface.

Remote locations are read and written through fsspec (s3fs for ``s3://``, fsspec's aiohttp filesystem for
``http(s)://``; any other protocol fsspec knows works where its package is installed). We do not talk HTTP ourselves:
fsspec does the requests, the signing (botocore) and the connection pooling. What we add is what a training loader
needs around it and fsspec does not do:

- one retry policy for every request, with exponential backoff and jitter, that counts what it retried: fsspec's
  filesystems retry some errors silently (s3fs 5 times, botocore its own attempts on top), so their own retries are
  turned off (``retries=1`` on the s3fs instance, ``total_max_attempts=1`` for botocore) and :class:`Store` retries,
  so that every re-sent request is counted (the stream reports the counts with the batches, the loader puts them in
  the metrics and the checkpoint, as it does for corrupt samples);
- transient (5xx, 408/429, resets, timeouts, dropped connections) and permanent errors told apart
  (:func:`is_transient`): a missing object is a ``FileNotFoundError`` at once, a request that kept failing
  transiently raises :class:`Unreachable` after ``attempts`` tries;
- concurrent range reads (:meth:`Store.read_ranges`, fsspec's ``cat_ranges``: all of a batch's samples are requested
  at once on the filesystem's event loop), each checked to be exactly the bytes asked for (a server that ignores
  ``Range`` sends the whole object: that is refused, by name);
- atomic writes for local folders (temp file, fsync, rename, fsync of the folder); an object store's PUT is atomic.

Credentials and endpoints come the standard way: for S3 the AWS environment variables and files
(``AWS_ACCESS_KEY_ID``, ``AWS_PROFILE``, ``~/.aws/credentials``, ``AWS_ENDPOINT_URL`` for S3-compatible stores such
as MinIO, Ceph or R2), read by botocore, plus fsspec's own per-protocol defaults (``FSSPEC_S3_*`` variables), plus the
optional ``storage_options`` mapping (``data.storage_options``), passed to the filesystem. A mapping keyed by protocol
(``{"s3": {...}, "https": {...}}``) gives each protocol its own options, for a manifest in one store that names
shards in another.
"""

from __future__ import annotations

import logging
import os
import random
import re
import shutil
import tempfile
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO, TypeVar

from data_pipeline.fsutil import write_file_inside

__all__ = [
    "RangeNotSupported",
    "RetryPolicy",
    "Store",
    "StoreFile",
    "Unreachable",
    "is_remote",
    "is_transient",
    "join_location",
    "temp_download_dir",
]

logger = logging.getLogger(__name__)

T = TypeVar("T")

_URL = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*)://")
# Seconds before a connection attempt or a read that gets no byte gives up (then retried); fsspec's defaults wait
# minutes, which a loader worker must not.
_CONNECT_TIMEOUT_S = 10
_READ_TIMEOUT_S = 60
# Retry notes kept per process between two takes: the counts are exact, the details only a sample of them.
_MAX_NOTES = 64
_INHERITED: list[Any] = []  # filesystems a forked process got from its parent (see Store.fs)


def is_remote(location: str | os.PathLike) -> bool:
    """Whether ``location`` is a URL read through fsspec (``s3://``, ``https://``, ...); ``file://`` and paths are
    local."""
    m = _URL.match(str(location))
    return m is not None and m.group(1).lower() != "file"


def join_location(location: str | os.PathLike, rel: str) -> str:
    """``location/rel`` as a string, a URL's ``//`` kept (``Path`` would turn ``s3://b`` into ``s3:/b``)."""
    if is_remote(location):
        return f"{str(location).rstrip('/')}/{rel}"
    return str(Path(location) / rel)


class Unreachable(OSError):
    """A remote object that failed transiently on every attempt (5xx, resets, timeouts); the message says why."""


class RangeNotSupported(OSError):
    """The server answered a byte-range request with more than the range: it ignores HTTP ``Range``."""


def _status(e: BaseException) -> int | None:
    """The HTTP status behind an error, if any (aiohttp's ``status``, botocore's ``response``), following causes."""
    seen = 0
    cur: BaseException | None = e
    while cur is not None and seen < 8:
        status = getattr(cur, "status", None)
        if isinstance(status, int):
            return status
        response = getattr(cur, "response", None)
        if isinstance(response, dict):
            code = response.get("ResponseMetadata", {}).get("HTTPStatusCode")
            if isinstance(code, int):
                return code
        cur = cur.__cause__ or cur.__context__
        seen += 1
    return None


def is_transient(e: BaseException) -> bool:
    """Whether retrying the request may succeed: a 5xx, 408 or 429 answer, a timeout, a reset or dropped connection,
    an error of the HTTP stack (aiohttp, botocore); not a missing object, a refused permission or another 4xx."""
    if isinstance(e, (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError, RangeNotSupported)):
        return False
    status = _status(e)
    if status is not None:
        return status >= 500 or status in (408, 429)
    if isinstance(e, (OSError, TimeoutError, ConnectionError, EOFError)):
        return True
    module = type(e).__module__ or ""
    return module.split(".")[0] in ("aiohttp", "botocore", "aiobotocore", "urllib3", "fsspec")


@dataclass(frozen=True)
class RetryPolicy:
    """``attempts`` tries in all per request; the wait before try ``k + 1`` is ``min(max_delay_s, first_delay_s *
    2**(k - 1))`` times a random factor in [0.5, 1) (jitter: ranks that failed together do not retry together)."""

    attempts: int = 6
    first_delay_s: float = 0.25
    max_delay_s: float = 8.0

    def delay(self, attempt: int) -> float:
        return min(self.max_delay_s, self.first_delay_s * 2 ** (attempt - 1)) * random.uniform(0.5, 1.0)


def _options_for(protocol: str, storage_options: Mapping[str, Any] | None) -> dict[str, Any]:
    """The options of one protocol: the ``protocol`` entry of a mapping keyed by protocol, else the mapping itself."""
    opts = dict(storage_options or {})
    keyed = {k: v for k, v in opts.items() if k in ("s3", "s3a", "http", "https", "gs", "gcs", "az", "abfs")}
    if keyed and all(isinstance(v, Mapping) for v in keyed.values()):
        entry = keyed.get(protocol) or keyed.get({"s3a": "s3", "https": "http"}.get(protocol, "")) or {}
        return dict(entry)
    return opts


def _merge(base: dict[str, Any], update: Mapping[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in update.items():
        out[k] = _merge(out[k], v) if isinstance(v, Mapping) and isinstance(out.get(k), dict) else v
    return out


def _import_filesystem(protocol: str) -> None:
    """Imports the protocol's fsspec implementation now, so that DataLoader workers forked later have it loaded (a
    worker importing aiohttp and botocore itself adds a second or so to its first batch)."""
    import fsspec

    try:
        fsspec.get_filesystem_class(protocol)
    except (ImportError, ValueError):
        pass  # reported by _filesystem when the filesystem is made


def _filesystem(protocol: str, options: Mapping[str, Any]) -> Any:
    """A fresh fsspec filesystem (not fsspec's instance cache: one per process, made after a DataLoader fork) with
    our timeouts and its own retries off (see the module docstring); ``options`` override the defaults."""
    import fsspec

    opts = dict(options)
    if protocol in ("s3", "s3a"):
        timeouts = {"connect_timeout": _CONNECT_TIMEOUT_S, "read_timeout": _READ_TIMEOUT_S}
        opts = _merge({"config_kwargs": {**timeouts, "retries": {"total_max_attempts": 1}}}, opts)
    elif protocol in ("http", "https"):
        import aiohttp

        client = dict(opts.get("client_kwargs") or {})
        timeout = client.get("timeout", _READ_TIMEOUT_S)
        if isinstance(timeout, (int, float)):  # YAML cannot hold an aiohttp.ClientTimeout
            client["timeout"] = aiohttp.ClientTimeout(total=None, sock_connect=_CONNECT_TIMEOUT_S, sock_read=timeout)
        opts["client_kwargs"] = client
    try:
        fs = fsspec.filesystem(protocol, skip_instance_cache=True, **opts)
    except ImportError as e:
        raise ValueError(f"{protocol}:// locations need a package fsspec names: {e}") from None
    if protocol in ("s3", "s3a") and hasattr(fs, "retries"):
        fs.retries = 1  # s3fs's own retry loop: once, so that every retry is ours and counted
    return fs


class Store:
    """A data location: a local folder, or a remote prefix read and written through fsspec, with retries.

    Paths inside it are relative names with ``/`` (``train/shard-000000.tar``). Local stores do what the code always
    did (``pathlib``, atomic renames); remote ones go through one fsspec filesystem per process.

    Args:
        location: A folder, or a URL (``s3://bucket/prefix``, ``https://host/path``).
        storage_options: fsspec options (see the module docstring); ignored for local folders.
        retry: The retry policy of remote requests.
    """

    def __init__(
        self,
        location: str | os.PathLike,
        storage_options: Mapping[str, Any] | None = None,
        retry: RetryPolicy | None = None,
    ):
        loc = str(location)
        self.remote = is_remote(loc)
        self.storage_options = dict(storage_options or {})
        self.retry = retry or RetryPolicy()
        if self.remote:
            self.protocol = _URL.match(loc).group(1).lower()  # type: ignore[union-attr]
            self.url = loc.rstrip("/")
            _import_filesystem(self.protocol)
        else:
            self.protocol = "file"
            self.url = loc[len("file://") :] if loc.startswith("file://") else loc
        self.retries = 0  # requests re-sent after a transient error, in this process
        self._notes: list[str] = []
        self._lock = threading.Lock()
        self._fs: Any = None
        self._fs_pid = -1

    def __repr__(self) -> str:
        return f"Store({self.url!r})"

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_fs"], state["_fs_pid"], state["_lock"] = None, -1, None
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._lock = threading.Lock()

    def with_location(self, location: str | os.PathLike) -> Store:
        """Another location with this one's storage options and retry policy."""
        return Store(location, self.storage_options, self.retry)

    # -- names ---------------------------------------------------------------------------------------------------

    def path(self, rel: str = "") -> str:
        """The full path or URL of ``rel`` (for messages and for fsspec)."""
        return join_location(self.url, rel) if rel else self.url

    def local(self, rel: str = "") -> Path:
        """The local path of ``rel`` (local stores only)."""
        assert not self.remote, "local() on a remote store"
        return Path(self.url) / rel if rel else Path(self.url)

    def file(self, rel: str) -> StoreFile:
        return StoreFile(self, rel)

    @property
    def fs(self) -> Any:
        """This process's fsspec filesystem (a forked DataLoader worker makes its own)."""
        if self._fs is None or self._fs_pid != os.getpid():
            if self._fs is not None:
                # The parent's filesystem, copied by fork: its finalizer would close its session on the parent's
                # event loop, which does not run here (asyncio errors at exit). Keep it alive instead.
                _INHERITED.append(self._fs)
            self._fs = _filesystem(self.protocol, _options_for(self.protocol, self.storage_options))
            self._fs_pid = os.getpid()
        return self._fs

    # -- retries -------------------------------------------------------------------------------------------------

    def _note_retry(self, what: str, e: BaseException, attempt: int) -> None:
        with self._lock:
            self.retries += 1
            if len(self._notes) < _MAX_NOTES:
                self._notes.append(f"{what}: {type(e).__name__}: {str(e)[:200]} (attempt {attempt})")
        logger.debug("retrying %s after %s: %s", what, type(e).__name__, e)

    def take_retries(self) -> list[str]:
        """One note per request re-sent since the last take (a detail for the first ones, then just ``what``)."""
        with self._lock:
            n, notes = self.retries, self._notes
            self.retries, self._notes = 0, []
        return notes + ["(detail dropped)"] * (n - len(notes))

    def call(self, what: str, fn: Callable[[], T]) -> T:
        """``fn()`` with the retry policy: transient errors are retried (and counted), others raised at once.

        Raises:
            Unreachable: Every attempt failed transiently; the message names ``what`` and the last error.
        """
        attempts = max(1, self.retry.attempts)
        for attempt in range(1, attempts + 1):
            try:
                return fn()
            except Exception as e:
                if not is_transient(e):
                    raise
                if attempt == attempts:
                    raise Unreachable(f"{what}: {type(e).__name__}: {str(e)[:300]} (failed {attempts} times)") from e
                self._note_retry(what, e, attempt)
                time.sleep(self.retry.delay(attempt))
        raise AssertionError("unreachable")  # pragma: no cover

    # -- reading -------------------------------------------------------------------------------------------------

    def read_bytes(self, rel: str) -> bytes:
        """The whole object or file ``rel`` (``FileNotFoundError`` when there is none)."""
        if not self.remote:
            return self.local(rel).read_bytes()
        path = self.path(rel)
        return self.call(path, lambda: self.fs.cat_file(path))

    def info(self, rel: str) -> tuple[int, int | None]:
        """``(size in bytes, modification time in ns or None when the store does not say)``."""
        if not self.remote:
            st = self.local(rel).stat()
            return st.st_size, st.st_mtime_ns
        path = self.path(rel)
        meta = self.call(path, lambda: self.fs.info(path))
        if meta.get("type") == "directory":
            raise IsADirectoryError(f"{path} is a folder")
        size = meta.get("size")
        if not isinstance(size, int):
            raise OSError(f"{path}: the server does not say its size")
        mtime = meta.get("LastModified") or meta.get("Last-Modified") or meta.get("mtime")
        return size, _mtime_ns(mtime)

    def size(self, rel: str) -> int:
        return self.info(rel)[0]

    def exists(self, rel: str = "") -> bool:
        if not self.remote:
            return self.local(rel).exists()
        path = self.path(rel)
        try:
            return bool(self.call(path, lambda: self.fs.exists(path)))
        except FileNotFoundError:
            return False

    def read_ranges(self, requests: Sequence[tuple[str, int, int]]) -> list[bytes | OSError]:
        """The bytes ``[offset, offset + size)`` of each ``(rel, offset, size)``, or the ``OSError`` that ended it.

        Remote: all requested at once (fsspec ``cat_ranges``), the failed ones retried together with backoff;
        local: read in turn. A range that comes back longer than asked (a server ignoring ``Range``) is a
        :class:`RangeNotSupported`; a shorter one, an ``OSError`` (the object is shorter than its index says).
        """
        if not requests:
            return []
        if not self.remote:
            return [self._read_local(rel, offset, size) for rel, offset, size in requests]
        out: list[bytes | OSError | None] = [None] * len(requests)
        todo = list(range(len(requests)))
        attempts = max(1, self.retry.attempts)
        for attempt in range(1, attempts + 1):
            paths = [self.path(requests[i][0]) for i in todo]
            starts = [requests[i][1] for i in todo]
            ends = [requests[i][1] + requests[i][2] for i in todo]
            try:
                got = self.fs.cat_ranges(paths, starts, ends, on_error="return")
            except Exception as e:  # the whole call failed (its event loop, say): every range failed alike
                got = [e] * len(todo)
            retry = []
            for i, data in zip(todo, got):
                rel, offset, size = requests[i]
                if not isinstance(data, BaseException):
                    out[i] = _checked_range(self.path(rel), data, offset, size)
                elif not is_transient(data):
                    out[i] = data if isinstance(data, OSError) else OSError(f"{self.path(rel)}: {data!r}")
                elif attempt == attempts:
                    msg = f"{self.path(rel)}: {type(data).__name__}: {str(data)[:300]} (failed {attempts} times)"
                    out[i] = Unreachable(msg)
                else:
                    self._note_retry(self.path(rel), data, attempt)
                    retry.append(i)
            if not retry:
                break
            todo = retry
            time.sleep(self.retry.delay(attempt))
        return out  # type: ignore[return-value] - every slot is set by the last attempt

    def _read_local(self, rel: str, offset: int, size: int) -> bytes | OSError:
        try:
            with open(self.local(rel), "rb") as f:
                f.seek(offset)
                data = f.read(size)
        except OSError as e:
            return e
        return _checked_range(self.path(rel), data, offset, size)

    def open(self, rel: str) -> BinaryIO:
        """A seekable binary file of ``rel`` (remote: fsspec's, reading ahead in blocks)."""
        if not self.remote:
            return open(self.local(rel), "rb")  # noqa: SIM115 - the caller closes it
        path = self.path(rel)
        return self.call(path, lambda: self.fs.open(path, "rb", block_size=1 << 20))

    def download(self, rel: str, dest: Path) -> None:
        """Copies ``rel`` to the local file ``dest`` (streamed; a transient failure restarts the copy)."""
        if not self.remote:
            shutil.copyfile(self.local(rel), dest)
            return
        path = self.path(rel)
        self.call(path, lambda: self.fs.get_file(path, str(dest)))

    # -- listing -------------------------------------------------------------------------------------------------

    def _rel(self, full: str) -> str:
        """``full`` (a path as fsspec lists it, without protocol) relative to this location."""
        root = self.fs._strip_protocol(self.url).rstrip("/")
        full = self.fs._strip_protocol(full)
        return full[len(root) + 1 :] if full.startswith(root + "/") else full

    def glob(self, pattern: str) -> list[str]:
        """Names (relative, ``/``-separated) of the files matching ``pattern`` (a glob relative to this location).

        Raises:
            ValueError: A remote location that cannot be listed (plain HTTP servers often cannot).
        """
        if not self.remote:
            root = self.local()
            return sorted(p.relative_to(root).as_posix() for p in root.glob(pattern) if p.is_file())
        full = self.path(pattern)
        try:
            found = self.call(f"listing {full}", lambda: self.fs.glob(full, detail=True))
        except (NotImplementedError, FileNotFoundError, ValueError) as e:
            raise self._listing_error(e) from None
        return sorted(self._rel(name) for name, meta in found.items() if meta.get("type", "file") == "file")

    def subfolders(self) -> list[str]:
        """Names of the folders directly under this location."""
        if not self.remote:
            return sorted(p.name for p in self.local().iterdir() if p.is_dir())
        try:
            entries = self.call(f"listing {self.url}", lambda: self.fs.ls(self.url, detail=True))
        except (NotImplementedError, FileNotFoundError, ValueError) as e:
            raise self._listing_error(e) from None
        names = (self._rel(e["name"]).rstrip("/") for e in entries if e.get("type") == "directory")
        return sorted(n for n in names if n and "/" not in n)

    def _listing_error(self, e: BaseException) -> Exception:
        if isinstance(e, FileNotFoundError) and self.protocol not in ("http", "https"):
            return FileNotFoundError(f"{self.url} does not exist (or holds nothing)")
        return ValueError(_no_listing(self.url, e))

    def is_folder(self) -> bool:
        """Local: an existing folder; remote: a prefix holding something (HTTP: the server answers for it)."""
        if not self.remote:
            return self.local().is_dir()
        try:
            return bool(self.call(self.url, lambda: self.fs.isdir(self.url))) or self.exists("manifest.json")
        except (FileNotFoundError, PermissionError):
            return False

    # -- writing -------------------------------------------------------------------------------------------------

    @property
    def writable(self) -> bool:
        """Whether this kind of location takes writes at all (HTTP(S) does not; S3 may still refuse, per bucket)."""
        return not self.remote or self.protocol not in ("http", "https")

    def write_bytes(self, rel: str, data: bytes) -> None:
        """Writes ``rel`` atomically: local via temp file, fsync and rename, never outside the folder (through ``..``
        or a symbolic link: ``PermissionError``); remote as one PUT."""
        if not self.remote:
            write_file_inside(self.local(), rel, data)
            return
        if rel.startswith("/") or ".." in rel.split("/"):
            raise PermissionError(f"refusing to write {rel!r}: not a path inside {self.url}")
        path = self.path(rel)
        self.call(path, lambda: self.fs.pipe_file(path, data))

    def upload(self, local: Path, rel: str) -> None:
        """Copies the local file ``local`` to ``rel`` (remote: one upload, multipart for large files)."""
        if not self.remote:
            self.write_bytes(rel, Path(local).read_bytes())
            return
        path = self.path(rel)
        self.call(path, lambda: self.fs.put_file(str(local), path))

    def remove(self, rel: str) -> None:
        if not self.remote:
            self.local(rel).unlink(missing_ok=True)
            return
        path = self.path(rel)
        try:
            self.call(path, lambda: self.fs.rm_file(path))
        except FileNotFoundError:
            pass

    def check_writable(self) -> None:
        """Writes and removes a small probe object, so a refused write shows before any work.

        Raises:
            PermissionError: The location cannot be written (HTTP(S) never can).
        """
        if not self.writable:
            raise PermissionError(f"{self.url} is read-only ({self.protocol}:// takes no writes)")
        probe = f".index/.write-check-{os.getpid()}"
        try:
            self.write_bytes(probe, b"")
        except OSError as e:
            raise PermissionError(f"{self.url} cannot be written ({type(e).__name__}: {e})") from e
        try:
            self.remove(probe)
        except OSError:
            pass  # a store that lets us write but not delete: the empty probe stays under .index/


class StoreFile:
    """One file of a :class:`Store` (a shard, a stored index): what :mod:`data_pipeline.shard_index` reads."""

    def __init__(self, store: Store, rel: str):
        self.store, self.rel = store, rel

    def __str__(self) -> str:
        return self.store.path(self.rel)

    def __repr__(self) -> str:
        return f"StoreFile({self.store.path(self.rel)!r})"

    @property
    def name(self) -> str:
        return self.rel.rpartition("/")[2]

    def size(self) -> int:
        return self.store.size(self.rel)

    def open(self) -> BinaryIO:
        return self.store.open(self.rel)

    def read_bytes(self) -> bytes:
        return self.store.read_bytes(self.rel)


def _checked_range(where: str, data: bytes, offset: int, size: int) -> bytes | OSError:
    """``data`` if it is the ``size`` bytes asked for, else the error saying why it is not."""
    if len(data) == size:
        return data
    if len(data) > size:
        return RangeNotSupported(
            f"{where}: asked for {size} bytes at {offset}, got {len(data)}: the server ignores HTTP Range requests; "
            "serve the shards from one that answers them (S3, nginx, most CDNs), or set data.cache_dir so each shard "
            "is fetched whole once",
        )
    return OSError(f"{where}: short read: {len(data)} of {size} bytes at offset {offset}")


def _mtime_ns(value: Any) -> int | None:
    """A listing's modification time (datetime, epoch seconds, or an HTTP date string) in ns, or None."""
    if value is None:
        return None
    if hasattr(value, "timestamp"):
        return int(value.timestamp() * 1e9)
    if isinstance(value, (int, float)):
        return int(value * 1e9)
    if isinstance(value, str):
        from email.utils import parsedate_to_datetime

        try:
            return int(parsedate_to_datetime(value).timestamp() * 1e9)
        except (TypeError, ValueError):
            return None
    return None


def _no_listing(url: str, e: BaseException) -> str:
    return (
        f"cannot list {url} ({type(e).__name__}: {e}); many HTTP servers give no folder listing: name the shards "
        "with a brace list instead, e.g. --split-glob train='train/shard-{000000..000099}.tar'"
    )


def temp_download_dir() -> Path:
    """A private temp folder for shards fetched whole (index, inspect); the caller removes it."""
    return Path(tempfile.mkdtemp(prefix="pretrain-remote-"))
