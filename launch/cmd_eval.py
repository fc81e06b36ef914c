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

from data_pipeline.config import ConfigError
from data_pipeline.remote import is_remote
from pretrain.plan import EvalPlan
from pretrain.rundir import EXIT_FAILED, EXIT_OK, EXIT_USAGE

__all__ = ["eval_command", "register"]

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


def eval_command(args: argparse.Namespace) -> int:
    from pretrain.checkpoint import UntrustedCheckpoint
    from pretrain.export import ExportError
    from pretrain.plan import plan_eval

    try:
        plan = plan_eval(
            args.path, args.data, args.split, args.batch_size, args.nproc, args.num_workers, args.ema, args.out,
            args.trust_checkpoint,
        )  # fmt: skip
    except (ConfigError, UntrustedCheckpoint, ExportError) as e:  # an unusable model file is exit 1, the rest 2
        if not rank_is_quiet():
            print(f"pretrain eval: {e}", file=sys.stderr)
        return EXIT_FAILED if isinstance(e, ExportError) else EXIT_USAGE
    if plan.spawn:
        return _launch_local(args)
    return _evaluate_here(args, plan)


def rank_is_quiet() -> bool:
    """A rank other than 0 of a launch: the errors every rank finds are printed once, by rank 0."""
    from pretrain.distributed import detect_environment

    try:
        return detect_environment().rank != 0
    except ValueError:
        return False


def _evaluate_here(args: argparse.Namespace, plan: EvalPlan) -> int:
    """This rank's share: load the model, stream its part of the split, all-reduce the sums; rank 0 reports."""
    import torch

    from data_pipeline.augment import normalize
    from data_pipeline.config import AugmentConfig
    from pretrain.distributed import destroy_distributed, detect_environment, init_distributed
    from pretrain.evaluate import build_eval_loader, eval_metrics, evaluate_models
    from pretrain.export import ExportError, build_from_state, source_weights

    t0 = time.perf_counter()
    world = plan.world_size
    dist = (
        init_distributed(device="cpu", env=detect_environment(), loader_workers=args.num_workers) if world > 1 else None
    )
    device = dist.device if dist else torch.device("cpu")
    meta = plan.meta
    try:
        try:
            model = build_from_state(source_weights(plan.weights, args.ema), meta["model_config"], args.path).eval()
        except ExportError as e:
            if plan.rank == 0:
                print(f"pretrain eval: {e}", file=sys.stderr)
            return EXIT_FAILED
        if not meta["augment"] and plan.rank == 0:
            logger.warning("the run's augment section is unknown: evaluating with the default eval transform")
        augment = AugmentConfig(**meta["augment"])  # checked by the plan
        loader = build_eval_loader(
            args.data, args.split, augment, meta["model_config"]["img_size"], args.batch_size, plan.rank, world,
            args.num_workers,
        )  # fmt: skip
        try:
            sums = evaluate_models(
                [model.to(device)], loader, lambda x: normalize(x, augment.mean, augment.std), device, world
            )
        finally:
            loader.close()
        if plan.rank == 0:
            return _report(args, plan, eval_metrics(sums), time.perf_counter() - t0)
        return EXIT_OK
    finally:
        if dist is not None:
            destroy_distributed()


def _report(args: argparse.Namespace, plan: EvalPlan, metrics: dict[str, Any], seconds: float) -> int:
    """Print the numbers, then save them: a destination that fails now loses nothing but the file."""
    from pretrain.rundir import write_atomic

    model_cfg, meta, out = plan.meta["model_config"], plan.meta, plan.out
    result = {
        "top1": metrics["val_top1"],
        "top5": metrics["val_top5"],
        "loss": metrics["val_loss"],
        "samples": metrics["val_samples"],
        "split": args.split,
        "data": args.data if is_remote(args.data) else str(Path(args.data).resolve()),
        "model": model_cfg["name"],
        "source": meta.get("source", str(Path(args.path).resolve())),
        "step": int(meta["step"]) if str(meta.get("step", "")).isdigit() else None,
        "ema": args.ema or meta.get("ema") == "true",
        "world_size": plan.world_size,
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
