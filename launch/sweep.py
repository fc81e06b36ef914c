"""``pretrain sweep SWEEP.yaml``: hyperparameter sweeps with Ray Tune, one training run per trial.

A sweep YAML names a base run config, overrides applied to every trial, a search space over *config paths* (checked
against the dataclass schema of :mod:`pretrain.config`; an unknown path fails with the closest valid ones), a scheduler
(ASHA by default, PBT, FIFO), the eval metric and mode, the number of samples, per-trial resources, retries and how
many checkpoints Ray Tune keeps per trial. Before anything starts, one trial config per value of every search
dimension (both ends of ranges, every choice) is resolved with :func:`pretrain.config.load_config`, so a value the
schema or a cross-field check rejects fails the sweep at once (exit 2).

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
import math
import os
import re
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from launch.sweep_trial import SWEEP_SUBDIR, TrialSpec, format_override
from pretrain.config import CONFIGS_DIR, Config, ConfigError, _all_keys, _suggest, dump_config, load_config

__all__ = [
    "DISTRIBUTIONS",
    "EVAL_METRICS",
    "Distribution",
    "SchedulerSpec",
    "SweepSpec",
    "TrialRecord",
    "cmd_sweep",
    "format_table",
    "load_sweep",
    "main",
    "register",
    "run_sweep",
    "summarize_sweep",
    "validate_trial_configs",
]

logger = logging.getLogger(__name__)

DISTRIBUTIONS = ("choice", "uniform", "loguniform", "randint", "grid")
"""Search-space kinds: ``{choice: [a, b]}``, ``{uniform: [lo, hi]}``, ``{loguniform: [lo, hi]}``,
``{randint: [lo, hi]}`` (hi excluded), ``{grid: [a, b]}`` (every value, times ``num_samples``)."""

EVAL_METRICS = {"val_loss": "min", "val_top1": "max", "val_top5": "max"}
"""Metrics of the trainer's eval events, with the mode that makes sense for each."""

_SCHEDULER_KNOBS: dict[str, dict[str, Any]] = {
    "asha": {"grace_period": 1, "reduction_factor": 2, "max_t": None, "brackets": 1},
    "pbt": {
        "perturbation_interval": 1,
        "hyperparam_mutations": {},
        "quantile_fraction": 0.25,
        "resample_probability": 0.25,
        "burn_in_period": 0,
        "perturbation_factors": [1.2, 0.8],
        "synch": False,
    },
    "fifo": {},
}

# Settings every trial gets unless the sweep's own overrides say otherwise: Ray Tune keeps the best checkpoints, so the
# trial's run dir keeps only its newest (what auto-resume needs); no progress bar in logs nobody watches.
_PBT_MIN_KEEP = 4

_TRIAL_DEFAULT_OVERRIDES = ["checkpoint.keep_best=0", "trainer.progress_bar=false"]

_TOP_KEYS = (
    "name", "description", "output_dir", "base", "overrides", "space", "scheduler", "metric", "mode", "num_samples",
    "max_concurrent", "resources", "max_failures", "keep_checkpoints", "trial_keep_last", "trial_backend", "slurm",
    "seed", "stop_grace_s",
)  # fmt: skip


# ----------------------------------------------------------------------------------------------------- the schema


@dataclass
class Distribution:
    """One search dimension: ``kind`` (see :data:`DISTRIBUTIONS`) and its values or bounds."""

    kind: str
    values: list[Any]

    def points(self) -> list[Any]:
        """Values that exercise the dimension when validating trial configs: every choice, both ends of a range."""
        if self.kind in ("choice", "grid"):
            return list(self.values)
        lo, hi = self.values
        return [lo, hi - 1] if self.kind == "randint" else [lo, hi]

    def to_tune(self, for_mutation: bool = False) -> Any:
        """The Ray Tune domain (PBT mutations take a plain list for ``choice``)."""
        from ray import tune  # noqa: PLC0415

        if self.kind == "choice":
            return list(self.values) if for_mutation else tune.choice(list(self.values))
        if self.kind == "grid":
            return tune.grid_search(list(self.values))
        if self.kind == "uniform":
            return tune.uniform(*self.values)
        if self.kind == "loguniform":
            return tune.loguniform(*self.values)
        return tune.randint(*self.values)

    def to_yaml(self) -> dict[str, Any]:
        return {self.kind: list(self.values)}


