"""The index of one tar shard: where each sample's members start and how long they are, and what went wrong reading it.

Written once, read by every loader worker. Each shard has a stored index, ``DIR/.index/<shard name>.json`` (schema
below), written when the shard is made known to us: by ``pretrain data build`` as it writes the shard (it knows every
offset then, :mod:`data_pipeline.writer`), by ``pretrain data index`` for shards made by other tools
(:mod:`data_pipeline.wds_index`). A worker opening a shard parses that file instead of reading the tar's headers
(:func:`index_shard` with ``stored``); only its size is checked against the shard (one ``stat``).

The one tar reader left is ``tarfile`` (:func:`index_shard` without ``stored``), for what has no usable stored index:
shards ``pretrain data index`` reads for the first time, data sets built before stored indexes existed, a shard whose
size no longer matches its stored index (cut short or replaced after it was indexed), and one of our shards whose
stored index cannot be read. It reports what it finds wrong (``missing_shard``, ``empty_shard``, ``truncated_shard``
with the members intact before the break), which the stream counts per sample.

Members are grouped into samples by WebDataset's own rule (``webdataset.tariterators.base_plus_ext``, lower-cased
extension as its ``group_by_keys`` does): the key is the member's path up to the first dot of its file name, directory
prefix included. :func:`split_member_name` does the same without a regex or importing ``webdataset`` (which imports
torch) in every loader process; a test checks it against ``base_plus_ext``.

Stored index, ``DIR/.index/<shard name>.json``, version 1 (:func:`read_stored_shard` reads it,
:func:`write_stored_index` writes it)::

    {"version": 1, "shard": "train/a-000.tar", "bytes": int, "mtime_ns": int | null, "sha256": hex, "label": "cls",
     "classes_sha256": hex | null, "image_exts": {ext: n}, "skipped": {reason: n}, "label_counts": [[label, n], ...],
     "samples": [[key, label, image_ext, {ext: [offset_data, size]}], ...]}      # in tar order, every member

``label`` is the label rule (``cls``, ``txt``, ``json:FIELD``) and a sample's label an index into the classes or a
class name; ``classes_sha256`` is the sha256 of the class names joined by newlines (null: classes taken from the
labels). ``pretrain data build`` writes ``mtime_ns: null`` (its shards' bytes are reproducible, and so is their index:
a re-run keeps both byte for byte); ``pretrain data index`` records the mtime to skip unchanged shards on a re-run.
"""

from __future__ import annotations

import json
import os
import tarfile
from collections import Counter
from collections.abc import Iterable, Iterator
from contextlib import ExitStack, closing
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from data_pipeline.fsutil import fsync_dir
from data_pipeline.remote import StoreFile, Unreachable

__all__ = [
    "IMAGE_EXTS",
    "STORED_INDEX_DIR",
    "STORED_INDEX_VERSION",
    "ShardIndex",
    "StoredShard",
    "index_shard",
    "key_index",
    "pick_image",
    "encode_stored_index",
    "read_stored_entry",
    "read_stored_shard",
    "split_member_name",
    "stored_index_entry",
    "stored_index_name",
    "write_stored_index",
]


@dataclass
class ShardIndex:
    """Members of one shard by key: ``{key: {ext: (offset_data, size)}}`` plus what went wrong reading it."""

    members: dict[str, dict[str, tuple[int, int]]]
    problem: str | None  # missing_shard / empty_shard / truncated_shard: explains every key not in `members`
    detail: str
    foreign_keys: bool  # keys outside the shard's expected range: absent keys are key_mismatch


# Image extensions in order of preference: a sample with several images is read through the first one present.
IMAGE_EXTS = ("jpg", "jpeg", "png", "webp", "bmp", "ppm", "pgm", "tif", "tiff", "gif")
# Members that are never the image of a sample.
_NON_IMAGE_EXTS = frozenset({"cls", "json", "txt"})


def pick_image(exts: Iterable[str]) -> str | None:
    """The member a sample's image is read from: the first of :data:`IMAGE_EXTS` present, else the first member that
    is not a label or metadata (``cls``, ``json``, ``txt``), else None."""
    exts = list(exts)
    for ext in IMAGE_EXTS:
        if ext in exts:
            return ext
    others = [e for e in exts if e not in _NON_IMAGE_EXTS]
    return others[0] if others else None


def split_member_name(name: str) -> tuple[str | None, str | None]:
    """``(key, ext)`` of a tar member as WebDataset reads it (``base_plus_ext``: ``^((?:.*/|)[^.]+)[.]([^/]*)$``), ext
    lower-cased; ``(None, None)`` where that regex does not match (no dot in the file name, say)."""
    head, slash, tail = name.rpartition("/")
    stem, dot, ext = tail.partition(".")
    if not dot:
        return None, None
    if stem:
        return head + slash + stem, ext.lower()
    # A file name starting with a dot: the regex's [^.]+ then spans the folder's own name and slash, if dot-free.
    if slash and "." not in head.rpartition("/")[2]:
        return head + slash, ext.lower()
    return None, None


