"""Typed configuration: dataclass sections are the schema, YAML files and ``section.field=value`` fill in values.

Precedence is dataclass defaults < model YAML < data YAML < run YAML < command-line overrides. A run YAML names its
model and data configs (``base: {model: sepvit_lite, data: digits}``) and never repeats their numbers. Unknown keys,
wrong types and invalid values raise :class:`ConfigError` naming the key and the closest valid keys, before anything
is built. The fully resolved config is written to the run directory as ``config.yaml``.
"""

from __future__ import annotations

import dataclasses
import difflib
import hashlib
import importlib.util
import json
import os
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from data_pipeline.config import AugmentConfig, ConfigError, DataConfig
from pretrain.config_ranges import NUMERIC_RULES, Range, check_ranges
from pretrain.yaml_io import read_yaml_mapping, read_yaml_value

__all__ = [
    "CheckpointConfig",
    "Config",
    "DeepSpeedConfig",
    "LoggingConfig",
    "ModelConfig",
    "OptimConfig",
    "RunConfig",
    "ScheduleConfig",
    "TrainerConfig",
    "CONFIGS_DIR",
    "FP16_NEEDS_GPU",
    "NUMERIC_RULES",
    "Range",
    "PATH_KEYS",
    "absolute_paths",
    "build_dataclass",
    "check_ranges",
    "config_digest",
    "config_to_dict",
    "dump_config",
    "load_config",
    "model_shape_digest",
    "parse_overrides",
]


def _configs_dir() -> Path:
    """The shipped configs: ``configs/`` of the checkout this package runs from (an editable install), else the copy
    a wheel installs as the data-only package ``vitpretrain_configs``."""
    checkout = Path(__file__).resolve().parent.parent / "configs"
    if checkout.is_dir():
        return checkout
    spec = importlib.util.find_spec("vitpretrain_configs")
    if spec is not None and spec.submodule_search_locations:
        return Path(next(iter(spec.submodule_search_locations)))
    return checkout  # neither: lookups fail naming configs/<kind>/


CONFIGS_DIR = _configs_dir()
"""Where a bare ``base`` name (``model: sepvit_lite``) and the examples are looked up (after the run YAML's folder)."""

FP16_NEEDS_GPU = (
    "trainer.precision=fp16 needs a GPU (DeepSpeed's loss-scaled fp16 has no CPU kernels); on CPU use "
    "trainer.precision=bf16 (bf16 weights, fp32 master weights) or fp32"
)


@dataclass
class RunConfig:
    name: str = "default"
    """Run name; the run directory is ``output_dir/name``."""
    output_dir: str = "runs"
    """Parent folder of run directories."""
    description: str = ""
    """Free text kept in the resolved config."""

    def __post_init__(self):
        if not self.name or "/" in self.name or self.name in (".", ".."):
            raise ConfigError(f"run.name={self.name!r} must be a non-empty folder name without '/'")


@dataclass
class ModelConfig:
    name: str = "sepvit_lite"
    """Registered variant, see ``pretrain models``."""
    num_classes: int = 1000
    """Classifier outputs; 0 removes the head. Set from the data manifest when the data config says so."""
    img_size: int = 224
    """Input resolution the model is built for (square)."""
    drop_path_rate: float = 0.1
    """Stochastic depth rate, grown linearly from 0 over the blocks."""
    drop_rate: float = 0.0
    """Dropout before the classifier."""
    kwargs: dict[str, Any] = field(default_factory=dict)
    """Extra keyword arguments of the variant (e.g. ``window_sizes`` for SepViT, ``attention`` for SeTformer)."""
    init_from: str = ""
    """Start from these weights (an export, a checkpoint or a run dir), adapted to this head and size; no optimizer."""

    def __post_init__(self):
        check_ranges(self, "model")

    def build_kwargs(self) -> dict[str, Any]:
        """The keyword arguments the variant ``name`` is built with (``create_model(name, **build_kwargs())``)."""
        return dict(num_classes=self.num_classes, img_size=self.img_size, drop_path_rate=self.drop_path_rate,
                    drop_rate=self.drop_rate, **self.kwargs)  # fmt: skip


