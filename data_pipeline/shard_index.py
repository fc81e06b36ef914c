"""The index of one tar shard: where each sample's members start and how long they are, read from the tar headers only;
and the stored per-shard index of shards made elsewhere (keys, labels), which ``pretrain data index`` writes.

Every DataLoader worker indexes every shard it reads from (the stream is sample-level), so this is on the per-sample
path: the headers are read with ``os.pread`` and parsed here (ustar and GNU fields, checksum, octal and base-256
numbers) at about a fifth of ``tarfile``'s cost. A shard holding anything this parser does not read exactly as
``tarfile`` does (pax or GNU long-name headers, sparse or unknown members, a bad checksum) is indexed with ``tarfile``
instead, so the index, and the corrupt-shard verdicts built on it, are the same either way.

Members are grouped into samples by WebDataset's own rule (``webdataset.tariterators.base_plus_ext``, lower-cased
extension as its ``group_by_keys`` does): the key is the member's path up to the first dot of its file name, directory
prefix included. :func:`split_member_name` does the same without a regex or importing ``webdataset`` (which imports
torch) in every loader process; a test checks it against ``base_plus_ext``.
"""

from __future__ import annotations

import json
import os
import tarfile
import zlib
from collections.abc import Iterable, Iterator
from contextlib import closing
from dataclasses import dataclass
from pathlib import Path

