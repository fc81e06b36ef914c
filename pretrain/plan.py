"""Everything a command can check before a rank starts or a file is written.

:func:`validate_launch`, the same for ``pretrain train``, ``pretrain submit`` and the sweep: the config (types,
cross-field rules, global batch vs world size), the data set (:func:`resolve_data`: its manifest, splits and classes),
the model (built on the meta device), the devices, ``model.init_from`` (its metadata and shapes), the checkpoint to
resume (complete, signed, same model shape, world and optimizer groups) or a history without one, the run directory (a
folder, writable) and room on disk for a checkpoint. :func:`plan_eval`, for ``pretrain eval``: its numbers, the
destination, the data set's split, the model's metadata (verified and signed) against the data set's classes. Both
settle the world the same way (``--nproc`` or the launcher's). Every failure is a
:class:`~data_pipeline.config.ConfigError` naming the field or file and the fix (exit 2), or
:class:`~pretrain.lease.LeaseHeld` when a live run owns the directory."""

from __future__ import annotations

import dataclasses
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

from data_pipeline.config import ConfigError
from pretrain.config import FP16_NEEDS_GPU, Config, load_config, model_shape_digest
from pretrain.distributed import DistEnv, detect_environment
from pretrain.fsutil import unwritable_reason
from pretrain.lease import lease_holder
from pretrain.lifecycle import LEASE_TOKEN_ENV
from pretrain.rundir import CHECKPOINTS, COMPLETE_MARKER, PREVIOUS, run_history

__all__ = [
    "EvalPlan",
    "LaunchPlan",
    "check_output_dir",
    "eval_output",
    "plan_eval",
    "refuse_if_held",
    "resolve_data",
    "validate_launch",
]

_MAX_EVAL_BATCH, _MAX_LOADER_WORKERS = 2**20, 512

logger = logging.getLogger(__name__)


@dataclasses.dataclass
class LaunchPlan:
    """What :func:`validate_launch` settled: the config, the world, and where to resume from."""

    cfg: Config
    world_size: int
    spawn: int
    """Ranks this process starts (0: train in this process)."""
    resume_from: Path | None
    finished: bool
    """The resume checkpoint already reached ``trainer.max_steps``: nothing to train."""
    rank: int = 0
    """Global rank of this process (0 when it launches the ranks itself)."""
    explicit: bool = False
    """``resume_from`` is the user's ``--resume`` (an error if unusable), not the run dir's own newest checkpoint."""
    restart: bool = False
    """``--restart``: the lease holder sets the run dir's history aside before training from step 0."""
    trusted: bool = False
    """``--trust-checkpoint``: the run may load checkpoints (and ``model.init_from``) not signed by this user."""


def validate_launch(
    config: str,
    overrides: list[str],
    nproc: int | None,
    resume: str | None,
    no_resume: bool,
    restart: bool = False,
    trust_checkpoint: bool = False,
    cfg: Config | None = None,
) -> LaunchPlan:
    """Load and check everything before any rank starts or any file is written.

    Args:
        config: Run config YAML.
        overrides: ``section.field=value`` overrides.
        nproc: ``--nproc`` (None: one rank, or the launcher's world when RANK/SLURM_PROCID are set).
        resume: ``--resume`` tag dir, if given.
        no_resume: ``--no-resume``.
        restart: ``--restart``: train from step 0, the history set aside (by the run, once it holds the lease).
        trust_checkpoint: ``--trust-checkpoint``: checkpoints not signed by this user's key may be loaded.
        cfg: ``config`` with ``overrides``, when the caller has loaded it already.

    Returns:
        The resolved config (``model.num_classes`` from the manifest), world size, ranks to spawn, resume point.

    Raises:
        ConfigError: With a message naming the field or file and the fix.
        LeaseHeld: The run directory belongs to a live run (checked before its history is judged).
    """
    cfg = cfg or load_config(config, overrides)
    env, world, spawn = _world(nproc)
    if sum(map(bool, (resume, no_resume, restart))) > 1:
        raise ConfigError("--resume, --no-resume and --restart exclude each other")

    from pretrain.engine import build_ds_config

    cfg = resolve_data(cfg)
    build_ds_config(cfg, world)  # batch arithmetic, ZeRO/offload/EMA combinations
    n_params = _check_model(cfg)
    if cfg.trainer.needs_gpu:
        import torch

        if not torch.cuda.is_available() and cfg.trainer.device == "cuda":
            raise ConfigError("trainer.device=cuda but no GPU is visible here; use trainer.device=auto or cpu")
        if not torch.cuda.is_available():
            raise ConfigError(FP16_NEEDS_GPU)
    resume_from = _resume_point(cfg, resume, no_resume, restart, trust_checkpoint, env.slurm_job_id)
    if resume_from is None and cfg.model.init_from and not Path(cfg.model.init_from).exists():
        # only a fresh start reads init_from: a run with its own checkpoint resumes from that
        raise ConfigError(
            f"model.init_from={cfg.model.init_from}: no such file or directory (an export from `pretrain export`, a "
            "checkpoint or a run directory)"
        )
    if resume_from is None and cfg.model.init_from:
        _check_init_from(cfg, trust_checkpoint)
    _check_disk(cfg, resume_from, n_params)
    finished = resume_from is not None and _check_resumable(cfg, resume_from, world) and not resume
    return LaunchPlan(
        cfg, world, spawn, resume_from, finished, env.rank, explicit=bool(resume), restart=restart,
        trusted=trust_checkpoint,
    )  # fmt: skip


