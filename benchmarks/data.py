"""Data pipeline throughput on CPU: samples/s per DataLoader worker for raw tar reads, decoding, and the full
train transform, on JPEG shards of ImageNet-like photographs.

The data: ``--images`` JPEGs of about 500x375 (a quarter portrait 375x500, some 500x333), made from scikit-learn's two
bundled photographs (``china.jpg``, ``flower.jpg``) by random crops, resizes, flips and colour shifts, saved at
quality 85..95 in 10 class folders and sharded with ``pretrain data build`` (``imagefolder:``). Real photographs, so
the JPEG entropy decoding costs what it costs on ImageNet.

Stages, each over all shards through a ``torch.utils.data.DataLoader`` (shards dealt to workers round-robin, batches
of ``--batch-size``), with 1 and 2 workers:

- ``read``: tar members read (plain ``tarfile`` streaming), nothing decoded;
- ``decode``: ``data_pipeline.transforms.decode_rgb``, the full-size decode to RGB with the pipeline's decoder
  (simplejpeg when installed, else Pillow);
- ``decode (Pillow)``: the same with Pillow only, the usual baseline;
- ``train 224``: ``TrainTransform(224)``: RandomResizedCrop + flip, with a per-sample seeded generator, collated
  into uint8 (B, 3, 224, 224) batches as the trainer receives them. Only the crop box is decoded (the
  ``data_pipeline._jpeg_roi`` extension) where it is built;
- ``train 224 (full decode)``: the same with the extension switched off: the whole image decoded, then cropped (the
  pipeline before ROI decoding, and where the extension is not built). The same crops, bit for bit.

These stages share one harness (``_Shards``: streaming tar reads, DataLoader's default collate). The loader that
``pretrain train`` runs is measured too:

- ``train 224 (loader)``: one epoch of ``data_pipeline.loader.build_loader`` over the same shards with
  ``TrainTransform(224)`` (the ``augment`` defaults), as ``pretrain train`` builds it: the seeded shuffle, seeks into
  the shards, whole batches made in the workers (``DataLoader(batch_size=None)``). An epoch drops the last partial
  batch (1,984 of 2,000 samples at batch 64); rates count the samples it yields. Its workers' CPU time is taken from
  ``getrusage(RUSAGE_CHILDREN)``: the workers are not persistent, so the DataLoader joins them at the end of the epoch
  and the kernel adds each one's whole CPU time (user + system) to the children's usage, with no hook in the library
  code. The start-up and shut-down of idle workers (an empty DataLoader's, measured the same way) is subtracted, as
  the ``_Shards`` stages count from the start of their ``__iter__`` only.

The breakdown table under the stages adds the parts of a train sample's CPU time, and the cost of opening a shard
in a worker (once per shard it reads from): from the shard's stored index, as ``pretrain data build`` writes it, and
by the ``tarfile`` scan that a data set without stored indexes gets.

Each stage runs ``--repeats`` times and reports the best pass (the machine is shared: the best pass is the one least
disturbed by other jobs; load averages are printed). Targets: ``train 224`` >= 75% of the ``decode`` rate per worker,
and 2 workers >= 1.7x one worker.

Usage::

    python benchmarks/data.py                         # 2,000 images, appends to benchmarks/RESULTS.md
    python benchmarks/data.py --images 500 --repeats 1 --no-append
    python benchmarks/data.py scale                   # the epoch order at 1.28M..1B samples, old vs new
    python benchmarks/data.py index --baseline-tree /tmp/before   # stored shard index vs tar scans, alternated

``scale`` and ``index`` live in ``benchmarks/data_scale.py`` and ``benchmarks/data_index.py`` (their docstrings say
what they measure); ``benchmarks/data_common.py`` holds what the three share (the photographs, the loader epoch, the
report).
"""

from __future__ import annotations

import argparse
import datetime
import logging
import multiprocessing
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

