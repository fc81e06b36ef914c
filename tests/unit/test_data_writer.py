"""`pretrain data build / inspect`: digits and imagefolder sources, manifest, atomic resumable writes, inspection."""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import shutil
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from data_pipeline.manifest import load_manifest
from data_pipeline.verify import inspect_dataset
from data_pipeline.writer import build_shards
from launch import cmd_data

pytestmark = pytest.mark.timeout(120)

CLASSES = ("bird", "flower", "temple")


def read_split(data_dir: Path, split: str) -> list[dict[str, bytes]]:
    """Every sample of a split in key order, members by extension, read with plain tarfile."""
    samples: dict[str, dict[str, bytes]] = {}
    for shard in load_manifest(data_dir).splits[split].shards:
        with tarfile.open(data_dir / shard.name) as tar:
            for m in tar:
                key, _, ext = m.name.partition(".")
                samples.setdefault(key, {"__key__": key.encode()})[ext] = tar.extractfile(m).read()
    return [samples[k] for k in sorted(samples)]


def assert_stored_indexes_match_the_tars(data_dir: Path) -> int:
    """Every shard's stored index (named by the manifest) lists every member of the tar at tarfile's
    ``offset_data``/``size``, each sample's key, ``.cls`` label and image member, and the shard's size and sha256.
    Returns the number of members checked."""
    checked = 0
    for info in load_manifest(data_dir).splits.values():
        for shard in info.shards:
            assert shard.index == f".index/{shard.name}.json"
            entry = json.loads((data_dir / shard.index).read_bytes())
            assert (entry["version"], entry["shard"], entry["bytes"], entry["sha256"], entry["label"]) == (
                1, shard.name, shard.bytes, shard.sha256, "cls"
            )  # fmt: skip
            want: dict[str, dict[str, list[int]]] = {}
            labels: dict[str, int] = {}
            with tarfile.open(data_dir / shard.name) as tar:
                for m in tar:
                    key, _, ext = m.name.partition(".")
                    want.setdefault(key, {})[ext] = [m.offset_data, m.size]
                    if ext == "cls":
                        labels[key] = int(tar.extractfile(m).read())
            assert [s[0] for s in entry["samples"]] == list(want)  # tar order
            for key, label, image, members in entry["samples"]:
                assert members == want[key] and label == labels[key] and image in members and image != "json"
                checked += len(members)
    return checked