@dataclass
class OptimConfig:
    name: Literal["adamw", "sgd"] = "adamw"
    """Optimizer."""
    lr: float = 1e-3
    """Peak learning rate (after warmup), for the global batch."""
    weight_decay: float = 0.05
    """Decoupled weight decay; norms, biases and tokens (``no_weight_decay``) get none."""
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    """Adam betas."""
    eps: float = 1e-8
    """Adam epsilon."""
    momentum: float = 0.9
    """SGD momentum."""
    grad_clip: float = 5.0
    """Gradient norm clipping; 0 disables."""
    layer_decay: float = 1.0
    """Layer-wise lr decay (BEiT, timm) for fine-tuning: block k of L (0-based, over all stages) gets
    ``lr * layer_decay ** (L - k)``, the patch embedding ``lr * layer_decay ** (L + 1)``, final norm and head ``lr``;
    1.0 disables."""

    def __post_init__(self):
        if len(self.betas) != 2:
            raise ConfigError("optim.betas needs two values, e.g. [0.9, 0.999]")
        check_ranges(self, "optim")


@dataclass
class ScheduleConfig:
    name: Literal["cosine", "constant", "linear"] = "cosine"
    """Decay after warmup."""
    warmup_steps: int = 100
    """Optimizer steps of linear warmup from ``warmup_lr``."""
    warmup_lr: float = 1e-6
    """Learning rate at step 0."""
    min_lr: float = 1e-5
    """Learning rate at the last step."""

    def __post_init__(self):
        check_ranges(self, "schedule")


@dataclass
class TrainerConfig:
    max_steps: int = 1000
    """Optimizer steps of the whole run."""
    eval_every_steps: int = 200
    """Evaluate every N steps (and at the end); 0 only at the end."""
    log_every_steps: int = 10
    """Write a metrics event every N steps."""
    seed: int = 0
    """Seed of model init, augmentation and dropout (data order has ``data.seed``)."""
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"
    """Training precision: fp32, bf16 (bf16 weights with fp32 masters, on CPU as on GPU) or fp16 (GPU only)."""
    grad_accum_steps: int = 1
    """Micro-batches per optimizer step."""
    global_batch_size: int = 0
    """If > 0, must equal data.batch_size x grad_accum_steps x world size (checked at start)."""
    ema_decay: float = 0.0
    """EMA of weights (e.g. 0.9998); 0 disables. The EMA model is evaluated separately."""
    activation_checkpointing: bool = False
    """Recompute block activations in backward to save memory."""
    compile: bool = False
    """torch.compile each transformer block in place, after DeepSpeed wraps the model (blocks of one configuration
    share a graph); the first step includes the compile time, logged once."""
    compile_backend: str = "inductor"
    """torch.compile backend with ``compile=true`` (``inductor``; ``aot_eager`` traces without code generation)."""
    max_nonfinite_steps: int = 5
    """Stop after this many consecutive steps with a NaN/Inf loss or gradient norm (each is skipped; with gradient
    accumulation one non-finite micro-batch skips its optimizer step). Checked when the steps are read back from the
    device: at the next log step or checkpoint."""
    device: Literal["auto", "cpu", "cuda"] = "auto"
    """Training device; auto picks CUDA when present."""
    progress_bar: bool = True
    """Rank-0 progress bar."""

    @property
    def needs_gpu(self) -> bool:
        """``device=cuda`` or ``precision=fp16`` (bf16 and fp32 train on CPU ranks too)."""
        return self.device == "cuda" or self.precision == "fp16"

    def __post_init__(self):
        check_ranges(self, "trainer")


@dataclass
class CheckpointConfig:
    every_steps: int = 200
    """Save every N steps; 0 disables step-based saves."""
    every_minutes: float = 30.0
    """Also save when this many minutes passed since the last save; 0 disables."""
    keep_last: int = 2
    """Keep the newest K complete checkpoints."""
    keep_best: int = 1
    """Also keep the best K by ``best_metric``; 0 disables."""
    best_metric: str = "val_top1"
    """Eval metric that ranks checkpoints."""
    best_mode: Literal["max", "min"] = "max"
    """Whether a larger or smaller ``best_metric`` is better."""
    save_final: bool = True
    """Save at the end of training."""

    def __post_init__(self):
        check_ranges(self, "checkpoint")