BENCH = Path(__file__).resolve().parent
if str(BENCH) not in sys.path:  # loaded by path from elsewhere: its sibling modules (appended: shadows nothing)
    sys.path.append(str(BENCH))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from data_common import (  # noqa: E402
    RESULTS,
    ROOT,
    _command,
    _iter_tar,
    _machine,
    _report,
    make_photos,
    time_loader,
    worker_startup_cpu,
)
from data_index import index_cost, index_main  # noqa: E402
from data_scale import scale_main, shuffle_quality  # noqa: E402
from torch.utils.data import DataLoader, IterableDataset, get_worker_info  # noqa: E402

__all__ = ["main", "make_photos", "scale_main", "shuffle_quality", "time_stage"]

logger = logging.getLogger(__name__)

TARGET_VS_DECODE = 0.75
TARGET_SCALING = 1.7


class _Shards(IterableDataset):
    """Image members of the shards (split round-robin over workers), mapped by one stage function; each worker
    stores the CPU seconds it spent in ``cpu_seconds[worker]``."""

    def __init__(self, shards: list[Path], stage: str, img_size: int, cpu_seconds: Any):
        self.shards, self.stage, self.img_size, self.cpu_seconds = shards, stage, img_size, cpu_seconds

    def __iter__(self):
        from data_pipeline import transforms

        info = get_worker_info()
        worker, n = (0, 1) if info is None else (info.id, info.num_workers)
        train = transforms.TrainTransform(self.img_size)
        if self.stage == "decode (Pillow)":
            transforms.simplejpeg = None  # this worker process only
        if self.stage.endswith("(full decode)"):
            transforms._jpeg_roi = None  # this worker process only
        cpu0 = time.process_time()
        index = 0
        try:
            for shard in self.shards[worker::n]:
                for _key, ext, data in _iter_tar(shard):
                    if ext in ("cls", "json"):
                        continue
                    index += 1
                    if self.stage == "read":
                        yield len(data)
                    elif self.stage.startswith("decode"):
                        yield transforms.decode_rgb(data, ext).shape[0]
                    else:
                        yield train(data, ext, np.random.default_rng([0, 0, index]))  # (3, S, S) uint8
        finally:
            self.cpu_seconds[worker] = time.process_time() - cpu0


def time_stage(
    shards: list[Path], stage: str, workers: int, batch_size: int, img_size: int
) -> tuple[float, float, int]:
    """One pass over ``shards``: wall seconds (worker start-up included), CPU seconds summed over the workers (what
    the pass cost, whatever else runs on the machine), samples yielded."""
    cpu_seconds = multiprocessing.Array("d", max(1, workers))
    loader = DataLoader(
        _Shards(shards, stage, img_size, cpu_seconds),
        batch_size=batch_size,
        num_workers=workers,
        multiprocessing_context="fork",  # workers inherit the shared CPU-time array
    )
    t0 = time.perf_counter()
    n = 0
    for batch in loader:
        n += len(batch)
    return time.perf_counter() - t0, sum(cpu_seconds[:]), n


