"""Stored shard indexes vs tar scans: the ``train 224 (loader)`` epoch of ``benchmarks/data.py`` on the same shards
read through their stored indexes and, as a data set built before stored indexes (the same shard files, a manifest
naming no index), scanned with ``tarfile``; with ``--baseline-tree PATH`` (a checkout of an earlier commit, e.g.
``git worktree add /tmp/before COMMIT``) also with that code. Each epoch runs in a fresh process with the variant's
``data_pipeline`` imported, the variants alternated over ``--runs`` rounds; worker CPU per sample, medians. Then the CPU
time to open one shard of ``--open-shard-images`` samples each way. Target: the loader is not slower per sample with
stored indexes than before.

Also the shard-open cost rows of ``benchmarks/data.py``'s breakdown table (:func:`index_cost`).

Usage (``benchmarks/data.py index`` runs this file's :func:`index_main`; ``python benchmarks/data_index.py`` takes
the same arguments)::

    python benchmarks/data.py index --baseline-tree /tmp/before   # appends to benchmarks/RESULTS.md
    python benchmarks/data.py index --stages overhead open --runs 10 --data-dir /tmp/bench-index --no-append
"""

from __future__ import annotations

import argparse
import datetime
import json
import logging
import os
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
import torch  # noqa: E402
from data_common import (  # noqa: E402
    RESULTS,
    ROOT,
    _command,
    _machine,
    _report,
    make_photos,
    time_loader,
    worker_startup_cpu,
)

__all__ = ["index_cost", "index_main", "shard_open_ms"]

logger = logging.getLogger(__name__)

STAGES = ["epoch", "overhead", "open"]


def shard_open_ms(data_dir: Path, stored: bool, repeats: int = 5) -> list[float]:
    """CPU milliseconds (this process) to open each train shard of ``data_dir`` as a loader worker does: the members
    of every sample by key (``_ShardReader.index``), from the shard's stored index (``stored=True``, the default since
    ``pretrain data build`` writes one) or by a ``tarfile`` scan (``stored=False``, a data set without stored
    indexes). Best of ``repeats`` per shard, a fresh reader each time.

    Code from before stored indexes has no ``foreign`` argument and scans every shard (its own header reader).
    """
    import inspect as pyinspect

    from data_pipeline.manifest import load_manifest

    try:
        from data_pipeline.shard_reader import ShardReader as _ShardReader
    except ImportError:  # code from before the reader had a module of its own
        from data_pipeline.stream import _ShardReader

    manifest = load_manifest(data_dir)
    shards = [(s.name, s.samples) for s in manifest.splits["train"].shards]
    offsets = np.concatenate([[0], np.cumsum([n for _, n in shards])]).astype(np.int64)
    paths = [data_dir / s.index if stored and s.index else None for s in manifest.splits["train"].shards]
    args = [data_dir, "train", shards, offsets, paths]
    if "foreign" in pyinspect.signature(_ShardReader).parameters:
        args.append(False)
    out = []
    for shard, (_, n) in enumerate(shards):
        best = float("inf")
        for _ in range(repeats):
            reader = _ShardReader(*args)
            t0 = time.process_time()
            index = reader.index(shard)
            best = min(best, time.process_time() - t0)
        assert len(index.members) == n and index.problem is None, (shard, index.problem)
        out.append(best * 1e3)
    return out


def index_cost(data_dir: Path, repeats: int = 3) -> dict[str, float]:
    """CPU milliseconds per sample of opening a shard in a loader worker (once per shard it reads from), from the
    stored index and by the ``tarfile`` scan, over all train shards of ``data_dir`` (:func:`shard_open_ms`)."""
    samples = sum(s.samples for s in _train_shards(data_dir))
    return {
        "shard open: stored index (one stat + JSON), per sample in the shard": sum(
            shard_open_ms(data_dir, True, repeats)
        )
        / samples,
        "shard open: tarfile scan (no stored index), per sample": sum(shard_open_ms(data_dir, False, repeats))
        / samples,
    }