@dataclass
class LoggingConfig:
    tensorboard: bool = True
    """Write TensorBoard event files to ``<run>/tb``."""
    level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    """Python log level of rank 0 (other ranks log warnings and errors)."""
    corrupt_log_every: int = 100
    """Log the first corrupt sample and then every Nth per reason."""

    def __post_init__(self):
        check_ranges(self, "logging")


@dataclass
class DeepSpeedConfig:
    zero_stage: int = 2
    """ZeRO stage 0 (DDP), 1 (optimizer states), 2 (+gradients), 3 (+parameters)."""
    offload_optimizer: Literal["none", "cpu"] = "none"
    """ZeRO-Offload of optimizer states."""
    offload_param: Literal["none", "cpu"] = "none"
    """ZeRO-3 parameter offload."""
    overrides: dict[str, Any] = field(default_factory=dict)
    """Raw DeepSpeed config keys merged last (e.g. ``{"zero_optimization": {"reduce_bucket_size": 5e7}}``)."""

    def __post_init__(self):
        if self.zero_stage not in (0, 1, 2, 3):
            raise ConfigError(f"deepspeed.zero_stage={self.zero_stage} must be 0, 1, 2 or 3")
        check_ranges(self, "deepspeed")
        if self.offload_param != "none" and self.zero_stage != 3:
            raise ConfigError("deepspeed.offload_param needs deepspeed.zero_stage=3")


