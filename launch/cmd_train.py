"""``pretrain train CONFIG [section.field=value ...] [--nproc N] [--resume PATH] [--no-resume]``.

Everything that can be checked is checked here, in the launching process, before a rank is spawned or a file is
written: the config (types, cross-field rules, global batch vs world size), the data manifest, the model (built on
the meta device), and the checkpoint to resume (complete, intact, same model shape and world size). Any of these
failing exits with code 2 and leaves no run directory behind.

The run's lease (:mod:`pretrain.rundir`) is taken first, before anything slow: a second run on a held directory is
told at once who holds it. Ranks:
- ``--nproc 1`` (default, no launcher variables): trains in this process, which holds the lease.
- ``--nproc N>1``: this process holds the lease and starts N local ranks (:mod:`launch.local_ranks`), which die with
  it; if one rank dies it kills the others and exits non-zero naming it.
- Under Slurm (``srun``), torchrun or the DeepSpeed launcher (no ``--nproc``): joins the environment it finds; rank 0
  takes the lease for every rank of every node once the process group exists.
Every process watches the lease and stops at once, writing nothing more, if it is gone or names another run.

Stopping (:mod:`pretrain.lifecycle`): SIGINT (Ctrl-C, ``pretrain cancel``) or SIGTERM/SIGUSR2, at any moment from the
start, stops the run: no training step after it, a checkpoint if it trained, state ``stopped`` or ``preempted``,
exit 3; run the same command to continue. A second Ctrl-C kills the ranks.

Resume: by default the run continues from the newest complete checkpoint in ``runs/<name>/checkpoints`` (a torn newest
one is skipped with a warning). ``--resume PATH`` starts from the given tag directory instead. ``--no-resume``
guarantees a fresh start: it refuses (exit 2) when the run directory already holds a complete checkpoint, and says how
to continue or start over, rather than silently moving or deleting anything. A checkpoint is loaded only when its
COMPLETE marker is signed with the user's key (:mod:`pretrain.trust`), or with ``--trust-checkpoint``.

Exit codes: 0 finished, 1 failure (a rank died, non-finite losses, ...), 2 usage/config error or a held run directory,
3 stopped or preempted (run the same command to resume).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any

from launch.local_ranks import run_train_ranks
from launch.train_lease import hold_run_dir, lease_lost, record_stop_before_start, refuse_if_held, take_joined_lease
from pretrain.config import Config, ConfigError, load_config, model_shape_digest
from pretrain.distributed import detect_environment
from pretrain.lifecycle import LAUNCHER_PID_ENV, LEASE_TOKEN_ENV, StopSignals
from pretrain.rundir import (
    CHECKPOINTS,
    EXIT_FAILED,
    EXIT_OK,
    EXIT_PREEMPTED,
    EXIT_USAGE,
    PREVIOUS,
    STATUS,
    LeaseHeld,
    run_history,
    set_aside_history,
    watch_lease,
)

__all__ = [
    "EXIT_FAILED",
    "EXIT_OK",
    "EXIT_PREEMPTED",
    "EXIT_USAGE",
    "LaunchPlan",
    "main",
    "register",
    "resolve_data",
    "validate_launch",
]

logger = logging.getLogger(__name__)


def register(subparsers: Any) -> None:
    """Add the ``train`` subcommand."""
    p = subparsers.add_parser(
        "train",
        help="train a model (DeepSpeed ZeRO; resumes automatically)",
        description=__doc__.split("\n\n")[0],
    )
    _add_arguments(p)
    p.set_defaults(func=_run, accepts_overrides=True)


def _add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("config", help="run config YAML, e.g. configs/run/digits_sepvit_lite.yaml")
    p.add_argument("overrides", nargs="*", default=[], help="section.field=value overrides")
    p.add_argument("--nproc", type=int, default=None, help="local ranks to start (default 1, or join the launcher's)")
    p.add_argument("--resume", default=None, metavar="PATH", help="checkpoint tag dir to resume from")
    p.add_argument("--no-resume", action="store_true", help="start fresh; refuse if the run has checkpoints")
    p.add_argument(
        "--restart",
        action="store_true",
        help="start again from step 0 although the run dir has history (moved to RUN_DIR/previous/<time>/, kept)",
    )
    p.add_argument(
        "--trust-checkpoint",
        action="store_true",
        help="load a checkpoint (--resume, the run dir's own, model.init_from) not signed by your key, as plain data",
    )


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
    try:
        env = detect_environment()
    except ValueError as e:
        raise ConfigError(f"launcher environment: {e}") from e
    if nproc is not None and nproc < 1:
        raise ConfigError(f"--nproc={nproc} must be >= 1")
    if nproc is not None and nproc > 1 and env.source != "single":
        raise ConfigError(f"--nproc={nproc} inside a {env.source} launch (RANK/SLURM_PROCID set): drop --nproc")
    world = nproc if nproc is not None and env.source == "single" else env.world_size
    if sum(map(bool, (resume, no_resume, restart))) > 1:
        raise ConfigError("--resume, --no-resume and --restart exclude each other")

    from pretrain.engine import build_ds_config

    cfg = resolve_data(cfg)
    build_ds_config(cfg, world)  # batch arithmetic, ZeRO/offload/EMA combinations
    n_params = _check_model(cfg)
    if cfg.trainer.precision == "fp16" or cfg.trainer.device == "cuda":  # bf16 trains on CPU too (DeepSpeed bf16)
        import torch

        if not torch.cuda.is_available() and cfg.trainer.device == "cuda":
            raise ConfigError("trainer.device=cuda but no GPU is visible here; use trainer.device=auto or cpu")
        if not torch.cuda.is_available():
            raise ConfigError(
                "trainer.precision=fp16 needs a GPU (DeepSpeed's loss-scaled fp16 has no CPU kernels); on CPU use "
                "trainer.precision=bf16 (bf16 weights, fp32 master weights) or fp32"
            )
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
    spawn = world if (env.source == "single" and world > 1) else 0
    return LaunchPlan(
        cfg, world, spawn, resume_from, finished, env.rank, explicit=bool(resume), restart=restart,
        trusted=trust_checkpoint,
    )  # fmt: skip


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
    import torch

    from pretrain.models import create_model

    try:
        with torch.device("meta"):
            model = create_model(
                cfg.model.name,
                num_classes=cfg.model.num_classes,
                img_size=cfg.model.img_size,
                drop_path_rate=cfg.model.drop_path_rate,
                drop_rate=cfg.model.drop_rate,
                **cfg.model.kwargs,
            )
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
        check_pretrained(m.init_from, m.name, trusted, num_classes=m.num_classes, img_size=m.img_size,
                         drop_path_rate=m.drop_path_rate, drop_rate=m.drop_rate, **m.kwargs)  # fmt: skip
    except (ExportError, UntrustedCheckpoint) as e:
        raise ConfigError(f"model.init_from={m.init_from}: {e}") from None


def _check_output_dir(cfg: Config) -> Path:
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
    existing = _check_output_dir(cfg)
    from pretrain.checkpoint import checkpoint_dir_bytes, estimate_checkpoint_bytes

    need = checkpoint_dir_bytes(newest) if newest is not None else estimate_checkpoint_bytes(n_params)
    free = shutil.disk_usage(existing).free
    if need and free < need:
        mb = 1 << 20
        raise ConfigError(
            f"not enough space for a checkpoint in {existing}: need ~{need / mb:.0f} MB, {free / mb:.0f} MB free; "
            "free some space or set run.output_dir to another file system"
        )


# ------------------------------------------------------------------------------------------------------------- run


def _run(args: argparse.Namespace) -> int:
    stop = StopSignals.current()  # installed first thing by `pretrain` (launch.cli.entry); in-process callers: here
    installed = stop is None
    stop = stop or StopSignals().install()
    try:
        cfg = load_config(args.config, list(args.overrides))
        if LAUNCHER_PID_ENV in os.environ:  # a rank of the --nproc launcher: it runs under the launcher's lease
            return _run_rank(args, cfg)
        try:
            source = detect_environment().source
        except ValueError as e:
            raise ConfigError(f"launcher environment: {e}") from e
        if source == "single":  # the --nproc launcher, or a run of one process: it holds the lease itself
            return _run_holder(args, cfg, stop)
        return _run_joined(args, cfg)
    finally:
        if installed:
            stop.restore()


def _plan(args: argparse.Namespace, cfg: Config) -> LaunchPlan:
    return validate_launch(
        args.config,
        list(args.overrides),
        args.nproc,
        args.resume,
        args.no_resume,
        restart=args.restart,
        trust_checkpoint=args.trust_checkpoint,
        cfg=cfg,
    )


def _run_holder(args: argparse.Namespace, cfg: Config, stop: StopSignals) -> int:
    """The launcher (or a one-process run): the lease first, before anything slow; then checks, then the ranks."""
    _check_output_dir(cfg)  # the lease is a file in it
    try:
        with hold_run_dir(cfg.run_dir) as lease:
            plan = _plan(args, cfg)
    except LeaseHeld as e:
        print(f"pretrain train: {e}", file=sys.stderr)
        return EXIT_USAGE
    with lease:
        if plan.finished:
            logger.info("run %s already finished (checkpoint %s); not training again", cfg.run_dir, plan.resume_from)
            code = EXIT_OK
        elif stop.received is not None:
            code = record_stop_before_start(
                plan.cfg.run_dir, stop.received, plan.resume_from, plan.cfg.trainer.max_steps, plan.world_size
            )
        elif plan.spawn:
            _set_aside(plan)
            code = run_train_ranks(_child_argv(args), plan.spawn, lease, stop)
        else:
            _set_aside(plan)
            watching = watch_lease(cfg.run_dir, lease.info.token, lease_lost)
            try:
                code = _train_here(plan, joined=False)
            finally:
                watching.set()
    if code != EXIT_USAGE:
        _print_summary(plan.cfg, code)
    return code


def _run_rank(args: argparse.Namespace, cfg: Config) -> int:
    watching = watch_lease(cfg.run_dir, os.environ.get(LEASE_TOKEN_ENV, ""), lease_lost)
    try:
        return _train_here(_plan(args, cfg), joined=False)
    finally:
        watching.set()


def _run_joined(args: argparse.Namespace, cfg: Config) -> int:
    """A rank of a Slurm step or torchrun: rank 0 takes the lease once the process group exists."""
    try:
        plan = _plan(args, cfg)
    except LeaseHeld as e:
        print(f"pretrain train: {e}", file=sys.stderr)
        return EXIT_USAGE
    if plan.finished:
        logger.info("run %s already finished (checkpoint %s); not training again", cfg.run_dir, plan.resume_from)
        code = EXIT_OK
    else:
        code = _train_here(plan, joined=True)
    if plan.rank == 0 and code != EXIT_USAGE:
        _print_summary(plan.cfg, code)
    return code


def _train_here(plan: LaunchPlan, joined: bool) -> int:
    """Train this rank. ``joined``: a Slurm/torchrun rank, whose rank 0 takes the lease here for all of them."""
    from pretrain.checkpoint import CheckpointSaveError, RunDirRefused
    from pretrain.distributed import barrier, destroy_distributed, init_distributed
    from pretrain.logging_utils import init_logging
    from pretrain.trainer import run_training

    init_logging(plan.cfg.logging.level)
    import torch

    if plan.cfg.trainer.device == "cpu" or not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")  # read when deepspeed is imported: skip GPU probing
    dist = init_distributed(device=plan.cfg.trainer.device, loader_workers=plan.cfg.data.num_workers)
    lease, watching = None, None
    if joined:
        lease, token, refused = take_joined_lease(plan.cfg.run_dir, dist)
        if refused:
            destroy_distributed()
            if dist.rank == 0:
                print(f"pretrain train: {refused}", file=sys.stderr)
            return EXIT_USAGE
        watching = watch_lease(plan.cfg.run_dir, token, lease_lost)
        if lease is not None:
            _set_aside(plan)
    try:
        result = run_training(plan.cfg, dist, plan.resume_from if plan.explicit else None, trusted=plan.trusted)
        code = result.exit_code
    except (CheckpointSaveError, RunDirRefused) as e:
        # every rank raised the same error together (no peer waits in a collective): the reason, not a traceback
        if dist.rank == 0:
            print(f"pretrain train: {e}", file=sys.stderr)
        code = EXIT_USAGE if isinstance(e, RunDirRefused) else EXIT_FAILED
    except BaseException:
        if dist.world_size > 1:
            # A rank that failed while its peers wait in a collective must not try a collective teardown (it can
            # block forever, and then the launcher never sees this rank exit): report and leave at once, so the
            # launcher (or Slurm) stops the others.
            import traceback

            traceback.print_exc()
            sys.stderr.flush()
            sys.stdout.flush()
            if lease is not None:
                lease.release()
            os._exit(EXIT_FAILED)
        if lease is not None:
            lease.release()
        destroy_distributed()
        raise
    if watching is not None:
        watching.set()
        barrier()  # every rank stopped watching before rank 0 lets go of the lease
    if lease is not None:
        lease.release()
    destroy_distributed()
    return code


def _set_aside(plan: LaunchPlan) -> None:
    """``--restart``, by the lease holder: the run dir's history moves to ``previous/<time>/`` (nothing deleted)."""
    if plan.restart:
        moved = set_aside_history(plan.cfg.run_dir)
        if moved is not None:
            logger.warning("--restart: moved the earlier history of %s to %s", plan.cfg.run_dir, moved)


