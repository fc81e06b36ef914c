"""Writes WebDataset shards and the manifest: the engine of ``pretrain data build``.

A build runs in four steps:

1. **scan**: the source lists its candidate samples and every one is probed (fully decoded) in parallel; files that
   are not usable images are skipped and listed in ``manifest["skipped"]``.
2. **plan**: each split's samples are put in a seeded write order (so every shard mixes classes) and cut into shards
   by ``max_samples_per_shard`` and ``shard_size_mb``; sample ``i`` of a split gets key ``{split}_{i:08d}``. The plan
   is a pure function of the source, so shard ``k`` always holds the same samples and bytes.
3. **write**: shards are written in parallel, each atomically (``*.tar.tmp``, fsync, rename) followed by a sidecar
   ``*.tar.sha256`` (``sha256sum -c`` format) and its stored index ``.index/<shard>.json`` (every member's data
   offset and size, each sample's key, label and image member; schema in :mod:`data_pipeline.shard_index`), also
   atomic. The offsets come from the plan: a USTAR member is one 512-byte header, then its data padded to whole
   blocks (:meth:`ShardPlan.stored_index`; the planned size is checked against the file written). A shard whose final
   file already exists with the planned size and members and whose sha256 matches its sidecar is kept, so an
   interrupted build resumes where it stopped; a kept shard's stored index is written if it is missing or differs
   from the plan's (a build made before stored indexes existed gets them this way, without rewriting a shard).
4. **manifest**: ``manifest.json`` is removed when the build starts and written last; it lists every shard with
   samples, bytes, sha256, its stored index and the index's sha256. Tar headers carry a fixed mtime and owner, so
   the bytes of a shard are reproducible, and so are those of its stored index (``mtime_ns`` null).

To a store (``--out s3://bucket/prefix``): shards are written as above into a local temp folder, and each is uploaded
as soon as it is finished (the shard, then its sidecar, then its stored index) and removed locally, so local disk
holds only the shards in flight. A shard already in the store with the planned size and a sidecar (uploaded after
the shard, so it marks a complete upload) is kept, which makes a re-run finish an interrupted upload.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import multiprocessing
import os
import shutil
import tarfile
import time
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Executor, ProcessPoolExecutor, as_completed
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from data_pipeline.fsutil import fsync_dir
from data_pipeline.manifest import (
    MANIFEST_NAME,
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
    STORED_INDEX_DIR,
    encode_stored_index,
    index_digest,
    index_shard,
    stored_index_entry,
    stored_index_name,
    write_stored_index,
)
from data_pipeline.sources import Source, SourceItem, UnreadableImage, open_source

__all__ = ["ShardPlan", "build_shards", "plan_shards", "tar_size"]

logger = logging.getLogger(__name__)

WRITE_ORDER_SEED = 0
"""Seed of the per-split write order (a permutation of the source order, so shards mix classes)."""
TAR_MTIME = 0
"""mtime of every tar member: fixed, so re-building a shard gives identical bytes."""
TAR_MODE = 0o444
TAR_OWNER = "bigdata"  # webdataset.TarWriter's defaults for mode and owner
_BLOCK = tarfile.BLOCKSIZE  # 512: header and data granularity
_RECORD = tarfile.RECORDSIZE  # 10240: the archive is padded to a multiple of this
_MIB = 1 << 20


@dataclass(frozen=True)
class PlannedSample:
    key: str
    item: SourceItem
    meta: bytes  # the .json member

    def members(self) -> list[tuple[str, bytes | None, int]]:
        """``(member name, payload or None for the image, size)`` in the order TarWriter writes them (sorted)."""
        by_ext: dict[str, tuple[bytes | None, int]] = {
            "cls": (_cls_bytes(self.item.label), len(_cls_bytes(self.item.label))),
            "json": (self.meta, len(self.meta)),
            self.item.ext: (None, self.item.size),
        }
        return [(f"{self.key}.{ext}", *by_ext[ext]) for ext in sorted(by_ext)]


@dataclass(frozen=True)
class ShardPlan:
    """What shard ``name`` holds: samples in order and the exact size of the tar file."""

    split: str
    index: int
    name: str
    samples: tuple[PlannedSample, ...]
    bytes: int

    def stored_index(self, sha256: str, classes: list[str]) -> dict[str, Any]:
        """The shard's stored index (schema in :mod:`data_pipeline.shard_index`), from the plan alone: member ``j``'s
        data starts one header after the end of member ``j - 1``'s padded data."""
        samples: list[list[Any]] = []
        offset = 0
        for s in self.samples:
            spans: dict[str, list[int]] = {}
            for name, _, size in s.members():
                spans[name[len(s.key) + 1 :]] = [offset + _BLOCK, size]
                offset += _member_bytes(size)
            samples.append([s.key, int(s.item.label), s.item.ext, spans])
        return stored_index_entry(
            shard=self.name,
            size=self.bytes,
            mtime_ns=None,  # the bytes are reproducible: so is this file
            sha256=sha256,
            label="cls",
            classes_sha256=hashlib.sha256("\n".join(classes).encode()).hexdigest(),
            samples=samples,
        )


