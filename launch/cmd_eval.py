"""``pretrain eval CHECKPOINT|FILE|RUN_DIR --data DIR [--split val] [--batch-size B] [--nproc N] [--ema] [--out JSON]``.

Scores a model on one split of a data set built by ``pretrain data build``: top-1, top-5 and the mean cross-entropy
over every sample of the split, exactly once each whatever the number of ranks (the trainer's own eval code,
:mod:`pretrain.evaluate`). The model is an export (``pretrain export``), a checkpoint, or a run directory's newest
usable checkpoint (verified by sha256 and consolidated as an export would be; ``--ema`` takes a checkpoint's EMA
weights). Images get the run's eval transform and normalisation (the run's ``augment`` section, from the export's
metadata or the run's ``config.yaml``; the defaults, with a warning, when neither is known).

The result is printed, then written as JSON (``--out``; by default ``<run dir>/eval/<tag>-<split>[-ema].json`` for a
checkpoint inside its run directory, ``<FILE without .safetensors>.eval-<split>.json`` for an export, and next to any
other checkpoint). The destination is checked before the model is loaded (a directory, a read-only folder: exit 2);
should the write still fail, the numbers are on the screen already. ``--nproc N`` starts N local ranks (gloo); under
torchrun or Slurm the command joins the ranks it finds, like ``pretrain train``. Exit 0 on success, 1 when the model
file is unusable, a rank fails or the result cannot be saved, 2 on bad arguments (a path that is neither, a missing
split, a head that does not match the data set's classes, a destination that cannot be written).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path
from typing import Any

from data_pipeline.remote import is_remote
from pretrain.fsutil import unwritable_reason
from pretrain.rundir import CHECKPOINTS, COMPLETE_MARKER, EXIT_FAILED, EXIT_OK, EXIT_USAGE

__all__ = ["default_output", "eval_command", "register"]

_MAX_BATCH, _MAX_WORKERS, _MAX_NPROC = 2**20, 512, 1024

logger = logging.getLogger(__name__)


def register(subparsers: Any) -> None:
    """Add ``pretrain eval``."""
    p = subparsers.add_parser(
        "eval",
        help="top-1/top-5/loss of a checkpoint or export on a data set split",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("path", metavar="CHECKPOINT|FILE|RUN_DIR")
    p.add_argument(
        "--data", required=True, metavar="DIR", help="data set folder or s3:// / https:// prefix (holds manifest.json)"
    )
    p.add_argument("--split", default="val", help="split to score (default val)")
    p.add_argument("--batch-size", type=int, default=64, help="images per forward pass on each rank (default 64)")
    p.add_argument("--nproc", type=int, default=None, help="local ranks to start (default 1, or join the launcher's)")
    p.add_argument("--num-workers", type=int, default=1, help="data loader workers per rank (default 1)")
    p.add_argument("--ema", action="store_true", help="score a checkpoint's EMA weights")
    p.add_argument("--out", default=None, metavar="JSON", help="where to write the result (default: see above)")
    p.add_argument("--trust-checkpoint", action="store_true", help="score a checkpoint not signed by your key")
    p.set_defaults(func=eval_command)


def default_output(path: Path, tag_dir: Path | None, split: str, ema: bool) -> Path:
    """Where the result goes without ``--out`` (see the module docstring)."""
    if tag_dir is None:  # an export
        stem = path.name[: -len(".safetensors")] if path.name.endswith(".safetensors") else path.name
        return path.with_name(f"{stem}.eval-{split}.json")
    name = f"{tag_dir.name}-{split}{'-ema' if ema else ''}.json"
    if tag_dir.parent.name == CHECKPOINTS:
        return tag_dir.parent.parent / "eval" / name
    return tag_dir.parent / name


def _planned_output(args: argparse.Namespace) -> Path:
    """Where the result will go, known before the model is loaded (for a run directory, in its ``eval/`` folder)."""
    path = Path(args.path)
    if args.out:
        return Path(args.out)
    if path.is_file():
        return default_output(path, None, args.split, args.ema)
    if (path / COMPLETE_MARKER).exists() or path.parent.name == CHECKPOINTS:
        return default_output(path, path, args.split, args.ema)
    return default_output(path, path / CHECKPOINTS / "newest", args.split, args.ema)


def _check_args(args: argparse.Namespace) -> str:
    """The reason the arguments cannot work, or ''."""
    from data_pipeline.manifest import load_manifest, resolve_split

    path = Path(args.path)
    if not path.exists():
        return f"{path} does not exist"
    if not 1 <= args.batch_size <= _MAX_BATCH:
        return f"--batch-size {args.batch_size} must be in [1, {_MAX_BATCH}]"
    if args.nproc is not None and not 1 <= args.nproc <= _MAX_NPROC:
        return f"--nproc {args.nproc} must be in [1, {_MAX_NPROC}]"
    if not 0 <= args.num_workers <= _MAX_WORKERS:
        return f"--num-workers {args.num_workers} must be in [0, {_MAX_WORKERS}]"
    out = _planned_output(args)
    problem = unwritable_reason(out)
    if problem:
        return f"cannot write the result to {out}: {problem}; pass --out FILE.json in a writable folder"
    try:
        manifest = load_manifest(args.data)
    except (OSError, ValueError) as e:
        return f"--data {args.data}: {e}"
    try:
        resolve_split(manifest, args.split)  # val and validation find each other
    except ValueError:
        return f"--data {args.data} has no split {args.split!r} (splits: {', '.join(sorted(manifest.splits))})"
    return ""


def eval_command(args: argparse.Namespace) -> int:
    from pretrain.distributed import detect_environment

    problem = _check_args(args)
    if problem:
        print(f"pretrain eval: {problem}", file=sys.stderr)
        return EXIT_USAGE
    env = detect_environment()
    if args.nproc and args.nproc > 1 and env.source == "single":
        return _launch_local(args)
    return _evaluate_here(args, env)


def _evaluate_here(args: argparse.Namespace, env: Any) -> int:
    """This rank's share: load the model, stream its part of the split, all-reduce the sums; rank 0 reports."""
    import torch

    from data_pipeline.augment import normalize
    from data_pipeline.config import AugmentConfig, ConfigError
    from data_pipeline.manifest import load_manifest
    from pretrain.checkpoint import UntrustedCheckpoint
    from pretrain.distributed import destroy_distributed, init_distributed
    from pretrain.evaluate import build_eval_loader, eval_metrics, evaluate_models
    from pretrain.export import ExportError, build_from_state, checkpoint_source

    t0 = time.perf_counter()
    dist = init_distributed(device="cpu", env=env, loader_workers=args.num_workers) if env.world_size > 1 else None
    rank, world = (dist.rank, dist.world_size) if dist else (0, 1)
    device = dist.device if dist else torch.device("cpu")
    path = Path(args.path)
    try:
        try:
            state, meta = checkpoint_source(path, ema=args.ema, trusted=args.trust_checkpoint)
            model = build_from_state(state, meta["model_config"], str(path)).eval()
        except UntrustedCheckpoint as e:
            if rank == 0:
                print(f"pretrain eval: {e}", file=sys.stderr)
            return EXIT_USAGE
        except ExportError as e:
            if rank == 0:
                print(f"pretrain eval: {e}", file=sys.stderr)
            return EXIT_FAILED
        model_cfg = meta["model_config"]
        classes = load_manifest(args.data).num_classes
        if model_cfg["num_classes"] != classes:
            print(
                f"pretrain eval: the model has {model_cfg['num_classes']} outputs but {args.data} has {classes} "
                "classes; score it on the data set it was trained or fine-tuned for",
                file=sys.stderr,
            )
            return EXIT_USAGE
        if not meta.get("augment") and rank == 0:
            logger.warning("the run's augment section is unknown: evaluating with the default eval transform")
        try:
            augment = AugmentConfig(**(meta.get("augment") or {}))
        except (TypeError, ConfigError) as e:
            print(f"pretrain eval: the run's augment section is unusable ({e})", file=sys.stderr)
            return EXIT_FAILED
        loader = build_eval_loader(
            args.data, args.split, augment, model_cfg["img_size"], args.batch_size, rank, world, args.num_workers
        )
        try:
            sums = evaluate_models(
                [model.to(device)], loader, lambda x: normalize(x, augment.mean, augment.std), device, world
            )
        finally:
            loader.close()
        metrics = eval_metrics(sums)
        if rank == 0:
            return _report(args, path, meta, metrics, world, time.perf_counter() - t0)
        return EXIT_OK
    finally:
        if dist is not None:
            destroy_distributed()


