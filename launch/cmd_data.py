"""``pretrain data``: build WebDataset shards, index shards made elsewhere, inspect them, print the stream's plan.

- ``pretrain data build SOURCE --out DIR``: ``digits``, ``digit-pairs[:KEY=VALUE,...]`` or ``imagefolder:PATH`` ->
  ``DIR/{train,val}/shard-*.tar``
  and ``DIR/manifest.json``; a re-run finishes an interrupted build and keeps the shards already written.
- ``pretrain data index DIR [--split-glob SPLIT=SPEC ...] [--label cls|txt|json:FIELD] [--classes FILE]
  [--index-out LOCATION]``: for shards written by any WebDataset tool, ``DIR/manifest.json`` plus a stored index per
  shard (``DIR/.index/``); unreadable shards are named and left out, left-out samples counted per shard with the fix
  for each reason; exit 1 (nothing written) only when no usable sample is found.

Every DIR may be a local folder or a remote prefix (``s3://bucket/prefix``, ``https://host/path``), read through
fsspec with the standard credentials (AWS environment variables and files, ``AWS_ENDPOINT_URL``) and the options of
``--storage-options JSON``.
- ``pretrain data inspect DIR [--deep]``: checks every shard against the manifest; exit 1 naming each bad shard.
- ``pretrain data plan DIR --world-size W --workers K --batch-size B``: one JSON line per batch with the exact
  sample keys each rank gets, computed by the code the loader runs.

Exit codes: 0 success, 1 a failed build or a bad data set, 2 bad usage or a bad path (nothing was done).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from typing import Any

__all__ = ["register", "run_build", "run_index", "run_inspect", "run_plan"]

logger = logging.getLogger(__name__)

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2


def register(subparsers: argparse._SubParsersAction) -> None:
    """Adds ``data`` with its ``build``, ``index``, ``inspect`` and ``plan`` subcommands."""
    data = subparsers.add_parser(
        "data",
        help="build, index, inspect and plan WebDataset shards",
        description="Build WebDataset shards from an image source (or index shards written by any WebDataset tool), "
        "check them against their manifest, and print the exact per-rank sample plan of the training stream.",
    )
    sub = data.add_subparsers(dest="data_command", metavar="SUBCOMMAND")
    data.set_defaults(func=lambda args: _usage(data))
    _register_build(sub)
    _register_index(sub)
    _register_inspect(sub)
    _register_plan(sub)


def _register_build(sub: argparse._SubParsersAction) -> None:
    """``pretrain data build``."""
    b = sub.add_parser(
        "build",
        help="write shards and manifest.json from digits, digit pairs or an image folder",
        description="Write DIR/{train,val}/shard-NNNNNN.tar, a stored index per shard (DIR/.index/, the offsets the "
        "loader seeks to) and DIR/manifest.json. SOURCE is 'digits' (scikit-learn's "
        "1,797 handwritten digits as 32x32 RGB PNG), 'digit-pairs' (two of those digits far apart on a 64x64 canvas, "
        "labelled same/different class; options as 'digit-pairs:canvas=96,distractors=2,seed=1', keys canvas, scale, "
        "train_pairs, val_pairs, distractors, distractor_level, min_distance, seed) or 'imagefolder:PATH' (one folder "
        "per class; files stored as they are). Unreadable files are skipped and listed. Re-running finishes an "
        "interrupted build, and adds the stored indexes to a data set built before they existed.",
    )
    b.add_argument("source", metavar="SOURCE", help="'digits', 'digit-pairs[:KEY=VALUE,...]' or 'imagefolder:PATH'")
    b.add_argument("--out", required=True, metavar="DIR", help="output folder")
    b.add_argument("--shard-size-mb", type=float, default=256.0, metavar="N", help="target shard size in MiB")
    b.add_argument("--max-samples-per-shard", type=int, default=10000, metavar="N", help="most samples per shard")
    b.add_argument("--workers", type=int, default=None, metavar="N", help="worker processes (default: CPUs, <= 8)")
    b.add_argument("--val", default=None, metavar="PATH", help="imagefolder: a second tree with the same classes")
    b.add_argument(
        "--val-fraction",
        type=float,
        default=None,
        metavar="F",
        help="imagefolder: put this fraction of each class in val (seeded, stratified)",
    )
    b.add_argument("--no-progress", action="store_true", help="no progress bars")
    _add_storage_options(b)
    b.set_defaults(func=run_build)


def _register_index(sub: argparse._SubParsersAction) -> None:
    """``pretrain data index``."""
    x = sub.add_parser(
        "index",
        help="write manifest.json for shards written by any WebDataset tool",
        description="Index existing WebDataset shards (webdataset.ShardWriter/TarWriter, img2dataset, downloads): "
        "writes DIR/manifest.json and one stored index per shard under DIR/.index/ (keys, labels, member offsets), "
        "after which train, eval, plan and inspect use DIR like shards of `pretrain data build`. Keys follow "
        "WebDataset's rule (path up to the first dot of the file name). A sample's image is its first member of "
        "jpg, jpeg, png, webp, ...; samples without an image or a label are left out and counted per shard and "
        "reason, with the fix for each. Shards that cannot be read are named and left out; exit 1 (nothing written) "
        "only when no usable sample is found. A re-run reads only new or changed shards. DIR may be an s3:// or "
        "https:// prefix: the index goes beside the shards, or to --index-out where DIR takes no writes. Uncompressed "
        ".tar only (compressed shards are refused with the command that decompresses them).",
    )
    x.add_argument(
        "data_dir",
        metavar="DIR",
        help="folder or s3:// / https:// prefix holding the shards (default layout: DIR/<split>/*.tar)",
    )
    x.add_argument(
        "--split-glob",
        action="append",
        default=[],
        metavar="SPLIT=SPEC",
        help="shards of SPLIT, a glob or WebDataset brace list relative to DIR (repeat per split), e.g. "
        "train='train-*.tar' or train='train-{000000..000099}.tar'",
    )
    x.add_argument(
        "--label",
        default="cls",
        metavar="cls|txt|json:FIELD",
        help="where labels are: .cls (class index, default), .txt (class name), or a .json field (index or name)",
    )
    x.add_argument(
        "--classes",
        default=None,
        metavar="FILE",
        help="class names, one per line (default: DIR/classes.txt if there is one, else from the labels)",
    )
    x.add_argument("--workers", type=int, default=None, metavar="N", help="shards read in parallel (default 4)")
    x.add_argument(
        "--index-out",
        default=None,
        metavar="LOCATION",
        help="write manifest.json and .index/ here (a folder or s3:// prefix) instead of beside the shards: for "
        "read-only locations such as https://; then train with data.path=LOCATION",
    )
    _add_storage_options(x)
    x.set_defaults(func=run_index)


def _register_inspect(sub: argparse._SubParsersAction) -> None:
    """``pretrain data inspect``."""
    i = sub.add_parser(
        "inspect",
        help="check every shard against manifest.json",
        description="Summarise a data set and check that every shard exists with the size, sha256 and sample "
        "count of the manifest. Exit 1 naming every bad shard, 0 when clean.",
    )
    i.add_argument("data_dir", metavar="DIR", help="folder or s3:// / https:// prefix holding manifest.json")
    i.add_argument("--deep", action="store_true", help="also decode every image and parse every label")
    i.add_argument("--workers", type=int, default=None, metavar="N", help="shards checked in parallel (default 4)")
    _add_storage_options(i)
    i.set_defaults(func=run_inspect)


def _register_plan(sub: argparse._SubParsersAction) -> None:
    """``pretrain data plan``."""
    p = sub.add_parser(
        "plan",
        help="print the sample keys of every batch of every rank",
        description='Print one JSON line per batch, {"rank": r, "batch": b, "keys": [...]}, for every rank, '
        "as the training stream yields them (same code).",
    )
    p.add_argument("data_dir", metavar="DIR", help="folder or s3:// / https:// prefix holding manifest.json")
    p.add_argument("--world-size", type=int, required=True, metavar="W", help="number of ranks")
    p.add_argument(
        "--workers",
        type=int,
        required=True,
        metavar="K",
        help="DataLoader workers per rank (the keys do not depend on it: workers deliver whole batches in order)",
    )
    p.add_argument("--batch-size", type=int, required=True, metavar="B", help="micro-batch per rank")
    p.add_argument("--epoch", type=int, default=0, metavar="E", help="epoch (default 0)")
    p.add_argument("--seed", type=int, default=0, metavar="S", help="data.seed of the run (default 0)")
    p.add_argument("--skip-batches", type=int, default=0, metavar="N", help="start at batch N (resume point)")
    p.add_argument("--split", default="train", help="split (default train)")
    p.add_argument("--shuffle-buffer", type=int, default=1000, metavar="N", help="data.shuffle_buffer (default 1000)")
    _add_storage_options(p)
    p.set_defaults(func=run_plan)


def _add_storage_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--storage-options",
        default=None,
        metavar="JSON",
        help="fsspec options of a remote location, as in data.storage_options, e.g. '{\"anon\": true}' (credentials: "
        "the AWS environment variables and files)",
    )


def _storage_options(command: str, args: argparse.Namespace) -> dict[str, Any] | None:
    """``--storage-options`` as a mapping; prints the problem and returns None when it is not one."""
    import yaml

    if not args.storage_options:
        return {}
    try:
        value = yaml.safe_load(args.storage_options)  # JSON is YAML
    except yaml.YAMLError as e:
        value = e
    if not isinstance(value, dict):
        _error(
            command, f"--storage-options {args.storage_options!r}: expected a JSON object, e.g. '{{\"anon\": true}}'"
        )
        return None
    return value


def _usage(parser: argparse.ArgumentParser) -> int:
    parser.print_help(sys.stderr)
    return EXIT_USAGE


def _error(command: str, message: str) -> None:
    print(f"pretrain data {command}: {message}", file=sys.stderr)


# ---------------------------------------------------------------------------------------------------------- build


def run_build(args: argparse.Namespace) -> int:
    """``pretrain data build``."""
    from data_pipeline.remote import is_remote
    from data_pipeline.writer import build_shards

    if not 0 < args.shard_size_mb < 1 << 40 or args.max_samples_per_shard <= 0:  # NaN and inf fail the first
        _error("build", "--shard-size-mb and --max-samples-per-shard must be positive numbers (e.g. 256 and 10000)")
        return EXIT_USAGE
    if not is_remote(args.out) and os.path.exists(args.out) and not os.path.isdir(args.out):
        _error("build", f"--out {args.out} is a file, not a folder: name a folder (it is created if missing)")
        return EXIT_USAGE
    if args.workers is not None and args.workers < 1:
        _error("build", f"--workers={args.workers} must be >= 1")
        return EXIT_USAGE
    options = _storage_options("build", args)
    if options is None:
        return EXIT_USAGE
    try:
        manifest = build_shards(
            args.source,
            args.out,
            shard_size_mb=args.shard_size_mb,
            max_samples_per_shard=args.max_samples_per_shard,
            workers=args.workers,
            val=args.val,
            val_fraction=args.val_fraction,
            progress=not args.no_progress,
            storage_options=options,
        )
    except (ValueError, FileNotFoundError, PermissionError) as e:
        _error("build", str(e))
        return EXIT_USAGE
    except (OSError, RuntimeError) as e:
        _error("build", f"failed: {e}; re-run the same command to finish (finished shards are kept)")
        return EXIT_FAILED
    print(f"built {args.out} from {manifest.source} ({manifest.format}, {manifest.num_classes} classes)")
    for name, split in manifest.splits.items():
        print(f"  {name}: {split.num_samples} samples in {len(split.shards)} shards, {split.num_bytes} bytes")
    if manifest.skipped:
        print(f"skipped {len(manifest.skipped)} unreadable files (listed in manifest.json):")
        for s in manifest.skipped:
            print(f"  {s['path']}: {s['reason']}")
    return EXIT_OK


# ---------------------------------------------------------------------------------------------------------- index


def run_index(args: argparse.Namespace) -> int:
    """``pretrain data index``: 0 a manifest was written, 1 no usable sample (nothing written), 2 bad usage."""
    split_globs: dict[str, str] = {}
    for spec in args.split_glob:
        split, eq, pattern = spec.partition("=")
        if not eq or not split or not pattern or split in split_globs:
            _error("index", f"--split-glob {spec!r}: expected SPLIT=SPEC, once per split (e.g. train='train-*.tar')")
            return EXIT_USAGE
        if not split.replace("-", "").replace("_", "").replace(".", "").isalnum() or split.startswith("."):
            _error("index", f"--split-glob {spec!r}: the split name {split!r} must be a plain name (letters, digits, "
                   "'-', '_', '.'), e.g. train or val")  # fmt: skip
            return EXIT_USAGE
        split_globs[split] = pattern
    if args.workers is not None and args.workers < 1:
        _error("index", f"--workers={args.workers} must be >= 1")
        return EXIT_USAGE
    options = _storage_options("index", args)
    if options is None:
        return EXIT_USAGE
    from data_pipeline.indexer import index_dataset
    from data_pipeline.remote import Unreachable

    try:
        report = index_dataset(
            args.data_dir,
            split_globs=split_globs or None,
            label=args.label,
            classes_file=args.classes,
            workers=args.workers,
            index_out=args.index_out,
            storage_options=options,
        )
    except Unreachable as e:
        _error("index", f"{e}; check the location and the network, then run the same command again")
        return EXIT_FAILED
    except (FileNotFoundError, PermissionError, ValueError) as e:
        _error("index", str(e))
        return EXIT_USAGE
    except OSError as e:  # a write that failed (disk full, I/O error): the manifest is written last, so not written
        _error("index", f"failed: {e}; the manifest was not updated: fix that, then run the same command again")
        return EXIT_FAILED
    for name, reason in report.bad_shards:
        print(f"left out {name}: {reason}")
    _print_left_out_samples(report, args.label)
    manifest = report.manifest
    if manifest is None:
        left = sum(sum(c.values()) for c in report.skipped.values())
        _error(
            "index",
            f"no usable sample in {args.data_dir} ({len(report.bad_shards)} shards unreadable, {left} samples left "
            "out, see above); nothing written",
        )
        return EXIT_FAILED
    classes = f" (from {report.classes_from})" if report.classes_from else ""
    print(
        f"indexed {args.data_dir}: label {manifest.label}, {manifest.num_classes} classes{classes}, images "
        f"{', '.join(manifest.image_exts)}; {len(report.indexed)} shards read, {len(report.reused)} unchanged"
    )
    for name, split in manifest.splits.items():
        left_out = ", ".join(f"{r} {n}" for r, n in sorted(split.skipped_samples.items()))
        print(
            f"  {name}: {split.num_samples} samples in {len(split.shards)} shards, {split.num_bytes} bytes"
            + (f"; left out: {left_out}" if left_out else "")
        )
    if report.bad_shards:
        print(f"{len(report.bad_shards)} unreadable shards left out (listed in manifest.json under 'skipped')")
    indexes = len(report.written) - 1
    print(f"wrote {indexes} stored indexes and the manifest to {report.index_location}")
    if manifest.shard_location:
        print(
            f"the manifest names the shards' location {manifest.shard_location}: train with data.path={args.index_out}"
        )
    return EXIT_OK


_MAX_SHARD_LINES = 20  # shards listed one per line in `data index`'s report of left-out samples


def _print_left_out_samples(report: Any, label: str) -> None:
    """Per shard, the samples `index` left out and why; the shards that gave none; then the fix for each reason."""
    from data_pipeline.indexer import FIXES

    if report.skipped:
        print("samples left out, per shard:")
        for i, (name, counts) in enumerate(report.skipped.items()):
            if i == _MAX_SHARD_LINES:
                print(f"  ... and {len(report.skipped) - i} more shards")
                break
            empty = " (no usable sample)" if name in report.empty_shards else ""
            print(f"  {name}: {', '.join(f'{r} {n}' for r, n in sorted(counts.items()))}{empty}")
    if report.empty_shards:
        listed = ", ".join(report.empty_shards[:_MAX_SHARD_LINES])
        more = (
            f" and {len(report.empty_shards) - _MAX_SHARD_LINES} more"
            if len(report.empty_shards) > _MAX_SHARD_LINES
            else ""
        )
        print(f"{len(report.empty_shards)} shards gave no usable sample: {listed}{more}")
    reasons = sorted({r for counts in report.skipped.values() for r in counts})
    for reason in reasons:
        fix = FIXES.get(reason, "").format(rule=label)
        example = report.examples.get(reason)
        print(f"{reason}: {fix}" + (f" (e.g. {example})" if example else ""))


# -------------------------------------------------------------------------------------------------------- inspect


def run_inspect(args: argparse.Namespace) -> int:
    """``pretrain data inspect``: 0 clean, 1 bad shards (or invalid manifest), 2 no data set at that path."""
    from data_pipeline.verify import inspect_dataset

    options = _storage_options("inspect", args)
    if options is None:
        return EXIT_USAGE
    try:
        report = inspect_dataset(args.data_dir, deep=args.deep, workers=args.workers, storage_options=options)
    except (FileNotFoundError, PermissionError) as e:
        _error("inspect", str(e))
        return EXIT_USAGE
    except (OSError, ValueError) as e:
        _error("inspect", str(e))
        return EXIT_FAILED
    print(report.summary_table())
    print()
    if report.ok:
        found = ", ".join(f"{k} {v}" for k, v in report.samples_found.items())
        print(f"OK: {report.shards_checked} shards match the manifest ({found} samples){' (deep)' * args.deep}")
        if report.extra_files:
            print(report.problems())
        return EXIT_OK
    print(report.problems())
    print(
        f"{len(report.bad_shards)} of {report.shards_checked} shards are bad; rebuild them with `pretrain data build`"
        + (
            " (shards made elsewhere: replace them, then re-run `pretrain data index`)"
            if report.manifest.indexed
            else ""
        )
    )
    return EXIT_FAILED


# ----------------------------------------------------------------------------------------------------------- plan


def run_plan(args: argparse.Namespace) -> int:
    """``pretrain data plan``: JSON lines ``{"rank", "batch", "keys"}``, batch-major, from ``--skip-batches`` on."""
    from data_pipeline.manifest import load_manifest, resolve_split

    checks = [
        (args.world_size >= 1, f"--world-size={args.world_size} must be >= 1"),
        (args.workers >= 0, f"--workers={args.workers} must be >= 0"),
        (args.batch_size >= 1, f"--batch-size={args.batch_size} must be >= 1"),
        (args.epoch >= 0, f"--epoch={args.epoch} must be >= 0"),
        (args.skip_batches >= 0, f"--skip-batches={args.skip_batches} must be >= 0"),
        (args.shuffle_buffer >= 1, f"--shuffle-buffer={args.shuffle_buffer} must be >= 1"),
    ]
    for ok, message in checks:
        if not ok:
            _error("plan", message)
            return EXIT_USAGE
    options = _storage_options("plan", args)
    if options is None:
        return EXIT_USAGE
    try:
        manifest = load_manifest(args.data_dir, options)
        split = resolve_split(manifest, args.split)
    except (OSError, ValueError) as e:
        _error("plan", str(e))
        return EXIT_USAGE
    samples, per_global_batch = manifest.splits[split].num_samples, args.world_size * args.batch_size
    if per_global_batch > samples:  # no rank would get a batch (and a huge world size would take ages to say so)
        why = f"more than the {samples} of split {split!r}: no rank gets a batch; lower them"
        _error("plan", f"--world-size {args.world_size} x --batch-size {args.batch_size} = {per_global_batch}, {why}")
        return EXIT_USAGE
    from data_pipeline.order import plan_batches  # the loader's own planning code

    plans: list[list[list[str]]] = []
    try:
        for rank in range(args.world_size):
            plans.append(
                plan_batches(
                    manifest,
                    split,
                    seed=args.seed,
                    epoch=args.epoch,
                    world_size=args.world_size,
                    rank=rank,
                    batch_size=args.batch_size,
                    shuffle_buffer=args.shuffle_buffer,
                )
            )
    except (OSError, ValueError) as e:
        _error("plan", str(e))
        return EXIT_USAGE
    n_batches = max((len(p) for p in plans), default=0)
    try:
        for batch in range(args.skip_batches, n_batches):
            for rank, plan in enumerate(plans):
                if batch < len(plan):
                    _emit({"rank": rank, "batch": batch, "keys": plan[batch]})
        sys.stdout.flush()
    except BrokenPipeError:  # `pretrain data plan ... | head`: stop quietly, and keep exit-time flushes quiet too
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    return EXIT_OK


def _emit(obj: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(obj) + "\n")
