"""The epoch plan of a shard stream: which sample goes to which (rank, batch, row), as pure functions of (seed, epoch,
manifest, world size, batch size), and the order version a run records.

The contract (its steps spelled out in the docstring of :mod:`data_pipeline.stream`): an epoch's global order is a
pure function of (seed, epoch, manifest); the same samples land in the same places for every world size with the same
global batch; a rank or worker computes only the part of the order it needs (:class:`EpochOrder`, memory proportional
to the shards plus the shuffle window); a training epoch drops less than one global batch, eval yields every sample
once. Nothing here reads a tar file: ``pretrain data plan`` prints the loader's own order from these functions.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence

import numpy as np

from data_pipeline.manifest import Manifest, load_manifest
from data_pipeline.shard_index import IndexChanged, StoredShard, read_stored_shard

__all__ = [
    "ORDER_VERSION",
    "EpochOrder",
    "batch_indices",
    "epoch_order",
    "num_batches",
    "plan_batches",
    "sample_key",
    "split_shards",
    "worker_batches",
]

# Seed-sequence word that keeps the epoch-order RNG apart from the per-sample RNGs ([seed, epoch, index]).
_ORDER_DOMAIN = 0x0DE7
# splitmix64's counter increment (2**64 / golden ratio) and its wrap-around mask.
_GOLDEN = 0x9E3779B97F4A7C15
_MASK64 = 2**64 - 1

ORDER_VERSION = 2
"""Version of the epoch order computed here (sort keys from a counter-based hash, so a process computes only the
positions it needs), recorded in the loader's data state; a state of another version is refused."""


# ---------------------------------------------------------------------------------------------------------------------
# Manifest access


def split_shards(manifest: Manifest, split: str) -> list[tuple[str, int]]:
    """Returns ``[(shard name, samples), ...]`` of ``split`` in manifest order.

    Raises:
        ValueError: ``split`` is not in the manifest (the message lists the known splits).
    """
    if split not in manifest.splits:
        raise ValueError(f"split {split!r} is not in the manifest; known splits: {sorted(manifest.splits)}")
    return [(sh.name, int(sh.samples)) for sh in manifest.splits[split].shards]


def _as_manifest(manifest: Manifest | str | os.PathLike) -> Manifest:
    return load_manifest(manifest) if isinstance(manifest, (str, os.PathLike)) else manifest


# ---------------------------------------------------------------------------------------------------------------------
# The plan: pure functions of (seed, epoch, manifest, world_size, batch_size)


def sample_key(split: str, index: int) -> str:
    """Key of the sample with write index ``index`` in ``split`` (``train_00000042``)."""
    return f"{split}_{index:08d}"


def _check_layout_args(world_size: int, rank: int, batch_size: int, shuffle_buffer: int, seed: int, epoch: int) -> None:
    if world_size < 1:
        raise ValueError(f"world_size={world_size} must be >= 1")
    if not 0 <= rank < world_size:
        raise ValueError(f"rank={rank} must be in [0, world_size={world_size})")
    if batch_size < 1:
        raise ValueError(f"batch_size={batch_size} must be >= 1")
    if shuffle_buffer < 1:
        raise ValueError(f"shuffle_buffer={shuffle_buffer} must be >= 1")
    if seed < 0:
        raise ValueError(f"seed={seed} must be >= 0 (it seeds numpy SeedSequences)")
    if epoch < 0:
        raise ValueError(f"epoch={epoch} must be >= 0")


def epoch_order(
    shard_samples: Sequence[int],
    *,
    seed: int,
    epoch: int,
    shuffle_buffer: int,
    train: bool = True,
) -> np.ndarray:
    """The whole global sample order of one epoch, before the cut to whole global batches.

    Memory grows with the number of samples: the loader asks :class:`EpochOrder` for the positions it needs instead.

    Args:
        shard_samples: Samples per shard, in manifest order.
        seed: Stream seed.
        epoch: Epoch number.
        shuffle_buffer: Width of the windowed shuffle, in samples.
        train: ``False`` returns write order (eval).

    Returns:
        int64 array of sample write indices, length ``sum(shard_samples)``.
    """
    full = EpochOrder(shard_samples, seed=seed, epoch=epoch, shuffle_buffer=shuffle_buffer, train=train)
    return full.slice(0, full.num_samples)


