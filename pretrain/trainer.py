"""The training loop: resume, train steps on a DeepSpeed engine, evaluation, checkpoints, metrics, preemption.

One process per rank runs :func:`pretrain.rank.run_training`, which builds a :class:`Trainer`. Exit codes (also the
process exit status of ``pretrain train``):

- ``EXIT_OK`` (0): finished ``trainer.max_steps`` (or found the run already finished).
- ``EXIT_FAILED`` (1): a runtime failure, including ``trainer.max_nonfinite_steps`` non-finite losses in a row.
- ``EXIT_USAGE`` (2): bad config or arguments; nothing was started or written.
- ``EXIT_PREEMPTED`` (3): a stop signal arrived (:mod:`pretrain.lifecycle`, at any moment from the start): no step
  after it, a checkpoint if a step was trained since the last one, and ``status.json`` says ``preempted`` (SIGTERM,
  SIGUSR2) or ``stopped`` (SIGINT). Running the same command again resumes exactly (the Slurm requeue relies on this
  code).

Exactness on resume (same world size, CPU): the model, optimizer and LR scheduler come from DeepSpeed's checkpoint;
the data position, the torch/numpy/python RNG states (per rank) and the trainer counters (with the loss sums of the
log window in progress, so the event that spans the resume logs the same loss) from the checkpoint's client and
per-rank state; device-side augmentation draws from a ``torch.Generator`` seeded by (trainer.seed, step,
micro-step, rank), so it needs no saved state. Loader iteration runs under ``torch.random.fork_rng`` so starting a new
DataLoader iterator on resume does not shift the global RNG stream that dropout and drop path use.

Host-device syncs (each waits on GPU for all queued work, and rules out CUDA graphs): none between log steps, from any
caller (DeepSpeed and the optimizer included, ZeRO 0-2 in fp32 and bf16; counted by ``tests/integration/
test_host_syncs.py`` and ``benchmarks/step_kernels.py``). Batches are copied with ``non_blocking`` from pinned memory;
mixup/cutmix draw their batch-level numbers on the host; the loss, the global gradient norm and whether the step was
skipped stay on the device (a non-finite loss poisons the gradients, and :class:`~pretrain.optim.DeviceStep` skips a
non-finite update on the device, see :meth:`Trainer.train_step`); the stop flags go over a host-side gloo group
(:func:`pretrain.distributed.all_reduce_max`). What remains:

- At the log interval: one read of the window's losses and skip flags and the last grad norm (non-finite steps are
  counted, warned about and checked against ``trainer.max_nonfinite_steps`` there), and peak memory; at evals and
  checkpoints: their metrics and the window state.
- Where DeepSpeed steps itself (ZeRO-3, optimizer offload, fp16): its overflow check reads the device in ``step()``.
"""

from __future__ import annotations

import logging
import math
import signal
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import torch

from data_pipeline.loader import DataParts
from pretrain.checkpoint import RunDirRefused
from pretrain.checkpoint_manager import CheckpointManager, checkpoint_meta, run_identity
from pretrain.config import Config, dump_config
from pretrain.distributed import DistInfo, all_reduce_max, broadcast_object, sum_counts
from pretrain.engine import EngineParts, reapply_optim_config
from pretrain.evaluate import eval_metrics, evaluate_models
from pretrain.lifecycle import StopRequested, StopSignals, stop_outcome
from pretrain.loss import soft_target_cross_entropy
from pretrain.metrics import (
    MetricsSink,
    RunWriteError,
    StatusFile,
    build_metrics_sink,
    device_peak_flops,
    peak_memory_mb,
)
from pretrain.optim import ModelEMA
from pretrain.run_state import Components, RankState, TrainState, augment_seed
from pretrain.rundir import (
    EMA_FILE,
    EXIT_FAILED,
    EXIT_OK,
    EXIT_PREEMPTED,
    EXIT_USAGE,
    run_history,
)
from pretrain.step_window import StepWindow
from pretrain.sweep_hook import CONTINUE, STOP, SweepHook

__all__ = [
    "EXIT_FAILED",
    "EXIT_OK",
    "EXIT_PREEMPTED",
    "EXIT_USAGE",
    "TrainResult",
    "Trainer",
    "agree_stop",
]

logger = logging.getLogger(__name__)


