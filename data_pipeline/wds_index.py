"""``pretrain data index``: the manifest and a stored index per shard, for WebDataset shards written by any tool.

Why: shards made by ``webdataset.ShardWriter``/``TarWriter``, by img2dataset or downloaded in WebDataset layout have
keys of their own (``n01440764_10026``, ``000123456``, ``part/n01440764_10026``) and labels in ``.cls``, ``.txt`` or a
``.json`` field, where the stream of our own shards derives ``{split}_{i:08d}`` keys and reads ``.cls``. Reading each
shard once and storing which samples it holds, in which order, with which label, lets training, eval, ``data plan``
and ``data inspect`` run on such shards exactly as on ours: same deterministic order, exact mid-epoch resume, corrupt
sample counting.

Reading: samples come from WebDataset's own reader (``tar_file_expander`` + ``group_by_keys``: the key is the member
path up to the first dot of its file name, ``__*__`` metadata is skipped, extensions are lower-cased) and labels are
decoded by its ``autodecode.basichandlers``, so a sample here is what ``webdataset.WebDataset`` yields. Those iterators
give no file offsets, and exact resumable random access needs them (a loader worker seeks to the members of its own
batches and reads nothing else), so offsets come from a ``tarfile`` scan (:func:`data_pipeline.shard_index
.index_shard`, the reader the loader falls back to) and every sample WebDataset yields is checked against it: same
key, same member sizes. The loader then reads the offsets from the stored index; it scans a shard only when its
size no longer matches.

Choices:

- image: a sample with several images is read through the first of ``jpg, jpeg, png, webp, ...`` present
  (:data:`~data_pipeline.shard_index.IMAGE_EXTS`);
- label (``--label``): ``cls`` (an integer class index), ``txt`` (a class name), ``json:FIELD`` (an integer index or
  a class name; a dotted FIELD reaches into nested objects). A sample without an image or a label, with a label that
  does not parse or names no class of ``--classes``, or whose key occurs twice in its shard is left out and counted per
  split and reason (``skipped_samples`` in the manifest);
- classes: ``--classes FILE`` (one name per line), else the sorted class names found, else ``0..K-1`` for integer
  labels (K = largest label + 1);
- splits: the folder layout (``DIR/<split>/*.tar``) or ``--split-glob SPLIT=GLOB`` (relative to DIR); each split's
  shards in name order, which is the write order the stream starts from;
- a shard that cannot be read (truncated, not a tar, read differently by WebDataset and tarfile) is left out
  and listed in ``manifest["skipped"]`` with the reason; the command fails only when no usable sample is left;
- a re-run reuses the stored index of every shard whose size and mtime (or, when only the mtime moved, sha256), label
  rule and classes are unchanged, so indexing a grown folder reads only the new shards.

Stored index: ``DIR/.index/<shard name>.json``, the schema ``pretrain data build`` writes for its own shards
(:mod:`data_pipeline.shard_index`), with the shard's mtime and the ``--label`` rule and ``--classes`` it was read with.
"""

from __future__ import annotations

import hashlib
import logging
import os
import tarfile
import time
from collections import Counter
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

from data_pipeline.errors import MISSING_IMAGE, MISSING_LABEL
from data_pipeline.manifest import (
    INDEXED_MANIFEST_VERSION,
    Manifest,
    ShardInfo,
    SplitInfo,
    file_sha256,
    previous_manifest,
    same_manifest_content,
    write_manifest,
)
from data_pipeline.shard_index import (
    IMAGE_EXTS,
    STORED_INDEX_DIR,
    index_shard,
    read_stored_entry,
    stored_index_entry,
    stored_index_name,
    write_stored_index,
)

__all__ = ["BAD_LABEL", "DUPLICATE_KEY", "IndexReport", "LabelRule", "find_splits", "index_dataset", "read_classes"]

logger = logging.getLogger(__name__)

