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
        last = tar.getmembers()[-1]
    end = last.offset_data + -(-last.size // 512) * 512  # where the end-of-archive blocks start
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
        "cut inside the end-of-archive blocks": put("endcut.tar", whole[: end + 700]),
        "cut inside the zero padding after them": put("padcut.tar", whole[: end + 1024 + 100]),
        "a second tar appended (cat a.tar b.tar)": put("cat.tar", whole + whole),
        "missing": root / "missing.tar",
    }


BOTH = ["cls", "png"]
BROKEN = {  # case: (problem, {sample: members kept}); members before the break are intact, the rest lost
    "cut inside member data": ("truncated_shard", {0: BOTH, 1: BOTH}),  # the sample at the break is lost as a whole
    "cut inside the padding after the data": ("truncated_shard", {0: BOTH, 1: BOTH, 2: ["png"]}),
    "cut between members": ("truncated_shard", {0: BOTH, 1: BOTH}),  # tarfile alone would call it complete
    "cut inside a header": ("truncated_shard", {0: BOTH, 1: BOTH}),  # tarfile alone reads a partial header as the end
    "end-of-archive blocks only": ("empty_shard", {}),
    "cut inside the first header": ("truncated_shard", {}),
    "garbage": ("truncated_shard", {}),
    "garbage header mid-way (bad checksum)": ("truncated_shard", {0: BOTH, 1: BOTH}),  # tarfile alone stops there
    "non-octal mode, valid checksum": ("truncated_shard", {0: BOTH, 1: BOTH}),
    "cut inside the end-of-archive blocks": ("truncated_shard", {i: BOTH for i in range(4)}),
    "cut inside the zero padding after them": (None, {i: BOTH for i in range(4)}),  # a complete tar
    "a second tar appended (cat a.tar b.tar)": ("truncated_shard", {i: BOTH for i in range(4)}),  # never read
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
        (dict(samples=[["k", 0, "png", {"png": [100, 10]}]]), "not within"),  # no room for its tar header
        (dict(samples=[[7, 0, "png", {"png": [512, 10]}]]), "not a string"),
        (dict(bytes=True), "'bytes' or 'samples'"),
        (dict(samples=[["k", 0, "png", {"png": [512.0, 10]}]]), "not within"),
    ],
)
def test_read_stored_shard_refuses_what_it_cannot_trust(tmp_path: Path, change: dict, message: str) -> None:
    write_stored_index(tmp_path, "i.json", _entry(**change))
    with pytest.raises(ValueError, match=message):
        read_stored_shard(tmp_path / "i.json")


@pytest.mark.parametrize(
    "data, message",
    [
        (b"[" * 100_000 + b"]" * 100_000, "RecursionError"),  # nested past the parser's depth: a message, no crash
        (b'{"version": 1, "bytes": ' + b"9" * 5000 + b"}", "not valid JSON"),  # past int's digit limit
        (b"\xff\xfe", "not valid JSON"),
        (b"[1, 2]", "not a version 1"),
    ],
)
def test_hostile_stored_index_bytes_are_a_value_error(tmp_path: Path, data: bytes, message: str) -> None:
    (tmp_path / "i.json").write_bytes(data)
    with pytest.raises(ValueError, match=message):
        read_stored_shard(tmp_path / "i.json")


def test_digest_is_checked_before_the_index_is_parsed(tmp_path: Path) -> None:
    """The sha256 the manifest recorded is checked on the bytes read: one changed label is refused as IndexChanged
    (a ValueError) naming both digests; the recorded digest reads it."""
    wrote, digest = write_stored_index(tmp_path, "i.json", _entry())
    assert wrote and digest == shard_index.index_digest((tmp_path / "i.json").read_bytes())
    assert read_stored_shard(tmp_path / "i.json", digest).labels == [0]
    write_stored_index(tmp_path, "i.json", _entry(samples=[["k", 1, "png", {"cls": [512, 1], "png": [1536, 100]}]]))
    with pytest.raises(shard_index.IndexChanged, match=f"is not the {digest[:12]}... the manifest recorded"):
        read_stored_shard(tmp_path / "i.json", digest)
    (tmp_path / "i.json").write_bytes(b"[" * 100_000)  # not parsed at all once the digest differs
    with pytest.raises(shard_index.IndexChanged):
        read_stored_shard(tmp_path / "i.json", digest)