def _report(
    args: argparse.Namespace, path: Path, meta: dict[str, Any], metrics: dict[str, Any], world: int, seconds: float
) -> int:
    """Print the numbers, then save them: a destination that fails now loses nothing but the file."""
    from pretrain.rundir import write_atomic

    model_cfg = meta["model_config"]
    tag_dir = None if path.is_file() else Path(meta["source"])  # the checkpoint a run dir resolved to
    out = Path(args.out) if args.out else default_output(path, tag_dir, args.split, args.ema)
    result = {
        "top1": metrics["val_top1"],
        "top5": metrics["val_top5"],
        "loss": metrics["val_loss"],
        "samples": metrics["val_samples"],
        "split": args.split,
        "data": args.data if is_remote(args.data) else str(Path(args.data).resolve()),
        "model": model_cfg["name"],
        "source": meta.get("source", str(path.resolve())),
        "step": int(meta["step"]) if str(meta.get("step", "")).isdigit() else None,
        "ema": args.ema or meta.get("ema") == "true",
        "world_size": world,
        "eval_time_s": seconds,
        "time": time.time(),
    }
    print(
        f"pretrain eval: {model_cfg['name']} step {result['step']} on {args.split} ({result['samples']} "
        f"samples): top1 {result['top1']:.4f} top5 {result['top5']:.4f} loss {result['loss']:.4f}"
    )
    sys.stdout.flush()
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        write_atomic(out, json.dumps(result, indent=1) + "\n")
    except OSError as e:
        print(
            f"pretrain eval: could not save the result to {out} ({e.strerror or e}); the numbers above are the "
            "result: pass --out FILE.json somewhere writable to keep them as a file",
            file=sys.stderr,
        )
        return EXIT_FAILED
    print(f"  result: {out}")
    return EXIT_OK


def _launch_local(args: argparse.Namespace) -> int:
    """Start ``--nproc`` ranks of this command on a free port; if one fails, stop the others and exit 1 naming it."""
    from launch.local_ranks import start_local_ranks, watch_ranks

    argv = [sys.executable, "-m", "launch.cli", "eval", args.path, "--data", args.data, "--split", args.split]
    argv += ["--batch-size", str(args.batch_size), "--num-workers", str(args.num_workers)]
    argv += (["--ema"] if args.ema else []) + (["--out", args.out] if args.out else [])
    argv += ["--trust-checkpoint"] if args.trust_checkpoint else []
    procs = start_local_ranks(argv, args.nproc)
    try:
        return watch_ranks(procs, "eval", ok=(EXIT_OK,))
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