BAD_LABEL = "bad_label"
"""A label that does not parse, is negative, or names no class of ``--classes``."""
DUPLICATE_KEY = "duplicate_key"
"""A key that occurs in two places of one shard: the stream could not tell them apart."""
_LABEL_MEMBERS = {"cls": "cls", "txt": "txt", "json": "json"}


class _Skip(Exception):
    """A sample left out of the index, counted under ``reason``."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


@dataclass(frozen=True)
class LabelRule:
    """Where a sample's label is: ``cls``, ``txt`` or ``json:FIELD``."""

    kind: str
    field: str = ""

    @classmethod
    def parse(cls, spec: str) -> LabelRule:
        """``cls`` | ``txt`` | ``json:FIELD``.

        Raises:
            ValueError: Any other spec.
        """
        kind, colon, name = spec.partition(":")
        if kind in ("cls", "txt") and not colon:
            return cls(kind)
        if kind == "json" and name and all(name.split(".")):
            return cls(kind, name)
        raise ValueError(f"--label {spec!r}: use cls, txt or json:FIELD (e.g. json:label)")

    def __str__(self) -> str:
        return f"json:{self.field}" if self.kind == "json" else self.kind

    def read(self, members: dict[str, bytes]) -> int | str:
        """The raw label of a sample: an int (class index) or a str (class name).

        Raises:
            _Skip: ``missing_label`` (no member, no field, empty text) or ``bad_label`` (does not decode).
        """
        from webdataset.autodecode import basichandlers  # webdataset's decoders by extension: int / str / JSON

        data = members.get(_LABEL_MEMBERS[self.kind])
        if data is None:
            raise _Skip(MISSING_LABEL)
        try:
            value = basichandlers(self.kind, data)
        except (ValueError, UnicodeDecodeError):  # int(b"x"), bad UTF-8, JSONDecodeError
            raise _Skip(BAD_LABEL) from None
        for part in self.field.split(".") if self.field else ():
            if not isinstance(value, dict) or part not in value:
                raise _Skip(MISSING_LABEL)
            value = value[part]
        if isinstance(value, str):
            value = value.strip()
            if not value:
                raise _Skip(MISSING_LABEL)
            return value
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise _Skip(BAD_LABEL)
        return value


def read_classes(path: str | os.PathLike) -> list[str]:
    """Class names, one per line (surrounding blanks and empty lines ignored).

    Raises:
        ValueError: The file cannot be read, is empty, or names a class twice.
    """
    try:
        names = [line.strip() for line in Path(path).read_text(encoding="utf-8").splitlines()]
    except (OSError, UnicodeDecodeError) as e:
        raise ValueError(f"--classes {path}: cannot read it ({e})") from None
    names = [n for n in names if n]
    if not names:
        raise ValueError(f"--classes {path}: no class names (one per line)")
    twice = sorted(n for n, c in Counter(names).items() if c > 1)
    if twice:
        raise ValueError(f"--classes {path}: {len(twice)} names occur twice, e.g. {twice[0]!r}")
    return names


def find_splits(root: Path, split_globs: dict[str, str] | None = None) -> dict[str, list[str]]:
    """``{split: [shard name relative to root, ...]}``, each split's shards sorted by name.

    Args:
        root: The data folder.
        split_globs: ``{split: glob relative to root}``; default: one split per subfolder holding ``*.tar``.

    Raises:
        ValueError: No shard found, a glob matching nothing, a shard in two splits, or shards directly in ``root``
            without ``split_globs`` (their split is unknown).
    """

    def tars(paths: Any) -> list[str]:
        names = (p.relative_to(root).as_posix() for p in paths if p.is_file() and p.name.endswith(".tar"))
        return sorted(n for n in names if not n.startswith(f"{STORED_INDEX_DIR}/"))

    if split_globs:
        splits: dict[str, list[str]] = {}
        owner: dict[str, str] = {}
        for split, pattern in split_globs.items():
            names = tars(root.glob(pattern))
            if not names:
                raise ValueError(f"--split-glob {split}={pattern} matches no .tar file in {root}")
            for name in names:
                if name in owner:
                    raise ValueError(f"{name} matches the globs of both {owner[name]} and {split}")
                owner[name] = split
            splits[split] = names
        return splits
    top = tars(root.glob("*.tar"))
    if top:
        raise ValueError(
            f"{len(top)} shards lie directly in {root} (e.g. {top[0]}), so their split is unknown: name it, e.g. "
            "--split-glob train='*train*.tar' --split-glob val='*val*.tar'"
        )
    subdirs = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    splits = {d.name: tars(d.glob("*.tar")) for d in subdirs}
    splits = {k: v for k, v in splits.items() if v}
    if not splits:
        raise ValueError(f"no .tar shards in {root}: expected DIR/<split>/*.tar, or pass --split-glob SPLIT=GLOB")
    return splits


