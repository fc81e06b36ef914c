"""``pretrain train CONFIG [section.field=value ...] [--nproc N] [--resume PATH] [--no-resume]``.

Everything that can be checked is checked here, in the launching process, before a rank is spawned or a file is
written: the config (types, cross-field rules, global batch vs world size), the data manifest, the model (built on
the meta device), and the checkpoint to resume (complete, intact, same model shape and world size). Any of these
failing exits with code 2 and leaves no run directory behind.

Ranks:
- ``--nproc 1`` (default, no launcher variables): trains in this process.
- ``--nproc N>1``: starts N local ranks (``RANK``/``WORLD_SIZE``/``LOCAL_RANK``/``MASTER_ADDR``/``MASTER_PORT`` on a
  free port), forwards SIGTERM/SIGUSR2 to them, and if one rank dies kills the others and exits non-zero naming it.
- Under Slurm (``srun``), torchrun or the DeepSpeed launcher (no ``--nproc``): joins the environment it finds.

Ctrl-C: the first one makes every rank checkpoint and exit 3 at the end of its step (run the same command to resume);
a second one kills the ranks.

Resume: by default the run continues from the newest complete checkpoint in ``runs/<name>/checkpoints`` (a torn newest
one is skipped with a warning). ``--resume PATH`` starts from the given tag directory instead. ``--no-resume``
guarantees a fresh start: it refuses (exit 2) when the run directory already holds a complete checkpoint, and says how
to continue or start over, rather than silently moving or deleting anything.

Exit codes: 0 finished, 1 failure (a rank died, non-finite losses, ...), 2 usage/config error, 3 preempted
(checkpoint written; run the same command to resume).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from pretrain.checkpoint import (
    CheckpointMismatchError,
    CheckpointSaveError,
    RunDirRefused,
    check_resume_compatible,
    checkpoint_dir_bytes,
    estimate_checkpoint_bytes,
    find_resume_checkpoint,
    is_trusted_checkpoint,
    list_checkpoints,
    read_meta,
    unusable_checkpoints,
    verify_checkpoint,
)
from pretrain.config import Config, ConfigError, load_config, model_shape_digest
from pretrain.distributed import cpu_allotment, detect_environment, find_free_port
from pretrain.rundir import (
    CHECKPOINTS,
    EXIT_FAILED,
    EXIT_OK,
    EXIT_PREEMPTED,
    EXIT_USAGE,
    PREVIOUS,
    STATUS,
    Lease,
    LeaseHeld,
    acquire_lease,
    run_history,
    set_aside_history,
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
    "start_local_ranks",
    "validate_launch",
    "watch_ranks",
]

logger = logging.getLogger(__name__)

_KILL_GRACE_S = 10.0
_LAUNCHED_BY = "PRETRAIN_LOCAL_LAUNCHER_PID"  # set in the environment of ranks started by --nproc


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
        help="allow --resume PATH outside this run's directory (DeepSpeed's files are pickles: trusted code only)",
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


def validate_launch(
    config: str,
    overrides: list[str],
    nproc: int | None,
    resume: str | None,
    no_resume: bool,
    restart: bool = False,
    trust_checkpoint: bool = False,
) -> LaunchPlan:
    """Load and check everything before any rank starts or any file is written.

    Args:
        config: Run config YAML.
        overrides: ``section.field=value`` overrides.
        nproc: ``--nproc`` (None: one rank, or the launcher's world when RANK/SLURM_PROCID are set).
        resume: ``--resume`` tag dir, if given.
        no_resume: ``--no-resume``.
        restart: ``--restart``: train from step 0, the history set aside (by the run, once it holds the lease).
        trust_checkpoint: ``--trust-checkpoint``: ``resume`` may lie outside the run directory.

    Returns:
        The resolved config (``model.num_classes`` from the manifest), world size, ranks to spawn, resume point.

    Raises:
        ConfigError: With a message naming the field or file and the fix.
    """
    cfg = load_config(config, overrides)
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

    ckpt_root = cfg.run_dir / CHECKPOINTS
    resume_from: Path | None = None
    if resume:
        resume_from = Path(resume)
        ok, reason = verify_checkpoint(resume_from, digests=False)  # the run checks the digests when it loads it
        if not ok:
            raise ConfigError(f"--resume {resume}: not a usable checkpoint ({reason})")
        if not trust_checkpoint and not is_trusted_checkpoint(resume_from, cfg.run_dir):
            raise ConfigError(
                f"--resume {resume} lies outside this run's directory {cfg.run_dir}: a checkpoint's DeepSpeed files "
                "are pickles, which can run code when loaded. Pass --trust-checkpoint if you trust where it came from "
                "(e.g. your own earlier run)"
            )
    elif restart:
        pass
    elif no_resume:
        complete = [c for c in list_checkpoints(ckpt_root) if c.complete]
        if complete:
            raise ConfigError(
                f"--no-resume: {ckpt_root} already has {len(complete)} complete checkpoint(s) (newest "
                f"{complete[-1].tag}). Drop --no-resume to continue it, pick a new run.name=..., or move "
                f"{cfg.run_dir} away to start over"
            )
    else:
        resume_from = find_resume_checkpoint(ckpt_root, digests=False)  # the run checks the digests (and falls back)
        history = run_history(cfg.run_dir)
        if resume_from is None and history:
            rejected = [f"{tag} ({why})" for tag, why in unusable_checkpoints(ckpt_root)]
            raise ConfigError(
                f"{cfg.run_dir} has the history of an earlier run ({'; '.join(history)}) but no usable checkpoint"
                + (f" (rejected: {'; '.join(rejected)})" if rejected else "")
                + ". Nothing was changed. To start again from step 0 pass --restart (the history is moved to "
                f"{cfg.run_dir / PREVIOUS}/<time>/, nothing is deleted), or pick another run.name=..."
            )
    if resume_from is None and cfg.model.init_from and not Path(cfg.model.init_from).exists():
        # only a fresh start reads init_from: a run with its own checkpoint resumes from that
        raise ConfigError(
            f"model.init_from={cfg.model.init_from}: no such file or directory (an export from `pretrain export`, a "
            "checkpoint or a run directory)"
        )
    _check_disk(cfg, resume_from, n_params)
    finished = False
    if resume_from is not None:
        meta = read_meta(resume_from)
        try:
            check_resume_compatible(
                meta,
                dataclasses.asdict(cfg.model),
                model_shape_digest(cfg),
                world,
                cfg.data.batch_size,
                cfg.optim.layer_decay,
            )
        except CheckpointMismatchError as e:
            raise ConfigError(f"{resume_from}: {e}") from e
        finished = int(meta.get("step", -1)) >= cfg.trainer.max_steps and not resume
    spawn = world if (env.source == "single" and world > 1) else 0
    return LaunchPlan(cfg, world, spawn, resume_from, finished, env.rank, explicit=bool(resume), restart=restart)


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


def _check_disk(cfg: Config, newest: Path | None, n_params: int) -> None:
    """The run directory must be writable and have room for at least one more checkpoint, before anything starts.

    Raises:
        ConfigError: naming the folder, what is needed and what is free.
    """
    existing = cfg.run_dir
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
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
    plan = validate_launch(
        args.config,
        list(args.overrides),
        args.nproc,
        args.resume,
        args.no_resume,
        restart=args.restart,
        trust_checkpoint=args.trust_checkpoint,
    )
    if plan.finished:
        logger.info("run %s already finished (checkpoint %s); not training again", plan.cfg.run_dir, plan.resume_from)
        code = EXIT_OK
    elif plan.spawn:
        # the launcher owns the run directory for the ranks' whole life (they share its lease: see _train_here)
        try:
            lease = _acquire(plan.cfg.run_dir, None)
        except LeaseHeld as e:
            print(f"pretrain train: {e}", file=sys.stderr)
            return EXIT_USAGE
        with lease:
            _set_aside(plan)
            code = _launch_local(plan.spawn, args)
    else:
        code = _train_here(plan)
    if plan.rank == 0 and _LAUNCHED_BY not in os.environ and code != EXIT_USAGE:  # with --nproc the launcher prints
        _print_summary(plan.cfg, code)
    return code


def _train_here(plan: LaunchPlan) -> int:
    from pretrain.distributed import destroy_distributed, init_distributed
    from pretrain.logging_utils import init_logging
    from pretrain.trainer import run_training

    init_logging(plan.cfg.logging.level)
    import torch

    if plan.cfg.trainer.device == "cpu" or not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")  # read when deepspeed is imported: skip GPU probing
    dist = init_distributed(device=plan.cfg.trainer.device, loader_workers=plan.cfg.data.num_workers)
    lease, refused = _take_lease(plan.cfg, dist)
    if refused:
        destroy_distributed()
        if dist.rank == 0:
            print(f"pretrain train: {refused}", file=sys.stderr)
        return EXIT_USAGE
    if lease is not None:
        _set_aside(plan)
    try:
        result = run_training(plan.cfg, dist, plan.resume_from if plan.explicit else None)
    except (CheckpointSaveError, RunDirRefused) as e:
        # every rank raised the same error together (no peer waits in a collective): the reason, not a traceback
        if dist.rank == 0:
            print(f"pretrain train: {e}", file=sys.stderr)
        destroy_distributed()
        return EXIT_USAGE if isinstance(e, RunDirRefused) else EXIT_FAILED
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
        destroy_distributed()
        raise
    finally:
        if lease is not None:
            lease.release()
    destroy_distributed()
    return result.exit_code


def _set_aside(plan: LaunchPlan) -> None:
    """``--restart``, by the lease holder: the run dir's history moves to ``previous/<time>/`` (nothing deleted)."""
    if plan.restart:
        moved = set_aside_history(plan.cfg.run_dir)
        if moved is not None:
            logger.warning("--restart: moved the earlier history of %s to %s", plan.cfg.run_dir, moved)


def _acquire(run_dir: Path, slurm_job_id: str | None) -> Lease:
    lease = acquire_lease(run_dir, slurm_job_id=slurm_job_id)
    if lease.took_over:
        logger.warning("took over the lease of %s: its holder is dead (%s)", run_dir, lease.took_over)
    return lease


def _take_lease(cfg: Config, dist: Any) -> tuple[Lease | None, str]:
    """Rank 0 takes the run directory's lease before anything is written; every rank learns whether it got it.

    Ranks started by ``--nproc`` run under their launcher's lease. Returns ``(lease, refusal)``: the lease this process
    holds (None on other ranks) and, when the directory belongs to a live run, the message naming it.
    """
    from pretrain.distributed import broadcast_object

    lease, refused = None, ""
    if dist.rank == 0 and _LAUNCHED_BY not in os.environ:
        try:
            lease = _acquire(cfg.run_dir, dist.slurm_job_id)
        except LeaseHeld as e:
            refused = str(e)
    return lease, str(broadcast_object(refused))


def _child_argv(args: argparse.Namespace) -> list[str]:
    argv = [sys.executable, "-m", "launch.cli", "train", args.config, *args.overrides]
    if args.resume:
        argv += ["--resume", args.resume]
    if args.trust_checkpoint:
        argv.append("--trust-checkpoint")
    if args.no_resume:
        argv.append("--no-resume")
    return argv


def start_local_ranks(argv: list[str], nproc: int, extra_env: dict[str, str] | None = None) -> list[subprocess.Popen]:
    """Start ``nproc`` local ranks of ``argv`` with a torchrun-style environment on a free port.

    The ranks share this process's CPUs (affinity, Slurm task, OMP_NUM_THREADS): each gets its part of them.
    """
    port = find_free_port()
    threads = max(1, cpu_allotment() // nproc)
    base_env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    procs = []
    for rank in range(nproc):
        env = dict(
            base_env,
            RANK=str(rank),
            WORLD_SIZE=str(nproc),
            LOCAL_RANK=str(rank),
            LOCAL_WORLD_SIZE=str(nproc),
            MASTER_ADDR="127.0.0.1",
            MASTER_PORT=str(port),
            OMP_NUM_THREADS=str(threads),
            **(extra_env or {}),
        )
        procs.append(subprocess.Popen(argv, env=env))
    logger.info("started %d ranks (pids %s), rendezvous 127.0.0.1:%d", nproc, [p.pid for p in procs], port)
    return procs


def _launch_local(nproc: int, args: argparse.Namespace) -> int:
    """Start ``nproc`` ranks of this command, forward SIGTERM/SIGUSR2, and fail fast if one rank dies."""
    procs = start_local_ranks(_child_argv(args), nproc, {_LAUNCHED_BY: str(os.getpid())})

    def forward(signum: int, frame: Any) -> None:
        logger.warning("forwarding %s to the ranks", signal.Signals(signum).name)
        for p in procs:
            if p.poll() is None:
                p.send_signal(signum)

    def interrupt(signum: int, frame: Any) -> None:
        # Ctrl-C reaches the ranks too (same process group): they checkpoint and exit; a second one kills them
        signal.signal(signal.SIGINT, signal.default_int_handler)
        logger.warning("interrupted: the ranks checkpoint and stop at the end of this step (Ctrl-C again to kill)")

    previous = {s: signal.signal(s, forward) for s in (signal.SIGTERM, signal.SIGUSR2)}
    previous[signal.SIGINT] = signal.signal(signal.SIGINT, interrupt)
    try:
        return watch_ranks(procs)
    except KeyboardInterrupt:
        _stop_all(procs)
        return 130
    finally:
        for s, h in previous.items():
            signal.signal(s, h)


def watch_ranks(
    procs: list[subprocess.Popen], command: str = "train", ok: tuple[int, ...] = (EXIT_OK, EXIT_PREEMPTED)
) -> int:
    """Wait for local ranks; when one exits with a code outside ``ok``, kill the others and return its code (1 for a
    signal). Otherwise the preempted code if any rank was preempted, else 0."""
    while True:
        codes = [p.poll() for p in procs]
        failed = [(r, c) for r, c in enumerate(codes) if c is not None and c not in ok]
        if failed:
            rank, code = failed[0]
            how = f"was killed by {signal.Signals(-code).name}" if code < 0 else f"exited with code {code}"
            others = [r for r, c in enumerate(codes) if c is None]
            logger.error("rank %d %s; stopping the other ranks %s", rank, how, others)
            print(f"pretrain {command}: rank {rank} {how}; stopped the other ranks", file=sys.stderr)
            _stop_all(procs)
            return code if code > 0 else EXIT_FAILED
        if all(c is not None for c in codes):
            return EXIT_PREEMPTED if EXIT_PREEMPTED in codes else EXIT_OK
        time.sleep(0.2)


def _stop_all(procs: list[subprocess.Popen]) -> None:
    for p in procs:
        if p.poll() is None:
            p.send_signal(signal.SIGKILL)
    deadline = time.monotonic() + _KILL_GRACE_S
    for p in procs:
        try:
            p.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            pass


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
    print(f"  metrics:     {cfg.run_dir / 'metrics.jsonl'}")
    print(f"  tensorboard: tensorboard --logdir {cfg.run_dir / 'tb'}")
    if code == EXIT_PREEMPTED:
        print("  preempted: run the same command again to resume")
    elif status.get("message") and code != EXIT_OK:
        print(f"  message: {status['message']}")
    sys.stdout.flush()


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``python -m launch.cmd_train`` (same as ``pretrain train``)."""
    from launch.cli import main as cli_main

    return cli_main(["train", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    sys.exit(main())
