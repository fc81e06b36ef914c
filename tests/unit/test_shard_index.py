"""The shard index: read from the stored index when it fits the shard (the tar is not opened), else from a ``tarfile``
scan that groups members like WebDataset and says how a broken shard breaks."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pytest
from data_fixtures import build_png_dataset, sample_members, shard_name

from data_pipeline import shard_index
from data_pipeline.shard_index import index_shard, read_stored_shard, write_stored_index

Members = dict[str, dict[str, tuple[int, int]]]  # key -> ext -> (offset_data, size)


def _write_members(path: Path, infos: list[tuple[tarfile.TarInfo, bytes]], tar_format: int) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w", format=tar_format) as tar:
        for info, data in infos:
            tar.addfile(info, io.BytesIO(data) if info.isfile() else None)
    return path


def _file(name: str, data: bytes, **fields) -> tuple[tarfile.TarInfo, bytes]:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    for field, value in fields.items():
        setattr(info, field, value)
    return info, data


def _samples(prefix: str = "", n: int = 3, **fields) -> list[tuple[tarfile.TarInfo, bytes]]:
    return [
        _file(f"{prefix}{key}.{ext}", data, **fields)
        for key, members in (sample_members("train", i) for i in range(n))
        for ext, data in members.items()
    ]


def _tar_members(path: Path) -> Members:
    """Every regular member by key and extension, as tarfile lists them (names split at the first dot of the file)."""
    out: Members = {}
    with tarfile.open(path) as tar:
        for m in tar.getmembers():
            if m.isfile():
                folder, _, file = m.name.rpartition("/")
                stem, _, ext = file.partition(".")
                out.setdefault(f"{folder}/{stem}" if folder else stem, {})[ext.lower()] = (m.offset_data, m.size)
    return out


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A data set written by ``pretrain data build`` (data_pipeline.writer) from an image folder of tiny PNGs."""
    return build_png_dataset(tmp_path_factory.mktemp("writer"), 9)


