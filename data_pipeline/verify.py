"""``pretrain data inspect``: check a built data set against its manifest.

For every shard listed in ``manifest.json``: the file exists, its size and sha256 match the manifest, and its tar
headers (read by the ``tarfile`` scan the loader falls back to, :func:`data_pipeline.shard_index.index_shard`, which
also reports a tar cut anywhere, a header included) hold the listed number of samples (keys), each with an image and a
``.cls`` label. The shard's stored index, which the loader reads instead of the tar headers, must be the file whose
sha256 the manifest recorded, and is compared with the tar sample by sample: the same members at the same offsets and
sizes, and the same label as the shard's own label member gives under the manifest's label rule (``.cls`` for our own
shards). For shards indexed by ``pretrain data index`` (manifest version 2) the samples are those of the shard's stored
index: each must be in the tar with its image member at the stored offsets, and its stored label must name a class.
With ``deep=True`` every image is decoded and every ``.cls`` parsed as well (read at the offsets the scan found). The
report names every bad shard with its reasons and the samples concerned; the stream refuses nothing by itself, so run
this after copying a data set.

Remote data sets (``s3://``, ``https://``) are checked the same way: each shard is fetched whole into a temp file
(its sha256 needs every byte), checked there and removed; its stored index is read from the store.
"""

from __future__ import annotations

import logging
import os
import shutil
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

from data_pipeline.errors import CorruptSample
from data_pipeline.labels import MAX_MEMBER_BYTES, LabelRule, SkipSample
from data_pipeline.manifest import Manifest, ShardInfo, file_sha256, load_manifest
from data_pipeline.remote import Store, Unreachable, temp_download_dir
from data_pipeline.shard_index import StoredShard, index_digest, index_shard, parse_stored_entry, stored_shard_of

__all__ = ["BadShard", "InspectReport", "inspect_dataset"]

logger = logging.getLogger(__name__)

_NON_IMAGE = frozenset({"cls", "json", "txt"})
_MAX_LISTED = 3  # bad samples named per reason in one shard's report


@dataclass
class BadShard:
    """A shard that failed a check; ``reasons`` says every way it failed."""

    split: str
    name: str
    reasons: list[str]


@dataclass
class InspectReport:
    """What ``inspect_dataset`` found. ``ok`` is true when no shard is bad."""

    data_dir: str
    manifest: Manifest
    deep: bool
    shards_checked: int = 0
    samples_found: dict[str, int] = field(default_factory=dict)
    bad_shards: list[BadShard] = field(default_factory=list)
    extra_files: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.bad_shards

    def summary_table(self) -> str:
        """Markdown table: one row per split, then the classes with their counts per split."""
        m = self.manifest
        splits = list(m.splits)
        lines = [
            f"data set {self.data_dir}: source {m.source}, format {m.format}, {m.num_classes} classes, "
            f"built {m.created or '?'}",
            "",
            "| split | shards | samples | bytes | bad shards |",
            "|---|---:|---:|---:|---:|",
        ]
        for name in splits:
            s = m.splits[name]
            bad = sum(b.split == name for b in self.bad_shards)
            lines.append(f"| {name} | {len(s.shards)} | {s.num_samples} | {_human(s.num_bytes)} | {bad} |")
        lines += ["", "| class | " + " | ".join(splits) + " |", "|---|" + "---:|" * len(splits)]
        for cls in m.classes:
            counts = " | ".join(str(m.splits[s].class_counts.get(cls, 0)) for s in splits)
            lines.append(f"| {cls} | {counts} |")
        if m.indexed and any(m.splits[name].skipped_samples for name in splits):
            lines.append("")
            for name in splits:
                left_out = m.splits[name].skipped_samples
                if left_out:
                    reasons = ", ".join(f"{r} {n}" for r, n in sorted(left_out.items()))
                    lines.append(
                        f"{name}: {sum(left_out.values())} samples left out by `pretrain data index` ({reasons})"
                    )
        if m.skipped:
            what = (
                "shards were left out by `pretrain data index`"
                if m.indexed
                else "source files were skipped at build time"
            )
            lines += ["", f"{len(m.skipped)} {what}:"]
            lines += [f"  {s['path']}: {s['reason']}" for s in m.skipped]
        return "\n".join(lines)

    def problems(self) -> str:
        """One line per bad shard (and per unlisted file); empty when clean."""
        lines = [f"BAD {b.name}: {'; '.join(b.reasons)}" for b in self.bad_shards]
        lines += [f"note: {f} is not listed in the manifest" for f in self.extra_files]
        return "\n".join(lines)


