"""``pretrain data index``: the manifest and a stored index per shard, for WebDataset shards written by any tool.

Why: shards made by ``webdataset.ShardWriter``/``TarWriter``, by img2dataset or downloaded in WebDataset layout have
keys of their own (``n01440764_10026``, ``000123456``, ``part/n01440764_10026``) and labels in ``.cls``, ``.txt`` or a
``.json`` field, where the stream of our own shards derives ``{split}_{i:08d}`` keys and reads ``.cls``. Reading each
shard once and storing which samples it holds, in which order, with which label, lets training, eval, ``data plan``
and ``data inspect`` run on such shards exactly as on ours: same deterministic order, exact mid-epoch resume, corrupt
sample counting.

Reading: samples come from WebDataset's own reader (``tar_file_expander`` + ``group_by_keys``: the key is the member
path up to the first dot of its file name, ``__*__`` metadata is skipped, extensions are lower-cased) and labels are
decoded by its ``autodecode.basichandlers``, bounded and checked (:mod:`data_pipeline.labels`), so a sample here is
what ``webdataset.WebDataset`` yields. Those iterators give no file offsets, and exact resumable random access needs
them (a loader worker seeks to the members of its own batches and reads nothing else), so offsets come from a
``tarfile`` scan (:func:`data_pipeline.shard_index.index_shard`, the reader the loader falls back to) and every sample
WebDataset yields is checked against it: same key, same member sizes. The loader then reads the offsets from the
stored index; it scans a shard only when its size no longer matches.

Choices:

- image: a sample with several images is read through the first of ``jpg, jpeg, png, webp, ...`` present
  (:data:`~data_pipeline.shard_index.IMAGE_EXTS`);
- label (``--label``): ``cls`` (an integer class index), ``txt`` (a class name), ``json:FIELD`` (an integer index or
  a class name; a dotted FIELD reaches into nested objects). A sample without an image or a label, with a label that
  is no label (too large, nested too deep, negative, past 2**31 or the class count, a bool, a float, a name with a
  line break; :mod:`data_pipeline.labels`) or names no class of ``--classes``, or whose key occurs twice in its shard is
  left out and counted per split and reason (``skipped_samples`` in the manifest), with one example and what it held;
- classes: ``--classes FILE`` (one name per line), else a ``classes.txt`` beside the shards, else the sorted class
  names found, else ``0..K-1`` for integer labels (K = largest label + 1);
- splits: the folder layout (``DIR/<split>/*.tar``) or ``--split-glob SPLIT=SPEC``, a glob or WebDataset brace list
  relative to DIR (:mod:`data_pipeline.shard_specs`); each split's shards in name order, which is the write order the
  stream starts from;
- a shard that cannot be read (truncated anywhere, a header included; not a tar; read differently by WebDataset and
  tarfile) is left out and listed in ``manifest["skipped"]`` with the reason; the command fails only when no usable
  sample is left;
- a re-run reuses the stored index of every shard whose size and mtime (or, when only the mtime moved, sha256), label
  rule and classes are unchanged, so indexing a grown folder reads only the new shards; only an index whose bytes are
  those the previous manifest recorded (``index_sha256``) is reused, so an index changed since is never blessed anew;
- nothing is written unless a manifest is: the stored indexes are staged in a temp folder and written (the changed
  ones) just before the manifest, so a run that finds no usable sample leaves the location as it was; and nothing is
  written outside the index location: shard names are paths inside DIR (a spec with ``..`` or an absolute path is
  refused, :mod:`data_pipeline.shard_specs`), and a local write never follows a link out of the location.

Locations: DIR may be a remote prefix (``s3://``, ``https://``; :mod:`data_pipeline.remote`). Each remote shard is
fetched whole once (into a temp file; its sha256 needs every byte anyway) and indexed like a local one. The manifest
and ``.index/`` go beside the shards where the location can be written, else to ``index_out`` (a local folder or
another remote prefix), whose manifest then names the shards' location (``shard_location``).

Stored index: ``DIR/.index/<shard name>.json``, the schema ``pretrain data build`` writes for its own shards
(:mod:`data_pipeline.shard_index`), with the shard's mtime and the ``--label`` rule and ``--classes`` it was read with;
the manifest records each one's sha256, which every reader checks.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import tarfile
import time
from collections import Counter
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

from data_pipeline.errors import MISSING_IMAGE, MISSING_LABEL
from data_pipeline.fsutil import inside_check
from data_pipeline.labels import BAD_LABEL, LabelRule, SkipSample, read_classes
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
from data_pipeline.remote import Store, temp_download_dir
from data_pipeline.shard_index import (
    IMAGE_EXTS,
    encode_stored_index,
    index_digest,
    index_shard,
    read_stored_entry,
    stored_index_entry,
    stored_index_name,
)
from data_pipeline.shard_specs import find_splits

__all__ = [
    "BAD_LABEL",
    "CLASSES_FILE",
    "DUPLICATE_KEY",
    "FIXES",
    "IndexReport",
    "LabelRule",
    "index_dataset",
    "read_classes",
]

logger = logging.getLogger(__name__)

DUPLICATE_KEY = "duplicate_key"
"""A key that occurs in two places of one shard: the stream could not tell them apart."""
CLASSES_FILE = "classes.txt"
"""Class names beside the shards, one per line: used when ``--classes`` is not given."""
FIXES = {
    DUPLICATE_KEY: "the members of a sample are not next to each other in the tar (a `tar` of a folder stores files in "
    "directory order): re-create it with them grouped, e.g. `tar --sort=name -cf SHARD.tar -C FOLDER .`",
    MISSING_LABEL: "no label where --label {rule} looks; if the labels are elsewhere pass --label txt (a class name in "
    ".txt) or --label json:FIELD (a field of .json)",
    BAD_LABEL: "labels that are no class index (an integer 0 <= i < 2**31, below the number of classes) or class "
    "name (one line, at most 1000 characters) of the class list, or that do not decode as --label {rule} expects; pass "
    "--classes FILE when the classes are not numbered 0..K-1",
    MISSING_IMAGE: "samples without an image member (.jpg, .jpeg, .png, .webp, ...)",
}
"""What to do about each reason a sample is left out (``{rule}``: the ``--label`` in use)."""


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


def _summary(entry: dict[str, Any]) -> dict[str, Any]:
    """A stored index without its samples: what the manifest needs, in memory that does not grow with the samples."""
    return {k: v for k, v in entry.items() if k != "samples"}


@dataclass
class _ShardResult:
    name: str
    entry: dict[str, Any] | None = None  # the stored index without its samples (:func:`_summary`)
    reason: str = ""  # why the shard is left out, when entry is None
    reused: bool = False
    staged: Path | None = None  # the stored index to write, when the manifest is written
    examples: dict[str, str] = field(default_factory=dict)  # per skip reason, one sample and its members
    index_sha256: str | None = None  # the digest of the stored index (staged or kept), for the manifest


@dataclass
class _Job:
    """One indexing run: where shards are read from, where the index goes, and how labels are read."""

    src: Store
    dst: Store
    staging: Path
    rule: LabelRule
    classes: list[str] | None
    classes_sha: str | None
    prev_digests: dict[str, str | None]  # shard -> the sha256 the previous manifest recorded for its stored index
    previous: Manifest | None  # the manifest a previous run left at the index location


def _read_entry(store: Store, rel: str, digest: str | None) -> dict[str, Any] | None:
    """The stored index a previous run wrote, if the previous manifest recorded exactly these bytes (an index that
    changed since, or that no manifest vouches for, is not reused: the shard is read again)."""
    if digest is None:
        return None
    try:
        return read_stored_entry(store.file(rel), digest)
    except (OSError, ValueError):
        return None


def _reusable(prev: dict[str, Any] | None, name: str, size: int, rule: str, classes_sha: str | None) -> bool:
    return (
        prev is not None
        and prev.get("shard") == name
        and prev.get("label") == rule
        and prev.get("classes_sha256") == classes_sha
        and prev.get("bytes") == size
    )


def _stage(job: _Job, name: str, entry: dict[str, Any]) -> tuple[Path, str]:
    """Writes the stored index into the staging folder; returns its path there and its digest."""
    path = inside_check(job.staging, stored_index_name(name))
    path.parent.mkdir(parents=True, exist_ok=True)
    data = encode_stored_index(entry)
    path.write_bytes(data)
    return path, index_digest(data)


def _index_shard(job: _Job, name: str) -> _ShardResult:
    """Indexes one shard (or reuses its stored index); a new or changed stored index is staged, not written."""
    try:
        size, mtime_ns = job.src.info(name)
    except OSError as e:
        return _ShardResult(name, reason=f"cannot be read ({getattr(e, 'strerror', None) or e})")
    prev_digest = job.prev_digests.get(name)
    prev = _read_entry(job.dst, stored_index_name(name), prev_digest)
    reusable = _reusable(prev, name, size, str(job.rule), job.classes_sha)
    if reusable and mtime_ns is not None and prev.get("mtime_ns") == mtime_ns:  # type: ignore[union-attr]
        return _ShardResult(name, _summary(prev), reused=True, index_sha256=prev_digest)  # type: ignore[arg-type]
    fetched: Path | None = None
    try:
        if job.src.remote:
            fetched = job.staging / ".shards" / name.replace("/", "__")
            fetched.parent.mkdir(parents=True, exist_ok=True)
            job.src.download(name, fetched)
        path = fetched if fetched is not None else job.src.local(name)
        if reusable and file_sha256(path) == prev.get("sha256"):  # type: ignore[union-attr] - copied or touched
            assert prev is not None
            if prev.get("mtime_ns") == mtime_ns:
                return _ShardResult(name, _summary(prev), reused=True, index_sha256=prev_digest)
            prev["mtime_ns"] = mtime_ns
            staged, digest = _stage(job, name, prev)
            return _ShardResult(name, _summary(prev), reused=True, staged=staged, index_sha256=digest)
        return _read_shard(job, name, path, size, mtime_ns)
    except OSError as e:
        return _ShardResult(name, reason=f"cannot be read ({getattr(e, 'strerror', None) or e})")
    finally:
        if fetched is not None:
            fetched.unlink(missing_ok=True)


def _read_shard(job: _Job, name: str, path: Path, size: int, mtime_ns: int | None) -> _ShardResult:
    """The stored index of a shard read from the local file ``path``, staged (see the module docstring)."""
    from webdataset.tariterators import group_by_keys, tar_file_expander

    scan = index_shard(path, None, "")
    if scan.problem is not None:
        detail = scan.detail.removeprefix(f"{path}: ")
        what = "not a readable tar" if scan.problem == "truncated_shard" and not scan.members else scan.problem
        return _ShardResult(name, reason=f"{what} ({detail})")
    class_set = None if job.classes is None else set(job.classes)
    num_classes = None if job.classes is None else len(job.classes)
    samples: list[list[Any]] = []
    skipped: Counter[str] = Counter()
    seen: Counter[str] = Counter()
    first_skip: dict[str, str] = {}  # key -> why its first occurrence was left out
    examples: dict[str, str] = {}
    try:
        with open(path, "rb") as f:
            reader = _HashingReader(f)
            for sample in group_by_keys(tar_file_expander([{"url": name, "stream": reader}], eof_value=None)):
                key = sample["__key__"]
                members = {k: v for k, v in sample.items() if not k.startswith("__")}
                seen[key] += 1
                if seen[key] > 1:  # left out below; the tarfile scan merged its members, so nothing to compare
                    examples.setdefault(DUPLICATE_KEY, f"{key} found again after other samples")
                    continue
                scanned = scan.members.get(key, {})
                if any(ext not in scanned or scanned[ext][1] != len(data) for ext, data in members.items()):
                    return _ShardResult(name, reason=f"WebDataset and tarfile read sample {key} apart")
                try:
                    image = next((ext for ext in IMAGE_EXTS if ext in members), None)
                    if image is None or not members[image]:
                        raise SkipSample(MISSING_IMAGE)
                    label = job.rule.read(members, num_classes)
                    if class_set is not None and isinstance(label, str) and label not in class_set:
                        raise SkipSample(BAD_LABEL, f"{label[:60]!r} is not in the class list")
                except SkipSample as s:
                    skipped[s.reason] += 1
                    first_skip[key] = s.reason
                    has = " ".join("." + e for e in sorted(members))
                    examples.setdefault(s.reason, f"{key} has {has}" + (f": {s.detail}" if s.detail else ""))
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
        size=size,
        mtime_ns=mtime_ns,
        sha256=sha,
        label=str(job.rule),
        classes_sha256=job.classes_sha,
        samples=samples,
        skipped=skipped,
    )
    examples = {r: e for r, e in examples.items() if r in skipped}
    staged, digest = _stage(job, name, entry)
    return _ShardResult(name, _summary(entry), staged=staged, examples=examples, index_sha256=digest)


@dataclass
class IndexReport:
    """What :func:`index_dataset` did. ``manifest`` is None when no usable sample was found (nothing written)."""

    data_dir: str
    manifest: Manifest | None
    bad_shards: list[tuple[str, str]] = field(default_factory=list)  # (shard name, reason): left out
    indexed: list[str] = field(default_factory=list)  # shards read now
    reused: list[str] = field(default_factory=list)  # shards whose stored index was unchanged
    index_location: str = ""  # where the manifest and .index/ are (or would have been) written
    classes_from: str = ""  # the class list used, when one was given or found beside the shards
    skipped: dict[str, dict[str, int]] = field(default_factory=dict)  # shard -> {reason: samples left out}
    examples: dict[str, str] = field(default_factory=dict)  # reason -> one left-out sample and its members
    empty_shards: list[str] = field(default_factory=list)  # readable shards that gave no usable sample
    written: list[str] = field(default_factory=list)  # files written (stored indexes, then the manifest)


def index_dataset(
    data_dir: str | os.PathLike,
    *,
    split_globs: dict[str, str] | None = None,
    label: str = "cls",
    classes_file: str | os.PathLike | None = None,
    workers: int | None = None,
    index_out: str | os.PathLike | None = None,
    storage_options: dict[str, Any] | None = None,
) -> IndexReport:
    """Writes ``.index/<shard>.json`` for every new or changed shard and then ``manifest.json`` (version 2).

    Args:
        data_dir: Folder or remote prefix (``s3://``, ``https://``) holding the shards.
        split_globs: ``{split: glob or brace list relative to data_dir}``; default ``DIR/<split>/*.tar``.
        label: ``cls``, ``txt`` or ``json:FIELD``.
        classes_file: Class names, one per line (default: ``classes.txt`` beside the shards, else from the labels).
        workers: Shards read in parallel (threads: hashing, file reads and downloads release the GIL); default 4.
        index_out: Where the manifest and stored indexes go (default: beside the shards; needed for read-only
            locations such as HTTP(S)).
        storage_options: fsspec options of remote locations.

    Returns:
        The report; its ``manifest`` is None (and nothing is written) when no shard holds a usable sample.

    Raises:
        FileNotFoundError: ``data_dir`` is not a folder.
        PermissionError: The index location cannot be written (the message says to pass ``--index-out``).
        ValueError: Bad arguments, no shards, compressed shards, or labels that are integers in some samples and
            names in others without a class list.
    """
    src = Store(data_dir, storage_options)
    dst = src if index_out is None else src.with_location(index_out)
    if not src.remote and not src.is_folder():  # a remote one says what is wrong when it is listed or read
        raise FileNotFoundError(f"{src.url} is not a folder")
    rule = LabelRule.parse(label)
    splits = find_splits(src, split_globs)
    _check_writable(dst, index_out is None)
    previous = previous_manifest(dst)
    prev_digests = {} if previous is None else {
        sh.name: sh.index_sha256 for info in previous.splits.values() for sh in info.shards
    }  # fmt: skip
    classes_from = str(classes_file) if classes_file is not None else ""
    if not classes_from and src.exists(CLASSES_FILE):
        classes_from = src.path(CLASSES_FILE)
    classes = read_classes(classes_from, storage_options) if classes_from else None
    classes_sha = None if classes is None else hashlib.sha256("\n".join(classes).encode()).hexdigest()
    names = [n for shard_names in splits.values() for n in shard_names]
    n_workers = max(1, min(workers or 4, len(names)))
    t0 = time.perf_counter()
    job = _Job(src, dst, temp_download_dir(), rule, classes, classes_sha, prev_digests, previous)
    try:
        with ThreadPoolExecutor(n_workers) as pool:
            results = {r.name: r for r in pool.map(lambda n: _index_shard(job, n), names)}
        report = _report(IndexReport(src.url, None, index_location=dst.url, classes_from=classes_from), names, results)
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
        if dst is not src:
            manifest.shard_location = src.url if src.remote else str(Path(src.url).resolve())
        report.written = _commit(job, results, names, manifest)
    finally:
        shutil.rmtree(job.staging, ignore_errors=True)
    manifest.root = dst
    report.manifest = manifest
    return report


def _report(report: IndexReport, names: list[str], results: dict[str, _ShardResult]) -> IndexReport:
    """``report`` with what happened to each shard: left out, read or reused, its samples left out."""
    for name in names:
        r = results[name]
        if r.entry is None:
            report.bad_shards.append((name, r.reason))
            logger.warning("leaving out %s: %s", name, r.reason)
            continue
        (report.reused if r.reused else report.indexed).append(name)
        if r.entry["skipped"]:
            report.skipped[name] = dict(r.entry["skipped"])
        if not r.entry["label_counts"]:
            report.empty_shards.append(name)
        for reason, example in r.examples.items():
            report.examples.setdefault(reason, f"{name}: {example}")
    return report


def _check_writable(dst: Store, beside_shards: bool) -> None:
    """Refuses, before any shard is read, an index location that cannot be written (``PermissionError``) or is a
    file (``ValueError``)."""
    try:
        if dst.remote:
            dst.check_writable()
        else:
            folder = dst.local()
            if folder.exists() and not folder.is_dir():
                raise ValueError(f"{dst.url} is a file, not a folder: the index location must be a folder")
            while not folder.exists() and folder != folder.parent:
                folder = folder.parent
            if not os.access(folder, os.W_OK):
                raise PermissionError(f"{dst.url} is not writable")
    except PermissionError as e:
        hint = (
            "pass --index-out LOCATION (a local folder or a writable s3:// prefix) to write the manifest and the "
            "index there, then train with data.path=LOCATION"
            if beside_shards
            else "pick another --index-out"
        )
        raise PermissionError(f"{e}; {hint}") from None


def _commit(job: _Job, results: dict[str, _ShardResult], names: list[str], manifest: Manifest) -> list[str]:
    """Writes the staged stored indexes that differ from what the index location holds, then the manifest (unless
    only its creation time would change); returns the paths written."""
    written = []
    for name in names:
        staged = results[name].staged
        if staged is None:
            continue
        rel = stored_index_name(name)
        data = staged.read_bytes()
        try:
            same = job.dst.read_bytes(rel) == data
        except OSError:
            same = False
        if not same:
            job.dst.write_bytes(rel, data)
            written.append(job.dst.path(rel))
    previous = job.previous
    if previous is not None and same_manifest_content(previous, manifest):
        manifest.created = previous.created  # nothing changed: keep the file byte-identical
    written.append(write_manifest(manifest, job.dst))
    return written


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
            index_sha = results[name].index_sha256
            info.shards.append(ShardInfo(name, n, int(entry["bytes"]), str(entry["sha256"]), stored_index_name(name),
                                         index_sha))  # fmt: skip
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
