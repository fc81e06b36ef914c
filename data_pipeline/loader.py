"""A resumable per-rank loader: a DataLoader over :class:`~data_pipeline.stream.ShardStream` plus its position.

The trainer's view::

    loader = build_loader(data_dir, "train", train=True, rank=r, world_size=w, batch_size=b, num_workers=k, seed=s,
                          shuffle_buffer=1000, transform=t)
    loader.load_state_dict(client_state["data"])   # on resume
    for batch in loader:                           # the rest of the current epoch, then the epoch advances
        ...
        client_state["data"] = loader.state_dict()

Position: ``batches_done`` counts the batches handed to the consumer in the main process, not what workers
prefetched, so a checkpoint taken after training on a batch resumes right after it. A new ``iter(loader)`` always
continues from the stored position (after ``break``, ``load_state_dict`` or ``set_epoch``); only one iteration may be
active at a time.

Corrupt samples: workers put one event per skipped sample into the batch; the loader counts and logs (first and
every ``corrupt_log_every``-th per reason) only the events of batches it hands out. The counts are therefore the
number of skipped samples per reason in the consumed batches, exact whatever the prefetching, and they are part of
``state_dict()``. Requests to a remote store that were re-sent after a transient error travel the same way (the
batch's ``"retried"`` notes) and are counted under :data:`RETRIED_REQUESTS` with the corrupt samples: a count, not a
skipped sample (the sample arrived on a later try), in the same metrics and checkpoints.

Epoch order version: ``state_dict()`` records ``"order"``, the version of the epoch order the stream computes
(:data:`~data_pipeline.order.ORDER_VERSION`); ``load_state_dict`` refuses a state that records another version or
none, since its ``batches_done`` would not mean the same samples.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import signal
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch.utils.data import DataLoader

if TYPE_CHECKING:
    from data_pipeline.config import AugmentConfig, DataConfig

from data_pipeline.manifest import Manifest, load_manifest, resolve_split
from data_pipeline.order import ORDER_VERSION
from data_pipeline.remote import RetryPolicy, Store
from data_pipeline.shard_cache import ShardCache
from data_pipeline.stream import ShardStream, Transform

__all__ = ["RETRIED_REQUESTS", "DataParts", "ResumableLoader", "build_data", "build_loader", "check_data"]

logger = logging.getLogger(__name__)

_STATE_KEYS = ("epoch", "batches_done", "corrupt", "seed", "world_size", "batch_size", "data_fingerprint")
RETRIED_REQUESTS = "retried_requests"
"""Key of :meth:`ResumableLoader.corrupt_counts` counting remote requests re-sent after a transient error."""


class ResumableLoader:
    """Iterates one rank's batches epoch after epoch and can resume at any batch.

    Batches are ``{"image": uint8 (B, 3, S, S), "label": int64 (B,), "valid": bool (B,), "index": int64 (B,)}``;
    rows with ``valid=False`` are zero-filled (a skipped corrupt sample, or eval padding with ``index == -1``) and
    must be masked out of losses and metrics.

    Args:
        stream: The rank's :class:`ShardStream`.
        num_workers: DataLoader worker processes (0: load in the main process).
        persistent_workers: Keep workers alive across epochs.
        prefetch_factor: Batches prefetched per worker.
        corrupt_log_every: Log the first corrupt sample of each reason and then every N-th.
        pin_memory: Pin batches for faster host-to-device copies.
        timeout_s: Fail if a worker does not deliver a batch within this many seconds (0: wait forever).
    """

    def __init__(
        self,
        stream: ShardStream,
        *,
        num_workers: int,
        persistent_workers: bool = True,
        prefetch_factor: int = 2,
        corrupt_log_every: int = 100,
        pin_memory: bool = False,
        timeout_s: float = 0.0,
    ):
        if num_workers < 0:
            raise ValueError(f"num_workers={num_workers} must be >= 0")
        if prefetch_factor < 1:
            raise ValueError(f"prefetch_factor={prefetch_factor} must be >= 1")
        if corrupt_log_every < 1:
            raise ValueError(f"corrupt_log_every={corrupt_log_every} must be >= 1")
        self.stream = stream
        self.num_workers = num_workers
        self.corrupt_log_every = corrupt_log_every
        self._epoch = 0
        self._batches_done = 0
        self._corrupt: dict[str, int] = {}
        self._generation = 0  # bumped by every __iter__; an older, abandoned iteration then refuses to go on
        self._dataloader = DataLoader(
            stream,
            batch_size=None,  # the stream yields whole batches
            num_workers=num_workers,
            persistent_workers=persistent_workers and num_workers > 0,
            prefetch_factor=prefetch_factor if num_workers > 0 else None,
            pin_memory=pin_memory,
            timeout=timeout_s if num_workers > 0 else 0,  # the in-process iterator refuses a timeout
            worker_init_fn=_leave_stop_signals_to_the_main_process if num_workers > 0 else None,
        )

    # -- position ------------------------------------------------------------------------------------------------

    @property
    def epoch(self) -> int:
        """Epoch that the next batch belongs to (the current one while iterating)."""
        return self._epoch

    @property
    def batches_done(self) -> int:
        """Batches of the current epoch handed to the consumer."""
        return self._batches_done

    @property
    def num_samples(self) -> int:
        """Samples in this split, per the manifest."""
        return self.stream.num_samples

    def __len__(self) -> int:
        """Batches per epoch on this rank (the same on every rank)."""
        return self.stream.num_batches

    def set_epoch(self, epoch: int) -> None:
        """Moves to the start of ``epoch``; a no-op when already in ``epoch``, so a resumed position survives the
        usual ``for epoch in range(start, n): loader.set_epoch(epoch)`` loop."""
        if epoch < 0:
            raise ValueError(f"epoch={epoch} must be >= 0")
        if epoch != self._epoch:
            self._epoch, self._batches_done = epoch, 0

    def corrupt_counts(self) -> dict[str, int]:
        """Samples skipped so far per reason (in the batches handed out, across epochs and resumes), and under
        :data:`RETRIED_REQUESTS` the remote requests those batches re-sent after a transient error."""
        return dict(self._corrupt)

    def state_dict(self) -> dict[str, Any]:
        """Small, picklable position for the checkpoint's client state.

        A finished epoch is stored as the start of the next one.
        """
        epoch, done = self._epoch, self._batches_done
        if done >= len(self) > 0:
            epoch, done = epoch + 1, 0
        return {
            "epoch": epoch,
            "batches_done": done,
            "corrupt": dict(self._corrupt),
            "seed": self.stream.seed,
            "world_size": self.stream.world_size,
            "batch_size": self.stream.batch_size,
            "data_fingerprint": self.data_fingerprint(),
            "order": ORDER_VERSION,
        }

    def data_fingerprint(self) -> str:
        """Digest of this split's shards (names, sample counts, sha256): a checkpoint only resumes on the same data."""
        split = self.stream.manifest.splits[self.stream.split]
        rows = [[s.name, s.samples, s.sha256] for s in split.shards]
        return hashlib.sha256(json.dumps(rows).encode()).hexdigest()[:16]

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Makes the next iteration start at batch ``batches_done`` of ``epoch``.

        ``world_size`` and ``batch_size`` may change together as long as their product (the global batch) stays the
        same: the global sample sequence, and so the meaning of ``batches_done``, is unchanged.

        Raises:
            ValueError: A key is missing, or the seed or the global batch differ (the message names the field), or
                ``batches_done`` is beyond this epoch, or the state's epoch order version is missing or not
                :data:`~data_pipeline.order.ORDER_VERSION`.
        """
        missing = [k for k in _STATE_KEYS if k not in state]
        if missing:
            raise ValueError(f"loader state lacks {missing}; expected keys {list(_STATE_KEYS)}")
        seed, world_size, batch_size = int(state["seed"]), int(state["world_size"]), int(state["batch_size"])
        order = state.get("order")
        if order != ORDER_VERSION:
            found = "no epoch order version" if order is None else f"epoch order version {order!r}"
            raise ValueError(
                f"order: the checkpoint's data state records {found}; this code reads only version {ORDER_VERSION}, "
                "so its batches_done would not mean the same samples; resume it with the code that wrote it, or start "
                "a new run (new run.name)"
            )
        saved_fp = state["data_fingerprint"]
        if saved_fp != self.data_fingerprint():
            raise ValueError(
                f"data_fingerprint: the checkpoint was taken on other shards of split '{self.stream.split}' "
                f"({saved_fp} != {self.data_fingerprint()}); the data set at {self.stream.data_dir} was rebuilt or "
                "replaced, so batches_done would not mean the same samples. Point data.path at the data the run "
                "started with, or start a new run (new run.name)"
            )
        if seed != self.stream.seed:
            raise ValueError(
                f"seed: checkpoint has {seed}, this loader {self.stream.seed}; the sample order would differ"
            )
        if world_size * batch_size != self.stream.world_size * self.stream.batch_size:
            raise ValueError(
                f"world_size/batch_size: checkpoint has {world_size} x {batch_size}, this loader "
                f"{self.stream.world_size} x {self.stream.batch_size}; resuming needs the same global batch "
                "(world_size * batch_size)"
            )
        if (world_size, batch_size) != (self.stream.world_size, self.stream.batch_size):
            logger.info(
                "resuming the data stream elastically: %d x %d -> %d x %d (same global batch)",
                world_size,
                batch_size,
                self.stream.world_size,
                self.stream.batch_size,
            )
        epoch, done = int(state["epoch"]), int(state["batches_done"])
        if epoch < 0 or not 0 <= done <= len(self):
            raise ValueError(
                f"batches_done={done} (epoch={epoch}) is outside this split's {len(self)} batches per epoch"
            )
        if done == len(self) and done > 0:
            epoch, done = epoch + 1, 0
        self._epoch, self._batches_done = epoch, done
        self._corrupt = {str(k): int(v) for k, v in dict(state["corrupt"]).items()}

    # -- iteration -----------------------------------------------------------------------------------------------

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        """Yields the remaining batches of the current epoch, then moves to the start of the next epoch."""
        self._generation += 1
        generation, total = self._generation, len(self)
        if self._batches_done >= total > 0:
            # The last batch was handed out but the consumer stopped before asking for more: same as state_dict().
            self._epoch, self._batches_done = self._epoch + 1, 0
        self.stream.set_position(self._epoch, self._batches_done)
        for batch in self._dataloader:
            if generation != self._generation:
                raise RuntimeError("this loader iteration was superseded by a newer iter(loader)")
            self._batches_done += 1
            self._count_corrupt(batch.pop("corrupt"))
            self._count_retries(batch.pop("retried"))
            yield batch
        if generation != self._generation:
            return
        if self._batches_done != total:
            # Only a worker that died or yielded too little gets here: never hand out a silently short epoch.
            raise RuntimeError(f"epoch {self._epoch} ended after {self._batches_done} of {total} batches")
        self._epoch, self._batches_done = self._epoch + 1, 0

    def iter_batches(self) -> Iterator[dict[str, torch.Tensor]]:
        """Yields batches forever, epoch after epoch (for step-based training loops)."""
        if len(self) == 0:
            raise ValueError("the split has no whole batch: an endless iteration would never yield")
        while True:
            yield from self

    def _count_corrupt(self, events: list[tuple[str, str, str]]) -> None:
        for reason, key, detail in events:
            n = self._corrupt.get(reason, 0) + 1
            self._corrupt[reason] = n
            if n == 1 or n % self.corrupt_log_every == 0:
                logger.warning(
                    "skipped sample %s (%s): %s [%d %s so far on rank %d; logging the 1st and every %d-th]",
                    key,
                    reason,
                    detail,
                    n,
                    reason,
                    self.stream.rank,
                    self.corrupt_log_every,
                )

    def _count_retries(self, notes: list[str]) -> None:
        for note in notes:
            n = self._corrupt.get(RETRIED_REQUESTS, 0) + 1
            self._corrupt[RETRIED_REQUESTS] = n
            if n == 1 or n % self.corrupt_log_every == 0:
                logger.warning(
                    "retried a request to the data store: %s [%d retries so far on rank %d; logging the 1st and every "
                    "%d-th]",
                    note,
                    n,
                    self.stream.rank,
                    self.corrupt_log_every,
                )

    def close(self) -> None:
        """Stops persistent workers now rather than at garbage collection."""
        it = getattr(self._dataloader, "_iterator", None)
        if it is not None:
            # DataLoader has no public shutdown; its iterator's own shutdown is what __del__ would call.
            it._shutdown_workers()
            self._dataloader._iterator = None
        self._generation += 1

    def __enter__(self) -> ResumableLoader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def build_loader(
    data_dir: str | os.PathLike,
    split: str,
    *,
    train: bool,
    rank: int,
    world_size: int,
    batch_size: int,
    num_workers: int,
    seed: int,
    shuffle_buffer: int,
    transform: Transform,
    persistent_workers: bool = True,
    prefetch_factor: int = 2,
    corrupt_log_every: int = 100,
    image_size: int | None = None,
    pin_memory: bool = False,
    timeout_s: float = 0.0,
    storage_options: dict[str, Any] | None = None,
    cache_dir: str | os.PathLike | None = None,
    cache_max_gb: float = 50.0,
    remote_retries: int = 5,
) -> ResumableLoader:
    """Builds the loader of one rank for one split.

    Args:
        data_dir: Folder or remote prefix (``s3://``, ``https://``) with ``manifest.json`` and the shards.
        split: Split to stream (``train``, ``val``; ``val`` and ``validation`` find each other).
        train: Shuffle per epoch, dropping < 1 global batch; ``False``: every sample once, in write order, padded.
        rank: This data-parallel rank.
        world_size: Number of data-parallel ranks.
        batch_size: Samples per batch on this rank.
        num_workers: DataLoader worker processes (0: load in the main process).
        seed: Stream seed (>= 0); the order of an epoch is a pure function of (seed, epoch, manifest).
        shuffle_buffer: Width of the windowed shuffle, in samples.
        transform: ``transform(data, ext, rng) -> uint8 (3, S, S)``, raising ``CorruptSample`` on bad data.
        persistent_workers: Keep workers alive across epochs.
        prefetch_factor: Batches prefetched per worker.
        corrupt_log_every: Log the first corrupt sample of each reason and then every N-th.
        image_size: ``S``, to size zero-filled rows; ``None`` learns it from the first decoded sample.
        pin_memory: Pin batches for faster host-to-device copies.
        timeout_s: Fail if a worker does not deliver a batch within this many seconds (0: wait forever).
        storage_options: fsspec options of a remote ``data_dir``; ``cache_dir`` (bounded by ``cache_max_gb``)
            caches remote shards whole, ``remote_retries`` retries transient errors (the ``data`` config fields).

    Returns:
        The rank's :class:`ResumableLoader`, positioned at the start of epoch 0.

    Raises:
        ValueError: Bad arguments, an unknown split, or (``train=True``) a split smaller than one global batch.
    """
    stream = ShardStream(
        data_dir,
        split,
        train=train,
        rank=rank,
        world_size=world_size,
        batch_size=batch_size,
        seed=seed,
        shuffle_buffer=shuffle_buffer,
        transform=transform,
        image_size=image_size,
        storage_options=storage_options,
        cache=ShardCache(cache_dir, int(cache_max_gb * 1e9)) if cache_dir else None,
        retry=RetryPolicy(attempts=1 + remote_retries),
    )
    if train and stream.num_batches == 0:
        raise ValueError(
            f"split {split!r} has {stream.num_samples} samples, fewer than one global batch "
            f"(world_size {world_size} x batch_size {batch_size}); lower data.batch_size"
        )
    return ResumableLoader(
        stream,
        num_workers=num_workers,
        persistent_workers=persistent_workers,
        prefetch_factor=prefetch_factor,
        corrupt_log_every=corrupt_log_every,
        pin_memory=pin_memory,
        timeout_s=timeout_s,
    )


@dataclass
class DataParts:
    """Loaders and augmentation of one rank."""

    train: ResumableLoader
    val: ResumableLoader | None
    augment: Any
    """:class:`~data_pipeline.augment.DeviceAugment`: the batch-level augmentation, run on the rank's device."""
    normalize: Any
    """:func:`~data_pipeline.augment.normalize`: the eval-time normalisation."""


def _leave_stop_signals_to_the_main_process(worker_id: int) -> None:
    """In a DataLoader worker: SIGTERM, SIGINT and SIGUSR2 do nothing; the main process owns the stop.

    ``timeout``, a terminal's Ctrl-C and Slurm (preemption, time limit, ``scancel``) signal every process of the run,
    data workers included. torch installs a C handler for SIGTERM in each worker that kills it, and the main process's
    SIGCHLD handler then raises in the middle of the step or of the preemption checkpoint. The main process checkpoints
    and shuts its workers down itself (the DataLoader's done event), so a worker only has to keep going until then.
    """
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGUSR2):
        signal.signal(sig, _ignore_signal)


