"""Deterministic, resumable sample streams over WebDataset-style tar shards.

The order of an epoch is a pure function of ``(seed, epoch, manifest)``; every rank, worker and resume point derives
the slice it needs from that order, so nothing has to be communicated between them.

Order of an epoch (``train=True``; computed by :mod:`data_pipeline.order`, where its functions live):

1. the split's shards are permuted with an RNG seeded from ``(seed, epoch)``;
2. their samples are laid out in that shard order, each shard's samples in write order;
3. a windowed shuffle mixes samples within about ``shuffle_buffer`` (``L``) positions: layout position ``i`` gets the
   sort key ``i + u_i * L`` with ``u_i ~ U[0, 1)`` and the samples are sorted by key, ties by layout position. This
   deviates from the sequential shuffle buffer of WebDataset on purpose: it mixes as widely (a sample moves by less
   than ``L`` places; with ``L >= num_samples`` it is a uniform permutation) and has no block edges. ``u_i`` is
   splitmix64 of a counter (``hash(seed, epoch) + i * golden``), so the keys of any layout range are computed alone,
   and since key ``i`` lies in ``[i, i + L]`` the sample at output position ``p`` comes from layout positions
   ``[p - L + 1, p + L - 1]``: output positions ``[a, b)`` are ranked exactly by sorting the keys of the layout window
   ``[a - 2L, b + 2L)`` (:class:`EpochOrder`). A process thus holds the shard permutation and running counts plus
   one window, never the whole epoch. The loader's state records this order as version 2
   (:data:`~data_pipeline.order.ORDER_VERSION`);
4. the order is cut to a multiple of the global batch ``world_size * batch_size`` (less than one global batch is
   dropped). Global batch ``g`` is positions ``[g * W * B, (g + 1) * W * B)``; rank ``r`` takes rows
   ``[r * B, (r + 1) * B)`` of it.

Hence rank ``r``'s batch ``b`` does not depend on the number of DataLoader workers, and the global sample sequence
does not depend on ``world_size`` as long as ``world_size * batch_size`` is constant (elastic resume: the same
``batches_done`` means the same samples consumed).

Eval (``train=False``): the split in write order, every sample exactly once; the last global batch is padded with
index ``-1`` so that every rank runs the same number of batches (ZeRO-3 needs equal forward passes per rank).

Sample indices and keys: a sample's index is its write index within the split. Shards hold contiguous ranges in
manifest order, so sample ``i`` lives in the shard ``s`` with ``offset[s] <= i < offset[s + 1]`` (``offset`` is the
running sum of the manifest's per-shard ``samples``) and is that shard's sample ``i - offset[s]``. In our own shards
(manifest version 1) its key is ``f"{split}_{i:08d}"`` and its label the ``.cls`` member; a shard holding keys outside
its range makes its missing keys count as ``key_mismatch``. In shards indexed by ``pretrain data index`` (version 2)
key, label and image extension are the ``i - offset[s]``-th entry of the shard's stored index, and a key the tar no
longer holds counts as ``key_mismatch``. Either way the reader checks that the shard holds the key.

Reading (:mod:`data_pipeline.shard_reader`): a worker finds a sample's members through the shard's index
(:func:`data_pipeline.shard_index.index_shard`, built once per shard and process, cached): the stored index
``.index/<shard>.json`` that ``pretrain data build`` or ``pretrain data index`` wrote, when its recorded size is the
shard's size, so the tar's headers are not read; else a ``tarfile`` scan of the tar, which also tells how it is broken
(missing, empty, truncated). A data set built before stored indexes existed (a version 1 manifest whose shards name no
``index``) is scanned, with the same batches. A stored index of our own shard that cannot be read, does not list the
shard's samples or is not the one the manifest recorded (its sha256) is warned about once per shard and process and
the shard scanned. One of a shard indexed by ``pretrain data index`` that is not the one the manifest recorded skips
the shard's samples as ``bad_index`` (why not a refusal at start: :mod:`data_pipeline.shard_reader`); one that is
missing or unreadable although its digest matches is an error that says to re-run the indexer. Every member is read
with the tar header before it, which must name the sample's key and extension with the member's size
(:func:`~data_pipeline.shard_index.member_header_problem`): an offset that points at another member (a shard replaced
by another of the same size, an index and manifest changed together) skips the sample as ``offset_mismatch`` instead
of feeding it another sample's bytes or label.

Locations: the data set may sit in a local folder or a remote store (``s3://``, ``https://``; the manifest may also
name a separate ``shard_location``). A remote shard's members are fetched by byte range, all of a batch's at once, with
retries; the order, the resume and the corrupt-sample counting are the same as on local disk. A request re-sent after
a transient error is reported with the batch (``"retried"``) and a shard that kept failing skips its samples as
``unreachable_shard``.

Workers: worker ``w`` of ``K`` yields the batches ``start + w, start + w + K, ...``; PyTorch's DataLoader fetches
from workers round-robin starting at worker 0, so the batches arrive in order. A worker reads only the samples of
its own batches, by seeking to their members' offsets, so skipped batches are neither read nor decoded.

Corrupt data never raises: each affected sample becomes a zero-filled row with ``valid=False`` and one event
``(reason, key, detail)`` in the batch's ``"corrupt"`` list; the loader in the main process counts and logs the
events of the batches it hands out, which keeps the counts exact under prefetching and resume. Reasons are listed in
:data:`CORRUPT_REASONS`.

Batch memory: each batch's ``(B, 3, S, S)`` image tensor is allocated once, in a DataLoader worker straight in shared
memory, and a transform that takes an ``out`` keyword (``TrainTransform``, ``EvalTransform``) writes each crop into its
row. Handing the batch to the main process then passes the shared-memory handle instead of copying the images into a
new shared segment (``torch.multiprocessing.reductions.reduce_storage``: ``_share_fd_cpu_`` returns the handle of a
storage that is already shared and copies any other), so a crop is copied once, from the resize output into the batch.

Per-sample randomness: the transform gets ``np.random.default_rng([seed, epoch, index])`` (``index`` is the sample's
write index), so a sample's crop is the same whichever rank, worker or resume point produces it; eval passes
``rng=None``.
"""

