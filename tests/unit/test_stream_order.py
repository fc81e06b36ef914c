"""The epoch order computed a range at a time against a whole-epoch reference, and its mixing against a full-epoch
shuffle.

The reference here sorts the keys of every layout position of the epoch at once (argsort over all samples); the
stream never does that, it ranks a window around the positions asked for. The full-epoch shuffle
(:func:`_full_epoch_shuffle`) is the definition the windowed order's mixing is measured against.
"""

from __future__ import annotations

import hashlib
import itertools
import tracemalloc
from pathlib import Path

import numpy as np
import pytest
from data_fixtures import make_dataset, png_transform, write_manifest

from data_pipeline import order
from data_pipeline.loader import ResumableLoader, build_loader
from data_pipeline.order import ORDER_VERSION, EpochOrder, batch_indices, epoch_order

pytestmark = [
    pytest.mark.timeout(120),
    pytest.mark.filterwarnings("ignore:This DataLoader will create:UserWarning"),
]

LAYOUTS = {
    "mixed": [9, 7, 11, 0, 8, 10, 6],
    "empty shards": [0, 5, 0, 0, 3, 0, 12, 0],
    "one shard": [37],
    "single samples": [1] * 23,
    "one sample": [1],
    "uneven": [1, 40, 2, 0, 17, 3],
}
TRAIN_SHARDS = [9, 7, 11, 0, 8, 10, 6]  # 51 samples
SEED, BUFFER = 7, 16


def _reference_order(shard_samples: list[int], *, seed: int, epoch: int, shuffle_buffer: int) -> np.ndarray:
    """The order of :class:`EpochOrder`, slowly: every key of the epoch, one argsort (ties by layout position)."""
    counts = np.asarray(shard_samples, dtype=np.int64)
    offsets = np.concatenate([[0], np.cumsum(counts)])
    perm = np.random.default_rng([0x0DE7, seed, epoch]).permutation(len(counts))
    layout = np.concatenate([np.arange(offsets[s], offsets[s + 1]) for s in perm]).astype(np.int64)
    total = len(layout)
    keys = (
        np.arange(total, dtype=np.float64) + order._uniform(order._order_base(seed, epoch), 0, total) * shuffle_buffer
    )
    return layout[np.lexsort((np.arange(total), keys))]


def _full_epoch_shuffle(shard_samples: list[int], *, seed: int, epoch: int, shuffle_buffer: int) -> np.ndarray:
    """A full-epoch windowed shuffle: the shard permutation EpochOrder draws, then keys ``i + u_i * L``, every ``u_i``
    drawn from one sequential numpy stream after it, and one argsort of the whole epoch (no counter, no window)."""
    counts = np.asarray(shard_samples, dtype=np.int64)
    offsets = np.concatenate([[0], np.cumsum(counts)])
    total = int(offsets[-1])
    rng = np.random.default_rng([0x0DE7, seed, epoch])
    perm = rng.permutation(len(counts))
    layout = np.concatenate(
        [np.arange(offsets[s], offsets[s + 1], dtype=np.int64) for s in perm] or [np.zeros(0, np.int64)]
    )
    keys = np.arange(total, dtype=np.float64) + rng.random(total) * shuffle_buffer
    return layout[np.argsort(keys, kind="stable")]


def _digest(order: np.ndarray) -> str:
    return hashlib.sha256(order.astype("<i8").tobytes()).hexdigest()[:16]


# ---------------------------------------------------------------------------------------------------------------------
# The order itself


def test_splitmix64_matches_the_published_function() -> None:
    """The vectorised hash is splitmix64: the first outputs of the reference generator seeded with 1234567."""

    def splitmix64(state: int) -> tuple[int, int]:  # Vigna's splitmix64.c, in Python ints
        state = (state + 0x9E3779B97F4A7C15) & (2**64 - 1)
        z = state
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & (2**64 - 1)
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & (2**64 - 1)
        return state, z ^ (z >> 31)

    state, want = 1234567, []
    for _ in range(5):
        state, z = splitmix64(state)
        want.append((z >> 11) * 2.0**-53)
    # counter i + 1 of the reference is base + i * golden with base = seed + golden
    got = order._uniform((1234567 + 0x9E3779B97F4A7C15) & (2**64 - 1), 0, 5)
    assert got.tolist() == want
    assert order._uniform(99, 3, 7).tolist() == order._uniform(99, 0, 10)[3:7].tolist()  # any range alone


