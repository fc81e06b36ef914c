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
import json
import logging
import os
import sys
from typing import Any

from data_pipeline.config import ConfigError
from launch.local_ranks import run_train_ranks
from launch.train_lease import hold_run_dir, lease_lost, record_stop_before_start, take_joined_lease
from pretrain.config import Config, load_config
from pretrain.distributed import detect_environment
from pretrain.lease import LeaseHeld, watch_lease
from pretrain.lifecycle import LAUNCHER_PID_ENV, LEASE_TOKEN_ENV, StopSignals
from pretrain.plan import LaunchPlan, check_output_dir, validate_launch
from pretrain.rundir import EXIT_FAILED, EXIT_OK, EXIT_PREEMPTED, EXIT_USAGE, STATUS, set_aside_history

__all__ = [
    "EXIT_FAILED",
    "EXIT_OK",
    "EXIT_PREEMPTED",
    "EXIT_USAGE",
    "main",
    "register",
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
    check_output_dir(cfg)  # the lease is a file in it
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
    from pretrain.rank import run_training

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
