"""``pretrain export RUN_DIR|CHECKPOINT --out FILE.safetensors [--ema] [--dtype fp32|bf16]``.

Writes the consolidated weights of a checkpoint (any ZeRO stage, any number of ranks; no GPU and none of the ranks
that wrote it) as safetensors, with the model's name, its ``model`` config, the step and the run's eval transform in
the file's metadata: ``pretrain.models.create_model(FILE)`` rebuilds the model with plain PyTorch. A run directory
means its newest usable checkpoint. The checkpoint is verified first (sha256 of every file); a bad one is refused,
naming why. Exit 0 on success, 1 when the checkpoint is bad or does not load, 2 when the path is neither.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

from pretrain.rundir import EXIT_FAILED, EXIT_OK, EXIT_USAGE

__all__ = ["export_command", "register"]


def register(subparsers: Any) -> None:
    """Add ``pretrain export``."""
    p = subparsers.add_parser(
        "export", help="write a checkpoint's consolidated weights (safetensors)", description=__doc__
    )
    p.add_argument("path", metavar="RUN_DIR|CHECKPOINT")
    p.add_argument("--out", required=True, metavar="FILE.safetensors", help="file to write (replaced atomically)")
    p.add_argument("--ema", action="store_true", help="export the EMA weights (runs with trainer.ema_decay > 0)")
    p.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32", help="dtype of the weights (default fp32)")
    p.set_defaults(func=export_command)


def export_command(args: argparse.Namespace) -> int:
    from pathlib import Path

    from pretrain.checkpoint import COMPLETE_MARKER
    from pretrain.export import ExportError, export_weights
    from pretrain.rundir import CHECKPOINTS

    path = Path(args.path)
    if not ((path / COMPLETE_MARKER).exists() or path.parent.name == CHECKPOINTS or (path / CHECKPOINTS).is_dir()):
        print(f"pretrain export: {path} is neither a run directory nor a checkpoint", file=sys.stderr)
        return EXIT_USAGE
    try:
        meta = export_weights(path, args.out, ema=args.ema, dtype=args.dtype)
    except ExportError as e:
        print(f"pretrain export: {e}", file=sys.stderr)
        return EXIT_FAILED
    which = "EMA weights" if args.ema else "weights"
    print(f"pretrain export: {meta['model_name']} {which} of step {meta['step']} ({args.dtype}) -> {args.out}")
    print(f"  from: {meta['source']}")
    return EXIT_OK