from __future__ import annotations

import inspect
import logging
import math
import multiprocessing
import os
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import partial
from typing import Any

import numpy as np
import torch
from torch.utils.data import IterableDataset, get_worker_info

from data_pipeline.errors import DECODE_ERROR, MISSING_IMAGE, MISSING_LABEL, CorruptSample
from data_pipeline.manifest import Manifest, load_manifest, resolve_split
from data_pipeline.order import (
    EpochOrder,
    _check_layout_args,
    num_batches,
    sample_key,
    split_shards,
    worker_batches,
)
from data_pipeline.remote import RetryPolicy, Store, Unreachable
from data_pipeline.shard_cache import ShardCache
from data_pipeline.shard_index import TAR_HEADER_BYTES, IndexChanged, member_header_problem, pick_image
from data_pipeline.shard_reader import BAD_INDEX, UNREACHABLE_SHARD, ShardReader, member_bytes, member_ranges

__all__ = ["CORRUPT_REASONS", "OFFSET_MISMATCH", "ShardStream", "Transform"]

logger = logging.getLogger(__name__)

OFFSET_MISMATCH = "offset_mismatch"
"""Corrupt-sample reason of a sample whose member, at its stored offset, is not behind that member's tar header."""

Transform = Callable[..., torch.Tensor]
"""``transform(data, ext, rng) -> uint8 tensor (3, S, S)``; raises ``CorruptSample`` on undecodable data. A transform
that also takes ``out=`` (a uint8 (3, S, S) row of the batch) writes its result there and returns ``out``."""

CORRUPT_REASONS = (
    "missing_shard",  # shard listed in the manifest is not on disk (or cannot be opened)
    "empty_shard",  # shard file holds no members although the manifest lists samples in it
    "truncated_shard",  # tar ends or breaks mid-way; the samples from the break on are lost
    "missing_samples",  # tar read cleanly but holds fewer samples than the manifest says
    "key_mismatch",  # tar holds keys outside the manifest's range for this shard, or lacks a key its stored index has
    BAD_INDEX,  # the shard's stored index is not the one the manifest recorded (sha256): its samples are skipped
    OFFSET_MISMATCH,  # the tar header before a member's stored offset is not that member's
    "missing_image",  # sample has no image member, or an empty one
    "missing_label",  # sample has no .cls member
    "bad_label",  # .cls (or a stored label) is not an int in [0, num_classes) or a class name of the manifest
    "read_error",  # OSError while reading member bytes
    "decode_error",  # the transform raised CorruptSample (counted under its own ``reason``, this by default)
    UNREACHABLE_SHARD,  # a remote shard (or its stored index) kept failing transiently after every retry
)