def cost_breakdown(shards: list[Path], img_size: int, n: int = 200, repeats: int = 5) -> dict[str, float]:
    """CPU milliseconds per image, in this process (one thread), of the parts of ``TrainTransform``, and of the same
    transform decoding whole images (what the crop-box decode replaces)."""
    import torch.nn.functional as F

    from data_pipeline import transforms

    data = [d for _, ext, d in _iter_tar(shards[0]) if ext not in ("cls", "json")][:n]
    pixels = [transforms.decode_rgb(d) for d in data]
    train = transforms.TrainTransform(img_size)
    boxes = [  # the boxes TrainTransform draws below
        transforms.random_resized_crop_box(
            p.shape[1], p.shape[0], train.scale, train.ratio, np.random.default_rng([0, 0, i])
        )
        for i, p in enumerate(pixels)
    ]

    def resize(i: int) -> torch.Tensor:
        x, y, w, h = boxes[i]
        crop = torch.from_numpy(pixels[i]).permute(2, 0, 1)[:, y : y + h, x : x + w].unsqueeze(0)
        crop = crop.contiguous(memory_format=torch.channels_last)
        return F.interpolate(crop, size=(img_size, img_size), mode=train.interpolation, antialias=True)[0].contiguous()

    def full_decode_train(i: int) -> torch.Tensor:
        roi, transforms._jpeg_roi = transforms._jpeg_roi, None
        try:
            return train(data[i], "jpg", np.random.default_rng([0, 0, i]))
        finally:
            transforms._jpeg_roi = roi

    parts = {
        "decode (full size)": lambda i: transforms.decode_rgb(data[i]),
        "crop box + rng": lambda i: transforms.random_resized_crop_box(
            pixels[i].shape[1], pixels[i].shape[0], train.scale, train.ratio, np.random.default_rng([0, 0, i])
        ),
        "ROI decode (crop box only)": lambda i: transforms._Image(data[i]).decode_box(
            boxes[i], transforms._reduction(boxes[i], img_size)
        ),
        "crop copy + resize": resize,
        "TrainTransform (all)": lambda i: train(data[i], "jpg", np.random.default_rng([0, 0, i])),
        "TrainTransform, full decode": full_decode_train,
    }
    if transforms._jpeg_roi is None:  # not built: both rows would time the full decode
        for name in ("ROI decode (crop box only)", "TrainTransform, full decode"):
            del parts[name]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    out = {}
    for name, fn in parts.items():
        best = float("inf")
        for _ in range(repeats):
            t0 = time.process_time()
            for i in range(len(data)):
                fn(i)
            best = min(best, time.process_time() - t0)
        out[name] = best / len(data) * 1e3
    torch.set_num_threads(threads)
    return out


def handover_cost(img_size: int, batch_size: int, batches: int = 4, repeats: int = 5) -> dict[str, float]:
    """CPU milliseconds per image, in this process, of writing resized crops into a batch and readying the batch for
    the main process as a worker's pickling does (``Storage.share_memory_``, what ``reduce_storage`` calls): with the
    batch in ordinary memory it is copied into a new shared-memory segment; made in shared memory, nothing is copied."""
    from data_pipeline.stream import _new_batch_images

    crop = torch.zeros(1, 3, img_size, img_size, dtype=torch.uint8).contiguous(memory_format=torch.channels_last)
    src = crop[0].numpy()  # (3, S, S) in HWC memory, like interpolate's output

    def fill_and_hand_over(shared: bool) -> None:
        images = _new_batch_images(batch_size, img_size, shared)
        for row in images:
            np.copyto(row.numpy(), src)
        images.untyped_storage().share_memory_()  # a no-op for a storage already in shared memory

    out = {}
    for name, shared in (
        ("crops into a batch + hand-over: batch in ordinary memory, copied to shared", False),
        ("crops into a batch + hand-over: batch made in shared memory", True),
    ):
        best = float("inf")
        for _ in range(repeats):
            t0 = time.process_time()
            for _ in range(batches):
                fill_and_hand_over(shared)
            best = min(best, time.process_time() - t0)
        out[name] = best / (batches * batch_size) * 1e3
    return out


class _Run:
    """What one run of the throughput benchmark measured (rates: samples per wall / worker CPU second). A plain class:
    a dataclass needs its module in sys.modules, which a load by path (``spec_from_file_location``) does not give."""

    def __init__(
        self, stages: list[str], n_images: int, mean_kb: float, n_shards: int, loader_samples: int, startup_cpu: dict
    ):
        self.stages, self.n_images, self.mean_kb, self.n_shards = stages, n_images, mean_kb, n_shards
        self.loader_samples, self.startup_cpu = loader_samples, startup_cpu
        self.loads: tuple = ()  # load averages before and after
        self.rates: dict[tuple[str, int], float] = {}
        self.cpu_rates: dict[tuple[str, int], float] = {}
        self.breakdown: dict[str, float] = {}


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--images", type=int, default=2000, help="JPEGs to make (default 2000)")
    p.add_argument("--workers", type=int, nargs="+", default=[1, 2], help="worker counts (default 1 2)")
    p.add_argument("--repeats", type=int, default=3, help="passes per stage; the best is reported (default 3)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--img-size", type=int, default=224)
    p.add_argument("--shard-images", type=int, default=250, help="images per shard (default 250)")
    p.add_argument("--data-dir", default=None, help="keep the photos and shards here (default: a temp folder)")
    p.add_argument("--no-append", action="store_true", help=f"do not append to {RESULTS.relative_to(ROOT)}")
    return p


