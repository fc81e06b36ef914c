"""Shards written by other WebDataset tools: `pretrain data index`, then the stream, plan and inspect as on ours.

Every data set here is written by ``webdataset.ShardWriter`` (real tar files, real JPEG/PNG bytes from PIL); nothing
is mocked. Our own shards go the other way: ``webdataset.WebDataset`` reads them back member by member.
"""

from __future__ import annotations

import io
import itertools
import json
import os
import shutil
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
import webdataset as wds
from data_fixtures import png_transform
from PIL import Image

from data_pipeline.indexer import index_dataset
from data_pipeline.loader import build_loader
from data_pipeline.manifest import load_manifest
from data_pipeline.order import plan_batches
from data_pipeline.shard_index import read_stored_shard, split_member_name, stored_index_name
from launch.cli import main

pytestmark = [
    pytest.mark.timeout(120),
    pytest.mark.filterwarnings("ignore:This DataLoader will create:UserWarning"),
]

SYNSETS = ["n01440764", "n01443537", "n01484850"]  # tench, goldfish, great white shark
SEED, BUFFER, BATCH = 3, 16, 4


def image_bytes(index: int, fmt: str = "JPEG", size: int = 16) -> bytes:
    """A small image that differs per ``index`` (JPEG by default)."""
    rng = np.random.default_rng(index)
    y, x = np.mgrid[0:size, 0:size]
    pixels = np.stack([x * 8, y * 8, np.full_like(x, index * 7 % 256)], axis=-1) + rng.integers(0, 16, (size, size, 3))
    buf = io.BytesIO()
    Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(buf, format=fmt)
    return buf.getvalue()


def imagenet_sample(i: int) -> dict:
    """Sample ``i`` in the ImageNet WebDataset layout: synset key, .jpg, .cls and a .json with the class."""
    label = i % len(SYNSETS)
    return {
        "__key__": f"{SYNSETS[label]}_{10000 + i}",
        "jpg": image_bytes(i),
        "cls": label,
        "json": {"label": label, "synset": SYNSETS[label], "width": 16},
    }


def write_shards(pattern: Path, samples: list[dict], per_shard: int, start_shard: int = 0) -> None:
    pattern.parent.mkdir(parents=True, exist_ok=True)
    with wds.ShardWriter(str(pattern), maxcount=per_shard, start_shard=start_shard, verbose=0) as sink:
        for sample in samples:
            sink.write(sample)