@dataclass
class SchedulerSpec:
    """Trial scheduler. Times are counted in eval events (Ray Tune iterations), not optimizer steps."""

    name: str = "asha"
    """``asha`` (asynchronous successive halving, stops bad trials early), ``pbt`` (population based training) or
    ``fifo`` (run every trial to the end)."""
    knobs: dict[str, Any] = field(default_factory=dict)
    """Scheduler settings, defaults filled in (see ``_SCHEDULER_KNOBS``); PBT ``hyperparam_mutations`` hold
    :class:`Distribution` objects."""

    def to_yaml(self) -> dict[str, Any]:
        out: dict[str, Any] = {"name": self.name}
        for k, v in self.knobs.items():
            out[k] = {p: d.to_yaml() for p, d in v.items()} if k == "hyperparam_mutations" else v
        return out


@dataclass
class SweepSpec:
    """A validated sweep YAML (paths resolved)."""

    name: str
    """Sweep name; the sweep dir is ``output_dir/name``."""
    base: str
    """Run config of every trial (absolute path)."""
    space: dict[str, Distribution]
    """Dotted config path -> distribution."""
    metric: str = "val_top1"
    """Eval metric that ranks trials and checkpoints."""
    mode: str = "max"
    """``max`` or ``min``."""
    output_dir: str = "runs/sweeps"
    """Parent folder of sweep dirs."""
    description: str = ""
    """Free text."""
    overrides: list[str] = field(default_factory=list)
    """``section.field=value`` applied to every trial."""
    scheduler: SchedulerSpec = field(default_factory=SchedulerSpec)
    """Trial scheduler."""
    num_samples: int = 1
    """Samples of the space (with ``grid`` dimensions: repeats of the grid)."""
    max_concurrent: int = 0
    """Trials running at once; 0: as many as the resources allow."""
    resources: dict[str, Any] = field(default_factory=lambda: {"cpu": 1, "gpu": 0, "nproc": 1})
    """Per trial: Ray resources (``cpu``, ``gpu``) and ranks (``nproc``)."""
    max_failures: int = 1
    """Retries of a failed trial (it resumes from its newest checkpoint)."""
    keep_checkpoints: int = 2
    """Checkpoints Ray Tune keeps per trial, the best by ``metric``; the rest are deleted."""
    trial_keep_last: int = 1
    """``checkpoint.keep_last`` of each trial's own run dir (unless ``overrides`` set it)."""
    trial_backend: str = "local"
    """``local`` (subprocess per trial) or ``slurm`` (a Slurm job per trial; the driver stays local)."""
    slurm: dict[str, Any] = field(default_factory=dict)
    """Slurm submission options of trials (``cluster`` config name and its settings)."""
    seed: int | None = 0
    """Seed of the sampling of the space (None: random)."""
    stop_grace_s: float = 20.0
    """Seconds a stopped trial's run gets between SIGTERM and SIGKILL."""

    @property
    def sweep_dir(self) -> Path:
        return Path(self.output_dir) / self.name

    def to_yaml(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["space"] = {k: d.to_yaml() for k, d in self.space.items()}
        out["scheduler"] = self.scheduler.to_yaml()
        return out


@dataclass
class TrialRecord:
    """One trial in the final table."""

    trial_id: str
    params: dict[str, Any]
    status: str
    """``finished``, ``stopped`` (by the scheduler), ``error``, or ``pending``/``running`` (sweep interrupted)."""
    step: int
    best: float | None
    best_step: int | None
    last: float | None
    run_dir: str
    error: str = ""
    curve: list[tuple[int, float]] = field(default_factory=list)


# ------------------------------------------------------------------------------------------------------ validation


def _config_paths() -> tuple[set[str], list[str], list[str]]:
    """(leaf paths, open-mapping paths like ``model.kwargs``, all paths for suggestions) of the schema."""
    import typing  # noqa: PLC0415

    leaves, mappings = set(), []

    def walk(cls: Any, prefix: str) -> None:
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            path, tp = prefix + f.name, hints[f.name]
            if dataclasses.is_dataclass(tp):
                walk(tp, path + ".")
            else:
                leaves.add(path)
                if typing.get_origin(tp) is dict:
                    mappings.append(path)

    walk(Config, "")
    return leaves, mappings, _all_keys()


def _check_path(path: str, where: str) -> None:
    leaves, mappings, all_keys = _config_paths()
    if path in leaves or any(path.startswith(m + ".") for m in mappings):
        if path.startswith("run."):
            raise ConfigError(f"{where}: '{path}' is set by the sweep for every trial (its run dir) and cannot vary")
        return
    hint = _suggest(path, sorted(leaves))
    if not hint and path in all_keys:
        example = sorted(k for k in leaves if k.startswith(path + "."))[0]
        hint = f"; '{path}' is a section, name one of its fields (e.g. {example})"
    raise ConfigError(f"{where}: unknown config path '{path}'{hint}")


def _check_keys(given: dict[str, Any], known: list[str] | tuple[str, ...], where: str) -> None:
    for k in given:
        if k not in known:
            import difflib  # noqa: PLC0415

            close = difflib.get_close_matches(str(k), list(known), n=3, cutoff=0.5)
            hint = f"; did you mean {', '.join(close)}?" if close else f"; known: {', '.join(known)}"
            raise ConfigError(f"{where}: unknown key '{k}'{hint}")


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _parse_distribution(raw: Any, where: str, allow_grid: bool = True) -> Distribution:
    kinds = [k for k in DISTRIBUTIONS if allow_grid or k != "grid"]
    example = "{loguniform: [1.0e-4, 1.0e-2]}"
    if isinstance(raw, list):
        raise ConfigError(f"{where}: a bare list is ambiguous; write {{choice: {raw}}} or {{grid: {raw}}}")
    if not isinstance(raw, dict) or len(raw) != 1:
        raise ConfigError(f"{where}: expected one of {', '.join(kinds)} as a mapping, e.g. {example}; got {raw!r}")
    ((kind, values),) = raw.items()
    if kind not in kinds:
        _check_keys({kind: None}, kinds, where)
    if not isinstance(values, list) or not values:
        raise ConfigError(f"{where}: {kind} needs a non-empty list, got {values!r}")
    if kind in ("uniform", "loguniform", "randint"):
        if len(values) != 2 or not all(_is_number(v) for v in values):
            raise ConfigError(f"{where}: {kind} needs [low, high] numbers, got {values!r}")
        values = [float(v) if isinstance(v, str) else v for v in values]
        lo, hi = values
        if not lo < hi:
            raise ConfigError(f"{where}: {kind} needs low < high, got {values!r}")
        if kind == "loguniform" and lo <= 0:
            raise ConfigError(f"{where}: loguniform needs low > 0, got {lo!r}")
        if kind == "randint":
            if not all(isinstance(v, int) for v in values):
                raise ConfigError(f"{where}: randint needs integer bounds [low, high) , got {values!r}")
        else:
            values = [float(lo), float(hi)]
    return Distribution(kind, list(values))


def _read_numbers(raw: dict[str, Any]) -> dict[str, Any]:
    """YAML 1.1 reads ``1e-4`` (no dot) as a string; accept numeric strings in bounds the way the config does."""

    def fix(v: Any) -> Any:
        if isinstance(v, str):
            try:
                return float(v)
            except ValueError:
                return v
        if isinstance(v, list):
            return [fix(x) for x in v]
        if isinstance(v, dict):
            return {k: fix(x) for k, x in v.items()}
        return v

    return {k: (fix(v) if k in ("space", "scheduler") else v) for k, v in raw.items()}


def _resolve_base(base: str, sweep_path: Path) -> Path:
    p = Path(base).expanduser()
    candidates = [p] if p.is_absolute() else [Path.cwd() / p, sweep_path.parent / p, CONFIGS_DIR.parent / p]
    if p.suffix not in (".yaml", ".yml"):
        candidates.append(CONFIGS_DIR / "run" / f"{base}.yaml")
    for c in candidates:
        if c.is_file():
            return c.resolve()
    known = sorted(x.stem for x in (CONFIGS_DIR / "run").glob("*.yaml"))
    raise ConfigError(f"{sweep_path}: base run config '{base}' not found; known in configs/run/: {', '.join(known)}")


def _parse_scheduler(raw: Any, where: str) -> SchedulerSpec:
    if raw is None:
        raw = {}
    if isinstance(raw, str):
        raw = {"name": raw}
    if not isinstance(raw, dict):
        raise ConfigError(f"{where}: expected a mapping with 'name' and its settings, got {raw!r}")
    raw = dict(raw)
    name = str(raw.pop("name", "asha")).lower()
    if name not in _SCHEDULER_KNOBS:
        _check_keys({name: None}, list(_SCHEDULER_KNOBS), f"{where}.name")
    defaults = _SCHEDULER_KNOBS[name]
    _check_keys(raw, list(defaults), f"{where} ({name})")
    knobs = {k: raw.get(k, v) for k, v in defaults.items()}
    if name == "asha":
        for k in ("grace_period", "brackets"):
            if not isinstance(knobs[k], int) or knobs[k] < 1:
                raise ConfigError(f"{where}.{k} must be an integer >= 1 (eval events), got {knobs[k]!r}")
        if not _is_number(knobs["reduction_factor"]) or knobs["reduction_factor"] <= 1:
            raise ConfigError(f"{where}.reduction_factor must be > 1, got {knobs['reduction_factor']!r}")
        if knobs["max_t"] is not None and (
            not isinstance(knobs["max_t"], int) or knobs["max_t"] < knobs["grace_period"]
        ):
            raise ConfigError(f"{where}.max_t must be an integer >= grace_period (eval events), got {knobs['max_t']!r}")
    if name == "pbt":
        muts = knobs["hyperparam_mutations"]
        if not isinstance(muts, dict) or not muts:
            raise ConfigError(f"{where}.hyperparam_mutations: PBT needs config paths to mutate, e.g. optim.lr")
        parsed = {}
        for path, dist in muts.items():
            _check_path(str(path), f"{where}.hyperparam_mutations")
            parsed[str(path)] = _parse_distribution(dist, f"{where}.hyperparam_mutations.{path}", allow_grid=False)
        knobs["hyperparam_mutations"] = parsed
        if not isinstance(knobs["perturbation_interval"], int) or knobs["perturbation_interval"] < 1:
            raise ConfigError(f"{where}.perturbation_interval must be an integer >= 1 (eval events)")
        if not 0 < knobs["quantile_fraction"] <= 0.5:
            raise ConfigError(f"{where}.quantile_fraction must be in (0, 0.5], got {knobs['quantile_fraction']!r}")
        if not 0 <= knobs["resample_probability"] <= 1:
            raise ConfigError(f"{where}.resample_probability must be in [0, 1]")
        pf = knobs["perturbation_factors"]
        if not (isinstance(pf, list) and len(pf) == 2 and all(_is_number(x) and x > 0 for x in pf)):
            raise ConfigError(f"{where}.perturbation_factors must be two positive numbers, e.g. [1.2, 0.8]")
    return SchedulerSpec(name, knobs)


def load_sweep(
    path: str | Path,
    *,
    name: str | None = None,
    output_dir: str | None = None,
    max_concurrent: int | None = None,
    trial_backend: str | None = None,
    num_samples: int | None = None,
    extra_overrides: list[str] | None = None,
) -> SweepSpec:
    """Read and validate a sweep YAML; keyword arguments override its fields (the CLI flags).

    Raises:
        ConfigError: naming the bad key or value, with the closest valid keys.
    """
    path = Path(path)
    if not path.is_file():
        known = sorted(p.name for p in (CONFIGS_DIR / "sweep").glob("*.yaml"))
        raise ConfigError(f"sweep config '{path}' does not exist; examples in configs/sweep/: {', '.join(known)}")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML ({e})") from e
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level")
    _check_keys(raw, _TOP_KEYS, str(path))
    raw = _read_numbers(raw)
    if "base" not in raw:
        raise ConfigError(f"{path}: 'base' (the run config of every trial) is missing")
    spec = SweepSpec(name=str(raw.get("name") or path.stem), base=str(_resolve_base(str(raw["base"]), path)), space={})

    overrides = raw.get("overrides") or []
    if not isinstance(overrides, list) or not all(isinstance(o, str) for o in overrides):
        raise ConfigError(f"{path}: overrides must be a list of 'section.field=value' strings")
    spec.overrides = [*overrides, *(extra_overrides or [])]
    for o in spec.overrides:
        key = o.split("=", 1)[0].strip()
        if "=" in o and key.startswith("run.") and key not in ("run.description",):
            raise ConfigError(f"{path}: overrides: '{key}' is set by the sweep for every trial; use the sweep's name")

    space = raw.get("space") or {}
    if not isinstance(space, dict) or not space:
        raise ConfigError(
            f"{path}: 'space' must map config paths to distributions, e.g. optim.lr: {{loguniform: [1e-4, 1e-2]}}"
        )
    for key, dist in space.items():
        _check_path(str(key), f"{path}: space")
        spec.space[str(key)] = _parse_distribution(dist, f"{path}: space.{key}")

    spec.metric = str(raw.get("metric", spec.metric))
    if spec.metric not in EVAL_METRICS:
        import difflib  # noqa: PLC0415

        close = difflib.get_close_matches(spec.metric, list(EVAL_METRICS), n=3, cutoff=0.5)
        hint = f"; did you mean {', '.join(close)}?" if close else ""
        raise ConfigError(
            f"{path}: metric '{spec.metric}' is not an eval metric of the trainer{hint} "
            f"(known: {', '.join(EVAL_METRICS)})"
        )
    spec.mode = str(raw.get("mode", EVAL_METRICS[spec.metric]))
    if spec.mode not in ("min", "max"):
        raise ConfigError(f"{path}: mode must be 'min' or 'max', got {spec.mode!r}")
    spec.scheduler = _parse_scheduler(raw.get("scheduler"), f"{path}: scheduler")

    for key in ("num_samples", "max_concurrent", "max_failures", "keep_checkpoints", "trial_keep_last"):
        if key in raw:
            setattr(spec, key, raw[key])
    if num_samples is not None:
        spec.num_samples = num_samples
    if max_concurrent is not None:
        spec.max_concurrent = max_concurrent
    for key, low in (("num_samples", 1), ("max_concurrent", 0), ("max_failures", 0), ("keep_checkpoints", 1)):
        v = getattr(spec, key)
        if not isinstance(v, int) or isinstance(v, bool) or v < low:
            raise ConfigError(f"{path}: {key} must be an integer >= {low}, got {v!r}")
    if not isinstance(spec.trial_keep_last, int) or spec.trial_keep_last < 1:
        raise ConfigError(f"{path}: trial_keep_last must be an integer >= 1 (resume needs one checkpoint)")

    resources = raw.get("resources") or {}
    if not isinstance(resources, dict):
        raise ConfigError(f"{path}: resources must be a mapping with cpu, gpu, nproc")
    _check_keys(resources, ("cpu", "gpu", "nproc"), f"{path}: resources")
    spec.resources = {"cpu": 1, "gpu": 0, "nproc": 1, **resources}
    if not all(_is_number(spec.resources[k]) and spec.resources[k] >= 0 for k in ("cpu", "gpu")):
        raise ConfigError(f"{path}: resources.cpu and resources.gpu must be numbers >= 0")
    nproc = spec.resources["nproc"]
    if not isinstance(nproc, int) or nproc < 1:
        raise ConfigError(f"{path}: resources.nproc must be an integer >= 1, got {nproc!r}")
    if 0 < spec.resources["gpu"] < nproc:
        raise ConfigError(
            f"{path}: resources.gpu={spec.resources['gpu']} is less than nproc={nproc} (one GPU per rank)"
        )

    spec.trial_backend = str(trial_backend or raw.get("trial_backend", "local"))
    if spec.trial_backend not in ("local", "slurm"):
        raise ConfigError(f"{path}: trial_backend must be 'local' or 'slurm', got {spec.trial_backend!r}")
    spec.slurm = dict(raw.get("slurm") or {})
    if not isinstance(raw.get("slurm") or {}, dict):
        raise ConfigError(f"{path}: slurm must map launch.submit.ClusterParams keys (and 'profile') to values")
    if spec.trial_backend == "slurm":
        from launch.sweep_trial import slurm_cluster_params  # noqa: PLC0415

        try:
            slurm_cluster_params(spec.slurm, nproc)
        except ConfigError as e:
            raise ConfigError(f"{path}: slurm: {e}") from e
    spec.seed = raw.get("seed", spec.seed)
    if spec.seed is not None and (not isinstance(spec.seed, int) or isinstance(spec.seed, bool)):
        raise ConfigError(f"{path}: seed must be an integer (or null for a random one), got {spec.seed!r}")
    spec.stop_grace_s = raw.get("stop_grace_s", spec.stop_grace_s)
    if not _is_number(spec.stop_grace_s) or spec.stop_grace_s < 0:
        raise ConfigError(f"{path}: stop_grace_s must be a number of seconds >= 0, got {spec.stop_grace_s!r}")
    spec.stop_grace_s = float(spec.stop_grace_s)
    spec.description = str(raw.get("description", ""))
    spec.output_dir = str(output_dir or raw.get("output_dir") or spec.output_dir)
    if name:
        spec.name = name
    if not re.fullmatch(r"[A-Za-z0-9._-]+", spec.name) or spec.name in (".", ".."):
        raise ConfigError(f"sweep name {spec.name!r} must be a folder name (letters, digits, '.', '_', '-')")
    return spec


def _trial_fixed_overrides(spec: SweepSpec) -> list[str]:
    """Overrides of every trial: the sweep's defaults for trials, then the sweep YAML's own overrides."""
    return [f"checkpoint.keep_last={spec.trial_keep_last}", *_TRIAL_DEFAULT_OVERRIDES, *spec.overrides]


def validate_trial_configs(spec: SweepSpec) -> Config:
    """Resolve one trial config per value of every dimension (others at their first value); return the first.

    Raises:
        ConfigError: naming the dimension and value whose trial config is invalid.
    """
    fixed = _trial_fixed_overrides(spec) + ["run.name=validate"]
    dims = dict(spec.space)
    if spec.scheduler.name == "pbt":
        for k, d in spec.scheduler.knobs["hyperparam_mutations"].items():
            dims.setdefault(k, d)
    first = {k: d.points()[0] for k, d in dims.items()}
    try:
        cfg = load_config(spec.base, fixed + [format_override(k, v) for k, v in first.items()])
    except ConfigError as e:
        raise ConfigError(f"trial config with {first} is invalid: {e}") from e
    for key, dist in dims.items():
        for value in dist.points()[1:]:
            point = {**first, key: value}
            try:
                load_config(spec.base, fixed + [format_override(k, v) for k, v in point.items()])
            except ConfigError as e:
                raise ConfigError(f"space {key}={value!r}: the trial config is invalid: {e}") from e
    if not cfg.data.val_split:
        raise ConfigError("the sweep needs evaluation to report its metric, but data.val_split is empty")
    if spec.scheduler.name == "pbt":
        ev, ck = cfg.trainer.eval_every_steps, cfg.checkpoint.every_steps
        if ev <= 0 or ck <= 0 or ev % ck:
            raise ConfigError(
                f"PBT clones checkpoints at evals: checkpoint.every_steps={ck} must divide trainer.eval_every_steps="
                f"{ev} (both > 0); add e.g. 'checkpoint.every_steps={max(ev, 1)}' to the sweep's overrides"
            )
    return cfg


def _evals_per_trial(spec: SweepSpec, cfg: Config) -> int:
    """Eval events of the longest trial (ASHA's ``max_t`` default)."""
    steps = max([cfg.trainer.max_steps] + [int(v) for v in _points(spec, "trainer.max_steps")])
    every = min([cfg.trainer.eval_every_steps] + [int(v) for v in _points(spec, "trainer.eval_every_steps")])
    return max(1, math.ceil(steps / every)) if every > 0 else 1


def _points(spec: SweepSpec, key: str) -> list[Any]:
    return spec.space[key].points() if key in spec.space else []


# ------------------------------------------------------------------------------------------------------ the driver


def _build_scheduler(spec: SweepSpec, cfg: Config) -> Any:
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler, PopulationBasedTraining  # noqa: PLC0415

    k = spec.scheduler.knobs
    if spec.scheduler.name == "asha":
        max_t = k["max_t"] or _evals_per_trial(spec, cfg)
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
        overrides=_trial_fixed_overrides(spec),
        trials_dir=str(sweep_dir / "trials"),
        metric=spec.metric,
        max_steps=cfg.trainer.max_steps,
        nproc=spec.resources["nproc"],
        backend=spec.trial_backend,
        slurm=dict(spec.slurm),
        always_checkpoint=spec.scheduler.name == "pbt",
        stop_grace_s=spec.stop_grace_s,
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


def _link_tensorboard(sweep_dir: Path) -> None:
    tb_root = sweep_dir / "tb"
    tb_root.mkdir(parents=True, exist_ok=True)
    for trial in sorted((sweep_dir / "trials").glob("*")):
        link = tb_root / trial.name
        if (trial / "tb").is_dir() and not link.exists() and not link.is_symlink():
            link.symlink_to(Path("..") / "trials" / trial.name / "tb", target_is_directory=True)


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
        spec = dataclasses.replace(_spec_from_yaml(stored), output_dir=str(sweep_dir.parent), name=sweep_dir.name)
    cfg = validate_trial_configs(spec)

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
    logger.info("sweep %s: Ray Tune finished in %.0f s", spec.name, time.monotonic() - t0)
    ray_trials = _ray_trials(results)
    records = summarize_sweep(spec, ray_trials=ray_trials)
    return records, sweep_dir


def _spec_from_yaml(stored: dict[str, Any]) -> SweepSpec:
    stored = dict(stored)
    space = {k: Distribution(*next(iter(v.items()))) for k, v in stored.pop("space").items()}
    sched = dict(stored.pop("scheduler"))
    name = sched.pop("name")
    if "hyperparam_mutations" in sched:
        sched["hyperparam_mutations"] = {
            k: Distribution(*next(iter(v.items()))) for k, v in sched["hyperparam_mutations"].items()
        }
    return SweepSpec(space=space, scheduler=SchedulerSpec(name, sched), **stored)


def _ray_trials(results: Any) -> dict[str, dict[str, Any]]:
    """trial_id -> {config, error} from a Ray Tune ResultGrid."""
    out = {}
    for r in results:
        # The trial's own folder names it; its last metrics may be a PBT donor's (with the donor's trial_id).
        m = re.search(r"_([0-9a-f]{5}_\d{5})_", os.path.basename(r.path)) if r.path else None
        trial_id = m.group(1) if m else (r.metrics or {}).get("trial_id")
        if trial_id:
            out[trial_id] = {"config": dict(r.config or {}), "error": str(r.error) if r.error else ""}
    return out


# ----------------------------------------------------------------------------------------------------- the summary


def _trial_record(spec: SweepSpec, run_dir: Path, ray_info: dict[str, Any] | None, max_steps: int) -> TrialRecord:
    from launch.sweep_trial import MetricsTail  # noqa: PLC0415

    try:
        trial_meta = json.loads((run_dir / "sweep" / "trial.json").read_text())
    except (OSError, ValueError):
        trial_meta = {}
    params = dict((ray_info or {}).get("config") or trial_meta.get("params") or {})
    events = MetricsTail(run_dir / "metrics.jsonl").read()
    curve = [(int(e["step"]), float(e[spec.metric])) for e in events if spec.metric in e and "step" in e]
    step = max([int(e.get("step", 0)) for e in events] or [0])
    try:
        state = json.loads((run_dir / "status.json").read_text()).get("state", "")
    except (OSError, ValueError):
        state = ""
    error = (ray_info or {}).get("error", "")
    if error:
        status = "error"
    elif state == "finished" or (max_steps and step >= max_steps):
        status = "finished"
    elif ray_info is not None:
        status = "stopped"
    else:
        status = "running" if state == "running" else "pending"
    best = best_step = last = None
    if curve:
        pick = max if spec.mode == "max" else min
        best_step, best = pick(curve, key=lambda sv: sv[1])
        last = curve[-1][1]
    return TrialRecord(run_dir.name, params, status, step, best, best_step, last, str(run_dir), error, curve)


def _format_value(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def format_table(spec: SweepSpec, records: list[TrialRecord]) -> str:
    """The ranked table: rank, trial, status, steps, best metric (at step), last metric, parameters."""
    keys = sorted({k for r in records for k in r.params})
    header = ["rank", "trial", "status", "steps", f"best {spec.metric}", "at step", "last", *keys]
    rows = []
    for i, r in enumerate(records, 1):
        rows.append(
            [
                str(i),
                r.trial_id,
                r.status,
                str(r.step),
                "-" if r.best is None else f"{r.best:.4f}",
                "-" if r.best_step is None else str(r.best_step),
                "-" if r.last is None else f"{r.last:.4f}",
                *[_format_value(r.params.get(k, "")) for k in keys],
            ]
        )
    widths = [max(len(h), *(len(row[i]) for row in rows)) if rows else len(h) for i, h in enumerate(header)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(header, widths)), "  ".join("-" * w for w in widths)]
    lines += ["  ".join(c.ljust(w) for c, w in zip(row, widths)) for row in rows]
    return "\n".join(lines)


def _plot(spec: SweepSpec, records: list[TrialRecord], path: Path) -> None:
    import matplotlib  # noqa: PLC0415

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415

    fig, ax = plt.subplots(figsize=(9, 5.5), dpi=110)
    for r in records:
        if not r.curve:
            continue
        steps, values = zip(*r.curve)
        params = ", ".join(f"{k.rsplit('.', 1)[-1]}={_format_value(v)}" for k, v in sorted(r.params.items()))
        style = "-" if r.status == "finished" else "--"
        ax.plot(steps, values, style, marker="o", markersize=3, label=f"{r.trial_id} ({r.status}) {params}")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel(spec.metric)
    ax.set_title(f"sweep {spec.name}: {spec.metric} vs step ({spec.scheduler.name}; dashed = stopped early)")
    ax.grid(alpha=0.3)
    if any(r.curve for r in records):
        ax.legend(fontsize=7, loc="best")
    fig.tight_layout()
    tmp = path.with_name(path.stem + ".tmp.png")
    fig.savefig(tmp)
    plt.close(fig)
    tmp.replace(path)


def _write_best_config(spec: SweepSpec, best: TrialRecord, path: Path) -> None:
    """The best trial's resolved config as a fresh run (own name, the base's output dir and retention)."""
    reference = load_config(spec.base, spec.overrides)  # what the user asked for, without the sweep's trial settings
    trial_yaml = Path(best.run_dir) / "config.yaml"
    if trial_yaml.is_file():
        cfg = load_config(trial_yaml)
    else:
        cfg = load_config(spec.base, [*spec.overrides, *(format_override(k, v) for k, v in best.params.items())])
    cfg.run = dataclasses.replace(
        reference.run,
        name=f"{spec.name}-best",
        description=f"best trial {best.trial_id} of sweep {spec.name} ({spec.metric}={best.best})",
    )
    cfg.checkpoint = dataclasses.replace(
        cfg.checkpoint, keep_last=reference.checkpoint.keep_last, keep_best=reference.checkpoint.keep_best
    )
    cfg.trainer = dataclasses.replace(cfg.trainer, progress_bar=reference.trainer.progress_bar)
    dump_config(cfg, path)
    load_config(path)  # it must load as is


def summarize_sweep(spec: SweepSpec, ray_trials: dict[str, dict[str, Any]] | None = None) -> list[TrialRecord]:
    """Rank the trials, print the table and write summary.txt/json, the plot, best_config.yaml and the tb links.

    Args:
        spec: The sweep.
        ray_trials: Ray Tune's view (trial_id -> config, error) when the sweep just ran; without it the records are
            built from the trials' run dirs alone.
    """
    sweep_dir = spec.sweep_dir.resolve()
    ray_trials = ray_trials or {}
    max_steps = load_config(spec.base, _trial_fixed_overrides(spec)).trainer.max_steps
    run_dirs = {p.name: p for p in sorted((sweep_dir / "trials").glob("*")) if p.is_dir()}
    if ray_trials:  # leftovers of a driver killed before Ray Tune recorded their trials are not part of the sweep
        run_dirs = {k: v for k, v in run_dirs.items() if k in ray_trials}
    for d in run_dirs.values():  # hard links a stopped trial had staged for Ray Tune when it was killed
        shutil.rmtree(d / SWEEP_SUBDIR / "staging", ignore_errors=True)
    for trial_id in ray_trials:
        run_dirs.setdefault(trial_id, sweep_dir / "trials" / trial_id)
    records = [
        _trial_record(spec, d, ray_trials.get(tid) if ray_trials else None, max_steps) for tid, d in run_dirs.items()
    ]
    sign = 1.0 if spec.mode == "max" else -1.0
    records.sort(key=lambda r: (r.best is None, -sign * (r.best if r.best is not None else 0.0), r.trial_id))

    table = format_table(spec, records)
    (sweep_dir / "summary.txt").write_text(table + "\n")
    (sweep_dir / "summary.json").write_text(
        json.dumps([dataclasses.asdict(r) for r in records], indent=1, default=str) + "\n"
    )
    _plot(spec, records, sweep_dir / "metric_vs_step.png")
    _link_tensorboard(sweep_dir)
    ranked = [r for r in records if r.best is not None and r.status != "error"]
    if ranked:
        _write_best_config(spec, ranked[0], sweep_dir / "best_config.yaml")
    print(f"\nsweep {spec.name}: {len(records)} trials, ranked by {spec.metric} ({spec.mode})\n{table}\n")
    if ranked:
        print(f"best: {ranked[0].trial_id} {spec.metric}={ranked[0].best:.4f} at step {ranked[0].best_step}")
        print(f"  config:      {sweep_dir / 'best_config.yaml'}   (pretrain train {sweep_dir / 'best_config.yaml'})")
    print(f"  plot:        {sweep_dir / 'metric_vs_step.png'}")
    print(f"  tensorboard: tensorboard --logdir {sweep_dir / 'tb'}")
    return records


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
        print(yaml.safe_dump(json.loads(json.dumps(spec.to_yaml())), sort_keys=False))
        print(f"trial configs valid; {_evals_per_trial(spec, cfg)} eval events per trial; sweep dir {spec.sweep_dir}")
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