def _mix64(z: int) -> int:
    """splitmix64's output function on a Python int (64-bit wrapping arithmetic)."""
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
    return z ^ (z >> 31)


def _order_base(seed: int, epoch: int) -> int:
    """64-bit hash of ``(seed, epoch)`` that starts the per-position counter of an epoch's sort keys."""
    z = _mix64(_ORDER_DOMAIN)
    for word in (seed, epoch):  # any size: fed 64 bits at a time, then the word count, so (a, b) != (a', b')
        n = 0
        while True:
            z = _mix64((z + (word & _MASK64) + _GOLDEN) & _MASK64)
            word, n = word >> 64, n + 1
            if word == 0:
                break
        z = _mix64((z + n) & _MASK64)
    return z


def _uniform(base: int, start: int, stop: int) -> np.ndarray:
    """``u_i ~ U[0, 1)`` for layout positions ``[start, stop)``: splitmix64 of the counter ``base + i * golden``.

    Counter-based, so any range is computed alone and equals the same range of a longer call. float64
    ``(stop - start,)`` with 53 random bits each.
    """
    z = np.arange(start, stop, dtype=np.uint64)  # uint64 arithmetic below wraps modulo 2**64, as splitmix64 wants
    z *= np.uint64(_GOLDEN)
    z += np.uint64(base)
    z ^= z >> np.uint64(30)
    z *= np.uint64(0xBF58476D1CE4E5B9)
    z ^= z >> np.uint64(27)
    z *= np.uint64(0x94D049BB133111EB)
    z ^= z >> np.uint64(31)
    z >>= np.uint64(11)
    return z.astype(np.float64) * 2.0**-53


