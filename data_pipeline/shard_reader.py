"""Reading samples' members out of tar shards in one loader process: shard indexes, open files, range requests.

A :class:`ShardReader` is made per process (a forked DataLoader worker makes its own). It keeps, least recently used
first out, the members-by-key index of each shard it reads from (:func:`data_pipeline.shard_index.index_shard`: from
the shard's stored index when its size matches, else a tar scan), the stored indexes of shards indexed by ``pretrain
data index`` (keys and labels), and open files of local shards.

Every stored index is checked against the sha256 the manifest recorded for it when the shard is first opened here (the
file is read then anyway: the check costs one hash of it). A mismatch means the index changed after the manifest was
written (edited, damaged, or rewritten by an index run that did not finish), so its offsets and labels cannot be
trusted. For a shard of ``pretrain data index`` (keys and labels are nowhere else) the shard's samples are skipped and
counted as :data:`BAD_INDEX`, with one warning per shard and process naming it and the fix, like a corrupt shard:
refusing at start instead would mean reading every index before the first step (one request per shard on an object
store), and a run stopping hours in over one shard would lose more than the shard. For one of our own shards the tar
is scanned instead (its keys and labels are in the tar), with the same warning.

Shards in a remote store (:class:`data_pipeline.remote.Store`) are read by byte ranges taken from those indexes: a
batch's members are asked for together (:meth:`ShardReader.read_many`), concurrently, each range retried on transient
errors. With a :class:`~data_pipeline.shard_cache.ShardCache`, a shard read remotely is also fetched whole into the
cache in the background, and read from the local copy once it is there. A shard whose requests kept failing is
marked down for :data:`DOWN_FOR_S`: its samples are skipped as ``unreachable_shard`` at once instead of each waiting
out the retries again.
"""

from __future__ import annotations

import logging
import os
import time
from collections import OrderedDict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from data_pipeline.order import sample_key
from data_pipeline.remote import Store, StoreFile, Unreachable
from data_pipeline.shard_cache import ShardCache
from data_pipeline.shard_index import IndexChanged, ShardIndex, StoredShard, index_shard, read_stored_shard

__all__ = ["BAD_INDEX", "DOWN_FOR_S", "ShardReader", "UNREACHABLE_SHARD", "member_bytes", "member_ranges"]

logger = logging.getLogger(__name__)

UNREACHABLE_SHARD = "unreachable_shard"
"""Corrupt-sample reason of a sample whose remote shard (or stored index) kept failing transiently."""
BAD_INDEX = "bad_index"
"""Corrupt-sample reason of the samples of a shard whose stored index is not the one the manifest recorded."""
DOWN_FOR_S = 60.0
"""Seconds a shard that kept failing is skipped without new requests, in the process that saw it fail."""

# The samples in flight come from a window of about shuffle_buffer + world_size * batch_size layout positions, i.e. a
# handful of shards at usual sizes; an index costs a few hundred bytes per sample, so 32 indexes of 10k-sample shards
# stay near 100 MB per worker.
_MAX_OPEN_FILES = 16
_MAX_CACHED_INDEXES = 32
# Members of one sample farther apart than this are fetched by separate ranges rather than one range spanning both.
_MAX_SPAN_GAP = 64 << 10


