"""``pretrain sweep SWEEP.yaml``: hyperparameter sweeps with Ray Tune, one ``pretrain train`` run per trial.

The driver builds Ray Tune's search space, scheduler and function trainable (:mod:`launch.sweep.trial`) from a checked
:class:`launch.sweep.spec.SweepSpec`; Ray Tune's own API carries the sweep: ``CheckpointConfig`` keeps checkpoints,
``FailureConfig`` retries, ``Tuner.restore`` resumes. The sweep dir ``<output_dir>/<name>/`` holds ``sweep.yaml`` (the
spec, paths absolute: what ``--resume`` runs), ``tune/`` (Ray Tune's experiment and kept checkpoints),
``trials/<trial_id>/`` (a run dir per trial) and the summary (:mod:`launch.sweep.summary`).

Nothing in the sweep dir is unpickled or run on trust: Ray Tune reads and writes ``tune/`` through
:mod:`launch.sweep.storage` (its ``.json``/``.pkl`` files signed with the user's key, checked before they are read),
``sweep.yaml`` is signed too (it says where trials run), and each trial's run verifies its own checkpoints. ``--resume``
checks all of it first and refuses (exit 2) what is not signed; ``--trust-sweep`` signs it as it is and goes on.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
from pathlib import Path
from typing import Any

import yaml

from data_pipeline.config import ConfigError
from launch.sweep.spec import SweepSpec, evals_per_trial, load_sweep, to_tune, validate_trial_configs
from launch.sweep.summary import TrialRecord, summarize_sweep
from launch.sweep.trial import newest_checkpoint
from pretrain import trust
from pretrain.plan import resolve_data

__all__ = ["check_sweep_trusted", "cmd_sweep", "register", "run_sweep"]

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


def _restage_lost_checkpoints(spec: SweepSpec, storage: Any) -> None:
    """Ray Tune deletes a checkpoint beyond ``num_to_keep`` at once but saves its experiment state every few seconds:
    a driver killed in between leaves a state naming a deleted checkpoint, which Ray Tune cannot restore. Such a
    checkpoint is put back from the trial's run dir (its newest) before Ray Tune restores anything, copied through the
    sweep's ``storage`` file system (signed like everything Ray Tune writes there)."""
    import pyarrow.fs  # noqa: PLC0415
    from ray.tune import ExperimentAnalysis  # noqa: PLC0415

    for trial in ExperimentAnalysis(str(spec.sweep_dir / "tune"), storage_filesystem=storage).trials:
        ckpt, own = trial.checkpoint, newest_checkpoint(spec.sweep_dir / "trials" / trial.trial_id)
        if ckpt is not None and own is not None and not os.path.isdir(ckpt.path):
            storage.create_dir(ckpt.path, recursive=True)  # copy_files makes the folders below it, not it
            pyarrow.fs.copy_files(str(own), ckpt.path, destination_filesystem=storage)
            ckpt.set_metadata({"trial_id": trial.trial_id, "step": -1, "tag": own.name})
            logger.warning("trial %s: Ray Tune had deleted %s; put %s there", trial.trial_id, ckpt.path, own)


def check_sweep_trusted(sweep_dir: Path, trusted: bool) -> None:
    """Before anything of an existing sweep is read: its ``sweep.yaml`` and Ray Tune's state must carry this user's
    signatures. With ``trusted`` (``--trust-sweep``) they are signed as they are, and so is every checkpoint whose
    files match its COMPLETE marker (:func:`pretrain.checkpoint.adopt_checkpoint`).

    Raises:
        ConfigError: Naming the files that are not signed, and ``--trust-sweep``.
    """
    from launch.sweep.storage import adopt, unverified_files  # noqa: PLC0415
    from pretrain.checkpoint import adopt_checkpoint  # noqa: PLC0415

    saved = sweep_dir / "sweep.yaml"
    if trusted:
        if saved.is_file():
            trust.sign_file(saved, saved.read_bytes())
        adopt(sweep_dir / "tune")
        for marker in sorted(sweep_dir.rglob("COMPLETE")):
            adopt_checkpoint(marker.parent)
        return
    bad = unverified_files(sweep_dir / "tune")
    if saved.is_file() and not (ok := trust.check_file(saved))[0]:
        bad.insert(0, ("sweep.yaml", ok[1]))
    if bad:
        listed = "; ".join(f"{sweep_dir / rel} ({why})" for rel, why in bad[:5])
        more = f" and {len(bad) - 5} more" if len(bad) > 5 else ""
        raise ConfigError(
            f"sweep {sweep_dir} holds files not signed by your key (key {trust.key_path()}): {listed}{more}. Ray "
            "Tune's state is pickled, and sweep.yaml says where trials run, so nothing was loaded and nothing was "
            "changed. If you trust where this sweep came from (another user's, a copy made elsewhere), pass "
            "--trust-sweep: its files and checkpoints are then signed with your key as they are"
        )


