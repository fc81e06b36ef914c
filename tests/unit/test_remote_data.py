"""Shards in an S3-compatible store and behind HTTP: index, inspect, plan, build and the stream, against real servers.

The servers run on 127.0.0.1 and are started here (``tests/remote_servers.py``): moto's S3 server (a real HTTP S3
API, in a subprocess), a range-capable HTTP server, and a proxy that answers a share of requests with 503, drops
connections and delays others, or never answers for one shard. The S3 location is reached the standard way, through
``AWS_ENDPOINT_URL`` and the AWS credential variables. Every remote result is compared with the same shards read from
local disk: the same manifests, plans and batches, bit for bit.
"""

from __future__ import annotations

import io
import itertools
import json
import logging
import shutil
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import webdataset as wds
from data_fixtures import png_transform
from PIL import Image
from remote_servers import FaultProxy, RangeHTTPServer, moto_s3, s3_env, upload_tree

from data_pipeline.loader import RETRIED_REQUESTS, build_loader
from data_pipeline.manifest import load_manifest
from data_pipeline.order import plan_batches
from data_pipeline.remote import Store
from launch.cli import main

pytestmark = [
    pytest.mark.timeout(180),
    pytest.mark.filterwarnings("ignore:This DataLoader will create:UserWarning"),
]

SEED, BUFFER, BATCH = 5, 16, 6
CLASSES = ["tench", "goldfish", "shark"]
PER_SHARD = {"train": 14, "validation": 10}


