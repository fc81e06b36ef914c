"""The deterministic, resumable stream: coverage, equal batches, resume, order, corrupt data, eval padding."""

from __future__ import annotations

import io
import itertools
import json
import logging
import shutil
import tarfile
import types
from multiprocessing.reduction import ForkingPickler
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.multiprocessing  # noqa: F401 - registers torch's tensor reductions with ForkingPickler
from data_fixtures import (
    NUM_CLASSES,
    SIZE,
    build_png_dataset,
    make_dataset,
    png_bytes,
    png_transform,
    sample_members,
    shard_name,
    write_manifest,
    write_tar,
)
from PIL import Image

from data_pipeline import shard_index, stream
from data_pipeline.loader import ResumableLoader, build_loader
from data_pipeline.order import plan_batches, sample_key
from data_pipeline.stream import ShardStream, load_manifest
from data_pipeline.transforms import EvalTransform, TrainTransform

# A hang (a worker never delivering) must fail the test instead of blocking the suite.
pytestmark = [
    pytest.mark.timeout(90),
    # 3 workers on a 2-core machine are intended here (worker layout coverage), not a misconfiguration.
    pytest.mark.filterwarnings("ignore:This DataLoader will create:UserWarning"),
]

TRAIN_SHARDS = [9, 7, 11, 0, 8, 10, 6]  # 51 samples; an empty shard listed with 0 samples
VAL_SHARDS = [7, 6]  # 13 samples
SEED, BUFFER, BATCH = 7, 16, 4


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_dataset(tmp_path_factory.mktemp("shards"), {"train": TRAIN_SHARDS, "val": VAL_SHARDS})


def _loader(data_dir: Path, *, rank: int = 0, world_size: int = 1, workers: int = 0, **kw) -> ResumableLoader:
    args = dict(train=True, batch_size=BATCH, seed=SEED, shuffle_buffer=BUFFER, transform=png_transform, timeout_s=60)
    args.update(kw)
    return build_loader(
        data_dir, args.pop("split", "train"), rank=rank, world_size=world_size, num_workers=workers, **args
    )


def _expected_image(index: int, epoch: int, train: bool = True) -> torch.Tensor:
    rng = np.random.default_rng([SEED, epoch, index]) if train else None
    return png_transform(png_bytes(index), "png", rng)


def _keys(batch: dict[str, torch.Tensor], split: str = "train") -> list[str]:
    return [sample_key(split, int(i)) for i, v in zip(batch["index"], batch["valid"]) if v]


def _assert_same_batches(got: list[dict], want: list[dict]) -> None:
    assert len(got) == len(want)
    for g, w in zip(got, want):
        for name in ("index", "valid", "label", "image"):
            assert torch.equal(g[name], w[name]), name


@pytest.mark.parametrize("world_size", [1, 2, 3])
@pytest.mark.parametrize("workers", [0, 1, 2, 3])
def test_each_sample_once_per_epoch_equal_batches(data_dir: Path, world_size: int, workers: int) -> None:
    """Two epochs from one loader per rank; the loader yields plan_batches exactly, whatever the worker count."""
    persistent = workers != 2  # workers=2 restarts its workers every epoch; 1 and 3 keep them
    n, global_batch = sum(TRAIN_SHARDS), world_size * BATCH
    manifest = load_manifest(data_dir)
    seen: dict[int, list[int]] = {0: [], 1: []}
    for rank in range(world_size):
        loader = _loader(data_dir, rank=rank, world_size=world_size, workers=workers, persistent_workers=persistent)
        for epoch in range(2):
            assert loader.epoch == epoch
            batches = list(loader)
            assert len(batches) == len(loader) == n // global_batch  # the same on every rank
            plan = plan_batches(
                manifest, "train", seed=SEED, epoch=epoch, world_size=world_size, rank=rank, batch_size=BATCH,
                shuffle_buffer=BUFFER,
            )  # fmt: skip
            assert [_keys(b) for b in batches] == plan
            for b in batches:
                assert b["image"].shape == (BATCH, 3, SIZE, SIZE) and b["image"].dtype == torch.uint8
                assert bool(b["valid"].all())
                assert torch.equal(b["label"], b["index"] % 3)
                for row, i in enumerate(b["index"].tolist()):
                    assert torch.equal(b["image"][row], _expected_image(i, epoch))
                seen[epoch] += b["index"].tolist()
        assert loader.epoch == 2 and loader.batches_done == 0  # each finished epoch advanced the loader
        loader.close()
    for order in seen.values():
        assert len(order) == len(set(order)) and set(order) <= set(range(n))  # no sample twice
        assert 0 <= n - len(order) < global_batch  # less than one global batch dropped
    assert seen[0] != seen[1]