class EpochOrder:
    """The global sample order of one epoch, computed a range of output positions at a time.

    Holds the shard permutation and the shards' running counts (O(number of shards)); :meth:`slice` computes the sort
    keys of a layout window about ``4 * shuffle_buffer`` wider than the range asked for, nothing else (see the module
    docstring).

    Args:
        shard_samples: Samples per shard, in manifest order.
        seed: Stream seed (>= 0).
        epoch: Epoch number (>= 0).
        shuffle_buffer: Width of the windowed shuffle, in samples (>= 1).
        train: ``False``: write order (eval).
    """

    def __init__(
        self,
        shard_samples: Sequence[int] | np.ndarray,
        *,
        seed: int,
        epoch: int,
        shuffle_buffer: int,
        train: bool = True,
    ):
        counts = np.asarray(shard_samples, dtype=np.int64)
        self.num_samples = int(counts.sum())
        self.train, self.shuffle_buffer = train, shuffle_buffer
        if not train:
            return
        perm = np.random.default_rng([_ORDER_DOMAIN, seed, epoch]).permutation(len(counts))  # shards in layout order
        self._counts = counts
        self._perm = perm.astype(np.int32 if len(counts) < 2**31 else np.int64)
        del perm
        self._write_ends = np.cumsum(counts)  # (S,) write index one past shard s
        self._layout_ends = counts[self._perm]
        np.cumsum(self._layout_ends, out=self._layout_ends)  # (S,) layout position one past the k-th laid shard
        self._base = _order_base(seed, epoch)

    def __len__(self) -> int:
        return self.num_samples

    def keys(self, start: int, stop: int) -> np.ndarray:
        """Sort keys ``i + u_i * shuffle_buffer`` of layout positions ``[start, stop)`` (float64)."""
        u = _uniform(self._base, start, stop)
        return np.arange(start, stop, dtype=np.float64) + u * self.shuffle_buffer

    def write_index(self, layout: np.ndarray) -> np.ndarray:
        """Sample write indices of layout positions (int64, any shape)."""
        k = np.searchsorted(self._layout_ends, layout, side="right")  # laid shard holding it (empty ones skipped)
        shard = self._perm[k]
        n = self._counts[shard]
        return self._write_ends[shard] - n + (layout - (self._layout_ends[k] - n))

    def slice(self, start: int, stop: int) -> np.ndarray:
        """Sample write indices at output positions ``[start, stop)`` of the epoch (int64, ``stop - start``).

        Raises:
            ValueError: The range is not within ``[0, num_samples]``.
        """
        if not 0 <= start <= stop <= self.num_samples:
            raise ValueError(f"positions [{start}, {stop}) are not within the epoch's [0, {self.num_samples})")
        if not self.train:
            return np.arange(start, stop, dtype=np.int64)
        if start == stop:
            return np.zeros(0, dtype=np.int64)
        # With L = shuffle_buffer, key i lies in [i, i + L] (the upper end only by rounding) and ties go to the
        # smaller layout position, so every i <= j - L sorts before j and every i >= j + L after it: the sample at
        # output position p has its layout position within [p - L + 1, p + L - 1]. A window reaching 2L past both
        # ends holds all of [start, stop)'s samples and ranks each of them exactly: for them, everything left of the
        # window sorts before and everything right of it after. The assert checks exactly that for the ones picked.
        w, n = self.shuffle_buffer, self.num_samples
        lo, hi = max(0, start - 2 * w), min(n, stop + 2 * w)
        by_key = np.argsort(self.keys(lo, hi), kind="stable")  # stable: ties by layout position, a total order
        layout = by_key[start - lo : stop - lo] + lo  # window rank == global rank - lo for the exact ones
        exact_left = lo == 0 or bool(layout.min() >= lo + w - 1)  # all i < lo are <= j - L
        exact_right = hi == n or bool(layout.max() <= hi - w)  # all i >= hi are >= j + L
        assert exact_left and exact_right, (start, stop, lo, hi, w)
        return self.write_index(layout)

    def batch(self, batch: int, *, world_size: int, rank: int, batch_size: int) -> np.ndarray:
        """Sample write indices of rank ``rank``'s batch ``batch`` (int64 ``(batch_size,)``, ``-1``: eval padding).

        Global batch ``g`` is positions ``[g * world_size * batch_size, (g + 1) * world_size * batch_size)``; the rank
        takes its rows ``[rank * batch_size, (rank + 1) * batch_size)``.
        """
        start = (batch * world_size + rank) * batch_size
        rows = np.full(batch_size, -1, dtype=np.int64)
        real = min(start + batch_size, self.num_samples) - min(start, self.num_samples)
        rows[:real] = self.slice(min(start, self.num_samples), min(start, self.num_samples) + real)
        return rows


def num_batches(num_samples: int, *, world_size: int, batch_size: int, train: bool = True) -> int:
    """Batches per rank per epoch: whole global batches for training, all samples (padded) for eval."""
    global_batch = world_size * batch_size
    return num_samples // global_batch if train else math.ceil(num_samples / global_batch)