# Samples tried to learn the image size when a worker's first batch holds no decodable sample.
_SIZE_PROBE_LIMIT = 256


@dataclass
class _Located:
    """Where a sample's bytes are: its key, shard, members and the ranges to read; ``label`` when the stored index
    holds it (else it is the ``.cls`` member)."""

    key: str
    shard: int
    shard_name: str
    exts: dict[str, tuple[int, int]]
    image_ext: str
    label: int | str | None
    reads: list[str]  # the members read: the image and (own shards) the .cls, each with the tar header before it
    ranges: list[tuple[int, int]]  # (offset, size) within the shard, covering those members and their headers


@dataclass
class _Fetched:
    """A batch's samples located and read: ``(row, write index, where)`` per readable sample with its ranges' bytes
    (or errors), the ``(reason, key, detail)`` of the others, and the store requests that were retried meanwhile."""

    located: list[tuple[int, int, _Located]]
    events: list[tuple[str, str, str]]
    chunks: list[list[bytes | OSError]]
    retried: list[str]


def _takes_out(transform: Transform) -> bool:
    """Whether ``transform`` accepts an ``out`` keyword (the batch row to write into)."""
    try:
        return "out" in inspect.signature(transform).parameters
    except (TypeError, ValueError):  # a callable without a signature: the return-a-tensor protocol
        return False


def _new_batch_images(batch_size: int, image_size: int, shared: bool) -> torch.Tensor:
    """Uninitialised uint8 (B, 3, S, S), in shared memory if ``shared`` (in a DataLoader worker), else ordinary memory.

    The storage is created in shared memory, as ``default_collate`` does for its batches; ``torch.empty(...)
    .share_memory_()`` would first allocate ordinary memory and then copy it into a new shared segment.
    """
    shape = (batch_size, 3, image_size, image_size)
    if not shared:
        return torch.empty(shape, dtype=torch.uint8)
    storage = torch.UntypedStorage._new_shared(math.prod(shape))  # bytes: one per uint8
    return torch.empty(0, dtype=torch.uint8).set_(storage).view(shape)


# ---------------------------------------------------------------------------------------------------------------------
# The dataset


