"""Loader throughput from remote shards: images/s and requests per sample from a local HTTP server and a local S3
server, against the same shards on local disk, at 1 and 2 DataLoader workers.

The data: ``--images`` ImageNet-like JPEGs (about 500x375, made by ``benchmarks/data_common.py``'s ``make_photos``
from scikit-learn's two bundled photographs) sharded by ``pretrain data build`` (``imagefolder:``, ``--shard-samples``
per shard, no val split). The servers run on this machine, each in its own process (``tests/remote_servers.py``):

- ``http``: a range-capable HTTP/1.1 server (Python's ``http.server`` with ``Range``), the data set indexed in place;
- ``s3``: moto's S3 server (a real HTTP S3 API), the data set uploaded to a bucket and read through
  ``AWS_ENDPOINT_URL``. moto reads the whole object for every range request (its per-range cost grows with the shard:
  measured 6.6 ms per 100 KB range of a 1 MB object, 57 ms of a 32 MB one), which S3, MinIO or nginx do not, so keep
  ``--shard-samples`` small for it;
- ``s3 + cache``: the same with ``data.cache_dir``: ``cold`` is the first epoch with an empty cache (shards fetched
  whole in the background while ranges are read), ``warm`` the next epoch (read from the cached copies).

Each cell is one epoch of ``data_pipeline.loader.build_loader`` with ``TrainTransform(224)`` (the ``augment`` defaults)
as ``pretrain train`` builds it (batch 64, shuffle buffer 1000, workers not persistent), images/s = samples yielded /
wall time from ``iter()`` to the last batch. The rows are alternated over ``--rounds`` rounds and the median is
reported, with its ratio to the local median. Requests per sample come from a separate epoch through a counting proxy
(``FaultProxy`` without faults) in front of each server: every request (range GETs, HEADs, stored-index GETs, whole
shard GETs of the cache) over the samples yielded. Target: remote >= 0.8x local at 2 workers.

Usage::

    python benchmarks/remote_data.py                      # 2,000 images, 3 rounds, appends to benchmarks/RESULTS.md
    python benchmarks/remote_data.py --images 300 --rounds 1 --no-append
"""

from __future__ import annotations

import argparse
import datetime
import importlib.util
import logging
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))  # the servers of the tests: tests/remote_servers.py

from remote_servers import FaultProxy, free_port, moto_s3, s3_env, upload_tree  # noqa: E402

RESULTS = ROOT / "benchmarks" / "RESULTS.md"
BATCH, BUFFER = 64, 1000
logger = logging.getLogger("remote_data")


