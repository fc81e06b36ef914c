"""The ``pretrain`` command: one parser, one subcommand module each, imported only when needed.

``pretrain COMMAND ...`` imports only that command's module (``pretrain status`` must not import torch, which the
training commands need); ``pretrain --help``, no command or an unknown one import them all, so the help and the usage
error list every command.

Exit codes: 0 success, 1 runtime failure, 2 bad usage or bad config (nothing was started or written). A file-system
error no command expected (a full disk, a read-only or vanished folder) ends the command with one line naming the path
and the reason, exit 1; its traceback is logged at debug level.

The installed command (and ``python -m launch.cli``) is :func:`entry`: once the command has returned, every stream is
flushed and the ``atexit`` handlers have run, it leaves with ``os._exit`` instead of tearing the interpreter down.
After torch and DeepSpeed are loaded the teardown (freeing every module and C++ object) costs 1.5-1.8 s per process
on a 2-core machine against 0.02 s for the handlers, and a 2-rank run has three such processes. Our files are closed
by then (the metrics sink is line-buffered and closed, checkpoints are written and renamed); a live non-daemon thread
(someone else's work in progress) gets the ordinary exit.
"""

from __future__ import annotations

import argparse
import atexit
import importlib
import logging
import os
import sys
import threading
from typing import NoReturn

__all__ = ["main", "entry", "EXIT_USAGE"]

logger = logging.getLogger(__name__)

EXIT_USAGE = 2
_EXIT_FAILED = 1

# subcommand -> module exposing `register(subparsers)`; each registered parser sets `func(args) -> int`.
_COMMANDS = {
    "models": "launch.cmd_models",
    "data": "launch.cmd_data",
    "train": "launch.cmd_train",
    "submit": "launch.submit",
    "status": "launch.status",
    "cancel": "launch.status",
    "sweep": "launch.sweep",
    "checkpoint": "launch.cmd_checkpoint",
    "export": "launch.cmd_export",
    "eval": "launch.cmd_eval",
}


def build_parser(argv: list[str] | None = None) -> argparse.ArgumentParser:
    """The ``pretrain`` parser with the subcommand that ``argv`` names, or with all of them (``argv`` None, help,
    no command or an unknown one)."""
    parser = argparse.ArgumentParser(
        prog="pretrain",
        description="Distributed pretraining of SeTformer and SepViT: WebDataset shards, DeepSpeed ZeRO, "
        "submitit on Slurm, Ray Tune sweeps.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    first = argv[0] if argv else None
    wanted = [_COMMANDS[first]] if first in _COMMANDS else list(dict.fromkeys(_COMMANDS.values()))
    for module_name in wanted:
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as e:
            if e.name == module_name:  # that subcommand is not part of this checkout
                continue
            raise
        module.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    from data_pipeline.config import ConfigError
    from pretrain.lifecycle import resume_gc
    from pretrain.logging_utils import init_logging

    argv = sys.argv[1:] if argv is None else list(argv)
    parser = build_parser(argv)
    args, extra = parser.parse_known_args(argv)
    if extra and not getattr(args, "accepts_overrides", False):
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    if getattr(args, "accepts_overrides", False):
        args.overrides = list(getattr(args, "overrides", []) or []) + extra
        bad = [o for o in args.overrides if o.startswith("-")]
        if bad:
            parser.error(f"unrecognized arguments: {' '.join(bad)}")
    init_logging()
    if args.command != "train":  # `pretrain train` turns it back on itself, once torch and DeepSpeed are loaded
        resume_gc()
    try:
        return int(args.func(args) or 0)
    except ConfigError as e:
        print(f"pretrain {args.command}: config error: {e}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        return 130
    except OSError as e:
        logger.debug("pretrain %s failed", args.command, exc_info=True)
        what = f"{e.filename}: {e.strerror}" if e.filename and e.strerror else str(e)
        print(f"pretrain {args.command}: {what}; check that path and its file system", file=sys.stderr)
        return _EXIT_FAILED


def entry() -> NoReturn:
    """The ``pretrain`` executable: :func:`main`, then a fast exit with its code (see the module docstring)."""
    from pretrain.lifecycle import early_start

    early_start(sys.argv[1:])  # before the slow imports: a stop signal from the first moment is kept
    code = main()
    if any(t.is_alive() and not t.daemon for t in threading.enumerate() if t is not threading.main_thread()):
        sys.exit(code)
    atexit._run_exitfuncs()
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # a closed pipe or stream: nothing more can reach it
            pass
    os._exit(code)


if __name__ == "__main__":
    entry()