class _HashingReader:
    """Read-only file wrapper that hashes every byte read, so the sha256 costs no second pass over the shard."""

    def __init__(self, f: BinaryIO):
        self.f = f
        self.sha = hashlib.sha256()

    def read(self, size: int = -1) -> bytes:
        data = self.f.read(size)
        self.sha.update(data)
        return data

    def finish(self) -> str:
        """Reads what the tar reader left (end-of-archive padding) and returns the hex sha256 of the whole file."""
        while chunk := self.f.read(4 << 20):
            self.sha.update(chunk)
        return self.sha.hexdigest()


def _names_a_class(label: int | str, classes: set[str]) -> bool:
    return label in classes if isinstance(label, str) else label < len(classes)


def _summary(entry: dict[str, Any]) -> dict[str, Any]:
    """A stored index without its samples: what the manifest needs, in memory that does not grow with the samples."""
    return {k: v for k, v in entry.items() if k != "samples"}


@dataclass
class _ShardResult:
    name: str
    entry: dict[str, Any] | None = None  # the stored index without its samples (:func:`_summary`)
    reason: str = ""  # why the shard is left out, when entry is None
    reused: bool = False


def _read_entry(path: Path) -> dict[str, Any] | None:
    try:
        return read_stored_entry(path)
    except (OSError, ValueError):
        return None


def _reusable(prev: dict[str, Any] | None, name: str, st: os.stat_result, rule: str, classes_sha: str | None) -> bool:
    return (
        prev is not None
        and prev.get("shard") == name
        and prev.get("label") == rule
        and prev.get("classes_sha256") == classes_sha
        and prev.get("bytes") == st.st_size
    )