def _make_shards(args: argparse.Namespace, root: Path) -> Path:
    """Makes the photos and shards them under ``root`` (unless already built there); returns the shards folder."""
    from data_pipeline.writer import build_shards

    photos, shards_dir = root / "photos", root / "shards"
    if not (shards_dir / "manifest.json").exists():
        t0 = time.perf_counter()
        make_photos(photos, args.images)
        logger.info("made %d JPEGs in %.1f s", args.images, time.perf_counter() - t0)
        build_shards(
            f"imagefolder:{photos}", shards_dir, max_samples_per_shard=args.shard_images, workers=2, progress=False
        )
    return shards_dir


def _measure(args: argparse.Namespace, run: _Run, shards: list[Path], shards_dir: Path) -> None:
    """Every stage with every worker count, best of ``--repeats`` passes, into ``run.rates`` and ``run.cpu_rates``."""
    loader_stage = f"train {args.img_size} (loader)"
    for stage in run.stages:
        expected = run.loader_samples if stage == loader_stage else run.n_images
        for workers in args.workers:
            best_wall, best_cpu = float("inf"), float("inf")
            for _ in range(args.repeats):
                if stage == loader_stage:
                    wall, cpu, n = time_loader(shards_dir, workers, args.batch_size, args.img_size)
                    cpu -= run.startup_cpu[workers]
                else:
                    wall, cpu, n = time_stage(shards, stage, workers, args.batch_size, args.img_size)
                assert n == expected, f"{stage}: {n} samples, expected {expected}"
                best_wall, best_cpu = min(best_wall, wall), min(best_cpu, cpu)
            run.rates[stage, workers] = expected / best_wall
            run.cpu_rates[stage, workers] = expected / best_cpu
            logger.info(
                "%-16s %d workers: %6.0f samples/s wall, %6.0f samples per worker CPU-second",
                stage,
                workers,
                run.rates[stage, workers],
                run.cpu_rates[stage, workers],
            )


def _table_rows(args: argparse.Namespace, run: _Run) -> list[str]:
    one, rates, cpu_rates = min(args.workers), run.rates, run.cpu_rates
    rows = []
    for stage in run.stages:
        for workers in args.workers:
            rate, cpu_rate = rates[stage, workers], cpu_rates[stage, workers]
            vs_decode = rate / rates["decode", workers]
            cpu_vs_decode = cpu_rate / cpu_rates["decode", workers]
            scaling = f"{rate / rates[stage, one]:.2f}x" if workers != one else "-"
            rows.append(
                f"| {stage} | {workers} | {rate:.0f} | {rate / workers:.0f} | {cpu_rate:.0f} | {vs_decode:.2f} | "
                f"{cpu_vs_decode:.2f} | {scaling} |"
            )
    return rows


def _verdicts(args: argparse.Namespace, run: _Run, roi_built: bool) -> list[str]:
    """The targets met or missed, and the crop-box decode's gain where it is built."""
    one, rates, cpu_rates = min(args.workers), run.rates, run.cpu_rates
    full = f"train {args.img_size}"
    loader_stage = f"{full} (loader)"
    verdicts = []
    for stage in (full, loader_stage):
        for workers in args.workers:
            wall = rates[stage, workers] / rates["decode", workers]
            cpu = cpu_rates[stage, workers] / cpu_rates["decode", workers]
            pil = cpu_rates[stage, workers] / cpu_rates["decode (Pillow)", workers]
            verdicts.append(
                f"{stage}, {workers} worker(s): {wall:.2f} of decode-only per worker by wall clock, {cpu:.2f} by CPU "
                f"time ({'meets' if min(wall, cpu) >= TARGET_VS_DECODE else 'MISSES'} the {TARGET_VS_DECODE:.2f} "
                f"target); {pil:.2f} of a Pillow decode-only worker"
            )
    if roi_built:
        for workers in args.workers:
            x = cpu_rates[full, workers] / cpu_rates[f"{full} (full decode)", workers]
            verdicts.append(
                f"crop-box decode: {full}, {workers} worker(s), {x:.2f}x the samples per worker CPU-second of "
                f"{full} (full decode)"
            )
    for workers in args.workers:
        if workers != one:
            for stage in ("read", "decode", full, loader_stage):
                x = rates[stage, workers] / rates[stage, one]
                verdicts.append(
                    f"{stage}: {workers} workers = {x:.2f}x {one} by wall clock "
                    f"({'meets' if x >= TARGET_SCALING else 'MISSES'} the {TARGET_SCALING}x target)"
                )
    return verdicts


