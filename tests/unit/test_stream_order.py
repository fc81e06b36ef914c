"""The epoch order computed a range at a time (order version 2) against a whole-epoch reference, and the legacy order.

The reference here sorts the keys of every layout position of the epoch at once (argsort over all samples); the
stream never does that for version 2, it ranks a window around the positions asked for.
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
from data_pipeline.order import LEGACY_ORDER, ORDER_VERSION, EpochOrder, batch_indices, epoch_order

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
    """Version 2, slowly: every key of the epoch, one argsort (ties by layout position)."""
    counts = np.asarray(shard_samples, dtype=np.int64)
    offsets = np.concatenate([[0], np.cumsum(counts)])
    perm = np.random.default_rng([0x0DE7, seed, epoch]).permutation(len(counts))
    layout = np.concatenate([np.arange(offsets[s], offsets[s + 1]) for s in perm]).astype(np.int64)
    total = len(layout)
    keys = (
        np.arange(total, dtype=np.float64) + order._uniform(order._order_base(seed, epoch), 0, total) * shuffle_buffer
    )
    return layout[np.lexsort((np.arange(total), keys))]


def _legacy_reference(shard_samples: list[int], *, seed: int, epoch: int, shuffle_buffer: int) -> np.ndarray:
    """The epoch order as written before version 2 (copied from data_pipeline/stream.py at 8dbe8f0)."""
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
    with pytest.raises(ValueError, match="order=3 is not a known"):
        EpochOrder([3], seed=1, epoch=0, shuffle_buffer=4, order=3)


def test_seeds_and_epochs_give_other_orders_and_the_shard_permutation_is_kept() -> None:
    shards = [50] * 20
    orders = {
        (seed, epoch): EpochOrder(shards, seed=seed, epoch=epoch, shuffle_buffer=30).slice(0, 1000)
        for seed in range(3)
        for epoch in range(3)
    }
    assert len({_digest(o) for o in orders.values()}) == len(orders)
    # a small window keeps the shard sequence of the legacy order (the same permutation draw)
    new = EpochOrder(shards, seed=5, epoch=2, shuffle_buffer=1).slice(0, 1000) // 50
    old = EpochOrder(shards, seed=5, epoch=2, shuffle_buffer=1, order=LEGACY_ORDER).slice(0, 1000) // 50
    assert np.array_equal(new, old)


def test_version_2_order_is_pinned() -> None:
    """Checkpoints depend on it: a change of the version 2 order must come with a new version."""
    got = EpochOrder(TRAIN_SHARDS, seed=SEED, epoch=0, shuffle_buffer=BUFFER).slice(0, sum(TRAIN_SHARDS))
    assert _digest(got) == "4269e9e5cbba8ca5"


def test_legacy_order_bit_for_bit() -> None:
    # digests printed by data_pipeline/stream.py::epoch_order at 8dbe8f0, before version 2
    pinned = {
        ((9, 7, 11, 0, 8, 10, 6), 7, 0, 16): "745ac0ff4e592af4",
        ((1000,) * 50, 3, 2, 100): "7050ff7865fe8346",
        ((5,), 0, 1, 1): "281b02b10f5f4997",
    }
    for (shards, seed, epoch, buf), digest in pinned.items():
        got = epoch_order(list(shards), seed=seed, epoch=epoch, shuffle_buffer=buf, order=LEGACY_ORDER)
        assert _digest(got) == digest
    for name, shards in LAYOUTS.items():
        for seed, epoch, buf in [(0, 0, 1), (7, 3, 5), (11, 1, 1000)]:
            want = _legacy_reference(shards, seed=seed, epoch=epoch, shuffle_buffer=buf)
            order = EpochOrder(shards, seed=seed, epoch=epoch, shuffle_buffer=buf, order=LEGACY_ORDER)
            assert np.array_equal(order.slice(0, len(want)), want), name
            if len(want) >= 5:
                assert np.array_equal(order.slice(3, len(want) - 2), want[3:-2])


@pytest.mark.parametrize("order", [ORDER_VERSION, LEGACY_ORDER])
def test_every_world_size_with_the_same_global_batch_sees_the_same_places(order: int, tmp_path: Path) -> None:
    shards, global_batch = [13, 0, 29, 8, 31, 4], 12  # 85 samples: 7 global batches, 1 sample dropped
    write_manifest(tmp_path, {"train": shards})  # no tar files: the plan needs the manifest only
    want = EpochOrder(shards, seed=SEED, epoch=3, shuffle_buffer=9, order=order).slice(0, 84).reshape(7, 12)
    for world_size in (1, 2, 3, 4, 6, 12):
        batch_size = global_batch // world_size
        eo = EpochOrder(shards, seed=SEED, epoch=3, shuffle_buffer=9, order=order)
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
                shuffle_buffer=9, order=order,
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


def test_shuffle_mixes_like_the_legacy_order() -> None:
    """Both versions draw u_i ~ U[0, 1): displacement and same-shard neighbours agree within sampling noise."""
    shards, buf = [100] * 200, 1000

    def stats(order: int) -> tuple[float, float]:
        """Mean |output position - layout position| and the fraction of batch neighbours from the same shard."""
        out = EpochOrder(shards, seed=3, epoch=1, shuffle_buffer=buf, order=order).slice(0, 20_000)
        slot = np.empty(200, dtype=np.int64)  # layout slot of each shard (the same permutation in both versions)
        slot[np.random.default_rng([0x0DE7, 3, 1]).permutation(200)] = np.arange(200)
        layout = slot[out // 100] * 100 + out % 100
        shard = (out // 100).reshape(-1, 125)  # batches of 125
        return float(np.abs(np.arange(20_000) - layout).mean()), float((shard[:, 1:] == shard[:, :-1]).mean())

    (d_new, s_new), (d_old, s_old) = stats(ORDER_VERSION), stats(LEGACY_ORDER)
    assert abs(d_new - d_old) < 0.05 * d_old
    assert abs(s_new - s_old) < 0.2 * s_old


# ---------------------------------------------------------------------------------------------------------------------
# Through the loader: resume, and the legacy order kept for checkpoints written before version 2


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_dataset(tmp_path_factory.mktemp("shards"), {"train": TRAIN_SHARDS, "val": [7]})


def _loader(data_dir: Path, *, workers: int = 0, **kw) -> ResumableLoader:
    args = dict(train=True, rank=0, world_size=1, batch_size=4, seed=SEED, shuffle_buffer=BUFFER, timeout_s=60)
    return build_loader(data_dir, "train", num_workers=workers, transform=png_transform, **{**args, **kw})


def _indices(batches: list[dict]) -> list[list[int]]:
    return [b["index"].tolist() for b in batches]


@pytest.mark.parametrize("order", [ORDER_VERSION, LEGACY_ORDER])
def test_resume_mid_epoch_yields_exactly_the_remaining_batches(data_dir: Path, order: int) -> None:
    kw = dict(rank=1, world_size=2, batch_size=3)  # 8 batches per epoch
    plan = [
        batch_indices(data_dir, "train", seed=SEED, epoch=e, shuffle_buffer=BUFFER, order=order, **kw).tolist()
        for e in range(2)
    ]
    first = _loader(data_dir, workers=2, **kw)
    if order == LEGACY_ORDER:
        first.load_state_dict({k: v for k, v in first.state_dict().items() if k != "order"})
    consumed = list(itertools.islice(first.iter_batches(), 5))
    state = first.state_dict()
    first.close()
    assert state["order"] == order and (state["epoch"], state["batches_done"]) == (0, 5)

    resumed = _loader(data_dir, workers=3, persistent_workers=False, **kw)
    resumed.load_state_dict(state)
    rest = list(itertools.islice(resumed.iter_batches(), 11))  # the rest of epoch 0, then all of epoch 1
    assert resumed.state_dict()["order"] == order  # a legacy run stays legacy in later epochs
    resumed.close()
    assert _indices(consumed + rest) == plan[0] + plan[1]


def test_a_state_without_an_order_version_resumes_the_legacy_order(data_dir: Path) -> None:
    new = _loader(data_dir)
    state = new.state_dict()
    assert state["order"] == ORDER_VERSION
    old_state = {k: v for k, v in state.items() if k != "order"} | {"batches_done": 2}  # written before version 2
    legacy = batch_indices(data_dir, "train", seed=SEED, epoch=0, world_size=1, rank=0, batch_size=4,
                           shuffle_buffer=BUFFER, order=LEGACY_ORDER).tolist()  # fmt: skip
    current = batch_indices(data_dir, "train", seed=SEED, epoch=0, world_size=1, rank=0, batch_size=4,
                            shuffle_buffer=BUFFER).tolist()  # fmt: skip
    assert legacy != current
    new.load_state_dict(old_state)
    assert _indices(list(new)) == legacy[2:]
    new.load_state_dict({**state, "order": ORDER_VERSION})
    assert _indices(list(new)) == current
    with pytest.raises(ValueError, match="order: the checkpoint's epoch order version 3 is unknown"):
        new.load_state_dict({**state, "order": 3})