def _world(nproc: int | None) -> tuple[DistEnv, int, int]:
    """The launcher environment, the world size and the ranks this process starts (0: it is a rank itself).

    Raises:
        ConfigError: The launcher variables are inconsistent, ``--nproc`` < 1, or ``--nproc`` > 1 inside a launch.
    """
    try:
        env = detect_environment()
    except ValueError as e:
        raise ConfigError(f"launcher environment: {e}") from e
    if nproc is not None and nproc < 1:
        raise ConfigError(f"--nproc={nproc} must be >= 1")
    if nproc is not None and nproc > 1 and env.source != "single":
        raise ConfigError(f"--nproc={nproc} inside a {env.source} launch (RANK/SLURM_PROCID set): drop --nproc")
    world = nproc if nproc is not None and env.source == "single" else env.world_size
    return env, world, world if (env.source == "single" and world > 1) else 0


def _resume_point(
    cfg: Config, resume: str | None, no_resume: bool, restart: bool, trust_checkpoint: bool, slurm_job_id: str | None
) -> Path | None:
    """The checkpoint to resume from (``--resume``, else the run dir's newest usable one), or None for a fresh start.

    Raises:
        ConfigError: ``--resume`` is unusable or untrusted, ``--no-resume`` meets checkpoints, or history has no usable
            checkpoint.
        LeaseHeld: That history belongs to a live run.
    """
    from pretrain import trust
    from pretrain.checkpoint import (
        UntrustedCheckpoint,
        check_signature,
        find_resume_checkpoint,
        list_checkpoints,
        untrusted_message,
        unusable_checkpoints,
        verify_checkpoint,
    )

    try:
        trust.load_key()  # the run signs its checkpoints: a key problem is found now, not at the first save
    except trust.TrustKeyError as e:
        raise ConfigError(str(e)) from None
    ckpt_root = cfg.run_dir / CHECKPOINTS
    if resume:
        ok, reason = verify_checkpoint(Path(resume), digests=False)  # the run checks the digests when it loads it
        if not ok:
            raise ConfigError(f"--resume {resume}: not a usable checkpoint ({reason})")
        if not trust_checkpoint and not (signed := check_signature(resume))[0]:
            raise ConfigError(f"--resume {resume}: {untrusted_message(resume, signed[1])}")
        return Path(resume)
    if restart:
        return None
    if no_resume:
        complete = [c for c in list_checkpoints(ckpt_root) if c.complete]
        if complete:
            raise ConfigError(
                f"--no-resume: {ckpt_root} already has {len(complete)} complete checkpoint(s) (newest "
                f"{complete[-1].tag}). Drop --no-resume to continue it, pick a new run.name=..., or move "
                f"{cfg.run_dir} away to start over"
            )
        return None
    try:  # the run checks the digests (and falls back); an unsigned newest checkpoint is refused here
        resume_from = find_resume_checkpoint(ckpt_root, digests=False, trusted=trust_checkpoint)
    except UntrustedCheckpoint as e:
        raise ConfigError(str(e)) from None
    history = run_history(cfg.run_dir)
    if resume_from is None and history:
        refuse_if_held(cfg.run_dir, slurm_job_id)  # a live run's own history, before its first checkpoint
        rejected = [f"{tag} ({why})" for tag, why in unusable_checkpoints(ckpt_root)]
        raise ConfigError(
            f"{cfg.run_dir} has the history of an earlier run ({'; '.join(history)}) but no usable checkpoint"
            + (f" (rejected: {'; '.join(rejected)})" if rejected else "")
            + ". Nothing was changed. To start again from step 0 pass --restart (the history is moved to "
            f"{cfg.run_dir / PREVIOUS}/<time>/, nothing is deleted), or pick another run.name=..."
        )
    return resume_from