@pytest.mark.parametrize("layout", list(LAYOUTS), ids=list(LAYOUTS))
@pytest.mark.parametrize("shuffle_buffer", [1, 2, 7, 16, "total", "more"])
def test_any_range_equals_the_whole_epoch_sorted(layout: str, shuffle_buffer: int | str) -> None:
    shards = LAYOUTS[layout]
    total = sum(shards)
    buf = {"total": total, "more": 3 * total + 5}.get(shuffle_buffer, shuffle_buffer)
    rng = np.random.default_rng([total, buf])
    for seed, epoch in [(0, 0), (7, 1), (2**40 + 3, 5), (123, 2**33)]:
        want = _reference_order(shards, seed=seed, epoch=epoch, shuffle_buffer=buf)
        assert sorted(want.tolist()) == list(range(total))  # a permutation: every sample once
        order = EpochOrder(shards, seed=seed, epoch=epoch, shuffle_buffer=buf)
        assert len(order) == total
        assert np.array_equal(order.slice(0, total), want)
        assert np.array_equal(epoch_order(shards, seed=seed, epoch=epoch, shuffle_buffer=buf), want)
        for _ in range(40):
            a = int(rng.integers(0, total + 1))
            b = int(rng.integers(a, total + 1))
            assert np.array_equal(order.slice(a, b), want[a:b]), (seed, epoch, a, b)
        for p in range(total):  # single positions, the narrowest windows
            assert order.slice(p, p + 1)[0] == want[p]


def test_empty_split_and_bad_ranges() -> None:
    order = EpochOrder([0, 0], seed=1, epoch=0, shuffle_buffer=4)
    assert len(order) == 0 and order.slice(0, 0).tolist() == []
    order = EpochOrder([3, 4], seed=1, epoch=0, shuffle_buffer=4)
    for a, b in [(-1, 2), (3, 2), (0, 8)]:
        with pytest.raises(ValueError, match="not within"):
            order.slice(a, b)


def test_seeds_and_epochs_give_other_orders_and_the_shard_permutation_is_kept() -> None:
    shards = [50] * 20
    orders = {
        (seed, epoch): EpochOrder(shards, seed=seed, epoch=epoch, shuffle_buffer=30).slice(0, 1000)
        for seed in range(3)
        for epoch in range(3)
    }
    assert len({_digest(o) for o in orders.values()}) == len(orders)
    # a window of 1 keeps the layout: the shard sequence of the full-epoch shuffle (the same permutation draw)
    windowed = EpochOrder(shards, seed=5, epoch=2, shuffle_buffer=1).slice(0, 1000) // 50
    full = _full_epoch_shuffle(shards, seed=5, epoch=2, shuffle_buffer=1) // 50
    assert np.array_equal(windowed, full)


def test_the_order_is_pinned() -> None:
    """Checkpoints depend on it: a change of the order must come with a new :data:`ORDER_VERSION`."""
    assert ORDER_VERSION == 2
    got = EpochOrder(TRAIN_SHARDS, seed=SEED, epoch=0, shuffle_buffer=BUFFER).slice(0, sum(TRAIN_SHARDS))
    assert _digest(got) == "4269e9e5cbba8ca5"


def test_every_world_size_with_the_same_global_batch_sees_the_same_places(tmp_path: Path) -> None:
    shards, global_batch = [13, 0, 29, 8, 31, 4], 12  # 85 samples: 7 global batches, 1 sample dropped
    write_manifest(tmp_path, {"train": shards})  # no tar files: the plan needs the manifest only
    want = EpochOrder(shards, seed=SEED, epoch=3, shuffle_buffer=9).slice(0, 84).reshape(7, 12)
    for world_size in (1, 2, 3, 4, 6, 12):
        batch_size = global_batch // world_size
        eo = EpochOrder(shards, seed=SEED, epoch=3, shuffle_buffer=9)
        got = np.stack(
            [
                np.concatenate(
                    [eo.batch(b, world_size=world_size, rank=r, batch_size=batch_size) for r in range(world_size)]
                )
                for b in range(7)
            ]
        )
        assert np.array_equal(got, want), world_size
        for r in range(world_size):
            grid = batch_indices(
                tmp_path, "train", seed=SEED, epoch=3, world_size=world_size, rank=r, batch_size=batch_size,
                shuffle_buffer=9,
            )  # fmt: skip
            assert np.array_equal(grid, want[:, r * batch_size : (r + 1) * batch_size])
    assert len(set(want.reshape(-1).tolist())) == 84


def test_eval_batches_are_write_order_padded() -> None:
    eo = EpochOrder([5, 0, 4], seed=1, epoch=0, shuffle_buffer=3, train=False)
    rows = [eo.batch(b, world_size=2, rank=r, batch_size=2).tolist() for b in range(3) for r in range(2)]
    assert rows == [[0, 1], [2, 3], [4, 5], [6, 7], [8, -1], [-1, -1]]