def batch_indices(
    manifest: Manifest | str | os.PathLike,
    split: str,
    *,
    seed: int,
    epoch: int,
    world_size: int,
    rank: int,
    batch_size: int,
    shuffle_buffer: int,
    train: bool = True,
) -> np.ndarray:
    """Sample write indices of every batch of one rank in one epoch (the loader computes one batch at a time).

    Args:
        manifest: A loaded manifest, or the data folder holding ``manifest.json``.
        split: Split name (``train``, ``val``).
        seed: Stream seed (>= 0).
        epoch: Epoch number (>= 0).
        world_size: Number of data-parallel ranks.
        rank: This rank.
        batch_size: Samples per batch per rank.
        shuffle_buffer: Width of the windowed shuffle, in samples.
        train: Shuffle and drop the last partial global batch; ``False`` keeps write order and pads with ``-1``.

    Returns:
        int64 array ``(num_batches, batch_size)``; ``-1`` marks eval padding rows.
    """
    _check_layout_args(world_size, rank, batch_size, shuffle_buffer, seed, epoch)
    shards = split_shards(_as_manifest(manifest), split)
    epoch_plan = EpochOrder([n for _, n in shards], seed=seed, epoch=epoch, shuffle_buffer=shuffle_buffer, train=train)
    n_batches = num_batches(len(epoch_plan), world_size=world_size, batch_size=batch_size, train=train)
    global_batch = world_size * batch_size
    grid = np.full(n_batches * global_batch, -1, dtype=np.int64)
    used = min(len(epoch_plan), len(grid))  # train: cut to whole global batches; eval: the rest stays -1 padding
    grid[:used] = epoch_plan.slice(0, used)
    # (n_batches, W, B): global batch g, rank r's rows
    return grid.reshape(n_batches, world_size, batch_size)[:, rank, :].copy()


def plan_batches(
    manifest: Manifest | str | os.PathLike,
    split: str,
    *,
    seed: int,
    epoch: int,
    world_size: int,
    rank: int,
    batch_size: int,
    shuffle_buffer: int,
    train: bool = True,
) -> list[list[str]]:
    """Sample keys of every batch of one rank in one epoch, exactly as the loader yields them.

    Same arguments as :func:`batch_indices`; eval padding rows are omitted, so the last eval batches may be shorter
    (or empty). ``pretrain data plan`` prints this; ``--skip-batches N`` is ``plan[N:]``. Keys of shards indexed by
    ``pretrain data index`` come from their stored indexes (the manifest must be loaded from its folder), each
    checked against the sha256 the manifest recorded.

    Raises:
        IndexChanged: A stored index changed after the manifest was written.
        ValueError: Bad arguments, or a stored index that cannot be read or lists too few samples.
    """
    manifest = _as_manifest(manifest)
    grid = batch_indices(
        manifest,
        split,
        seed=seed,
        epoch=epoch,
        world_size=world_size,
        rank=rank,
        batch_size=batch_size,
        shuffle_buffer=shuffle_buffer,
        train=train,
    )
    if not manifest.indexed:
        return [[sample_key(split, int(i)) for i in row if i >= 0] for row in grid]
    root = manifest.root
    if root is None:
        raise ValueError("the manifest has stored shard indexes: load it with load_manifest(DIR) or pass DIR")
    shards = manifest.splits[split].shards
    offsets = np.concatenate([[0], np.cumsum([sh.samples for sh in shards], dtype=np.int64)])
    stored: dict[int, StoredShard] = {}

    def key(index: int) -> str:
        shard = int(np.searchsorted(offsets, index, side="right")) - 1
        if shard not in stored:
            try:
                stored[shard] = read_stored_shard(root.file(str(shards[shard].index)), shards[shard].index_sha256)
            except IndexChanged as e:
                raise IndexChanged(f"{e}; re-run `pretrain data index` on {root.url}") from None
        pos = index - int(offsets[shard])
        if pos >= len(stored[shard]):
            raise ValueError(f"the stored index of {shards[shard].name} holds fewer samples than the manifest lists")
        return stored[shard].keys[pos]

    return [[key(int(i)) for i in row if i >= 0] for row in grid]


def worker_batches(n_batches: int, *, num_workers: int, worker: int, start_batch: int = 0) -> range:
    """Batch numbers produced by DataLoader worker ``worker`` when an epoch starts at ``start_batch``.

    The DataLoader asks workers round-robin from worker 0 and returns results in request order, so worker ``w``
    owning batches ``start_batch + w (mod num_workers)`` delivers the batches in order. ``num_workers=0`` (main
    process) is one worker.
    """
    k = max(1, num_workers)
    if not 0 <= worker < k:
        raise ValueError(f"worker={worker} must be in [0, {k})")
    return range(start_batch + worker, n_batches, k)