def _ignore_signal(signum: int, frame: Any) -> None:
    """A Python-level handler (not SIG_IGN, which a process would keep across an exec)."""


def build_data(
    data: DataConfig,
    augment: AugmentConfig,
    *,
    img_size: int,
    num_classes: int,
    rank: int,
    world_size: int,
    corrupt_log_every: int = 100,
    pin_memory: bool = False,
) -> DataParts:
    """Train/val loaders of one rank (``data`` section), the device-side augmentation and the eval normalisation."""
    from data_pipeline.augment import DeviceAugment, normalize
    from data_pipeline.transforms import build_transforms

    train_tf, eval_tf = build_transforms(augment, img_size)
    common = dict(
        rank=rank,
        world_size=world_size,
        num_workers=data.num_workers,
        seed=data.seed,
        shuffle_buffer=data.shuffle_buffer,
        prefetch_factor=data.prefetch_factor,
        corrupt_log_every=corrupt_log_every,
        image_size=img_size,
        persistent_workers=data.persistent_workers and data.num_workers > 0,
        pin_memory=pin_memory,
        storage_options=data.storage_options,
        cache_dir=data.cache_dir,
        cache_max_gb=data.cache_max_gb,
        remote_retries=data.remote_retries,
    )
    train = build_loader(
        data.path, data.train_split, train=True, batch_size=data.batch_size, transform=train_tf, **common
    )
    val = None
    if data.val_split:
        batch = data.val_batch_size or data.batch_size
        val = build_loader(data.path, data.val_split, train=False, batch_size=batch, transform=eval_tf, **common)
    return DataParts(train, val, DeviceAugment(augment, num_classes), normalize)


