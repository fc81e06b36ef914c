"""What one rank of a training run does: build its trainer (the model, ``model.init_from`` included, the DeepSpeed
engine, the data, the EMA, the checkpoint manager and the status file) and run it (:func:`run_training`), ending a
run stopped during set-up as preempted or stopped with nothing trained."""

from __future__ import annotations

import dataclasses
import logging
import time
from pathlib import Path

import torch
import torch.nn as nn

from data_pipeline.loader import build_data
from pretrain.checkpoint_manager import CheckpointManager
from pretrain.config import Config
from pretrain.distributed import DistInfo
from pretrain.engine import build_engine
from pretrain.export import load_pretrained
from pretrain.lifecycle import StopRequested, StopSignals, resume_gc, stop_outcome
from pretrain.metrics import StatusFile
from pretrain.optim import ModelEMA
from pretrain.run_state import SaveSchedule
from pretrain.rundir import CHECKPOINTS, EXIT_FAILED, EXIT_PREEMPTED, read_latest
from pretrain.trainer import Trainer, TrainResult, agree_stop

__all__ = ["build_model", "build_trainer", "resolve_num_classes", "run_training"]

logger = logging.getLogger(__name__)


def resolve_num_classes(cfg: Config) -> Config:
    """With ``data.classes_from_manifest``, set ``model.num_classes`` from the data manifest (returns a new config)."""
    if not cfg.data.classes_from_manifest:
        return cfg
    from data_pipeline.manifest import load_manifest

    n = len(load_manifest(cfg.data.path).classes)
    return dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, num_classes=n))


def build_model(cfg: Config, trusted: bool = False) -> nn.Module:
    """The single-device model of ``cfg.model`` (initialised from ``trainer.seed``, identical on every rank).

    With ``model.init_from`` the weights come from that export or checkpoint (a new head and input size adapted by the
    model family), unless the run has a checkpoint of its own: a resume continues from that, never from init_from.
    """
    from pretrain.checkpoint import list_checkpoints
    from pretrain.models import create_model

    torch.manual_seed(cfg.trainer.seed)
    kwargs = cfg.model.build_kwargs()
    init = cfg.model.init_from
    if init and not any(c.complete for c in list_checkpoints(cfg.run_dir / CHECKPOINTS)):
        model = load_pretrained(init, cfg.model.name, trusted=trusted, **kwargs)
        logger.info("initialised the weights from %s (its optimizer state is not carried over)", init)
        return model
    return create_model(cfg.model.name, **kwargs)


def _flops_per_image(model: nn.Module, cfg: Config, device: torch.device) -> float | None:
    """Training FLOPs per image (fwd + bwd = 3 × forward, 2 FLOPs per MAC); only needed for MFU on GPU."""
    if device.type != "cuda":
        return None
    from pretrain.models.flops import count_macs

    try:
        return count_macs(model, cfg.model.img_size) * 1e9 * 2 * 3
    except Exception as e:  # MFU is a nicety: never fail a run over it
        logger.warning("could not count model FLOPs (%s); mfu will not be logged", e)
        return None


def build_trainer(cfg: Config, dist: DistInfo, stop: StopSignals | None = None, trusted: bool = False) -> Trainer:
    """Model, engine, data, EMA, checkpoint manager and status file for this rank."""
    t0 = time.perf_counter()
    stop = stop or StopSignals()
    model = build_model(cfg, trusted).to(dist.device)
    flops = _flops_per_image(model, cfg, dist.device)
    ema = ModelEMA(model, cfg.trainer.ema_decay) if cfg.trainer.ema_decay > 0 else None
    t1 = time.perf_counter()
    agree_stop(stop, "while the model was built")
    logger.info("initialising the DeepSpeed engine")
    parts = build_engine(cfg, model, dist.world_size)
    t2 = time.perf_counter()
    agree_stop(stop, "while the DeepSpeed engine was initialised")
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
        trusted=trusted,
        schedule=SaveSchedule(
            cfg.checkpoint.every_steps, cfg.checkpoint.every_minutes, cfg.checkpoint.save_final, dist.is_main
        ),
    )
    status = StatusFile(
        cfg.run_dir / "status.json",
        enabled=dist.is_main,
        max_steps=cfg.trainer.max_steps,
        world_size=dist.world_size,
        run_dir=str(cfg.run_dir),
    )
    return Trainer(cfg, dist, parts, data, ema, ckpt, status, stop, flops)


def run_training(
    cfg: Config, dist: DistInfo, resume_from: str | Path | None = None, trusted: bool = False
) -> TrainResult:
    """Build and fit on this rank; on an exception, ``status.json`` says failed (rank 0) and it is re-raised.

    Args:
        cfg: Validated config (``model.num_classes`` resolved).
        dist: This rank's process group membership.
        resume_from: The user's ``--resume`` checkpoint; None resumes from the run's newest usable checkpoint, if any
            (checked against its sha256 digests; ones that fail are set aside and older ones tried).
        trusted: ``--trust-checkpoint``: load checkpoints (and ``model.init_from``) not signed by this user.
    """
    import torch._dynamo  # noqa: F401  (the optimizer imports it anyway: it is one of the slow imports)

    resume_gc()  # paused by `pretrain train` while it imported torch and DeepSpeed
    stop = StopSignals.current()  # `pretrain train` installs it first thing: it holds a signal from before now
    installed = stop is None
    stop = stop or StopSignals().install()
    trainer = None
    try:
        agree_stop(stop, "before the DeepSpeed engine was built")
        trainer = build_trainer(cfg, dist, stop, trusted)
        return trainer.fit(resume_from)
    except StopRequested as e:
        return _stopped_untrained(cfg, dist, trainer, e)
    except BaseException as e:
        if dist.is_main:
            status = trainer.status if trainer is not None else StatusFile(cfg.run_dir / "status.json")
            status.update(state="failed", exit_code=EXIT_FAILED, message=f"{type(e).__name__}: {e}")
        raise
    finally:
        if trainer is not None:
            trainer.close()
        if installed:
            stop.restore()


def _stopped_untrained(cfg: Config, dist: DistInfo, trainer: Trainer | None, stop: StopRequested) -> TrainResult:
    """A stop signal during set-up: no step was trained and nothing of this life written but the status; exit 3."""
    from pretrain.checkpoint import read_meta

    state, message = stop_outcome(stop.signum), str(stop)
    latest = read_latest(cfg.run_dir / CHECKPOINTS) if trainer is None else None  # the one the next run resumes
    tag = cfg.run_dir / CHECKPOINTS / latest if latest else None
    step = trainer.state.step if trainer is not None else int(read_meta(tag).get("step", 0)) if tag is not None else 0
    last = trainer.last_checkpoint if trainer is not None else str(tag) if tag is not None else None
    logger.warning("%s: no step was trained; run the same command to continue", message)
    if dist.is_main:
        status = trainer.status if trainer is not None else StatusFile(cfg.run_dir / "status.json")
        status.update(state=state, step=step, exit_code=EXIT_PREEMPTED, message=message, last_checkpoint=last,
                      max_steps=cfg.trainer.max_steps, world_size=dist.world_size)  # fmt: skip
    return TrainResult(EXIT_PREEMPTED, state, step, {}, last, message)