def run_sweep(spec: SweepSpec, max_t: int, resume: bool = False, trusted: bool = False) -> list[TrialRecord]:
    """Run (or continue, with ``resume``) the sweep; ``max_t``: ASHA's default (:func:`evals_per_trial`). Returns the
    ranked trial records; raises ConfigError if the sweep exists and ``resume`` is not set, or if its files are not
    signed by this user and not ``trusted`` (:func:`check_sweep_trusted`)."""
    import ray  # noqa: PLC0415
    from ray import tune  # noqa: PLC0415
    from ray.tune.search import BasicVariantGenerator  # noqa: PLC0415

    from launch.sweep.storage import signed_filesystem  # noqa: PLC0415

    storage = signed_filesystem()
    exp_dir = spec.sweep_dir / "tune"
    can_restore = exp_dir.is_dir() and tune.Tuner.can_restore(str(exp_dir))
    if can_restore and not resume:
        raise ConfigError(f"sweep '{spec.name}' already exists at {spec.sweep_dir}; pass --resume to continue it, "
                          "or --name to start another")  # fmt: skip
    if resume and not can_restore:
        logger.warning("nothing to resume at %s: starting the sweep", exp_dir)
    if can_restore:
        check_sweep_trusted(spec.sweep_dir, trusted)
    else:
        spec.sweep_dir.mkdir(parents=True, exist_ok=True)
        text = yaml.safe_dump(dataclasses.asdict(spec), sort_keys=False)
        trust.write_signed(spec.sweep_dir / "sweep.yaml", text.encode())
    if not ray.is_initialized():
        ray.init(address=os.environ.get("RAY_ADDRESS") or None, include_dashboard=False, log_to_driver=True)
    if can_restore:
        logger.info("resuming sweep %s from %s", spec.name, exp_dir)
        _restage_lost_checkpoints(spec, storage)
        tuner = tune.Tuner.restore(
            str(exp_dir), trainable=_trainable(spec), resume_errored=True, storage_filesystem=storage
        )
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
                storage_filesystem=storage,
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
        check_sweep_trusted(spec.sweep_dir, args.trust_sweep)  # before the stored spec is used (or --dry-run shows it)
        if dataclasses.asdict(stored := load_sweep(saved)) != dataclasses.asdict(spec):
            logger.warning("the sweep YAML changed since %s was written; continuing with the stored spec", saved)
        spec = stored
    configs = validate_trial_configs(spec)
    resolve_data(configs[0])  # the data set must be where every trial will look, checked as `pretrain train` does
    if args.dry_run:
        print(yaml.safe_dump(dataclasses.asdict(spec), sort_keys=False))
        print(f"trial configs valid; {evals_per_trial(configs)} eval events per trial; sweep dir {spec.sweep_dir}")
        return 0
    records = run_sweep(spec, evals_per_trial(configs), resume=args.resume, trusted=args.trust_sweep)
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
    p.add_argument("--trust-sweep", action="store_true",
                   help="--resume a sweep whose files are not signed by your key (signs them as they are)")  # fmt: skip
    p.add_argument("--max-concurrent", type=int, default=None, help="trials running at once (0: as resources allow)")
    p.add_argument("--trial-backend", choices=["local", "slurm"], default=None, help="where trials run")
    p.add_argument("--name", default=None, help="sweep name (default: the YAML's name or file name)")
    p.add_argument("--output-dir", default=None, help="parent of the sweep dir (default runs/sweeps)")
    p.add_argument("--num-samples", type=int, default=None, help="override num_samples")
    p.add_argument("--dry-run", action="store_true", help="validate the sweep and every trial config, print the plan")
    p.set_defaults(func=cmd_sweep, accepts_overrides=True)