def truncate_inside(path: Path, member_suffix: str) -> None:
    """Cuts ``path`` in the middle of the data of the first member whose name ends with ``member_suffix``."""
    with tarfile.open(path) as tar:
        member = next(m for m in tar if m.name.endswith(member_suffix))
    path.write_bytes(path.read_bytes()[: member.offset_data + member.size // 2])


@pytest.fixture
def imagenet_like(tmp_path: Path) -> dict:
    """4 train shards of 12 (shard 2 truncated, one sample without .cls, one with .jpg and .png) and 1 val shard."""
    root = tmp_path / "in1k-wds"
    train = [imagenet_sample(i) for i in range(48)]
    del train[5]["cls"]  # no label: left out, counted
    train[7]["png"] = image_bytes(7, "PNG")  # two images: read through .jpg (the first by preference)
    write_shards(root / "train" / "shard-%06d.tar", train, per_shard=12)
    write_shards(root / "val" / "shard-%06d.tar", [imagenet_sample(100 + i) for i in range(10)], per_shard=12)
    truncate_inside(root / "train" / "shard-000002.tar", f"_{10000 + 30}.jpg")
    kept = [s for i, s in enumerate(train) if i != 5 and not 24 <= i < 36]
    return {"root": root, "train": kept, "val": [imagenet_sample(100 + i) for i in range(10)]}


def loader(root: Path, split: str = "train", **kw):
    args = dict(train=True, rank=0, world_size=1, batch_size=BATCH, num_workers=0, seed=SEED, shuffle_buffer=BUFFER)
    args.update(kw)
    return build_loader(root, split, transform=png_transform, **args)


def expected_image(data: bytes, index: int, epoch: int = 0, train: bool = True) -> torch.Tensor:
    return png_transform(data, "jpg", np.random.default_rng([SEED, epoch, index]) if train else None)


def run_cli(capsys: pytest.CaptureFixture, *argv: str) -> tuple[int, str]:
    code = main(list(argv))
    captured = capsys.readouterr()
    return code, captured.out + captured.err


def test_imagenet_layout_is_indexed_inspected_and_streamed(imagenet_like: dict, capsys) -> None:
    root = imagenet_like["root"]
    code, out = run_cli(capsys, "data", "index", str(root))
    assert code == 0, out
    assert "left out train/shard-000002.tar: truncated_shard" in out
    assert "train: 35 samples in 3 shards" in out and "left out: missing_label 1" in out

    m = load_manifest(root)
    assert m.version == 2 and m.label == "cls" and m.image_exts == ["jpg"] and m.format == "jpeg"
    assert m.classes == ["0", "1", "2"]
    assert [s.name for s in m.splits["train"].shards] == [f"train/shard-00000{i}.tar" for i in (0, 1, 3)]
    assert m.splits["train"].skipped_samples == {"missing_label": 1}
    assert [s["path"] for s in m.skipped] == ["train/shard-000002.tar"]
    by_key = {s["__key__"]: s for s in imagenet_like["train"]}
    assert sum(m.splits["train"].class_counts.values()) == len(by_key) == 35
    assert m.splits["train"].class_counts["1"] == sum(s["cls"] == 1 for s in by_key.values())

    code, out = run_cli(capsys, "data", "inspect", str(root), "--deep")
    assert code == 0, out
    assert "OK: 4 shards match the manifest (train 35, val 10 samples) (deep)" in out
    assert "1 shards were left out by `pretrain data index`" in out and "train/shard-000002.tar" in out
    assert "train: 1 samples left out by `pretrain data index` (missing_label 1)" in out

    # The stream: every indexed sample once per epoch, with its own label and pixels, in the order of the plan.
    train = loader(root)
    assert len(train) == 35 // BATCH
    for epoch in range(2):
        plan = plan_batches(m, "train", seed=SEED, epoch=epoch, world_size=1, rank=0, batch_size=BATCH,
                            shuffle_buffer=BUFFER)  # fmt: skip
        batches = list(train)
        assert len(batches) == len(plan)
        seen = []
        for keys, b in zip(plan, batches):
            assert bool(b["valid"].all()) and len(keys) == BATCH
            for row, key in enumerate(keys):
                assert int(b["label"][row]) == by_key[key]["cls"]
                assert torch.equal(b["image"][row], expected_image(by_key[key]["jpg"], int(b["index"][row]), epoch))
            seen += keys
        assert len(set(seen)) == len(seen) == len(plan) * BATCH and set(seen) <= set(by_key)
    assert train.corrupt_counts() == {}
    train.close()

    # `pretrain data plan` prints the same keys as the loader's plan.
    code, out = run_cli(capsys, "data", "plan", str(root), "--world-size", "2", "--workers", "1", "--batch-size", "2",
                        "--seed", str(SEED), "--shuffle-buffer", str(BUFFER))  # fmt: skip
    assert code == 0, out
    lines = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
    for rank in range(2):
        want = plan_batches(root, "train", seed=SEED, epoch=0, world_size=2, rank=rank, batch_size=2,
                            shuffle_buffer=BUFFER)  # fmt: skip
        assert [d["keys"] for d in lines if d["rank"] == rank] == want
        assert want[0][0] in by_key

    # eval: every val sample once, in write order, with its label
    val = loader(root, "val", train=False, batch_size=3)
    got = [(int(i), int(lab)) for b in val for i, lab, v in zip(b["index"], b["label"], b["valid"]) if v]
    assert got == [(i, s["cls"]) for i, s in enumerate(imagenet_like["val"])]
    val.close()


def test_mid_epoch_resume_and_corrupt_counts_on_indexed_shards(imagenet_like: dict) -> None:
    root = imagenet_like["root"]
    # a garbage JPEG in the first shard: indexed (WebDataset does not decode images), skipped and counted by the stream
    path = root / "train" / "shard-000000.tar"
    with tarfile.open(path) as tar:
        member = tar.getmember(f"{SYNSETS[1]}_{10000 + 4}.jpg")
    data = bytearray(path.read_bytes())
    data[member.offset_data : member.offset_data + member.size] = b"\xff" * member.size
    path.write_bytes(bytes(data))
    assert index_dataset(root).manifest is not None

    garbage = f"{SYNSETS[1]}_10004"
    kw = dict(seed=SEED, world_size=1, rank=0, batch_size=BATCH, shuffle_buffer=BUFFER)
    times = sum(garbage in sum(plan_batches(root, "train", epoch=e, **kw), []) for e in range(2))
    assert times >= 1  # 3 of 35 samples are dropped per epoch: it may be one of them once

    reference = loader(root, num_workers=0)
    want = list(itertools.islice(reference.iter_batches(), 16))  # 8 batches per epoch: two epochs
    assert reference.corrupt_counts() == {"decode_error": times}
    reference.close()
    first = loader(root, num_workers=2, timeout_s=30)
    head = list(itertools.islice(first.iter_batches(), 5))
    state = first.state_dict()
    first.close()
    resumed = loader(root, num_workers=1, timeout_s=30)
    resumed.load_state_dict(state)
    tail = list(itertools.islice(resumed.iter_batches(), 11))
    resumed.close()
    for g, w in zip(head + tail, want, strict=True):
        for name in ("index", "valid", "label", "image"):
            assert torch.equal(g[name], w[name]), name
    assert resumed.corrupt_counts() == {"decode_error": times}

    # inspect --deep names the sample whose image does not decode
    from data_pipeline.verify import inspect_dataset

    report = inspect_dataset(root, deep=True)
    assert not report.ok
    assert report.bad_shards[0].name == "train/shard-000000.tar"
    assert f"1 samples with decode_error, e.g. {garbage}" in report.bad_shards[0].reasons[-1]


def test_keys_inside_tar_directories(tmp_path: Path) -> None:
    root = tmp_path / "nested"
    samples = [
        {"__key__": f"part{i % 2}/sub.dir/{SYNSETS[i % 3]}_{i}", "jpeg": image_bytes(i), "cls": i % 3} for i in range(9)
    ]
    write_shards(root / "train" / "a-%03d.tar", samples, per_shard=5)
    report = index_dataset(root)
    assert report.manifest is not None and report.manifest.image_exts == ["jpeg"]
    keys = read_stored_shard(root / stored_index_name("train/a-000.tar")).keys
    assert keys == [s["__key__"] for s in samples[:5]]  # directory prefix included, first dot of the file name
    with build_loader(root, "train", train=False, rank=0, world_size=1, batch_size=9, num_workers=0, seed=0,
                      shuffle_buffer=1, transform=png_transform) as eval_loader:  # fmt: skip
        (batch,) = list(eval_loader)
    assert batch["valid"].all() and batch["label"].tolist() == [i % 3 for i in range(9)]
    assert plan_batches(root, "train", seed=0, epoch=0, world_size=1, rank=0, batch_size=9, shuffle_buffer=1,
                        train=False) == [[s["__key__"] for s in samples]]  # fmt: skip


MEMBER_NAMES = ["a.jpg", "a.b.c", "x/y/z.seg.png", "x.y/z.JPG", "x.y/z", ".hidden", "d/.hidden.jpg", "noext", "a./b"]


@pytest.mark.parametrize("name", [*MEMBER_NAMES, "a/b.", "./k.cls", "a/b/c", "/.x", "a//.x", "a.b/.x.jpg", "a/b/.x"])
def test_member_names_split_like_webdataset(name: str) -> None:
    key, ext = wds.tariterators.base_plus_ext(name)
    assert split_member_name(name) == (key, None if ext is None else ext.lower())


def test_txt_labels_json_fields_and_classes_file(tmp_path: Path, capsys) -> None:
    names = ["tench", "goldfish", "shark"]
    # .txt holds a class name; classes default to the sorted names found
    txt_root = tmp_path / "txt"
    write_shards(txt_root / "train" / "s-%02d.tar",
                 [{"__key__": f"{i:09d}", "webp": image_bytes(i, "WEBP"), "txt": names[i % 3] + "\n"}
                  for i in range(7)], per_shard=4)  # fmt: skip
    code, out = run_cli(capsys, "data", "index", str(txt_root), "--label", "txt")
    assert code == 0, out
    m = load_manifest(txt_root)
    assert m.classes == sorted(names) and m.image_exts == ["webp"] and m.format == "mixed"
    with loader(txt_root, train=False, batch_size=7) as eval_loader:
        (batch,) = list(eval_loader)
    assert batch["label"].tolist() == [sorted(names).index(names[i % 3]) for i in range(7)]

    # json:FIELD (dotted) with --classes: names index the file's order; a name not in it is left out as bad_label
    json_root = tmp_path / "json"
    labels = ["shark", "tench", "yak", "goldfish", "shark"]
    write_shards(json_root / "train" / "s-%02d.tar",
                 [{"__key__": f"k{i}", "png": image_bytes(i, "PNG"), "json": {"meta": {"name": lab}}}
                  for i, lab in enumerate(labels)], per_shard=10)  # fmt: skip
    classes = tmp_path / "classes.txt"
    classes.write_text("shark\ngoldfish\ntench\nfox\n")
    code, out = run_cli(capsys, "data", "index", str(json_root), "--label", "json:meta.name", "--classes", str(classes))
    assert code == 0, out
    assert "left out: bad_label 1" in out
    m = load_manifest(json_root)
    assert m.classes == ["shark", "goldfish", "tench", "fox"] and m.label == "json:meta.name"
    assert m.splits["train"].class_counts == {"shark": 2, "goldfish": 1, "tench": 1, "fox": 0}
    with loader(json_root, train=False, batch_size=4) as eval_loader:
        (batch,) = list(eval_loader)
    assert batch["label"].tolist() == [0, 2, 1, 0]

    # json:FIELD holding integers: classes numbered 0..K-1; a missing field is a missing label
    int_root = tmp_path / "json-int"
    write_shards(int_root / "val" / "s-%02d.tar",
                 [{"__key__": f"k{i}", "jpg": image_bytes(i), "json": {"label": i} if i != 2 else {}}
                  for i in range(5)], per_shard=10)  # fmt: skip
    report = index_dataset(int_root, label="json:label")
    assert report.manifest is not None
    assert report.manifest.classes == ["0", "1", "2", "3", "4"]
    assert report.manifest.splits["val"].skipped_samples == {"missing_label": 1}

    assert run_cli(capsys, "data", "index", str(int_root), "--label", "json")[0] == 2  # no FIELD: usage error


def test_split_globs_and_what_cannot_be_indexed(tmp_path: Path, capsys) -> None:
    root = tmp_path / "flat"
    write_shards(root / "imagenet-train-%04d.tar", [imagenet_sample(i) for i in range(6)], per_shard=3)
    write_shards(root / "imagenet-validation-%04d.tar", [imagenet_sample(50 + i) for i in range(3)], per_shard=3)
    code, out = run_cli(capsys, "data", "index", str(root))
    assert code == 2 and "--split-glob" in out and not (root / "manifest.json").exists()
    code, out = run_cli(capsys, "data", "index", str(root), "--split-glob", "train=*-train-*.tar",
                        "--split-glob", "val=*-validation-*.tar")  # fmt: skip
    assert code == 0, out
    m = load_manifest(root)
    assert {k: v.num_samples for k, v in m.splits.items()} == {"train": 6, "val": 3}

    junk = tmp_path / "junk"
    (junk / "train").mkdir(parents=True)
    (junk / "train" / "a.tar").write_bytes(b"this is not a tar file" * 100)
    (junk / "train" / "b.tar").write_bytes(b"")
    code, out = run_cli(capsys, "data", "index", str(junk))
    assert code == 1 and "no usable sample" in out and not (junk / "manifest.json").exists()
    assert "left out train/a.tar: not a readable tar" in out and "left out train/b.tar: empty_shard" in out
    assert run_cli(capsys, "data", "index", str(tmp_path / "nowhere"))[0] == 2


def test_reindex_of_a_grown_folder_reads_only_the_new_shard(tmp_path: Path) -> None:
    root = tmp_path / "grow"
    write_shards(root / "train" / "shard-%06d.tar", [imagenet_sample(i) for i in range(20)], per_shard=10)
    first = index_dataset(root)
    assert first.indexed == ["train/shard-000000.tar", "train/shard-000001.tar"] and first.reused == []
    stored = {n: (root / stored_index_name(n)).stat().st_mtime_ns for n in first.indexed}

    write_shards(root / "train" / "shard-%06d.tar", [imagenet_sample(i) for i in range(20, 27)], per_shard=10,
                 start_shard=2)  # fmt: skip
    os.utime(root / "train" / "shard-000000.tar")  # touched, same bytes: reused after a sha256 check
    second = index_dataset(root)
    assert second.indexed == ["train/shard-000002.tar"]
    assert second.reused == ["train/shard-000000.tar", "train/shard-000001.tar"]
    assert (root / stored_index_name("train/shard-000001.tar")).stat().st_mtime_ns == stored["train/shard-000001.tar"]
    m = second.manifest
    assert m is not None and m.splits["train"].num_samples == 27 and len(m.splits["train"].shards) == 3

    manifest_bytes = (root / "manifest.json").read_bytes()
    third = index_dataset(root)
    assert third.indexed == [] and len(third.reused) == 3
    assert (root / "manifest.json").read_bytes() == manifest_bytes  # nothing changed: byte-identical
    assert index_dataset(root, label="json:label").indexed != []  # another label rule reads every shard again


def test_shards_indexed_here_are_read_without_scanning_unless_cut(
    imagenet_like: dict, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Offsets, keys and labels come from the stored index: no tar is opened while its size matches. A shard cut after
    indexing is scanned and its lost samples counted; a stored index changed after the manifest was written (its
    sha256 is not the one recorded) skips its shard's samples, counted as bad_index."""
    root = imagenet_like["root"]
    assert index_dataset(root).manifest is not None
    real_open = tarfile.open

    def refuse(name=None, *args, **kwargs):
        raise AssertionError(f"tarfile.open({name!r}) on a shard with a stored index")

    monkeypatch.setattr(tarfile, "open", refuse)
    with loader(root, train=False) as eval_loader:
        assert sum(int(b["valid"].sum()) for b in eval_loader) == 35 and eval_loader.corrupt_counts() == {}
    monkeypatch.setattr(tarfile, "open", real_open)

    shard = root / "train" / "shard-000003.tar"  # samples 36..47 of the manifest's 35 (shard 2 left out): 23..34
    truncate_inside(shard, f"_{10000 + 40}.jpg")  # the 5th sample of the shard: 8 lost
    with loader(root, train=False) as eval_loader:
        assert sum(int(b["valid"].sum()) for b in eval_loader) == 35 - 8
        assert eval_loader.corrupt_counts() == {"truncated_shard": 8}

    (root / stored_index_name("train/shard-000001.tar")).write_text("{not json")
    with loader(root, train=False) as eval_loader:
        assert sum(int(b["valid"].sum()) for b in eval_loader) == 35 - 8 - 12
        assert eval_loader.corrupt_counts() == {"truncated_shard": 8, "bad_index": 12}


def test_our_shards_read_back_by_webdataset_and_indexed_alike(tmp_path: Path) -> None:
    from data_pipeline.writer import build_shards

    src = tmp_path / "folder"
    for c in ("cat", "dog"):
        (src / c).mkdir(parents=True)
        for i in range(5):
            (src / c / f"{i}.png").write_bytes(image_bytes(i + 10 * (c == "dog"), "PNG"))
    ours = tmp_path / "ours"
    build_shards(f"imagefolder:{src}", ours, val_fraction=0.2, max_samples_per_shard=3, workers=1, progress=False)
    built = load_manifest(ours)

    # webdataset.WebDataset reads every member of our shards, exactly as tarfile sees them
    for split, info in built.splits.items():
        urls = [str(ours / s.name) for s in info.shards]
        got = list(wds.WebDataset(urls, shardshuffle=False))
        want: dict[str, dict[str, bytes]] = {}
        for url in urls:
            with tarfile.open(url) as tar:
                for m in tar:
                    key, ext = m.name.split(".", 1)
                    want.setdefault(key, {})[ext] = tar.extractfile(m).read()
        assert [s["__key__"] for s in got] == list(want) == [f"{split}_{i:08d}" for i in range(info.num_samples)]
        for sample in got:
            assert {k: v for k, v in sample.items() if not k.startswith("__")} == want[sample["__key__"]]
            assert json.loads(sample["json"])["source"].endswith(".png")

    # `pretrain data index` on a copy of our shards gives the same plan and the same batches
    copy = tmp_path / "copy"
    shutil.copytree(ours, copy, ignore=shutil.ignore_patterns("manifest.json"))
    indexed = index_dataset(copy, classes_file=_write_lines(tmp_path / "classes.txt", built.classes)).manifest
    assert indexed is not None and indexed.classes == built.classes
    assert [(s.name, s.samples, s.sha256) for s in indexed.splits["train"].shards] == [
        (s.name, s.samples, s.sha256) for s in built.splits["train"].shards
    ]
    kw = dict(seed=SEED, epoch=1, world_size=1, rank=0, batch_size=2, shuffle_buffer=BUFFER)
    assert plan_batches(copy, "train", **kw) == plan_batches(ours, "train", **kw)
    with loader(ours, batch_size=2) as a, loader(copy, batch_size=2) as b:
        for x, y in zip(list(a), list(b), strict=True):
            for name in ("index", "valid", "label", "image"):
                assert torch.equal(x[name], y[name])


def _write_lines(path: Path, lines: list[str]) -> Path:
    path.write_text("".join(f"{line}\n" for line in lines))
    return path


def test_a_key_twice_in_one_shard_is_left_out(tmp_path: Path) -> None:
    root = tmp_path / "dup"
    keys = ["a", "b", "a", "c"]  # "a" in two places: WebDataset yields two samples with one key
    samples = [{"__key__": k, "jpg": image_bytes(i), "cls": i % 2} for i, k in enumerate(keys)]
    samples[1].pop("cls")
    write_shards(root / "train" / "s-%02d.tar", samples, per_shard=10)
    m = index_dataset(root).manifest
    assert m is not None and read_stored_shard(root / stored_index_name("train/s-00.tar")).keys == ["c"]
    assert m.splits["train"].skipped_samples == {"duplicate_key": 2, "missing_label": 1}