__all__ = [
    "IMAGE_EXTS",
    "STORED_INDEX_DIR",
    "STORED_INDEX_VERSION",
    "ShardIndex",
    "StoredShard",
    "index_shard",
    "key_index",
    "pick_image",
    "read_stored_shard",
    "split_member_name",
    "stored_index_name",
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


def index_shard(path: Path, expected: range | None, split: str) -> ShardIndex:
    """Scans the tar headers only (member data is seeked over) and groups members by key.

    ``expected`` is the range of write indices a shard of ours holds (its keys are ``{split}_{index:08d}``); ``None``
    for a shard indexed by ``pretrain data index``, whose keys are stored instead.

    The headers are read by :func:`_header_members`; a shard holding anything it does not read exactly as ``tarfile``
    does is scanned again with ``tarfile`` (:func:`_tarfile_members`), so the index is the same either way.
    """
    try:
        size = path.stat().st_size
    except OSError as e:
        return ShardIndex({}, "missing_shard", f"{path}: {e.strerror or e}", False)
    if size == 0:
        return ShardIndex({}, "empty_shard", f"{path}: 0 bytes", False)
    try:
        members, problem, detail = _group_members(path, size, _header_members(path, size))
    except _NotPlainTar:
        members, problem, detail = _group_members(path, size, _tarfile_members(path, size))
    if problem is None and not members:
        problem, detail = "empty_shard", f"{path}: no members"
    foreign = expected is not None and any(key_index(split, k) not in expected for k in members)
    return ShardIndex(members, problem, detail, foreign)


def _group_members(
    path: Path, size: int, entries: Iterator[tuple[str, int, int]]
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


class _NotPlainTar(Exception):
    """The header scan met what it does not read exactly as ``tarfile`` does: the shard goes to ``tarfile``."""


def _tarfile_members(path: Path, size: int) -> Iterator[tuple[str, int, int]]:
    """``(name, offset_data, size)`` of each regular file in the tar, read with ``tarfile`` (every tar format)."""
    with tarfile.open(path, mode="r:") as tar:
        for info in tar:
            if info.isfile():
                yield info.name, info.offset_data, info.size
        if tar.offset >= size:  # the header that was not there would have started at the end of the file
            raise _NoEndMarker


# Header layout (POSIX ustar; GNU tar and tarfile's GNU format use the same fields up to byte 345):
# name [0:100], mode [100:108], uid [108:116], gid [116:124], size [124:136], mtime [136:148], chksum [148:156],
# typeflag [156], linkname, magic, version, uname, gname [157:329], devmajor [329:337], devminor [337:345],
# prefix [345:500]. tarfile reads [345:500] as the ustar name prefix whatever the magic says, and so does this scan.
_BLOCK = tarfile.BLOCKSIZE
_END_BLOCK = bytes(_BLOCK)
_REGULAR_TYPES = (tarfile.REGTYPE, tarfile.AREGTYPE, tarfile.CONTTYPE)  # data follows the header
# Member types tarfile reads without data blocks after the header. Any other type goes to tarfile: pax ('x', 'g',
# 'X'), GNU long names ('L', 'K') and sparse files ('S') change how the next header is read, unknown ones are rare.
_NO_DATA_TYPES = (
    tarfile.LNKTYPE,
    tarfile.SYMTYPE,
    tarfile.CHRTYPE,
    tarfile.BLKTYPE,
    tarfile.DIRTYPE,
    tarfile.FIFOTYPE,
)
# Number fields besides size and chksum, as runs of equal width (start, stop, width): mode uid gid, mtime, devmajor
# devminor. Checked once per distinct run and scan: writers repeat them (our shards: one owner, mode and mtime).
_OTHER_NUMBERS = ((100, 124, 8), (136, 148, 12), (329, 345, 8))


def _header_members(path: Path, size: int) -> Iterator[tuple[str, int, int]]:
    """What :func:`_tarfile_members` yields and raises, read straight from the 512-byte headers with ``os.pread``.

    Reads each header as ``tarfile.TarInfo.frombuf`` does (checksum, every number field, name and prefix, the V7
    directory form) and moves on as ``TarFile.next`` does, at about a fifth of its CPU time: no ``TarInfo``, file
    object or member list.

    Raises:
        tarfile.ReadError: A member's data blocks run past the end of the file (where ``TarFile.next`` raises it).
        _NoEndMarker: The archive stops at the end of the file, as in :func:`_tarfile_members`.
        _NotPlainTar: Anything read otherwise by tarfile, or reported by it: a pax, GNU long-name, sparse or unknown
            member type, a bad checksum (tarfile also takes a signed-char sum), a number field that is not plain octal
            or base-256, a negative size, a short first header, an OSError.
    """
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError as e:
        raise _NotPlainTar from e
    try:
        checked: set[bytes] = set()  # number fields other than the size already parsed: the same in most headers
        offset = 0
        while True:
            try:
                header = os.pread(fd, _BLOCK, offset)
            except OSError as e:
                raise _NotPlainTar from e
            if len(header) < _BLOCK:
                if offset == 0:  # tarfile raises ReadError("empty file" / "truncated header")
                    raise _NotPlainTar
                break  # tarfile ends the archive here (a part of a header counts as none)
            if header == _END_BLOCK:
                break
            if _tar_number(header[148:156]) != _header_checksum(header):
                raise _NotPlainTar
            for start, stop, width in _OTHER_NUMBERS:
                run = header[start:stop]
                if run not in checked:  # raises where tarfile would find the header invalid
                    for i in range(0, stop - start, width):
                        _tar_number(run[i : i + width])
                    checked.add(run)
            length = _tar_number(header[124:136])
            kind = header[156:157]
            name = _tar_string(header[:100])
            data = offset + _BLOCK
            if kind == tarfile.AREGTYPE and name.endswith("/"):
                kind = tarfile.DIRTYPE  # the old V7 form of a directory
            if kind in _REGULAR_TYPES:
                if length < 0:
                    raise _NotPlainTar
                if header[345]:
                    name = f"{_tar_string(header[345:500])}/{name}"
                yield name, data, length
                offset = data + -(-length // _BLOCK) * _BLOCK
                if offset != data and offset > size:  # TarFile.next reads the byte before the next header
                    raise tarfile.ReadError("unexpected end of data")
            elif kind in _NO_DATA_TYPES:
                offset = data
            else:
                raise _NotPlainTar
        if offset >= size:
            raise _NoEndMarker
    finally:
        os.close(fd)


def _tar_number(field: bytes) -> int:
    """A header number field as ``tarfile.nti`` reads it: octal text up to a NUL, or GNU base-256 (first byte 0x80,
    or 0xff for a negative number).

    Raises:
        _NotPlainTar: Text that ``int`` refuses or that ``str.strip`` would read differently (tarfile strips more
            whitespace than ``bytes.strip``); ``tarfile`` decides.
    """
    if field[0] in (0x80, 0xFF):
        n = int.from_bytes(field[1:], "big")
        return n - 256 ** (len(field) - 1) if field[0] == 0xFF else n
    try:
        return int(field.split(b"\0", 1)[0].strip() or b"0", 8)
    except ValueError:
        raise _NotPlainTar from None


def _header_checksum(header: bytes) -> int:
    """Sum of the header's bytes with the checksum field [148:156] counted as 8 spaces (the unsigned ustar sum).

    Summed by zlib: the low 16 bits of ``adler32(chunk)`` are ``1 + sum(chunk)`` while that stays below 65521, so
    each chunk holds at most 256 bytes (255 * 256 = 65280); a Python ``sum`` over 512 bytes takes 4x longer.
    """
    view = memoryview(header)
    low = 0xFFFF
    sums = (zlib.adler32(view[:148]) & low) + (zlib.adler32(view[156:356]) & low) + (zlib.adler32(view[356:]) & low)
    return sums - 3 + 8 * 32  # 3 chunks: 1 + sum each


def _tar_string(field: bytes) -> str:
    """A header text field as ``tarfile.nts`` reads it with the TarFile defaults: up to the first NUL, decoded."""
    return field.split(b"\0", 1)[0].decode(tarfile.ENCODING, "surrogateescape")


def key_index(split: str, key: str) -> int:
    """Write index encoded in ``key``, or -1 if the key is not ``{split}_{digits}``."""
    prefix, sep, digits = key.rpartition("_")
    return int(digits) if sep and prefix == split and digits.isdigit() else -1


# ---------------------------------------------------------------------------------------------------------------------
# Stored per-shard indexes (written by `pretrain data index`, schema in data_pipeline.wds_index)

STORED_INDEX_DIR = ".index"
"""Folder of the data set that holds one stored index per shard: ``.index/<shard name>.json``."""
STORED_INDEX_VERSION = 1


def stored_index_name(shard_name: str) -> str:
    """Path of ``shard_name``'s stored index, relative to the data folder (``.index/train/a-000.tar.json``)."""
    return f"{STORED_INDEX_DIR}/{shard_name}.json"


@dataclass
class StoredShard:
    """What the stream reads from a stored index: each sample's key, label (an index into the classes, or a class
    name) and image extension, in tar order."""

    keys: list[str]
    labels: list[int | str]
    images: list[str]

    def __len__(self) -> int:
        return len(self.keys)


def read_stored_shard(path: Path) -> StoredShard:
    """Reads the samples of a stored shard index.

    Raises:
        FileNotFoundError: No such file.
        ValueError: Not a stored index of a version this code reads.
    """
    try:
        raw = json.loads(Path(path).read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: not valid JSON ({e}); re-run `pretrain data index`") from None
    samples = raw.get("samples") if isinstance(raw, dict) else None
    if not isinstance(samples, list) or raw.get("version") != STORED_INDEX_VERSION:
        raise ValueError(f"{path}: not a version {STORED_INDEX_VERSION} shard index; re-run `pretrain data index`")
    try:
        keys = [str(s[0]) for s in samples]
        labels = [s[1] for s in samples]
        images = [str(s[2]) for s in samples]
    except (IndexError, TypeError, KeyError) as e:
        raise ValueError(f"{path}: malformed sample entry ({e!r}); re-run `pretrain data index`") from None
    return StoredShard(keys, labels, images)