def _make_photos(root: Path, n: int) -> None:
    """``benchmarks/data_common.py``'s photographs (imported by path: ``benchmarks/`` on sys.path would shadow
    names)."""
    spec = importlib.util.spec_from_file_location("_bench_data_common", ROOT / "benchmarks" / "data_common.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)  # type: ignore[union-attr]
    module.make_photos(root, n)


def epoch(location: str, workers: int, **kw: Any) -> tuple[float, int, float]:
    """``(images/s after the first batch, samples, seconds to the first batch)`` of one training epoch."""
    from data_pipeline.loader import build_loader
    from data_pipeline.transforms import TrainTransform

    loader = build_loader(
        location,
        "train",
        train=True,
        rank=0,
        world_size=1,
        batch_size=BATCH,
        num_workers=workers,
        seed=0,
        shuffle_buffer=BUFFER,
        transform=TrainTransform(224),
        persistent_workers=False,
        image_size=224,
        **kw,
    )
    with loader:
        t0 = time.perf_counter()
        first, n, after_first = 0.0, 0, 0
        for i, batch in enumerate(loader):
            n += int(batch["valid"].sum())
            if i == 0:
                first, t1 = time.perf_counter() - t0, time.perf_counter()
            else:
                after_first += int(batch["valid"].sum())
        steady = after_first / (time.perf_counter() - t1)
        bad = {k: v for k, v in loader.corrupt_counts().items() if k != "retried_requests"}
    if bad:
        raise RuntimeError(f"{location}: samples skipped {bad}")
    return steady, n, first


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of a process so far (``/proc/PID/stat``)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _wait_for_fills(cache: Path, timeout_s: float = 120.0) -> None:
    deadline = time.monotonic() + timeout_s
    while list(cache.glob("*.lock")) and time.monotonic() < deadline:
        time.sleep(0.05)


Rates = dict[tuple[str, int], list[tuple[float, float, float]]]  # (images/s, first batch s, server CPU ms/sample)


def measure(args: argparse.Namespace, work: Path) -> tuple[Rates, dict[str, float]]:
    """``(images/s, seconds to the first batch, server CPU ms per sample)`` per (row, workers) over the rounds, and
    requests per sample."""
    from data_pipeline.writer import build_shards
    from launch.cli import main as cli

    photos, data = work / "photos", work / "ds"
    _make_photos(photos, args.images)
    build_shards(f"imagefolder:{photos}", data, val_fraction=0.0, max_samples_per_shard=args.shard_samples,
                 workers=2, progress=False)  # fmt: skip
    served = work / "served"
    shutil.copytree(data, served, ignore=shutil.ignore_patterns("manifest.json", ".index"))
    port = free_port()
    http = subprocess.Popen([sys.executable, str(ROOT / "tests" / "remote_servers.py"), "http", str(served), str(port)])
    http_url = f"http://127.0.0.1:{port}"
    rates: Rates = {}
    requests: dict[str, float] = {}
    try:
        procs: list[subprocess.Popen] = []
        with moto_s3(procs=procs) as endpoint:
            os.environ.update(s3_env(endpoint))
            upload_tree(endpoint, served, "s3://bench/ds")
            http_index = work / "http-index"  # HTTP takes no writes: the index goes beside, as the README says
            assert cli(["data", "index", http_url, "--index-out", str(http_index), "--workers", "2"]) == 0
            assert cli(["data", "index", "s3://bench/ds", "--workers", "2"]) == 0
            cache = work / "cache"
            servers = {"local": None, "http": http.pid, "s3": procs[0].pid}

            def cell(row: str, location: str, workers: int, **kw: Any) -> None:
                pid = servers[row.split(" ")[0]]
                cpu0 = cpu_seconds(pid) if pid else 0.0
                rate, n, first = epoch(location, workers, **kw)
                server_ms = (cpu_seconds(pid) - cpu0) * 1e3 / n if pid else 0.0
                rates.setdefault((row, workers), []).append((rate, first, server_ms))

            for rnd in range(args.rounds):
                for workers in args.workers:
                    logger.info("round %d, %d workers", rnd + 1, workers)
                    cell("local", str(data), workers)
                    cell("http", str(http_index), workers)
                    cell("s3", "s3://bench/ds", workers)
                    shutil.rmtree(cache, ignore_errors=True)
                    cell("s3 + cache, cold", "s3://bench/ds", workers, cache_dir=str(cache))
                    _wait_for_fills(cache)
                    cell("s3 + cache, warm", "s3://bench/ds", workers, cache_dir=str(cache))
            requests = _requests_per_sample(http_url, http_index, endpoint, work)
    finally:
        http.terminate()
        http.wait()
    return rates, requests


def _requests_per_sample(http_url: str, http_index: Path, endpoint: str, work: Path) -> dict[str, float]:
    """Requests per sample yielded, for one epoch at 2 workers through a counting proxy in front of each server."""
    import json

    out: dict[str, float] = {}
    with FaultProxy(http_url) as proxy:
        moved = work / "http-index-proxy"
        shutil.copytree(http_index, moved)
        manifest = json.loads((moved / "manifest.json").read_text())
        manifest["shard_location"] = proxy.url
        (moved / "manifest.json").write_text(json.dumps(manifest))
        _, n, _ = epoch(str(moved), 2)
        out["http"] = proxy.counts["forward"] / n
    for row, kw in (("s3", {}), ("s3 + cache, cold", {"cache_dir": str(work / "cache-count")})):
        with FaultProxy(endpoint) as proxy:
            _, n, _ = epoch("s3://bench/ds", 2, storage_options={"endpoint_url": proxy.url}, **kw)
            if kw:
                _wait_for_fills(work / "cache-count")
            out[row] = proxy.counts["forward"] / n
            if kw:
                before = proxy.counts["forward"]
                _, n, _ = epoch("s3://bench/ds", 2, storage_options={"endpoint_url": proxy.url}, **kw)
                out["s3 + cache, warm"] = (proxy.counts["forward"] - before) / n
    out["local"] = 0.0
    return out


def table(args: argparse.Namespace, rates: Rates, requests: dict[str, float]) -> str:
    now = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    load = os.getloadavg()
    lines = [
        f"## Remote shards: loader images/s from HTTP and S3 against local disk ({now})",
        "",
        f"Machine: {platform.node()} ({os.cpu_count()} CPUs, shared; load average {load[0]:.1f} at the end), "
        f"Python {platform.python_version()}  ",
        f"Command: `{' '.join(['python benchmarks/remote_data.py', *sys.argv[1:]])}`",
        "",
        "| source | workers | images/s (median) | per round | x local | first batch (s) | server CPU ms / sample "
        "| requests / sample |",
        "|---|---:|---:|---|---:|---:|---:|---:|",
    ]
    for workers in args.workers:
        local = statistics.median(r for r, _, _ in rates[("local", workers)])
        for row in ("local", "http", "s3", "s3 + cache, cold", "s3 + cache, warm"):
            got = rates[(row, workers)]
            med = statistics.median(r for r, _, _ in got)
            first = statistics.median(f for _, f, _ in got)
            server = statistics.median(c for _, _, c in got)
            rounds = " ".join(f"{r:.0f}" for r, _, _ in got)
            lines.append(
                f"| {row} | {workers} | {med:.0f} | {rounds} | {med / local:.2f} | {first:.2f} | {server:.1f} | "
                f"{requests.get(row, 0.0):.2f} |"
            )
    lines += [
        "",
        f"- {args.images} JPEGs (~500x375) in shards of {args.shard_samples} samples; one epoch per cell of "
        f"`build_loader(..., TrainTransform(224))`, batch {BATCH}, shuffle buffer {BUFFER}; images/s from the first "
        "batch to the last (a worker's start-up, paid once per run with persistent workers, is the first-batch "
        f"column); rows alternated over {args.rounds} rounds; the servers (a range-capable `http.server`, moto's S3 "
        "server) in their own processes on the same CPUs as the loader. requests / sample: one more epoch at 2 "
        "workers through a counting proxy, every request over the samples yielded.",
    ]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--images", type=int, default=2000)
    p.add_argument("--shard-samples", type=int, default=100, help="samples per shard (default 100, ~11 MB)")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    p.add_argument("--no-append", action="store_true", help="print the table only")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    for name in ("data_pipeline", "botocore", "aiobotocore", "launch"):
        logging.getLogger(name).setLevel(logging.WARNING)
    work = Path(tempfile.mkdtemp(prefix="bench-remote-"))
    try:
        rates, requests = measure(args, work)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    text = table(args, rates, requests)
    sys.stdout.write(text)
    if not args.no_append:
        with RESULTS.open("a") as f:
            f.write("\n" + text)
        logger.info("appended to %s", RESULTS)
    return 0


if __name__ == "__main__":
    sys.exit(main())
