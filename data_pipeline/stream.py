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
   one window, never the whole epoch. Runs started before this (order version 1, :data:`LEGACY_ORDER`) drew ``u_i``
   from one sequential numpy stream and sorted the whole epoch in every process; their checkpoints resume with it;
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

Reading: a worker finds a sample's members through the shard's index (:func:`data_pipeline.shard_index.index_shard`,
built once per shard and process, cached): the stored index ``.index/<shard>.json`` that ``pretrain data build`` or
``pretrain data index`` wrote, when its recorded size is the shard's size, so the tar's headers are not read; else a
``tarfile`` scan of the tar, which also tells how it is broken (missing, empty, truncated). A data set built before
stored indexes existed (a version 1 manifest whose shards name no ``index``) is scanned, with the same batches. A
stored index of our own shard that cannot be read or does not list the shard's samples is warned about once per
shard and process and the shard scanned; one of a shard indexed by ``pretrain data index`` is an error that says to
re-run it (its keys and labels are nowhere else).

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
from collections import OrderedDict
from collections.abc import Callable, Iterator, Sequence
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import IterableDataset, get_worker_info

from data_pipeline.errors import DECODE_ERROR, MISSING_IMAGE, MISSING_LABEL, CorruptSample
from data_pipeline.manifest import Manifest, load_manifest
from data_pipeline.order import (
    LEGACY_ORDER,
    ORDER_VERSION,
    ORDER_VERSIONS,
    EpochOrder,
    _check_layout_args,
    batch_indices,
    num_batches,
    sample_key,
    split_shards,
    worker_batches,
)
from data_pipeline.shard_index import ShardIndex, StoredShard, index_shard, pick_image, read_stored_shard

__all__ = ["CORRUPT_REASONS", "ShardStream", "Transform"]

logger = logging.getLogger(__name__)

Transform = Callable[..., torch.Tensor]
"""``transform(data, ext, rng) -> uint8 tensor (3, S, S)``; raises ``CorruptSample`` on undecodable data. A transform
that also takes ``out=`` (a uint8 (3, S, S) row of the batch) writes its result there and returns ``out``."""

CORRUPT_REASONS = (
    "missing_shard",  # shard listed in the manifest is not on disk (or cannot be opened)
    "empty_shard",  # shard file holds no members although the manifest lists samples in it
    "truncated_shard",  # tar ends or breaks mid-way; the samples from the break on are lost
    "missing_samples",  # tar read cleanly but holds fewer samples than the manifest says
    "key_mismatch",  # tar holds keys outside the manifest's range for this shard, or lacks a key its stored index has
    "missing_image",  # sample has no image member, or an empty one
    "missing_label",  # sample has no .cls member
    "bad_label",  # .cls (or a stored label) is not an int in [0, num_classes) or a class name of the manifest
    "read_error",  # OSError while reading member bytes
    "decode_error",  # the transform raised CorruptSample (counted under its own ``reason``, this by default)
)

# Per-worker caches. The samples in flight come from a window of about shuffle_buffer + world_size * batch_size
# layout positions, i.e. a handful of shards at usual sizes; an index costs a few hundred bytes per sample, so 32
# indexes of 10k-sample shards stay near 100 MB per worker.
_MAX_OPEN_FILES = 16
_MAX_CACHED_INDEXES = 32
# Samples tried to learn the image size when a worker's first batch holds no decodable sample.
_SIZE_PROBE_LIMIT = 256


# ---------------------------------------------------------------------------------------------------------------------
# Reading samples out of tar shards