def index_shard(
    path: Path | StoreFile, expected: range | None, split: str, stored: StoredShard | None = None
) -> ShardIndex:
    """The members of one shard by key, from its stored index when its size matches the shard, else from a tar scan.

    Args:
        path: The shard: a local file, or a file of a remote store (its size asked once, its tar read by ranges).
        expected: The range of write indices a shard of ours holds (its keys are ``{split}_{index:08d}``; keys outside
            it make ``foreign_keys`` true); ``None`` for a shard indexed by ``pretrain data index``.
        split: The split (for ``expected``).
        stored: The shard's stored index, trusted for keys and offsets as long as its ``bytes`` is the shard's size:
            then the tar is not opened (and ``expected`` not checked: the caller checks our shards' stored keys).
            ``None``, or a size that differs: the tar is scanned with ``tarfile``.
    """
    if not isinstance(path, StoreFile):
        path = Path(path)
    try:
        size = path.stat().st_size if isinstance(path, Path) else path.size()
    except Unreachable as e:
        return ShardIndex({}, "unreachable_shard", str(e), False)
    except OSError as e:
        return ShardIndex({}, "missing_shard", f"{path}: {e.strerror or e}", False)
    if size == 0:
        return ShardIndex({}, "empty_shard", f"{path}: 0 bytes", False)
    if stored is not None and stored.bytes == size:
        if not stored.keys:
            return ShardIndex({}, "empty_shard", f"{path}: no samples in its stored index", False)
        # Keys as stored: a foreign shard's define them, ours were checked against the manifest's range.
        return ShardIndex(dict(zip(stored.keys, stored.members)), None, "", False)
    members, problem, detail = _group_members(path, size, _tarfile_members(path, size))
    if problem is None and not members:
        problem, detail = "empty_shard", f"{path}: no members"
    foreign = expected is not None and any(key_index(split, k) not in expected for k in members)
    return ShardIndex(members, problem, detail, foreign)


def _group_members(
    path: Path | StoreFile, size: int, entries: Iterator[tuple[str, int, int]]
) -> tuple[dict[str, dict[str, tuple[int, int]]], str | None, str]:
    """``({key: {ext: (offset_data, size)}}, problem, detail)`` from a shard's regular-file members, in tar order.

    ``entries`` raises what ``tarfile`` raises where the archive breaks, and :class:`_NoEndMarker` where it stops
    cleanly at the end of the file.
    """
    members: dict[str, dict[str, tuple[int, int]]] = {}
    with closing(entries):
        try:
            for name, offset, length in entries:
                key, ext = split_member_name(name)
                if key is None or ext is None:
                    continue
                if offset + length > size:
                    members.pop(key, None)  # the sample at the break is lost as a whole
                    return members, "truncated_shard", f"{path}: member {name} ends past the end of the file"
                members.setdefault(key, {})[ext] = (offset, length)
        except Unreachable as e:
            return {}, "unreachable_shard", str(e)
        except _NoEndMarker:
            # tarfile treats a file cut exactly between members as complete: the end-of-archive blocks tell.
            if members:
                return members, "truncated_shard", f"{path}: no end-of-archive marker after {len(members)} samples"
        except (tarfile.TarError, OSError, EOFError) as e:
            # Members indexed before the break are intact; a sample that lost members reports them as missing.
            return members, "truncated_shard", f"{path}: {type(e).__name__}: {e}"
    return members, None, ""


class _NoEndMarker(Exception):
    """The archive's last member ends exactly at the end of the file: no end-of-archive blocks follow."""


def _tarfile_members(path: Path | StoreFile, size: int) -> Iterator[tuple[str, int, int]]:
    """``(name, offset_data, size)`` of each regular file in the tar, read with ``tarfile`` (every tar format).

    Raises:
        _NoEndMarker: The last member ends at the end of the file (``tarfile`` itself takes that as a complete tar).
    """
    with ExitStack() as stack:
        if isinstance(path, Path):
            tar = stack.enter_context(tarfile.open(path, mode="r:"))
        else:  # a remote shard: tarfile reads its headers through a file that fetches blocks by range
            tar = stack.enter_context(tarfile.open(fileobj=stack.enter_context(path.open()), mode="r:"))
        for info in tar:
            if info.isfile():
                yield info.name, info.offset_data, info.size
        if tar.offset >= size:  # the header that was not there would have started at the end of the file
            raise _NoEndMarker


def key_index(split: str, key: str) -> int:
    """Write index encoded in ``key``, or -1 if the key is not ``{split}_{digits}``."""
    prefix, sep, digits = key.rpartition("_")
    return int(digits) if sep and prefix == split and digits.isdigit() else -1


# ---------------------------------------------------------------------------------------------------------------------
# Stored per-shard indexes (schema in the module docstring)