@pytest.fixture
def no_tarfile(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Every ``tarfile.open`` from here on fails the test; the list records the paths it was called with."""
    calls: list[str] = []

    def refuse(name=None, *args, **kwargs):
        calls.append(str(name))
        raise AssertionError(f"tarfile.open({name!r}) on a shard with a usable stored index")

    monkeypatch.setattr(tarfile, "open", refuse)
    return calls


def test_scan_reads_every_tar_format(tmp_path: Path, built: Path) -> None:
    """ustar (long names in the prefix field, non-ASCII), GNU (base-256 numbers, long names), pax, directories, links,
    members of size 0 and unknown member types: every regular member, grouped by key, at tarfile's offsets."""
    deep = "Bäume/" + "d" * 70 + "/" + "e" * 40 + "/"  # > 100 characters: USTAR splits it into prefix + name
    link = tarfile.TarInfo("train_00000000.lnk")
    link.type, link.linkname = tarfile.SYMTYPE, "train_00000000.png"
    folder, v7_folder, volume = tarfile.TarInfo("shards"), tarfile.TarInfo("old/"), tarfile.TarInfo("volume")
    folder.type, v7_folder.type, volume.type = tarfile.DIRTYPE, tarfile.AREGTYPE, b"V"
    odd = dict(mtime=-1, uid=2**22, gid=2**40)  # GNU base-256: negative mtime, ids past 7 octal digits
    long_dir = "x" * 120 + "/"  # no '/' to split at within 100 characters of the end: GNU 'L' or pax headers
    tars = {
        "writer": built / shard_name("train", 0),
        "ustar": _write_members(tmp_path / "ustar.tar", _samples(), tarfile.USTAR_FORMAT),
        "ustar prefix field": _write_members(tmp_path / "prefix.tar", _samples(deep), tarfile.USTAR_FORMAT),
        "gnu base-256": _write_members(tmp_path / "gnu.tar", _samples(**odd), tarfile.GNU_FORMAT),
        "gnu long names": _write_members(tmp_path / "gnul.tar", _samples(long_dir), tarfile.GNU_FORMAT),
        "pax long names": _write_members(tmp_path / "pax.tar", _samples(long_dir), tarfile.PAX_FORMAT),
        "pax non-ASCII": _write_members(tmp_path / "paxu.tar", _samples("Bäume/"), tarfile.PAX_FORMAT),
        "kinds": _write_members(
            tmp_path / "kinds.tar",
            [(folder, b""), (v7_folder, b""), (volume, b""), _file("train_00000000.cls", b""), (link, b"")]
            + _samples(n=2)
            + [_file("train_00000001.txt", b"")],  # a last member of size 0
            tarfile.USTAR_FORMAT,
        ),
    }
    for case, path in tars.items():
        index = index_shard(path, None, "train")
        assert index.problem is None and index.members == _tar_members(path), case
        assert len(index.members) == {"writer": 9, "kinds": 2}.get(case, 3), case
    assert all(
        k.startswith("Bäume/") and len(k) > 90 for k in index_shard(tars["ustar prefix field"], None, "").members
    )
    assert index_shard(tars["kinds"], None, "").members["train_00000001"]["txt"][1] == 0


def _broken_tars(root: Path) -> dict[str, Path]:
    """Tars cut or damaged in every way the stream survives (samples 0..3 of ``_samples``, members png then cls)."""
    whole = _write_members(root / "whole.tar", _samples(n=4), tarfile.USTAR_FORMAT).read_bytes()
    with tarfile.open(root / "whole.tar") as tar:
        png = tar.getmember("train_00000002.png")
    header = bytearray(whole[png.offset : png.offset + 512])
    header[100:108] = b"0x644\0\0\0"  # not octal, but with a checksum that matches: tarfile calls it invalid
    header[148:156] = b"        "
    header[148:156] = b"%06o\0 " % sum(header)

    def put(name: str, data: bytes | bytearray) -> Path:
        (root / name).write_bytes(data)
        return root / name

    return {
        "cut inside member data": put("data.tar", whole[: png.offset_data + 10]),
        "cut inside the padding after the data": put("pad.tar", whole[: png.offset_data + png.size]),
        "cut between members": put("between.tar", whole[: png.offset]),
        "cut inside a header": put("header.tar", whole[: png.offset + 100]),
        "end-of-archive blocks only": put("end.tar", bytes(10240)),
        "cut inside the first header": put("first.tar", whole[:300]),
        "garbage": put("garbage.tar", np.random.default_rng(0).bytes(4096)),
        "garbage header mid-way (bad checksum)": put(
            "badsum.tar", whole[: png.offset] + b"\x01" * 512 + whole[png.offset + 512 :]
        ),
        "non-octal mode, valid checksum": put("mode.tar", whole[: png.offset] + header + whole[png.offset + 512 :]),
        "missing": root / "missing.tar",
    }


BOTH = ["cls", "png"]
BROKEN = {  # case: (problem, {sample: members kept}); members before the break are intact, the rest lost
    "cut inside member data": ("truncated_shard", {0: BOTH, 1: BOTH}),  # the sample at the break is lost as a whole
    "cut inside the padding after the data": ("truncated_shard", {0: BOTH, 1: BOTH, 2: ["png"]}),
    "cut between members": ("truncated_shard", {0: BOTH, 1: BOTH}),  # tarfile alone would call it complete
    "cut inside a header": (None, {0: BOTH, 1: BOTH}),  # tarfile reads a partial header as the end
    "end-of-archive blocks only": ("empty_shard", {}),
    "cut inside the first header": ("truncated_shard", {}),
    "garbage": ("truncated_shard", {}),
    "garbage header mid-way (bad checksum)": (None, {0: BOTH, 1: BOTH}),  # tarfile stops at an invalid header
    "non-octal mode, valid checksum": (None, {0: BOTH, 1: BOTH}),
    "missing": ("missing_shard", {}),
}


def test_scan_of_broken_shards(tmp_path: Path) -> None:
    """Cut, empty or damaged shards: the problem the stream counts, and exactly the intact samples before the break;
    a stored index whose size does not match does not hide any of it."""
    for case, path in _broken_tars(tmp_path).items():
        problem, kept = BROKEN[case]
        index = index_shard(path, range(4), "train")
        assert index.problem == problem, case
        assert {k: sorted(v) for k, v in index.members.items()} == {f"train_{i:08d}": e for i, e in kept.items()}, case
        assert (index.detail == "") == (problem is None) and not index.foreign_keys, case
        other = shard_index.StoredShard(1 << 30, ["train_00000000"], [0], ["png"], [{"png": (512, 10)}])
        assert index_shard(path, range(4), "train", other) == index, case  # another size: the tar is scanned


def test_stored_index_replaces_the_scan(built: Path, no_tarfile: list[str], monkeypatch: pytest.MonkeyPatch) -> None:
    """The stored index ``pretrain data build`` wrote gives the scan's index without opening the tar; once the shard's
    size differs from it (cut after the build), the tar is scanned and the truncation reported."""
    path = built / shard_name("train", 0)
    stored = read_stored_shard(built / shard_index.stored_index_name(shard_name("train", 0)))
    assert stored.bytes == path.stat().st_size and stored.keys == [f"train_{i:08d}" for i in range(9)]
    index = index_shard(path, range(9), "train", stored)
    assert no_tarfile == []
    monkeypatch.undo()  # tarfile back
    assert index == index_shard(path, range(9), "train")
    assert index.members == _tar_members(path) and index.problem is None
    empty = shard_index.StoredShard(stored.bytes, [], [], [], [])
    assert index_shard(path, range(9), "train", empty).problem == "empty_shard"

    cut = built.parent / "cut.tar"
    data = path.read_bytes()
    at = index.members["train_00000004"]["png"][0] + 5
    cut.write_bytes(data[:at])
    scanned = index_shard(cut, range(9), "train", stored)
    assert scanned.problem == "truncated_shard" and sorted(scanned.members) == [f"train_{i:08d}" for i in range(4)]


def _entry(**change) -> dict:
    entry = {"version": 1, "shard": "t.tar", "bytes": 4096, "mtime_ns": None, "sha256": "0" * 64, "label": "cls",
             "classes_sha256": None, "image_exts": {"png": 1}, "skipped": {}, "label_counts": [[0, 1]],
             "samples": [["k", 0, "png", {"cls": [512, 1], "png": [1536, 100]}]]}  # fmt: skip
    entry.update(change)
    return entry


@pytest.mark.parametrize(
    "change, message",
    [
        (dict(version=2), "not a version 1"),
        (dict(bytes="4096"), "'bytes' or 'samples'"),
        (dict(samples={"k": 1}), "'bytes' or 'samples'"),
        (dict(samples=[["k", 0, "png"]]), "malformed"),
        (dict(samples=[["k", 0, "png", {"png": [1536]}]]), "malformed"),
        (dict(samples=[["k", 0, "png", {"png": ["x", 1]}]]), "malformed"),
        (dict(samples=[["k", 0, "png", {"png": [4000, 100]}]]), "not within the shard's 4096 bytes"),
        (dict(samples=[["k", 0, "png", {"png": [-1, 10]}]]), "not within"),
        (dict(samples=[[7, 0, "png", {"png": [512, 10]}]]), "not a string"),
    ],
)
def test_read_stored_shard_refuses_what_it_cannot_trust(tmp_path: Path, change: dict, message: str) -> None:
    path = tmp_path / "i.json"
    write_stored_index(path, _entry(**change))
    with pytest.raises(ValueError, match=message):
        read_stored_shard(path)


def test_read_and_write_stored_index(tmp_path: Path) -> None:
    path = tmp_path / ".index" / "train" / "t.tar.json"
    with pytest.raises(FileNotFoundError):
        read_stored_shard(path)
    assert write_stored_index(path, _entry())
    stored = read_stored_shard(path)
    assert (stored.bytes, stored.keys, stored.labels, stored.images) == (4096, ["k"], [0], ["png"])
    assert stored.members == [{"cls": (512, 1), "png": (1536, 100)}]
    written = path.stat().st_mtime_ns
    assert not write_stored_index(path, _entry())  # the same bytes: the file is kept
    assert path.stat().st_mtime_ns == written and sorted(p.name for p in path.parent.iterdir()) == ["t.tar.json"]
    assert write_stored_index(path, _entry(sha256="1" * 64))
    assert json.loads(path.read_text())["sha256"] == "1" * 64
    path.write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        read_stored_shard(path)