def _check_resumable(cfg: Config, resume_from: Path, world: int) -> bool:
    """Check that ``resume_from`` fits this run (model shape, world, batch); True when it already reached max_steps."""
    from pretrain.checkpoint import CheckpointMismatchError, check_resume_compatible, read_meta

    meta = read_meta(resume_from)
    try:
        check_resume_compatible(
            meta, dataclasses.asdict(cfg.model), model_shape_digest(cfg), world, cfg.data.batch_size,
            cfg.optim.layer_decay,
        )  # fmt: skip
    except CheckpointMismatchError as e:
        raise ConfigError(f"{resume_from}: {e}") from e
    return int(meta.get("step", -1)) >= cfg.trainer.max_steps


def resolve_data(cfg: Config) -> Config:
    """``cfg`` with ``model.num_classes`` from the data set's manifest and the splits as the manifest names them.

    Raises:
        ConfigError: ``data.path`` holds no data set (naming the command that makes one), its manifest is unreadable,
            or ``data.train_split`` / ``data.val_split`` is not a split of it.
    """
    from data_pipeline.loader import check_data

    try:
        manifest, train_split, val_split = check_data(cfg.data)
    except (OSError, ValueError) as e:
        raise ConfigError(str(e)) from e
    data = dataclasses.replace(cfg.data, train_split=train_split, val_split=val_split)
    model = cfg.model
    if cfg.data.classes_from_manifest:
        model = dataclasses.replace(cfg.model, num_classes=len(manifest.classes))
    return dataclasses.replace(cfg, data=data, model=model)


def _check_model(cfg: Config) -> int:
    """Build the model on the meta device (no memory, no compute) so unknown names and kwargs fail here.

    Returns:
        The model's parameter count (0 when the meta-device build is not possible).
    """
    from pretrain.models import create_model
    from pretrain.models.registry import on_meta_device

    try:
        with on_meta_device():
            model = create_model(cfg.model.name, **cfg.model.build_kwargs())
    except (ValueError, TypeError) as e:
        raise ConfigError(f"model.{cfg.model.name}: {e}") from e
    except Exception as e:  # an op without a meta kernel: the ranks will find out for real
        logger.debug("meta-device model check skipped: %s", e)
        return 0
    return sum(p.numel() for p in model.parameters())


def _check_init_from(cfg: Config, trusted: bool) -> None:
    """``model.init_from`` must initialise this model: its metadata and (for an export) its tensor shapes, on the meta
    device, without reading the weights."""
    from pretrain.checkpoint import UntrustedCheckpoint
    from pretrain.export import ExportError, check_pretrained

    m = cfg.model
    try:
        check_pretrained(m.init_from, m.name, trusted, **m.build_kwargs())
    except (ExportError, UntrustedCheckpoint) as e:
        raise ConfigError(f"model.init_from={m.init_from}: {e}") from None


def check_output_dir(cfg: Config) -> Path:
    """The run directory's nearest existing folder, which must be a folder and writable (checked before the lease is
    taken in it).

    Raises:
        ConfigError: naming the file or folder in the way and the fix.
    """
    existing = cfg.run_dir
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise ConfigError(
            f"run.output_dir={cfg.run.output_dir}: {existing} is a file, not a folder; set run.output_dir to a folder"
        )
    for folder in (existing, cfg.run_dir / CHECKPOINTS):
        if not folder.is_dir():
            continue
        try:  # os.access says yes to root on a read-only mount's folders; a real write tells
            with tempfile.NamedTemporaryFile(dir=folder, prefix=".write-check-"):
                pass
        except OSError as e:
            raise ConfigError(
                f"{folder} is not writable ({e.strerror or e}): the run writes {cfg.run_dir}; fix its permissions or "
                "mount, or set run.output_dir to a writable folder"
            ) from e
    return existing


def _check_disk(cfg: Config, newest: Path | None, n_params: int) -> None:
    """The run directory must be writable and have room for at least one more checkpoint, before anything starts.

    Raises:
        ConfigError: naming the folder, what is needed and what is free.
    """
    existing = check_output_dir(cfg)
    from pretrain.checkpoint import checkpoint_dir_bytes, estimate_checkpoint_bytes

    need = checkpoint_dir_bytes(newest) if newest is not None else estimate_checkpoint_bytes(n_params)
    free = shutil.disk_usage(existing).free
    if need and free < need:
        mb = 1 << 20
        raise ConfigError(
            f"not enough space for a checkpoint in {existing}: need ~{need / mb:.0f} MB, {free / mb:.0f} MB free; "
            "free some space or set run.output_dir to another file system"
        )


def refuse_if_held(run_dir: Path, slurm_job_id: str | None) -> None:
    """Raise :class:`~pretrain.lease.LeaseHeld` when a live run other than this one holds ``run_dir``."""
    holder, _ = lease_holder(run_dir)
    ours = holder is not None and (holder.pid == os.getpid() or holder.token == os.environ.get(LEASE_TOKEN_ENV))
    if holder is not None and not ours and holder.dead_because(slurm_job_id) is None:
        raise holder.held(run_dir)


