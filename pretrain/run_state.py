"""The run's state besides the DeepSpeed engine, as components that save and restore themselves, and when to save.

A checkpoint holds, next to the engine's model, optimizer and LR scheduler (:class:`~pretrain.checkpoint_manager.
CheckpointManager` hands those to DeepSpeed):

- :class:`TrainState`: the trainer's counters (step, non-finite steps, the best eval, restarts, the last eval) and the
  loss sums of the log window in progress. The same on every rank; stored in DeepSpeed's client state as
  ``"trainer"``.
- :class:`RankState`: this rank's data position (with its corrupt-sample counts) and its torch/numpy/python RNG
  streams, in the rank's own ``rank_XXXXX.pt``.
- The EMA weights (:class:`~pretrain.optim.ModelEMA`), rank 0's ``ema.pt``.

Each has ``state_dict()`` and ``load_state_dict()``; the manager collects and restores them (:class:`Components`).
:class:`SaveSchedule` decides when a checkpoint is due: every ``checkpoint.every_steps``, every
``checkpoint.every_minutes`` of wall time (rank 0's clock; the ranks agree on it with the step's other flags), and
at the end when ``checkpoint.save_final``.
"""

from __future__ import annotations

import hashlib
import math
import time
from dataclasses import dataclass, field
from typing import Any, Protocol

from pretrain.checkpoint import capture_rng_state, restore_rng_state, seed_rng_state
from pretrain.step_window import NonfiniteRun, StepWindow

__all__ = ["Components", "RankState", "SaveSchedule", "Stateful", "TrainState", "augment_seed"]


class Stateful(Protocol):
    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


def augment_seed(seed: int, step: int, micro_step: int, rank: int) -> int:
    """Seed of the device-side augmentation generator: a pure function of (seed, step, micro-step, rank)."""
    digest = hashlib.sha256(f"{seed}:{step}:{micro_step}:{rank}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


class TrainState:
    """The trainer's resumable counters and the loss sums of the log window in progress (rank-independent: the
    losses are all-reduced)."""

    def __init__(self, max_nonfinite_steps: int):
        self.step = 0
        self.nonfinite = NonfiniteRun(max_nonfinite_steps)
        self.best_metric: float | None = None
        self.best_step: int | None = None
        self.last_eval: dict[str, Any] = {}
        self.restarts = 0
        self.window = StepWindow()
        """The steps not yet logged."""

    def state_dict(self) -> dict[str, Any]:
        return {
            "step": self.step,
            "nonfinite_total": self.nonfinite.total,
            "nonfinite_in_a_row": self.nonfinite.in_a_row,
            "best_metric": self.best_metric,
            "best_step": self.best_step,
            "last_eval": dict(self.last_eval),
            "restarts": self.restarts,
            "log_window": self.window.state_dict(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Put back :meth:`state_dict`; a state without all of its keys raises ``ValueError`` naming them."""
        missing = sorted(set(self.state_dict()) - set(state))
        if missing:
            raise ValueError(
                f"the checkpoint's trainer state lacks {missing}, so the run cannot continue from it exactly; start a "
                "new run from its weights with model.init_from=<the checkpoint>"
            )
        self.step = int(state["step"])
        self.nonfinite.total = int(state["nonfinite_total"])
        self.nonfinite.in_a_row = int(state["nonfinite_in_a_row"])
        self.best_metric, self.best_step = state["best_metric"], state["best_step"]
        self.last_eval = dict(state["last_eval"])
        self.restarts = int(state["restarts"])
        self.window = StepWindow.from_state(state["log_window"])

    def track_best(self, event: dict[str, Any], metric: str, mode: str) -> None:
        """Note ``event`` (an eval) as the best so far when its ``metric`` beats the best (``mode`` max or min)."""
        value = event.get(metric)
        if value is None or not math.isfinite(value):
            return
        if self.best_metric is None or (value > self.best_metric if mode == "max" else value < self.best_metric):
            self.best_metric, self.best_step = float(value), self.step


class RankState:
    """This rank's data position (and corrupt-sample counts) and RNG streams.

    Restored on another number of ranks (the saved streams belong to other ranks: ``rng`` None), the RNGs get fresh
    per-rank streams, a function of (``seed``, the restored step, rank).
    """

    def __init__(self, rank: int, loader: Any, seed: int, train_state: TrainState):
        self.rank, self.loader, self.seed, self.train_state = rank, loader, seed, train_state

    def state_dict(self) -> dict[str, Any]:
        return {
            "rank": self.rank,
            "rng": capture_rng_state(),
            "data": self.loader.state_dict(),
            "corrupt": self.loader.corrupt_counts(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.loader.load_state_dict(state["data"])
        if state["rng"] is not None:
            restore_rng_state(state["rng"])
        else:
            seed_rng_state(augment_seed(self.seed, self.train_state.step, -1, self.rank))


@dataclass
class Components:
    """What a checkpoint saves and restores besides the engine, by where each is stored."""

    client: dict[str, Stateful]
    """Rank-independent state inside DeepSpeed's checkpoint (restored first: the others may read it)."""
    rank: Stateful
    """This rank's own state, ``rank_XXXXX.pt``."""
    files: dict[str, Stateful] = field(default_factory=dict)
    """Rank 0's own files (``{file name: component}``), loaded on every rank."""
    identity: dict[str, Any] = field(default_factory=dict)
    """What the client state records of the run (:func:`~pretrain.checkpoint_manager.run_identity`)."""

    def client_state(self) -> dict[str, Any]:
        return {name: c.state_dict() for name, c in self.client.items()} | self.identity

    def restore(self, client: dict[str, Any], rank_state: dict[str, Any], files: dict[str, Any]) -> None:
        for name, component in self.client.items():
            component.load_state_dict(client[name])
        self.rank.load_state_dict(rank_state)
        for name, component in self.files.items():
            component.load_state_dict(files[name])


class SaveSchedule:
    """When a checkpoint is due (see the module docstring); :meth:`saved` restarts the clock."""

    def __init__(self, every_steps: int, every_minutes: float, save_final: bool, is_main: bool):
        self.every_steps, self.every_minutes, self.save_final = every_steps, every_minutes, save_final
        self.is_main = is_main
        self.saved_step = -1
        self._last_save = time.monotonic()

    def time_due(self) -> bool:
        """Rank 0: ``checkpoint.every_minutes`` have passed since the last save (this process's start at first)."""
        minutes = self.every_minutes
        return self.is_main and minutes > 0 and time.monotonic() - self._last_save >= minutes * 60.0

    def due(self, step: int, final: bool, time_due: bool) -> bool:
        """A checkpoint is due after ``step`` (``time_due``: the ranks' agreed :meth:`time_due`)."""
        every = self.every_steps
        return (final and self.save_final) or bool(every and step % every == 0) or time_due

    def saved(self, step: int) -> None:
        self.saved_step = step
        self._last_save = time.monotonic()
