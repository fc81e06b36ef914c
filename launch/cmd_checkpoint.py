"""``pretrain checkpoint verify RUN_DIR|CHECKPOINT``: check checkpoints offline, the way a resume checks them.

Every file a checkpoint's COMPLETE marker lists must be present with the recorded size and sha256, and the marker
must carry your signature (an HMAC with your key, :mod:`pretrain.trust`: without it a resume, an export or an eval
refuses the checkpoint unless given ``--trust-checkpoint``). For a run directory, every checkpoint under
``checkpoints/`` is checked, and those an earlier resume set aside under ``checkpoints/rejected/`` are listed with the
reason recorded then. Nothing is changed, renamed or loaded (no pickle is read). Exit 0 when everything checked is
intact and signed by you, 1 naming every bad or unsigned checkpoint, 2 when the path is neither.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from pretrain.rundir import CHECKPOINTS, EXIT_FAILED, EXIT_OK, EXIT_USAGE

__all__ = ["register", "verify_command"]


def register(subparsers: Any) -> None:
    """Add ``pretrain checkpoint``."""
    p = subparsers.add_parser("checkpoint", help="check checkpoints offline (sha256 of every file, signature)")
    sub = p.add_subparsers(dest="checkpoint_command", metavar="ACTION")
    sub.required = True
    v = sub.add_parser("verify", help="verify a run's checkpoints or one checkpoint", description=__doc__)
    v.add_argument("path", metavar="RUN_DIR|CHECKPOINT")
    v.set_defaults(func=verify_command)


def verify_command(args: argparse.Namespace) -> int:
    from pretrain.checkpoint import REJECTED_DIR, check_signature, list_checkpoints, read_meta, verify_checkpoint
    from pretrain.rundir import COMPLETE_MARKER

    path = Path(args.path)
    if (path / COMPLETE_MARKER).exists() or (path.is_dir() and path.parent.name == CHECKPOINTS):
        tags = [path]
    elif (path / CHECKPOINTS).is_dir() or path.name == CHECKPOINTS:
        root = path if path.name == CHECKPOINTS else path / CHECKPOINTS
        tags = [c.path for c in list_checkpoints(root)]
        for rejected in sorted((root / REJECTED_DIR).glob("*")):
            why = (rejected / "REJECTED.txt").read_text().strip() if (rejected / "REJECTED.txt").is_file() else "?"
            print(f"{rejected.name:>16}  set aside  {why}")
        if not tags:
            print(f"pretrain checkpoint verify: no checkpoints in {root}", file=sys.stderr)
            return EXIT_FAILED
    else:
        print(f"pretrain checkpoint verify: {path} is neither a run directory nor a checkpoint", file=sys.stderr)
        return EXIT_USAGE
    bad, unsigned = [], []
    for tag_dir in tags:
        ok, reason = verify_checkpoint(tag_dir)
        signed, why = check_signature(tag_dir) if ok else (False, "")
        step = read_meta(tag_dir).get("step", "?") if ok else "?"
        shown = reason if not ok else f"{reason}, {why}" if signed else f"{reason}, NOT SIGNED by your key: {why}"
        print(f"{tag_dir.name:>16}  {'ok' if ok else 'BAD':>9}  step {step}  {shown}")
        if not ok:
            bad.append(f"{tag_dir.name} ({reason})")
        elif not signed:
            unsigned.append(f"{tag_dir.name} ({why})")
    if bad:
        print(f"pretrain checkpoint verify: {len(bad)} bad checkpoint(s): {'; '.join(bad)}", file=sys.stderr)
    if unsigned:
        print(f"pretrain checkpoint verify: {len(unsigned)} checkpoint(s) not signed by your key: "
              f"{'; '.join(unsigned)}. A resume, export or eval loads them only with --trust-checkpoint",
              file=sys.stderr)  # fmt: skip
    return EXIT_FAILED if bad or unsigned else EXIT_OK