@dataclass
class Config:
    run: RunConfig = field(default_factory=RunConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    deepspeed: DeepSpeedConfig = field(default_factory=DeepSpeedConfig)

    def __post_init__(self):
        # the data sections live in data_pipeline, which checks their own rules; the ranges are the schema's
        check_ranges(self.data, "data")
        check_ranges(self.augment, "augment")
        if self.augment.ratio_min > self.augment.ratio_max:
            raise ConfigError(
                f"augment.ratio_min={self.augment.ratio_min} exceeds augment.ratio_max={self.augment.ratio_max}"
            )
        if self.schedule.warmup_steps > self.trainer.max_steps:
            raise ConfigError(
                f"schedule.warmup_steps={self.schedule.warmup_steps} exceeds trainer.max_steps="
                f"{self.trainer.max_steps}; lower the warmup or raise max_steps"
            )
        if self.trainer.precision == "fp16" and self.trainer.device == "cpu":
            raise ConfigError(FP16_NEEDS_GPU)

    @property
    def run_dir(self) -> Path:
        return Path(self.run.output_dir) / self.run.name


# ----------------------------------------------------------------------------------------------- building from dicts


def _all_keys(cls=Config, prefix: str = "") -> list[str]:
    keys = []
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        path = f"{prefix}{f.name}"
        keys.append(path)
        if dataclasses.is_dataclass(hints[f.name]):
            keys.extend(_all_keys(hints[f.name], path + "."))
    return keys


def _hints(cls) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _suggest(key: str, candidates: list[str]) -> str:
    depth = key.count(".")
    leaf = key.rsplit(".", 1)[-1]
    same_leaf = [c for c in candidates if c.rsplit(".", 1)[-1] == leaf and c != key]  # right field, wrong section
    same_depth = [c for c in candidates if c.count(".") == depth]
    close = same_leaf + [c for c in difflib.get_close_matches(key, same_depth, n=3, cutoff=0.5) if c not in same_leaf]
    close = close[:3]
    if not close:
        # try matching on the last component only, e.g. 'max_step' -> 'trainer.max_steps'
        leaf = key.rsplit(".", 1)[-1]
        by_leaf = {c.rsplit(".", 1)[-1]: c for c in candidates}
        close = [by_leaf[m] for m in difflib.get_close_matches(leaf, list(by_leaf), n=3, cutoff=0.6)]
    return f"; did you mean {', '.join(close)}?" if close else ""


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Check ``value`` against the annotation ``tp`` and convert safe cases (int -> float, str -> number on the CLI)."""
    origin = typing.get_origin(tp)
    if tp is Any:
        return value
    if origin is Literal:
        allowed = typing.get_args(tp)
        if value not in allowed:
            raise ConfigError(f"{key}={value!r} is not one of {list(allowed)}")
        return value
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for a in args:
            if a is type(None):
                continue
            try:
                return _coerce(value, a, key)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0] if errors else f"{key}: bad value {value!r}")
    if origin is list:
        (item_tp,) = typing.get_args(tp) or (Any,)
        if isinstance(value, tuple):
            value = list(value)
        if not isinstance(value, list):
            raise ConfigError(f"{key} expects a list, got {type(value).__name__} {value!r}")
        return [_coerce(v, item_tp, f"{key}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key} expects a mapping, got {type(value).__name__} {value!r}")
        return dict(value)
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{key} expects true/false, got {type(value).__name__} {value!r}")
    if tp in (int, float) and isinstance(value, str):
        # YAML 1.1 reads '3e-4' (no dot) as a string: accept numeric strings for number fields
        try:
            value = int(value) if tp is int else float(value)
        except ValueError:
            kind = "an integer" if tp is int else "a number"
            raise ConfigError(f"{key} expects {kind}, got str {value!r}") from None
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            if isinstance(value, float) and value.is_integer():
                return int(value)
            raise ConfigError(f"{key} expects an integer, got {type(value).__name__} {value!r}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key} expects a number, got {type(value).__name__} {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key} expects a string, got {type(value).__name__} {value!r}")
        return value
    return value


def _build(cls, data: dict[str, Any], prefix: str = "", root: Any = None, kind: str = "config"):
    """Instantiate dataclass ``cls`` from a nested dict, rejecting unknown keys (suggesting keys of ``root``, default
    :class:`Config`) and wrong types."""
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix.rstrip('.') or 'config'} expects a mapping, got {data!r}")
    hints = _hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    for k in data:
        if k not in names:
            full = f"{prefix}{k}"
            raise ConfigError(f"unknown {kind} key '{full}'{_suggest(full, _all_keys(root or Config))}")
    kwargs = {}
    for f in dataclasses.fields(cls):
        if f.name not in data:
            continue
        tp = hints[f.name]
        key = f"{prefix}{f.name}"
        if dataclasses.is_dataclass(tp):
            kwargs[f.name] = _build(tp, data[f.name] or {}, key + ".", root, kind)
        else:
            kwargs[f.name] = _coerce(data[f.name], tp, key)
    try:
        obj = cls(**kwargs)
    except ConfigError:
        raise
    except (TypeError, ValueError) as e:
        raise ConfigError(f"{prefix.rstrip('.')}: {e}") from e
    if (root or Config) is not Config:  # another schema (cluster profile, sweep file): no NaN or inf in it either
        check_ranges(obj, prefix.rstrip("."))
    return obj


def build_dataclass(cls: Any, data: dict[str, Any], kind: str = "config") -> Any:
    """``cls(**data)`` checked as a run config is: an unknown key fails naming the closest valid keys of ``cls``, values
    are checked against (and coerced to) the annotations, nested dataclasses are built from mappings, and ``cls``'s
    ``__post_init__`` checks run. ``kind`` names the schema in messages ("unknown cluster key ...").

    Raises:
        ConfigError: naming the key and the fix.
    """
    return _build(cls, data, root=cls, kind=kind)


def config_to_dict(cfg: Config) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


def _deep_merge(base: dict, update: dict) -> dict:
    out = dict(base)
    for k, v in update.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict) and k not in ("kwargs", "overrides"):
            out[k] = _deep_merge(out[k], v)
        elif isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = _deep_merge(out[k], v)  # kwargs/overrides merge too: later files add or replace keys
        else:
            out[k] = v
    return out


# ---------------------------------------------------------------------------------------------------- YAML and CLI


def parse_overrides(overrides: list[str]) -> dict[str, Any]:
    """Turn ``["optim.lr=3e-4", "model.kwargs.window_sizes=[[2],[2]]"]`` into a nested dict (values parsed as YAML)."""
    nested: dict[str, Any] = {}
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not of the form section.field=value")
        key, raw = item.split("=", 1)
        key = key.strip()
        if not key or key.startswith(".") or key.endswith("."):
            raise ConfigError(f"override {item!r} has an empty key")
        value = read_yaml_value(raw, f"override {item!r}") if raw != "" else ""
        parts = key.split(".")
        if len(parts) < 2:
            raise ConfigError(f"override key '{key}' needs a section, e.g. 'trainer.{key}'{_suggest(key, _all_keys())}")
        node = nested
        for p in parts[:-1]:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {item!r} conflicts with another override of '{p}'")
        node[parts[-1]] = value
    return nested


def _find_yaml(kind: str, name: str, near: Path | None, beside: Path | None = None) -> Path:
    """A ``base:`` file: a path relative to the working directory, then to the run config's own folder (``beside``),
    then to ``configs/``; a bare name is looked up in ``configs/<kind>/``. The result is absolute."""
    candidates = []
    p = Path(name).expanduser()
    if p.suffix in (".yaml", ".yml"):
        candidates.append(p)
        if beside is not None:
            candidates.append(beside / p)
        if near is not None:
            candidates.append(near / p)
    for root in ([near] if near else []) + [CONFIGS_DIR]:
        candidates.append(root / kind / f"{name}.yaml")
        candidates.append(root.parent / kind / f"{name}.yaml")
    for c in candidates:
        if c.is_file():
            return Path(os.path.abspath(c))
    known = sorted(x.stem for x in (CONFIGS_DIR / kind).glob("*.yaml"))
    raise ConfigError(f"{kind} config '{name}' not found (looked in configs/{kind}/); known: {', '.join(known)}")


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """Resolve a run config: defaults < ``base`` model/data YAML < the run YAML < ``section.field=value`` overrides."""
    merged: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file '{path}' does not exist")
        run_yaml = read_yaml_mapping(path)
        base = run_yaml.pop("base", {}) or {}
        if not isinstance(base, dict):
            raise ConfigError(f"{path}: 'base' must map model/data to config names")
        for kind in base:
            if kind not in ("model", "data"):
                raise ConfigError(f"{path}: unknown base '{kind}'; a run config may name 'model' and 'data'")
        near = path.resolve().parent.parent  # configs/run/x.yaml -> configs/
        for kind in ("model", "data"):
            if kind in base:
                section = read_yaml_mapping(_find_yaml(kind, str(base[kind]), near, path.resolve().parent))
                merged = _deep_merge(merged, {kind: section})
        merged = _deep_merge(merged, run_yaml)
    if overrides:
        merged = _deep_merge(merged, parse_overrides(overrides))
    return _build(Config, merged)


PATH_KEYS = ("data.path", "data.cache_dir", "run.output_dir", "model.init_from")
"""Config fields that name a file or folder. A relative value is relative to the directory the user ran the command
in; a process that starts elsewhere (a sweep trial, a Slurm job) gets them made absolute (:func:`absolute_paths`)."""


def absolute_paths(cfg: Config, root: str | Path | None = None, skip: tuple[str, ...] = ()) -> list[str]:
    """``key=/absolute/path`` overrides for the relative :data:`PATH_KEYS` of ``cfg``, against ``root`` (default: the
    working directory). Symlinks are kept as the user wrote them; ``skip`` names keys to leave alone."""
    root = Path(root) if root is not None else Path.cwd()
    pinned = []
    for key in PATH_KEYS:
        if key in skip:
            continue
        section, name = key.split(".")
        value = os.path.expanduser(str(getattr(getattr(cfg, section), name)))
        if value and not os.path.isabs(value) and "://" not in value:  # a URL (s3://, https://) is left as it is
            pinned.append(f"{key}={json.dumps(os.path.normpath(os.path.join(os.path.abspath(root), value)))}")
    return pinned


def dump_config(cfg: Config, path: str | Path) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(yaml.safe_dump(config_to_dict(cfg), sort_keys=False))
    tmp.replace(path)


def config_digest(cfg: Config) -> str:
    """sha256 of the resolved config (stable key order)."""
    return hashlib.sha256(json.dumps(config_to_dict(cfg), sort_keys=True).encode()).hexdigest()[:16]


def model_shape_digest(cfg: Config) -> str:
    """Digest of what fixes parameter shapes; a resumed run must match it (lr, steps, intervals may change)."""
    ignore = ("drop_path_rate", "drop_rate", "init_from")  # init_from: where the weights began, not their shape
    shape = {k: v for k, v in dataclasses.asdict(cfg.model).items() if k not in ignore}
    return hashlib.sha256(json.dumps(shape, sort_keys=True).encode()).hexdigest()[:16]