class ShardStream(IterableDataset):
    """Yields one rank's batches of one epoch, already collated; use with ``DataLoader(batch_size=None)``.

    Each yielded item is ``{"image": uint8 (B, 3, S, S), "label": int64 (B,), "valid": bool (B,), "index": int64 (B,),
    "corrupt": [(reason, key, detail), ...]}``. Invalid rows are zero-filled; ``index`` is the sample's write index,
    or ``-1`` for eval padding.

    The epoch and the first batch to produce live in shared memory (:meth:`set_position`), so persistent DataLoader
    workers see changes made in the main process when the next iteration starts. Each process computes only its own
    batches' samples (:class:`EpochOrder`).

    Args:
        data_dir: Folder or remote prefix (``s3://``, ``https://``) with ``manifest.json``, the stored indexes and
            (unless the manifest names a ``shard_location``) the shards.
        split: Split to stream (``val`` and ``validation`` find each other, see
            :func:`~data_pipeline.manifest.resolve_split`).
        train: Shuffle and drop the last partial global batch (``False``: write order, padded, ``rng=None``).
        rank: This rank.
        world_size: Number of data-parallel ranks.
        batch_size: Samples per batch on this rank.
        seed: Stream seed (>= 0).
        shuffle_buffer: Width of the windowed shuffle, in samples.
        transform: ``transform(data, ext, rng) -> uint8 (3, S, S)``, optionally taking ``out=`` (the batch row).
        image_size: ``S``; ``None`` takes ``transform.img_size`` if there is one, else learns it from the first
            decoded sample (needed to zero-fill padding).
        manifest: An already loaded manifest (default: read from ``data_dir``).
        storage_options: fsspec options of remote locations (:mod:`data_pipeline.remote`).
        cache: Local whole-shard cache of remote shards (None: byte ranges only).
        retry: Retry policy of remote requests.

    Raises:
        ValueError: Bad layout arguments, a split the data set does not have, or ``image_size`` differs from
            ``transform.img_size``.
    """

    def __init__(
        self,
        data_dir: str | os.PathLike,
        split: str,
        *,
        train: bool,
        rank: int,
        world_size: int,
        batch_size: int,
        seed: int,
        shuffle_buffer: int,
        transform: Transform,
        image_size: int | None = None,
        manifest: Manifest | None = None,
        storage_options: dict[str, Any] | None = None,
        cache: ShardCache | None = None,
        retry: RetryPolicy | None = None,
    ):
        super().__init__()
        _check_layout_args(world_size, rank, batch_size, shuffle_buffer, seed, 0)
        self.data_dir = str(data_dir)
        if manifest is None:
            manifest = load_manifest(Store(data_dir, storage_options, retry))
        if manifest.root is None:
            manifest.root = Store(data_dir, storage_options, retry)
        self.manifest = manifest
        self.index_store, self.shard_store, self.cache = manifest.root, manifest.shard_store, cache
        split = resolve_split(manifest, split)
        self.split, self.train, self.rank, self.world_size = split, train, rank, world_size
        self.batch_size, self.seed, self.shuffle_buffer, self.transform = batch_size, seed, shuffle_buffer, transform
        # TrainTransform/EvalTransform expose their output side; knowing it up front avoids probing for it.
        transform_size = getattr(transform, "img_size", None)
        if image_size is not None and transform_size is not None and image_size != transform_size:
            raise ValueError(f"image_size={image_size} differs from the transform's img_size={transform_size}")
        self.image_size = image_size if image_size is not None else transform_size
        self._transform_takes_out = _takes_out(transform)
        self.shards = split_shards(self.manifest, split)
        self.offsets = np.concatenate([[0], np.cumsum([n for _, n in self.shards], dtype=np.int64)]).astype(np.int64)
        self.num_samples = int(self.offsets[-1])
        self.num_batches = num_batches(self.num_samples, world_size=world_size, batch_size=batch_size, train=train)
        self.num_classes = len(self.manifest.classes)
        self._class_index = {name: i for i, name in enumerate(self.manifest.classes)}
        split_shards_info = self.manifest.splits[split].shards
        root = self.index_store
        self._stored_paths = [
            None if sh.index is None else root.file(sh.index) if root.remote else root.local(sh.index)
            for sh in split_shards_info
        ]
        self._shard_info = [(sh.sha256, sh.bytes) for sh in split_shards_info]
        # Our own shards' stored indexes are not checked here: a shard whose index is missing or broken is scanned.
        # Remote ones are checked when first read (one request per shard here would slow every start).
        missing = (
            [str(p) for p in self._stored_paths if p is not None and not root.remote and not p.is_file()]
            if self.manifest.indexed
            else []
        )
        if missing:
            raise FileNotFoundError(
                f"{len(missing)} stored shard indexes listed in {self.data_dir}/manifest.json are missing, e.g. "
                f"{missing[0]}; re-run `pretrain data index {self.data_dir}`"
            )
        # [epoch, start_batch]; fork/spawn hand the same shared page to the workers.
        self._position = multiprocessing.RawArray("q", 2)
        self._reader: ShardReader | None = None
        self._fetch_pool: ThreadPoolExecutor | None = None
        self._plan_cache: tuple[int, EpochOrder] | None = None

    def set_position(self, epoch: int, start_batch: int) -> None:
        """Makes the next ``iter()`` (in the main process or any worker) produce ``epoch`` from ``start_batch``."""
        if epoch < 0 or not 0 <= start_batch <= self.num_batches:
            raise ValueError(f"position epoch={epoch}, start_batch={start_batch} out of range (0..{self.num_batches})")
        self._position[0], self._position[1] = epoch, start_batch

    def _epoch_plan(self, epoch: int) -> EpochOrder:
        """``epoch``'s :class:`EpochOrder`, each batch computed when asked (cached for the last epoch asked)."""
        if self._plan_cache is None or self._plan_cache[0] != epoch:
            order = EpochOrder(
                np.diff(self.offsets), seed=self.seed, epoch=epoch, shuffle_buffer=self.shuffle_buffer, train=self.train
            )
            self._plan_cache = (epoch, order)
        return self._plan_cache[1]

    def batch_rows(self, epoch: int, batch: int) -> np.ndarray:
        """Sample write indices of this rank's batch ``batch`` of ``epoch`` (int64 ``(batch_size,)``; -1: padding)."""
        if not 0 <= batch < self.num_batches:
            raise ValueError(f"batch={batch} is not in [0, {self.num_batches})")
        plan = self._epoch_plan(epoch)
        return plan.batch(batch, world_size=self.world_size, rank=self.rank, batch_size=self.batch_size)

    def __iter__(self) -> Iterator[dict[str, Any]]:
        epoch, start = int(self._position[0]), int(self._position[1])
        info = get_worker_info()
        worker, n_workers = (0, 0) if info is None else (info.id, info.num_workers)
        mine = worker_batches(self.num_batches, num_workers=n_workers, worker=worker, start_batch=start)
        if len(mine) == 0:
            return
        if self._reader is None or self._reader.pid != os.getpid():
            # A forked worker must not share the parent's file offsets: every process opens its own files.
            self._reader = ShardReader(
                self.shard_store,
                self.split,
                self.shards,
                self.offsets,
                self._stored_paths,
                self.manifest.indexed,
                shard_info=self._shard_info,
                cache=self.cache,
                index_digests=[sh.index_sha256 for sh in self.manifest.splits[self.split].shards],
            )
        if not self.shard_store.remote:
            for b in mine:
                yield self._make_batch(self.batch_rows(epoch, b), epoch)
            return
        # Remote: batch b + 1's members are fetched (one thread, all its ranges at once) while batch b is decoded, so
        # the store's latency hides behind the decoding.
        with ThreadPoolExecutor(1, thread_name_prefix="shard-fetch") as pool:
            self._fetch_pool = pool
            try:
                rows = self.batch_rows(epoch, mine[0])
                pending = pool.submit(self._fetch, rows)
                for i in range(len(mine)):
                    fetched = pending.result()
                    current = rows
                    if i + 1 < len(mine):
                        rows = self.batch_rows(epoch, mine[i + 1])
                        pending = pool.submit(self._fetch, rows)
                    yield self._assemble(current, fetched, epoch)
            finally:
                self._fetch_pool = None

    # -- one batch -------------------------------------------------------------------------------------------------

    def _locate(self, index: int) -> _Located | tuple[str, str, str]:
        """Where sample ``index``'s members are (and the ranges to read), or the ``(reason, key, detail)`` it is
        skipped for."""
        assert self._reader is not None
        shard = int(np.searchsorted(self.offsets, index, side="right")) - 1
        shard_name = self.shards[shard][0]
        pos = index - int(self.offsets[shard])
        down = self._reader.down(shard)
        if down is not None:
            return UNREACHABLE_SHARD, f"{shard_name}#{pos}", down
        try:
            stored = self._reader.stored(shard)
        except Unreachable as e:
            self._reader.mark_down(shard, str(e))
            return UNREACHABLE_SHARD, f"{shard_name}#{pos}", str(e)
        except IndexChanged as e:
            return BAD_INDEX, f"{shard_name}#{pos}", str(e)
        if stored is None:
            key = sample_key(self.split, index)
        elif pos < len(stored):
            key = stored.keys[pos]
        else:  # the stored index and the manifest disagree: the index was rewritten without the manifest
            key = f"{shard_name}#{pos}"
            return "missing_samples", key, f"the stored index of {shard_name} holds {len(stored)} samples"
        idx = self._reader.index(shard)
        exts = idx.members.get(key)
        if exts is None:
            if idx.problem is not None:
                return idx.problem, key, idx.detail
            if stored is not None:
                return "key_mismatch", key, f"{shard_name} holds no {key}, which `pretrain data index` found in it"
            if idx.foreign_keys:
                return "key_mismatch", key, f"{shard_name} holds keys outside its manifest range"
            return "missing_samples", key, f"{shard_name} has no sample {key}"
        image_ext = pick_image(exts) if stored is None else stored.images[pos]
        if image_ext is None or image_ext not in exts or exts[image_ext][1] == 0:
            return MISSING_IMAGE, key, f"{shard_name}: members {sorted(exts)}"
        if stored is None and "cls" not in exts:
            return MISSING_LABEL, key, f"{shard_name}: members {sorted(exts)}"
        reads = [image_ext] + (["cls"] if stored is None else [])
        spans = [(exts[e][0] - TAR_HEADER_BYTES, exts[e][1] + TAR_HEADER_BYTES) for e in reads]  # header + data
        label = None if stored is None else stored.labels[pos]
        return _Located(key, shard, shard_name, exts, image_ext, label, reads, member_ranges(spans))

    def _finish(
        self, at: _Located, chunks: list[bytes | OSError], index: int, epoch: int, out: torch.Tensor | None
    ) -> tuple[torch.Tensor | None, int, tuple[str, str, str] | None]:
        """Label and transform of a located sample from the bytes read: ``(image, label, None)`` or ``(None, 0,
        (reason, key, detail))``; ``out`` goes to a transform that takes it."""
        key, shard_name = at.key, at.shard_name
        failed = next((c for c in chunks if isinstance(c, OSError)), None)
        if failed is not None:
            reason = UNREACHABLE_SHARD if isinstance(failed, Unreachable) else "read_error"
            return None, 0, (reason, key, f"{shard_name}: {failed}")
        datas: list[bytes] = chunks  # type: ignore[assignment] - no OSError left
        for ext in at.reads:
            offset, size = at.exts[ext]
            header = member_bytes(at.ranges, datas, offset - TAR_HEADER_BYTES, TAR_HEADER_BYTES)
            problem = member_header_problem(header, key, ext, size)
            if problem is not None:
                where = f"{shard_name}: .{ext} at byte {offset}"
                return None, 0, (OFFSET_MISMATCH, key, f"{where}: {problem}; check it with `pretrain data inspect`")
        raw_label = at.label if at.label is not None else member_bytes(at.ranges, datas, *at.exts["cls"])
        data = member_bytes(at.ranges, datas, *at.exts[at.image_ext])
        label = self._label(raw_label)
        if label is None:
            what = f".cls={raw_label[:32]!r}" if isinstance(raw_label, bytes) else f"{raw_label!r:.40} is no class"
            return None, 0, ("bad_label", key, f"{shard_name}: {what}")
        if self.num_classes and not 0 <= label < self.num_classes:
            return None, 0, ("bad_label", key, f"{shard_name}: label {label} not in [0, {self.num_classes})")
        rng = np.random.default_rng([self.seed, epoch, index]) if self.train else None
        try:
            if out is None:
                image = self.transform(data, at.image_ext, rng)
            else:
                image = self.transform(data, at.image_ext, rng, out=out)
        except CorruptSample as e:
            return None, 0, (e.reason or DECODE_ERROR, key, f"{shard_name}: {e.detail}")
        except Exception as e:
            # Anything but CorruptSample is a bug in the transform: fail loudly, but say which sample hit it.
            raise RuntimeError(f"transform failed on {key} ({shard_name}, .{at.image_ext}): {e!r}") from e
        self._check_image(image, key)
        return image, label, None

    def _read(self, located: list[_Located]) -> list[list[bytes | OSError]]:
        """The ranges of every located sample, read together (remote: one concurrent round of requests)."""
        assert self._reader is not None
        requests = [(at.shard, offset, size) for at in located for offset, size in at.ranges]
        got = iter(self._reader.read_many(requests))
        return [[next(got) for _ in at.ranges] for at in located]

    def _fetch(self, rows: np.ndarray) -> _Fetched:
        """Locates the samples of ``rows`` and reads their bytes (the reader is only used here, in one thread)."""
        fetched = _Fetched([], [], [], [])
        for i, index in enumerate(rows.tolist()):
            if index < 0:  # eval padding
                continue
            at = self._locate(index)
            if isinstance(at, _Located):
                fetched.located.append((i, index, at))
            else:
                fetched.events.append(at)
        fetched.chunks = self._read([at for _, _, at in fetched.located])
        assert self._reader is not None
        fetched.retried = self._reader.take_retries()
        return fetched

    def _load(
        self, index: int, epoch: int, out: torch.Tensor | None = None
    ) -> tuple[torch.Tensor | None, int, tuple[str, str, str] | None]:
        """Reads and transforms one sample: ``(image, label, None)`` or ``(None, 0, (reason, key, detail))``."""
        rows = np.array([index], dtype=np.int64)
        pool = self._fetch_pool  # while batches are prefetched, the reader is the fetch thread's
        fetched = pool.submit(self._fetch, rows).result() if pool is not None else self._fetch(rows)
        if fetched.events:
            return None, 0, fetched.events[0]
        (_, _, at), chunks = fetched.located[0], fetched.chunks[0]
        return self._finish(at, chunks, index, epoch, out)

    def _label(self, raw: bytes | int | str) -> int | None:
        """Class index of a ``.cls`` member's bytes (ASCII int) or of a stored label (an index, or a class name)."""
        if isinstance(raw, bytes):
            try:
                return int(raw.decode("ascii").strip())
            except (UnicodeDecodeError, ValueError):
                return None
        if isinstance(raw, int) and not isinstance(raw, bool):
            return raw
        return self._class_index.get(raw) if isinstance(raw, str) else None

    def _check_image(self, image: Any, key: str) -> None:
        if not (
            isinstance(image, torch.Tensor) and image.dtype == torch.uint8 and image.ndim == 3 and image.shape[0] == 3
        ):
            got = f"{type(image).__name__} {getattr(image, 'dtype', '')} {tuple(getattr(image, 'shape', ()))}"
            raise TypeError(f"transform must return a uint8 tensor (3, S, S); got {got} for {key}")
        if self.image_size is None:
            self.image_size = int(image.shape[-1])
        if tuple(image.shape[1:]) != (self.image_size, self.image_size):
            raise ValueError(
                f"transform returned {tuple(image.shape)} for {key}; the stream's image_size is {self.image_size}"
            )

    def _probe_image_size(self, epoch: int) -> int:
        """Decodes this rank's samples of the epoch until one works, to size an all-invalid batch before any success
        (rare)."""
        tried = 0
        for b in range(math.ceil(_SIZE_PROBE_LIMIT / self.batch_size)):
            if b >= self.num_batches:
                break
            for index in self.batch_rows(epoch, b)[: _SIZE_PROBE_LIMIT - tried].tolist():
                tried += 1
                if index >= 0:
                    image, _, _ = self._load(index, epoch)
                    if image is not None:
                        return int(image.shape[-1])
        raise RuntimeError(
            f"no decodable sample among the first {_SIZE_PROBE_LIMIT} of split {self.split!r} on rank {self.rank}; "
            "pass image_size to size the padding, or check the data with `pretrain data inspect`"
        )

    def _make_batch(self, rows: np.ndarray, epoch: int) -> dict[str, Any]:
        return self._assemble(rows, self._fetch(rows), epoch)

    def _assemble(self, rows: np.ndarray, fetched: _Fetched, epoch: int) -> dict[str, Any]:
        """The batch of ``rows`` from their fetched bytes: decoded, transformed, the skipped ones zero-filled."""
        # (B, 3, S, S), uninitialised: every row is either written by a decoded sample or zeroed below
        new_images = partial(_new_batch_images, self.batch_size, shared=get_worker_info() is not None)
        images = None if self.image_size is None else new_images(self.image_size)
        labels = torch.zeros(self.batch_size, dtype=torch.int64)
        valid = torch.zeros(self.batch_size, dtype=torch.bool)
        events = list(fetched.events)
        for (i, index, at), chunks in zip(fetched.located, fetched.chunks):
            out = images[i] if images is not None and self._transform_takes_out else None
            image, label, event = self._finish(at, chunks, index, epoch, out)
            if event is not None:
                events.append(event)
                continue
            labels[i], valid[i] = label, True
            if images is None:  # the first decoded sample of a transform that does not say its size told it
                images = new_images(self.image_size)
            if image is not out:
                images[i] = image
        if images is None:  # no sample decoded and the size still unknown
            self.image_size = self._probe_image_size(epoch)
            images = new_images(self.image_size)
        if not valid.all():
            images[~valid] = 0  # padding and corrupt rows (a transform may have written part of one before failing)
        return {
            "image": images,
            "label": labels,
            "valid": valid,
            "index": torch.as_tensor(rows, dtype=torch.int64).clone(),
            "corrupt": events,
            "retried": fetched.retried,
        }

    def __getstate__(self) -> dict[str, Any]:
        # Open files and caches stay in the process that made them; workers build their own.
        state = self.__dict__.copy()
        state["_reader"], state["_plan_cache"], state["_fetch_pool"] = None, None, None
        return state
