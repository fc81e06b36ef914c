"""``pretrain sweep SWEEP.yaml``: hyperparameter sweeps with Ray Tune, one ``pretrain train`` run per trial.

The driver builds Ray Tune's search space, scheduler and function trainable (:mod:`launch.sweep.trial`) from a checked
:class:`launch.sweep.spec.SweepSpec`; Ray Tune's own API carries the sweep: ``CheckpointConfig`` keeps checkpoints,
``FailureConfig`` retries, ``Tuner.restore`` resumes. The sweep dir ``<output_dir>/<name>/`` holds ``sweep.yaml`` (the
spec, paths absolute: what ``--resume`` runs), ``tune/`` (Ray Tune's experiment and kept checkpoints),
``trials/<trial_id>/`` (a run dir per trial) and the summary (:mod:`launch.sweep.summary`).
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import shutil
from typing import Any

import yaml

from launch.cmd_train import resolve_data
from launch.sweep.spec import SweepSpec, evals_per_trial, load_sweep, to_tune, validate_trial_configs
from launch.sweep.summary import TrialRecord, summarize_sweep
from launch.sweep.trial import newest_checkpoint
from pretrain.config import ConfigError

__all__ = ["cmd_sweep", "register", "run_sweep"]

logger = logging.getLogger(__name__)

_PBT_MIN_KEEP = 4  # PBT clones a donor's checkpoint a moment after choosing it: fewer kept, it may be gone already


def _scheduler(spec: SweepSpec, max_t: int) -> Any:
    from ray.tune import schedulers  # noqa: PLC0415

    s, kwargs = spec.scheduler, spec.scheduler.ray_kwargs()
    if s.name == "fifo":
        return schedulers.FIFOScheduler()
    if s.name == "asha":
        kwargs["max_t"] = max(s.max_t or max_t, s.grace_period)
    else:
        kwargs["hyperparam_mutations"] = {p: to_tune(d, for_mutation=True) for p, d in s.hyperparam_mutations.items()}
    cls = schedulers.ASHAScheduler if s.name == "asha" else schedulers.PopulationBasedTraining
    return cls(time_attr="training_iteration", **kwargs)


def _trainable(spec: SweepSpec) -> Any:
    from ray import tune  # noqa: PLC0415

    from launch.sweep.trial import run_trial  # noqa: PLC0415

    # A Slurm trial only watches its job from here: a small CPU share (the cluster queues what max_concurrent allows)
    local = {"cpu": spec.resources.cpu, "gpu": spec.resources.gpu}
    return tune.with_resources(tune.with_parameters(run_trial, spec=spec),
                               {"cpu": 0.1} if spec.trial_backend == "slurm" else local)  # fmt: skip


def _restage_lost_checkpoints(spec: SweepSpec) -> None:
    """Ray Tune deletes a checkpoint beyond ``num_to_keep`` at once but saves its experiment state every few seconds:
    a driver killed in between leaves a state naming a deleted checkpoint, which Ray Tune cannot restore. Such a
    checkpoint is put back from the trial's run dir (its newest) before Ray Tune restores anything."""
    from ray.tune import ExperimentAnalysis  # noqa: PLC0415

    for trial in ExperimentAnalysis(str(spec.sweep_dir / "tune")).trials:
        ckpt, own = trial.checkpoint, newest_checkpoint(spec.sweep_dir / "trials" / trial.trial_id)
        if ckpt is not None and own is not None and not os.path.isdir(ckpt.path):
            shutil.copytree(own, ckpt.path)
            ckpt.set_metadata({"trial_id": trial.trial_id, "step": -1, "tag": own.name})
            logger.warning("trial %s: Ray Tune had deleted %s; put %s there", trial.trial_id, ckpt.path, own)


