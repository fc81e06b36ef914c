"""The index of one tar shard: where each sample's members start and how long they are, and what went wrong reading it.

Written once, read by every loader worker. Each shard has a stored index, ``DIR/.index/<shard name>.json`` (schema
below), written when the shard is made known to us: by ``pretrain data build`` as it writes the shard (it knows every
offset then, :mod:`data_pipeline.writer`), by ``pretrain data index`` for shards made by other tools
(:mod:`data_pipeline.indexer`). A worker opening a shard parses that file instead of reading the tar's headers
(:func:`index_shard` with ``stored``); only its size is checked against the shard (one ``stat``).

The one tar reader left is ``tarfile`` (:func:`index_shard` without ``stored``), for what has no usable stored index:
shards ``pretrain data index`` reads for the first time, data sets built before stored indexes existed, a shard whose
size no longer matches its stored index (cut short or replaced after it was indexed), and one of our shards whose
stored index cannot be read. It reports what it finds wrong (``missing_shard``, ``empty_shard``, ``truncated_shard``
with the members intact before the break), which the stream counts per sample. ``tarfile`` takes the first header it
cannot read (cut short, a bad checksum, a field that does not parse) for the end of the archive, and so does
WebDataset's reader; a tar really ends with two zero blocks. So after the last member the scan checks that the rest of
the file is those blocks and zero padding, and reports anything else (a cut inside a header or right after a member, a
damaged header, bytes after the end marker such as a second tar appended with ``cat``) as ``truncated_shard``.

Nothing in a stored index is taken on trust: the manifest records each stored index's sha256, checked against the
bytes read (:func:`read_stored_shard` with ``sha256``; a mismatch is :class:`IndexChanged`), and a reader that seeks
to a member through it reads the member's tar header too (the 512 bytes before its data) and checks that it names the
sample's key and extension with the stored size (:func:`member_header_problem`), so an offset that points at another
member is caught at the read.

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

import hashlib
import json
import tarfile
from collections import Counter
from collections.abc import Iterable, Iterator
from contextlib import ExitStack, closing
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from data_pipeline.fsutil import write_file_inside
from data_pipeline.remote import StoreFile, Unreachable

__all__ = [
    "IMAGE_EXTS",
    "STORED_INDEX_DIR",
    "STORED_INDEX_VERSION",
    "TAR_HEADER_BYTES",
    "IndexChanged",
    "ShardIndex",
    "StoredShard",
    "index_digest",
    "index_shard",
    "key_index",
    "member_header_problem",
    "pick_image",
    "encode_stored_index",
    "parse_stored_entry",
    "read_stored_entry",
    "read_stored_shard",
    "stored_shard_of",
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

    ``entries`` raises what ``tarfile`` raises where the archive breaks, and :class:`_BadEnd` where what follows the
    last member is not the end-of-archive marker.
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
        except _BadEnd as e:
            return members, "truncated_shard", f"{path}: after {len(members)} samples, {e}"
        except (tarfile.TarError, OSError, EOFError) as e:
            # Members indexed before the break are intact; a sample that lost members reports them as missing.
            return members, "truncated_shard", f"{path}: {type(e).__name__}: {e}"
    return members, None, ""


class _BadEnd(Exception):
    """What follows the archive's last member is not the end-of-archive marker (two zero blocks, zero padding)."""


_BLOCK = tarfile.BLOCKSIZE
_MAX_TAIL = 1 << 20  # zero padding after the end marker: a record (10 KiB by default; tar -b 2048 makes 1 MiB)


def _end_problem(f: Any, end: int, size: int) -> str | None:
    """Why the bytes ``[end, size)`` of the tar, after its last member, are not a clean end of the archive; None when
    they are two zero blocks plus zero padding."""
    tail_bytes = size - end
    if tail_bytes == 0:
        return "the file ends right after a member, without the end-of-archive blocks (cut between members)"
    if tail_bytes > _MAX_TAIL:
        return f"{tail_bytes} bytes follow the last readable member at byte {end} (a damaged header, or tars joined)"
    f.seek(end)
    tail = f.read(tail_bytes)
    if len(tail) < _BLOCK:
        return f"the file ends {len(tail)} bytes into the header at byte {end} (cut inside a header)"
    if tail[:_BLOCK].count(0) != _BLOCK:
        return f"the header at byte {end} cannot be read (bad checksum or fields: damaged, or cut and rewritten)"
    if len(tail) < 2 * _BLOCK:
        return f"the file ends inside the end-of-archive blocks at byte {end} (cut)"
    if tail.count(0) != len(tail):
        return (
            f"bytes other than zeros after the end-of-archive marker at byte {end} (tars joined with cat? members "
            "after the marker are never read; join them with tar --concatenate)"
        )
    return None


