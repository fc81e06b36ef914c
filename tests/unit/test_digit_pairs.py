"""`pretrain data build digit-pairs`: balanced same/different pairs, disjoint digit images, seeded, ordinary shards."""

from __future__ import annotations

import io
import json
import math
import re
from pathlib import Path

import numpy as np
import pytest
from data_fixtures import png_transform
from PIL import Image

from data_pipeline.loader import build_loader
from data_pipeline.manifest import load_manifest
from data_pipeline.sources import DigitPairsSource, open_source
from data_pipeline.verify import inspect_dataset
from launch.cli import main as cli_main

SMALL = "digit-pairs:train_pairs=301,val_pairs=100,distractors=2,seed=3"


@pytest.fixture(scope="module")
def pairs_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("pairs") / "ds"
    assert cli_main(["data", "build", SMALL, "--out", str(out), "--workers", "1", "--no-progress"]) == 0
    return out


def test_balanced_labels_and_classes_match_the_pairs() -> None:
    src = open_source(SMALL)
    assert isinstance(src, DigitPairsSource) and src.classes == ["different", "same"]
    for split, n in (("train", 301), ("val", 100)):
        rows = src.layouts[split]
        assert len(rows) == n and rows[:, 0].sum() == n // 2  # n // 2 "same"; the odd sample is "different"
        same = src.digits.labels[rows[:, 1]] == src.digits.labels[rows[:, 2]]
        assert (same == rows[:, 0].astype(bool)).all()
        assert (rows[:, 1] != rows[:, 2]).all()  # never one image twice
        dist = np.hypot(rows[:, 3] - rows[:, 5], rows[:, 4] - rows[:, 6])
        assert dist.min() >= src.min_distance


def test_train_and_val_use_disjoint_digit_images() -> None:
    src = open_source(SMALL)
    used = {}
    for split, rows in src.layouts.items():
        used[split] = set(rows[:, 1:3].ravel().tolist()) | {int(rows[i, 7 + 3 * j]) for i in range(len(rows)) for j in
                                                            range(src.distractors)}  # fmt: skip
    assert used["val"] <= src.digits.val_indices and not used["train"] & src.digits.val_indices
    assert not used["train"] & used["val"]


def test_same_seed_same_images_other_seed_other_pairs() -> None:
    a, b, c = open_source(SMALL), open_source(SMALL), open_source(SMALL.replace("seed=3", "seed=4"))
    for split in ("train", "val"):
        assert np.array_equal(a.layouts[split], b.layouts[split])
        assert not np.array_equal(a.layouts[split], c.layouts[split])
    item = a.list_items()[5]
    assert a.read(item) == b.read(item)


def test_render_places_both_digits_full_and_distractors_dimmed() -> None:
    src = open_source(SMALL)
    row = src.layouts["val"][0]
    img = src.render(row)[..., 0].astype(int)  # (64, 64)
    side = 8 * src.scale
    for index, y, x in ((row[1], row[3], row[4]), (row[2], row[5], row[6])):
        digit = np.repeat(np.repeat(src.digits.images[index], src.scale, 0), src.scale, 1)
        assert np.array_equal(img[y : y + side, x : x + side], digit)
    y, x = row[8], row[9]
    assert img[y : y + side, x : x + side].max() <= math.ceil(255 * src.distractor_level)


def test_shards_are_ordinary_shards(pairs_dir: Path) -> None:
    m = load_manifest(pairs_dir)
    assert m.source == open_source(SMALL).spec and "seed=3" in m.source and m.classes == ["different", "same"]
    assert {k: v.class_counts for k, v in m.splits.items()} == {
        "train": {"different": 151, "same": 150},
        "val": {"different": 50, "same": 50},
    }
    assert inspect_dataset(pairs_dir, deep=True).ok
    with build_loader(pairs_dir, "val", train=False, rank=0, world_size=1, batch_size=100, num_workers=0, seed=0,
                      shuffle_buffer=1, transform=png_transform) as loader:  # fmt: skip
        (batch,) = list(loader)
    assert batch["valid"].all() and batch["image"].shape[-2:] == (64, 64)
    assert sorted(batch["label"].tolist()) == [0] * 50 + [1] * 50  # every val sample once (the writer shuffles)


def test_stored_samples_are_the_generated_pairs(pairs_dir: Path) -> None:
    import tarfile

    src = open_source(SMALL)
    with tarfile.open(next((pairs_dir / "val").glob("*.tar"))) as tar:
        members = {m.name: tar.extractfile(m).read() for m in tar.getmembers()}
    for key in ("val_00000000", "val_00000042"):
        meta = json.loads(members[f"{key}.json"])
        row = src.layouts["val"][int(meta["source"].split("/")[1])]
        png = np.asarray(Image.open(io.BytesIO(members[f"{key}.png"])))
        assert np.array_equal(png, src.render(row)) and meta["digits"] == row[1:3].tolist()
        assert int(members[f"{key}.cls"]) == int(meta["digit_classes"][0] == meta["digit_classes"][1]) == row[0]


def test_the_ablation_data_is_what_its_config_says() -> None:
    """configs/data/digit_pairs.yaml's build command writes its path: 10 classes, digits at 4x (32 px, their size in
    the digits data) on a 64x64 canvas, centres >= 40 px apart, balanced."""
    from pretrain.config import CONFIGS_DIR

    text = (CONFIGS_DIR / "data" / "digit_pairs.yaml").read_text()
    spec, out = re.search(r"pretrain data build (\S+) --out (\S+)", text).groups()
    assert re.search(rf"^path: {re.escape(out)}\s", text, re.M), (out, text)
    src = open_source(f"{spec},train_pairs=400,val_pairs=100")
    assert (src.canvas, src.scale, src.min_distance, src.digit_classes) == (64, 4, 40, "0123456789")
    for split, n in (("train", 400), ("val", 100)):
        rows = src.layouts[split]
        assert rows[:, 0].sum() == n // 2
        classes = src.digits.labels[rows[:, 1:3]]
        assert (classes[:, 0] == classes[:, 1]).tolist() == rows[:, 0].astype(bool).tolist()
        assert rows[:, 3:7].min() >= 0 and rows[:, 3:7].max() <= 64 - 32  # both 32 px digits inside the canvas
        assert np.hypot(rows[:, 3] - rows[:, 5], rows[:, 4] - rows[:, 6]).min() >= 40
    assert src.render(src.layouts["val"][0]).shape == (64, 64, 3)


@pytest.mark.parametrize(
    "spec", ["digit-pairs:canvas=16", "digit-pairs:colour=1", "digit-pairs:seed=x", "digit-pairs:digit_classes=1"]
)
def test_bad_options_are_refused(spec: str) -> None:
    with pytest.raises(ValueError, match="digit-pairs"):
        open_source(spec)