def _jpeg(i: int) -> bytes:
    rng = np.random.default_rng(i)
    pixels = rng.integers(0, 256, (12, 12, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


@pytest.fixture(scope="module")
def shards(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """WebDataset shards as a Hugging Face export lays them out: ``train/`` (3 shards), ``validation/`` (1), labels as
    class names in ``.txt``, the class list in ``classes.txt`` beside them."""
    root = tmp_path_factory.mktemp("remote") / "wds"
    for split, n in (("train", 40), ("validation", 10)):
        (root / split).mkdir(parents=True)
        with wds.ShardWriter(str(root / split / "shard-%06d.tar"), maxcount=PER_SHARD[split], verbose=0) as sink:
            for i in range(n):
                j = i + 1000 * (split != "train")
                sink.write({"__key__": f"img{j:05d}", "jpg": _jpeg(j), "txt": CLASSES[j % 3]})
    (root / "classes.txt").write_text("\n".join(CLASSES) + "\n")
    return root


@pytest.fixture(scope="module")
def s3(shards: Path) -> str:
    """moto's S3 server holding the shards at ``s3://bkt/wds`` (not indexed); yields its endpoint."""
    with moto_s3() as endpoint:
        upload_tree(endpoint, shards, "s3://bkt/wds")
        yield endpoint


@pytest.fixture
def aws(s3: str, monkeypatch: pytest.MonkeyPatch) -> str:
    """The AWS environment of a user of that store (AWS_ENDPOINT_URL and credentials)."""
    for k, v in s3_env(s3).items():
        monkeypatch.setenv(k, v)
    return s3


@pytest.fixture(scope="module")
def local(shards: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The same shards indexed on local disk: the reference of every remote result."""
    root = tmp_path_factory.mktemp("local") / "wds"
    shutil.copytree(shards, root)
    assert main(["data", "index", str(root), "--label", "txt"]) == 0
    return root


def loader(location: str | Path, split: str = "train", **kw):
    args = dict(train=True, rank=0, world_size=1, batch_size=BATCH, num_workers=0, seed=SEED, shuffle_buffer=BUFFER)
    args.update(kw)
    return build_loader(location, split, transform=png_transform, timeout_s=120, **args)


def batches(location: str | Path, n: int, **kw) -> tuple[list[dict], dict[str, int]]:
    with loader(location, **kw) as it:
        got = list(itertools.islice(it.iter_batches(), n))
        return got, it.corrupt_counts()


def same(got: list[dict], want: list[dict]) -> bool:
    assert len(got) == len(want)
    return all(torch.equal(g[k], w[k]) for g, w in zip(got, want) for k in ("index", "valid", "label", "image"))


def run_cli(capsys: pytest.CaptureFixture, *argv: str) -> tuple[int, str]:
    code = main(list(argv))
    captured = capsys.readouterr()
    return code, captured.out + captured.err


# ------------------------------------------------------------------------------------------------------------- S3


def test_s3_indexed_in_place_then_inspected_planned_and_streamed_like_local(aws: str, local: Path, capsys) -> None:
    code, out = run_cli(capsys, "data", "index", "s3://bkt/wds", "--label", "txt")
    assert code == 0, out
    assert "classes (from s3://bkt/wds/classes.txt)" in out
    assert "wrote 4 stored indexes and the manifest to s3://bkt/wds" in out
    remote, ref = load_manifest("s3://bkt/wds"), load_manifest(local)
    for m in (remote, ref):  # the stored indexes record each store's mtimes, so their digests differ
        m.created = ""
        for sh in (sh for info in m.splits.values() for sh in info.shards):
            assert sh.index_sha256 is not None and len(sh.index_sha256) == 64
            sh.index_sha256 = None
    assert remote.to_dict() == ref.to_dict()  # same shards, sha256, classes
    assert remote.classes == CLASSES and remote.shard_location == ""
    store = Store("s3://bkt/wds")
    assert store.exists(".index/train/shard-000002.tar.json") and store.exists("manifest.json")

    code, out = run_cli(capsys, "data", "inspect", "s3://bkt/wds")
    assert code == 0 and "OK: 4 shards match the manifest (train 40, validation 10 samples)" in out, out
    code, out = run_cli(capsys, "data", "plan", "s3://bkt/wds", "--world-size", "2", "--workers", "2",
                        "--batch-size", "3", "--split", "val", "--seed", str(SEED))  # fmt: skip
    assert code == 0, out
    keys = [json.loads(line)["keys"] for line in out.splitlines() if line.startswith("{")]
    want = [plan_batches(local, "validation", seed=SEED, epoch=0, world_size=2, rank=r, batch_size=3,
                         shuffle_buffer=1000)[0] for r in (0, 1)]  # fmt: skip
    assert keys[:2] == want

    # Two epochs from the bucket with 2 workers, then a mid-epoch resume with 1: the local batches, bit for bit.
    reference, _ = batches(local, 12)
    with loader("s3://bkt/wds", num_workers=2) as first:
        head = list(itertools.islice(first.iter_batches(), 4))
        state = first.state_dict()
    with loader("s3://bkt/wds", num_workers=1) as resumed:
        resumed.load_state_dict(state)
        tail = list(itertools.islice(resumed.iter_batches(), 8))
        assert resumed.corrupt_counts() == {}
    assert same(head + tail, reference)
    # `val` finds the data set's `validation` split; eval gives every sample once, in write order
    with loader("s3://bkt/wds", "val", train=False, batch_size=4) as val:
        got = [int(i) for b in val for i, v in zip(b["index"], b["valid"]) if v]
    assert got == list(range(10))


def test_build_into_a_bucket_and_rerun_keeps_the_shards(aws: str, tmp_path: Path, capsys) -> None:
    images = tmp_path / "images"
    for i in range(9):
        (images / CLASSES[i % 3]).mkdir(parents=True, exist_ok=True)
        (images / CLASSES[i % 3] / f"{i}.jpg").write_bytes(_jpeg(i))
    build = ["data", "build", f"imagefolder:{images}", "--val-fraction", "0.3", "--max-samples-per-shard", "2",
             "--workers", "1", "--no-progress"]  # fmt: skip
    assert main([*build, "--out", str(tmp_path / "ours")]) == 0
    code, out = run_cli(capsys, *build, "--out", "s3://bkt/built")
    assert code == 0, out
    remote, ref = load_manifest("s3://bkt/built"), load_manifest(tmp_path / "ours")
    assert [(s.name, s.sha256) for s in remote.splits["train"].shards] == [
        (s.name, s.sha256) for s in ref.splits["train"].shards
    ]
    store = Store("s3://bkt/built")
    stamps = {s.name: store.fs.info(store.path(s.name))["LastModified"] for s in remote.splits["train"].shards}
    assert main([*build, "--out", "s3://bkt/built"]) == 0  # a re-run keeps every shard in the bucket
    assert {n: store.fs.info(store.path(n))["LastModified"] for n in stamps} == stamps
    want, _ = batches(tmp_path / "ours", 5, batch_size=2)
    got, counts = batches("s3://bkt/built", 5, batch_size=2, num_workers=2)
    assert same(got, want) and counts == {}


# ----------------------------------------------------------------------------------------------------------- HTTP


def test_http_needs_index_out_and_reads_brace_listed_shards_by_range(
    shards: Path, local: Path, tmp_path: Path, capsys
) -> None:
    with RangeHTTPServer(shards) as server:
        code, out = run_cli(capsys, "data", "index", server.url, "--label", "txt")
        assert code == 2 and "read-only" in out and "--index-out" in out, out
        index = tmp_path / "index"
        code, out = run_cli(capsys, "data", "index", server.url, "--label", "txt", "--index-out", str(index),
                            "--split-glob", "train=train/shard-{000000..000002}.tar",
                            "--split-glob", "validation=validation/shard-000000.tar")  # fmt: skip
        assert code == 0, out
        assert f"train with data.path={index}" in out
        manifest = load_manifest(index)
        assert manifest.shard_location == server.url
        assert [s.sha256 for s in manifest.splits["train"].shards] == [
            s.sha256 for s in load_manifest(local).splits["train"].shards
        ]
        assert not (shards / "manifest.json").exists()  # the served folder was not written
        gets = server.requests["GET"]
        code, out = run_cli(capsys, "data", "index", server.url, "--label", "txt", "--index-out", str(index),
                            "--split-glob", "train=train/shard-{000000..000002}.tar",
                            "--split-glob", "validation=validation/shard-000000.tar")  # fmt: skip
        assert code == 0 and "0 shards read, 4 unchanged" in out, out  # size and Last-Modified: no download
        assert server.requests["GET"] - gets == 2  # classes.txt (found, then read); no shard fetched again

        before = server.requests["GET"]
        want, _ = batches(local, 6)
        got, counts = batches(index, 6, num_workers=2)
        assert same(got, want) and counts == {}
        # one range per sample, plus one GET per stored index and process (the stored indexes are local here)
        assert server.requests["GET"] - before <= 6 * BATCH + 2 * 3 * 2

    # A server that ignores Range sends whole shards: refused by name, the samples counted as read errors.
    with RangeHTTPServer(shards, ranges=False) as plain:
        index2 = tmp_path / "index2"
        assert main(["data", "index", plain.url, "--label", "txt", "--index-out", str(index2)]) == 0  # it lists
        _, counts = batches(index2, 1, image_size=12)
        assert counts == {"read_error": BATCH}


# --------------------------------------------------------------------------------------------------------- faults


def test_faulty_store_gives_the_same_batches_with_the_retries_counted(aws: str, local: Path) -> None:
    assert main(["data", "index", "s3://bkt/wds", "--label", "txt"]) == 0
    want, _ = batches(local, 12)
    with FaultProxy(aws, fail_every=4, drop_every=9, delay_every=5, delay_s=0.05) as proxy:
        options = {"endpoint_url": proxy.url}
        with loader("s3://bkt/wds", num_workers=2, storage_options=options) as it:
            got = list(itertools.islice(it.iter_batches(), 12))
            counts, state = it.corrupt_counts(), it.state_dict()
    assert same(got, want)
    assert set(counts) == {RETRIED_REQUESTS} and counts[RETRIED_REQUESTS] > 0
    assert state["corrupt"] == counts  # checkpointed like the corrupt-sample counts
    assert proxy.counts["fail"] > 0 and proxy.counts["drop"] > 0 and proxy.counts["delay"] > 0


def test_unreachable_shard_is_skipped_named_and_counted(aws: str, local: Path, caplog) -> None:
    assert main(["data", "index", "s3://bkt/wds", "--label", "txt"]) == 0
    victim = "train/shard-000001.tar"
    want, _ = batches(local, 6)
    lost = [int(i) for b in want for i in b["index"] if PER_SHARD["train"] <= int(i) < 2 * PER_SHARD["train"]]
    assert lost, "the first epoch's batches hold samples of the victim shard"
    with FaultProxy(aws, unreachable=(f"/bkt/wds/{victim}",)) as proxy, caplog.at_level(logging.WARNING):
        t0 = time.monotonic()
        got, counts = batches("s3://bkt/wds", 6, storage_options={"endpoint_url": proxy.url}, remote_retries=1)
        took = time.monotonic() - t0
    assert counts == {"unreachable_shard": len(lost), RETRIED_REQUESTS: 1}  # one retry, then marked down
    assert proxy.counts["unreachable"] == 2  # our two tries: botocore and s3fs retry nothing behind our back
    assert took < 20, "the shard's other samples are skipped at once, not each after its own retries"
    assert f"shard {victim} is unreachable" in caplog.text and f"s3://bkt/wds/{victim}" in caplog.text
    for g, w in zip(got, want):
        keep = ~torch.isin(w["index"], torch.tensor(lost))
        assert torch.equal(g["valid"], keep) and torch.equal(g["image"][keep], w["image"][keep])


# ---------------------------------------------------------------------------------------------------------- cache


def test_cache_fetches_each_shard_once_then_reads_locally_within_its_bound(
    aws: str, local: Path, tmp_path: Path
) -> None:
    assert main(["data", "index", "s3://bkt/wds", "--label", "txt"]) == 0
    want, _ = batches(local, 12)  # two epochs
    cache = tmp_path / "cache"
    train = load_manifest(local).splits["train"].shards
    with FaultProxy(aws) as proxy:
        options = {"endpoint_url": proxy.url}
        with loader("s3://bkt/wds", storage_options=options, cache_dir=str(cache)) as it:
            got = list(itertools.islice(it.iter_batches(), 6))
            deadline = time.monotonic() + 30
            while len(list(cache.glob("*.tar"))) < len(train) and time.monotonic() < deadline:
                time.sleep(0.05)  # the background fills of the first epoch
            assert sorted(p.name for p in cache.glob("*.tar")) == sorted(f"{s.sha256}.tar" for s in train)
            ranged = proxy.counts["ranged"]
            got += list(itertools.islice(it.iter_batches(), 6))
            assert proxy.counts["ranged"] == ranged, "the second epoch reads the cached copies"
    assert same(got, want) and not list(cache.glob("*.lock")) and not list(cache.glob("*.tmp"))

    small = tmp_path / "small"
    bound = int(1.5 * max(s.bytes for s in train))
    with loader("s3://bkt/wds", cache_dir=str(small), cache_max_gb=bound / 1e9) as it:
        assert same(list(itertools.islice(it.iter_batches(), 6)), want[:6])
    deadline = time.monotonic() + 30
    while list(small.glob("*.lock")) and time.monotonic() < deadline:
        time.sleep(0.05)  # fills still running
    assert 1 <= len(list(small.glob("*.tar"))) and sum(p.stat().st_size for p in small.glob("*.tar")) <= bound


def test_storage_options_beat_the_environment(aws: str, monkeypatch, capsys) -> None:
    assert main(["data", "index", "s3://bkt/wds", "--label", "txt"]) == 0
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")  # nothing listens on the discard port
    code, out = run_cli(capsys, "data", "plan", "s3://bkt/wds", "--world-size", "1", "--workers", "0",
                        "--batch-size", "2", "--storage-options", json.dumps({"endpoint_url": aws}))  # fmt: skip
    assert code == 0, out  # --storage-options beat the environment
    code, out = run_cli(capsys, "data", "plan", "s3://bkt/wds", "--world-size", "1", "--workers", "0",
                        "--batch-size", "2", "--storage-options", "[1]")  # fmt: skip
    assert code == 2 and "expected a JSON object" in out


def test_a_changed_stored_index_in_the_bucket_is_caught(aws: str, capsys) -> None:
    """The digest check and the label comparison work on a store: a label changed in one stored index object makes
    the loader skip that shard's samples as bad_index, `inspect --deep` name the shard and the sample; re-indexing
    reads the shard again and restores the index."""
    assert main(["data", "index", "s3://bkt/wds", "--label", "txt"]) == 0
    store = Store("s3://bkt/wds")
    rel = ".index/train/shard-000001.tar.json"
    original = store.read_bytes(rel)
    entry = json.loads(original)
    key, label = entry["samples"][2][:2]
    changed = next(c for c in CLASSES if c != label)
    entry["samples"][2][1] = changed
    store.write_bytes(rel, json.dumps(entry).encode())
    with loader("s3://bkt/wds", train=False, batch_size=10) as it:
        assert sum(int(b["valid"].sum()) for b in it) == 40 - PER_SHARD["train"]
        assert it.corrupt_counts() == {"bad_index": PER_SHARD["train"]}
    code, out = run_cli(capsys, "data", "inspect", "s3://bkt/wds", "--deep")
    assert code == 1 and f"BAD train/shard-000001.tar: stored index {rel} changed after the manifest" in out, out
    assert f"e.g. {key} (stored '{changed}', in the shard '{label}')" in out
    assert main(["data", "index", "s3://bkt/wds", "--label", "txt"]) == 0
    assert store.read_bytes(rel) == original
    assert run_cli(capsys, "data", "inspect", "s3://bkt/wds")[0] == 0