def _train_shards(data_dir: Path) -> list[Any]:
    from data_pipeline.manifest import load_manifest

    return load_manifest(data_dir).splits["train"].shards


def _build(photos: Path, out: Path, images: int, shard_images: int) -> Path:
    """Makes the photos if missing and builds (or finishes: stored indexes included) ``out`` with ``pretrain data
    build``; returns ``out``."""
    from data_pipeline.writer import build_shards

    if not photos.is_dir():
        make_photos(photos, images)
    build_shards(f"imagefolder:{photos}", out, max_samples_per_shard=shard_images, workers=2, progress=False)
    return out


def _without_index(data_dir: Path, out: Path) -> Path:
    """``out``: the shards of ``data_dir`` (symbolic links) with the manifest of a build made before stored indexes
    (no ``index`` per shard, no ``.index/``): the loader scans every shard with tarfile."""
    raw = json.loads((data_dir / "manifest.json").read_text())
    for split in raw["splits"].values():
        for shard in split["shards"]:
            shard.pop("index", None)
            link = out / shard["name"]
            link.parent.mkdir(parents=True, exist_ok=True)
            if not link.is_symlink():
                link.symlink_to((data_dir / shard["name"]).resolve())
    (out / "manifest.json").write_text(json.dumps(raw, indent=1))
    return out


class _NoDecode:
    """A transform that decodes nothing and leaves the batch row as it is: what remains of a loader epoch is the
    loader's own work (order, shard opening, member reads, labels, batches)."""

    def __init__(self, img_size: int):
        self.img_size = img_size

    def __call__(self, data: bytes, ext: str, rng: Any, out: torch.Tensor | None = None) -> torch.Tensor:
        return torch.zeros(3, self.img_size, self.img_size, dtype=torch.uint8) if out is None else out


def _index_child(spec: dict[str, Any]) -> dict[str, Any]:
    """One measurement in this fresh process, with the code of ``spec["tree"]`` (its ``data_pipeline``) imported:
    ``epoch``, one loader epoch (:func:`time_loader`, worker start-up subtracted), or ``open``, every shard opened
    (:func:`shard_open_ms`)."""
    sys.path.insert(0, spec["tree"])
    import data_pipeline

    assert Path(data_pipeline.__file__).resolve().is_relative_to(Path(spec["tree"]).resolve()), data_pipeline.__file__
    data_dir = Path(spec["data_dir"])
    if spec["what"] == "open":
        return {"ms": shard_open_ms(data_dir, spec["stored"], spec["repeats"])}
    if spec["what"] == "overhead":  # in this process, a fresh loader (shards opened again) per epoch: the best
        best = min(
            time_loader(data_dir, 0, spec["batch_size"], spec["img_size"], _NoDecode(spec["img_size"]))[1:]
            for _ in range(spec["repeats"])
        )
        return {"wall": float("nan"), "cpu": best[0], "samples": best[1]}
    workers = spec["workers"]
    startup = worker_startup_cpu(workers)
    wall, cpu, n = time_loader(data_dir, workers, spec["batch_size"], spec["img_size"])
    return {"wall": wall, "cpu": cpu - startup, "samples": n}


def _run_index_child(spec: dict[str, Any]) -> dict[str, Any]:
    """Runs :func:`_index_child` in a fresh interpreter (this file as a script, in ``spec["tree"]``)."""
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", json.dumps(spec)]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True, cwd=spec["tree"])
    return json.loads(out.stdout.strip().splitlines()[-1])


