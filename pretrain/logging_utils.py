"""Logging helpers: ``init_logging`` for entry points, a rank-0 filter, and a rate-limited warning helper."""

from __future__ import annotations

import logging
import os
import sys

__all__ = ["init_logging", "get_rank", "is_rank0"]


def get_rank() -> int:
    for var in ("RANK", "SLURM_PROCID", "OMPI_COMM_WORLD_RANK"):
        if var in os.environ:
            return int(os.environ[var])
    return 0


def is_rank0() -> bool:
    return get_rank() == 0


class _StderrHandler(logging.StreamHandler):
    """Writes to ``sys.stderr`` as it is when a record is logged, not as it was at set-up: a command run in-process
    after its caller redirected stderr (a test's capture, an embedding program) logs where its own messages go."""

    @property
    def stream(self):  # type: ignore[override]
        return sys.stderr

    @stream.setter
    def stream(self, value) -> None:  # StreamHandler.__init__ assigns it
        pass


def init_logging(level: str | int = "INFO") -> None:
    """Configure the root logger once: rank 0 logs at ``level``, other ranks log warnings and above."""
    root = logging.getLogger()
    if getattr(root, "_pretrain_configured", False):
        root.setLevel(level if is_rank0() else logging.WARNING)
        return
    handler = _StderrHandler()
    rank = get_rank()
    handler.setFormatter(logging.Formatter(f"%(asctime)s [rank{rank}] %(levelname)s %(name)s: %(message)s", "%H:%M:%S"))
    root.handlers[:] = [handler]
    root.setLevel(level if rank == 0 else logging.WARNING)
    root._pretrain_configured = True  # type: ignore[attr-defined]