class _ShardReader:
    """Per-process cache of shard indexes and open shard files (both LRU).

    ``stored_paths[s]`` is shard ``s``'s stored index (None: a data set built before stored indexes, scanned);
    ``foreign``: the shards were indexed by ``pretrain data index`` (keys and labels come from their stored indexes).
    """

    def __init__(
        self,
        data_dir: Path,
        split: str,
        shards: Sequence[tuple[str, int]],
        offsets: np.ndarray,
        stored_paths: Sequence[Path | None],
        foreign: bool,
    ):
        self.data_dir, self.split, self.shards, self.offsets = data_dir, split, shards, offsets
        self.stored_paths, self.foreign = stored_paths, foreign
        self.pid = os.getpid()
        self._indexes: OrderedDict[int, ShardIndex] = OrderedDict()
        self._stored: OrderedDict[int, StoredShard] = OrderedDict()
        self._files: OrderedDict[int, Any] = OrderedDict()
        self._warned: set[int] = set()  # our shards whose stored index could not be used, warned about once

    def index(self, shard: int) -> ShardIndex:
        """The shard's members by key: from its stored index, or a tar scan (see the module docstring)."""
        idx = self._indexes.get(shard)
        if idx is None:
            path = self.data_dir / self.shards[shard][0]
            if self.foreign:
                idx = index_shard(path, None, self.split, self.stored(shard))
            else:
                expected = range(int(self.offsets[shard]), int(self.offsets[shard + 1]))
                idx = index_shard(path, expected, self.split, self._own_stored(shard, expected))
            self._indexes[shard] = idx
            if len(self._indexes) > _MAX_CACHED_INDEXES:
                self._indexes.popitem(last=False)
        else:
            self._indexes.move_to_end(shard)
        return idx

    def _own_stored(self, shard: int, expected: range) -> StoredShard | None:
        """The stored index ``pretrain data build`` wrote for our shard, if it has one that lists exactly the shard's
        samples; else None (the shard is scanned), with a warning once per shard if it has one that cannot be used."""
        path = self.stored_paths[shard]
        if path is None:
            return None  # built before stored indexes
        try:
            stored = read_stored_shard(path)
            if stored.keys != [sample_key(self.split, i) for i in expected]:
                raise ValueError(f"{path}: its samples are not the {len(expected)} the manifest lists for the shard")
        except (OSError, ValueError) as e:
            if shard not in self._warned:
                self._warned.add(shard)
                logger.warning(
                    "stored index of %s unusable (%s): scanning the tar instead; re-run `pretrain data "
                    "build` with the same arguments to rewrite it (the shards are kept)",
                    self.shards[shard][0],
                    e,
                )
            return None
        return stored

    def stored(self, shard: int) -> StoredShard | None:
        """The shard's stored index if ``pretrain data index`` made it (keys, labels), else None (our own shards)."""
        if not self.foreign:
            return None
        entry = self._stored.get(shard)
        if entry is None:
            try:
                entry = read_stored_shard(self.stored_paths[shard])  # type: ignore[arg-type] - set for every shard
            except (OSError, ValueError) as e:
                # Not a data error to skip over: every sample of the shard would go. Stop and say what to do.
                raise RuntimeError(
                    f"cannot read the stored index of {self.shards[shard][0]}: {e}; re-run `pretrain data index "
                    f"{self.data_dir}`"
                ) from e
            self._stored[shard] = entry
            if len(self._stored) > _MAX_CACHED_INDEXES:
                self._stored.popitem(last=False)
        else:
            self._stored.move_to_end(shard)
        return entry

    def read(self, shard: int, offset: int, size: int) -> bytes:
        f = self._files.get(shard)
        if f is None:
            f = open(self.data_dir / self.shards[shard][0], "rb")  # noqa: SIM115 - kept open in the LRU
            self._files[shard] = f
            if len(self._files) > _MAX_OPEN_FILES:
                self._files.popitem(last=False)[1].close()
        else:
            self._files.move_to_end(shard)
        f.seek(offset)
        data = f.read(size)
        if len(data) != size:
            raise OSError(f"short read: {len(data)} of {size} bytes at offset {offset}")
        return data

    def close(self) -> None:
        for f in self._files.values():
            f.close()
        self._files.clear()


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

    The epoch, the first batch to produce and the epoch order version live in shared memory (:meth:`set_position`,
    :meth:`set_order`), so persistent DataLoader workers see changes made in the main process when the next iteration
    starts. Each process computes only its own batches' samples (:class:`EpochOrder`).

    Args:
        data_dir: Folder with ``manifest.json`` and the shards.
        split: Split to stream.
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

    Raises:
        ValueError: Bad layout arguments, or ``image_size`` differs from ``transform.img_size``.
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
    ):
        super().__init__()
        _check_layout_args(world_size, rank, batch_size, shuffle_buffer, seed, 0)
        self.data_dir = Path(data_dir)
        self.manifest = manifest if manifest is not None else load_manifest(self.data_dir)
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
        self._stored_paths = [
            None if sh.index is None else self.data_dir / sh.index for sh in self.manifest.splits[split].shards
        ]
        # Our own shards' stored indexes are not checked here: a shard whose index is missing or broken is scanned.
        missing = (
            [str(p) for p in self._stored_paths if p is not None and not p.is_file()] if self.manifest.indexed else []
        )
        if missing:
            raise FileNotFoundError(
                f"{len(missing)} stored shard indexes listed in {self.data_dir}/manifest.json are missing, e.g. "
                f"{missing[0]}; re-run `pretrain data index {self.data_dir}`"
            )
        # [epoch, start_batch, order version]; fork/spawn hand the same shared page to the workers.
        self._position = multiprocessing.RawArray("q", 3)
        self._position[2] = ORDER_VERSION
        self._reader: _ShardReader | None = None
        self._plan_cache: tuple[tuple[int, int], EpochOrder | np.ndarray] | None = None

    def set_position(self, epoch: int, start_batch: int) -> None:
        """Makes the next ``iter()`` (in the main process or any worker) produce ``epoch`` from ``start_batch``."""
        if epoch < 0 or not 0 <= start_batch <= self.num_batches:
            raise ValueError(f"position epoch={epoch}, start_batch={start_batch} out of range (0..{self.num_batches})")
        self._position[0], self._position[1] = epoch, start_batch

    @property
    def order(self) -> int:
        """Epoch order version the next ``iter()`` uses (:data:`ORDER_VERSION` unless a legacy state set it)."""
        return int(self._position[2])

    def set_order(self, order: int) -> None:
        """Makes the next ``iter()`` use epoch order version ``order`` (one of :data:`ORDER_VERSIONS`)."""
        if order not in ORDER_VERSIONS:
            raise ValueError(f"order={order!r} is not a known epoch order version; known: {list(ORDER_VERSIONS)}")
        self._position[2] = order

    def _epoch_plan(self, epoch: int) -> EpochOrder | np.ndarray:
        """``epoch``'s order in the current version (cached for the last epoch asked).

        Version 2: an :class:`EpochOrder`, each batch computed when asked. Legacy: this rank's whole
        ``(num_batches, batch_size)`` grid, as before version 2 (the whole epoch is sorted either way; the grid is
        ``1 / world_size`` of it).
        """
        key = (epoch, self.order)
        if self._plan_cache is None or self._plan_cache[0] != key:
            self._plan_cache = None  # a legacy plan is a large array: never hold two
            kw = dict(seed=self.seed, epoch=epoch, shuffle_buffer=self.shuffle_buffer, train=self.train)
            if self.order == LEGACY_ORDER:
                layout = dict(world_size=self.world_size, rank=self.rank, batch_size=self.batch_size)
                plan = batch_indices(self.manifest, self.split, order=LEGACY_ORDER, **layout, **kw)
            else:
                plan = EpochOrder(np.diff(self.offsets), order=self.order, **kw)
            self._plan_cache = (key, plan)
        return self._plan_cache[1]

    def batch_rows(self, epoch: int, batch: int) -> np.ndarray:
        """Sample write indices of this rank's batch ``batch`` of ``epoch`` (int64 ``(batch_size,)``; -1: padding)."""
        if not 0 <= batch < self.num_batches:
            raise ValueError(f"batch={batch} is not in [0, {self.num_batches})")
        plan = self._epoch_plan(epoch)
        if isinstance(plan, np.ndarray):
            return plan[batch]
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
            self._reader = _ShardReader(
                self.data_dir, self.split, self.shards, self.offsets, self._stored_paths, self.manifest.indexed
            )
        for b in mine:
            yield self._make_batch(self.batch_rows(epoch, b), epoch)

    # -- one batch -------------------------------------------------------------------------------------------------

    def _load(
        self, index: int, epoch: int, out: torch.Tensor | None = None
    ) -> tuple[torch.Tensor | None, int, tuple[str, str, str] | None]:
        """Reads and transforms one sample: ``(image, label, None)`` or ``(None, 0, (reason, key, detail))``.

        ``out`` goes to a transform that takes it (the image returned is then ``out``).
        """
        assert self._reader is not None
        shard = int(np.searchsorted(self.offsets, index, side="right")) - 1
        shard_name = self.shards[shard][0]
        stored = self._reader.stored(shard)
        pos = index - int(self.offsets[shard])
        if stored is None:
            key = sample_key(self.split, index)
        elif pos < len(stored):
            key = stored.keys[pos]
        else:  # the stored index and the manifest disagree: the index was rewritten without the manifest
            key = f"{shard_name}#{pos}"
            return None, 0, ("missing_samples", key, f"the stored index of {shard_name} holds {len(stored)} samples")
        idx = self._reader.index(shard)
        exts = idx.members.get(key)
        if exts is None:
            if idx.problem is not None:
                return None, 0, (idx.problem, key, idx.detail)
            if stored is not None:
                detail = f"{shard_name} holds no {key}, which `pretrain data index` found in it (changed since?)"
                return None, 0, ("key_mismatch", key, detail)
            if idx.foreign_keys:
                return None, 0, ("key_mismatch", key, f"{shard_name} holds keys outside its manifest range")
            return None, 0, ("missing_samples", key, f"{shard_name} has no sample {key}")
        image_ext = pick_image(exts) if stored is None else stored.images[pos]
        if image_ext is None or image_ext not in exts or exts[image_ext][1] == 0:
            return None, 0, (MISSING_IMAGE, key, f"{shard_name}: members {sorted(exts)}")
        if stored is None and "cls" not in exts:
            return None, 0, (MISSING_LABEL, key, f"{shard_name}: members {sorted(exts)}")
        try:
            raw_label = self._reader.read(shard, *exts["cls"]) if stored is None else stored.labels[pos]
            data = self._reader.read(shard, *exts[image_ext])
        except OSError as e:
            return None, 0, ("read_error", key, f"{shard_name}: {e}")
        label = self._label(raw_label)
        if label is None:
            what = f".cls={raw_label[:32]!r}" if isinstance(raw_label, bytes) else f"{raw_label!r:.40} is no class"
            return None, 0, ("bad_label", key, f"{shard_name}: {what}")
        if self.num_classes and not 0 <= label < self.num_classes:
            return None, 0, ("bad_label", key, f"{shard_name}: label {label} not in [0, {self.num_classes})")
        rng = np.random.default_rng([self.seed, epoch, index]) if self.train else None
        try:
            if out is None:
                image = self.transform(data, image_ext, rng)
            else:
                image = self.transform(data, image_ext, rng, out=out)
        except CorruptSample as e:
            return None, 0, (e.reason or DECODE_ERROR, key, f"{shard_name}: {e.detail}")
        except Exception as e:
            # Anything but CorruptSample is a bug in the transform: fail loudly, but say which sample hit it.
            raise RuntimeError(f"transform failed on {key} ({shard_name}, .{image_ext}): {e!r}") from e
        self._check_image(image, key)
        return image, label, None

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
        # (B, 3, S, S), uninitialised: every row is either written by a decoded sample or zeroed below
        new_images = partial(_new_batch_images, self.batch_size, shared=get_worker_info() is not None)
        images = None if self.image_size is None else new_images(self.image_size)
        labels = torch.zeros(self.batch_size, dtype=torch.int64)
        valid = torch.zeros(self.batch_size, dtype=torch.bool)
        events: list[tuple[str, str, str]] = []
        for i, index in enumerate(rows.tolist()):
            if index < 0:  # eval padding
                continue
            out = images[i] if images is not None and self._transform_takes_out else None
            image, label, event = self._load(index, epoch, out)
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
        }

    def __getstate__(self) -> dict[str, Any]:
        # Open files and caches stay in the process that made them; workers build their own.
        state = self.__dict__.copy()
        state["_reader"], state["_plan_cache"] = None, None
        return state