def test_order_is_a_pure_function_of_seed_and_epoch(data_dir: Path) -> None:
    manifest = load_manifest(data_dir)
    kw = dict(world_size=1, rank=0, batch_size=BATCH, shuffle_buffer=BUFFER)
    flat = lambda seed, epoch: sum(plan_batches(manifest, "train", seed=seed, epoch=epoch, **kw), [])
    assert flat(SEED, 0) == flat(SEED, 0) == sum(plan_batches(data_dir, "train", seed=SEED, epoch=0, **kw), [])
    assert flat(SEED, 0) != flat(SEED, 1)
    assert flat(SEED, 0) != flat(SEED + 1, 0)
    order = [int(k.split("_")[1]) for k in flat(SEED, 0)]
    assert order != sorted(order)
    # The windowed shuffle mixes across shard boundaries: some batch holds samples of two shards.
    bounds = np.cumsum(TRAIN_SHARDS)
    shards_of = [set(np.searchsorted(bounds, order[i : i + BATCH], side="right")) for i in range(0, len(order), BATCH)]
    assert any(len(s) > 1 for s in shards_of)


@pytest.mark.parametrize("position", [0, 3, 11, 12, 17])  # 12 batches per epoch: start, mid, last, boundary, epoch 1
def test_resume_gives_identical_continuation(data_dir: Path, position: int) -> None:
    world_size, rank = 2, 1
    per_epoch = sum(TRAIN_SHARDS) // (world_size * 2)  # 12
    kw = dict(rank=rank, world_size=world_size, batch_size=2)
    ref_loader = _loader(data_dir, workers=1, **kw)
    reference = list(itertools.islice(ref_loader.iter_batches(), 2 * per_epoch))
    ref_loader.close()

    first = _loader(data_dir, workers=2, **kw)
    consumed = list(itertools.islice(first.iter_batches(), position))
    state = first.state_dict()
    first.close()
    assert state["epoch"] == position // per_epoch and state["batches_done"] == position % per_epoch

    # 3 workers restarting every epoch: a start batch that is not a multiple of the worker count is covered
    resumed = _loader(data_dir, workers=3, persistent_workers=False, **kw)
    resumed.load_state_dict(state)
    rest = list(itertools.islice(resumed.iter_batches(), 2 * per_epoch - position))
    resumed.close()
    _assert_same_batches(consumed + rest, reference)


def test_position_api(data_dir: Path) -> None:
    loader = _loader(data_dir)
    n = len(loader)
    for i, _ in enumerate(loader):
        if i == n - 1:
            break  # holding the last batch: the checkpoint must point at the next epoch
    assert (loader.epoch, loader.batches_done) == (0, n)
    assert (loader.state_dict()["epoch"], loader.state_dict()["batches_done"]) == (1, 0)
    first = next(iter(loader))
    assert loader.epoch == 1 and loader.batches_done == 1
    plan = plan_batches(
        data_dir, "train", seed=SEED, epoch=1, world_size=1, rank=0, batch_size=BATCH, shuffle_buffer=BUFFER
    )
    assert _keys(first) == plan[0]
    loader.set_epoch(1)  # same epoch: keeps the position (the usual epoch loop after a resume)
    assert loader.batches_done == 1
    loader.set_epoch(3)
    assert (loader.epoch, loader.batches_done) == (3, 0)

    state = loader.state_dict()
    with pytest.raises(ValueError, match="seed"):
        _loader(data_dir, seed=SEED + 1).load_state_dict(state)
    with pytest.raises(ValueError, match="world_size"):
        _loader(data_dir, batch_size=2).load_state_dict(state)
    with pytest.raises(ValueError, match="batches_done"):
        loader.load_state_dict({**state, "batches_done": n + 1})
    with pytest.raises(ValueError, match="fewer than one global batch"):
        _loader(data_dir, batch_size=64)


