"""The sweep YAML: its schema (:class:`SweepSpec`) and its checks, before anything starts.

The schema is built by :func:`pretrain.config.build_dataclass`, the code that builds run configs: an unknown key fails
naming the closest valid ones, values are checked against the annotations, ``__post_init__`` checks ranges. Search-space
and PBT-mutation keys are config paths: :func:`validate_trial_configs` resolves one trial config per value of every
dimension (both ends of ranges, every choice) as ``pretrain train`` would, so an unknown path (with the closest valid
ones) or a value the run config rejects fails before anything starts (exit 2).
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from data_pipeline.config import ConfigError
from pretrain.config import (
    CONFIGS_DIR,
    PATH_KEYS,
    Config,
    _find_yaml,
    _suggest,
    absolute_paths,
    build_dataclass,
    load_config,
)
from pretrain.yaml_io import read_yaml_mapping

__all__ = ["SweepSpec", "evals_per_trial", "format_override", "load_sweep", "to_tune", "validate_trial_configs"]

EVAL_METRICS = {"val_loss": "min", "val_top1": "max", "val_top5": "max"}
"""Metrics of the trainer's eval events, with the mode that suits each."""
_KINDS = ("choice", "uniform", "loguniform", "randint", "grid")
"""Distributions: ``{uniform: [lo, hi]}``, ``{randint: [lo, hi]}`` (hi excluded), ``{grid: [a, b]}`` (every value)."""
_SCHEDULER_KEYS = {"asha": {"grace_period", "reduction_factor", "max_t", "brackets"}, "fifo": set(),
                   "pbt": {"perturbation_interval", "hyperparam_mutations", "quantile_fraction", "resample_probability",
                           "burn_in_period", "perturbation_factors", "synch"}}  # fmt: skip


def format_override(key: str, value: Any) -> str:
    """``key=value`` that :func:`pretrain.config.parse_overrides` reads back as the same value, in YAML's flow style
    (``1.0e-05`` keeps its dot, a string that reads as a number, such as ``12345_00001``, is quoted)."""
    text = yaml.safe_dump(value, default_flow_style=True, width=math.inf).removesuffix("\n...\n")
    return f"{key}={text.strip()}"


def _distribution(raw: Any, where: str, kinds: tuple[str, ...] = _KINDS) -> dict[str, list[Any]]:
    """A checked ``{kind: values}`` (bounds given as YAML 1.1 strings, ``1e-4``, read as numbers)."""
    if isinstance(raw, list):
        raise ConfigError(f"{where}: a bare list is ambiguous; write {{choice: {raw}}} or {{grid: {raw}}}")
    if not isinstance(raw, dict) or len(raw) != 1:
        raise ConfigError(f"{where}: expected one of {', '.join(kinds)} as a mapping, e.g. {{loguniform: [1e-4, 0.1]}}")
    ((kind, values),) = raw.items()
    if kind not in kinds:
        hint = _suggest(str(kind), list(kinds)) or f"; known: {', '.join(kinds)}"
        raise ConfigError(f"{where}: unknown key '{kind}'{hint}")
    if not isinstance(values, list) or not values:
        raise ConfigError(f"{where}: {kind} needs a non-empty list, got {values!r}")
    if kind in ("choice", "grid"):
        return {kind: list(values)}
    try:
        lo, hi = (float(v) if isinstance(v, str) else v for v in values)
    except ValueError:
        lo = hi = None
    if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in (lo, hi)):
        raise ConfigError(f"{where}: {kind} needs [low, high] numbers, got {values!r}")
    if not lo < hi or (kind == "loguniform" and lo <= 0):
        raise ConfigError(f"{where}: {kind} needs low < high" + (", low > 0" if kind == "loguniform" else "") +
                          f", got {values!r}")  # fmt: skip
    if kind == "randint" and not (isinstance(lo, int) and isinstance(hi, int)):
        raise ConfigError(f"{where}: randint needs integer bounds [low, high), got {values!r}")
    return {kind: [lo, hi] if kind == "randint" else [float(lo), float(hi)]}


def _points(dist: dict[str, list[Any]]) -> list[Any]:
    """Values that exercise a dimension when validating trial configs: every choice, both ends of a range."""
    ((kind, values),) = dist.items()
    return [values[0], values[1] - 1] if kind == "randint" else list(values)


def to_tune(dist: dict[str, list[Any]], for_mutation: bool = False) -> Any:
    """The Ray Tune domain of a dimension (PBT mutations take a plain list for ``choice``)."""
    from ray import tune  # noqa: PLC0415

    ((kind, values),) = dist.items()
    if kind == "choice" and for_mutation:
        return list(values)
    return {"choice": tune.choice, "grid": tune.grid_search}.get(kind, lambda v: getattr(tune, kind)(*v))(values)