def _tarfile_members(path: Path | StoreFile, size: int) -> Iterator[tuple[str, int, int]]:
    """``(name, offset_data, size)`` of each regular file in the tar, read with ``tarfile`` (every tar format).

    Raises:
        _BadEnd: What follows the last member is not a clean end of the archive (``tarfile`` stops silently at the
            first header it cannot read, and takes a file cut between members for a complete tar).
    """
    with ExitStack() as stack:
        if isinstance(path, Path):
            tar = stack.enter_context(tarfile.open(path, mode="r:"))
        else:  # a remote shard: tarfile reads its headers through a file that fetches blocks by range
            tar = stack.enter_context(tarfile.open(fileobj=stack.enter_context(path.open()), mode="r:"))
        for info in tar:
            if info.isfile():
                yield info.name, info.offset_data, info.size
        problem = _end_problem(tar.fileobj, tar.offset, size)
        if problem is not None:
            raise _BadEnd(problem)


TAR_HEADER_BYTES = _BLOCK
"""Bytes of the tar header right before a member's data, read with the member to check it is the sample's."""


def _substituted_name_matches(found: str, want: str) -> bool:
    """Whether ``found``, the name in a member's ustar header, can stand for ``want`` where writers substitute it (a
    name past 100 bytes: GNU and pax keep the real one in an extra header; non-ASCII in pax): a prefix of it or of
    its file name, letters in any case, ``?`` and undecodable bytes matching any character."""
    if len(want.encode("utf-8", "surrogateescape")) <= 100 and want.isascii():
        return False  # stored as it is: only the exact name is that member

    def prefix(a: str, b: str) -> bool:
        return 0 < len(a) <= len(b) and all(
            x.lower() == y.lower() or x == "?" or "\udc80" <= x <= "\udcff" for x, y in zip(a, b)
        )

    return prefix(found, want) or prefix(found.rpartition("/")[2], want.rpartition("/")[2])


def _plain_header_is(header: bytes, key: str, ext: str, size: int) -> bool:
    """The common case of :func:`member_header_problem` in a few microseconds: a ustar/GNU header of a regular file
    whose checksum, octal size and name (with the ustar prefix) say exactly ``key.ext`` of ``size`` bytes. False
    means "not shown here", not "wrong": the caller then parses the header fully."""
    if len(header) != _BLOCK or header[156:157] not in (b"0", b"\0", b"7") or header[124] & 0x80:
        return False
    try:
        recorded = int(header[148:156].replace(b"\0", b" ").strip() or b"x", 8)
        member_size = int(header[124:136].replace(b"\0", b" ").strip() or b"0", 8)
    except ValueError:
        return False
    if recorded != sum(header) - sum(header[148:156]) + 256 or member_size != size:  # checksum: its field as spaces
        return False
    name = header[:100].partition(b"\0")[0]
    if header[257:262] == b"ustar" and header[345] != 0:
        name = header[345:500].partition(b"\0")[0] + b"/" + name
    return split_member_name(name.decode("utf-8", "surrogateescape")) == (key, ext)


def member_header_problem(header: bytes, key: str, ext: str, size: int) -> str | None:
    """Why the tar header read right before a member's data (:data:`TAR_HEADER_BYTES`) is not that of the member
    ``key.ext`` of ``size`` bytes (the stored index points elsewhere); None when it is."""
    if _plain_header_is(header, key, ext, size):
        return None
    try:
        info = tarfile.TarInfo.frombuf(header, "utf-8", "surrogateescape")
    except tarfile.HeaderError as e:
        return f"no tar header before its data ({e})"
    if info.isfile() and info.size == size:
        if split_member_name(info.name) == (key, ext) or _substituted_name_matches(info.name, f"{key}.{ext}"):
            return None
    return f"the member there is {info.name!r} ({info.size} bytes), not {key}.{ext} ({size} bytes)"


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


class IndexChanged(ValueError):
    """A stored index whose sha256 is not the one the manifest recorded: it changed after the manifest was written
    (edited, damaged, or rewritten by a run that did not finish)."""


