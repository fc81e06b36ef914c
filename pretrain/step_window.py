"""The train steps between two log events: their results stay on the device until the window is read back, once.

A train step's loss, "was the update skipped" and gradient norm are device scalars (reading one would wait for all
the work queued on the GPU). :class:`StepWindow` keeps them until the trainer logs or checkpoints, then reads the whole
window in one transfer (:meth:`StepWindow.settle`): the applied steps' losses are added, in step order, to the
window's resumable loss sum, and :class:`NonfiniteRun` counts the non-finite steps and notes when
``trainer.max_nonfinite_steps`` in a row was reached.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Any

import torch

__all__ = ["NonfiniteRun", "StepWindow"]

logger = logging.getLogger(__name__)


@dataclass
class NonfiniteRun:
    """Non-finite (skipped) steps: in total, in a row, and the step at which ``limit`` in a row was first reached."""

    limit: int
    total: int = 0
    in_a_row: int = 0
    limit_step: int | None = None

    def count(self, step: int, skipped: bool, nonfinite: bool) -> None:
        """Count step ``step`` (1-based); an applied step ends a run, a skipped finite one (fp16 overflow) does not."""
        if nonfinite:
            self.total += 1
            self.in_a_row += 1
            logger.warning(
                "step %d: non-finite loss or gradients on some rank; step skipped (%d in a row)", step, self.in_a_row
            )
            if self.in_a_row >= self.limit and self.limit_step is None:
                self.limit_step = step
        elif not skipped:
            self.in_a_row = 0


@dataclass
class StepWindow:
    """The steps since the previous train event: their losses (resumable) and this process's timing of them.

    The loss sums and the step count before the resume are part of the trainer's checkpointed state, so the first
    event after a resume averages the loss over the whole window, as the uninterrupted run does. The timing covers
    only the steps run in this process: a full window's images over part of its time would overstate the throughput,
    and the other life's clock is not comparable (start-up, another node).
    """

    start: float = field(default_factory=time.perf_counter)
    steps: int = 0
    """Steps timed in this process."""
    data_wait_s: float = 0.0
    loss_sum: float = 0.0
    """Sum of the settled applied steps' losses, added one by one in step order (a resumed run adds in that order)."""
    loss_count: int = 0
    resumed_steps: int = 0
    """Steps of this window run before the resume (from the checkpoint)."""
    pending: list[dict[str, Any]] = field(default_factory=list)
    """Train step results not read back yet (``loss``, ``skipped``, ``nonfinite``, ``grad_norm`` on the device)."""

    def add(self, out: dict[str, Any]) -> None:
        """Count one train step's result; nothing is read from the device here."""
        self.steps += 1
        self.data_wait_s += out["data_wait_s"]
        self.pending.append(out)

    def settle(self, step: int, run: NonfiniteRun) -> dict[str, Any] | None:
        """Read the pending steps (``step`` is the last one's number) in one transfer, add the applied steps' losses
        and count the non-finite ones in ``run``.

        Returns:
            The last pending step's ``loss``, ``skipped``, ``grad_norm`` (None for a skipped step) and ``lr``; None
            when nothing was pending.
        """
        pending = self.pending
        if not pending:
            return None
        norm = pending[-1]["grad_norm"]
        scalars = [t for out in pending for t in (out["loss"], out["skipped"], out["nonfinite"])]
        if torch.is_tensor(norm):
            scalars.append(norm)
        values = torch.stack([t.to(torch.float64) for t in scalars]).tolist()  # the one host read
        first = step - len(pending) + 1
        for i in range(len(pending)):
            loss, skipped, nonfinite = values[3 * i : 3 * i + 3]
            run.count(first + i, bool(skipped), bool(nonfinite))
            if not skipped:
                self.loss_sum += loss
                self.loss_count += 1
        self.pending = []
        skipped = bool(values[3 * len(pending) - 2])
        norm = values[-1] if torch.is_tensor(norm) else norm
        return {
            "loss": values[3 * len(pending) - 3],
            "skipped": skipped,
            "grad_norm": None if skipped or norm is None else float(norm),
            "lr": pending[-1]["lr"],
        }

    def state_dict(self) -> dict[str, int | float]:
        """Plain numbers only (the checkpoint must load with ``torch.load(weights_only=True)``); settle first."""
        if self.pending:
            raise RuntimeError("StepWindow.state_dict() before settle(): the pending steps' losses are not counted")
        return {"steps": int(self.resumed_steps + self.steps), "loss_sum": self.loss_sum, "loss_count": self.loss_count}

    @classmethod
    def from_state(cls, state: dict[str, int | float]) -> StepWindow:
        """The window a checkpoint was written in (:meth:`state_dict`)."""
        return cls(
            loss_sum=float(state["loss_sum"]), loss_count=int(state["loss_count"]), resumed_steps=int(state["steps"])
        )