@dataclass
class SchedulerSpec:
    """Trial scheduler; its settings are Ray Tune's keyword arguments. Times count eval events, not optimizer steps."""

    name: Literal["asha", "pbt", "fifo"] = "asha"
    """``asha`` (stops bad trials early), ``pbt`` (population based training) or ``fifo`` (every trial to the end)."""
    grace_period: int = 1
    """ASHA: evals a trial gets before it can be stopped."""
    reduction_factor: float = 2
    """ASHA: 1/reduction_factor of the trials continue at each rung."""
    max_t: int | None = None
    """ASHA: evals of the longest trial (default: from the trial config)."""
    brackets: int = 1
    """ASHA: brackets of successive halving."""
    perturbation_interval: int = 1
    """PBT: evals between exploit/explore decisions."""
    hyperparam_mutations: dict[str, Any] = field(default_factory=dict)
    """PBT: config path -> distribution (as in ``space``, no ``grid``)."""
    quantile_fraction: float = 0.25
    """PBT: the bottom fraction clones the top fraction."""
    resample_probability: float = 0.25
    """PBT: chance of resampling a value instead of perturbing it."""
    burn_in_period: int = 0
    """PBT: evals before the first perturbation."""
    perturbation_factors: list[float] = field(default_factory=lambda: [1.2, 0.8])
    """PBT: factors a continuous value is multiplied by."""
    synch: bool = False
    """PBT: wait for every trial at each perturbation."""

    def __post_init__(self):
        own = _SCHEDULER_KEYS[self.name]
        for f in dataclasses.fields(self):  # a setting of another scheduler, given: a mistake
            default = f.default_factory() if callable(f.default_factory) else f.default
            if f.name not in {"name", *own} and getattr(self, f.name) != default:
                raise ConfigError(f"scheduler.{f.name} is no setting of {self.name}; it takes {sorted(own) or 'none'}")
        if min(self.grace_period, self.brackets, self.perturbation_interval) < 1:
            raise ConfigError("scheduler.grace_period, brackets and perturbation_interval must be >= 1 (evals)")
        if self.reduction_factor <= 1:
            raise ConfigError(f"scheduler.reduction_factor must be > 1, got {self.reduction_factor}")
        if self.max_t is not None and self.max_t < self.grace_period:
            raise ConfigError(f"scheduler.max_t must be >= grace_period (evals), got {self.max_t}")
        if not 0 < self.quantile_fraction <= 0.5 or not 0 <= self.resample_probability <= 1:
            raise ConfigError("scheduler.quantile_fraction must be in (0, 0.5], resample_probability in [0, 1]")
        if len(self.perturbation_factors) != 2 or min(self.perturbation_factors) <= 0:
            raise ConfigError("scheduler.perturbation_factors must be two positive numbers, e.g. [1.2, 0.8]")
        if self.name == "pbt" and not self.hyperparam_mutations:
            raise ConfigError("scheduler.hyperparam_mutations: PBT needs config paths to mutate, e.g. optim.lr")
        for path, dist in self.hyperparam_mutations.items():
            where = f"scheduler.hyperparam_mutations.{path}"
            self.hyperparam_mutations[path] = _distribution(dist, where, _KINDS[:-1])  # no grid

    def ray_kwargs(self) -> dict[str, Any]:
        """The settings of this scheduler, as keyword arguments of its Ray Tune class."""
        return {k: getattr(self, k) for k in _SCHEDULER_KEYS[self.name]}


@dataclass
class Resources:
    """What one trial gets."""

    cpu: float = 1
    """CPUs of a local trial; its ranks share them (``OMP_NUM_THREADS``)."""
    gpu: float = 0
    """GPUs of a local trial (one per rank)."""
    nproc: int = 1
    """Ranks of the trial's run (``pretrain train --nproc``; tasks of a Slurm trial)."""

    def __post_init__(self):
        if self.cpu < 0 or self.gpu < 0 or self.nproc < 1:
            raise ConfigError("resources.cpu and resources.gpu must be >= 0, resources.nproc >= 1")
        if 0 < self.gpu < self.nproc:
            raise ConfigError(f"resources.gpu={self.gpu} is less than nproc={self.nproc} (one GPU per rank)")