# ---------------------------------------------------------------------------------------------------- pretrain eval


@dataclasses.dataclass
class EvalPlan:
    """What :func:`plan_eval` settled: the model to score, where the result goes, and the world."""

    weights: Path
    """The export file or the verified checkpoint (a run directory's newest usable one) to read the weights from."""
    meta: dict[str, Any]
    """The model's metadata (:func:`pretrain.export.source_meta`): ``model_config``, ``augment``, ``step``, ..."""
    out: Path
    world_size: int
    spawn: int
    """Ranks this process starts (0: it scores its share itself)."""
    rank: int = 0


def eval_output(path: Path, tag_dir: Path | None, split: str, ema: bool) -> Path:
    """Where ``pretrain eval`` writes its result without ``--out``: ``<run dir>/eval/<tag>-<split>[-ema].json`` for a
    checkpoint inside its run directory, ``<FILE without .safetensors>.eval-<split>.json`` for an export
    (``tag_dir`` None), next to any other checkpoint."""
    if tag_dir is None:
        stem = path.name[: -len(".safetensors")] if path.name.endswith(".safetensors") else path.name
        return path.with_name(f"{stem}.eval-{split}.json")
    name = f"{tag_dir.name}-{split}{'-ema' if ema else ''}.json"
    if tag_dir.parent.name == CHECKPOINTS:
        return tag_dir.parent.parent / "eval" / name
    return tag_dir.parent / name


def plan_eval(
    path: str,
    data: str,
    split: str,
    batch_size: int,
    nproc: int | None,
    num_workers: int,
    ema: bool = False,
    out: str | None = None,
    trusted: bool = False,
) -> EvalPlan:
    """Check everything ``pretrain eval`` needs before a rank starts or a weight is read: the numbers, the world, the
    destination (a folder that can be written), the data set and its split, the model's metadata (a checkpoint
    verified and signed) and its head against the data set's classes.

    Raises:
        ConfigError: A bad argument, naming it and the fix (exit 2).
        UntrustedCheckpoint: The checkpoint is not signed by this user and not ``trusted`` (exit 2).
        ExportError: The model file is unusable, naming it and why (exit 1).
    """
    from data_pipeline.manifest import load_manifest, resolve_split
    from pretrain.export import source_meta

    source = Path(path)
    if not source.exists():
        raise ConfigError(f"{source} does not exist")
    if not 1 <= batch_size <= _MAX_EVAL_BATCH:
        raise ConfigError(f"--batch-size {batch_size} must be in [1, {_MAX_EVAL_BATCH}]")
    if not 0 <= num_workers <= _MAX_LOADER_WORKERS:
        raise ConfigError(f"--num-workers {num_workers} must be in [0, {_MAX_LOADER_WORKERS}]")
    env, world, spawn = _world(nproc)
    _check_eval_output(Path(out) if out else _planned_eval_output(source, split, ema))
    try:
        manifest = load_manifest(data)
    except (OSError, ValueError) as e:
        raise ConfigError(f"--data {data}: {e}") from e
    try:
        resolve_split(manifest, split)  # val and validation find each other
    except ValueError:
        raise ConfigError(
            f"--data {data} has no split {split!r} (splits: {', '.join(sorted(manifest.splits))})"
        ) from None
    # the ranks a launcher starts verify the sha256 before they read the weights: the launcher checks sizes only
    weights, meta = source_meta(source, ema=ema, trusted=trusted, digests=not spawn)
    outputs = meta["model_config"]["num_classes"]
    if outputs != manifest.num_classes:
        raise ConfigError(
            f"the model has {outputs} outputs but {data} has {manifest.num_classes} classes; score it on the data set "
            "it was trained or fine-tuned for"
        )
    tag_dir = None if source.is_file() else weights
    destination = Path(out) if out else eval_output(source, tag_dir, split, ema)
    return EvalPlan(weights, meta, destination, world, spawn, env.rank)


def _planned_eval_output(source: Path, split: str, ema: bool) -> Path:
    """The folder of the default destination, known before the checkpoint is resolved (a run directory's ``eval/``)."""
    if source.is_file():
        return eval_output(source, None, split, ema)
    if (source / COMPLETE_MARKER).exists() or source.parent.name == CHECKPOINTS:
        return eval_output(source, source, split, ema)
    return eval_output(source, source / CHECKPOINTS / "newest", split, ema)


def _check_eval_output(out: Path) -> None:
    problem = unwritable_reason(out)
    if problem:
        raise ConfigError(f"cannot write the result to {out}: {problem}; pass --out FILE.json in a writable folder")
