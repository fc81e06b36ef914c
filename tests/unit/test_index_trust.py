"""The index is checked, not trusted: hostile labels, shards cut anywhere, index files outside the data folder, and
stored indexes changed after the manifest was written.

Shards are real tar files (``webdataset.TarWriter``, ``tarfile``); the commands run as a user runs them,
``python -m launch.cli data ...`` in a subprocess (under a 3 GiB address-space limit: a label that would make billions
of classes fails the test instead of the machine), and the loader, ``plan`` and ``inspect`` read what they wrote.
"""

from __future__ import annotations

import io
import json
import os
import resource
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
import webdataset as wds
from conftest import REPO
from data_fixtures import png_transform
from PIL import Image

from data_pipeline.loader import build_loader
from data_pipeline.manifest import load_manifest, write_manifest
from data_pipeline.shard_index import index_digest, stored_index_name

pytestmark = [
    pytest.mark.timeout(180),
    pytest.mark.filterwarnings("ignore:This DataLoader will create:UserWarning"),
]


def _jpeg(i: int) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(i).integers(0, 256, (8, 8, 3), dtype=np.uint8)).save(buf, format="JPEG")
    return buf.getvalue()


def _write(path: Path, samples: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with wds.TarWriter(str(path)) as sink:
        for s in samples:
            sink.write(s)
    return path


def _good(n: int, start: int = 0, label: str = "cls") -> list[dict]:
    return [{"__key__": f"k{start + i:04d}", "jpg": _jpeg(start + i), label: str((start + i) % 2)} for i in range(n)]


def _limit_memory() -> None:
    resource.setrlimit(resource.RLIMIT_AS, (3 << 30, 3 << 30))


def cli(*argv: str) -> tuple[int, str, str]:
    """``pretrain ARGV`` in a subprocess: (exit code, stdout, stderr without log lines)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    r = subprocess.run([sys.executable, "-m", "launch.cli", *argv], cwd=REPO, capture_output=True, text=True,
                       env=env, preexec_fn=_limit_memory, timeout=120)  # fmt: skip
    err = "\n".join(line for line in r.stderr.splitlines() if " [rank0] " not in line)  # drop logging lines
    return r.returncode, r.stdout, err


def refused(code: int, err: str, want_code: int, fragment: str) -> None:
    """A refusal: the exit code, one line naming the fix, no traceback."""
    assert code == want_code, err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    assert fragment in err, err


def loader(root: Path, **kw):
    args = dict(train=False, rank=0, world_size=1, batch_size=64, num_workers=0, seed=0, shuffle_buffer=1)
    args.update(kw)
    return build_loader(root, "train", transform=png_transform, image_size=8, **args)


def labels_of(root: Path) -> tuple[dict[int, int], dict[str, int]]:
    """{write index: label} of every valid eval sample, and the corrupt counts."""
    with loader(root) as it:
        got = {int(i): int(lab) for b in it for i, lab, v in zip(b["index"], b["label"], b["valid"]) if v}
        return got, it.corrupt_counts()


# ------------------------------------------------------------------------------------------------------- labels

NESTED = b'{"label": ' + b"[" * 200_000 + b"]" * 200_000 + b"}"
JSON_BAD = {  # .json member -> what the example says
    "nested": (NESTED, "nests deeper than the JSON parser goes"),
    "huge": (b'{"label": 4000000000}', "is not below 2**31"),
    "huger": (b'{"label": 123456789012345678901234567890}', "is not below 2**31"),
    "digits": (b'{"label": ' + b"9" * 5000 + b"}", "does not decode"),
    "negative": (b'{"label": -1}', "is negative"),
    "float": (b'{"label": 1.5}', "neither a class index nor a class name"),
    "nan": (b'{"label": NaN}', "neither"),
    "inf": (b'{"label": -Infinity}', "neither"),
    "bool": (b'{"label": true}', "neither"),
    "null": (b'{"label": null}', "neither"),
    "list": (b'{"label": [1]}', "neither"),
    "object": (b'{"label": {"id": 1}}', "neither"),
    "long name": (b'{"label": "' + b"x" * 5000 + b'"}', "a class name of 5000 characters"),
    "line break": (b'{"label": "a\\nb"}', "line break or control character"),
    "big member": (b'{"label": 1, "pad": "' + b"x" * (2 << 20) + b'"}', "a label takes at most"),
    "not utf-8": (b'{"label": "\xff"}', "does not decode"),
}


def test_hostile_labels_are_counted_bad_samples_never_a_crash(tmp_path: Path) -> None:
    """Nested, huge, negative, wrong-typed, NaN/Infinity, bool, huge-string labels in .json, .cls and .txt: each
    sample is left out as bad_label with what it held, the good ones indexed, the classes those of the good labels,
    within a 3 GiB address space (the old code: RecursionError, then MemoryError numbering 4e9 classes)."""
    root = tmp_path / "json"
    bad = [{"__key__": f"bad-{name.replace(' ', '-')}", "jpg": _jpeg(i), "json": data}
           for i, (name, (data, _)) in enumerate(JSON_BAD.items())]  # fmt: skip
    good = [{"__key__": f"k{i}", "jpg": _jpeg(100 + i), "json": {"label": i % 3}} for i in range(6)]
    _write(root / "train" / "a.tar", good[:3] + bad + good[3:])
    code, out, err = cli("data", "index", str(root), "--label", "json:label")
    assert code == 0 and "Traceback" not in err, err
    assert f"train/a.tar: bad_label {len(JSON_BAD)}" in out and "train: 6 samples in 1 shards" in out
    assert "(e.g. train/a.tar: bad-nested has .jpg .json: .json nests deeper than the JSON parser goes)" in out
    m = load_manifest(root)
    assert m.classes == ["0", "1", "2"] and m.splits["train"].skipped_samples == {"bad_label": len(JSON_BAD)}
    got, corrupt = labels_of(root)
    assert got == {i: i % 3 for i in range(6)} and corrupt == {}

    # every detail, one per sample, from the library
    from data_pipeline.labels import LabelRule, SkipSample

    rule = LabelRule.parse("json:label")
    for name, (data, detail) in JSON_BAD.items():
        with pytest.raises(SkipSample) as e:
            rule.read({"json": data})
        assert e.value.reason == "bad_label" and detail in e.value.detail, (name, e.value.detail)

    cls_root = tmp_path / "cls"
    cls_bad = [b"4000000000", b"9" * 4000, b"-3", b"abc", b"1.5", b"\xff", b"99999999999999999999", b"1048576"]
    _write(cls_root / "train" / "a.tar", _good(4) + [{"__key__": f"c{i}", "jpg": _jpeg(i), "cls": v}
                                                     for i, v in enumerate(cls_bad)])  # fmt: skip
    code, out, err = cli("data", "index", str(cls_root))
    assert code == 0 and "Traceback" not in err, err
    assert f"bad_label {len(cls_bad)}" in out and load_manifest(cls_root).classes == ["0", "1"]
    # with a class list, an index past it is bad; within it, good
    (cls_root / "classes.txt").write_text("cat\ndog\n")
    _write(cls_root / "train" / "b.tar", [{"__key__": "z", "jpg": _jpeg(7), "cls": b"2"}])
    code, out, err = cli("data", "index", str(cls_root))
    assert code == 0 and "train/b.tar: bad_label 1 (no usable sample)" in out, out + err
    with pytest.raises(SkipSample, match="bad_label.*the class index 2 is not below the 2 classes of the list"):
        LabelRule.parse("cls").read({"cls": b"2"}, 2)

    txt_root = tmp_path / "txt"
    txt_bad = [b"x" * 5000, b"a\nb", b"tab\there", b"nul\x00", b"y" * (100 << 10), b"\xff\xfe", b"  "]
    _write(txt_root / "train" / "a.tar", _good(4, label="txt") + [{"__key__": f"t{i}", "jpg": _jpeg(i), "txt": v}
                                                                  for i, v in enumerate(txt_bad)])  # fmt: skip
    code, out, err = cli("data", "index", str(txt_root), "--label", "txt")
    assert code == 0 and "Traceback" not in err, err
    assert "bad_label 6, missing_label 1" in out and load_manifest(txt_root).classes == ["0", "1"]


def test_a_class_list_with_a_control_character_is_refused(tmp_path: Path) -> None:
    root = tmp_path / "ds"
    _write(root / "train" / "a.tar", _good(2))
    (tmp_path / "classes.txt").write_text("cat\ndog\x07bell\n")
    code, _, err = cli("data", "index", str(root), "--classes", str(tmp_path / "classes.txt"))
    refused(code, err, 2, "class 1 ('dog\\x07bell') is not a class name")
    assert not (root / "manifest.json").exists()


# ------------------------------------------------------------------------------------------------- cut shards


def test_a_shard_cut_inside_a_header_is_named_truncated_not_indexed_shorter(tmp_path: Path) -> None:
    """Cut inside a header, or with a damaged header (bad checksum): `index` leaves the shard out as truncated and
    names it; a shard cut that way after indexing is counted as truncated_shard by the loader and named by `inspect`."""
    root = tmp_path / "ds"
    _write(root / "train" / "a.tar", _good(5))
    cut = _write(root / "train" / "b.tar", _good(5, 100))
    damaged = _write(root / "train" / "c.tar", _good(5, 200))
    with tarfile.open(cut) as tar:
        third = next(m for m in tar if m.name.startswith("k0102."))  # sample 2's first member
    whole_b, whole_c = cut.read_bytes(), damaged.read_bytes()
    cut.write_bytes(whole_b[: third.offset + 100])  # 100 bytes into sample 2's first header
    damaged.write_bytes(whole_c[: third.offset] + b"\x01" * 512 + whole_c[third.offset + 512 :])
    code, out, err = cli("data", "index", str(root))
    assert code == 0, err
    assert "left out train/b.tar: truncated_shard (after 2 samples, the file ends 100 bytes into the header" in out
    assert "left out train/c.tar: truncated_shard (after 2 samples, the header at byte" in out
    assert [s.name for s in load_manifest(root).splits["train"].shards] == ["train/a.tar"]
    assert {s["path"] for s in load_manifest(root).skipped} == {"train/b.tar", "train/c.tar"}

    cut.write_bytes(whole_b)
    damaged.write_bytes(whole_c)
    assert cli("data", "index", str(root))[0] == 0 and load_manifest(root).splits["train"].num_samples == 15
    cut.write_bytes(whole_b[: third.offset + 100])  # cut after indexing
    got, corrupt = labels_of(root)
    assert corrupt == {"truncated_shard": 3} and len(got) == 12
    code, out, _ = cli("data", "inspect", str(root))
    assert code == 1 and "BAD train/b.tar:" in out and "cut inside a header" in out, out


# -------------------------------------------------------------------------------------- writes outside the data


def _tree(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))


def test_index_files_are_written_only_inside_the_index_location(tmp_path: Path) -> None:
    """`..`, absolute paths and URLs in --split-glob are refused before anything is read; a `.index` (or a folder in
    it) that is a symbolic link out of the data folder is refused; a temp file planted as a link is not followed."""
    outside = tmp_path / "outside"
    _write(outside / "x.tar", _good(3))
    root = tmp_path / "ds"
    _write(root / "train" / "a.tar", _good(3))
    before = _tree(tmp_path)
    for spec, fragment in [
        ("train=../outside/*.tar", "../outside/*.tar is not a path inside"),
        (f"train={outside}/*.tar", f"{outside}/*.tar is not a path inside"),
        ("train={train/a.tar,../outside/x.tar}", "../outside/x.tar is not a path inside"),
        ("train=s3://elsewhere/x.tar", "s3://elsewhere/x.tar is not a path inside"),
    ]:
        code, _, err = cli("data", "index", str(root), "--split-glob", spec)
        refused(code, err, 2, fragment)
        assert "pass their folder as DIR" in err
    assert _tree(tmp_path) == before

    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (root / ".index").symlink_to(elsewhere)
    code, _, err = cli("data", "index", str(root))
    refused(code, err, 2, "(a symbolic link); remove the link")
    assert list(elsewhere.iterdir()) == [] and not (root / "manifest.json").exists()
    (root / ".index").unlink()
    (root / ".index").mkdir()
    (root / ".index" / "train").symlink_to(elsewhere)
    refused(*cli("data", "index", str(root))[::2], 2, "outside")
    assert list(elsewhere.iterdir()) == []
    (root / ".index" / "train").unlink()

    victim = tmp_path / "victim.txt"
    victim.write_text("keep me")
    (root / "manifest.json.tmp").symlink_to(victim)
    assert cli("data", "index", str(root))[0] == 0
    assert victim.read_text() == "keep me" and load_manifest(root).splits["train"].num_samples == 3
    assert not (root / "manifest.json.tmp").exists()


# ------------------------------------------------------------------------------------ stored indexes that change


@pytest.fixture
def indexed(tmp_path: Path) -> Path:
    """Two shards of 6 samples (labels i % 2) indexed by `pretrain data index`."""
    root = tmp_path / "ds"
    _write(root / "train" / "a.tar", _good(6))
    _write(root / "train" / "b.tar", _good(6, 6))
    assert cli("data", "index", str(root))[0] == 0
    return root


def _edit_index(root: Path, shard: str, edit) -> Path:
    path = root / stored_index_name(shard)
    entry = json.loads(path.read_bytes())
    edit(entry)
    path.write_text(json.dumps(entry, separators=(",", ":")) + "\n")
    return path


def test_a_changed_label_in_a_stored_index_is_caught_everywhere(indexed: Path) -> None:
    """One label flipped in b.tar's stored index: the loader skips b.tar's samples as bad_index (never its wrong
    label), `plan` refuses, `inspect` names the shard and the sample with both labels, and `index` reads the shard
    again instead of reusing the changed index."""
    root = indexed
    want = {i: i % 2 for i in range(12)}
    assert labels_of(root) == (want, {})

    def flip(entry: dict) -> None:
        entry["samples"][1][1] = 1 - entry["samples"][1][1]

    _edit_index(root, "train/b.tar", flip)
    got, corrupt = labels_of(root)
    assert got == {i: want[i] for i in range(6)} and corrupt == {"bad_index": 6}

    code, _, err = cli("data", "plan", str(root), "--world-size", "1", "--workers", "0", "--batch-size", "2")
    refused(code, err, 2, "the stored index changed after the manifest was written")
    assert "re-run `pretrain data index`" in err

    for deep in ([], ["--deep"]):
        code, out, err = cli("data", "inspect", str(root), *deep)
        assert code == 1 and "Traceback" not in err, out + err
        line = next(x for x in out.splitlines() if x.startswith("BAD "))
        assert line.startswith("BAD train/b.tar: stored index .index/train/b.tar.json changed after the manifest")
        assert "1 samples' labels in the stored index are not the ones in the shard (cls), e.g. k0007 (stored 0, in " \
               "the shard 1)" in line  # fmt: skip

    code, out, _ = cli("data", "index", str(root))
    assert code == 0 and "1 shards read, 1 unchanged" in out, out
    assert labels_of(root) == (want, {})
    assert cli("data", "inspect", str(root), "--deep")[0] == 0


def test_offsets_that_point_at_another_member_are_caught_when_read(indexed: Path) -> None:
    """Someone rewrites an index AND the manifest's digest of it (or replaces a shard by another of the same size):
    the digest passes, but each member is read with the tar header before it, which names another sample. Those
    samples are skipped as offset_mismatch, never fed with another sample's image or label; `inspect` names them."""
    root = indexed

    def swap(entry: dict) -> None:  # samples 1 and 2 of a.tar trade their members
        s = entry["samples"]
        s[1][3], s[2][3] = s[2][3], s[1][3]

    path = _edit_index(root, "train/a.tar", swap)
    m = load_manifest(root)
    m.splits["train"].shards[0].index_sha256 = index_digest(path.read_bytes())
    write_manifest(m, root)
    got, corrupt = labels_of(root)
    assert set(got) == set(range(12)) - {1, 2} and corrupt == {"offset_mismatch": 2}
    code, out, _ = cli("data", "inspect", str(root))
    assert code == 1 and "2 indexed samples' members are not at their stored offsets, e.g. k0001, k0002" in out

    # the same through a replaced shard: b.tar rewritten with its samples in another order (same bytes in all).
    # (Re-indexing alone keeps a.tar's index: the manifest, rewritten too, vouches for it; inspect is what tells.)
    (root / "manifest.json").unlink()
    assert cli("data", "index", str(root))[0] == 0 and labels_of(root) == ({i: i % 2 for i in range(12)}, {})
    shard = root / "train" / "b.tar"
    size, mtime = shard.stat().st_size, shard.stat().st_mtime_ns
    samples = _good(6, 6)
    _write(shard, samples[3:] + samples[:3])
    os.utime(shard, ns=(mtime, mtime))  # same size, same mtime: nothing but the bytes tells
    assert shard.stat().st_size == size
    got, corrupt = labels_of(root)
    assert set(got) == set(range(6)) and corrupt == {"offset_mismatch": 6}


def test_manifest_without_index_digests(indexed: Path, tmp_path: Path) -> None:
    """An indexed manifest that records no digest of its stored indexes cannot be checked: refused, naming the fix;
    a nested-JSON manifest is a message too, not a RecursionError."""
    raw = json.loads((indexed / "manifest.json").read_text())
    for sh in raw["splits"]["train"]["shards"]:
        del sh["index_sha256"]
    (indexed / "manifest.json").write_text(json.dumps(raw))
    code, _, err = cli("data", "plan", str(indexed), "--world-size", "1", "--workers", "0", "--batch-size", "2")
    refused(code, err, 2, "records no sha256 of its stored index (index_sha256)")
    assert "re-run `pretrain data index`" in err
    assert cli("data", "index", str(indexed))[0] == 0  # re-indexing records them (every shard read again)
    assert load_manifest(indexed).splits["train"].shards[0].index_sha256 is not None

    (indexed / "manifest.json").write_bytes(b"[" * 100_000)
    code, _, err = cli("data", "plan", str(indexed), "--world-size", "1", "--workers", "0", "--batch-size", "2")
    refused(code, err, 2, "not valid JSON (RecursionError")
    code, _, err = cli("data", "inspect", str(indexed))
    refused(code, err, 1, "not valid JSON (RecursionError")


def test_our_own_shards_record_index_digests_and_fall_back_to_the_tar(tmp_path: Path) -> None:
    """`pretrain data build` records each stored index's sha256; a changed one is not used (the tar is scanned:
    the same labels), and `inspect` names it with the sample whose label changed."""
    from data_fixtures import build_png_dataset

    root = build_png_dataset(tmp_path, 9, max_samples_per_shard=5)
    shards = load_manifest(root).splits["train"].shards
    assert all(sh.index_sha256 == index_digest((root / sh.index).read_bytes()) for sh in shards)
    want, _ = labels_of(root)

    def flip(entry: dict) -> None:
        entry["samples"][0][1] = (entry["samples"][0][1] + 1) % 3

    _edit_index(root, shards[0].name, flip)
    assert labels_of(root) == (want, {})
    code, out, _ = cli("data", "inspect", str(root))
    assert code == 1 and f"BAD {shards[0].name}: stored index {shards[0].index} changed after the manifest" in out
    assert "1 samples' labels in the stored index are not the ones in the shard (cls), e.g. train_00000000" in out
    assert torch.equal(torch.tensor(sorted(want)), torch.arange(9))


# ------------------------------------------------------------------------------------------------------ messages


@pytest.fixture(scope="module")
def small(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One indexed shard of 4 samples; its manifest.json doubles as a file where a folder is expected."""
    root = tmp_path_factory.mktemp("msgs") / "ds"
    _write(root / "train" / "a.tar", _good(4))
    assert cli("data", "index", str(root))[0] == 0
    return root


REFUSALS = [  # argv ({D}: the data set), exit code, message fragment
    (["data", "index", "{D}", "--split-glob", "train=../*.tar"], 2, "is not a path inside"),
    (["data", "index", "{D}", "--split-glob", "train={a..c"], 2, "--split-glob train={a..c: Unbalanced braces"),
    (["data", "index", "{D}", "--split-glob", "../x=train/*.tar"], 2, "the split name '../x' must be a plain name"),
    (["data", "index", "{D}", "--index-out", "{D}/manifest.json"], 2, "is a file, not a folder"),
    (["data", "build", "digits", "--out", "{D}/manifest.json"], 2, "--out {D}/manifest.json is a file, not a folder"),
    (["data", "build", "digits", "--out", "{D}/new", "--shard-size-mb", "nan"], 2, "must be positive numbers"),
    (["data", "build", "digits", "--out", "{D}/new", "--shard-size-mb", "inf"], 2, "must be positive numbers"),
    (["data", "plan", "{D}", "--world-size", "100000000", "--workers", "0", "--batch-size", "1"], 2,
     "--world-size 100000000 x --batch-size 1 = 100000000, more than the 4 of split 'train'"),
]  # fmt: skip


@pytest.mark.parametrize("argv, code, fragment", REFUSALS, ids=[" ".join(r[0][:2] + r[0][3:5]) for r in REFUSALS])
def test_bad_input_is_one_line_exit_2_nothing_written(small: Path, argv: list[str], code: int, fragment: str) -> None:
    before = _tree(small)
    got, _, err = cli(*(a.replace("{D}", str(small)) for a in argv))
    refused(got, err, code, fragment.replace("{D}", str(small)))
    assert _tree(small) == before