@dataclass
class SweepSpec:
    """A sweep YAML. ``sweep.yaml`` in the sweep dir is this, with every path absolute (what ``--resume`` runs)."""

    base: str = ""
    """Run config of every trial (a path, or a name in ``configs/run/``)."""
    space: dict[str, Any] = field(default_factory=dict)
    """Config path -> distribution, e.g. ``optim.lr: {loguniform: [1.0e-4, 1.0e-2]}``."""
    name: str = ""
    """Sweep name (default: the YAML's file name); the sweep dir is ``output_dir/name``."""
    description: str = ""
    """Free text."""
    output_dir: str = "runs/sweeps"
    """Parent folder of sweep dirs."""
    overrides: list[str] = field(default_factory=list)
    """``section.field=value`` applied to every trial."""
    scheduler: SchedulerSpec = field(default_factory=SchedulerSpec)
    """Trial scheduler (``scheduler: fifo`` is short for ``{name: fifo}``)."""
    metric: str = "val_top1"
    """Eval metric that ranks trials and checkpoints."""
    mode: Literal["max", "min"] | None = None
    """``max`` or ``min`` (default: what suits the metric)."""
    num_samples: int = 1
    """Samples of the space (with ``grid`` dimensions: repeats of the grid)."""
    max_concurrent: int = 0
    """Trials running at once; 0: as many as the resources allow."""
    resources: Resources = field(default_factory=Resources)
    """Per trial."""
    max_failures: int = 1
    """Retries of a failed trial (it resumes from its newest checkpoint)."""
    keep_checkpoints: int = 2
    """Checkpoints Ray Tune keeps per trial, the best by ``metric``."""
    trial_backend: Literal["local", "slurm"] = "local"
    """``local`` (a process per trial) or ``slurm`` (a Slurm job per trial; the driver stays here)."""
    slurm: dict[str, Any] = field(default_factory=dict)
    """Slurm trials: ``profile`` (``configs/cluster/``) and ``launch.cluster_params.ClusterParams`` keys."""
    seed: int | None = 0
    """Seed of the sampling of the space (None: random)."""
    stop_grace_s: float = 20.0
    """Seconds a stopped trial's run gets to checkpoint and end before it is signalled (Slurm: cancelled)."""
    workdir: str = ""
    """Where ``pretrain sweep`` ran (absolute): local trials run there, so relative ``base:`` files resolve alike."""

    def __post_init__(self):
        if not self.base:
            raise ConfigError("'base' (the run config of every trial) is missing")
        if not re.fullmatch(r"[A-Za-z0-9._-]*", self.name) or self.name in (".", ".."):
            raise ConfigError(f"sweep name {self.name!r} must be a folder name (letters, digits, '.', '_', '-')")
        if self.metric not in EVAL_METRICS:
            hint = _suggest(self.metric, list(EVAL_METRICS)) or f"; known: {', '.join(EVAL_METRICS)}"
            raise ConfigError(f"metric '{self.metric}' is not an eval metric of the trainer{hint}")
        self.mode = self.mode or EVAL_METRICS[self.metric]
        for key, low in (("num_samples", 1), ("max_concurrent", 0), ("max_failures", 0), ("keep_checkpoints", 1),
                         ("stop_grace_s", 0)):  # fmt: skip
            if getattr(self, key) < low:
                raise ConfigError(f"{key} must be >= {low}, got {getattr(self, key)!r}")
        if not self.space:
            raise ConfigError("'space' must map config paths to distributions, e.g. optim.lr: {uniform: [1e-4, 0.1]}")
        for path, dist in self.space.items():
            self.space[path] = _distribution(dist, f"space.{path}")
        varied = [
            str(p) for p in (*self.space, *self.scheduler.hyperparam_mutations)
        ]  # checked: validate_trial_configs
        for key in [*varied, *(o.split("=", 1)[0].strip() for o in self.overrides)]:
            if key in ("run.name", "run.output_dir") or "." not in key:
                why = "is set by the sweep for every trial (its run dir)" if "." in key else "names no config field"
                raise ConfigError(f"'{key}' {why}; vary or override a field such as optim.lr")
        if self.trial_backend == "slurm":
            try:
                self.cluster_params()
            except ConfigError as e:
                raise ConfigError(f"slurm: {e}") from e

    def cluster_params(self) -> Any:
        """``ClusterParams`` of a Slurm trial's job from ``slurm:`` (``profile`` plus ClusterParams keys; cluster
        ``slurm`` unless the profile says otherwise), one task (or GPU) per rank."""
        from launch.cluster_params import load_cluster_params  # noqa: PLC0415 - only the Slurm backend needs it

        opts = {k: v for k, v in self.slurm.items() if k != "profile"}
        if "profile" not in self.slurm:
            opts.setdefault("cluster", "slurm")
        opts["gpus_per_node" if opts.get("gpus_per_node") else "tasks_per_node"] = self.resources.nproc
        return load_cluster_params(self.slurm.get("profile"), **opts)

    @property
    def sweep_dir(self) -> Path:
        return Path(self.output_dir) / self.name

    def dimensions(self) -> dict[str, dict[str, list[Any]]]:
        """The space plus the PBT mutations it does not sample (PBT mutates values the trials started with)."""
        return {**self.scheduler.hyperparam_mutations, **self.space}

    def trial_overrides(self) -> list[str]:
        """Overrides of every trial: the sweep's trial defaults (Ray Tune keeps the best checkpoints, a run dir its
        newest; no progress bar in logs nobody watches), then the sweep's own."""
        return ["checkpoint.keep_last=1", "checkpoint.keep_best=0", "trainer.progress_bar=false", *self.overrides]