def _cls_bytes(label: int) -> bytes:
    return str(int(label)).encode("ascii")


def _member_bytes(size: int) -> int:
    return _BLOCK + -(-size // _BLOCK) * _BLOCK  # header + data padded to whole blocks


def tar_size(member_sizes: Iterable[int]) -> int:
    """Exact size of a plain (USTAR) tar holding members of these sizes, as tarfile writes it."""
    body = sum(_member_bytes(s) for s in member_sizes) + 2 * _BLOCK  # two zero blocks end the archive
    return -(-body // _RECORD) * _RECORD


def plan_shards(
    items: Iterable[SourceItem],
    meta: Callable[[SourceItem], dict[str, Any]],
    *,
    shard_size_mb: float,
    max_samples_per_shard: int,
) -> list[ShardPlan]:
    """Assigns keys and shards to probed items (deterministic: same items in, same plan out).

    Args:
        items: Probed items (``ext`` and ``size`` set), in source order.
        meta: The source's metadata function (stored as each sample's ``.json``).
        shard_size_mb: Target shard size in MiB; a shard closes before the sample that would pass it.
        max_samples_per_shard: Upper bound of samples per shard.

    Returns:
        Shards of ``train`` then ``val`` (then any other split, sorted), each split's shards numbered from 0.
    """
    if shard_size_mb <= 0 or max_samples_per_shard <= 0:
        raise ValueError("shard_size_mb and max_samples_per_shard must be positive")
    by_split: dict[str, list[SourceItem]] = {}
    for it in items:
        by_split.setdefault(it.split, []).append(it)
    limit = int(shard_size_mb * _MIB)
    plans: list[ShardPlan] = []
    for split in sorted(by_split, key=lambda s: (s not in ("train", "val"), s != "train", s)):
        split_items = by_split[split]
        order = np.random.default_rng([WRITE_ORDER_SEED, len(split_items)]).permutation(len(split_items))
        current: list[PlannedSample] = []
        current_bytes = 0
        for i, pos in enumerate(order):
            it = split_items[int(pos)]
            sample = PlannedSample(f"{split}_{i:08d}", it, json.dumps(meta(it), sort_keys=True).encode("utf-8"))
            cost = sum(_member_bytes(size) for _, _, size in sample.members())
            if current and (len(current) >= max_samples_per_shard or current_bytes + cost > limit):
                plans.append(_close_shard(split, _count(plans, split), current))
                current, current_bytes = [], 0
            current.append(sample)
            current_bytes += cost
        if current:
            plans.append(_close_shard(split, _count(plans, split), current))
    return plans


def _count(plans: list[ShardPlan], split: str) -> int:
    return sum(p.split == split for p in plans)


def _close_shard(split: str, index: int, samples: list[PlannedSample]) -> ShardPlan:
    size = tar_size(size for s in samples for _, _, size in s.members())
    return ShardPlan(split, index, f"{split}/shard-{index:06d}.tar", tuple(samples), size)


# -------------------------------------------------------------------------------------------------- shard writing


def _add_member(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mtime = TAR_MTIME
    info.mode = TAR_MODE
    info.uname = info.gname = TAR_OWNER
    tar.addfile(info, io.BytesIO(data))


class _HashingFile:
    """File wrapper that hashes what tarfile writes, so the sha256 needs no second read."""

    def __init__(self, f: Any):
        self.f = f
        self.sha = hashlib.sha256()

    def write(self, data: bytes) -> int:
        self.sha.update(data)
        return self.f.write(data)


def _sidecar(path: Path) -> Path:
    return path.with_name(path.name + ".sha256")


def _kept_sha(path: Path, plan: ShardPlan) -> str | None:
    """sha256 of an existing final shard if it is exactly the planned one, else None (it gets rewritten)."""
    try:
        if path.stat().st_size != plan.bytes:
            return None
        recorded = _sidecar(path).read_text().split()[0]
    except (OSError, IndexError):
        return None
    planned = [(name, size) for s in plan.samples for name, _, size in s.members()]
    scan = index_shard(path, None, plan.split)  # tarfile: members by key and extension, in tar order
    found = [(f"{key}.{ext}", size) for key, exts in scan.members.items() for ext, (_, size) in exts.items()]
    if scan.problem is not None or found != planned:
        return None
    sha = file_sha256(path)
    return sha if sha == recorded else None


def _write_shard(out_dir: Path, plan: ShardPlan, source: Source) -> tuple[ShardInfo, bool]:
    """Writes (or keeps) one shard and its stored index; returns its manifest entry and whether the shard was
    written."""
    final = out_dir / plan.name
    index_name = stored_index_name(plan.name)
    sha = _kept_sha(final, plan)
    if sha is not None:
        wrote, index_sha = write_stored_index(out_dir, index_name, plan.stored_index(sha, source.classes))
        if wrote:
            logger.info("kept %s, (re)wrote its stored index", plan.name)
        return ShardInfo(plan.name, len(plan.samples), plan.bytes, sha, index_name, index_sha), False
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.with_name(final.name + ".tmp")
    with open(tmp, "wb") as f:
        hashing = _HashingFile(f)
        # The member layout of webdataset.TarWriter (USTAR, members of a sample contiguous and sorted by
        # extension), written with tarfile directly: same bytes, without importing torch in every writer process.
        with tarfile.open(fileobj=hashing, mode="w|", format=tarfile.USTAR_FORMAT) as tar:
            for sample in plan.samples:
                data = source.read(sample.item)
                if len(data) != sample.item.size:
                    raise RuntimeError(
                        f"{sample.item.path} changed during the build ({len(data)} bytes, {sample.item.size} when "
                        "scanned); re-run the build"
                    )
                for name, payload, _ in sample.members():
                    _add_member(tar, name, data if payload is None else payload)
        f.flush()
        os.fsync(f.fileno())
        size = f.tell()
    if size != plan.bytes:
        raise RuntimeError(f"{tmp}: wrote {size} bytes, planned {plan.bytes} (tar layout assumption broken)")
    sha = hashing.sha.hexdigest()
    os.replace(tmp, final)
    side_tmp = _sidecar(final).with_name(_sidecar(final).name + ".tmp")
    side_tmp.write_text(f"{sha}  {final.name}\n")
    os.replace(side_tmp, _sidecar(final))
    fsync_dir(final.parent)
    _, index_sha = write_stored_index(out_dir, index_name, plan.stored_index(sha, source.classes))
    return ShardInfo(plan.name, len(plan.samples), plan.bytes, sha, index_name, index_sha), True


# ------------------------------------------------------------------------------------------------------ the build


def _probe(source: Source, item: SourceItem) -> SourceItem | tuple[SourceItem, str]:
    try:
        return source.probe(item)
    except UnreadableImage as e:
        return item, str(e)


def _probe_chunk(source: Source, items: list[SourceItem]) -> list[SourceItem | tuple[SourceItem, str]]:
    return [_probe(source, it) for it in items]


def _chunks(items: list[Any], n: int) -> Iterator[list[Any]]:
    for i in range(0, len(items), n):
        yield items[i : i + n]


class _SerialExecutor:
    """In-process stand-in for a pool (``workers <= 1``): same call pattern, no processes."""

    def map(self, fn: Callable[..., Any], *iterables: Iterable[Any]) -> Iterator[Any]:
        return map(fn, *iterables)

    def shutdown(self, wait: bool = True, cancel_futures: bool = False) -> None:
        pass


def _default_workers() -> int:
    return max(1, min(8, os.cpu_count() or 1))


def _cleanup(out_dir: Path, plans: list[ShardPlan]) -> None:
    """Removes temp files of an interrupted build and shard files (and stored indexes) the plan no longer has."""
    keep = {p.name for p in plans} | {p.name + ".sha256" for p in plans}
    keep |= {stored_index_name(p.name) for p in plans}
    paths = [*out_dir.glob("*/shard-*"), *out_dir.glob(f"{STORED_INDEX_DIR}/*/shard-*")]
    for path in sorted(paths):
        rel = path.relative_to(out_dir).as_posix()
        if rel.endswith(".tmp"):
            logger.info("removing leftover %s of an interrupted build", rel)
            path.unlink()
        elif rel not in keep and rel.endswith((".tar", ".tar.sha256", ".tar.json")):
            logger.warning("removing %s: not part of this build's plan", rel)
            path.unlink()


def build_shards(
    source: str,
    out_dir: str | os.PathLike,
    *,
    shard_size_mb: float = 256.0,
    max_samples_per_shard: int = 10000,
    workers: int | None = None,
    val: str | os.PathLike | None = None,
    val_fraction: float | None = None,
    progress: bool = True,
    storage_options: dict[str, Any] | None = None,
) -> Manifest:
    """Builds (or finishes) ``out_dir/{split}/shard-%06d.tar`` and ``out_dir/manifest.json`` from ``source``.

    Args:
        source: ``digits`` or ``imagefolder:PATH``.
        out_dir: Output folder (created), or a remote prefix (``s3://bucket/prefix``; see the module docstring).
        shard_size_mb: Target shard size in MiB.
        max_samples_per_shard: Most samples in one shard.
        workers: Processes that probe and write (default: CPUs, at most 8); ``<= 1`` runs in this process.
        val: imagefolder only: a second tree with the same classes for the val split.
        val_fraction: imagefolder only: fraction of each class put in val instead (seeded, stratified).
        progress: Show tqdm progress bars.
        storage_options: fsspec options of a remote ``out_dir``.

    Returns:
        The manifest that was written.

    Raises:
        ValueError: Bad source spec or options, or no readable sample at all.
        FileNotFoundError: The source folder does not exist.
        PermissionError: A remote ``out_dir`` that cannot be written.
    """
    t0 = time.perf_counter()
    src = open_source(source, val=val, val_fraction=val_fraction)
    store = Store(out_dir, storage_options)
    if store.remote:
        store.check_writable()
    out = temp_download_dir() if store.remote else Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    previous = previous_manifest(store)
    n_workers = _default_workers() if workers is None else max(1, int(workers))
    pool: Executor | _SerialExecutor
    if n_workers > 1:
        # spawn: a fresh interpreter per worker, safe whatever threads the caller runs (tqdm, torch)
        pool = ProcessPoolExecutor(n_workers, mp_context=multiprocessing.get_context("spawn"))
    else:
        pool = _SerialExecutor()
    try:
        candidates = src.list_items()
        items, skipped = _scan(pool, src, candidates, n_workers, progress)
        if not items:
            raise ValueError(f"source {src.spec} has no readable image ({len(skipped)} files skipped)")
        plans = plan_shards(items, src.meta, shard_size_mb=shard_size_mb, max_samples_per_shard=max_samples_per_shard)
        store.remove(MANIFEST_NAME)  # from here on shards change: no manifest until all are done
        infos, written = _write_to(store, out, pool, plans, src, progress)
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
        if store.remote:
            shutil.rmtree(out, ignore_errors=True)
    manifest = _make_manifest(src, items, plans, infos, skipped)
    if previous is not None and same_manifest_content(previous, manifest):
        manifest.created = previous.created  # nothing changed: keep the file byte-identical
    write_manifest(manifest, store)
    manifest.root = store
    logger.info(
        "built %s in %.1f s: %s; %d shards written, %d kept; %d files skipped",
        store.url,
        time.perf_counter() - t0,
        ", ".join(f"{k} {v.num_samples} samples / {len(v.shards)} shards" for k, v in manifest.splits.items()),
        written,
        len(plans) - written,
        len(skipped),
    )
    return manifest


def _write_to(
    store: Store, out: Path, pool: Executor | _SerialExecutor, plans: list[ShardPlan], src: Source, progress: bool
) -> tuple[dict[str, ShardInfo], int]:
    """Writes the planned shards into the folder ``out``, or through it into a remote store (uploaded one by one,
    those already there kept); returns their manifest entries and how many were written."""
    if store.remote:
        kept = _kept_in_store(store, plans, src.classes)
        todo = [p for p in plans if p.name not in kept]
        infos, written = _write_all(pool, out, todo, src, progress, partial(_upload, store, out))
        return {**infos, **kept}, written
    _cleanup(out, plans)
    for split in sorted({p.split for p in plans}):
        (out / split).mkdir(exist_ok=True)
    return _write_all(pool, out, plans, src, progress)


def _kept_in_store(store: Store, plans: list[ShardPlan], classes: list[str]) -> dict[str, ShardInfo]:
    """Shards already in the store with the planned size and a sidecar; their stored index is (re)written if it
    differs from the plan's."""
    kept: dict[str, ShardInfo] = {}
    for plan in plans:
        try:
            if store.size(plan.name) != plan.bytes:
                continue
            sha = store.read_bytes(plan.name + ".sha256").decode("ascii").split()[0]
        except (OSError, UnicodeDecodeError, IndexError):
            continue
        index_name = stored_index_name(plan.name)
        data = encode_stored_index(plan.stored_index(sha, classes))
        try:
            same = store.read_bytes(index_name) == data
        except OSError:
            same = False
        if not same:
            store.write_bytes(index_name, data)
        kept[plan.name] = ShardInfo(plan.name, len(plan.samples), plan.bytes, sha, index_name, index_digest(data))
    if kept:
        logger.info("%d of %d shards are already in %s: kept", len(kept), len(plans), store.url)
    return kept


def _upload(store: Store, out: Path, plan: ShardPlan, info: ShardInfo) -> None:
    """Uploads a finished shard, then its sidecar, then its stored index, and removes the local copies."""
    for rel in (plan.name, plan.name + ".sha256", stored_index_name(plan.name)):
        store.upload(out / rel, rel)
        (out / rel).unlink()


def _scan(
    pool: Executor | _SerialExecutor, src: Source, candidates: list[SourceItem], n_workers: int, progress: bool
) -> tuple[list[SourceItem], list[dict[str, str]]]:
    chunk = max(1, min(256, len(candidates) // (n_workers * 8) or 1))
    items: list[SourceItem] = []
    skipped: list[dict[str, str]] = []
    with tqdm(total=len(candidates), desc="scan", unit="file", disable=not progress, leave=False) as bar:
        for results in pool.map(_probe_chunk, [src] * -(-len(candidates) // chunk), _chunks(candidates, chunk)):
            for r in results:
                if isinstance(r, SourceItem):
                    items.append(r)
                else:
                    item, reason = r
                    logger.warning("skipping %s: %s", item.path, reason)
                    skipped.append({"path": item.path, "reason": reason})
            bar.update(len(results))
    return items, sorted(skipped, key=lambda s: s["path"])


def _write_all(
    pool: Executor | _SerialExecutor,
    out: Path,
    plans: list[ShardPlan],
    src: Source,
    progress: bool,
    on_written: Callable[[ShardPlan, ShardInfo], None] | None = None,
) -> tuple[dict[str, ShardInfo], int]:
    infos: dict[str, ShardInfo] = {}
    written = 0
    total = sum(len(p.samples) for p in plans)
    with tqdm(total=total, desc="write", unit="img", disable=not progress) as bar:
        if isinstance(pool, _SerialExecutor):
            done: Iterable[tuple[ShardPlan, tuple[ShardInfo, bool]]] = (
                (plan, _write_shard(out, plan, src)) for plan in plans
            )
        else:
            futures = {pool.submit(_write_shard, out, plan, src): plan for plan in plans}
            done = ((futures[f], f.result()) for f in as_completed(futures))  # progress as shards finish
        for plan, (info, was_written) in done:
            infos[plan.name] = info
            written += int(was_written)
            if on_written is not None:
                on_written(plan, info)
            bar.update(len(plan.samples))
    return infos, written


def _make_manifest(
    src: Source,
    items: list[SourceItem],
    plans: list[ShardPlan],
    infos: dict[str, ShardInfo],
    skipped: list[dict[str, str]],
) -> Manifest:
    exts = {it.ext for it in items}
    fmt = "jpeg" if exts == {"jpg"} else "png" if exts == {"png"} else "mixed"
    splits: dict[str, SplitInfo] = {}
    for plan in plans:
        split = splits.setdefault(plan.split, SplitInfo(0, {name: 0 for name in src.classes}, []))
        split.shards.append(infos[plan.name])
        split.num_samples += len(plan.samples)
        for s in plan.samples:
            split.class_counts[src.classes[s.item.label]] += 1
    return Manifest(
        source=src.spec,
        format=fmt,
        classes=list(src.classes),
        splits=splits,
        created=time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        skipped=skipped,
    )
