"""How a run inside a sweep hands each eval to its trial and waits for the scheduler's decision. Torch-free.

A Ray Tune function trainable blocks in ``tune.report`` while the scheduler decides; a trial's run (another process, or
a Slurm job on another node) blocks the same way, through files in ``RUN_DIR/sweep/`` (a shared file system carries
them): after the eval and checkpoint of a step, rank 0 writes the step to ``waiting`` and polls ``decision``, every rank
idle meanwhile (no CPU, no signals). The trial writes ``continue STEP`` there once ``tune.report`` returned, or
``stop``. ``alive`` holds the trial's heartbeat timeout (it turns the hook on) and the trial touches it every second:
a run whose trial asks for a stop or is gone (a killed driver) checkpoints at the end of its step and ends as stopped,
exit 0, so it never needs killing from outside, even while torch builds an extension.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from pathlib import Path

from pretrain.rundir import SWEEP, write_atomic

__all__ = ["CONTINUE", "STOP", "SweepHook", "decide", "install_hook", "start_heartbeat", "waiting_step"]

logger = logging.getLogger(__name__)

CONTINUE, STOP = "continue", "stop"
_ALIVE, _WAITING, _DECISION = "alive", "waiting", "decision"


def install_hook(run_dir: str | Path, timeout_s: float = 30.0) -> None:
    """Trial side, before the run starts: it will wait at each eval, and stop once ``alive`` is ``timeout_s`` old."""
    folder = Path(run_dir) / SWEEP
    folder.mkdir(parents=True, exist_ok=True)
    for old in (_WAITING, _DECISION):
        (folder / old).unlink(missing_ok=True)
    write_atomic(folder / _ALIVE, str(timeout_s))


def start_heartbeat(run_dir: str | Path, every_s: float = 1.0) -> threading.Event:
    """Trial side: touch ``alive`` every ``every_s`` seconds in a daemon thread until the returned event is set."""
    stop, alive = threading.Event(), Path(run_dir) / SWEEP / _ALIVE

    def beat() -> None:
        while not stop.wait(every_s):
            with contextlib.suppress(OSError):
                alive.touch()

    threading.Thread(target=beat, name="trial-heartbeat", daemon=True).start()
    return stop


def waiting_step(run_dir: str | Path) -> int | None:
    """Trial side: the step the run waits at, or None."""
    try:
        return int((Path(run_dir) / SWEEP / _WAITING).read_text())
    except (OSError, ValueError):
        return None


def decide(run_dir: str | Path, decision: str, step: int | None = None) -> None:
    """Trial side: the run waiting at ``step`` continues, or (``STOP``) the run stops wherever it is, with a
    checkpoint."""
    write_atomic(Path(run_dir) / SWEEP / _DECISION, STOP if decision == STOP else f"{CONTINUE} {step}")


class SweepHook:
    """Run side (rank 0): announce a wait at a step, read the trial's decision, and notice a trial that is gone."""

    def __init__(self, run_dir: str | Path, timeout_s: float):
        self.folder = Path(run_dir) / SWEEP
        self.timeout_s = timeout_s
        self._checked_at, self._stopping = 0.0, False

    @classmethod
    def find(cls, run_dir: str | Path) -> SweepHook | None:
        """The hook of a run started by a sweep trial, or None for a plain run."""
        try:
            return cls(run_dir, float((Path(run_dir) / SWEEP / _ALIVE).read_text()))
        except (OSError, ValueError):
            return None

    def _decision(self) -> str:
        try:
            return (self.folder / _DECISION).read_text().strip()
        except OSError:
            return ""

    def stop_requested(self) -> bool:
        """Whether the trial asks for a stop or is gone; looks at the files at most once a second."""
        now = time.monotonic()
        if not self._stopping and now - self._checked_at >= 1.0:
            self._checked_at = now
            try:
                age = time.time() - (self.folder / _ALIVE).stat().st_mtime
            except OSError:
                age = float("inf")
            if self._decision() == STOP or age > self.timeout_s:
                why = "asks for a stop" if age <= self.timeout_s else f"is gone (no heartbeat for {age:.0f} s)"
                logger.warning("sweep: its trial %s; checkpointing and stopping", why)
                self._stopping = True
        return self._stopping

    def announce(self, step: int) -> None:
        write_atomic(self.folder / _WAITING, str(step))

    def poll(self, step: int) -> str | None:
        """``continue``/``stop`` once the trial decided on ``step``, else None."""
        decision = self._decision()
        return STOP if decision == STOP else CONTINUE if decision == f"{CONTINUE} {step}" else None

    def done(self, step: int) -> None:
        """The wait at ``step`` is over."""
        (self.folder / _WAITING).unlink(missing_ok=True)