STORED_INDEX_DIR = ".index"
"""Folder of the data set that holds one stored index per shard: ``.index/<shard name>.json``."""
STORED_INDEX_VERSION = 1


def stored_index_name(shard_name: str) -> str:
    """Path of ``shard_name``'s stored index, relative to the data folder (``.index/train/a-000.tar.json``)."""
    return f"{STORED_INDEX_DIR}/{shard_name}.json"


@dataclass
class StoredShard:
    """What the stream reads from a stored index: the shard's size, and each sample's key, label (an index into the
    classes, or a class name), image extension and members ``{ext: (offset_data, size)}``, in tar order."""

    bytes: int
    keys: list[str]
    labels: list[int | str]
    images: list[str]
    members: list[dict[str, tuple[int, int]]]

    def __len__(self) -> int:
        return len(self.keys)


def read_stored_entry(path: Path | StoreFile) -> dict[str, Any]:
    """The parsed JSON object of a stored index of the version this code reads (a local file or a store's).

    Raises:
        OSError: It cannot be read (``FileNotFoundError``: no such file; ``Unreachable``: a store kept failing).
        ValueError: Not valid JSON, or not a version :data:`STORED_INDEX_VERSION` stored index.
    """
    try:
        raw = json.loads(path.read_bytes() if isinstance(path, StoreFile) else Path(path).read_bytes())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(raw, dict) or raw.get("version") != STORED_INDEX_VERSION:
        raise ValueError(f"{path}: not a version {STORED_INDEX_VERSION} stored shard index")
    return raw


def read_stored_shard(path: Path | StoreFile) -> StoredShard:
    """Reads the samples of a stored shard index, checking every entry's shape and that each member lies within the
    shard's recorded size.

    Raises:
        OSError: It cannot be read (``FileNotFoundError``: no such file).
        ValueError: Not a stored index of a version this code reads, or a malformed entry.
    """
    raw = read_stored_entry(path)
    size, samples = raw.get("bytes"), raw.get("samples")
    if not isinstance(size, int) or not isinstance(samples, list):
        raise ValueError(f"{path}: 'bytes' or 'samples' is missing")
    keys: list[str] = []
    labels: list[int | str] = []
    images: list[str] = []
    members: list[dict[str, tuple[int, int]]] = []
    try:
        for key, label, image, exts in samples:  # a plain loop: about 4x faster than comprehensions with all()
            spans: dict[str, tuple[int, int]] = {}
            for ext, (offset, n) in exts.items():
                if type(offset) is not int or type(n) is not int or offset < 0 or n < 0 or offset + n > size:
                    raise ValueError(f"sample {key}: member .{ext} is not within the shard's {size} bytes")
                spans[ext] = (offset, n)
            keys.append(key)
            labels.append(label)
            images.append(image)
            members.append(spans)
    except (IndexError, TypeError, KeyError, ValueError, AttributeError) as e:
        raise ValueError(f"{path}: malformed sample entry ({e})") from None
    if not all(isinstance(k, str) for k in keys) or not all(isinstance(e, str) for e in images):
        raise ValueError(f"{path}: a sample key or image extension is not a string")
    return StoredShard(size, keys, labels, images, members)


def stored_index_entry(
    *,
    shard: str,
    size: int,
    mtime_ns: int | None,
    sha256: str,
    label: str,
    classes_sha256: str | None,
    samples: list[list[Any]],
    skipped: dict[str, int] | None = None,
) -> dict[str, Any]:
    """A stored index (schema in the module docstring) of ``samples`` (``[key, label, image_ext, {ext: [offset,
    size]}]`` in tar order); the image-extension and label counts are taken from them, labels in sorted order."""
    labels = Counter(s[1] for s in samples)
    return {
        "version": STORED_INDEX_VERSION,
        "shard": shard,
        "bytes": size,
        "mtime_ns": mtime_ns,
        "sha256": sha256,
        "label": label,
        "classes_sha256": classes_sha256,
        "image_exts": dict(sorted(Counter(s[2] for s in samples).items())),
        "skipped": dict(sorted((skipped or {}).items())),
        "label_counts": [[lab, n] for lab, n in sorted(labels.items(), key=lambda kv: (isinstance(kv[0], str), kv[0]))],
        "samples": samples,
    }


def encode_stored_index(entry: dict[str, Any]) -> bytes:
    """The bytes of a stored index file: compact JSON in the entry's key order, one line."""
    return json.dumps(entry, separators=(",", ":")).encode("utf-8") + b"\n"


def write_stored_index(path: Path, entry: dict[str, Any]) -> bool:
    """Writes a stored index atomically (temp file, fsync, rename, fsync of the folder) unless ``path`` already holds
    exactly these bytes; returns whether it wrote."""
    data = encode_stored_index(entry)
    try:
        if path.read_bytes() == data:
            return False
    except OSError:
        pass
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_dir(path.parent)
    return True