def load_sweep(path: str | Path, extra_overrides: list[str] | None = None, **flags: Any) -> SweepSpec:
    """Read and check a sweep YAML; ``flags`` (the CLI's ``--name`` etc., None: not given) override its fields, and
    every path is made absolute against the working directory (trials start elsewhere: Ray's folders, Slurm nodes).
    Raises ConfigError naming the bad key or value, with the closest valid keys."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"sweep config '{path}' does not exist (examples: {CONFIGS_DIR / 'sweep'})")
    raw = read_yaml_mapping(path)
    raw["overrides"] = [*(raw.get("overrides") or []), *(extra_overrides or [])]
    raw.update({k: v for k, v in flags.items() if v is not None})
    raw["name"] = raw.get("name") or path.stem
    if isinstance(raw.get("scheduler"), str):
        raw["scheduler"] = {"name": raw["scheduler"].lower()}
    try:
        spec = build_dataclass(SweepSpec, raw, kind="sweep")
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}") from e
    cwd = Path.cwd()
    spec.workdir = spec.workdir or str(cwd)  # sweep.yaml (--resume) keeps where the sweep started
    spec.output_dir = os.path.normpath(cwd / Path(spec.output_dir).expanduser())
    spec.base = str(_find_yaml("run", spec.base, near=CONFIGS_DIR.parent, beside=path.parent))
    for key in PATH_KEYS:  # a path in the space: every value absolute
        if key in spec.space and ("choice" in spec.space[key] or "grid" in spec.space[key]):
            ((kind, values),) = spec.space[key].items()
            spec.space[key] = {kind: [os.path.normpath(cwd / os.path.expanduser(v)) for v in values]}
    cfg = load_config(spec.base, spec.trial_overrides())
    spec.overrides += absolute_paths(cfg, cwd, skip=(*spec.space, "run.output_dir"))
    return spec


def validate_trial_configs(spec: SweepSpec) -> list[Config]:
    """Resolve one trial config per value of every dimension (others at their first value), the first one first.
    Raises ConfigError naming the dimension and value whose trial config is invalid."""
    dims = {k: _points(d) for k, d in spec.dimensions().items()}
    first = {k: v[0] for k, v in dims.items()}
    configs = []
    for key, value in [(None, None)] + [(k, v) for k, vs in dims.items() for v in vs[1:]]:
        point = {**first, key: value} if key else first
        try:
            configs.append(load_config(spec.base, [*spec.trial_overrides(), "run.name=validate",
                                                   *(format_override(k, v) for k, v in point.items())]))  # fmt: skip
        except ConfigError as e:
            what = f"space {key}={value!r}" if key else f"trial config with {first}"
            raise ConfigError(f"{what}: the trial config is invalid: {e}") from e
    if not configs[0].data.val_split:
        raise ConfigError("the sweep needs evaluation to report its metric, but data.val_split is empty")
    ev, ck = configs[0].trainer.eval_every_steps, configs[0].checkpoint.every_steps
    if spec.scheduler.name == "pbt" and (ev <= 0 or ck <= 0 or ev % ck):
        raise ConfigError(
            f"PBT clones checkpoints at evals: checkpoint.every_steps={ck} must divide trainer.eval_every_steps="
            f"{ev} (both > 0); add e.g. 'checkpoint.every_steps={max(ev, 1)}' to the sweep's overrides"
        )
    return configs


def evals_per_trial(configs: list[Config]) -> int:
    """Eval events of the longest trial (ASHA's ``max_t`` default), from the configs :func:`validate_trial_configs`
    resolved: the most steps at the shortest eval interval."""
    steps = max(c.trainer.max_steps for c in configs)
    every = min(c.trainer.eval_every_steps for c in configs)
    return max(1, math.ceil(steps / every)) if every > 0 else 1