def _human(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def _check_shard(manifest: Manifest, shard: ShardInfo, deep: bool, scratch: Path) -> tuple[list[str], int]:
    """All problems of one shard, and the number of samples found in it; a remote shard is fetched into ``scratch``
    first (and removed)."""
    shards = manifest.shard_store
    if not shards.remote:
        return _check_local_shard(manifest, shard, shards.local(shard.name), deep)
    local = scratch / shard.name.replace("/", "__")
    try:
        shards.download(shard.name, local)
    except Unreachable as e:
        return [f"unreachable ({e})"], 0
    except OSError as e:
        return [f"missing ({getattr(e, 'strerror', None) or e})"], 0
    try:
        return _check_local_shard(manifest, shard, local, deep)
    finally:
        local.unlink(missing_ok=True)


def _read_index(manifest: Manifest, shard: ShardInfo) -> tuple[StoredShard | None, list[str]]:
    """The shard's stored index (None: unreadable) and what is wrong with it: unreadable, or not the file whose sha256
    the manifest recorded (still parsed, so that the samples that changed are named)."""
    root = manifest.root
    assert root is not None and shard.index is not None
    fix = "re-run `pretrain data index`" if manifest.indexed else "re-run `pretrain data build` with the same arguments"
    try:
        data = root.read_bytes(shard.index)
        reasons = []
        if shard.index_sha256 is not None and index_digest(data) != shard.index_sha256:
            reasons.append(
                f"stored index {shard.index} changed after the manifest was written (sha256 {index_digest(data)[:12]}"
                f"..., the manifest recorded {shard.index_sha256[:12]}...: the loader skips the shard); {fix}"
            )
        return stored_shard_of(parse_stored_entry(data, root.path(shard.index)), root.path(shard.index)), reasons
    except (OSError, ValueError) as e:
        return None, [f"stored index unreadable ({e}); {fix}"]


def _label_in_shard(f: BinaryIO, exts: dict[str, tuple[int, int]], rule: LabelRule, num_classes: int) -> Any:
    """The label the shard holds for a sample, read at the scan's offset with the label rule, or why there is none."""
    span = exts.get(rule.member)
    if span is None:
        return _NoLabel(f"no .{rule.member}")
    f.seek(span[0])
    try:
        return rule.read({rule.member: f.read(min(span[1], MAX_MEMBER_BYTES[rule.member] + 1))}, num_classes)
    except SkipSample as e:
        return _NoLabel(e.detail or e.reason)


class _NoLabel(str):
    """Why a sample has no label in its shard (a str subclass, never equal to a stored label of type str)."""


def _label_differences(
    path: Path, index: StoredShard, members: dict[str, dict[str, tuple[int, int]]], rule: LabelRule, num_classes: int
) -> str | None:
    """The reason naming the samples whose stored label is not the one their shard holds; None when all agree."""
    differ = []
    with open(path, "rb") as f:
        for key, stored in zip(index.keys, index.labels):
            if key not in members:
                continue  # reported as not in the tar
            found = _label_in_shard(f, members[key], rule, num_classes)
            if type(found) is not type(stored) or found != stored:
                shown = f"none: {found}" if isinstance(found, _NoLabel) else repr(found)
                differ.append(f"{key} (stored {str(repr(stored))[:40]}, in the shard {shown[:80]})")
    if not differ:
        return None
    return (
        f"{len(differ)} samples' labels in the stored index are not the ones in the shard ({rule}), e.g. "
        f"{'; '.join(differ[:_MAX_LISTED])}"
    )


def _check_local_shard(manifest: Manifest, shard: ShardInfo, path: Path, deep: bool) -> tuple[list[str], int]:
    """:func:`_check_shard` of a shard at the local ``path`` (for a manifest indexed by ``pretrain data index``, its
    samples are those of its stored index)."""
    classes, foreign = manifest.classes, manifest.indexed
    num_classes = len(classes)
    try:
        size = path.stat().st_size
    except OSError as e:
        return [f"missing ({e.strerror or e})"], 0
    reasons = []
    if size != shard.bytes:
        reasons.append(f"size {size} bytes, manifest says {shard.bytes} (truncated or replaced)")
    sha = file_sha256(path)
    if sha != shard.sha256:
        reasons.append(f"sha256 {sha[:12]}... does not match the manifest's {shard.sha256[:12]}...")
    failed: dict[str, list[str]] = {"bad_label": [], "decode_error": []}  # deep: keys per failure
    index: StoredShard | None = None
    if shard.index is not None:
        index, index_reasons = _read_index(manifest, shard)
        reasons += index_reasons
        if index is None and foreign:
            return reasons, 0
    own, stored = (None, index) if foreign else (index, None)
    scan = index_shard(path, None, "")  # the tarfile scan: members by key in tar order; a break and what precedes it
    members = scan.members
    read_whole = scan.problem is None
    if scan.problem == "truncated_shard":
        reasons.append(f"truncated or unreadable tar ({scan.detail.removeprefix(f'{path}: ')})")
    if deep:
        _decode_all(path, members, None if stored is None else dict(zip(stored.keys, stored.images)), num_classes,
                    failed)  # fmt: skip
    if index is not None:
        rule = LabelRule.parse(manifest.label) if foreign else LabelRule("cls")
        differ = _label_differences(path, index, members, rule, num_classes)
        if differ is not None:
            fix = "re-run `pretrain data index`" if foreign else "re-run `pretrain data build` with the same arguments"
            reasons.append(f"{differ}; {fix}")
    if own is not None and read_whole:
        differ = [k for k, spans in zip(own.keys, own.members) if members.get(k) != spans]
        if differ or len(own) != len(members) or own.bytes != size:
            reasons.append(
                f"stored index does not match the tar ({len(differ)} of its {len(own)} samples' members differ, "
                f"e.g. {', '.join(differ[:_MAX_LISTED]) or '-'}; {own.bytes} bytes); re-run `pretrain data build` "
                "with the same arguments"
            )
    if stored is not None:
        stored_reasons, found = _check_stored(stored, members, shard, classes, failed)
        return reasons + stored_reasons, found
    found = len(members)
    if found != shard.samples:
        reasons.append(f"{found} samples in the tar, manifest says {shard.samples}")
    no_image = [k for k, exts in members.items() if not set(exts) - _NON_IMAGE]
    no_label = [k for k, exts in members.items() if "cls" not in exts]
    if no_image:
        reasons.append(f"{len(no_image)} samples without an image, e.g. {', '.join(no_image[:_MAX_LISTED])}")
    if no_label:
        reasons.append(f"{len(no_label)} samples without a .cls label, e.g. {', '.join(no_label[:_MAX_LISTED])}")
    for what, bad in failed.items():
        if bad:
            reasons.append(f"{len(bad)} samples with {what}, e.g. {', '.join(bad[:_MAX_LISTED])}")
    return reasons, found


def _decode_all(
    path: Path,
    members: dict[str, dict[str, tuple[int, int]]],
    image_of: dict[str, str] | None,
    num_classes: int,
    failed: dict[str, list[str]],
) -> None:
    """``--deep``: decodes every member (with a stored index: every sample's image member) into ``failed``."""
    with open(path, "rb") as f:
        for key, exts in members.items():
            for ext, (offset, n) in exts.items():
                if image_of is None or image_of.get(key) == ext:  # stored: the image members only
                    f.seek(offset)
                    problem = _deep_check(f.read(n), ext, num_classes)
                    if problem:
                        failed[problem].append(key)


def _check_stored(
    stored: StoredShard,
    members: dict[str, dict[str, tuple[int, int]]],
    shard: ShardInfo,
    classes: list[str],
    failed: dict[str, list[str]],
) -> tuple[list[str], int]:
    """Problems of a shard indexed by ``pretrain data index`` (its stored samples against the tar and the classes),
    and the number of its stored samples found in the tar."""
    reasons = []
    if len(stored) != shard.samples:
        reasons.append(f"the stored index holds {len(stored)} samples, manifest says {shard.samples}")
    lost = [k for k, ext in zip(stored.keys, stored.images) if ext not in members.get(k, {})]
    if lost:
        reasons.append(f"{len(lost)} indexed samples are not in the tar, e.g. {', '.join(lost[:_MAX_LISTED])}")
    moved = [k for k, spans in zip(stored.keys, stored.members) if k in members and members[k] != spans]
    if moved:
        reasons.append(
            f"{len(moved)} indexed samples' members are not at their stored offsets, e.g. "
            f"{', '.join(moved[:_MAX_LISTED])}; re-run `pretrain data index`"
        )
    names = set(classes)
    for key, label in zip(stored.keys, stored.labels):
        ok = label in names if isinstance(label, str) else isinstance(label, int) and 0 <= label < len(classes)
        if not ok:
            failed["bad_label"].append(key)
    for what, bad in failed.items():
        if bad:
            reasons.append(f"{len(bad)} samples with {what}, e.g. {', '.join(bad[:_MAX_LISTED])}")
    return reasons, len(stored) - len(lost)


def _deep_check(data: bytes, ext: str, num_classes: int) -> str | None:
    """Decodes one member's bytes: ``"bad_label"`` / ``"decode_error"`` when it fails, else None."""
    if ext in ("json", "txt"):
        return None
    if ext == "cls":
        try:
            return None if 0 <= int(data.decode("ascii").strip()) < num_classes else "bad_label"
        except (UnicodeDecodeError, ValueError):
            return "bad_label"
    from data_pipeline.transforms import decode_rgb  # torch: only for deep checks

    try:
        decode_rgb(data, ext)
    except CorruptSample:
        return "decode_error"
    return None


def inspect_dataset(
    data_dir: str | os.PathLike,
    deep: bool = False,
    workers: int | None = None,
    storage_options: dict | None = None,
) -> InspectReport:
    """Checks every shard of a built data set against its manifest.

    Args:
        data_dir: Folder or remote prefix with ``manifest.json``.
        deep: Also decode every image and parse every label (slow: a full pass over the data).
        workers: Threads checking shards in parallel (hashing and decoding release the GIL); default 4.
        storage_options: fsspec options of a remote location.

    Returns:
        The report; ``report.ok`` is false when any shard is bad, and ``report.bad_shards`` says why.

    Raises:
        FileNotFoundError: No data folder or no manifest.
        OSError: A remote location that does not answer.
        ValueError: The manifest is invalid.
    """
    manifest = load_manifest(Store(data_dir, storage_options))
    report = InspectReport(str(data_dir), manifest, deep)
    jobs = [(split, shard) for split, info in manifest.splits.items() for shard in info.shards]
    n = max(1, min(workers or 4, len(jobs) or 1))
    scratch = temp_download_dir()
    try:
        with ThreadPoolExecutor(n) as pool:
            results = list(pool.map(lambda j: _check_shard(manifest, j[1], deep, scratch), jobs))
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    for (split, shard), (reasons, found) in zip(jobs, results):
        report.shards_checked += 1
        report.samples_found[split] = report.samples_found.get(split, 0) + found
        if reasons:
            report.bad_shards.append(BadShard(split, shard.name, reasons))
            logger.warning("bad shard %s: %s", shard.name, "; ".join(reasons))
    listed = {s.name for _, s in jobs}
    try:
        present = manifest.shard_store.glob("*/*.tar")
    except ValueError:  # a location that gives no listing (plain HTTP): nothing to compare with
        present = []
    report.extra_files = [rel for rel in present if rel not in listed and not rel.startswith(".")]
    return report