def test_read_and_write_stored_index(tmp_path: Path) -> None:
    name = ".index/train/t.tar.json"
    path = tmp_path / name
    with pytest.raises(FileNotFoundError):
        read_stored_shard(path)
    assert write_stored_index(tmp_path, name, _entry())[0]
    stored = read_stored_shard(path)
    assert (stored.bytes, stored.keys, stored.labels, stored.images) == (4096, ["k"], [0], ["png"])
    assert stored.members == [{"cls": (512, 1), "png": (1536, 100)}]
    written = path.stat().st_mtime_ns
    assert not write_stored_index(tmp_path, name, _entry())[0]  # the same bytes: the file is kept
    assert path.stat().st_mtime_ns == written and sorted(p.name for p in path.parent.iterdir()) == ["t.tar.json"]
    assert write_stored_index(tmp_path, name, _entry(sha256="1" * 64))[0]
    assert json.loads(path.read_text())["sha256"] == "1" * 64
    path.write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        read_stored_shard(path)


@pytest.mark.parametrize("tar_format", [tarfile.USTAR_FORMAT, tarfile.GNU_FORMAT, tarfile.PAX_FORMAT])
def test_a_shard_cut_anywhere_is_truncated(tmp_path: Path, tar_format: int) -> None:
    """Cut at every block boundary and at 4 places inside every block (data, padding, a header, the extension header
    of a long name, the end blocks), a shard is never a good shorter shard: ``truncated_shard``, with only members of
    the whole tar at their true offsets. Cut inside the zero padding after the end blocks, it is whole."""
    long_dir = "d" * 120 + "/"  # GNU 'L' and pax 'x' extension headers before each member
    path = _write_members(tmp_path / "whole.tar", _samples(long_dir, n=3), tar_format)
    whole = path.read_bytes()
    full = index_shard(path, None, "")
    assert full.problem is None and len(full.members) == 3
    with tarfile.open(path) as tar:
        last = tar.getmembers()[-1]
    end = last.offset_data + -(-last.size // 512) * 512 + 1024
    cut = tmp_path / "cut.tar"
    for length in sorted({b + d for b in range(0, len(whole), 512) for d in (0, 1, 100, 257, 511)} - {0}):
        cut.write_bytes(whole[:length])
        index = index_shard(cut, None, "")
        if length < end:
            assert index.problem == "truncated_shard", length
            for key, exts in index.members.items():
                assert all(full.members[key][ext] == span for ext, span in exts.items()), length
        else:
            assert index.problem is None and index.members == full.members, length


def test_member_header_check(tmp_path: Path) -> None:
    """The 512 bytes before a member's data name that member: its key and extension (any case), its size. Another
    member's header, a non-header, or another size is a problem; names a writer had to substitute (past 100 bytes,
    non-ASCII in pax) match by prefix or file name."""
    cases = {
        "ustar": ("", tarfile.USTAR_FORMAT),
        "gnu long": ("x" * 120 + "/", tarfile.GNU_FORMAT),
        "pax long": ("y" * 120 + "/", tarfile.PAX_FORMAT),
        "pax non-ASCII": ("Bäume/", tarfile.PAX_FORMAT),
        "ustar prefix": ("Bäume/" + "d" * 70 + "/" + "e" * 40 + "/", tarfile.USTAR_FORMAT),
    }
    for case, (prefix, fmt) in cases.items():
        path = _write_members(tmp_path / "h.tar", _samples(prefix, n=2), fmt)
        data = path.read_bytes()
        members = index_shard(path, None, "").members
        for key, exts in members.items():
            for ext, (offset, size) in exts.items():
                header = data[offset - 512 : offset]
                assert shard_index.member_header_problem(header, key, ext, size) is None, (case, key, ext)
                assert shard_index.member_header_problem(header, key, ext, size + 1) is not None, case
                other = next(k for k in members if k != key)
                problem = shard_index.member_header_problem(header, other, ext, size)
                # past 100 bytes only the folder part is in the header: there the size is what tells members apart
                assert (problem is None) == (case in ("gnu long", "pax long")), (case, problem)
                assert shard_index.member_header_problem(data[offset : offset + 512].ljust(512, b"\0"), key, ext,
                                                         size) is not None, case  # fmt: skip
    upper = _write_members(tmp_path / "u.tar", [_file("K.JPG", b"abc")], tarfile.USTAR_FORMAT).read_bytes()
    assert shard_index.member_header_problem(upper[:512], "K", "jpg", 3) is None  # WebDataset lower-cases extensions
    assert "not K.png" in shard_index.member_header_problem(upper[:512], "K", "png", 3)
    assert "no tar header" in shard_index.member_header_problem(b"\x01" * 512, "K", "jpg", 3)