def _index_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="benchmarks/data.py index",
        description="Loader worker CPU per sample with stored shard indexes vs tarfile scans (and, with "
        "--baseline-tree, the code of an earlier commit), alternated; and the cost of opening one shard.",
    )
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    p.add_argument("--images", type=int, default=2000, help="JPEGs to make (default 2000)")
    p.add_argument("--shard-images", type=int, default=250, help="images per shard of the loader runs (default 250)")
    p.add_argument("--open-shard-images", type=int, default=1000, help="images per shard of the open cost (1000)")
    p.add_argument("--workers", type=int, nargs="+", default=[1, 2], help="worker counts (default 1 2)")
    p.add_argument("--runs", type=int, default=5, help="alternated rounds; medians reported (default 5)")
    p.add_argument(
        "--stages",
        nargs="+",
        default=list(STAGES),
        choices=STAGES,
        help="epoch: loader epochs with TrainTransform; overhead: the same without decoding (in one process, best of "
        "3 epochs per run); open: one shard opened (default: all)",
    )
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--img-size", type=int, default=224)
    p.add_argument("--baseline-tree", default=None, help="a checkout of earlier code (e.g. a git worktree), also run")
    p.add_argument("--data-dir", default=None, help="keep the photos and shards here (default: a temp folder)")
    p.add_argument("--no-append", action="store_true", help=f"do not append to {RESULTS.relative_to(ROOT)}")
    return p


def _index_variants(args: argparse.Namespace, root: Path) -> tuple[dict[str, tuple], dict[str, tuple], Path]:
    """Builds the shards under ``root``; returns the loader variants (name: (code tree, data folder)), the shard-open
    variants (name: (code tree, data folder, stored index)) and the data folder of the open cost."""
    here = str(ROOT)
    photos = root / "photos"
    loader_dir = _build(photos, root / "shards", args.images, args.shard_images)
    open_dir = _build(photos, root / f"shards-{args.open_shard_images}", args.images, args.open_shard_images)
    variants = {
        "stored index": (here, loader_dir),
        "tarfile scan (no stored index)": (here, _without_index(loader_dir, root / "shards-noindex")),
    }
    opens = {
        "stored index": (here, open_dir, True),
        "tarfile scan (no stored index)": (here, open_dir, False),
    }
    if args.baseline_tree:
        base = str(Path(args.baseline_tree).resolve())
        variants["before (its own scan)"] = (base, loader_dir)
        opens["before (its own scan)"] = (base, open_dir, False)
    return variants, opens, open_dir


def _run_rounds(
    args: argparse.Namespace, variants: dict[str, tuple], kinds: list[tuple[str, int]]
) -> dict[tuple[str, str, int], list[dict[str, Any]]]:
    """Every (kind, workers) of every variant, one fresh process each, the variants rotated over ``--runs`` rounds."""
    names = list(variants)
    results: dict[tuple[str, str, int], list[dict[str, Any]]] = {(k, v, w): [] for k, w in kinds for v in names}
    for r in range(args.runs):
        for name in names[r % len(names) :] + names[: r % len(names)]:  # rotated: no variant always first
            tree, data_dir = variants[name]
            for kind, w in kinds:
                spec = dict(tree=tree, data_dir=str(data_dir), what=kind, workers=w, repeats=3,
                            batch_size=args.batch_size, img_size=args.img_size)  # fmt: skip
                res = _run_index_child(spec)
                results[kind, name, w].append(res)
                logger.info("round %d %-8s %-32s %d worker(s): %.4f ms CPU per sample", r, kind, name, w,
                            res["cpu"] / res["samples"] * 1e3)  # fmt: skip
    return results


def _median(xs: list[float]) -> float:
    return float(np.median(xs))


def _epoch_table(
    args: argparse.Namespace, kinds: list[tuple[str, int]], names: list[str], results: dict[tuple, list]
) -> list[str]:
    """The table of worker CPU per sample, each variant against the first (stored index)."""
    rows = []
    for kind, w in kinds:
        ref = _median([x["cpu"] / x["samples"] for x in results[kind, names[0], w]]) * 1e3
        for name in names:
            runs = results[kind, name, w]
            per = sorted(x["cpu"] / x["samples"] * 1e3 for x in runs)
            rate = f"{_median([x['samples'] / x['wall'] for x in runs]):.0f}" if kind == "epoch" else "-"
            what = f"train {args.img_size} (loader)" if kind == "epoch" else "loader without decoding (in-process)"
            rows.append(
                f"| {what} | {name} | {w} | {_median(per):.4f} | {per[0]:.4f} | {per[-1]:.4f} | "
                f"{_median(per) / ref:.3f} | {rate} |"
            )
    return [
        "| stage | variant | workers | CPU ms / sample, median | min | max | median vs stored index | samples/s "
        "(wall, median) |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
        *rows,
    ]