def test_memory_grows_with_shards_and_window_not_samples() -> None:
    """100M samples in 100k shards: the order of the last batch costs a few MB, not the 3.3 GB of a whole epoch."""
    tracemalloc.start()
    try:
        order = EpochOrder(np.full(100_000, 1000), seed=SEED, epoch=9, shuffle_buffer=10_000)
        last = order.slice(100_000_000 - 256, 100_000_000)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 8 * 2**20, peak
    assert len(set(last.tolist())) == 256 and last.min() >= 0 and last.max() < 100_000_000


def test_shuffle_mixes_like_a_full_epoch_shuffle() -> None:
    """Both draw u_i ~ U[0, 1): displacement and same-shard neighbours agree within sampling noise."""
    shards, buf = [100] * 200, 1000

    def stats(out: np.ndarray) -> tuple[float, float]:
        """Mean |output position - layout position| and the fraction of batch neighbours from the same shard."""
        slot = np.empty(200, dtype=np.int64)  # layout slot of each shard (the same permutation in both)
        slot[np.random.default_rng([0x0DE7, 3, 1]).permutation(200)] = np.arange(200)
        layout = slot[out // 100] * 100 + out % 100
        shard = (out // 100).reshape(-1, 125)  # batches of 125
        return float(np.abs(np.arange(20_000) - layout).mean()), float((shard[:, 1:] == shard[:, :-1]).mean())

    windowed = EpochOrder(shards, seed=3, epoch=1, shuffle_buffer=buf).slice(0, 20_000)
    d_win, s_win = stats(windowed)
    d_full, s_full = stats(_full_epoch_shuffle(shards, seed=3, epoch=1, shuffle_buffer=buf))
    assert abs(d_win - d_full) < 0.05 * d_full
    assert abs(s_win - s_full) < 0.2 * s_full


# ---------------------------------------------------------------------------------------------------------------------
# Through the loader: resume, and the order version of its state


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_dataset(tmp_path_factory.mktemp("shards"), {"train": TRAIN_SHARDS, "val": [7]})


def _loader(data_dir: Path, *, workers: int = 0, **kw) -> ResumableLoader:
    args = dict(train=True, rank=0, world_size=1, batch_size=4, seed=SEED, shuffle_buffer=BUFFER, timeout_s=60)
    return build_loader(data_dir, "train", num_workers=workers, transform=png_transform, **{**args, **kw})


def _indices(batches: list[dict]) -> list[list[int]]:
    return [b["index"].tolist() for b in batches]


def test_resume_mid_epoch_yields_exactly_the_remaining_batches(data_dir: Path) -> None:
    kw = dict(rank=1, world_size=2, batch_size=3)  # 8 batches per epoch
    plan = [
        batch_indices(data_dir, "train", seed=SEED, epoch=e, shuffle_buffer=BUFFER, **kw).tolist() for e in range(2)
    ]
    first = _loader(data_dir, workers=2, **kw)
    consumed = list(itertools.islice(first.iter_batches(), 5))
    state = first.state_dict()
    first.close()
    assert state["order"] == ORDER_VERSION and (state["epoch"], state["batches_done"]) == (0, 5)

    resumed = _loader(data_dir, workers=3, persistent_workers=False, **kw)
    resumed.load_state_dict(state)
    rest = list(itertools.islice(resumed.iter_batches(), 11))  # the rest of epoch 0, then all of epoch 1
    assert resumed.state_dict()["order"] == ORDER_VERSION
    resumed.close()
    assert _indices(consumed + rest) == plan[0] + plan[1]


def test_a_state_of_another_order_version_or_none_is_refused(data_dir: Path) -> None:
    loader = _loader(data_dir)
    state = loader.state_dict() | {"batches_done": 2}
    assert state["order"] == ORDER_VERSION
    unversioned = {k: v for k, v in state.items() if k != "order"}
    with pytest.raises(ValueError, match="records no epoch order version; this code reads only version 2"):
        loader.load_state_dict(unversioned)
    for version in (1, 3, "2"):
        with pytest.raises(
            ValueError, match=f"records epoch order version {version!r}; this code reads only version 2"
        ):
            loader.load_state_dict({**state, "order": version})
    assert loader.batches_done == 0  # a refused state leaves the position as it was
    loader.load_state_dict(state)
    current = batch_indices(data_dir, "train", seed=SEED, epoch=0, world_size=1, rank=0, batch_size=4,
                            shuffle_buffer=BUFFER).tolist()  # fmt: skip
    assert _indices(list(loader)) == current[2:]