def test_elastic_same_global_batch(data_dir: Path) -> None:
    """W=2, B=4 and W=1, B=8 see the same global sample sequence, and a state moves from one to the other."""
    halves = [
        plan_batches(data_dir, "train", seed=SEED, epoch=0, world_size=2, rank=r, batch_size=4, shuffle_buffer=BUFFER)
        for r in range(2)
    ]
    single = _loader(data_dir, batch_size=8)
    whole = [_keys(b) for b in single]
    assert whole == [a + b for a, b in zip(*halves)]

    two = _loader(data_dir, rank=0, world_size=2, batch_size=4)
    list(itertools.islice(iter(two), 2))
    one = _loader(data_dir, batch_size=8)
    one.load_state_dict(two.state_dict())
    assert [_keys(b) for b in one] == whole[2:]


def _corrupt_dataset(root: Path) -> tuple[Path, dict[str, int], set[int]]:
    """Train split of 48 samples in 9 shards, 24 of them bad in every way the stream must survive."""
    split, good, bad = "train", set(range(48)), {}
    write = lambda shard, indices, edit=None: write_tar(
        root / shard_name(split, shard),
        [edit(*sample_members(split, i)) if edit else sample_members(split, i) for i in indices],
    )
    write(0, range(0, 6))
    # shard 1: cut inside the PNG of sample 9; samples 9..11 are lost
    write(1, range(6, 12))
    path = root / shard_name(split, 1)
    with tarfile.open(path) as tar:
        cut = tar.getmember(f"{sample_key(split, 9)}.png").offset_data + 10
    path.write_bytes(path.read_bytes()[:cut])
    bad["truncated_shard"] = 3

    def damage(key: str, members: dict[str, bytes]) -> tuple[str, dict[str, bytes]]:
        index = int(key.split("_")[1])
        if index == 13:
            members["png"] = b"this is not an image"
        elif index == 14:
            del members["cls"]
        elif index == 15:
            members["cls"] = b"x"
        elif index == 16:
            members["cls"] = b"7"  # out of range: 3 classes
        return key, members

    write(2, range(12, 18), damage)
    bad.update(decode_error=1, missing_label=1, bad_label=2)
    (root / shard_name(split, 3)).write_bytes(b"")  # listed with 4 samples, 0 bytes
    bad["empty_shard"] = 4
    bad["missing_shard"] = 5  # shard 4 (samples 22..26) is not written
    write(5, range(27, 31))  # listed with 6 samples
    bad["missing_samples"] = 2
    write_tar(root / shard_name(split, 6), [sample_members(split, 900 + i) for i in range(3)])  # wrong keys
    bad["key_mismatch"] = 3
    write(7, [])  # a valid, empty tar listed with 0 samples
    # shard 8: cut exactly between samples 44 and 45 (tarfile alone would call it complete); 45..47 are lost
    write(8, range(36, 48))
    path = root / shard_name(split, 8)
    with tarfile.open(path) as tar:
        cut = tar.getmember(f"{sample_key(split, 45)}.png").offset
    path.write_bytes(path.read_bytes()[:cut])
    bad["truncated_shard"] += 3
    write_manifest(root, {split: [6, 6, 6, 4, 5, 6, 3, 0, 12]})
    good -= {9, 10, 11, 13, 14, 15, 16, *range(18, 27), 31, 32, 33, 34, 35, 45, 46, 47}
    assert sum(bad.values()) == 48 - len(good)
    return root, bad, good