def tree_bytes(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def run_cli(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="pretrain")
    cmd_data.register(parser.add_subparsers(dest="command"))
    args = parser.parse_args(argv)
    return args.func(args)


@pytest.fixture(scope="module")
def digits(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("digits") / "ds"
    build_shards("digits", out, max_samples_per_shard=400, workers=1, progress=False)
    return out


def _photo_jpegs(rng: np.random.Generator, n: int) -> list[bytes]:
    """Real photographs (scikit-learn's china.jpg / flower.jpg), randomly cropped and resized, as JPEG."""
    from sklearn.datasets import load_sample_images

    photos = load_sample_images().images  # two (427, 640, 3) uint8 photos
    out = []
    for i in range(n):
        photo = photos[i % 2]
        h, w = int(rng.integers(150, 400)), int(rng.integers(150, 600))
        y, x = int(rng.integers(0, photo.shape[0] - h)), int(rng.integers(0, photo.shape[1] - w))
        img = Image.fromarray(photo[y : y + h, x : x + w]).resize((int(rng.integers(60, 140)), 96))
        buf = io.BytesIO()
        img.save(buf, format="JPEG", quality=int(rng.integers(75, 95)))
        out.append(buf.getvalue())
    return out


def make_folder(root: Path, per_class: int, seed: int) -> Path:
    rng = np.random.default_rng(seed)
    jpegs = iter(_photo_jpegs(rng, per_class * len(CLASSES)))
    for name in CLASSES:
        (root / name).mkdir(parents=True)
        for i in range(per_class):
            (root / name / f"{name}_{i:03d}.JPEG").write_bytes(next(jpegs))
    return root


@pytest.fixture(scope="module")
def photos(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An ImageNet-style folder of real JPEG photos, plus a PNG named .JPEG and two broken files."""
    root = make_folder(tmp_path_factory.mktemp("photos") / "train", per_class=6, seed=0)
    png = io.BytesIO()
    Image.fromarray(np.full((40, 50, 3), 90, np.uint8)).save(png, format="PNG")
    (root / "flower" / "disguised_png.JPEG").write_bytes(png.getvalue())
    (root / "bird" / "notes.JPEG").write_bytes(b"this is not an image, just some text\n" * 4)
    good = (root / "temple" / "temple_000.JPEG").read_bytes()
    (root / "temple" / "truncated.JPEG").write_bytes(good[: len(good) // 2])
    return root


# ------------------------------------------------------------------------------------------------------- digits


def test_digits_manifest_counts_stratified_and_checksums(digits: Path) -> None:
    raw = json.loads((digits / "manifest.json").read_text())
    assert raw["version"] == 1 and raw["source"] == "digits" and raw["format"] == "png"
    assert raw["classes"] == [str(i) for i in range(10)] and raw["skipped"] == []
    assert set(raw) >= {"created", "splits"}
    train, val = raw["splits"]["train"], raw["splits"]["val"]
    assert (train["num_samples"], val["num_samples"]) == (1497, 300)
    # stratified: each class keeps its share (~1/6) in val
    for c in raw["classes"]:
        total = train["class_counts"][c] + val["class_counts"][c]
        assert abs(val["class_counts"][c] - total * 300 / 1797) <= 1.0
    assert [s["samples"] for s in train["shards"]] == [400, 400, 400, 297]
    keys = []
    for split in ("train", "val"):
        for s in raw["splits"][split]["shards"]:
            data = (digits / s["name"]).read_bytes()
            assert s["bytes"] == len(data) and s["sha256"] == hashlib.sha256(data).hexdigest()
            assert (digits / (s["name"] + ".sha256")).read_text().split()[0] == s["sha256"]
        keys.append([smp["__key__"].decode() for smp in read_split(digits, split)])
    assert keys[0] == [f"train_{i:08d}" for i in range(1497)] and keys[1] == [f"val_{i:08d}" for i in range(300)]
    # webdataset, our tar layer, reads the shards as samples with every member
    import webdataset as wds

    urls = [str(digits / s["name"]) for s in val["shards"]]
    read = [
        (s["__key__"], sorted(k for k in s if not k.startswith("__"))) for s in wds.WebDataset(urls, shardshuffle=False)
    ]
    assert read == [(k, ["cls", "json", "png"]) for k in keys[1]]


def test_build_writes_a_stored_index_per_shard(digits: Path) -> None:
    """`pretrain data build` writes .index/<shard>.json for every shard, offsets as tarfile reads them."""
    assert assert_stored_indexes_match_the_tars(digits) == 1797 * 3  # .cls, .json, .png of every sample
    entry = json.loads((digits / ".index/val/shard-000000.tar.json").read_bytes())
    assert entry["mtime_ns"] is None and entry["image_exts"] == {"png": 300} and entry["skipped"] == {}
    assert sum(n for _, n in entry["label_counts"]) == 300
    assert entry["classes_sha256"] == hashlib.sha256("\n".join(str(i) for i in range(10)).encode()).hexdigest()


def test_digits_samples_decode_to_the_right_digit(digits: Path) -> None:
    from sklearn.datasets import load_digits

    ref = load_digits()
    seen = set()
    for split in ("train", "val"):
        for smp in read_split(digits, split)[:40]:
            index = int(json.loads(smp["json"])["source"].split("[")[1].rstrip("]"))
            seen.add(index)
            img = Image.open(io.BytesIO(smp["png"]))
            assert (img.format, img.mode, img.size) == ("PNG", "RGB", (32, 32))
            pixels = np.asarray(img)
            assert int(smp["cls"]) == ref.target[index]
            expected = np.rint(ref.images[index] * 255 / 16).astype(np.uint8)  # (8, 8)
            np.testing.assert_array_equal(pixels[::4, ::4, 0], expected)
            np.testing.assert_array_equal(pixels[..., 0], pixels[..., 2])  # grey in RGB
    train_src = {json.loads(s["json"])["source"] for s in read_split(digits, "train")}
    val_src = {json.loads(s["json"])["source"] for s in read_split(digits, "val")}
    assert not train_src & val_src and len(train_src | val_src) == 1797
    # the write order mixes classes: no shard is one class
    labels = [int(s["cls"]) for s in read_split(digits, "train")[:400]]
    assert len(set(labels)) == 10


def test_interrupted_build_resumes_to_identical_result(digits: Path, tmp_path: Path) -> None:
    ds = tmp_path / "ds"
    shutil.copytree(digits, ds)
    before = tree_bytes(ds)
    before_manifest = json.loads(before.pop("manifest.json"))
    # an interrupted build: no manifest yet, two shards never written (one left as a stale temp file),
    # one shard corrupted in place, and a sidecar missing
    (ds / "manifest.json").unlink()
    (ds / "train/shard-000001.tar").unlink()
    (ds / "train/shard-000001.tar.sha256").unlink()
    (ds / "train/shard-000001.tar.tmp").write_bytes(b"\0" * 1000)
    (ds / "val/shard-000000.tar").unlink()
    with open(ds / "train/shard-000002.tar", "r+b") as f:
        f.seek(5000)
        f.write(b"\xff\xfe\xfd")
    (ds / "train/shard-000003.tar.sha256").unlink()
    # stored indexes: one gone, one damaged, one torn write left behind, one of a shard no longer planned
    (ds / ".index/train/shard-000003.tar.json").unlink()
    (ds / ".index/val/shard-000000.tar.json").write_text('{"version": 1}')
    (ds / ".index/train/shard-000000.tar.json.tmp").write_text("{")
    (ds / ".index/train/shard-000009.tar.json").write_text("{}")
    kept = (ds / "train/shard-000000.tar").stat().st_mtime_ns
    kept_index = (ds / ".index/train/shard-000001.tar.json").stat().st_mtime_ns

    manifest = build_shards("digits", ds, max_samples_per_shard=400, workers=2, progress=False)
    after = tree_bytes(ds)
    after_manifest = json.loads(after.pop("manifest.json"))
    assert after == before  # every shard and sidecar byte-identical, no temp file left
    assert {k: v for k, v in after_manifest.items() if k != "created"} == {
        k: v for k, v in before_manifest.items() if k != "created"
    }
    assert (ds / "train/shard-000000.tar").stat().st_mtime_ns == kept  # a finished shard is not rewritten
    assert (ds / ".index/train/shard-000001.tar.json").stat().st_mtime_ns == kept_index  # nor its intact index
    assert manifest.splits["train"].num_samples == 1497
    # re-running a finished build changes nothing, not even the manifest's timestamp
    first = (ds / "manifest.json").read_bytes()
    build_shards("digits", ds, max_samples_per_shard=400, workers=1, progress=False)
    assert (ds / "manifest.json").read_bytes() == first


# -------------------------------------------------------------------------------------------------- imagefolder


def test_imagefolder_stores_source_bytes_and_skips_broken_files(photos: Path, tmp_path: Path) -> None:
    out = tmp_path / "ds"
    m = build_shards(
        f"imagefolder:{photos}", out, val_fraction=0.34, max_samples_per_shard=5, workers=1, progress=False
    )
    assert m.classes == list(CLASSES) and m.format == "mixed"
    assert sorted((Path(s["path"]).name, s["reason"].split(" ")[0]) for s in m.skipped) == [
        ("notes.JPEG", "not"),
        ("truncated.JPEG", "truncated"),
    ]
    # stratified per class over the listed files: round(0.34 * 7) = 2 of each class's 7 files go to val
    totals = {c: m.splits["train"].class_counts[c] + m.splits["val"].class_counts[c] for c in CLASSES}
    assert totals == {"bird": 6, "flower": 7, "temple": 6}
    assert all(1 <= m.splits["val"].class_counts[c] <= 2 for c in CLASSES)
    assert [s.samples for s in m.splits["train"].shards][:2] == [5, 5]
    stored = 0
    for split in ("train", "val"):
        for smp in read_split(out, split):
            rel = json.loads(smp["json"])["source"]
            ext = next(e for e in smp if e not in ("__key__", "cls", "json"))
            assert smp[ext] == (photos / rel).read_bytes()  # never re-encoded
            assert CLASSES[int(smp["cls"])] == rel.split("/")[0]
            assert ext == ("png" if rel.endswith("disguised_png.JPEG") else "jpg")  # by content, not name
            stored += 1
    assert stored == 19
    assert inspect_dataset(out, deep=True).ok


def test_imagefolder_separate_val_tree_and_cli(photos: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    val = make_folder(tmp_path / "val", per_class=2, seed=1)
    out = tmp_path / "ds"
    rc = run_cli(["data", "build", f"imagefolder:{photos}", "--out", str(out), "--val", str(val), "--workers", "1"])
    printed = capsys.readouterr().out
    assert rc == 0
    assert "notes.JPEG" in printed and "truncated.JPEG" in printed  # skipped files are named
    m = load_manifest(out)
    assert (m.splits["train"].num_samples, m.splits["val"].num_samples) == (19, 6)
    assert assert_stored_indexes_match_the_tars(out) == 25 * 3
    for smp in read_split(out, "val"):
        assert smp["jpg"] == (val / json.loads(smp["json"])["source"]).read_bytes()
    assert "--val" in m.source
    # bad usage: exit 2, nothing written
    assert run_cli(["data", "build", "nosuch", "--out", str(tmp_path / "x")]) == 2
    assert run_cli(["data", "build", f"imagefolder:{tmp_path / 'missing'}", "--out", str(tmp_path / "y")]) == 2
    assert run_cli(["data", "build", "digits", "--out", str(tmp_path / "z"), "--val-fraction", "0.1"]) == 2
    assert not (tmp_path / "x" / "manifest.json").exists()


# ------------------------------------------------------------------------------------------------------ inspect


def _member_offset(shard: Path, suffix: str) -> int:
    with tarfile.open(shard) as tar:
        member = next(m for m in tar if m.name.endswith(suffix))
        return member.offset_data + member.size // 2


def test_inspect_names_checksum_mismatch_and_truncated_shards(
    digits: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    ds = tmp_path / "ds"
    shutil.copytree(digits, ds)
    assert run_cli(["data", "inspect", str(ds)]) == 0
    assert "OK: 5 shards" in capsys.readouterr().out
    # one flipped byte inside an image (same size), and a shard cut short
    flipped = ds / "train/shard-000001.tar"
    at = _member_offset(flipped, ".png")
    data = bytearray(flipped.read_bytes())
    data[at] ^= 0xFF
    flipped.write_bytes(bytes(data))
    cut = ds / "val/shard-000000.tar"
    cut.write_bytes(cut.read_bytes()[: 300_000 + 100])

    report = inspect_dataset(ds)
    bad = {b.name: " ".join(b.reasons) for b in report.bad_shards}
    assert set(bad) == {"train/shard-000001.tar", "val/shard-000000.tar"}
    assert "sha256" in bad["train/shard-000001.tar"] and "size" not in bad["train/shard-000001.tar"]
    assert "truncated" in bad["val/shard-000000.tar"] and "samples in the tar" in bad["val/shard-000000.tar"]
    deep = inspect_dataset(ds, deep=True)
    assert "decode_error" in " ".join(next(b for b in deep.bad_shards if b.name.startswith("train")).reasons)

    assert run_cli(["data", "inspect", str(ds)]) == 1
    out = capsys.readouterr().out
    assert "BAD train/shard-000001.tar" in out and "BAD val/shard-000000.tar" in out
    assert run_cli(["data", "inspect", str(tmp_path / "nothing")]) == 2
    (ds / "manifest.json").write_text("{not json")
    assert run_cli(["data", "inspect", str(ds)]) == 1
    assert "pretrain data build" in capsys.readouterr().err


def test_inspect_names_a_stored_index_that_does_not_match_its_shard(digits: Path, tmp_path: Path) -> None:
    ds = tmp_path / "ds"
    shutil.copytree(digits, ds)
    moved = ds / ".index/train/shard-000002.tar.json"
    entry = json.loads(moved.read_bytes())
    entry["samples"][7][3]["png"][0] += 512  # one member's offset off by a block
    moved.write_text(json.dumps(entry))
    (ds / ".index/val/shard-000000.tar.json").write_text("{not json")
    bad = {b.name: " ".join(b.reasons) for b in inspect_dataset(ds).bad_shards}
    assert set(bad) == {"train/shard-000002.tar", "val/shard-000000.tar"}
    assert "stored index does not match the tar (1 of its 400 samples' members differ" in bad["train/shard-000002.tar"]
    assert (
        "stored index .index/train/shard-000002.tar.json changed after the manifest was written"
        in bad["train/shard-000002.tar"]
    )
    assert (
        "stored index unreadable" in bad["val/shard-000000.tar"]
        and "pretrain data build" in bad["val/shard-000000.tar"]
    )


def test_inspect_names_a_shard_cut_between_samples(digits: Path, tmp_path: Path) -> None:
    """A shard cut exactly at a sample's first header reads as a complete tar to tarfile; the missing end-of-archive
    blocks give it away (the loader's scan, which inspect uses)."""
    ds = tmp_path / "ds"
    shutil.copytree(digits, ds)
    shard = ds / "train/shard-000003.tar"
    entry = json.loads((ds / ".index/train/shard-000003.tar.json").read_bytes())
    cut = entry["samples"][100][3]["cls"][0] - 512  # the header of sample 100's first member
    shard.write_bytes(shard.read_bytes()[:cut])
    (bad,) = inspect_dataset(ds).bad_shards
    assert bad.name == "train/shard-000003.tar"
    assert (
        "truncated or unreadable tar (after 100 samples, the file ends right after a member, without the "
        "end-of-archive blocks (cut between members))" in bad.reasons
    )
    assert "100 samples in the tar, manifest says 297" in bad.reasons


def test_load_manifest_errors_name_the_path(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="pretrain data build"):
        load_manifest(tmp_path)
    (tmp_path / "manifest.json").write_text(json.dumps({"version": 1, "source": "x", "format": "png"}))
    with pytest.raises(ValueError, match=f"{tmp_path}.*classes"):
        load_manifest(tmp_path)


# --------------------------------------------------------------------------------------------------------- plan


def test_plan_cli(digits: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert run_cli(["data", "plan", str(tmp_path), "--world-size", "2", "--workers", "1", "--batch-size", "4"]) == 2
    assert "pretrain data build" in capsys.readouterr().err
    base = ["data", "plan", str(digits), "--world-size", "2", "--workers", "2", "--batch-size", "50"]
    assert run_cli([*base, "--split", "test"]) == 2
    assert run_cli([*base[:4], "0", *base[5:]]) == 2  # --world-size 0
    pytest.importorskip("data_pipeline.stream")
    capsys.readouterr()
    assert run_cli(base) == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    n_batches = 1497 // 100
    assert [(d["batch"], d["rank"]) for d in lines] == [(b, r) for b in range(n_batches) for r in range(2)]
    keys = [k for d in lines for k in d["keys"]]
    assert len(keys) == len(set(keys)) == n_batches * 100
    assert run_cli([*base, "--skip-batches", "10"]) == 0
    assert [json.loads(x) for x in capsys.readouterr().out.splitlines()] == lines[20:]
