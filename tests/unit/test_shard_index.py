"""The shard index: the tar header scan reads what ``tarfile`` reads, and hands ``tarfile`` what it does not read."""

from __future__ import annotations

import io
import tarfile
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest
from data_fixtures import png_bytes, sample_members, shard_name

from data_pipeline import shard_index

Members = list[tuple[str, int, int]]  # (name, offset_data, size) of each regular file, in tar order


def _read_members(reader: Callable[[Path, int], Iterator[tuple[str, int, int]]], path: Path) -> tuple[Members, str]:
    """Every ``(name, offset_data, size)`` a member reader yields and how it ends (normally, or what it raises)."""
    entries = []
    try:
        entries.extend(reader(path, path.stat().st_size))
    except shard_index._NoEndMarker:
        return entries, "no end-of-archive marker"
    except shard_index._NotPlainTar:
        return entries, "handed to tarfile"
    except (tarfile.TarError, OSError) as e:
        return entries, f"{type(e).__name__}: {e}"
    return entries, "end"


def _tarfile_index(path: Path, monkeypatch: pytest.MonkeyPatch) -> shard_index.ShardIndex:
    """The shard index as tarfile alone reads it (the scan before the header reader)."""
    with monkeypatch.context() as m:
        m.setattr(shard_index, "_header_members", shard_index._tarfile_members)
        return shard_index.index_shard(path, range(100), "train")


def _header_index(path: Path) -> shard_index.ShardIndex:
    return shard_index.index_shard(path, range(100), "train")


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