@pytest.mark.timeout(60)
def test_corrupt_data_is_skipped_and_counted(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    data_dir, expected, good = _corrupt_dataset(tmp_path)
    totals: dict[str, int] = {}
    valid_seen: list[int] = []
    for rank in range(2):
        loader = _loader(data_dir, rank=rank, world_size=2, workers=2, timeout_s=30)
        assert len(loader) == 6  # 48 samples, global batch 8: nothing dropped
        for b in loader:
            valid_seen += b["index"][b["valid"]].tolist()
            assert (b["image"][~b["valid"]] == 0).all() and (b["label"][~b["valid"]] == 0).all()
            for row, i in enumerate(b["index"].tolist()):
                assert bool(b["valid"][row]) == (i in good)
                if i in good:
                    assert torch.equal(b["image"][row], _expected_image(i, 0))
        assert loader.state_dict()["corrupt"] == loader.corrupt_counts()
        for reason, n in loader.corrupt_counts().items():
            totals[reason] = totals.get(reason, 0) + n
        loader.close()
    assert sorted(valid_seen) == sorted(good)
    assert totals == expected

    # Rate-limited logging: the 1st and every 2nd of each reason (missing_shard: 5 events -> 1st, 2nd, 4th).
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="data_pipeline.loader"):
        single = _loader(data_dir, batch_size=8, corrupt_log_every=2)
        list(single)
    assert single.corrupt_counts() == expected
    assert sum("(missing_shard)" in r.getMessage() for r in caplog.records) == 3


@pytest.mark.timeout(60)
def test_corrupt_counts_survive_resume(tmp_path: Path) -> None:
    data_dir, _, _ = _corrupt_dataset(tmp_path)
    full = _loader(data_dir, workers=1, timeout_s=30)
    reference = list(itertools.islice(full.iter_batches(), 15))  # 12 per epoch: into epoch 1
    want = full.corrupt_counts()
    full.close()

    first = _loader(data_dir, workers=2, timeout_s=30)
    head = list(itertools.islice(first.iter_batches(), 7))
    state = first.state_dict()
    first.close()
    resumed = _loader(data_dir, workers=2, persistent_workers=False, timeout_s=30)
    resumed.load_state_dict(state)
    tail = list(itertools.islice(resumed.iter_batches(), 8))
    resumed.close()
    _assert_same_batches(head + tail, reference)
    assert resumed.corrupt_counts() == want and resumed.state_dict()["corrupt"] == want


def test_transform_bug_is_loud(data_dir: Path) -> None:
    def broken(data: bytes, ext: str, rng: np.random.Generator | None) -> torch.Tensor:
        raise KeyError("bug")

    with pytest.raises(RuntimeError, match=r"transform failed on train_\d{8}"):
        next(iter(_loader(data_dir, transform=broken)))