def _text(args: argparse.Namespace, cmd: str, run: _Run, verdicts: list[str]) -> str:
    """The RESULTS.md section."""
    load_before, load_after = run.loads
    startup = ", ".join(f"{run.startup_cpu[w] * 1e3:.0f} ms for {w} worker(s)" for w in args.workers)
    return "\n".join(
        [
            f"## Data pipeline throughput (CPU), {datetime.datetime.now().isoformat(timespec='minutes')}",
            "",
            f"- machine: {_machine()}",
            f"- command: `{cmd}`",
            f"- data: {run.n_images} JPEG photos (~500x375, {run.mean_kb:.0f} KiB mean) in {run.n_shards} shards; "
            f"batch {args.batch_size}; best of {args.repeats} passes per row; load average before/after "
            f"{load_before[0]:.1f}/{load_after[0]:.1f} on {os.cpu_count()} cores shared with other jobs",
            f"- train {args.img_size} (loader): {run.loader_samples} samples per epoch; worker start-up and "
            f"shut-down subtracted from its worker CPU: {startup}",
            "",
            "| stage | workers | samples/s | per worker | per worker CPU-s | vs decode (wall) | vs decode (CPU) "
            "| vs 1 worker |",
            "|---|---:|---:|---:|---:|---:|---:|---:|",
            *_table_rows(args, run),
            "",
            *[f"- {v}" for v in verdicts],
            "",
            "Where a train sample's CPU time goes (one process, one thread, best of 5 passes over 200 images):",
            "",
            "| part | CPU ms / image |",
            "|---|---:|",
            *[f"| {name} | {ms:.3f} |" for name, ms in run.breakdown.items()],
            "",
            "Wall-clock rates on this shared machine swing with the other jobs; the CPU-time columns (samples per "
            "second of worker CPU) are the stable measure of per-worker cost.",
            "",
        ]
    )


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["scale"]:
        return scale_main(argv[1:])
    if argv[:1] == ["index"]:
        return index_main(argv[1:])
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    from data_pipeline import transforms
    from data_pipeline.manifest import load_manifest

    with tempfile.TemporaryDirectory(prefix="bench-data-") as tmp:
        shards_dir = _make_shards(args, Path(args.data_dir) if args.data_dir else Path(tmp))
        split = load_manifest(shards_dir).splits["train"]
        shards = [shards_dir / s.name for s in split.shards]
        time_stage(shards, "read", 1, args.batch_size, args.img_size)  # warm the page cache
        load_before = os.getloadavg()
        train = f"train {args.img_size}"
        run = _Run(
            stages=["read", "decode", "decode (Pillow)", train, f"{train} (full decode)", f"{train} (loader)"],
            n_images=split.num_samples,
            mean_kb=split.num_bytes / split.num_samples / 1024,
            n_shards=len(shards),
            loader_samples=split.num_samples // args.batch_size * args.batch_size,  # an epoch drops a partial batch
            startup_cpu={w: worker_startup_cpu(w) if w > 0 else 0.0 for w in args.workers},
        )
        _measure(args, run, shards, shards_dir)
        run.breakdown = cost_breakdown(shards, args.img_size) | handover_cost(args.img_size, args.batch_size)
        run.breakdown |= index_cost(shards_dir)
        run.loads = (load_before, os.getloadavg())

    verdicts = _verdicts(args, run, roi_built=transforms._jpeg_roi is not None)
    cmd = _command("python benchmarks/data.py", argv or sys.argv[1:])
    _report(_text(args, cmd, run, verdicts), append=not args.no_append)
    return 0


if __name__ == "__main__":
    sys.exit(main())
