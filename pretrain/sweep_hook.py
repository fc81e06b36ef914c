"""How a run inside a sweep hands each eval to its trial and waits for the scheduler's decision. Torch-free.

A Ray Tune function trainable blocks in ``tune.report`` while the scheduler decides on a result. A sweep trial's
training run is a separate process (or a Slurm job on another node), so it blocks the same way here: after the eval and
checkpoint of a step, rank 0 writes ``waiting`` and polls for the trial's decision, every rank idle in a short
collective meanwhile (no CPU, no signals). The trial reads the eval and the checkpoint from the run's ``status.json``.
Files, in ``RUN_DIR/sweep/`` (a shared file system carries them to a Slurm job)::

    hook.json          the trial writes it before it starts the run; its presence turns the hook on
    alive              the trial touches it every second while it lives
    waiting            the run: the step it waits at, once that step's eval and checkpoint are written
    decision_<step>    the trial, after ``tune.report`` returned ("continue") or once Ray Tune stopped it ("stop")
    stop               the trial (or a later life of it): stop now, wherever you are

Between evals the run checks, at most once a second, whether its trial is gone (``alive`` older than the timeout in
``hook.json``: a killed sweep driver, a trial Ray Tune ended) or asks it to stop (the trainer's one all-reduce of stop
signals carries it to every rank): the run checkpoints at the end of the step and ends as stopped, exit 0, as after a
``stop`` decision. A run therefore never needs killing from outside, and is never killed while torch builds an
extension.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from pathlib import Path

from pretrain.rundir import SWEEP, write_atomic

__all__ = ["CONTINUE", "STOP", "Heartbeat", "SweepHook", "decide", "install_hook", "request_stop", "waiting_step"]

logger = logging.getLogger(__name__)

CONTINUE, STOP = "continue", "stop"
_HOOK, _ALIVE, _WAITING, _STOP = "hook.json", "alive", "waiting", "stop"


def install_hook(run_dir: str | Path, timeout_s: float = 30.0) -> None:
    """Trial side, before the run starts: the run will wait for a decision at each eval, and stop by itself once
    ``alive`` is ``timeout_s`` old."""
    folder = Path(run_dir) / SWEEP
    folder.mkdir(parents=True, exist_ok=True)
    for old in [*folder.glob("decision_*"), folder / _WAITING, folder / _STOP]:
        old.unlink(missing_ok=True)
    (folder / _ALIVE).touch()
    write_atomic(folder / _HOOK, json.dumps({"timeout_s": timeout_s}))


def waiting_step(run_dir: str | Path) -> int | None:
    """Trial side: the step the run waits at, or None."""
    try:
        return int((Path(run_dir) / SWEEP / _WAITING).read_text())
    except (OSError, ValueError):
        return None


def decide(run_dir: str | Path, step: int, decision: str) -> None:
    """Trial side: tell the run waiting at ``step`` (or about to) to ``continue`` or ``stop``."""
    write_atomic(Path(run_dir) / SWEEP / f"decision_{step}", decision)


def request_stop(run_dir: str | Path) -> None:
    """Trial side: the run stops at the end of its current step (or wait), with a checkpoint."""
    folder = Path(run_dir) / SWEEP
    if folder.is_dir():
        write_atomic(folder / _STOP, "stop")


class Heartbeat:
    """Trial side: touches ``alive`` every ``every_s`` seconds in a daemon thread until :meth:`stop`."""

    def __init__(self, run_dir: str | Path, every_s: float = 1.0):
        self.path = Path(run_dir) / SWEEP / _ALIVE
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._beat, args=(every_s,), name="trial-heartbeat", daemon=True)
        self._thread.start()

    def _beat(self, every_s: float) -> None:
        while not self._stop.wait(every_s):
            try:
                self.path.touch()
            except OSError:
                pass

    def stop(self) -> None:
        self._stop.set()


class SweepHook:
    """Run side (rank 0): announce a wait at a step, read the trial's decision, and notice a trial that is gone."""

    def __init__(self, run_dir: str | Path, timeout_s: float):
        self.folder = Path(run_dir) / SWEEP
        self.timeout_s = timeout_s
        self._checked_at = 0.0
        self._stopping = False

    @classmethod
    def find(cls, run_dir: str | Path) -> SweepHook | None:
        """The hook of a run started by a sweep trial, or None for a plain run."""
        try:
            spec = json.loads((Path(run_dir) / SWEEP / _HOOK).read_text())
        except (OSError, ValueError):
            return None
        return cls(run_dir, float(spec.get("timeout_s", 30.0)))

    def stop_requested(self) -> bool:
        """Whether the trial is gone or asks for a stop; looks at the files at most once a second."""
        now = time.monotonic()
        if not self._stopping and now - self._checked_at >= 1.0:
            self._checked_at = now
            try:
                age = time.time() - (self.folder / _ALIVE).stat().st_mtime
            except OSError:
                age = float("inf")
            why = "its trial asks for a stop" if (self.folder / _STOP).exists() else ""
            why = why or (f"its trial is gone (no heartbeat for {age:.0f} s)" if age > self.timeout_s else "")
            if why:
                logger.warning("sweep: %s; checkpointing and stopping", why)
                self._stopping = True
        return self._stopping

    def announce(self, step: int) -> None:
        write_atomic(self.folder / _WAITING, str(step))

    def poll(self, step: int) -> str | None:
        """``continue``/``stop`` once the trial decided, else None."""
        try:
            decision = (self.folder / f"decision_{step}").read_text().strip()
        except OSError:
            return None
        return decision if decision in (CONTINUE, STOP) else None

    def done(self, step: int) -> None:
        """The wait at ``step`` is over."""
        (self.folder / _WAITING).unlink(missing_ok=True)
        (self.folder / f"decision_{step}").unlink(missing_ok=True)
