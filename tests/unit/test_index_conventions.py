"""WebDataset's conventions and the messages that say why: brace lists, compressed shards, tars of folders, shards
without labels, "nothing written" meaning nothing written, the ``validation`` split, and a folder without a manifest.

The shards are real tar files written the ways users make them: ``webdataset.ShardWriter``, ``tarfile`` adding a
folder's files in directory order (as ``tar cf`` does), img2dataset's layout (``.jpg`` + ``.json`` + a caption in
``.txt``), ``gzip``.
"""

from __future__ import annotations

import gzip
import io
import tarfile
from pathlib import Path

import numpy as np
import pytest
import webdataset as wds
from PIL import Image

from data_pipeline.manifest import load_manifest
from launch.cli import main
from pretrain.plan import validate_launch

pytestmark = [pytest.mark.timeout(120)]

CONFIG = "configs/run/digits_sepvit_lite.yaml"


def _jpeg(i: int) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(i).integers(0, 256, (8, 8, 3), dtype=np.uint8)).save(buf, format="JPEG")
    return buf.getvalue()


def _write(pattern: Path, samples: list[dict], per_shard: int = 100) -> None:
    pattern.parent.mkdir(parents=True, exist_ok=True)
    with wds.ShardWriter(str(pattern), maxcount=per_shard, verbose=0) as sink:
        for s in samples:
            sink.write(s)


def _tar_of_folder(path: Path, n: int) -> None:
    """What `tar cf` of a folder of ``{key}.jpg`` and ``{key}.cls`` files may store: every image, then every label
    (directory order), so a sample's members are not next to each other."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w") as tar:
        for ext in ("jpg", "cls"):
            for i in range(n):
                data = _jpeg(i) if ext == "jpg" else str(i % 2).encode()
                info = tarfile.TarInfo(f"photos/{i:04d}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))


def _good(n: int, start: int = 0) -> list[dict]:
    return [{"__key__": f"k{start + i:05d}", "jpg": _jpeg(start + i), "cls": (start + i) % 2} for i in range(n)]


def run_cli(capsys: pytest.CaptureFixture, *argv: str) -> tuple[int, str]:
    code = main(list(argv))
    captured = capsys.readouterr()
    return code, captured.out + captured.err


def written(root: Path) -> list[str]:
    return sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if p.suffix in (".json", ".tmp"))


def test_tar_of_a_folder_is_explained_with_the_fix_and_nothing_is_written(tmp_path: Path, capsys) -> None:
    root = tmp_path / "folder-tar"
    _tar_of_folder(root / "train" / "photos.tar", 12)
    code, out = run_cli(capsys, "data", "index", str(root))
    assert code == 1, out
    assert "train/photos.tar: duplicate_key 24 (no usable sample)" in out
    assert "1 shards gave no usable sample: train/photos.tar" in out
    assert "tar --sort=name -cf SHARD.tar -C FOLDER ." in out
    assert "e.g. train/photos.tar: photos/0000 found again after other samples" in out
    assert "no usable sample in" in out and "24 samples left out" in out and "nothing written" in out
    assert written(root) == [] and not (root / ".index").exists()

    # Among good shards, the one that gave nothing is named; the others are indexed.
    _write(root / "train" / "good-%02d.tar", _good(5))
    code, out = run_cli(capsys, "data", "index", str(root))
    assert code == 0, out
    assert "1 shards gave no usable sample: train/photos.tar" in out and "train: 5 samples in 2 shards" in out
    assert "wrote 2 stored indexes and the manifest" in out
    assert written(root) == [".index/train/good-00.tar.json", ".index/train/photos.tar.json", "manifest.json"]


def test_img2dataset_output_without_labels_names_the_label_options(tmp_path: Path, capsys) -> None:
    root = tmp_path / "img2dataset"
    samples = [
        {"__key__": f"{i:09d}", "jpg": _jpeg(i), "txt": f"a photo of thing {i}", "json": {"url": "x", "key": f"{i}"}}
        for i in range(6)
    ]
    _write(root / "train" / "%05d.tar", samples)
    code, out = run_cli(capsys, "data", "index", str(root))
    assert code == 1 and written(root) == [], out
    assert "train/00000.tar: missing_label 6 (no usable sample)" in out
    assert "pass --label txt (a class name in .txt) or --label json:FIELD" in out
    assert "e.g. train/00000.tar: 000000000 has .jpg .json .txt" in out


def test_brace_lists_select_shards_and_a_listed_missing_one_is_named(tmp_path: Path, capsys) -> None:
    root = tmp_path / "braces"
    _write(root / "train-%06d.tar", _good(12), per_shard=3)  # train-000000..000003
    _write(root / "val-%06d.tar", _good(4, 100), per_shard=2)
    code, out = run_cli(capsys, "data", "index", str(root), "--split-glob", "train=train-{000000..000002}.tar",
                        "--split-glob", "val=val-000000.tar::val-{000001..000002}.tar")  # fmt: skip
    assert code == 0, out
    assert "left out val-000002.tar: cannot be read" in out  # listed, not there: named, not fatal
    m = load_manifest(root)
    assert [s.name for s in m.splits["train"].shards] == [f"train-{i:06d}.tar" for i in range(3)]
    assert m.splits["train"].num_samples == 9 and m.splits["val"].num_samples == 4
    code, out = run_cli(capsys, "data", "index", str(root), "--split-glob", "train=train-{000007..000009}.tar")
    assert code == 1 and "no usable sample" in out


def test_compressed_shards_are_refused_with_the_command_that_decompresses_them(tmp_path: Path, capsys) -> None:
    root = tmp_path / "gz"
    _write(root / "train" / "shard-%02d.tar", _good(6), per_shard=3)
    for tar in sorted((root / "train").glob("*.tar")):
        tar.with_name(tar.name + ".gz").write_bytes(gzip.compress(tar.read_bytes()))
        tar.unlink()
    code, out = run_cli(capsys, "data", "index", str(root))
    assert code == 2, out
    assert "train/shard-00.tar.gz and 1 more are compressed shards" in out
    assert f'for f in {root}/train/*.tar.gz; do gzip -dc "$f" > "${{f%.tar.gz}}.tar"; done' in out
    assert written(root) == []
    for gz in sorted((root / "train").glob("*.tar.gz")):  # the command the message names, in Python
        gz.with_name(gz.name.removesuffix(".gz")).write_bytes(gzip.decompress(gz.read_bytes()))
    code, out = run_cli(capsys, "data", "index", str(root))
    assert code == 0 and "train: 6 samples in 2 shards" in out, out  # the .tar.gz twins are ignored


def test_validation_split_and_config_errors_before_any_rank(tmp_path: Path, capsys) -> None:
    root = tmp_path / "hf"
    _write(root / "train" / "shard-%02d.tar", _good(40))
    _write(root / "validation" / "shard-%02d.tar", _good(10, 100))
    base = [f"data.path={root}", f"run.output_dir={tmp_path / 'runs'}", "data.batch_size=4"]

    code, out = run_cli(capsys, "train", CONFIG, *base)  # no manifest yet: say which command makes one
    assert code == 2 and f"`pretrain data index {root}`" in out and "WebDataset shards" in out, out
    assert main(["data", "index", str(root)]) == 0
    plan = validate_launch(CONFIG, base, nproc=None, resume=None, no_resume=False)
    assert plan.cfg.data.val_split == "validation" and plan.cfg.model.num_classes == 2
    code, out = run_cli(capsys, "train", CONFIG, *base, "data.val_split=valid")
    assert code == 2, out
    assert "data.val_split='valid' is not a split of" in out and "its splits: train, validation" in out
