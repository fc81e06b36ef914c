"""The sweep YAML: its schema (:class:`SweepSpec`) and its validation, before anything starts.

A sweep YAML names a base run config, overrides applied to every trial, a search space over *config paths* (checked
against the dataclass schema of :mod:`pretrain.config`; an unknown path fails with the closest valid ones), a scheduler
(ASHA by default, PBT, FIFO), the eval metric and mode, the number of samples, per-trial resources, retries and how
many checkpoints Ray Tune keeps per trial. :func:`load_sweep` reads and checks it; :func:`validate_trial_configs`
resolves one trial config per value of every search dimension (both ends of ranges, every choice) with
:func:`pretrain.config.load_config`, so a value the schema or a cross-field check rejects fails the sweep at once
(exit 2). Running the sweep is :mod:`launch.sweep`'s job.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from launch.sweep_trial import format_override, slurm_cluster_params
from pretrain.config import (
    CONFIGS_DIR,
    PATH_KEYS,
    Config,
    ConfigError,
    _all_keys,
    _suggest,
    absolute_paths,
    load_config,
    read_yaml_mapping,
)

__all__ = [
    "DISTRIBUTIONS",
    "EVAL_METRICS",
    "Distribution",
    "SchedulerSpec",
    "SweepSpec",
    "evals_per_trial",
    "load_sweep",
    "spec_from_yaml",
    "trial_fixed_overrides",
    "validate_trial_configs",
]

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
_TRIAL_DEFAULT_OVERRIDES = ["checkpoint.keep_best=0", "trainer.progress_bar=false"]

_TOP_KEYS = (
    "name", "description", "output_dir", "base", "overrides", "space", "scheduler", "metric", "mode", "num_samples",
    "max_concurrent", "resources", "max_failures", "keep_checkpoints", "trial_keep_last", "trial_backend", "slurm",
    "seed", "stop_grace_s", "workdir",
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
    workdir: str = ""
    """The directory ``pretrain sweep`` was run from (absolute): relative paths of the user's were resolved there, and
    local trials run there, so a run config's relative ``base:`` files resolve as in ``pretrain train``."""

    @property
    def sweep_dir(self) -> Path:
        return Path(self.output_dir) / self.name

    def to_yaml(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["space"] = {k: d.to_yaml() for k, d in self.space.items()}
        out["scheduler"] = self.scheduler.to_yaml()
        return out


def spec_from_yaml(stored: dict[str, Any]) -> SweepSpec:
    """The spec :meth:`SweepSpec.to_yaml` wrote (``sweep.yaml``, what ``--resume`` runs again); not validated again."""
    stored = dict(stored)
    space = {k: Distribution(*next(iter(v.items()))) for k, v in stored.pop("space").items()}
    sched = dict(stored.pop("scheduler"))
    name = sched.pop("name")
    if "hyperparam_mutations" in sched:
        sched["hyperparam_mutations"] = {
            k: Distribution(*next(iter(v.items()))) for k, v in sched["hyperparam_mutations"].items()
        }
    return SweepSpec(space=space, scheduler=SchedulerSpec(name, sched), **stored)


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
    raw = read_yaml_mapping(path)
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
        raise ConfigError(f"{path}: slurm must map launch.cluster_params.ClusterParams keys (and 'profile') to values")
    if spec.trial_backend == "slurm":
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
    _pin_paths(spec)
    return spec


def _pin_paths(spec: SweepSpec) -> None:
    """Make every path the user gave absolute, against the directory ``pretrain sweep`` runs in.

    Trials start in Ray Tune's trial folders (or on a Slurm node): a relative ``data.path`` from the base config, an
    override or the space would be looked up there. ``sweep.yaml`` records the absolute paths, so ``--resume`` from
    another directory continues the same sweep.
    """
    cwd = Path.cwd()
    spec.workdir = str(cwd)
    spec.output_dir = os.path.normpath(cwd / Path(spec.output_dir).expanduser())
    for key in PATH_KEYS:
        dist = spec.space.get(key)
        if dist is not None and dist.kind in ("choice", "grid"):
            dist.values = [
                os.path.normpath(cwd / Path(v).expanduser()) if isinstance(v, str) else v for v in dist.values
            ]
    try:
        cfg = load_config(spec.base, trial_fixed_overrides(spec))
    except ConfigError as e:
        raise ConfigError(f"the trial config (base + overrides) is invalid: {e}") from e
    spec.overrides = [*spec.overrides, *absolute_paths(cfg, cwd, skip=(*spec.space, "run.output_dir"))]


def trial_fixed_overrides(spec: SweepSpec) -> list[str]:
    """Overrides of every trial: the sweep's defaults for trials, then the sweep YAML's own overrides."""
    return [f"checkpoint.keep_last={spec.trial_keep_last}", *_TRIAL_DEFAULT_OVERRIDES, *spec.overrides]


def validate_trial_configs(spec: SweepSpec) -> Config:
    """Resolve one trial config per value of every dimension (others at their first value); return the first.

    Raises:
        ConfigError: naming the dimension and value whose trial config is invalid.
    """
    fixed = trial_fixed_overrides(spec) + ["run.name=validate"]
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


def evals_per_trial(spec: SweepSpec, cfg: Config) -> int:
    """Eval events of the longest trial (ASHA's ``max_t`` default)."""
    steps = max([cfg.trainer.max_steps] + [int(v) for v in _points(spec, "trainer.max_steps")])
    every = min([cfg.trainer.eval_every_steps] + [int(v) for v in _points(spec, "trainer.eval_every_steps")])
    return max(1, math.ceil(steps / every)) if every > 0 else 1


def _points(spec: SweepSpec, key: str) -> list[Any]:
    return spec.space[key].points() if key in spec.space else []