def _index_shard(
    root: Path, name: str, rule: LabelRule, classes: list[str] | None, classes_sha: str | None
) -> _ShardResult:
    """Indexes one shard (or reuses its stored index) and writes ``.index/<name>.json``."""
    from webdataset.tariterators import group_by_keys, tar_file_expander

    path = root / name
    entry_path = root / stored_index_name(name)
    try:
        st = path.stat()
    except OSError as e:
        return _ShardResult(name, reason=f"cannot be read ({e.strerror or e})")
    prev = _read_entry(entry_path)
    if _reusable(prev, name, st, str(rule), classes_sha):
        assert prev is not None
        if prev.get("mtime_ns") == st.st_mtime_ns:
            return _ShardResult(name, _summary(prev), reused=True)
        if file_sha256(path) == prev.get("sha256"):  # copied or touched: same bytes
            prev["mtime_ns"] = st.st_mtime_ns
            write_stored_index(entry_path, prev)
            return _ShardResult(name, _summary(prev), reused=True)
    scan = index_shard(path, None, "")
    if scan.problem is not None:
        detail = scan.detail.removeprefix(f"{path}: ")
        what = "not a readable tar" if scan.problem == "truncated_shard" and not scan.members else scan.problem
        return _ShardResult(name, reason=f"{what} ({detail})")
    class_set = None if classes is None else set(classes)
    samples: list[list[Any]] = []
    skipped: Counter[str] = Counter()
    seen: Counter[str] = Counter()
    first_skip: dict[str, str] = {}  # key -> why its first occurrence was left out
    try:
        with open(path, "rb") as f:
            reader = _HashingReader(f)
            for sample in group_by_keys(tar_file_expander([{"url": name, "stream": reader}], eof_value=None)):
                key = sample["__key__"]
                members = {k: v for k, v in sample.items() if not k.startswith("__")}
                seen[key] += 1
                if seen[key] > 1:  # left out below; the tarfile scan merged its members, so nothing to compare
                    continue
                scanned = scan.members.get(key, {})
                if any(ext not in scanned or scanned[ext][1] != len(data) for ext, data in members.items()):
                    return _ShardResult(name, reason=f"WebDataset and tarfile read sample {key} apart")
                try:
                    image = next((ext for ext in IMAGE_EXTS if ext in members), None)
                    if image is None or not members[image]:
                        raise _Skip(MISSING_IMAGE)
                    label = rule.read(members)
                    if class_set is not None and not _names_a_class(label, class_set):
                        raise _Skip(BAD_LABEL)
                except _Skip as s:
                    skipped[s.reason] += 1
                    first_skip[key] = s.reason
                    continue
                offsets = {ext: list(scanned[ext]) for ext in sorted(scanned)}
                samples.append([key, label, image, offsets])
            sha = reader.finish()
    except (tarfile.TarError, OSError, EOFError, ValueError) as e:
        return _ShardResult(name, reason=f"WebDataset cannot read it ({type(e).__name__}: {e})")
    twice = {k for k, n in seen.items() if n > 1}
    if twice:  # the stream finds a sample by key within its shard: a key in two places is ambiguous
        skipped[DUPLICATE_KEY] += sum(seen[k] for k in twice)
        for k in twice & first_skip.keys():  # each sample counts under one reason
            skipped[first_skip[k]] -= 1
        skipped = +skipped  # drops reasons at 0
        samples = [s for s in samples if s[0] not in twice]
    entry = stored_index_entry(
        shard=name,
        size=st.st_size,
        mtime_ns=st.st_mtime_ns,
        sha256=sha,
        label=str(rule),
        classes_sha256=classes_sha,
        samples=samples,
        skipped=skipped,
    )
    write_stored_index(entry_path, entry)
    return _ShardResult(name, _summary(entry))


@dataclass
class IndexReport:
    """What :func:`index_dataset` did. ``manifest`` is None when no usable sample was found (nothing written)."""

    data_dir: str
    manifest: Manifest | None
    bad_shards: list[tuple[str, str]] = field(default_factory=list)  # (shard name, reason): left out
    indexed: list[str] = field(default_factory=list)  # shards read now
    reused: list[str] = field(default_factory=list)  # shards whose stored index was unchanged


