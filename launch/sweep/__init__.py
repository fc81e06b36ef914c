"""``pretrain sweep SWEEP.yaml``: hyperparameter sweeps with Ray Tune, one ``pretrain train`` run per trial.

The driver builds Ray Tune's search space, scheduler (ASHA, PBT, FIFO) and trainable from a checked
:class:`launch.sweep.spec.SweepSpec`, runs or restores the Tuner, and hands the results to
:func:`launch.sweep.summary.summarize_sweep`. Ray Tune's own API carries the sweep: a function trainable
(:func:`launch.sweep.trial.run_trial`) blocks in ``tune.report`` with ``tune.Checkpoint.from_directory``;
``CheckpointConfig(num_to_keep)`` keeps checkpoints, ``FailureConfig(max_failures)`` retries, ``Tuner.restore`` resumes.

Sweep directory, ``<output_dir>/<name>/`` (default ``runs/sweeps/<name>/``)::

    sweep.yaml            # the resolved sweep spec, paths absolute (what --resume runs again)
    tune/                 # Ray Tune experiment (storage_path): state for Tuner.restore, kept checkpoints per trial
    trials/<trial_id>/    # one run dir per trial (config.yaml, metrics.jsonl, tb/, checkpoints/, status.json, sweep/)
    tb/<trial_id>         # symlinks to every trial's TensorBoard logs: tensorboard --logdir <sweep>/tb
    summary.txt           # the ranked table printed at the end; summary.json has the same as data
    metric_vs_step.png    # eval metric against optimizer step, one line per trial
    best_config.yaml      # the best trial's resolved config, ready for `pretrain train`

A trial's ``sweep/`` folder holds ``train.log`` (its run's output, each start after a ``=====`` header),
``trial.log`` (what the sweep did to it), ``trial.json`` (id and parameters) and the hook files of
:mod:`pretrain.sweep_hook`.
"""

from __future__ import annotations

import argparse
import logging
import os
import re
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import yaml

from launch.cmd_train import resolve_data
from launch.sweep.spec import SweepSpec, build_spec, evals_per_trial, load_sweep, to_tune, validate_trial_configs
from launch.sweep.summary import TrialRecord, summarize_sweep
from launch.sweep.trial import newest_checkpoint
from pretrain.config import Config, ConfigError

__all__ = ["cmd_sweep", "main", "register", "run_sweep"]

logger = logging.getLogger(__name__)

_PBT_MIN_KEEP = 4
"""Fewest checkpoints Ray Tune keeps per trial under PBT: it clones a donor's checkpoint a moment after choosing it,
while the donor reports on; with fewer kept the chosen one may be deleted already (Ray Tune warns about <= 2)."""


def _scheduler(spec: SweepSpec, cfg: Config) -> Any:
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler, PopulationBasedTraining  # noqa: PLC0415

    s = spec.scheduler
    if s.name == "asha":
        max_t = max(s.max_t or evals_per_trial(spec, cfg), s.grace_period)
        return ASHAScheduler(time_attr="training_iteration", max_t=max_t, grace_period=s.grace_period,
                             reduction_factor=s.reduction_factor, brackets=s.brackets)  # fmt: skip
    if s.name == "pbt":
        return PopulationBasedTraining(
            time_attr="training_iteration",
            perturbation_interval=s.perturbation_interval,
            burn_in_period=s.burn_in_period,
            hyperparam_mutations={p: to_tune(d, for_mutation=True) for p, d in s.hyperparam_mutations.items()},
            quantile_fraction=s.quantile_fraction,
            resample_probability=s.resample_probability,
            perturbation_factors=tuple(s.perturbation_factors),
            synch=s.synch,
        )
    return FIFOScheduler()


def _trainable(spec: SweepSpec) -> Any:
    from ray import tune  # noqa: PLC0415

    from launch.sweep.trial import run_trial  # noqa: PLC0415

    # A Slurm trial only watches its job from here: a small CPU share (the cluster queues what max_concurrent allows)
    local = {"cpu": spec.resources.cpu, "gpu": spec.resources.gpu}
    return tune.with_resources(tune.with_parameters(run_trial, spec=spec),
                               {"cpu": 0.1} if spec.trial_backend == "slurm" else local)  # fmt: skip


def _trial_id(path: str | None) -> str | None:
    """The trial id in the name Ray Tune gives a trial's folder (``run_trial_<id>_<n>_<params>_<time>``)."""
    m = re.search(r"_([0-9a-f]{5}_\d{5})_", os.path.basename(path or ""))
    return m.group(1) if m else None


def _restage_lost_checkpoints(exp_dir: Path, trials_dir: Path) -> None:
    """Ray Tune deletes a checkpoint beyond ``num_to_keep`` at once but saves its experiment state every few seconds:
    a driver killed in between leaves a state naming a deleted checkpoint, and the trial could not be restored. Such a
    checkpoint is put back from the trial's run dir (its newest), before Ray Tune restores anything."""
    from ray.tune import ExperimentAnalysis  # noqa: PLC0415

    for trial in ExperimentAnalysis(str(exp_dir)).trials:
        ckpt = trial.checkpoint
        own = newest_checkpoint(trials_dir / trial.trial_id)
        if ckpt is not None and own is not None and not os.path.isdir(ckpt.path):
            shutil.copytree(own, ckpt.path)
            ckpt.set_metadata({"trial_id": trial.trial_id, "step": -1, "tag": own.name})
            logger.warning("trial %s: Ray Tune had deleted %s; put %s there", trial.trial_id, ckpt.path, own)


