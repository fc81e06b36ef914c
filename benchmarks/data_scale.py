"""The epoch order at scale: time and peak memory per process for rank r's batch b of an epoch (first and last batch),
on synthetic shard counts (no tar files) of 1.28M, 14.2M, 100M and 1B samples, each case in a fresh process, for a
whole-epoch shuffle (old, :func:`_whole_epoch_order`: every process sorts the whole epoch) and the loader's order
(new, ``EpochOrder``: a window around the batch), plus the shuffle quality of both on one whole small epoch. Target:
<= 50 MB and <= 0.5 s per process at 1B samples.

Usage (``benchmarks/data.py scale`` runs this file's :func:`scale_main`; ``python benchmarks/data_scale.py`` takes
the same arguments)::

    python benchmarks/data.py scale                   # appends to benchmarks/RESULTS.md
    python benchmarks/data.py scale --samples 1280000 --repeats 1 --no-append
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import logging
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

BENCH = Path(__file__).resolve().parent
if str(BENCH) not in sys.path:  # loaded by path from elsewhere: its sibling modules (appended: shadows nothing)
    sys.path.append(str(BENCH))

import numpy as np  # noqa: E402
from data_common import RESULTS, ROOT, _command, _report  # noqa: E402

__all__ = ["scale_main", "shuffle_quality"]

logger = logging.getLogger(__name__)

SCALE_SIZES = (1_280_000, 14_200_000, 100_000_000, 1_000_000_000)
TARGET_SCALE_MB, TARGET_SCALE_S = 50.0, 0.5
CALLS = {"order": "EpochOrder(...).batch", "stream": "ShardStream.batch_rows"}


def _vm_kb(field: str) -> int:
    """``VmHWM``/``VmRSS`` of this process from ``/proc/self/status``, in KiB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


def _whole_epoch_order(counts: np.ndarray, *, seed: int, epoch: int, shuffle_buffer: int) -> np.ndarray:
    """The epoch order with every key drawn and sorted at once (the "old" rows): the shard permutation ``EpochOrder``
    draws, then keys ``i + u_i * shuffle_buffer`` from one sequential numpy stream after it, one argsort."""
    rng = np.random.default_rng([0x0DE7, seed, epoch])
    perm = rng.permutation(len(counts))
    offsets = np.concatenate([[0], np.cumsum(counts)])
    total = int(offsets[-1])
    layout = np.concatenate([np.arange(offsets[s], offsets[s + 1], dtype=np.int64) for s in perm])
    keys = np.arange(total, dtype=np.float64) + rng.random(total) * shuffle_buffer
    return layout[np.argsort(keys, kind="stable")]


