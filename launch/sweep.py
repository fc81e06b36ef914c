"""``pretrain sweep SWEEP.yaml``: hyperparameter sweeps with Ray Tune, one training run per trial.

This module is the driver: it builds the Ray Tune search space, scheduler (ASHA, PBT, FIFO) and trainable from a
validated :class:`launch.sweep_spec.SweepSpec`, runs or restores the Tuner, and hands the results to
:func:`launch.sweep_summary.summarize_sweep`. The sweep YAML, its schema and the checks of every trial config before
anything starts are in :mod:`launch.sweep_spec`; the ranked table, plot and best config in :mod:`launch.sweep_summary`.

Sweep directory, ``<output_dir>/<name>/`` (default ``runs/sweeps/<name>/``)::

    sweep.yaml            # the resolved sweep spec (what --resume runs again)
    tune/                 # Ray Tune experiment (storage_path): state for Tuner.restore, kept checkpoints per trial
    trials/<trial_id>/    # one run dir per trial (config.yaml, metrics.jsonl, tb/, checkpoints/, status.json, sweep/)
    tb/<trial_id>         # symlinks to every trial's TensorBoard logs: tensorboard --logdir <sweep>/tb
    summary.txt           # the ranked table printed at the end; summary.json has the same as data
    metric_vs_step.png    # eval metric against optimizer step, one line per trial
    best_config.yaml      # the best trial's resolved config, ready for `pretrain train`

Trials run :func:`launch.sweep_trial.run_trial`; see that module for processes, checkpoints and resume.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import re
import sys
import time
from pathlib import Path
from typing import Any

import yaml

from launch.cmd_train import resolve_data
from launch.sweep_spec import (
    SweepSpec,
    evals_per_trial,
    load_sweep,
    spec_from_yaml,
    trial_fixed_overrides,
    validate_trial_configs,
)
from launch.sweep_summary import TrialRecord, summarize_sweep
from launch.sweep_trial import TrialSpec
from pretrain.config import Config, ConfigError

__all__ = ["cmd_sweep", "main", "register", "restage_lost_checkpoints", "run_sweep"]

logger = logging.getLogger(__name__)

_PBT_MIN_KEEP = 4
"""Fewest checkpoints Ray Tune keeps per trial under PBT (see :func:`_num_to_keep`)."""


# ------------------------------------------------------------------------------------------------------ the driver


def _build_scheduler(spec: SweepSpec, cfg: Config) -> Any:
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler, PopulationBasedTraining  # noqa: PLC0415

    k = spec.scheduler.knobs
    if spec.scheduler.name == "asha":
        max_t = k["max_t"] or evals_per_trial(spec, cfg)
        return ASHAScheduler(
            time_attr="training_iteration",
            max_t=max(max_t, k["grace_period"]),
            grace_period=k["grace_period"],
            reduction_factor=k["reduction_factor"],
            brackets=k["brackets"],
        )
    if spec.scheduler.name == "pbt":
        return PopulationBasedTraining(
            time_attr="training_iteration",
            perturbation_interval=k["perturbation_interval"],
            burn_in_period=k["burn_in_period"],
            hyperparam_mutations={p: d.to_tune(for_mutation=True) for p, d in k["hyperparam_mutations"].items()},
            quantile_fraction=k["quantile_fraction"],
            resample_probability=k["resample_probability"],
            perturbation_factors=tuple(k["perturbation_factors"]),
            synch=k["synch"],
        )
    return FIFOScheduler()


def _num_to_keep(spec: SweepSpec) -> int:
    """Checkpoints Ray Tune keeps per trial. PBT clones a donor's checkpoint a moment after choosing it, while the donor
    keeps reporting: with fewer than 4 kept, the chosen one may already be deleted (Ray Tune warns about <= 2)."""
    if spec.scheduler.name == "pbt" and spec.keep_checkpoints < _PBT_MIN_KEEP:
        logger.info("PBT: keeping %d checkpoints per trial instead of %d", _PBT_MIN_KEEP, spec.keep_checkpoints)
        return _PBT_MIN_KEEP
    return spec.keep_checkpoints


def _param_space(spec: SweepSpec) -> dict[str, Any]:
    space = {k: d.to_tune() for k, d in spec.space.items()}
    if spec.scheduler.name == "pbt":  # PBT mutates values the trials started with: sample missing ones alike
        for k, d in spec.scheduler.knobs["hyperparam_mutations"].items():
            space.setdefault(k, d.to_tune())
    return space


def _trial_spec(spec: SweepSpec, cfg: Config) -> TrialSpec:
    sweep_dir = spec.sweep_dir.resolve()
    return TrialSpec(
        base=spec.base,
        overrides=trial_fixed_overrides(spec),
        trials_dir=str(sweep_dir / "trials"),
        metric=spec.metric,
        max_steps=cfg.trainer.max_steps,
        nproc=spec.resources["nproc"],
        backend=spec.trial_backend,
        slurm=dict(spec.slurm),
        always_checkpoint=spec.scheduler.name == "pbt",
        stop_grace_s=spec.stop_grace_s,
        workdir=spec.workdir or str(Path.cwd()),
        cpus=max(1, int(spec.resources["cpu"])),
    )


def _trainable(spec: SweepSpec, cfg: Config) -> Any:
    from ray import tune  # noqa: PLC0415

    from launch.sweep_trial import run_trial  # noqa: PLC0415

    if spec.trial_backend == "slurm":
        # The trial only watches its Slurm job from the driver's machine: a small CPU share, concurrency from the
        # sweep's max_concurrent (the cluster queues the rest).
        resources: dict[str, float] = {"cpu": 0.1}
    else:
        resources = {"cpu": spec.resources["cpu"], "gpu": spec.resources["gpu"]}
    return tune.with_resources(tune.with_parameters(run_trial, spec=_trial_spec(spec, cfg)), resources)


def _init_ray() -> None:
    import ray  # noqa: PLC0415

    if ray.is_initialized():
        return
    address = os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, log_to_driver=True)
    else:
        ray.init(include_dashboard=False, log_to_driver=True)


def run_sweep(spec: SweepSpec, resume: bool = False) -> tuple[list[TrialRecord], Path]:
    """Run (or continue, with ``resume``) the sweep, then write its summary.

    Returns:
        The ranked trial records and the sweep dir.

    Raises:
        ConfigError: the spec or a trial config is invalid, or the sweep exists and ``resume`` is not set.
    """
    sweep_dir = spec.sweep_dir.resolve()
    spec = dataclasses.replace(spec, output_dir=str(sweep_dir.parent))  # trials and resume must not depend on cwd
    exp_dir = sweep_dir / "tune"
    saved = sweep_dir / "sweep.yaml"
    if resume and saved.is_file():
        stored = yaml.safe_load(saved.read_text())
        if stored != json.loads(json.dumps(spec.to_yaml())):
            logger.warning("the sweep YAML changed since %s was written; continuing with the stored spec", saved)
        spec = dataclasses.replace(spec_from_yaml(stored), output_dir=str(sweep_dir.parent), name=sweep_dir.name)
    cfg = validate_trial_configs(spec)
    resolve_data(cfg)  # the data set must be where every trial will look, checked as `pretrain train` checks it

    from ray import tune  # noqa: PLC0415
    from ray.tune.search import BasicVariantGenerator  # noqa: PLC0415

    can_restore = exp_dir.is_dir() and tune.Tuner.can_restore(str(exp_dir))
    if can_restore and not resume:
        raise ConfigError(
            f"sweep '{spec.name}' already exists at {sweep_dir}; pass --resume to continue it, "
            "or --name to start another"
        )
    if resume and not can_restore:
        logger.warning("nothing to resume at %s: starting the sweep", exp_dir)
    sweep_dir.mkdir(parents=True, exist_ok=True)
    if not can_restore:
        saved.write_text(yaml.safe_dump(json.loads(json.dumps(spec.to_yaml())), sort_keys=False))

    _init_ray()
    trainable = _trainable(spec, cfg)
    t0 = time.monotonic()
    if can_restore:
        logger.info("resuming sweep %s from %s", spec.name, exp_dir)
        tuner = tune.Tuner.restore(str(exp_dir), trainable=trainable, resume_errored=True)
    else:
        logger.info("starting sweep %s in %s", spec.name, sweep_dir)
        tuner = tune.Tuner(
            trainable,
            param_space=_param_space(spec),
            tune_config=tune.TuneConfig(
                metric=spec.metric,
                mode=spec.mode,
                scheduler=_build_scheduler(spec, cfg),
                # the variant generator itself limits concurrency (Tune ignores max_concurrent_trials with it)
                search_alg=BasicVariantGenerator(random_state=spec.seed, max_concurrent=spec.max_concurrent),
                num_samples=spec.num_samples,
                reuse_actors=False,
            ),
            run_config=tune.RunConfig(
                name=exp_dir.name,
                storage_path=str(sweep_dir),
                checkpoint_config=tune.CheckpointConfig(
                    num_to_keep=_num_to_keep(spec),
                    checkpoint_score_attribute=spec.metric,
                    checkpoint_score_order=spec.mode,
                ),
                failure_config=tune.FailureConfig(max_failures=spec.max_failures),
                verbose=1,
            ),
        )
    results = tuner.fit()
    if can_restore and restage_lost_checkpoints(results, sweep_dir / "trials"):
        logger.warning(
            "Ray Tune's saved state named checkpoints its retention had already deleted (the driver died between the "
            "deletion and the next state save); restaged those trials' newest checkpoints there, resuming them again"
        )
        tuner = tune.Tuner.restore(str(exp_dir), trainable=trainable, resume_errored=True)
        results = tuner.fit()
    logger.info("sweep %s: Ray Tune finished in %.0f s", spec.name, time.monotonic() - t0)
    ray_trials = _ray_trials(results)
    records = summarize_sweep(spec, ray_trials=ray_trials)
    return records, sweep_dir


def _trial_id(result: Any) -> str | None:
    """The trial id of a Ray Tune ``Result``: its own folder names it (its last metrics may be a PBT donor's)."""
    m = re.search(r"_([0-9a-f]{5}_\d{5})_", os.path.basename(result.path)) if result.path else None
    return m.group(1) if m else (result.metrics or {}).get("trial_id")


def _ray_trials(results: Any) -> dict[str, dict[str, Any]]:
    """trial_id -> {config, error} from a Ray Tune ResultGrid."""
    out = {}
    for r in results:
        if trial_id := _trial_id(r):
            out[trial_id] = {"config": dict(r.config or {}), "error": str(r.error) if r.error else ""}
    return out


_LOST_CHECKPOINT = re.compile(r"does not exist on storage anymore.*?path: (\S*checkpoint_\d+)", re.S)


def restage_lost_checkpoints(results: Any, trials_dir: Path) -> list[str]:
    """Put back the checkpoints that resumed trials failed to restore because Ray Tune had deleted them.

    Ray Tune deletes a checkpoint beyond ``num_to_keep`` as soon as a newer one comes, but saves its experiment state
    (which names each trial's checkpoint) only every few seconds: a driver killed in between leaves a state naming
    deleted checkpoints, and restoring those trials fails. The trial's own run dir still holds its newest complete
    checkpoint; it is staged at the path Ray Tune names, and the resumed trial continues from its run dir as usual.

    Returns:
        The ids of the trials whose checkpoint was put back (those can be resumed again).
    """
    from launch.sweep_trial import newest_checkpoint, stage_checkpoint  # noqa: PLC0415

    restaged = []
    for r in results:
        m = _LOST_CHECKPOINT.search(str(r.error or ""))
        trial_id = _trial_id(r)
        if m is None or trial_id is None:
            continue
        run_dir = trials_dir / trial_id
        ckpt = newest_checkpoint(run_dir)
        if ckpt is None:
            continue
        if stage_checkpoint(ckpt, Path(m.group(1)), {"trial_id": trial_id, "run_dir": str(run_dir)}) is not None:
            logger.warning("trial %s: Ray Tune lost %s; restaged %s there", trial_id, m.group(1), ckpt.path)
            restaged.append(trial_id)
    return restaged


# --------------------------------------------------------------------------------------------------------- the CLI


def cmd_sweep(args: argparse.Namespace) -> int:
    """``pretrain sweep``: exit 0 when at least one trial produced the metric, 1 otherwise, 2 on a config error."""
    spec = load_sweep(
        args.sweep_config,
        name=args.name,
        output_dir=args.output_dir,
        max_concurrent=args.max_concurrent,
        trial_backend=args.trial_backend,
        num_samples=args.num_samples,
        extra_overrides=list(getattr(args, "overrides", []) or []),
    )
    if args.dry_run:
        cfg = validate_trial_configs(spec)
        resolve_data(cfg)
        print(yaml.safe_dump(json.loads(json.dumps(spec.to_yaml())), sort_keys=False))
        print(f"trial configs valid; {evals_per_trial(spec, cfg)} eval events per trial; sweep dir {spec.sweep_dir}")
        return 0
    records, _ = run_sweep(spec, resume=args.resume)
    errors = [r for r in records if r.status == "error"]
    if errors:
        logger.warning("%d trial(s) failed: %s", len(errors), ", ".join(r.trial_id for r in errors))
    return 0 if any(r.best is not None and r.status != "error" for r in records) else 1


def register(subparsers: Any) -> None:
    """Add ``pretrain sweep`` to the ``pretrain`` parser."""
    p = subparsers.add_parser(
        "sweep",
        help="hyperparameter sweep with Ray Tune (ASHA, PBT), one training run per trial",
        description="Run a Ray Tune sweep described by SWEEP.yaml (see configs/sweep/). Extra section.field=value "
        "arguments are added to the overrides of every trial. The sweep dir is <output_dir>/<name>/.",
    )
    p.add_argument("sweep_config", metavar="SWEEP.yaml")
    p.add_argument("--resume", action="store_true", help="continue the sweep of that name (finished trials are kept)")
    p.add_argument("--max-concurrent", type=int, default=None, help="trials running at once (0: as resources allow)")
    p.add_argument("--trial-backend", choices=["local", "slurm"], default=None, help="where trials run")
    p.add_argument("--name", default=None, help="sweep name (default: the YAML's name or file name)")
    p.add_argument("--output-dir", default=None, help="parent of the sweep dir (default runs/sweeps)")
    p.add_argument("--num-samples", type=int, default=None, help="override num_samples")
    p.add_argument("--dry-run", action="store_true", help="validate the sweep and every trial config, print the plan")
    p.set_defaults(func=cmd_sweep, accepts_overrides=True)


def main(argv: list[str] | None = None) -> int:
    """``pretrain sweep ...`` as a function (tests run it in-process)."""
    from launch.cli import main as cli_main  # noqa: PLC0415

    return cli_main(["sweep", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    sys.exit(main())
