"""The training loop: resume, train steps on a DeepSpeed engine, evaluation, checkpoints, metrics, preemption.

One process per rank runs :func:`run_training`. Exit codes (also the process exit status of ``pretrain train``):

- ``EXIT_OK`` (0): finished ``trainer.max_steps`` (or found the run already finished).
- ``EXIT_FAILED`` (1): a runtime failure, including ``trainer.max_nonfinite_steps`` non-finite losses in a row.
- ``EXIT_USAGE`` (2): bad config or arguments; nothing was started or written.
- ``EXIT_PREEMPTED`` (3): SIGTERM or SIGUSR2 arrived; a checkpoint was written and ``status.json`` says
  ``preempted``. Running the same command again resumes exactly (the Slurm requeue relies on this code).

Exactness on resume (same world size, CPU): the model, optimizer and LR scheduler come from DeepSpeed's checkpoint;
the data position, the torch/numpy/python RNG states (per rank) and the trainer counters (with the loss sums of the
log window in progress, so the event that spans the resume logs the same loss) from the checkpoint's client and
per-rank state; device-side augmentation draws from a ``torch.Generator`` seeded by (trainer.seed, step,
micro-step, rank), so it needs no saved state. Loader iteration runs under ``torch.random.fork_rng`` so starting a new
DataLoader iterator on resume does not shift the global RNG stream that dropout and drop path use.

Host-device syncs (each waits on GPU for the step's queued work): a train step of ours reads the device at most once.
Batches are copied with ``non_blocking`` from pinned memory; mixup/cutmix draw their batch-level numbers on the host;
the loss and its finiteness stay on the device (a non-finite loss poisons the gradients, see :meth:`Trainer.train_step`)
and the stop flags go over a host-side gloo group (:func:`pretrain.distributed.all_reduce_max`). What remains:

- fp32 without ZeRO: one read of the gradient norm before ``engine.step()``, to skip a non-finite update (torch's
  optimizer has no such check). With ZeRO or bf16/fp16 the trainer reads nothing: DeepSpeed's optimizer reads its own
  gradient norm or overflow flag in ``step()`` (DeepSpeed's syncs, not removable from here).
- At the log interval: the window's loss, the grad norm, peak memory; at evals and checkpoints: their metrics and
  the window state. A skipped fp16 step reads its loss, to tell a non-finite loss from a loss-scale overflow.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import logging
import math
import signal
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from data_pipeline.loader import DataParts, build_data
from pretrain.checkpoint import (
    CheckpointManager,
    RunDirRefused,
    capture_rng_state,
    restore_rng_state,
    seed_rng_state,
)
from pretrain.config import Config, config_digest, dump_config, model_shape_digest
from pretrain.distributed import DistInfo, all_reduce_max, broadcast_object
from pretrain.engine import EngineParts, ModelEMA, build_engine, reapply_optim_config, soft_target_cross_entropy
from pretrain.evaluate import eval_metrics, evaluate_models
from pretrain.export import EMA_FILE, load_pretrained
from pretrain.metrics import (
    MetricsSink,
    StatusFile,
    build_metrics_sink,
    device_peak_flops,
    peak_memory_mb,
)
from pretrain.rundir import CHECKPOINTS, EXIT_FAILED, EXIT_OK, EXIT_PREEMPTED, EXIT_USAGE, run_history
from pretrain.sweep_hook import CONTINUE, STOP, SweepHook

__all__ = [
    "EXIT_FAILED",
    "EXIT_OK",
    "EXIT_PREEMPTED",
    "EXIT_USAGE",
    "StopSignals",
    "TrainResult",
    "Trainer",
    "augment_seed",
    "build_model",
    "build_trainer",
    "resolve_num_classes",
    "run_training",
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


class StopSignals:
    """Turns SIGTERM/SIGUSR2 (and a first Ctrl-C) into a flag checked at the end of each step (then checkpoint, exit 3).

    A signal sent to the whole process group or job (``timeout``, a terminal, Slurm) reaches the data workers too;
    they leave it to this process (``data_pipeline.loader``), which checkpoints and then shuts them down. A second
    SIGINT raises KeyboardInterrupt.
    """

    SIGNALS = (signal.SIGTERM, signal.SIGUSR2, signal.SIGINT)

    def __init__(self):
        self.received: int | None = None
        self._previous: dict[int, Any] = {}

    def install(self) -> StopSignals:
        for sig in self.SIGNALS:
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        if signum == signal.SIGINT and self.received is not None:
            raise KeyboardInterrupt
        if self.received is None:
            logger.warning("received %s: will checkpoint and stop at the end of this step", signal.Signals(signum).name)
        self.received = signum

    @property
    def requested(self) -> bool:
        return self.received is not None

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()


@contextlib.contextmanager
def _optimizer_step_skipped(optimizer: torch.optim.Optimizer) -> Iterator[None]:
    """``engine.step()`` without the optimizer's update: DeepSpeed still clips and zeroes the gradients and steps its
    counters and LR scheduler, so the engine's accumulation boundary and the schedule stay on the trainer's steps."""
    optimizer.step = lambda *args, **kwargs: None  # type: ignore[method-assign]  # shadows the class's step
    try:
        yield
    finally:
        del optimizer.step


def augment_seed(seed: int, step: int, micro_step: int, rank: int) -> int:
    """Seed of the device-side augmentation generator: a pure function of (seed, step, micro-step, rank)."""
    digest = hashlib.sha256(f"{seed}:{step}:{micro_step}:{rank}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


# ---------------------------------------------------------------------------------------------------------- building


def resolve_num_classes(cfg: Config) -> Config:
    """With ``data.classes_from_manifest``, set ``model.num_classes`` from the data manifest (returns a new config)."""
    if not cfg.data.classes_from_manifest:
        return cfg
    from data_pipeline.manifest import load_manifest

    n = len(load_manifest(cfg.data.path).classes)
    return dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, num_classes=n))


def build_model(cfg: Config) -> nn.Module:
    """The single-device model of ``cfg.model`` (initialised from ``trainer.seed``, identical on every rank).

    With ``model.init_from`` the weights come from that export or checkpoint (a new head and input size adapted by the
    model family), unless the run has a checkpoint of its own: a resume continues from that, never from init_from.
    """
    from pretrain.checkpoint import list_checkpoints
    from pretrain.models import create_model

    torch.manual_seed(cfg.trainer.seed)
    kwargs = dict(
        num_classes=cfg.model.num_classes,
        img_size=cfg.model.img_size,
        drop_path_rate=cfg.model.drop_path_rate,
        drop_rate=cfg.model.drop_rate,
        **cfg.model.kwargs,
    )
    init = cfg.model.init_from
    if init and not any(c.complete for c in list_checkpoints(cfg.run_dir / CHECKPOINTS)):
        model = load_pretrained(init, cfg.model.name, **kwargs)
        logger.info("initialised the weights from %s (its optimizer state is not carried over)", init)
        return model
    return create_model(cfg.model.name, **kwargs)


def _flops_per_image(model: nn.Module, cfg: Config, device: torch.device) -> float | None:
    """Training FLOPs per image (fwd + bwd = 3 × forward, 2 FLOPs per MAC); only needed for MFU on GPU."""
    if device.type != "cuda":
        return None
    from pretrain.models._flops import count_macs

    try:
        return count_macs(model, cfg.model.img_size) * 1e9 * 2 * 3
    except Exception as e:  # MFU is a nicety: never fail a run over it
        logger.warning("could not count model FLOPs (%s); mfu will not be logged", e)
        return None


def build_trainer(cfg: Config, dist: DistInfo, stop: StopSignals | None = None) -> Trainer:
    """Model, engine, data, EMA, checkpoint manager and status file for this rank."""
    t0 = time.perf_counter()
    model = build_model(cfg).to(dist.device)
    flops = _flops_per_image(model, cfg, dist.device)
    ema = ModelEMA(model, cfg.trainer.ema_decay) if cfg.trainer.ema_decay > 0 else None
    t1 = time.perf_counter()
    parts = build_engine(cfg, model, dist.world_size)
    t2 = time.perf_counter()
    data = build_data(
        cfg.data,
        cfg.augment,
        img_size=cfg.model.img_size,
        num_classes=cfg.model.num_classes,
        rank=dist.rank,
        world_size=dist.world_size,
        corrupt_log_every=cfg.logging.corrupt_log_every,
        pin_memory=dist.device.type == "cuda",
    )
    logger.info("built model %.1f s, DeepSpeed engine %.1f s, data %.1f s", t1 - t0, t2 - t1, time.perf_counter() - t2)
    ckpt = CheckpointManager(
        cfg.run_dir / "checkpoints",
        dist.rank,
        dist.world_size,
        keep_last=cfg.checkpoint.keep_last,
        keep_best=cfg.checkpoint.keep_best,
        best_metric=cfg.checkpoint.best_metric,
        best_mode=cfg.checkpoint.best_mode,
    )
    status = StatusFile(
        cfg.run_dir / "status.json",
        enabled=dist.is_main,
        max_steps=cfg.trainer.max_steps,
        world_size=dist.world_size,
        run_dir=str(cfg.run_dir),
    )
    return Trainer(cfg, dist, parts, data, ema, ckpt, status, stop or StopSignals(), flops)


# ----------------------------------------------------------------------------------------------------------- trainer


@dataclass
class _Window:
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
    loss_sum: float | torch.Tensor = 0.0
    """Sum of the applied steps' losses; a device tensor while steps add to it (read at the log interval only)."""
    loss_count: int = 0
    resumed_steps: int = 0
    """Steps of this window run before the resume (from the checkpoint)."""

    def add(self, out: dict[str, Any]) -> None:
        """Count one step's :meth:`Trainer.train_step` result (a skipped step's NaN loss is left out of the mean)."""
        self.steps += 1
        self.data_wait_s += out["data_wait_s"]
        if not out["skipped"]:
            self.loss_sum += out["loss"]
            self.loss_count += 1

    def state_dict(self) -> dict[str, int | float]:
        """Plain numbers only (the checkpoint must load with ``torch.load(weights_only=True)``)."""
        return {
            "steps": int(self.resumed_steps + self.steps),
            "loss_sum": float(self.loss_sum),
            "loss_count": int(self.loss_count),
        }

    @classmethod
    def from_state(cls, state: dict[str, int | float] | None) -> _Window:
        """The window a checkpoint was written in; an empty one for checkpoints older than the window state."""
        if not state:
            return cls()
        return cls(
            loss_sum=float(state["loss_sum"]), loss_count=int(state["loss_count"]), resumed_steps=int(state["steps"])
        )


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
        # resumable counters (state_dict)
        self.step = 0
        self.nonfinite_total = 0
        self.nonfinite_in_a_row = 0
        self._compile_pending = cfg.trainer.compile
        self.best_metric: float | None = None
        self.best_step: int | None = None
        self.last_eval: dict[str, Any] = {}
        self.restarts = 0
        self._window = _Window()  # the steps not yet logged
        # per process
        self.last_checkpoint: str | None = None
        self._last_save_time = time.monotonic()
        self._saved_step = -1
        self._batches: Iterator[dict[str, torch.Tensor]] | None = None

    # -- state ---------------------------------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """Trainer counters and the loss sums of the log window in progress (rank-independent: losses are
        all-reduced), stored in DeepSpeed's client state."""
        return {
            "step": self.step,
            "nonfinite_total": self.nonfinite_total,
            "nonfinite_in_a_row": self.nonfinite_in_a_row,
            "best_metric": self.best_metric,
            "best_step": self.best_step,
            "last_eval": dict(self.last_eval),
            "restarts": self.restarts,
            "log_window": self._window.state_dict(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.step = int(state["step"])
        self.nonfinite_total = int(state["nonfinite_total"])
        self.nonfinite_in_a_row = int(state["nonfinite_in_a_row"])
        self.best_metric, self.best_step = state["best_metric"], state["best_step"]
        self.last_eval = dict(state["last_eval"])
        self.restarts = int(state["restarts"])
        self._window = _Window.from_state(state.get("log_window"))  # absent in checkpoints of older versions

    # -- the run -------------------------------------------------------------------------------------------------

    def fit(self, resume_from: str | Path | None = None) -> TrainResult:
        """Resume (from ``resume_from`` or the run's newest complete checkpoint), then :meth:`train`."""
        extra = (EMA_FILE,) if self.ema is not None else ()
        loaded = self.ckpt.load_newest(self.engine, explicit=resume_from, extra=extra)
        if loaded is not None:
            self.resume(*loaded)
        else:
            history = broadcast_object(run_history(self.cfg.run_dir) if self.dist.is_main else None)
            if history:  # every checkpoint was rejected just now: never start over a history silently
                raise RunDirRefused(
                    f"{self.cfg.run_dir} has the history of an earlier run ({'; '.join(history)}) but none of its "
                    f"checkpoints could be used (see {self.cfg.run_dir / 'checkpoints' / 'rejected'}). Nothing was "
                    "deleted. Pass --restart to start from step 0 (the history is kept in previous/), or pick "
                    "another run.name=..."
                )
        if self.dist.is_main:
            dump_config(self.cfg, self.cfg.run_dir / "config.yaml")
        self.sink = build_metrics_sink(self.cfg.run_dir, self.dist.is_main, self.cfg.logging.tensorboard, self.step)
        try:
            return self.train()
        finally:
            self.sink.close()

    def resume(self, tag_dir: Path, client: dict[str, Any], rank_state: dict[str, Any]) -> None:
        """Put back what :meth:`CheckpointManager.load_newest` loaded from ``tag_dir``: counters, data position, RNGs,
        EMA (model, optimizer and scheduler are in the engine already) and the config's optimizer values."""
        changed = reapply_optim_config(self.parts, self.cfg)
        if changed:
            logger.info("resuming with the config's %s", ", ".join(changed))
        self.load_state_dict(client["trainer"])
        self.data.train.load_state_dict(rank_state["data"])
        if self.ema is not None:
            self.ema.load_state_dict(rank_state["files"][EMA_FILE])
        if rank_state["rng"] is not None:
            restore_rng_state(rank_state["rng"])
        else:  # resumed on another number of ranks: fresh per-rank streams, a function of (seed, step, rank)
            seed_rng_state(augment_seed(self.cfg.trainer.seed, self.step, -1, self.dist.rank))
        self.restarts += 1
        self.last_checkpoint = str(tag_dir)
        self._saved_step = self.step
        logger.info("resumed from %s at step %d (restart %d)", tag_dir, self.step, self.restarts)

    def train(self) -> TrainResult:
        """The loop: train steps, then log, evaluate, checkpoint; stop on max_steps, a signal or non-finite losses."""
        cfg, tcfg = self.cfg, self.cfg.trainer
        max_steps = tcfg.max_steps
        self.status.update(
            state="running", step=self.step, restarts=self.restarts, last_checkpoint=self.last_checkpoint
        )
        if self.step >= max_steps:
            logger.info("run already reached trainer.max_steps=%d; nothing to train", max_steps)
            return self._finish("finished", EXIT_OK)
        self._batches = self._batch_stream()
        bar = self._progress_bar()
        self._window.start = time.perf_counter()  # this process times its own steps only
        while self.step < max_steps:
            out = self.train_step()
            self.step += 1
            self._window.add(out)
            if out["nonfinite"]:
                self.nonfinite_total += 1
                self.nonfinite_in_a_row += 1
                logger.warning(
                    "step %d: non-finite loss or gradients on some rank; step skipped (%d in a row)",
                    self.step,
                    self.nonfinite_in_a_row,
                )
            elif not out["skipped"]:
                self.nonfinite_in_a_row = 0
            if self.step % tcfg.log_every_steps == 0 or self.step == max_steps or out["skipped"]:
                event = self.log_step(out)
                if bar is not None:
                    bar.set_postfix(loss=f"{event['loss']:.4f}", img_s=f"{event['img_per_s']:.0f}", refresh=False)
            if bar is not None:
                bar.update(1)
            stop_signal, time_save, sweep_stop = self._agree_on_flags()
            final = self.step >= max_steps
            evaluating = final or (tcfg.eval_every_steps and self.step % tcfg.eval_every_steps == 0)
            if evaluating:
                self.evaluate()
            if self.nonfinite_in_a_row >= tcfg.max_nonfinite_steps:
                self.save_checkpoint()
                msg = (
                    f"{self.nonfinite_in_a_row} non-finite losses in a row (trainer.max_nonfinite_steps="
                    f"{tcfg.max_nonfinite_steps}) at step {self.step}; the weights in {self.last_checkpoint} are the "
                    "last good ones (skipped steps never updated them). Lower optim.lr or check the data"
                )
                logger.error(msg)
                return self._finish("failed", EXIT_FAILED, msg, bar)
            if stop_signal:
                sig = signal.Signals(int(stop_signal)).name
                if final:  # nothing left to preempt: the run ends as finished
                    logger.info("%s arrived at the last step; finishing", sig)
                else:
                    self.save_checkpoint()
                    return self._finish("preempted", EXIT_PREEMPTED, f"stopped by {sig} at step {self.step}", bar)
            every = cfg.checkpoint.every_steps
            if (final and cfg.checkpoint.save_final) or (every and self.step % every == 0) or time_save:
                self.save_checkpoint()
            sweep_wait = (evaluating and self._in_sweep) or sweep_stop
            if sweep_wait and not final and (why := STOP if sweep_stop else self._sweep_decision()) != CONTINUE:
                if self._saved_step != self.step:
                    self.save_checkpoint()
                state, code = ("stopped", EXIT_OK) if why == STOP else ("preempted", EXIT_PREEMPTED)
                by = "the sweep's scheduler" if why == STOP else why
                return self._finish(state, code, f"stopped by {by} at step {self.step}", bar)
        return self._finish("finished", EXIT_OK, bar=bar)

    # -- one step ------------------------------------------------------------------------------------------------

    def train_step(self) -> dict[str, Any]:
        """One optimizer step over ``grad_accum_steps`` micro-batches; skipped on every rank if any rank's loss or the
        gradient norm is non-finite.

        The finiteness check needs no host read of its own: each micro-batch's loss statistics are all-reduced on the
        device, and a non-finite global loss multiplies the backward loss by NaN (a finite one by exactly 1.0), so the
        gradients, and with them the gradient norm the optimizer computes anyway, turn non-finite on every rank.
        DeepSpeed's optimizers (ZeRO 1-3, bf16, fp16) then skip the update themselves, leave the weights and optimizer
        state untouched and count it in ``engine.skipped_steps``; the plain fp32 optimizer without ZeRO has no such
        check, so :meth:`_skip_if_nonfinite` reads the gradient norm it computes once and ``engine.step()`` then runs
        without the optimizer's update (:func:`_optimizer_step_skipped`). With gradient accumulation one non-finite
        micro-batch skips its whole optimizer step.
        """
        engine, accum, dev = self.engine, self.cfg.trainer.grad_accum_steps, self.dist.device
        engine.train()
        lr = self.parts.optimizer.param_groups[0]["lr"] / self.parts.group_specs[0][0]  # optim.lr scheduled
        data_wait, losses, grad_norm, dropped = 0.0, [], None, False
        skipped_before = engine.skipped_steps
        started = time.perf_counter()
        for micro in range(accum):
            t0 = time.perf_counter()
            with torch.random.fork_rng(devices=[]):  # loader iteration must not move the global RNG stream
                batch = next(self._batches)  # type: ignore[arg-type]
            data_wait += time.perf_counter() - t0
            gen = torch.Generator(device=dev).manual_seed(
                augment_seed(self.cfg.trainer.seed, self.step, micro, self.dist.rank)
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
            poison = torch.where(torch.isfinite(global_loss), 1.0, float("nan")).to(loss.dtype)
            engine.backward(loss * poison)
            if engine.is_gradient_accumulation_boundary():
                grad_norm = self._stage0_grad_norm()
                dropped = self._skip_if_nonfinite(grad_norm)
            with _optimizer_step_skipped(engine.optimizer) if dropped else contextlib.nullcontext():
                engine.step()
        skipped = dropped or engine.skipped_steps != skipped_before
        if skipped and not dropped:
            self.parts.scheduler.step()  # DeepSpeed does not step its scheduler on a skipped step: keep it on ours
        if self._compile_pending:  # torch.compile compiles in the first forward and backward of the process
            self._compile_pending = False
            logger.info(
                "first step with torch.compile (backend %s): %.1f s, compilation included",
                self.cfg.trainer.compile_backend,
                time.perf_counter() - started - data_wait,
            )
        step_loss = torch.stack(losses).mean()
        nonfinite = skipped
        if skipped and self.cfg.trainer.precision == "fp16":
            nonfinite = not math.isfinite(float(step_loss))  # fp16 skips on loss-scale overflows routinely
        if not skipped:
            if grad_norm is None:
                grad_norm = engine.get_global_grad_norm()
            if self.ema is not None:
                self.ema.update(engine.module)
        return {
            "loss": step_loss,
            "lr": lr,
            "grad_norm": None if skipped else grad_norm,
            "skipped": skipped,
            "nonfinite": nonfinite,
            "data_wait_s": data_wait,
        }

    def _stage0_grad_norm(self) -> torch.Tensor | None:
        """DeepSpeed reports no gradient norm without ZeRO: compute it (on the device) from the all-reduced
        gradients."""
        if self.cfg.deepspeed.zero_stage != 0:
            return None
        grads = [p.grad for p in self.engine.module.parameters() if p.grad is not None]
        return torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g.float()) for g in grads]))

    def _skip_if_nonfinite(self, grad_norm: torch.Tensor | None) -> bool:
        """Without an optimizer that checks for overflow (fp32 without ZeRO): whether this step's update must be
        skipped (non-finite gradient norm). Reads the norm on the host: the one device sync of a step without ZeRO."""
        if grad_norm is None or hasattr(self.engine.optimizer, "overflow"):
            return False
        return not bool(torch.isfinite(grad_norm))

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
        event: dict[str, Any] = {"event": "eval", "step": self.step, "epoch": self._epoch()}
        event |= eval_metrics(sums, [suffix for suffix, _ in models])
        event["eval_time_s"] = time.perf_counter() - t0
        self._track_best(event)
        self.last_eval = {k: v for k, v in event.items() if k.startswith("val_")} | {"step": self.step}
        self.sink.log(event)
        self.status.update(last_eval=self.last_eval, step=self.step)
        logger.info(
            "eval step %d: val_loss %.4f val_top1 %.4f val_top5 %.4f",
            self.step,
            event["val_loss"],
            event["val_top1"],
            event["val_top5"],
        )
        return event

    def _track_best(self, event: dict[str, Any]) -> None:
        value = event.get(self.cfg.checkpoint.best_metric)
        if value is None or not math.isfinite(value):
            return
        better = self.best_metric is None or (
            value > self.best_metric if self.cfg.checkpoint.best_mode == "max" else value < self.best_metric
        )
        if better:
            self.best_metric, self.best_step = float(value), self.step

    # -- checkpoint, logging, status -----------------------------------------------------------------------------

    def save_checkpoint(self) -> None:
        """Collective save of ``step_{step}`` (skipped if this step is already saved)."""
        if self._saved_step == self.step:
            return
        client_state = {
            "trainer": self.state_dict(),
            "config_digest": config_digest(self.cfg),
            "model_shape_digest": model_shape_digest(self.cfg),
            "world_size": self.dist.world_size,
        }
        rank_state = {
            "rank": self.dist.rank,
            "rng": capture_rng_state(),
            "data": self.data.train.state_dict(),
            "corrupt": self.data.train.corrupt_counts(),
        }
        meta = {
            "step": self.step,
            "epoch": self._epoch(),
            "world_size": self.dist.world_size,
            "batch_size": self.cfg.data.batch_size,
            "zero_stage": self.cfg.deepspeed.zero_stage,
            "max_steps": self.cfg.trainer.max_steps,
            "config_digest": client_state["config_digest"],
            "model_shape_digest": client_state["model_shape_digest"],
            "model_config": dataclasses.asdict(self.cfg.model),
            "layer_decay": self.cfg.optim.layer_decay,
            "metrics": dict(self.last_eval),
            "best_metric": self.best_metric,
            "best_step": self.best_step,
            "time": time.time(),
        }
        extra = {EMA_FILE: self.ema.state_dict()} if self.ema is not None else None
        tag_dir = self.ckpt.save(self.engine, self.step, client_state, rank_state, meta, extra)
        self.last_checkpoint = str(tag_dir)
        self._saved_step = self.step
        self._last_save_time = time.monotonic()
        self.status.update(last_checkpoint=self.last_checkpoint, step=self.step)

    def log_step(self, out: dict[str, Any]) -> dict[str, Any]:
        """Write a train event for the steps since the previous one, then start a new window.

        The loss is the mean over the whole window, across a resume too. The timing fields cover the window's steps
        run in this process; ``resumed_in_window`` says when that is not the whole window.
        """
        window, self._window = self._window, _Window()
        elapsed = max(1e-9, time.perf_counter() - window.start)
        img_per_s = window.steps * self.global_batch / elapsed
        event: dict[str, Any] = {
            "event": "train",
            "step": self.step,
            "epoch": self._epoch(),
            "loss": float(out["loss"] if out["skipped"] else window.loss_sum / max(1, window.loss_count)),
            "lr": out["lr"],
            "grad_norm": None if out["grad_norm"] is None else float(out["grad_norm"]),
            "skipped": out["skipped"],
            "img_per_s": img_per_s,
            "img_per_s_per_rank": img_per_s / self.dist.world_size,
            "data_wait_frac": window.data_wait_s / elapsed,
            "step_time_s": elapsed / max(1, window.steps),
            "resumed_in_window": window.resumed_steps > 0,
            "peak_mem_mb": peak_memory_mb(self.dist.device),
            "nonfinite_steps": self.nonfinite_total,
            "time": time.time(),
        }
        if self.flops_per_image and self.peak_flops:
            event["mfu"] = self.flops_per_image * img_per_s / (self.peak_flops * self.dist.world_size)
        for reason, n in self._global_corrupt_counts().items():
            event[f"corrupt_{reason}"] = n
        self.sink.log(event)
        self.status.update(step=self.step, epoch=event["epoch"], img_per_s=img_per_s)
        return event

    def _global_corrupt_counts(self) -> dict[str, int]:
        counts = self.data.train.corrupt_counts()
        if self.dist.world_size == 1:
            return counts
        gathered: list[dict[str, int]] = [{} for _ in range(self.dist.world_size)]
        torch.distributed.all_gather_object(gathered, counts)
        total: dict[str, int] = {}
        for c in gathered:
            for k, v in c.items():
                total[k] = total.get(k, 0) + int(v)
        return total

    def _sweep_decision(self) -> str:
        """Inside a sweep: wait after this step's eval and checkpoint until the trial says ``continue`` or ``stop``
        (:mod:`pretrain.sweep_hook`), every rank idle meanwhile; a signal ends the wait too (its name is returned)."""
        hook = self._sweep_hook
        if hook is not None:
            hook.announce(self.step)
        while True:
            stop_signal, _, sweep_stop = self._agree_on_flags()
            decision = STOP if sweep_stop else broadcast_object(hook.poll(self.step) if hook is not None else None)
            if stop_signal or decision is not None:
                break
            time.sleep(0.2)
        if hook is not None:
            hook.done(self.step)
        return signal.Signals(int(stop_signal)).name if stop_signal else str(decision)

    def _agree_on_flags(self) -> tuple[float, bool, bool]:
        """All ranks agree on (a stop signal on any rank, rank 0's "checkpoint minutes elapsed", rank 0's "the sweep
        trial is gone or asks for a stop")."""
        minutes = self.cfg.checkpoint.every_minutes
        time_save = self.dist.is_main and minutes > 0 and time.monotonic() - self._last_save_time >= minutes * 60.0
        sweep_stop = self._sweep_hook is not None and self._sweep_hook.stop_requested()
        sig, save, sweep = all_reduce_max([float(self.stop.received or 0), float(time_save), float(sweep_stop)])
        return sig, bool(save), bool(sweep)

    def _epoch(self) -> int:
        return int(self.data.train.state_dict()["epoch"])

    def _progress_bar(self):
        if not (self.dist.is_main and self.cfg.trainer.progress_bar):
            return None
        from tqdm import tqdm

        return tqdm(total=self.cfg.trainer.max_steps, initial=self.step, desc="train", unit="step", mininterval=1.0)

    def _finish(self, state: str, code: int, message: str = "", bar: Any = None) -> TrainResult:
        if bar is not None:
            bar.close()
        self.status.update(
            state=state,
            step=self.step,
            exit_code=code,
            message=message,
            last_checkpoint=self.last_checkpoint,
            last_eval=self.last_eval,
            nonfinite_steps=self.nonfinite_total,
        )
        return TrainResult(code, state, self.step, dict(self.last_eval), self.last_checkpoint, message)

    def close(self) -> None:
        """Stop loader workers."""
        self.data.train.close()
        if self.data.val is not None:
            self.data.val.close()


def run_training(cfg: Config, dist: DistInfo, resume_from: str | Path | None = None) -> TrainResult:
    """Build and fit on this rank; on an exception, ``status.json`` says failed (rank 0) and it is re-raised.

    Args:
        cfg: Validated config (``model.num_classes`` resolved).
        dist: This rank's process group membership.
        resume_from: The user's ``--resume`` checkpoint; None resumes from the run's newest usable checkpoint, if any
            (checked against its sha256 digests; ones that fail are set aside and older ones tried).
    """
    stop = StopSignals().install()
    trainer = None
    try:
        trainer = build_trainer(cfg, dist, stop)
        return trainer.fit(resume_from)
    except BaseException as e:
        if dist.is_main:
            status = trainer.status if trainer is not None else StatusFile(cfg.run_dir / "status.json")
            status.update(state="failed", exit_code=EXIT_FAILED, message=f"{type(e).__name__}: {e}")
        raise
    finally:
        if trainer is not None:
            trainer.close()
        stop.restore()