def _scale_child(spec: dict[str, Any]) -> dict[str, Any]:
    """One case in this (fresh) process: rank ``rank``'s batch ``batch`` of epoch 1, timed, with its peak memory.

    ``path="order"``: ``EpochOrder(counts).batch(...)`` (``name="old"``: the rows of :func:`_whole_epoch_order`)
    from an int64 array of per-shard counts; peak = growth of ``getrusage`` maxrss over the baseline taken after the
    imports, so the counts array (what a manifest's numbers cost) is included. ``path="stream"``:
    ``ShardStream.batch_rows`` of a stream over an in-memory synthetic manifest, the loader's own call; the manifest
    and the stream's shard list are built first, then the peak is reset (``/proc/self/clear_refs``) and peak = VmHWM
    growth over the RSS after the reset.
    """
    from data_pipeline.order import EpochOrder
    from data_pipeline.stream import ShardStream

    gc.collect()
    base_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    n, per_shard = spec["samples"], spec["shard_samples"]
    counts = np.full(n // per_shard, per_shard, dtype=np.int64)
    kw = dict(world_size=spec["world_size"], rank=spec["rank"], batch_size=spec["batch_size"])
    if spec["path"] == "order":
        t0 = time.perf_counter()
        if spec["name"] == "old":
            start = (spec["batch"] * spec["world_size"] + spec["rank"]) * spec["batch_size"]
            full = _whole_epoch_order(counts, seed=0, epoch=1, shuffle_buffer=spec["shuffle_buffer"])
            rows = full[start : start + spec["batch_size"]]
        else:
            order = EpochOrder(counts, seed=0, epoch=1, shuffle_buffer=spec["shuffle_buffer"])
            rows = order.batch(spec["batch"], **kw)
        seconds = time.perf_counter() - t0
        peak_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base_kb
    else:
        from data_pipeline.manifest import Manifest, ShardInfo, SplitInfo

        shards = [ShardInfo(f"train/shard-{i:07d}.tar", per_shard, 0, "") for i in range(len(counts))]
        manifest = Manifest("synthetic", "jpg", ["0"], {"train": SplitInfo(n, shards=shards)})
        stream = ShardStream(
            tempfile.gettempdir(), "train", train=True, seed=0, shuffle_buffer=spec["shuffle_buffer"],
            transform=lambda *a: None, image_size=8, manifest=manifest, **kw,
        )  # fmt: skip
        del shards, counts
        gc.collect()
        Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS
        rss_kb = _vm_kb("VmRSS")
        t0 = time.perf_counter()
        rows = stream.batch_rows(1, spec["batch"])
        seconds = time.perf_counter() - t0
        peak_kb = _vm_kb("VmHWM") - rss_kb
    assert len(rows) == spec["batch_size"] and rows.min() >= 0 and rows.max() < n
    return {"seconds": seconds, "peak_mb": peak_kb / 1024, "first": int(rows[0])}


def _run_scale_case(spec: dict[str, Any]) -> dict[str, Any]:
    """Runs :func:`_scale_child` in a fresh interpreter (this file as a script) and returns its result."""
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", json.dumps(spec)]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True, cwd=ROOT)
    return json.loads(out.stdout.strip().splitlines()[-1])


def shuffle_quality(samples: int, shard_samples: int, shuffle_buffer: int, batch_size: int, old: bool) -> dict:
    """Mixing of one whole epoch (seed 0, epoch 1) of ``EpochOrder``, or (``old``) of :func:`_whole_epoch_order`.

    - displacement: ``|output position - layout position|`` of every sample (layout: the permuted shards laid out
      whole), mean / median / 99th percentile / max, in samples;
    - same-shard neighbours: fraction of adjacent pairs inside a rank batch (``batch_size`` consecutive positions)
      that come from one shard;
    - shards per batch: distinct shards in a rank batch, mean.
    """
    from data_pipeline.order import EpochOrder

    n_shards = samples // shard_samples
    counts = np.full(n_shards, shard_samples)
    if old:
        out = _whole_epoch_order(counts, seed=0, epoch=1, shuffle_buffer=shuffle_buffer)
    else:
        out = EpochOrder(counts, seed=0, epoch=1, shuffle_buffer=shuffle_buffer).slice(0, samples)
    slot = np.empty(n_shards, dtype=np.int64)  # the layout slot of each shard; the same draw in both
    slot[np.random.default_rng([0x0DE7, 0, 1]).permutation(n_shards)] = np.arange(n_shards)
    layout = slot[out // shard_samples] * shard_samples + out % shard_samples
    moved = np.abs(np.arange(samples) - layout)
    shard = (out // shard_samples)[: samples // batch_size * batch_size].reshape(-1, batch_size)
    distinct = (np.diff(np.sort(shard, axis=1), axis=1) != 0).sum(axis=1) + 1
    return {
        "mean": float(moved.mean()),
        "p50": float(np.median(moved)),
        "p99": float(np.percentile(moved, 99)),
        "max": int(moved.max()),
        "same": float((shard[:, 1:] == shard[:, :-1]).mean()),
        "shards": float(distinct.mean()),
    }


def _scale_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="benchmarks/data.py scale",
        description="Time and peak memory per process of the epoch order for rank r's batch b, old vs new.",
    )
    p.add_argument("--samples", type=int, nargs="+", default=list(SCALE_SIZES), help="split sizes")
    p.add_argument("--shard-samples", type=int, default=1000, help="samples per synthetic shard (default 1000)")
    p.add_argument("--world-size", type=int, default=64)
    p.add_argument("--rank", type=int, default=37)
    p.add_argument("--batch-size", type=int, default=128, help="per rank (default 128, configs/data/imagenet.yaml)")
    p.add_argument("--shuffle-buffer", type=int, default=10_000, help="default 10000 (configs/data/imagenet.yaml)")
    p.add_argument("--skip-batches", type=int, nargs="+", default=[0, -1], help="batches to make; -1: the last")
    p.add_argument("--old-max", type=int, default=100_000_000, help="largest split the old algorithm runs on")
    p.add_argument("--repeats", type=int, default=2, help="fresh processes per case; best time, largest peak")
    p.add_argument("--quality-samples", type=int, default=1_280_000, help="split size of the shuffle-quality rows")
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    p.add_argument("--no-append", action="store_true", help=f"do not append to {RESULTS.relative_to(ROOT)}")
    return p


def _measure_scale(args: argparse.Namespace) -> list[dict[str, Any]]:
    """Every case (split size x batch x order), ``--repeats`` fresh processes each: best time, largest peak."""
    global_batch = args.world_size * args.batch_size
    measured, results = [], {}
    for n in args.samples:
        last = n // global_batch - 1
        for skip in args.skip_batches:
            batch = last if skip < 0 else skip
            cases = [("new", "order"), ("new", "stream")]
            if n <= args.old_max:
                cases.insert(0, ("old", "order"))
            for name, path in cases:
                spec = dict(
                    samples=n, shard_samples=args.shard_samples, world_size=args.world_size, rank=args.rank,
                    batch_size=args.batch_size, shuffle_buffer=args.shuffle_buffer, batch=batch, name=name,
                    path=path,
                )  # fmt: skip
                runs = [_run_scale_case(spec) for _ in range(args.repeats)]
                assert len({r["first"] for r in runs}) == 1
                seconds, peak = min(r["seconds"] for r in runs), max(r["peak_mb"] for r in runs)
                results[n, batch, name, path] = runs[0]["first"]
                logger.info("%13d samples, batch %6d, %s %-6s: %8.3f s %9.1f MB", n, batch, name, path, seconds, peak)
                measured.append(dict(samples=n, batch=batch, name=name, path=path, seconds=seconds, peak=peak))
    for n in args.samples:  # both paths of the new order hand out the same sample
        for skip in args.skip_batches:
            batch = n // global_batch - 1 if skip < 0 else skip
            assert results[n, batch, "new", "order"] == results[n, batch, "new", "stream"]
    return measured


def _scale_table(args: argparse.Namespace, measured: list[dict[str, Any]]) -> list[str]:
    """The table of time and peak memory per case, and the verdict against the targets at the largest split."""
    rows = [
        f"| {m['samples']:,} | {m['samples'] // args.shard_samples:,} | {m['batch']:,} | {m['name']} | "
        f"{'_whole_epoch_order' if m['name'] == 'old' else CALLS[m['path']]} | {m['seconds']:.3f} | {m['peak']:.1f} |"
        for m in measured
    ]
    largest = max(args.samples)
    verdict = "; ".join(
        f"{CALLS[m['path']]}, batch {m['batch']:,}: {m['seconds']:.3f} s, {m['peak']:.1f} MB"
        for m in measured
        if m["samples"] == largest and m["name"] == "new"
    )
    return [
        "| samples | shards | batch | order | call | time s | peak MB |",
        "|---:|---:|---:|---|---|---:|---:|",
        *rows,
        "",
        f"- target at {largest:,} samples: <= {TARGET_SCALE_MB:.0f} MB and <= {TARGET_SCALE_S} s per process; "
        f"new: {verdict}",
    ]


def _quality_table(args: argparse.Namespace, quality: dict[str, dict]) -> list[str]:
    return [
        f"Shuffle quality, one whole epoch of {args.quality_samples:,} samples in shards of "
        f"{args.shard_samples:,}, shuffle_buffer {args.shuffle_buffer:,}, rank batches of {args.batch_size} "
        "consecutive positions (both share the shard permutation; displacement = |output position - "
        "layout position|, in samples):",
        "",
        "| order | displacement mean | median | p99 | max | same-shard neighbours in a batch | shards per batch |",
        "|---|---:|---:|---:|---:|---:|---:|",
        *[
            f"| {name} | {q['mean']:.0f} | {q['p50']:.0f} | {q['p99']:.0f} | {q['max']} | {q['same']:.4f} | "
            f"{q['shards']:.2f} |"
            for name, q in quality.items()
        ],
    ]


def _scale_text(
    args: argparse.Namespace, cmd: str, measured: list[dict[str, Any]], quality: dict[str, dict], loads: tuple
) -> str:
    """The RESULTS.md section; ``loads``: the load averages before and after."""
    load_before, load_after = loads
    when = datetime.datetime.now().isoformat(timespec="minutes")
    global_batch = args.world_size * args.batch_size
    return "\n".join(
        [
            f"## Epoch order at scale: memory and time per process, {when}",
            "",
            f"- machine: {platform.platform()}, {os.cpu_count()} CPUs, numpy {np.__version__}; load average "
            f"before/after {load_before[0]:.1f}/{load_after[0]:.1f} (a shared machine)",
            f"- command: `{cmd}`",
            f"- case: rank {args.rank} of {args.world_size}, {args.batch_size} samples per rank batch (global batch "
            f"{global_batch:,}), shuffle_buffer {args.shuffle_buffer:,}, synthetic shards of {args.shard_samples:,} "
            f"samples (no tar files), epoch 1; each row is a fresh process, best time / largest peak of "
            f"{args.repeats}. old = a whole-epoch shuffle (_whole_epoch_order: the whole epoch sorted in every "
            "process), new = EpochOrder (counter-based keys, one window ranked). The old algorithm is not run above "
            f"{args.old_max:,} samples (it grows linearly: ~10x the 100M row).",
            "- peak: `EpochOrder` rows: getrusage maxrss growth over the baseline after the imports, including the "
            "int64 shard-count array; `ShardStream` rows: the loader's call on a stream over an in-memory synthetic "
            "manifest, VmHWM growth after the manifest and stream are built (peak reset with /proc/self/clear_refs)",
            "",
            *_scale_table(args, measured),
            "",
            *_quality_table(args, quality),
            "",
        ]
    )


def scale_main(argv: list[str]) -> int:
    args = _scale_parser().parse_args(argv)
    if args.child is not None:
        sys.stdout.write(json.dumps(_scale_child(json.loads(args.child))) + "\n")
        return 0
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    load_before = os.getloadavg()
    measured = _measure_scale(args)
    quality = {
        name: shuffle_quality(args.quality_samples, args.shard_samples, args.shuffle_buffer, args.batch_size, old)
        for name, old in (("old", True), ("new", False))
    }
    load_after = os.getloadavg()
    cmd = _command("python benchmarks/data.py scale", argv)
    _report(_scale_text(args, cmd, measured, quality, (load_before, load_after)), append=not args.no_append)
    return 0


if __name__ == "__main__":
    sys.exit(scale_main(sys.argv[1:]))
