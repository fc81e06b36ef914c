"""Where a run inside a sweep waits for the scheduler: after each eval, until the sweep's trial says continue or stop.

A native Ray Tune trainable blocks in ``tune.report`` while the scheduler decides on a result; a trial that ASHA stops
at a rung trains no further than that rung. A sweep trial's training run is a separate process (or a Slurm job on
another node), so it blocks the same way here: after the eval (and the checkpoint) of a step, rank 0 writes
``waiting`` and polls for the trial's decision, every rank idle in a short collective meanwhile (no CPU, no signals).
Files, in ``RUN_DIR/sweep/`` (a shared file system carries them to a Slurm job)::

    hook.json          the trial writes it before it starts the run; its presence turns the hook on
    alive              the trial touches it every few seconds while it lives
    waiting            the run: the step it waits at, once that step's eval and checkpoint are written
    decision_<step>    the trial, after ``tune.report`` returned ("continue") or once Ray Tune stopped it ("stop")

A run whose trial is gone (``alive`` older than the timeout ``hook.json`` states: a killed sweep driver, a lost node)
takes that as a stop. Torch-free: the trial side (:mod:`launch.sweep_trial`) uses the same functions.
"""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

from pretrain.rundir import SWEEP, write_atomic

__all__ = [
    "CONTINUE",
    "STOP",
    "Heartbeat",
    "SweepHook",
    "clear_hook",
    "decide",
    "install_hook",
    "waiting_step",
]

CONTINUE, STOP = "continue", "stop"
_HOOK, _ALIVE, _WAITING = "hook.json", "alive", "waiting"


def install_hook(run_dir: str | Path, timeout_s: float = 120.0) -> None:
    """Trial side, before the run starts: the run will wait for a decision at each eval."""
    folder = Path(run_dir) / SWEEP
    folder.mkdir(parents=True, exist_ok=True)
    for old in [*folder.glob("decision_*"), folder / _WAITING]:
        old.unlink(missing_ok=True)
    (folder / _ALIVE).touch()
    write_atomic(folder / _HOOK, json.dumps({"timeout_s": timeout_s}))


def clear_hook(run_dir: str | Path) -> None:
    """Remove the hook (a run started without a sweep later trains straight through)."""
    (Path(run_dir) / SWEEP / _HOOK).unlink(missing_ok=True)


def waiting_step(run_dir: str | Path) -> int | None:
    """Trial side: the step the run waits at, or None."""
    try:
        return int((Path(run_dir) / SWEEP / _WAITING).read_text())
    except (OSError, ValueError):
        return None


def decide(run_dir: str | Path, step: int, decision: str) -> None:
    """Trial side: tell the run waiting at ``step`` (or about to) to ``continue`` or ``stop``."""
    write_atomic(Path(run_dir) / SWEEP / f"decision_{step}", decision)


class Heartbeat:
    """Trial side: touches ``alive`` every ``every_s`` seconds in a daemon thread until :meth:`stop`."""

    def __init__(self, run_dir: str | Path, every_s: float = 5.0):
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
    """Run side (rank 0): announce a wait at a step and read the trial's decision."""

    def __init__(self, run_dir: str | Path, timeout_s: float):
        self.folder = Path(run_dir) / SWEEP
        self.timeout_s = timeout_s

    @classmethod
    def find(cls, run_dir: str | Path) -> SweepHook | None:
        """The hook of a run started by a sweep trial, or None for a plain run."""
        try:
            spec = json.loads((Path(run_dir) / SWEEP / _HOOK).read_text())
        except (OSError, ValueError):
            return None
        return cls(run_dir, float(spec.get("timeout_s", 120.0)))

    def announce(self, step: int) -> None:
        write_atomic(self.folder / _WAITING, str(step))

    def poll(self, step: int) -> str | None:
        """``continue``/``stop`` once decided, ``stop`` if the trial stopped beating, else None."""
        try:
            decision = (self.folder / f"decision_{step}").read_text().strip()
        except OSError:
            decision = ""
        if decision in (CONTINUE, STOP):
            return decision
        try:
            age = time.time() - (self.folder / _ALIVE).stat().st_mtime
        except OSError:
            age = float("inf")
        return STOP if age > self.timeout_s else None

    def done(self, step: int) -> None:
        """The wait at ``step`` is over."""
        (self.folder / _WAITING).unlink(missing_ok=True)
        (self.folder / f"decision_{step}").unlink(missing_ok=True)
