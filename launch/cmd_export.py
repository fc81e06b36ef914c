"""``pretrain export RUN_DIR|CHECKPOINT --out FILE.safetensors [--ema] [--dtype fp32|bf16]``.

Writes the consolidated weights of a checkpoint (any ZeRO stage, any number of ranks; no GPU and none of the ranks
that wrote it) as safetensors, with the model's name, its ``model`` config, the step and the run's eval transform in
the file's metadata: ``pretrain.models.create_model(FILE)`` rebuilds the model with plain PyTorch. A run directory
means its newest usable checkpoint. The checkpoint is verified first (sha256 of every file); a bad one is refused,
naming why. A checkpoint not signed by your key (another user's) needs ``--trust-checkpoint``; its files are still
loaded as plain data. ``--out`` is checked before the work (a directory or a read-only folder is refused), and a
write that still fails (a full disk) leaves no partial file. Exit 0 on success, 1 when the checkpoint is bad or does
not load or the file cannot be written, 2 when the path is neither, ``--out`` cannot be written or the checkpoint is
not trusted.
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
    p.add_argument("--trust-checkpoint", action="store_true", help="export a checkpoint not signed by your key")
    p.set_defaults(func=export_command)


def export_command(args: argparse.Namespace) -> int:
    from pathlib import Path

    from pretrain.checkpoint import UntrustedCheckpoint
    from pretrain.export import ExportError, export_weights
    from pretrain.fsutil import unwritable_reason
    from pretrain.rundir import CHECKPOINTS, COMPLETE_MARKER

    path = Path(args.path)
    if not ((path / COMPLETE_MARKER).exists() or path.parent.name == CHECKPOINTS or (path / CHECKPOINTS).is_dir()):
        print(f"pretrain export: {path} is neither a run directory nor a checkpoint", file=sys.stderr)
        return EXIT_USAGE
    problem = unwritable_reason(args.out)
    if problem:
        print(f"pretrain export: cannot write {args.out}: {problem}; pass --out in a writable folder", file=sys.stderr)
        return EXIT_USAGE
    try:
        meta = export_weights(path, args.out, ema=args.ema, dtype=args.dtype, trusted=args.trust_checkpoint)
    except UntrustedCheckpoint as e:
        print(f"pretrain export: {e}", file=sys.stderr)
        return EXIT_USAGE
    except ExportError as e:
        print(f"pretrain export: {e}", file=sys.stderr)
        return EXIT_FAILED
    which = "EMA weights" if args.ema else "weights"
    print(f"pretrain export: {meta['model_name']} {which} of step {meta['step']} ({args.dtype}) -> {args.out}")
    print(f"  from: {meta['source']}")
    return EXIT_OK