@pytest.fixture(scope="module")
def writer_shard(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A shard written by ``pretrain data build`` (data_pipeline.writer) from an image folder of tiny PNGs."""
    from data_pipeline.writer import build_shards

    root = tmp_path_factory.mktemp("writer")
    for i in range(9):
        folder = root / "images" / f"class{i % 3}"
        folder.mkdir(parents=True, exist_ok=True)
        (folder / f"img{i}.png").write_bytes(png_bytes(i))
    build_shards(f"imagefolder:{root / 'images'}", root / "ds", val_fraction=0.0, workers=1, progress=False)
    return root / "ds" / shard_name("train", 0)


def _plain_tars(root: Path) -> dict[str, Path]:
    """Tars the header reader reads itself, as tarfile writes them."""
    deep = "Bäume/" + "d" * 70 + "/" + "e" * 40 + "/"  # > 100 characters, non-ASCII: USTAR splits it into prefix + name
    assert len(deep + "train_00000000.png") > 100
    link = tarfile.TarInfo("train_00000000.lnk")
    link.type, link.linkname = tarfile.SYMTYPE, "train_00000000.png"
    folder, v7_folder = tarfile.TarInfo("shards"), tarfile.TarInfo("old/")
    folder.type, v7_folder.type = tarfile.DIRTYPE, tarfile.AREGTYPE  # AREGTYPE + '/': a V7 directory, no data
    odd = dict(mtime=-1, uid=2**22, gid=2**40)  # GNU base-256: negative mtime, ids past 7 octal digits
    return {
        "ustar": _write_members(root / "ustar.tar", _samples(), tarfile.USTAR_FORMAT),
        "ustar long names (prefix field)": _write_members(root / "prefix.tar", _samples(deep), tarfile.USTAR_FORMAT),
        "gnu, base-256 numbers": _write_members(root / "gnu.tar", _samples(**odd), tarfile.GNU_FORMAT),
        "pax, short ASCII names": _write_members(root / "pax.tar", _samples(), tarfile.PAX_FORMAT),
        "size 0, directories, links": _write_members(
            root / "kinds.tar",
            [(folder, b""), (v7_folder, b""), _file("train_00000000.cls", b""), (link, b"")]
            + _samples(n=2)
            + [_file("train_00000001.txt", b"")],  # a last member of size 0
            tarfile.USTAR_FORMAT,
        ),
    }


def test_header_scan_reads_what_tarfile_reads(
    tmp_path: Path, writer_shard: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Same members (names, data offsets, sizes), same ending and the same index as tarfile, without handing the
    shard to tarfile, on our writer's shards and on tars written by tarfile in its three formats."""
    tars = {"writer": writer_shard, **_plain_tars(tmp_path)}
    for case, path in tars.items():
        got = _read_members(shard_index._header_members, path)
        assert got == _read_members(shard_index._tarfile_members, path), case
        assert got[1] == "end" and got[0], case
        assert _header_index(path) == _tarfile_index(path, monkeypatch), case
    long_names = tars["ustar long names (prefix field)"]
    names = [name for name, _, _ in _read_members(shard_index._header_members, long_names)[0]]
    assert all(len(n) > 100 and n.startswith("Bäume/") for n in names)
    sizes = [size for _, _, size in _read_members(shard_index._header_members, tars["size 0, directories, links"])[0]]
    assert sizes[0] == sizes[-1] == 0


def test_header_scan_reads_a_base256_size(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A member of 8 GiB has its size in GNU base-256 (12 octal digits end at 8 GiB - 1); the member after it is
    found past the data. The big member's data is a hole in a sparse file (no disk space)."""
    big = 8 << 30
    path = tmp_path / "big.tar"
    with open(path, "wb") as f:
        info, data = _file("train_00000000.cls", b"0")
        f.write(info.tobuf(tarfile.GNU_FORMAT) + data.ljust(512, b"\0"))
        info, _ = _file("train_00000000.bin", b"")
        info.size = big
        header = info.tobuf(tarfile.GNU_FORMAT)
        assert header[124] == 0x80  # base-256
        f.write(header)
        f.seek(big, io.SEEK_CUR)  # 8 GiB is a whole number of blocks
        info, data = _file("train_00000001.cls", b"1")
        f.write(info.tobuf(tarfile.GNU_FORMAT) + data.ljust(512, b"\0") + bytes(1024))
    got = _read_members(shard_index._header_members, path)
    assert got == _read_members(shard_index._tarfile_members, path)
    after_big = 1536 + big + 512  # the big member's data, then the next header
    want = [("train_00000000.cls", 512, 1), ("train_00000000.bin", 1536, big), ("train_00000001.cls", after_big, 1)]
    assert got == (want, "end")
    assert _header_index(path) == _tarfile_index(path, monkeypatch)


def test_header_scan_hands_other_tars_to_tarfile(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """GNU long names ('L'), pax headers ('x') and member types it does not know: the shard is scanned by tarfile,
    and the index is tarfile's."""
    long_dir = "x" * 120 + "/"  # no '/' to split at within 100 characters of the end: USTAR could not write it
    volume = tarfile.TarInfo("volume")
    volume.type = b"V"  # GNU volume header: tarfile skips its data
    tars = {
        "gnu long names": _write_members(tmp_path / "gnu.tar", _samples(long_dir), tarfile.GNU_FORMAT),
        "pax long names": _write_members(tmp_path / "pax.tar", _samples(long_dir), tarfile.PAX_FORMAT),
        "pax non-ASCII name": _write_members(tmp_path / "paxu.tar", _samples("Bäume/"), tarfile.PAX_FORMAT),
        "unknown type": _write_members(tmp_path / "v.tar", [(volume, b"")] + _samples(), tarfile.USTAR_FORMAT),
    }
    for case, path in tars.items():
        assert _read_members(shard_index._header_members, path)[1] == "handed to tarfile", case
        index = _header_index(path)
        assert index == _tarfile_index(path, monkeypatch), case
        assert index.problem is None and len(index.members) == 3, case


def _broken_tars(root: Path) -> dict[str, tuple[Path, bool]]:
    """``{case: (path, read by the header reader itself)}``: tars cut or damaged in every way the stream survives."""
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
        "cut inside member data": (put("data.tar", whole[: png.offset_data + 10]), True),
        "cut inside the padding after the data": (put("pad.tar", whole[: png.offset_data + png.size]), True),
        "cut between members": (put("between.tar", whole[: png.offset]), True),
        "cut inside a header": (put("header.tar", whole[: png.offset + 100]), True),
        "end-of-archive blocks only": (put("end.tar", bytes(10240)), True),
        "cut inside the first header": (put("first.tar", whole[:300]), False),
        "garbage": (put("garbage.tar", np.random.default_rng(0).bytes(4096)), False),
        "garbage header mid-way (bad checksum)": (
            put("badsum.tar", whole[: png.offset] + b"\x01" * 512 + whole[png.offset + 512 :]),
            False,
        ),
        "non-octal mode, valid checksum": (
            put("mode.tar", whole[: png.offset] + header + whole[png.offset + 512 :]),
            False,
        ),
        "missing": (root / "missing.tar", False),
    }


def test_header_scan_on_broken_shards(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Cut, empty or damaged shards: the same index (members, problem and its detail) as tarfile alone gives."""
    problems = set()
    for case, (path, by_header_reader) in _broken_tars(tmp_path).items():
        index = _header_index(path)
        assert index == _tarfile_index(path, monkeypatch), case
        problems.add(index.problem)
        if not path.exists():
            continue  # the index says so before any reader opens it
        ending = _read_members(shard_index._header_members, path)
        assert (ending[1] != "handed to tarfile") == by_header_reader, case
        if by_header_reader:
            assert ending == _read_members(shard_index._tarfile_members, path), case
    assert problems == {None, "truncated_shard", "empty_shard", "missing_shard"}


@pytest.mark.parametrize(
    "field",
    [b"0000644\0", b"000644 \0", b"\0" * 8, b" " * 8, b"  644   ", b"0o17\0\0\0\0", b"+17\0\0\0\0\0", b"1_7\0\0\0\0\0",
     b"\x80" + bytes(6) + b"\x01", b"\xff" * 8, b"0x644\0\0\0", b"6 44\0\0\0\0", b"\x1c644\0\0\0\0", b"\xa0644\0\0\0\0",
     b"64\xa0\0\0\0\0\0", b"00000001234\0", b"12345670123\x00"],
)  # fmt: skip
def test_tar_number_reads_like_tarfile(field: bytes) -> None:
    """A number field reads as tarfile.nti reads it, or goes to tarfile (the one field bytes.strip reads otherwise)."""
    try:
        want = tarfile.nti(field)
    except tarfile.HeaderError:
        want = None
    try:
        got = shard_index._tar_number(field)
    except shard_index._NotPlainTar:
        got = None
    assert got == want or field == b"\x1c644\0\0\0\0"  # tarfile's str.strip takes \x1c as whitespace: 0o644
    if field == b"\x1c644\0\0\0\0":
        assert want == 0o644 and got is None