def check_data(data: DataConfig) -> tuple[Manifest, str, str]:
    """The data set of a ``data`` section, checked before any rank starts: ``(manifest, train split, val split)``,
    the splits as the manifest names them (``val`` finds ``validation``; an empty ``val_split`` stays empty).

    Raises:
        FileNotFoundError: No manifest at ``data.path``; the message names the command that makes one (``pretrain
            data index`` where shards are there already).
        OSError: A remote location that does not answer or refuses access.
        ValueError: An unreadable manifest, or a split it does not have (naming ``data.train_split`` or
            ``data.val_split`` and the splits there are).
    """
    store = Store(data.path, data.storage_options, RetryPolicy(attempts=1 + data.remote_retries))
    try:
        manifest = load_manifest(store)
    except FileNotFoundError:
        raise FileNotFoundError(_no_manifest(store)) from None
    except ValueError as e:
        raise ValueError(f"data.path={data.path}: unreadable manifest ({e})") from None
    splits = ", ".join(sorted(manifest.splits))
    try:
        train = resolve_split(manifest, data.train_split)
    except ValueError:
        raise ValueError(
            f"data.train_split={data.train_split!r} is not a split of {data.path} (its splits: {splits})"
        ) from None
    try:
        val = resolve_split(manifest, data.val_split) if data.val_split else ""
    except ValueError:
        raise ValueError(
            f"data.val_split={data.val_split!r} is not a split of {data.path} (its splits: {splits}); set "
            "data.val_split to one of them, or data.val_split='' to train without evaluation"
        ) from None
    if val and val != data.val_split:
        logger.info("data.val_split=%s: the data set calls it %r", data.val_split, val)
    return manifest, train, val


def _no_manifest(store: Store) -> str:
    """Why ``data.path`` is no data set, and the command that makes it one."""
    if not store.remote and not store.exists():
        return (
            f"data.path={store.url}: no such folder; make a data set there with `pretrain data build SOURCE --out "
            f"{store.url}` (e.g. SOURCE=digits), or point data.path at an indexed or built data set"
        )
    try:
        shards = store.glob("*.tar") + store.glob("*/*.tar")
    except (OSError, ValueError):
        shards = []
    if shards:
        return (
            f"data.path={store.url}: no manifest.json there, but WebDataset shards (e.g. {shards[0]}): index them "
            f"with `pretrain data index {store.url}` (see --split-glob and --label), then train again"
        )
    return (
        f"data.path={store.url}: no manifest.json there; for WebDataset shards there run `pretrain data index "
        f"{store.url}`, to make shards from images `pretrain data build SOURCE --out {store.url}`, or point data.path "
        "at an indexed or built data set"
    )