def _open_table(open_ms: dict[str, list[float]], n_open: int, index_kb: float) -> list[str]:
    """The shard-open cost per variant (nothing without ``open`` in ``--stages``)."""
    if not open_ms:
        return []
    return [
        f"Opening one shard of {n_open} samples in a worker (CPU ms, one process; best of 5 per shard, "
        f"median over the {len(next(iter(open_ms.values())))} shards; the stored index is {index_kb:.0f} "
        "KiB of JSON):",
        "",
        "| how | ms per shard | ms per 1000 samples |",
        "|---|---:|---:|",
        *[f"| {name} | {_median(ms):.2f} | {_median(ms) / n_open * 1e3:.2f} |" for name, ms in open_ms.items()],
        "",
    ]


def _index_text(args: argparse.Namespace, cmd: str, tables: list[str], loads: tuple) -> str:
    """The RESULTS.md section; ``tables``: the epoch and open tables' lines; ``loads``: load averages before/after."""
    load_before, load_after = loads
    return "\n".join(
        [
            f"## Data loader: stored shard index vs tar scan, {datetime.datetime.now().isoformat(timespec='minutes')}",
            "",
            f"- machine: {_machine()}",
            f"- command: `{cmd}`",
            f"- data: {args.images} JPEG photos built by `pretrain data build` in shards of {args.shard_images}; "
            f"each run in a fresh process, variants alternated (rotated) over {args.runs} rounds; batch "
            f"{args.batch_size}; load average before/after {load_before[0]:.1f}/{load_after[0]:.1f} on "
            f"{os.cpu_count()} cores shared with other jobs",
            f"- train {args.img_size} (loader): one epoch of `build_loader` + `TrainTransform({args.img_size})` "
            "(`time_loader`, as in the throughput table), worker CPU from getrusage(RUSAGE_CHILDREN), idle worker "
            "start-up subtracted; loader without decoding: the same epoch with a transform that decodes nothing, in "
            "the main process (0 workers, process CPU time), best of 3 epochs each with a fresh loader",
            "",
            *tables,
        ]
    )


def index_main(argv: list[str]) -> int:
    args = _index_parser().parse_args(argv)
    if args.child is not None:
        print(json.dumps(_index_child(json.loads(args.child))))
        return 0
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    kinds = [(k, w) for k in ("epoch", "overhead") if k in args.stages for w in (args.workers if k == "epoch" else [0])]
    with tempfile.TemporaryDirectory(prefix="bench-index-") as tmp:
        root = Path(args.data_dir) if args.data_dir else Path(tmp)
        variants, opens, open_dir = _index_variants(args, root)
        load_before = os.getloadavg()
        results = _run_rounds(args, variants, kinds)
        open_ms = {}
        for name, (tree, data_dir, stored) in opens.items() if "open" in args.stages else ():
            spec = dict(tree=tree, data_dir=str(data_dir), what="open", stored=stored, repeats=5)
            open_ms[name] = _run_index_child(spec)["ms"]
        load_after = os.getloadavg()
        first = _train_shards(open_dir)[0]
        n_open, index_kb = first.samples, (open_dir / first.index).stat().st_size / 1024

    tables = [*_epoch_table(args, kinds, list(variants), results), "", *_open_table(open_ms, n_open, index_kb)]
    cmd = _command("python benchmarks/data.py index", argv)
    _report(_index_text(args, cmd, tables, (load_before, load_after)), append=not args.no_append)
    return 0


if __name__ == "__main__":
    sys.exit(index_main(sys.argv[1:]))