def run_sweep(spec: SweepSpec, max_t: int, resume: bool = False) -> list[TrialRecord]:
    """Run (or continue, with ``resume``) the sweep; ``max_t``: ASHA's default (:func:`evals_per_trial`). Returns the
    ranked trial records; raises ConfigError if the sweep exists and ``resume`` is not set."""
    import ray  # noqa: PLC0415
    from ray import tune  # noqa: PLC0415
    from ray.tune.search import BasicVariantGenerator  # noqa: PLC0415

    exp_dir = spec.sweep_dir / "tune"
    can_restore = exp_dir.is_dir() and tune.Tuner.can_restore(str(exp_dir))
    if can_restore and not resume:
        raise ConfigError(f"sweep '{spec.name}' already exists at {spec.sweep_dir}; pass --resume to continue it, "
                          "or --name to start another")  # fmt: skip
    if resume and not can_restore:
        logger.warning("nothing to resume at %s: starting the sweep", exp_dir)
    if not can_restore:
        spec.sweep_dir.mkdir(parents=True, exist_ok=True)
        (spec.sweep_dir / "sweep.yaml").write_text(yaml.safe_dump(dataclasses.asdict(spec), sort_keys=False))
    if not ray.is_initialized():
        ray.init(address=os.environ.get("RAY_ADDRESS") or None, include_dashboard=False, log_to_driver=True)
    if can_restore:
        logger.info("resuming sweep %s from %s", spec.name, exp_dir)
        _restage_lost_checkpoints(spec)
        tuner = tune.Tuner.restore(str(exp_dir), trainable=_trainable(spec), resume_errored=True)
    else:
        logger.info("starting sweep %s in %s", spec.name, spec.sweep_dir)
        tuner = tune.Tuner(
            _trainable(spec),
            # PBT mutates values the trials started with: the mutated paths the space lacks are sampled alike
            param_space={k: to_tune(d) for k, d in spec.dimensions().items()},
            tune_config=tune.TuneConfig(
                metric=spec.metric,
                mode=spec.mode,
                scheduler=_scheduler(spec, max_t),
                # the variant generator itself limits concurrency (Tune ignores max_concurrent_trials with it)
                search_alg=BasicVariantGenerator(random_state=spec.seed, max_concurrent=spec.max_concurrent),
                num_samples=spec.num_samples,
                reuse_actors=False,
            ),
            run_config=tune.RunConfig(
                name=exp_dir.name,
                storage_path=str(spec.sweep_dir),
                checkpoint_config=tune.CheckpointConfig(
                    num_to_keep=max(spec.keep_checkpoints, _PBT_MIN_KEEP if spec.scheduler.name == "pbt" else 1),
                    checkpoint_score_attribute=spec.metric,
                    checkpoint_score_order=spec.mode,
                ),
                failure_config=tune.FailureConfig(max_failures=spec.max_failures),
                verbose=1,
            ),
        )
    return summarize_sweep(spec, tuner.fit())


def cmd_sweep(args: argparse.Namespace) -> int:
    """``pretrain sweep``: exit 0 when at least one trial produced the metric, 1 otherwise, 2 on a config error."""
    spec = load_sweep(args.sweep_config, args.overrides, name=args.name,
                      output_dir=args.output_dir, max_concurrent=args.max_concurrent,
                      trial_backend=args.trial_backend, num_samples=args.num_samples)  # fmt: skip
    if args.resume and (saved := spec.sweep_dir / "sweep.yaml").is_file():
        if dataclasses.asdict(stored := load_sweep(saved)) != dataclasses.asdict(spec):
            logger.warning("the sweep YAML changed since %s was written; continuing with the stored spec", saved)
        spec = stored
    configs = validate_trial_configs(spec)
    resolve_data(configs[0])  # the data set must be where every trial will look, checked as `pretrain train` does
    if args.dry_run:
        print(yaml.safe_dump(dataclasses.asdict(spec), sort_keys=False))
        print(f"trial configs valid; {evals_per_trial(configs)} eval events per trial; sweep dir {spec.sweep_dir}")
        return 0
    records = run_sweep(spec, evals_per_trial(configs), resume=args.resume)
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