def member_ranges(spans: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """``(offset, size)`` of members merged into as few ranges as possible without reading more than a small gap
    (a sample's members are next to each other in a WebDataset tar: one request for its image and label)."""
    out: list[list[int]] = []
    for offset, size in sorted(spans):
        if out and offset - (out[-1][0] + out[-1][1]) <= _MAX_SPAN_GAP:
            out[-1][1] = max(out[-1][1], offset + size - out[-1][0])
        else:
            out.append([offset, size])
    return [(o, n) for o, n in out]


def member_bytes(ranges: list[tuple[int, int]], chunks: list[bytes], offset: int, size: int) -> bytes:
    """The member at ``offset`` (``size`` bytes) cut out of the ``chunks`` read for ``ranges``."""
    for (start, n), data in zip(ranges, chunks):
        if start <= offset and offset + size <= start + n:
            return data[offset - start : offset - start + size]
    raise AssertionError(f"member at {offset} (+{size}) is in none of the ranges read")  # pragma: no cover


class ShardReader:
    """Per-process cache of shard indexes and open shard files (both LRU), and the reads of members.

    Args:
        shard_root: Where the shards are: a local folder, or a :class:`~data_pipeline.remote.Store`.
        split: The split (keys of our own shards are ``{split}_{index:08d}``).
        shards: ``(name, samples)`` per shard, in manifest order.
        offsets: Running sample counts, ``offsets[s]`` = first write index of shard ``s``.
        stored_paths: Each shard's stored index (a local path or a store's file); None: a data set built before
            stored indexes (scanned).
        foreign: The shards were indexed by ``pretrain data index`` (keys and labels come from their stored indexes).
        shard_info: ``(sha256, bytes)`` per shard, for the cache.
        cache: Whole-shard cache of remote shards (None: range reads only).
        index_digests: The sha256 the manifest recorded for each shard's stored index (None: not checked).
    """

    def __init__(
        self,
        shard_root: Path | str | Store,
        split: str,
        shards: Sequence[tuple[str, int]],
        offsets: np.ndarray,
        stored_paths: Sequence[Path | StoreFile | None],
        foreign: bool,
        *,
        shard_info: Sequence[tuple[str, int]] | None = None,
        cache: ShardCache | None = None,
        index_digests: Sequence[str | None] | None = None,
    ):
        self.store = shard_root if isinstance(shard_root, Store) else Store(shard_root)
        self.split, self.shards, self.offsets = split, shards, offsets
        self.stored_paths, self.foreign = stored_paths, foreign
        self.shard_info, self.cache = shard_info, cache if self.store.remote else None
        self.index_digests = list(index_digests) if index_digests is not None else [None] * len(shards)
        self._bad_index: dict[int, IndexChanged] = {}  # shards of `data index` whose stored index changed
        self.pid = os.getpid()
        self._indexes: OrderedDict[int, ShardIndex] = OrderedDict()
        self._stored: OrderedDict[int, StoredShard] = OrderedDict()
        self._files: OrderedDict[int, Any] = OrderedDict()
        self._warned: set[int] = set()  # our shards whose stored index could not be used, warned about once
        self._down: dict[int, tuple[float, str]] = {}

    def shard_file(self, shard: int) -> Path | StoreFile:
        name = self.shards[shard][0]
        return self.store.file(name) if self.store.remote else self.store.local(name)

    # -- shards that do not answer ---------------------------------------------------------------------------------

    def down(self, shard: int) -> str | None:
        """Why the shard is being skipped, while it is marked down; else None."""
        entry = self._down.get(shard)
        if entry is None:
            return None
        if time.monotonic() >= entry[0]:
            del self._down[shard]
            return None
        return entry[1]

    def mark_down(self, shard: int, detail: str) -> None:
        if shard not in self._down:
            logger.warning("shard %s is unreachable (%s): skipping its samples for %.0f s", self.shards[shard][0],
                           detail, DOWN_FOR_S)  # fmt: skip
        self._down[shard] = (time.monotonic() + DOWN_FOR_S, detail)

    # -- indexes ---------------------------------------------------------------------------------------------------

    def index(self, shard: int) -> ShardIndex:
        """The shard's members by key: from its stored index, or a tar scan (see :mod:`data_pipeline.stream`)."""
        idx = self._indexes.get(shard)
        if idx is None:
            path = self.shard_file(shard)
            try:
                if self.foreign:
                    idx = index_shard(path, None, self.split, self.stored(shard))
                else:
                    expected = range(int(self.offsets[shard]), int(self.offsets[shard + 1]))
                    idx = index_shard(path, expected, self.split, self._own_stored(shard, expected))
            except Unreachable as e:
                idx = ShardIndex({}, UNREACHABLE_SHARD, str(e), False)
            if idx.problem == UNREACHABLE_SHARD:
                self.mark_down(shard, idx.detail)
                return idx  # not cached: asked again once the shard is no longer marked down
            self._indexes[shard] = idx
            if len(self._indexes) > _MAX_CACHED_INDEXES:
                self._indexes.popitem(last=False)
        else:
            self._indexes.move_to_end(shard)
        return idx

    def _own_stored(self, shard: int, expected: range) -> StoredShard | None:
        """The stored index ``pretrain data build`` wrote for our shard, if it has one that lists exactly the shard's
        samples; else None (the shard is scanned), with a warning once per shard if it has one that cannot be used.

        Raises:
            Unreachable: The store kept failing to send it.
        """
        path = self.stored_paths[shard]
        if path is None:
            return None  # built before stored indexes
        try:
            stored = read_stored_shard(path, self.index_digests[shard])
            if stored.keys != [sample_key(self.split, i) for i in expected]:
                raise ValueError(f"{path}: its samples are not the {len(expected)} the manifest lists for the shard")
        except Unreachable:
            raise
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
        """The shard's stored index if ``pretrain data index`` made it (keys, labels), else None (our own shards).

        Raises:
            Unreachable: The store kept failing to send it (the caller skips the shard's samples).
            IndexChanged: It is not the index the manifest recorded (the caller skips the shard's samples as
                :data:`BAD_INDEX`; warned about once per shard).
            RuntimeError: It is missing or unreadable (every sample of the shard would go: re-run the indexer).
        """
        if not self.foreign:
            return None
        if shard in self._bad_index:
            raise self._bad_index[shard]
        entry = self._stored.get(shard)
        if entry is None:
            try:
                entry = read_stored_shard(self.stored_paths[shard], self.index_digests[shard])  # type: ignore[arg-type]
            except Unreachable:
                raise
            except IndexChanged as e:
                self._bad_index[shard] = IndexChanged(
                    f"{e}; re-run `pretrain data index` on the data set (check it first with `pretrain data inspect`)"
                )
                logger.warning("skipping the samples of %s as %s: %s", self.shards[shard][0], BAD_INDEX,
                               self._bad_index[shard])  # fmt: skip
                raise self._bad_index[shard] from None
            except (OSError, ValueError) as e:
                # Not a data error to skip over: every sample of the shard would go. Stop and say what to do.
                raise RuntimeError(
                    f"cannot read the stored index of {self.shards[shard][0]}: {e}; re-run `pretrain data index "
                    f"{self.store.url}`"
                ) from e
            self._stored[shard] = entry
            if len(self._stored) > _MAX_CACHED_INDEXES:
                self._stored.popitem(last=False)
        else:
            self._stored.move_to_end(shard)
        return entry

    # -- member bytes ----------------------------------------------------------------------------------------------

    def read(self, shard: int, offset: int, size: int) -> bytes:
        """``size`` bytes of the shard at ``offset``.

        Raises:
            OSError: The read failed or came back short (``Unreachable``: a remote shard kept failing).
        """
        (data,) = self.read_many([(shard, offset, size)])
        if isinstance(data, OSError):
            raise data
        return data

    def read_many(self, requests: Sequence[tuple[int, int, int]]) -> list[bytes | OSError]:
        """The bytes of each ``(shard, offset, size)``, or the ``OSError`` that ended it: local files (and cached
        copies) read in turn, remote ranges requested all at once."""
        out: list[bytes | OSError | None] = [None] * len(requests)
        remote: list[int] = []
        for i, (shard, offset, size) in enumerate(requests):
            path = self._local_path(shard)
            if path is None:
                remote.append(i)
                continue
            try:
                out[i] = self._read_file(shard, path, offset, size)
            except OSError as e:
                if self.cache is not None and self.shard_info is not None:  # a cached copy evicted meanwhile
                    self.cache.forget(self.shard_info[shard][0])
                    self._close(shard)
                    remote.append(i)
                else:
                    out[i] = e
        if remote:
            got = self.store.read_ranges([(self.shards[requests[i][0]][0], *requests[i][1:]) for i in remote])
            for i, data in zip(remote, got):
                out[i] = data
                shard = requests[i][0]
                if isinstance(data, Unreachable):
                    self.mark_down(shard, str(data))
                elif self.cache is not None and self.shard_info is not None:
                    sha, nbytes = self.shard_info[shard]
                    self.cache.fill(self.store, self.shards[shard][0], sha, nbytes)
        return out  # type: ignore[return-value] - every slot is set

    def _local_path(self, shard: int) -> Path | None:
        """Where the shard can be read locally: the local store's file, a cached copy, else None (read by ranges)."""
        if not self.store.remote:
            return self.store.local(self.shards[shard][0])
        if self.cache is None or self.shard_info is None:
            return None
        sha, nbytes = self.shard_info[shard]
        return self.cache.lookup(sha, nbytes)

    def _read_file(self, shard: int, path: Path, offset: int, size: int) -> bytes:
        f = self._files.get(shard)
        if f is None:
            f = open(path, "rb")  # noqa: SIM115 - kept open in the LRU
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

    def _close(self, shard: int) -> None:
        f = self._files.pop(shard, None)
        if f is not None:
            f.close()

    def take_retries(self) -> list[str]:
        """Requests re-sent since the last call, one note each (see :meth:`data_pipeline.remote.Store.take_retries`)."""
        notes = self.store.take_retries()
        for path in self.stored_paths:
            if isinstance(path, StoreFile) and path.store is not self.store:
                notes += path.store.take_retries()
                break  # every stored index lives in the one index store
        return notes

    def close(self) -> None:
        for f in self._files.values():
            f.close()
        self._files.clear()