@dataclass
class TrainResult:
    """How a training process ended."""

    exit_code: int
    state: str
    """``finished``, ``preempted`` or ``failed``."""
    step: int
    last_eval: dict[str, Any] = field(default_factory=dict)
    last_checkpoint: str | None = None
    message: str = ""


class StepFlags(NamedTuple):
    """What every rank agrees on after each step (:meth:`Trainer._agree_on_flags`, one all-reduce)."""

    signal: int
    """A stop signal that reached any rank (0: none)."""
    time_save: bool
    """Rank 0: ``checkpoint.every_minutes`` have passed."""
    sweep_stop: bool
    """Rank 0: the sweep trial is gone or asks for a stop."""
    write_failed: bool
    """Rank 0: a write to the run directory failed."""


# ---------------------------------------------------------------------------------------------------------- building


def agree_stop(stop: StopSignals, where: str) -> None:
    """Set-up is not a step: a stop signal that reached any rank ends the run here, on every rank, untrained.

    Raises:
        StopRequested: With the signal (every rank raises it at the same call).
    """
    (signum,) = all_reduce_max([float(stop.received or 0)])
    if signum:
        raise StopRequested(int(signum), where)


# ----------------------------------------------------------------------------------------------------------- trainer


class Trainer:
    """Runs one rank's share of a training run (all ranks run the same loop in lockstep)."""

    def __init__(
        self,
        cfg: Config,
        dist: DistInfo,
        parts: EngineParts,
        data: DataParts,
        ema: ModelEMA | None,
        ckpt: CheckpointManager,
        status: StatusFile,
        stop: StopSignals,
        flops_per_image: float | None = None,
    ):
        self.cfg, self.dist, self.parts, self.data = cfg, dist, parts, data
        self.engine = parts.engine
        self.ema, self.ckpt, self.status, self.stop = ema, ckpt, status, stop
        # a sweep trial's run waits for the scheduler after each eval (rank 0 reads the hook; every rank knows of it)
        self._sweep_hook = SweepHook.find(cfg.run_dir) if dist.is_main else None
        self._in_sweep = bool(broadcast_object(self._sweep_hook is not None))
        self.flops_per_image = flops_per_image
        self.peak_flops = device_peak_flops(dist.device, cfg.trainer.precision)
        self.global_batch = cfg.data.batch_size * cfg.trainer.grad_accum_steps * dist.world_size
        self.sink: MetricsSink = MetricsSink()
        self.state = TrainState(cfg.trainer.max_nonfinite_steps)
        ckpt.track(
            self.engine,
            Components(
                client={"trainer": self.state},
                rank=RankState(dist.rank, data.train, cfg.trainer.seed, self.state),
                files={EMA_FILE: ema} if ema is not None else {},
                identity=run_identity(cfg, dist.world_size),
            ),
        )
        self._compile_pending = cfg.trainer.compile
        self._last_step: dict[str, Any] = {"loss": math.nan, "skipped": False, "grad_norm": None, "lr": 0.0}
        self.last_checkpoint: str | None = None
        self._batches: Iterator[dict[str, torch.Tensor]] | None = None

    # -- the run -------------------------------------------------------------------------------------------------

    def fit(self, resume_from: str | Path | None = None) -> TrainResult:
        """Resume (from ``resume_from`` or the run's newest complete checkpoint), then :meth:`train`."""
        tag_dir = self.ckpt.restore(resume_from)
        if tag_dir is not None:
            self._resumed(tag_dir)
        else:
            history = broadcast_object(run_history(self.cfg.run_dir) if self.dist.is_main else None)
            if history:  # every checkpoint was rejected just now: never start over a history silently
                raise RunDirRefused(
                    f"{self.cfg.run_dir} has the history of an earlier run ({'; '.join(history)}) but none of its "
                    f"checkpoints could be used (see {self.cfg.run_dir / 'checkpoints' / 'rejected'}). Nothing was "
                    "deleted. Pass --restart to start from step 0 (the history is kept in previous/), or pick "
                    "another run.name=..."
                )
        agree_stop(self.stop, "before the first step")  # nothing of this life written yet: no config, no metrics
        failure = self._open_run_files() if self.dist.is_main else None
        if broadcast_object(failure is not None):  # every rank ends with rank 0
            return self._fail_write(failure)
        try:
            return self.train()
        finally:
            self.sink.close()

    def _open_run_files(self) -> RunWriteError | None:
        """Rank 0 writes config.yaml and opens the metrics sink; the write that failed, if one did."""
        try:
            dump_config(self.cfg, self.cfg.run_dir / "config.yaml")
        except OSError as e:
            return RunWriteError(self.cfg.run_dir / "config.yaml", e)
        try:
            self.sink = build_metrics_sink(self.cfg.run_dir, True, self.cfg.logging.tensorboard, self.state.step)
        except RunWriteError as e:
            return e
        return None

    def _resumed(self, tag_dir: Path) -> None:
        """After :meth:`CheckpointManager.restore` put back the engine, the counters, the data position, the RNGs and
        the EMA from ``tag_dir``: the config's optimizer values, and one restart more."""
        changed = reapply_optim_config(self.parts, self.cfg)
        if changed:
            logger.info("resuming with the config's %s", ", ".join(changed))
        self.state.restarts += 1
        self.last_checkpoint = str(tag_dir)
        logger.info("resumed from %s at step %d (restart %d)", tag_dir, self.state.step, self.state.restarts)

    def train(self) -> TrainResult:
        """The loop: a train step, then what is due after it (log, eval, checkpoint, a stop); until max_steps."""
        state, max_steps = self.state, self.cfg.trainer.max_steps
        self.status.update(
            state="running", step=state.step, restarts=state.restarts, last_checkpoint=self.last_checkpoint
        )
        if state.step >= max_steps:
            logger.info("run already reached trainer.max_steps=%d; nothing to train", max_steps)
            return self._finish("finished", EXIT_OK)
        self._batches = self._batch_stream()
        bar = self._progress_bar()
        state.window.start = time.perf_counter()  # this process times its own steps only
        while state.step < max_steps:
            state.window.add(self.train_step())
            state.step += 1
            self._log_if_due(bar)
            flags = self._agree_on_flags()
            if flags.write_failed:  # rank 0 could not write metrics, TensorBoard or status.json
                return self._fail_write(self._write_failure(), bar)
            final = state.step >= max_steps
            evaluated = self._evaluate_if_due(final)
            ended = self._after_step(flags, final, evaluated, bar)
            if ended is not None:
                return ended
        if self._agree_on_flags().write_failed:  # the last eval or checkpoint could not be recorded
            return self._fail_write(self._write_failure(), bar)
        return self._finish("finished", EXIT_OK, bar=bar)

    def _log_if_due(self, bar: Any) -> None:
        step = self.state.step
        if step % self.cfg.trainer.log_every_steps == 0 or step == self.cfg.trainer.max_steps:
            event = self.log_step()
            if bar is not None:
                bar.set_postfix(loss=f"{event['loss']:.4f}", img_s=f"{event['img_per_s']:.0f}", refresh=False)
        if bar is not None:
            bar.update(1)

    def _evaluate_if_due(self, final: bool) -> bool:
        every = self.cfg.trainer.eval_every_steps
        if final or (every and self.state.step % every == 0):
            self.evaluate()
            return True
        return False

    def _after_step(self, flags: StepFlags, final: bool, evaluated: bool, bar: Any) -> TrainResult | None:
        """End the run if non-finite losses, a stop signal or the sweep say so (with a checkpoint); else save one if
        it is due. None: go on."""
        step = self.state.step
        if self.state.nonfinite.limit_step is not None:  # known once the window is read (log steps, checkpoints)
            return self._fail_nonfinite(bar)
        if flags.signal:
            name = signal.Signals(flags.signal).name
            if not final:
                self.save_checkpoint()
                state = stop_outcome(flags.signal)  # stopped (SIGINT) or preempted (SIGTERM, SIGUSR2)
                return self._finish(state, EXIT_PREEMPTED, f"stopped by {name} at step {step}", bar)
            logger.info("%s arrived at the last step; finishing", name)  # nothing left to preempt
        if self.ckpt.schedule.due(step, final, flags.time_save):
            self.save_checkpoint()
        if final or not ((evaluated and self._in_sweep) or flags.sweep_stop):
            return None
        why = STOP if flags.sweep_stop else self._sweep_decision()
        if why == CONTINUE:
            return None
        self.save_checkpoint()
        state, code = ("stopped", EXIT_OK) if why == STOP else ("preempted", EXIT_PREEMPTED)
        by = "the sweep's scheduler" if why == STOP else why
        return self._finish(state, code, f"stopped by {by} at step {step}", bar)

    def _write_failure(self) -> RunWriteError | None:
        """The first write of metrics, TensorBoard or status.json that failed (rank 0; None elsewhere)."""
        return self.sink.failure or self.status.failure

    def _fail_write(self, failure: RunWriteError | None, bar: Any = None) -> TrainResult:
        """End the run on every rank as failed: rank 0 could not write to the run directory (``failure``, rank 0's)."""
        message = failure.run_ended(self.state.step, self.last_checkpoint) if failure is not None else ""
        if message:
            logger.error(message)
        return self._finish("failed", EXIT_FAILED, message, bar)

    def _fail_nonfinite(self, bar: Any) -> TrainResult:
        """Checkpoint and end the run: ``trainer.max_nonfinite_steps`` steps in a row were non-finite."""
        self.save_checkpoint()
        limit = self.cfg.trainer.max_nonfinite_steps
        msg = (
            f"{limit} non-finite losses in a row (trainer.max_nonfinite_steps={limit}) at step "
            f"{self.state.nonfinite.limit_step}; the weights in {self.last_checkpoint} never took a skipped step's "
            "update. Lower optim.lr or check the data"
        )
        logger.error(msg)
        return self._finish("failed", EXIT_FAILED, msg, bar)

    # -- one step ------------------------------------------------------------------------------------------------

    def train_step(self) -> dict[str, Any]:
        """One optimizer step over ``grad_accum_steps`` micro-batches; skipped on every rank if any rank's loss or the
        global gradient norm is non-finite, without a host read.

        Each micro-batch's loss statistics are all-reduced on the device, and a non-finite global loss multiplies the
        backward loss by NaN (a finite one by exactly 1.0), so the gradients, and with them the global gradient norm,
        turn non-finite on every rank. :class:`~pretrain.optim.DeviceStep` (ZeRO 0-2, fp32/bf16) then skips the update
        on the device, the same way on every rank, since the norm is of the all-reduced gradients. Where DeepSpeed
        steps itself (ZeRO-3, offload, fp16) its overflow check skips it and counts it in ``engine.skipped_steps``.
        With gradient accumulation one non-finite micro-batch skips its whole optimizer step.

        Returns:
            ``loss`` (the global mean), ``skipped`` and ``nonfinite`` (1.0 for yes) as device scalars, ``grad_norm``
            (a device scalar, a float or None), ``lr`` and ``data_wait_s``.
        """
        engine, accum, dev = self.engine, self.cfg.trainer.grad_accum_steps, self.dist.device
        engine.train()
        lr = self.parts.optimizer.param_groups[0]["lr"] / self.parts.group_specs[0][0]  # optim.lr scheduled
        data_wait, losses = 0.0, []
        skipped_before = engine.skipped_steps
        started = time.perf_counter()
        for micro in range(accum):
            t0 = time.perf_counter()
            with torch.random.fork_rng(devices=[]):  # loader iteration must not move the global RNG stream
                batch = next(self._batches)  # type: ignore[arg-type]
            data_wait += time.perf_counter() - t0
            gen = torch.Generator(device=dev).manual_seed(
                augment_seed(self.cfg.trainer.seed, self.state.step, micro, self.dist.rank)
            )
            # copies queue behind the device's work instead of waiting for it (the loader pins batches on CUDA)
            labels = batch["label"].to(dev, non_blocking=True).clamp_min(0)  # padding rows may be -1; masked below
            images, targets = self.data.augment(batch["image"].to(dev, non_blocking=True), labels, generator=gen)
            valid = batch["valid"].to(dev, non_blocking=True)
            logits = engine(images)
            loss = soft_target_cross_entropy(logits, targets, valid)
            # the global mean loss, summed over ranks on the device; NaN anywhere makes it NaN everywhere
            n_valid = valid.sum().to(torch.float64)
            stats = torch.stack([loss.detach().to(torch.float64) * n_valid, n_valid])
            if self.dist.world_size > 1:
                torch.distributed.all_reduce(stats)
            global_loss = stats[0] / stats[1].clamp_min(1)
            losses.append(global_loss)
            poison = global_loss.mul(0).add_(1).to(loss.dtype)  # exactly 1.0 for a finite loss, NaN for inf or NaN
            engine.backward(loss * poison)
            engine.step()
        if self._compile_pending:  # torch.compile compiles in the first forward and backward of the process
            self._compile_pending = False
            self._log_compile(time.perf_counter() - started - data_wait)
        step_loss = losses[0] if accum == 1 else torch.stack(losses).mean()
        step = self.parts.device_step
        if step is not None:
            skipped = nonfinite = step.skipped
            grad_norm = step.grad_norm
        else:
            skipped, nonfinite, grad_norm = self._deepspeed_step_outcome(step_loss, skipped_before)
        if self.ema is not None:
            self.ema.update(engine.module, skipped)
        return {
            "loss": step_loss,
            "lr": lr,
            "grad_norm": grad_norm,
            "skipped": skipped,
            "nonfinite": nonfinite,
            "data_wait_s": data_wait,
        }

    def _deepspeed_step_outcome(self, step_loss: torch.Tensor, skipped_before: int) -> tuple[Any, Any, Any]:
        """Where DeepSpeed steps itself: ``(skipped, nonfinite, grad_norm)`` from its counters (its step read the
        device already), with the flags as device scalars like :class:`~pretrain.optim.DeviceStep`'s."""
        skipped = self.engine.skipped_steps != skipped_before
        if skipped:
            self.parts.scheduler.step()  # DeepSpeed does not step its scheduler on a skipped step: keep it on ours
        flag = torch.full((), float(skipped), device=self.dist.device)
        nonfinite = flag
        if skipped and self.cfg.trainer.precision == "fp16":  # fp16 skips on loss-scale overflows routinely
            nonfinite = torch.isfinite(step_loss).logical_not().to(flag.dtype)
        return flag, nonfinite, None if skipped else self.engine.get_global_grad_norm()

    def _log_compile(self, seconds: float) -> None:
        from torch._dynamo.utils import counters

        logger.info(
            "first step with torch.compile (backend %s): %.1f s, compilation included; %d blocks compiled per block "
            "into %d graphs, %d graph breaks",
            self.cfg.trainer.compile_backend,
            seconds,
            sum(len(stage.blocks) for stage in self.engine.module.stages),
            counters["stats"]["unique_graphs"],
            sum(counters["graph_break"].values()),
        )

    def _batch_stream(self) -> Iterator[dict[str, torch.Tensor]]:
        return self.data.train.iter_batches()

    # -- evaluation ----------------------------------------------------------------------------------------------

    @torch.no_grad()
    def evaluate(self) -> dict[str, Any]:
        """val_loss/top1/top5 (and ``*_ema``) over the whole val split: sums over valid rows, all-reduced."""
        if self.data.val is None:
            return {}
        t0 = time.perf_counter()
        models = [("", self.engine)] + ([("_ema", self.ema.module)] if self.ema is not None else [])
        self.engine.eval()
        mean, std = self.cfg.augment.mean, self.cfg.augment.std
        normalize = lambda images: self.data.normalize(images, mean, std)
        sums = evaluate_models([m for _, m in models], self.data.val, normalize, self.dist.device, self.dist.world_size)
        self.engine.train()
        event: dict[str, Any] = {"event": "eval", "step": self.state.step, "epoch": self._epoch()}
        event |= eval_metrics(sums, [suffix for suffix, _ in models])
        event["eval_time_s"] = time.perf_counter() - t0
        self.state.track_best(event, self.cfg.checkpoint.best_metric, self.cfg.checkpoint.best_mode)
        self.state.last_eval = {k: v for k, v in event.items() if k.startswith("val_")} | {"step": self.state.step}
        self.sink.log(event)
        self.status.update(last_eval=self.state.last_eval, step=self.state.step)
        logger.info(
            "eval step %d: val_loss %.4f val_top1 %.4f val_top5 %.4f",
            self.state.step,
            event["val_loss"],
            event["val_top1"],
            event["val_top5"],
        )
        return event

    # -- checkpoint, logging, status -----------------------------------------------------------------------------

    def save_checkpoint(self) -> None:
        """Collective save of ``step_{step}`` (skipped if this step is already saved)."""
        if self.ckpt.schedule.saved_step == self.state.step:
            return
        self._settle()  # the window state and the non-finite counts go into the checkpoint
        st = self.state
        meta = checkpoint_meta(self.cfg, st.step, self._epoch(), self.dist.world_size, st.last_eval, st.best_metric,
                               st.best_step)  # fmt: skip
        self.last_checkpoint = str(self.ckpt.save(st.step, meta))
        self.status.update(last_checkpoint=self.last_checkpoint, step=st.step)

    def log_step(self) -> dict[str, Any]:
        """Write a train event for the steps since the previous one, then start a new window.

        The loss is the mean over the whole window, across a resume too (the last step's loss if that was skipped).
        The timing fields cover the window's steps run in this process; ``resumed_in_window`` says when that is not
        the whole window.
        """
        last = self._settle()
        window, self.state.window = self.state.window, StepWindow()
        elapsed = max(1e-9, time.perf_counter() - window.start)
        img_per_s = window.steps * self.global_batch / elapsed
        event: dict[str, Any] = {
            "event": "train",
            "step": self.state.step,
            "epoch": self._epoch(),
            "loss": last["loss"] if last["skipped"] else window.loss_sum / max(1, window.loss_count),
            "lr": last["lr"],
            "grad_norm": last["grad_norm"],
            "skipped": last["skipped"],
            "img_per_s": img_per_s,
            "img_per_s_per_rank": img_per_s / self.dist.world_size,
            "data_wait_frac": window.data_wait_s / elapsed,
            "step_time_s": elapsed / max(1, window.steps),
            "resumed_in_window": window.resumed_steps > 0,
            "peak_mem_mb": peak_memory_mb(self.dist.device),
            "nonfinite_steps": self.state.nonfinite.total,
            "time": time.time(),
        }
        if self.flops_per_image and self.peak_flops:
            event["mfu"] = self.flops_per_image * img_per_s / (self.peak_flops * self.dist.world_size)
        for reason, n in sum_counts(self.data.train.corrupt_counts()).items():
            event[f"corrupt_{reason}"] = n
        self.sink.log(event)
        self.status.update(step=self.state.step, epoch=event["epoch"], img_per_s=img_per_s)
        return event

    def _settle(self) -> dict[str, Any]:
        """Read back the window's pending steps (:meth:`StepWindow.settle`); the last step's values."""
        self._last_step = self.state.window.settle(self.state.step, self.state.nonfinite) or self._last_step
        return self._last_step

    def _sweep_decision(self) -> str:
        """Inside a sweep: wait after this step's eval and checkpoint until the trial says ``continue`` or ``stop``
        (:mod:`pretrain.sweep_hook`), every rank idle meanwhile; a signal ends the wait too (its name is returned)."""
        hook = self._sweep_hook
        if hook is not None:
            hook.announce(self.state.step)
        while True:
            flags = self._agree_on_flags()
            stop_signal = flags.signal
            decision = (
                STOP if flags.sweep_stop else broadcast_object(hook.poll(self.state.step) if hook is not None else None)
            )
            if stop_signal or decision is not None:
                break
            time.sleep(0.2)
        if hook is not None:
            hook.done(self.state.step)
        return signal.Signals(int(stop_signal)).name if stop_signal else str(decision)

    def _agree_on_flags(self) -> StepFlags:
        """All ranks agree on what :class:`StepFlags` holds, in one all-reduce."""
        sweep_stop = self._sweep_hook is not None and self._sweep_hook.stop_requested()
        flags = [
            float(self.stop.received or 0),
            float(self.ckpt.schedule.time_due()),
            float(sweep_stop),
            float(bool(self._write_failure())),
        ]
        sig, save, sweep, failed = all_reduce_max(flags)
        return StepFlags(int(sig), bool(save), bool(sweep), bool(failed))

    def _epoch(self) -> int:
        return int(self.data.train.state_dict()["epoch"])

    def _progress_bar(self):
        if not (self.dist.is_main and self.cfg.trainer.progress_bar):
            return None
        from tqdm import tqdm

        return tqdm(
            total=self.cfg.trainer.max_steps, initial=self.state.step, desc="train", unit="step", mininterval=1.0
        )

    def _finish(self, state: str, code: int, message: str = "", bar: Any = None) -> TrainResult:
        if bar is not None:
            bar.close()
        self.status.update(
            state=state,
            step=self.state.step,
            exit_code=code,
            message=message,
            last_checkpoint=self.last_checkpoint,
            last_eval=self.state.last_eval,
            nonfinite_steps=self.state.nonfinite.total,
        )
        return TrainResult(code, state, self.state.step, dict(self.state.last_eval), self.last_checkpoint, message)

    def close(self) -> None:
        """Stop loader workers."""
        self.data.train.close()
        if self.data.val is not None:
            self.data.val.close()