def _child_argv(args: argparse.Namespace) -> list[str]:
    argv = [sys.executable, "-m", "launch.cli", "train", args.config, *args.overrides]
    if args.resume:
        argv += ["--resume", args.resume]
    if args.trust_checkpoint:
        argv.append("--trust-checkpoint")
    if args.no_resume:
        argv.append("--no-resume")
    return argv


def _print_summary(cfg: Config, code: int) -> None:
    """Final result for the user (stdout): state, step, val top-1, where checkpoints and TensorBoard logs are."""
    try:
        status = json.loads((cfg.run_dir / STATUS).read_text())
    except (OSError, ValueError):
        return
    ev = status.get("last_eval") or {}
    parts = [f"state={status.get('state')}", f"step={status.get('step')}/{status.get('max_steps')}"]
    if "val_top1" in ev:
        parts.append(f"val_top1={ev['val_top1']:.4f} (step {ev.get('step')})")
    if "val_top1_ema" in ev:
        parts.append(f"val_top1_ema={ev['val_top1_ema']:.4f}")
    print(f"pretrain train: {' '.join(parts)}")
    if status.get("last_checkpoint"):
        print(f"  checkpoint:  {status['last_checkpoint']}")
    if (cfg.run_dir / "metrics.jsonl").exists():  # not before the first step
        print(f"  metrics:     {cfg.run_dir / 'metrics.jsonl'}")
        print(f"  tensorboard: tensorboard --logdir {cfg.run_dir / 'tb'}")
    if code == EXIT_PREEMPTED:
        print(f"  {status.get('message') or 'stopped'}: run the same command again to resume")
    elif status.get("message") and code != EXIT_OK:
        print(f"  message: {status['message']}")
    sys.stdout.flush()


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``python -m launch.cmd_train`` (same as ``pretrain train``)."""
    from launch.cli import main as cli_main

    return cli_main(["train", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    sys.exit(main())