def index_digest(data: bytes) -> str:
    """The sha256 the manifest records for a stored index file's bytes."""
    return hashlib.sha256(data).hexdigest()


def read_stored_entry(path: Path | StoreFile, sha256: str | None = None) -> dict[str, Any]:
    """The parsed JSON object of a stored index of the version this code reads (a local file or a store's).

    Args:
        path: The stored index.
        sha256: The digest the manifest recorded for it; checked before anything is parsed (None: not checked).

    Raises:
        OSError: It cannot be read (``FileNotFoundError``: no such file; ``Unreachable``: a store kept failing).
        IndexChanged: Its bytes are not those whose ``sha256`` the manifest recorded.
        ValueError: Not valid JSON, or not a version :data:`STORED_INDEX_VERSION` stored index.
    """
    data = path.read_bytes() if isinstance(path, StoreFile) else Path(path).read_bytes()
    if sha256 is not None and index_digest(data) != sha256:
        raise IndexChanged(
            f"{path}: its sha256 {index_digest(data)[:12]}... is not the {sha256[:12]}... the manifest recorded: the "
            "stored index changed after the manifest was written"
        )
    return parse_stored_entry(data, str(path))


def parse_stored_entry(data: bytes, where: str) -> dict[str, Any]:
    """:func:`read_stored_entry` of bytes already read (``where`` names them in messages)."""
    try:
        raw = json.loads(data)
    except (ValueError, RecursionError) as e:  # JSONDecodeError, bad UTF-8, a number past int's digit limit, nesting
        raise ValueError(f"{where}: not valid JSON ({type(e).__name__}: {str(e)[:200]})") from None
    if not isinstance(raw, dict) or raw.get("version") != STORED_INDEX_VERSION:
        raise ValueError(f"{where}: not a version {STORED_INDEX_VERSION} stored shard index")
    return raw


def read_stored_shard(path: Path | StoreFile, sha256: str | None = None) -> StoredShard:
    """Reads the samples of a stored shard index, checking its digest (when ``sha256`` is given), every entry's shape
    and that each member lies within the shard's recorded size, after a tar header.

    Raises:
        OSError: It cannot be read (``FileNotFoundError``: no such file).
        IndexChanged: Its bytes are not those whose ``sha256`` the manifest recorded.
        ValueError: Not a stored index of a version this code reads, or a malformed entry.
    """
    return stored_shard_of(read_stored_entry(path, sha256), str(path))


def stored_shard_of(raw: dict[str, Any], where: str) -> StoredShard:
    """The samples of a parsed stored index, each entry's shape and member spans checked (see
    :func:`read_stored_shard`)."""
    size, samples = raw.get("bytes"), raw.get("samples")
    if type(size) is not int or not isinstance(samples, list):
        raise ValueError(f"{where}: 'bytes' or 'samples' is missing")
    keys: list[str] = []
    labels: list[int | str] = []
    images: list[str] = []
    members: list[dict[str, tuple[int, int]]] = []
    try:
        for key, label, image, exts in samples:  # a plain loop: about 4x faster than comprehensions with all()
            spans: dict[str, tuple[int, int]] = {}
            for ext, (offset, n) in exts.items():
                if type(offset) is not int or type(n) is not int or offset < _BLOCK or n < 0 or offset + n > size:
                    raise ValueError(f"sample {key}: member .{ext} is not within the shard's {size} bytes")
                spans[ext] = (offset, n)
            keys.append(key)
            labels.append(label)
            images.append(image)
            members.append(spans)
    except (IndexError, TypeError, KeyError, ValueError, AttributeError) as e:
        raise ValueError(f"{where}: malformed sample entry ({e})") from None
    if not all(isinstance(k, str) for k in keys) or not all(isinstance(e, str) for e in images):
        raise ValueError(f"{where}: a sample key or image extension is not a string")
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


def write_stored_index(root: Path, name: str, entry: dict[str, Any]) -> tuple[bool, str]:
    """Writes the stored index ``root/name`` atomically (temp file, fsync, rename, fsync of the folder; never through
    a link that leads out of ``root``) unless it already holds exactly these bytes.

    Returns:
        Whether it wrote, and the file's digest (:func:`index_digest`, what the manifest records).
    """
    data = encode_stored_index(entry)
    try:
        if (root / name).read_bytes() == data:
            return False, index_digest(data)
    except OSError:
        pass
    write_file_inside(root, name, data)
    return True, index_digest(data)