def index_dataset(
    data_dir: str | os.PathLike,
    *,
    split_globs: dict[str, str] | None = None,
    label: str = "cls",
    classes_file: str | os.PathLike | None = None,
    workers: int | None = None,
) -> IndexReport:
    """Writes ``DIR/.index/<shard>.json`` for every new or changed shard and then ``DIR/manifest.json`` (version 2).

    Args:
        data_dir: Folder holding the shards.
        split_globs: ``{split: glob relative to data_dir}``; default ``DIR/<split>/*.tar``.
        label: ``cls``, ``txt`` or ``json:FIELD``.
        classes_file: Class names, one per line (default: from the labels, see the module docstring).
        workers: Shards read in parallel (threads: hashing and file reads release the GIL); default 4.

    Returns:
        The report; its ``manifest`` is None (and no manifest is written) when no shard holds a usable sample.

    Raises:
        FileNotFoundError: ``data_dir`` is not a folder.
        ValueError: Bad arguments, no shards, or labels that are integers in some samples and names in others
            without ``classes_file``.
    """
    root = Path(data_dir)
    if not root.is_dir():
        raise FileNotFoundError(f"{root} is not a folder")
    rule = LabelRule.parse(label)
    classes = None if classes_file is None else read_classes(classes_file)
    classes_sha = None if classes is None else hashlib.sha256("\n".join(classes).encode()).hexdigest()
    splits = find_splits(root, split_globs)
    names = [n for shard_names in splits.values() for n in shard_names]
    n_workers = max(1, min(workers or 4, len(names)))
    t0 = time.perf_counter()
    with ThreadPoolExecutor(n_workers) as pool:
        results = {r.name: r for r in pool.map(lambda n: _index_shard(root, n, rule, classes, classes_sha), names)}
    report = IndexReport(str(root), None)
    for name in names:
        r = results[name]
        if r.entry is None:
            report.bad_shards.append((name, r.reason))
            logger.warning("leaving out %s: %s", name, r.reason)
        else:
            (report.reused if r.reused else report.indexed).append(name)
    logger.info(
        "indexed %d shards, reused %d, left out %d in %.1f s",
        len(report.indexed),
        len(report.reused),
        len(report.bad_shards),
        time.perf_counter() - t0,
    )
    manifest = _make_manifest(splits, results, rule, classes, report.bad_shards)
    if manifest is None:
        return report
    previous = previous_manifest(root)
    if previous is not None and same_manifest_content(previous, manifest):
        manifest.created = previous.created  # nothing changed: keep the file byte-identical
    write_manifest(manifest, root)
    manifest.root = root
    report.manifest = manifest
    return report


def _make_manifest(
    splits: dict[str, list[str]],
    results: dict[str, _ShardResult],
    rule: LabelRule,
    classes: list[str] | None,
    bad_shards: Sequence[tuple[str, str]],
) -> Manifest | None:
    """The version 2 manifest of the usable shards; None when they hold no sample."""
    counts: dict[str, Counter[int | str]] = {}
    infos: dict[str, SplitInfo] = {}
    image_exts: set[str] = set()
    for split, names in splits.items():
        labels: Counter[int | str] = Counter()
        info = SplitInfo(0, {}, [], {})
        for name in names:
            entry = results[name].entry
            if entry is None:
                continue
            n = sum(c for _, c in entry["label_counts"])
            info.shards.append(ShardInfo(name, n, int(entry["bytes"]), str(entry["sha256"]), stored_index_name(name)))
            info.num_samples += n
            labels.update({lab: c for lab, c in entry["label_counts"]})
            for reason, c in entry["skipped"].items():
                info.skipped_samples[reason] = info.skipped_samples.get(reason, 0) + c
            image_exts |= set(entry["image_exts"])
        if info.shards:
            infos[split], counts[split] = info, labels
    if not any(info.num_samples for info in infos.values()):
        return None
    all_labels = {lab for c in counts.values() for lab in c}
    if classes is None:
        names_found = sorted(lab for lab in all_labels if isinstance(lab, str))
        if names_found and len(names_found) != len(all_labels):
            raise ValueError(
                f"label {rule}: some samples hold class names, others integers; pass --classes FILE to say which "
                "names the integers index"
            )
        classes = names_found or [str(i) for i in range(max(all_labels) + 1)]  # type: ignore[call-overload]
    for split, info in infos.items():
        info.class_counts = {name: 0 for name in classes}
        for lab, c in counts[split].items():
            info.class_counts[classes[lab] if isinstance(lab, int) else lab] += c
    fmt = "jpeg" if image_exts <= {"jpg", "jpeg"} else "png" if image_exts == {"png"} else "mixed"
    return Manifest(
        source=f"webdataset shards indexed by `pretrain data index` (label {rule})",
        format=fmt,
        classes=list(classes),
        splits=infos,
        created=time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        skipped=[{"path": name, "reason": reason} for name, reason in bad_shards],
        version=INDEXED_MANIFEST_VERSION,
        label=str(rule),
        image_exts=sorted(image_exts),
    )