@pytest.mark.parametrize("world_size", [1, 2, 3])
def test_eval_every_sample_once_padded(data_dir: Path, world_size: int) -> None:
    n, seen, lengths = sum(VAL_SHARDS), [], set()
    for rank in range(world_size):
        loader = _loader(data_dir, split="val", train=False, rank=rank, world_size=world_size, workers=1)
        batches = list(loader)
        loader.close()
        lengths.add(len(batches))
        plan = plan_batches(
            data_dir, "val", seed=SEED, epoch=0, world_size=world_size, rank=rank, batch_size=BATCH,
            shuffle_buffer=BUFFER, train=False,
        )  # fmt: skip
        assert [_keys(b, "val") for b in batches] == plan
        for b in batches:
            pad = ~b["valid"]
            assert (b["index"][pad] == -1).all() and (b["image"][pad] == 0).all()
            for row, i in enumerate(b["index"].tolist()):
                if i >= 0:
                    assert torch.equal(b["image"][row], _expected_image(i, 0, train=False))
            seen += b["index"][b["valid"]].tolist()
    assert lengths == {-(-n // (world_size * BATCH))}
    assert sorted(seen) == list(range(n))


def test_resume_refuses_a_rebuilt_data_set(data_dir: Path, tmp_path: Path) -> None:
    """A checkpoint's position only means the same samples on the same shards: other shards fail loudly."""
    loader = _loader(data_dir)
    state = loader.state_dict()
    assert len(state["data_fingerprint"]) == 16
    _loader(data_dir).load_state_dict(state)  # same data: accepted
    (tmp_path / "rebuilt").mkdir()
    rebuilt = make_dataset(tmp_path / "rebuilt", {"train": list(reversed(TRAIN_SHARDS)), "val": VAL_SHARDS})
    with pytest.raises(ValueError, match="data_fingerprint: the checkpoint was taken on other shards"):
        _loader(rebuilt).load_state_dict(state)
    unnamed = {k: v for k, v in state.items() if k != "data_fingerprint"}  # a state that does not say its data
    with pytest.raises(ValueError, match=r"loader state lacks \['data_fingerprint'\]"):
        _loader(data_dir).load_state_dict(unnamed)


# ---------------------------------------------------------------------------------------------------------------------
# The real transforms write straight into the batch; a worker's batch is in shared memory before it is handed over

JPEG_SHARDS = [6, 5]  # 11 samples per split: train drops 3 (batch 4), eval pads the last batch with 1 row
JPEG_CORRUPT = 2  # its .jpg is garbage: a zero row with valid=False


def _jpeg_bytes(index: int) -> bytes:
    """A 64x48 photo-like JPEG (smooth gradients plus noise) that differs per ``index``."""
    rng = np.random.default_rng(index)
    y, x = np.mgrid[0:48, 0:64]
    pixels = np.stack([x * 4, y * 5, (x + y) * 2 + index * 9], axis=-1) + rng.integers(0, 24, (48, 64, 3))
    buf = io.BytesIO()
    Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def _jpeg_payload(index: int) -> bytes:
    return b"not a jpeg" if index == JPEG_CORRUPT else _jpeg_bytes(index)


@pytest.fixture(scope="module")
def jpeg_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("jpeg-shards")
    for split in ("train", "val"):
        start = 0
        for shard, n in enumerate(JPEG_SHARDS):
            members = [
                (sample_key(split, i), {"jpg": _jpeg_payload(i), "cls": str(i % NUM_CLASSES).encode()})
                for i in range(start, start + n)
            ]
            write_tar(root / shard_name(split, shard), members)
            start += n
    write_manifest(root, {"train": JPEG_SHARDS, "val": JPEG_SHARDS})
    return root


@pytest.fixture
def dirty_batches(monkeypatch: pytest.MonkeyPatch) -> None:
    """Batch tensors start as 0xAB, not zeros: rows the stream does not write must be zeroed on purpose. Forked
    workers inherit the patch."""
    new = stream._new_batch_images
    monkeypatch.setattr(stream, "_new_batch_images", lambda *args, **kw: new(*args, **kw).fill_(0xAB))


@pytest.mark.usefixtures("dirty_batches")
@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
def test_transforms_write_into_the_batch_with_the_same_pixels(jpeg_dir: Path, train: bool) -> None:
    """TrainTransform/EvalTransform write each crop into its batch row (``out=``): the batches hold exactly the
    crops the transforms return, with 0 and 2 workers; padding and corrupt rows are zero."""
    t = TrainTransform(24) if train else EvalTransform(24)
    split = "train" if train else "val"
    runs = {}
    for workers in (0, 2):
        loader = _loader(jpeg_dir, split=split, train=train, workers=workers, transform=t)
        runs[workers] = list(loader)
        loader.close()
        assert len(runs[workers]) == (2 if train else 3)
        for b in runs[workers]:
            assert b["image"].shape == (BATCH, 3, 24, 24) and b["image"].dtype == torch.uint8
            for row, i in enumerate(b["index"].tolist()):
                if i < 0 or i == JPEG_CORRUPT:
                    assert not b["valid"][row] and (b["image"][row] == 0).all()
                    continue
                assert b["valid"][row]
                rng = np.random.default_rng([SEED, 0, i]) if train else None
                assert torch.equal(b["image"][row], t(_jpeg_bytes(i), "jpg", rng)), (workers, i)
            if workers:
                assert b["image"].is_shared()
    _assert_same_batches(runs[2], runs[0])
    indices = torch.cat([b["index"] for b in runs[0]]).tolist()
    assert JPEG_CORRUPT in indices and (train or -1 in indices)  # both kinds of zero rows were seen


def test_worker_batch_is_handed_over_without_a_copy(jpeg_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """In a worker the batch is made in shared memory: pickling it for the main process sends the segment's handle
    (the storage stays where it is) instead of copying the images into a new segment, as it does a plain tensor."""
    ds = ShardStream(
        jpeg_dir, "train", train=True, rank=0, world_size=1, batch_size=BATCH, seed=SEED, shuffle_buffer=BUFFER,
        transform=TrainTransform(24),
    )  # fmt: skip
    ds.set_position(0, 0)
    monkeypatch.setattr(stream, "get_worker_info", lambda: types.SimpleNamespace(id=0, num_workers=1))
    image = next(iter(ds))["image"]
    assert image.is_shared()
    ptr = image.untyped_storage().data_ptr()
    ForkingPickler.dumps(image)
    assert image.untyped_storage().data_ptr() == ptr  # not moved to a new segment
    plain = image.clone()
    ptr = plain.untyped_storage().data_ptr()
    ForkingPickler.dumps(plain)
    assert plain.untyped_storage().data_ptr() != ptr  # the copy that the shared batch avoids


def test_image_size_must_match_the_transform(jpeg_dir: Path) -> None:
    with pytest.raises(ValueError, match="image_size=32 differs from the transform's img_size=24"):
        _loader(jpeg_dir, transform=TrainTransform(24), image_size=32)


# ---------------------------------------------------------------------------------------------------------------------
# Shards of `pretrain data build` are read through their stored index: no tar header is read


@pytest.fixture(scope="module")
def built_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """40 PNGs in 3 class folders, built by ``pretrain data build`` into 7 train shards (6 samples, the last 4)."""
    return build_png_dataset(tmp_path_factory.mktemp("built"), 40, max_samples_per_shard=6)


def _samples_by_index(data_dir: Path) -> dict[int, dict[str, bytes]]:
    """Every sample's members by write index, read with tarfile."""
    out: dict[int, dict[str, bytes]] = {}
    for shard in load_manifest(data_dir).splits["train"].shards:
        with tarfile.open(data_dir / shard.name) as tar:
            for m in tar:
                key, _, ext = m.name.partition(".")
                out.setdefault(int(key.split("_")[1]), {})[ext] = tar.extractfile(m).read()
    return out


def _copy_without_index(data_dir: Path, out: Path) -> Path:
    """The data set as a build made before stored indexes left it: no ``.index/``, no ``index`` in the manifest."""
    shutil.copytree(data_dir, out, ignore=shutil.ignore_patterns(".index"))
    raw = json.loads((out / "manifest.json").read_text())
    for shard in raw["splits"]["train"]["shards"]:
        del shard["index"]
    (out / "manifest.json").write_text(json.dumps(raw, indent=1))
    return out


@pytest.fixture
def tar_opens(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Records the path of every ``tarfile.open`` in this process (and in forked DataLoader workers' own copies)."""
    calls: list[str] = []
    real = tarfile.open

    def counting(name=None, *args, **kwargs):
        calls.append(Path(name).name if name is not None else "<fileobj>")
        return real(name, *args, **kwargs)

    monkeypatch.setattr(tarfile, "open", counting)
    return calls


def test_built_shards_are_read_without_scanning(built_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Every batch of two epochs, with 0 and 2 workers, holds the right pixels and labels while no tar is opened
    with tarfile (each worker reads the offsets from the stored indexes)."""
    samples = _samples_by_index(built_dir)

    def refuse(name=None, *args, **kwargs):
        raise AssertionError(f"tarfile.open({name!r}) on a shard with a stored index")

    monkeypatch.setattr(tarfile, "open", refuse)  # forked workers inherit it
    for workers in (0, 2):
        loader = _loader(built_dir, workers=workers)
        batches = list(itertools.islice(loader.iter_batches(), 2 * len(loader)))
        loader.close()
        assert len(batches) == 2 * (40 // BATCH) and loader.corrupt_counts() == {}
        for n, b in enumerate(batches):
            assert bool(b["valid"].all())
            for row, i in enumerate(b["index"].tolist()):
                assert int(b["label"][row]) == int(samples[i]["cls"])
                want = png_transform(samples[i]["png"], "png", np.random.default_rng([SEED, n // 10, i]))
                assert torch.equal(b["image"][row], want)


def test_data_set_built_before_stored_indexes_gives_the_same_batches(built_dir: Path, tmp_path: Path) -> None:
    """The same shards without stored indexes (scanned with tarfile): bitwise the same batches, plan and data
    fingerprint, so a checkpoint moves between the two."""
    old = _copy_without_index(built_dir, tmp_path / "old")
    assert load_manifest(old).splits["train"].shards[0].index is None
    runs = {}
    for name, data_dir in (("indexed", built_dir), ("old", old)):
        loader = _loader(data_dir, rank=1, world_size=2, batch_size=2, workers=2)
        runs[name] = list(itertools.islice(loader.iter_batches(), 2 * len(loader)))
        runs[name + " state"] = loader.state_dict()
        loader.close()
    _assert_same_batches(runs["old"], runs["indexed"])
    assert runs["old state"] == runs["indexed state"]
    kw = dict(seed=SEED, epoch=1, world_size=2, rank=0, batch_size=2, shuffle_buffer=BUFFER)
    assert plan_batches(old, "train", **kw) == plan_batches(built_dir, "train", **kw)


def test_shard_cut_after_build_is_counted_exactly(built_dir: Path, tmp_path: Path, tar_opens: list[str]) -> None:
    """A shard cut inside a sample's image after the build no longer has its stored index's size: it alone is
    scanned, and exactly the samples from the cut on are counted as truncated_shard, with 0 and 2 workers."""
    data_dir = tmp_path / "ds"
    shutil.copytree(built_dir, data_dir)
    shard = data_dir / shard_name("train", 2)  # samples 12..17
    with tarfile.open(shard) as tar:
        cut = tar.getmember(f"{sample_key('train', 14)}.png").offset_data + 10
    shard.write_bytes(shard.read_bytes()[:cut])
    tar_opens.clear()
    for workers in (0, 2):
        loader = _loader(data_dir, train=False, workers=workers)  # eval: every sample once
        valid = [i for b in loader for i, v in zip(b["index"].tolist(), b["valid"].tolist()) if v]
        assert loader.corrupt_counts() == {"truncated_shard": 4}  # 14, 15, 16, 17
        assert sorted(valid) == [i for i in range(40) if not 14 <= i < 18]
        loader.close()
        if workers == 0:
            assert tar_opens == ["shard-000002.tar"]


def test_broken_stored_index_of_a_built_shard_is_scanned_with_a_warning(
    built_dir: Path, tmp_path: Path, tar_opens: list[str], caplog: pytest.LogCaptureFixture
) -> None:
    """Stored indexes that are not JSON, list other samples, or are gone: those shards are scanned (the same
    batches), each named in one warning; a corrupt index does not stop training."""
    data_dir = tmp_path / "ds"
    shutil.copytree(built_dir, data_dir)
    index = lambda shard: data_dir / shard_index.stored_index_name(shard_name("train", shard))
    index(1).write_text("{not json")
    entry = json.loads(index(3).read_text())
    entry["samples"][0][0], entry["samples"][1][0] = entry["samples"][1][0], entry["samples"][0][0]  # two keys swapped
    index(3).write_text(json.dumps(entry))
    index(5).unlink()
    tar_opens.clear()
    with caplog.at_level(logging.WARNING, logger="data_pipeline.stream"):
        loader = _loader(data_dir)
        batches = list(itertools.islice(loader.iter_batches(), 2 * len(loader)))
        loader.close()
    reference = _loader(built_dir)
    _assert_same_batches(batches, list(itertools.islice(reference.iter_batches(), 2 * len(reference))))
    assert loader.corrupt_counts() == {}
    assert sorted(tar_opens) == ["shard-000001.tar", "shard-000003.tar", "shard-000005.tar"]  # once each: cached
    warned = sorted(r.getMessage().split()[3] for r in caplog.records if "unusable" in r.getMessage())
    assert warned == [shard_name("train", s) for s in (1, 3, 5)]
    assert all("pretrain data build" in r.getMessage() for r in caplog.records)