def run_sweep(spec: SweepSpec, resume: bool = False) -> tuple[list[TrialRecord], Path]:
    """Run (or continue, with ``resume``) the sweep, then write its summary.

    Returns:
        The ranked trial records and the sweep dir.

    Raises:
        ConfigError: the spec or a trial config is invalid, or the sweep exists and ``resume`` is not set.
    """
    sweep_dir, exp_dir = spec.sweep_dir, spec.sweep_dir / "tune"
    saved = sweep_dir / "sweep.yaml"
    if resume and saved.is_file():
        stored = yaml.safe_load(saved.read_text())
        if stored != yaml.safe_load(yaml.safe_dump(spec.to_yaml())):
            logger.warning("the sweep YAML changed since %s was written; continuing with the stored spec", saved)
        spec = build_spec(stored, str(saved))
    cfg = validate_trial_configs(spec)
    resolve_data(cfg)  # the data set must be where every trial will look, checked as `pretrain train` checks it

    from ray import tune  # noqa: PLC0415
    from ray.tune.search import BasicVariantGenerator  # noqa: PLC0415

    can_restore = exp_dir.is_dir() and tune.Tuner.can_restore(str(exp_dir))
    if can_restore and not resume:
        raise ConfigError(f"sweep '{spec.name}' already exists at {sweep_dir}; pass --resume to continue it, "
                          "or --name to start another")  # fmt: skip
    if resume and not can_restore:
        logger.warning("nothing to resume at %s: starting the sweep", exp_dir)
    sweep_dir.mkdir(parents=True, exist_ok=True)
    if not can_restore:
        saved.write_text(yaml.safe_dump(spec.to_yaml(), sort_keys=False))

    import ray  # noqa: PLC0415

    if not ray.is_initialized():
        ray.init(address=os.environ.get("RAY_ADDRESS") or None, include_dashboard=False, log_to_driver=True)
    t0 = time.monotonic()
    if can_restore:
        logger.info("resuming sweep %s from %s", spec.name, exp_dir)
        _restage_lost_checkpoints(exp_dir, sweep_dir / "trials")
        tuner = tune.Tuner.restore(str(exp_dir), trainable=_trainable(spec), resume_errored=True)
    else:
        logger.info("starting sweep %s in %s", spec.name, sweep_dir)
        pbt_keep = _PBT_MIN_KEEP if spec.scheduler.name == "pbt" else 1
        tuner = tune.Tuner(
            _trainable(spec),
            # PBT mutates values the trials started with: the mutated paths the space lacks are sampled alike
            param_space={k: to_tune(d) for k, d in spec.dimensions().items()},
            tune_config=tune.TuneConfig(
                metric=spec.metric,
                mode=spec.mode,
                scheduler=_scheduler(spec, cfg),
                # the variant generator itself limits concurrency (Tune ignores max_concurrent_trials with it)
                search_alg=BasicVariantGenerator(random_state=spec.seed, max_concurrent=spec.max_concurrent),
                num_samples=spec.num_samples,
                reuse_actors=False,
            ),
            run_config=tune.RunConfig(
                name=exp_dir.name,
                storage_path=str(sweep_dir),
                checkpoint_config=tune.CheckpointConfig(
                    num_to_keep=max(spec.keep_checkpoints, pbt_keep),
                    checkpoint_score_attribute=spec.metric,
                    checkpoint_score_order=spec.mode,
                ),
                failure_config=tune.FailureConfig(max_failures=spec.max_failures),
                verbose=1,
            ),
        )
    results = tuner.fit()
    logger.info("sweep %s: Ray Tune finished in %.0f s", spec.name, time.monotonic() - t0)
    ray_trials = {
        trial_id: {"config": dict(r.config or {}), "error": str(r.error) if r.error else ""}
        for r in results
        if (trial_id := _trial_id(r.path))
    }
    return summarize_sweep(spec, ray_trials=ray_trials), sweep_dir


# --------------------------------------------------------------------------------------------------------- the CLI


def cmd_sweep(args: argparse.Namespace) -> int:
    """``pretrain sweep``: exit 0 when at least one trial produced the metric, 1 otherwise, 2 on a config error."""
    spec = load_sweep(
        args.sweep_config,
        extra_overrides=list(getattr(args, "overrides", []) or []),
        name=args.name,
        output_dir=args.output_dir,
        max_concurrent=args.max_concurrent,
        trial_backend=args.trial_backend,
        num_samples=args.num_samples,
    )
    if args.dry_run:
        cfg = validate_trial_configs(spec)
        resolve_data(cfg)
        print(yaml.safe_dump(spec.to_yaml(), sort_keys=False))
        print(f"trial configs valid; {evals_per_trial(spec, cfg)} eval events per trial; sweep dir {spec.sweep_dir}")
        return 0
    records, _ = run_sweep(spec, resume=args.resume)
    if errors := [r.trial_id for r in records if r.status == "error"]:
        logger.warning("%d trial(s) failed: %s", len(errors), ", ".join(errors))
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
