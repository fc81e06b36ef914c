"""DeepSpeed engine from the typed config: ZeRO stage, precision, batch arithmetic, AdamW, LR schedule, loss, EMA.

``build_engine()`` is the one place where the single-device model becomes a distributed one. Order (rule 1):

1. activation checkpointing  (``model.set_grad_checkpointing``: changes what the blocks keep for backward)
2. input cast (bf16/fp16)    (a forward pre-hook gives float inputs the weights' dtype; before compile, so traced)
3. ZeRO init                 (``deepspeed.initialize``: partitions optimizer state / gradients / parameters, casts
                              the weights to bf16/fp16 (fp32 masters stay in the optimizer) and installs its hooks)
4. compile                   (``engine.compile()``, as DeepSpeed documents: compiles the wrapped module in place, so
                              parameter names, checkpoints and the EMA copy made before are those of the eager model;
                              the compilation itself happens in the first forward)

Precision: ``trainer.precision=bf16`` is DeepSpeed's bf16 engine on GPU and on CPU alike (bf16 weights and
activations, fp32 master weights and optimizer state in ZeRO's partitions); fp16 (loss-scaled) is GPU-only.
"""

from __future__ import annotations

import copy
import logging
import math
import re
import warnings
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from pretrain.config import Config, ConfigError

__all__ = [
    "EngineParts",
    "ModelEMA",
    "build_ds_config",
    "build_engine",
    "build_lr_lambda",
    "cast_float_inputs",
    "check_batch_sizes",
    "optimizer_state_bytes",
    "param_groups",
    "reapply_optim_config",
    "soft_target_cross_entropy",
]

logger = logging.getLogger(__name__)


def check_batch_sizes(cfg: Config, world_size: int) -> int:
    """Global batch = micro-batch × grad accumulation × world size; must equal ``trainer.global_batch_size`` if set.

    Returns:
        The global batch size.

    Raises:
        ConfigError: Naming the three factors and a way to fix the mismatch.
    """
    micro, accum = cfg.data.batch_size, cfg.trainer.grad_accum_steps
    global_batch = micro * accum * world_size
    want = cfg.trainer.global_batch_size
    if want > 0 and want != global_batch:
        hint = ""
        if want % (micro * world_size) == 0:
            hint = f"; set trainer.grad_accum_steps={want // (micro * world_size)}"
        elif want % (accum * world_size) == 0:
            hint = f"; set data.batch_size={want // (accum * world_size)}"
        raise ConfigError(
            f"trainer.global_batch_size={want} but data.batch_size ({micro}) × trainer.grad_accum_steps ({accum}) × "
            f"world size ({world_size}) = {global_batch}{hint}, or set trainer.global_batch_size=0 to skip the check"
        )
    return global_batch


def build_ds_config(cfg: Config, world_size: int) -> dict[str, Any]:
    """The DeepSpeed config dict for ``cfg`` on ``world_size`` ranks (``deepspeed.overrides`` merged last).

    The checks run on the merged result, so a value set through ``deepspeed.overrides`` is refused exactly as the
    typed field would be; an override may not contradict a typed field that other code reads (see
    :data:`_TYPED_DS_KEYS`).

    Raises:
        ConfigError: Naming the key (the typed field, or ``deepspeed.overrides.<path>``) and the fix.
    """
    check_batch_sizes(cfg, world_size)
    zero: dict[str, Any] = {"stage": cfg.deepspeed.zero_stage}
    if cfg.deepspeed.offload_optimizer != "none":
        zero["offload_optimizer"] = {"device": cfg.deepspeed.offload_optimizer, "pin_memory": False}
    if cfg.deepspeed.offload_param != "none":
        zero["offload_param"] = {"device": cfg.deepspeed.offload_param, "pin_memory": False}
    ds: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": cfg.data.batch_size,
        "gradient_accumulation_steps": cfg.trainer.grad_accum_steps,
        "train_batch_size": cfg.data.batch_size * cfg.trainer.grad_accum_steps * world_size,
        "zero_optimization": zero,
        # the optimizer is a torch AdamW/SGD passed as client optimizer (param groups without weight decay on
        # norms/biases/tokens); DeepSpeed only tests its own optimizers with ZeRO
        "zero_allow_untested_optimizer": True,
        "zero_force_ds_cpu_optimizer": False,
        "gradient_clipping": cfg.optim.grad_clip,
        "steps_per_print": 2**31 - 1,  # the trainer logs; DeepSpeed's own step prints stay off
        "wall_clock_breakdown": False,
    }
    if cfg.trainer.precision == "bf16":
        # a non-finite gradient norm skips the update: the trainer's non-finite guard relies on it (as for fp32/fp16)
        ds["bf16"] = {"enabled": True, "check_grad_overflow": True}
    elif cfg.trainer.precision == "fp16":
        ds["fp16"] = {"enabled": True, "initial_scale_power": 16, "loss_scale_window": 1000, "hysteresis": 2}
    merged = _merge(ds, cfg.deepspeed.overrides)
    _check_ds_config(cfg, merged)
    _check_typed_keys(cfg, ds)
    return merged


_TYPED_DS_KEYS = {
    ("zero_optimization", "stage"): "deepspeed.zero_stage",
    ("train_micro_batch_size_per_gpu",): "data.batch_size",
    ("gradient_accumulation_steps",): "trainer.grad_accum_steps",
    ("train_batch_size",): "data.batch_size and trainer.grad_accum_steps",
    ("bf16", "enabled"): "trainer.precision",
    ("fp16", "enabled"): "trainer.precision",
}
"""DeepSpeed keys that a typed field sets and that code besides DeepSpeed reads through the field (a checkpoint's ZeRO
stage, the loader's batch size, the precision's input cast and fp16 GPU check): ``deepspeed.overrides`` may repeat them,
not change them."""


def _get(d: dict[str, Any], path: tuple[str, ...]) -> Any:
    for key in path:
        if not isinstance(d, dict) or key not in d:
            return None
        d = d[key]
    return d


def _check_ds_config(cfg: Config, ds: dict[str, Any]) -> None:
    """The ZeRO, offload, EMA and clipping rules, on the merged DeepSpeed config (each message names the key set)."""
    overrides = cfg.deepspeed.overrides

    def key(path: tuple[str, ...], typed: str) -> str:
        return f"deepspeed.overrides.{'.'.join(path)}" if _get(overrides, path) is not None else typed

    if not isinstance(ds.get("zero_optimization"), dict):
        raise ConfigError("deepspeed.overrides.zero_optimization must be a mapping, e.g. {reduce_bucket_size: 5e7}")
    stage_key = key(("zero_optimization", "stage"), "deepspeed.zero_stage")
    stage = _get(ds, ("zero_optimization", "stage"))
    if isinstance(stage, bool) or stage not in (0, 1, 2, 3):
        raise ConfigError(f"{stage_key}={stage!r} must be 0, 1, 2 or 3")
    if cfg.trainer.ema_decay > 0 and stage == 3:
        raise ConfigError(
            f"trainer.ema_decay > 0 needs full parameters on every rank: use deepspeed.zero_stage <= 2 "
            f"({stage_key} is 3)"
        )
    offload_opt = _get(ds, ("zero_optimization", "offload_optimizer", "device")) or "none"
    if offload_opt != "none" and stage == 0:
        where = key(("zero_optimization", "offload_optimizer", "device"), "deepspeed.offload_optimizer")
        raise ConfigError(
            f"deepspeed.offload_optimizer needs deepspeed.zero_stage >= 1 ({where}={offload_opt!r}, {stage_key}=0)"
        )
    offload_param = _get(ds, ("zero_optimization", "offload_param", "device")) or "none"
    if offload_param != "none" and stage != 3:
        where = key(("zero_optimization", "offload_param", "device"), "deepspeed.offload_param")
        raise ConfigError(
            f"deepspeed.offload_param needs deepspeed.zero_stage=3 ({where}={offload_param!r}, {stage_key}={stage})"
        )
    clip = ds.get("gradient_clipping")
    if isinstance(clip, bool) or not isinstance(clip, (int, float)) or clip < 0:
        raise ConfigError(f"{key(('gradient_clipping',), 'optim.grad_clip')}={clip!r} must be >= 0 (0 disables)")


def _check_typed_keys(cfg: Config, built: dict[str, Any]) -> None:
    """Refuse an override that changes a value :data:`_TYPED_DS_KEYS` says belongs to a typed field."""
    for path, typed in _TYPED_DS_KEYS.items():
        given, want = _get(cfg.deepspeed.overrides, path), _get(built, path)
        if path[-1] == "enabled":  # bf16/fp16 absent means disabled
            given, want = (None if given is None else bool(given)), bool(want)
        if given is None or given == want:
            continue
        raise ConfigError(
            f"deepspeed.overrides.{'.'.join(path)}={given!r} contradicts {typed} (which gives {want!r}): set "
            f"{typed} instead; the trainer and its checkpoints read that"
        )


def _merge(base: dict[str, Any], update: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in update.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


_BLOCK = re.compile(r"^stages\.(\d+)\.blocks\.(\d+)\.")
_STAGE = re.compile(r"^stages\.(\d+)\.")


def layer_ids(model: nn.Module) -> tuple[dict[str, int], int]:
    """Depth of every parameter for layer-wise lr decay: ``({name: layer id}, L)`` with L blocks in the model.

    Both families are ``stages.S.blocks.B`` (BEiT's rule, on the blocks of all stages counted in order, as timm's
    ``param_groups_layer_decay`` does for hierarchical models): block k of the model (0-based over all stages) is
    layer k + 1; a stage's own parts outside its blocks (patch embedding or downsampling, SepViT's positional conv)
    are the layer just before the stage's first block, so stage 1's patch embedding is layer 0 (the stem); anything
    after the last stage (final norm, head) is layer L + 1.

    Raises:
        ConfigError: The model has no ``stages.S.blocks.B`` parameters (layer decay cannot place them).
    """
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    blocks: dict[int, set[int]] = {}
    for name in names:
        if m := _BLOCK.match(name):
            blocks.setdefault(int(m[1]), set()).add(int(m[2]))
    if not blocks:
        raise ConfigError(
            f"optim.layer_decay needs a model built of stages.S.blocks.B; {type(model).__name__} has none: set "
            "optim.layer_decay=1.0"
        )
    before, total = {}, 0  # blocks before each stage
    for stage in range(max(blocks) + 1):
        before[stage] = total
        total += len(blocks.get(stage, ()))
    ids = {}
    for name in names:
        if m := _BLOCK.match(name):
            ids[name] = before[int(m[1])] + int(m[2]) + 1
        elif m := _STAGE.match(name):
            ids[name] = before.get(int(m[1]), total)
        else:
            ids[name] = total + 1
    return ids, total


def param_groups(model: nn.Module, weight_decay: float, layer_decay: float = 1.0) -> list[dict[str, Any]]:
    """The optimizer's param groups: weight decay off for ndim <= 1 params (norms, biases) and ``no_weight_decay()``,
    and with ``layer_decay < 1`` an lr scale per layer (:func:`layer_ids`): ``layer_decay ** (L + 1 - layer)``.

    ``layer_decay == 1``: two groups, decayed weights then the rest. Otherwise one group per (layer, decayed), in that
    order. Each group carries ``lr_scale`` and ``decayed`` for :func:`reapply_optim_config`; its ``lr`` is the
    scaled ``optim.lr`` the schedule multiplies.
    """
    skip = set(model.no_weight_decay()) if hasattr(model, "no_weight_decay") else set()
    ids, total = layer_ids(model) if layer_decay != 1.0 else ({}, 0)
    groups: dict[tuple[int, bool], list[nn.Parameter]] = {(0, True): [], (0, False): []}
    for name, p in model.named_parameters():
        if p.requires_grad:
            decayed = not (p.ndim <= 1 or name in skip)
            groups.setdefault((ids.get(name, 0), decayed), []).append(p)
    return [
        {
            "params": params,
            "weight_decay": weight_decay if decayed else 0.0,
            "lr_scale": layer_decay ** (total + 1 - layer) if layer_decay != 1.0 else 1.0,
            "decayed": decayed,
        }
        for (layer, decayed), params in sorted(groups.items(), key=lambda kv: (kv[0][0], not kv[0][1]))
        if params or layer_decay == 1.0
    ]


def build_lr_lambda(cfg: Config):
    """Per-step multiplier of ``optim.lr``: linear warmup from ``warmup_lr``, then cosine/linear/constant to min_lr.

    A plain closure on purpose: ``LambdaLR.state_dict()`` does not store functions, so a resumed run with a new
    ``max_steps`` follows the new schedule from the saved step (a new ``lr``: see :func:`reapply_optim_config`).
    """
    lr, warm, warm_lr, min_lr = cfg.optim.lr, cfg.schedule.warmup_steps, cfg.schedule.warmup_lr, cfg.schedule.min_lr
    total, kind = cfg.trainer.max_steps, cfg.schedule.name

    def multiplier(step: int) -> float:
        if step < warm:
            return (warm_lr + (lr - warm_lr) * step / warm) / lr
        if kind == "constant":
            return 1.0
        progress = min(1.0, (step - warm) / max(1, total - warm))
        if kind == "linear":
            return (min_lr + (lr - min_lr) * (1.0 - progress)) / lr
        return (min_lr + 0.5 * (lr - min_lr) * (1.0 + math.cos(math.pi * progress))) / lr

    return multiplier


def soft_target_cross_entropy(logits: torch.Tensor, targets: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Mean over valid rows of ``-sum(targets * log_softmax(logits))`` (targets already smoothed/mixed).

    Args:
        logits: (B, C).
        targets: (B, C) soft targets, rows sum to 1.
        valid: (B,) bool; False rows contribute nothing.

    Returns:
        A scalar; 0 (with a gradient path) when no row is valid.
    """
    per_row = -(targets * F.log_softmax(logits.float(), dim=-1)).sum(dim=-1)  # (B,)
    mask = valid.to(per_row.dtype)
    return (per_row * mask).sum() / mask.sum().clamp_min(1.0)


class ModelEMA:
    """Exponential moving average of a model's weights (fp32 copy, same device), evaluated as ``val_*_ema``.

    Args:
        model: The (unwrapped) model to track; its current weights initialise the average.
        decay: Per optimizer step, ``ema = decay * ema + (1 - decay) * weights``.
    """

    def __init__(self, model: nn.Module, decay: float):
        self.decay = decay
        self.module = copy.deepcopy(model).float().eval()
        for p in self.module.parameters():
            p.requires_grad_(False)

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        """Move the average towards ``model``'s current weights (buffers are copied)."""
        for e, p in zip(self.module.parameters(), model.parameters()):
            e.lerp_(p.detach().float(), 1.0 - self.decay)
        for e, b in zip(self.module.buffers(), model.buffers()):
            e.copy_(b)

    def state_dict(self) -> dict[str, Any]:
        return {"decay": self.decay, "module": self.module.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.module.load_state_dict(state["module"])


def optimizer_state_bytes(optimizer: Any) -> int:
    """Bytes of optimizer state tensors (e.g. Adam moments) held by this rank, unwrapping DeepSpeed's ZeRO wrapper."""
    inner = optimizer
    while hasattr(inner, "optimizer") and not isinstance(inner, torch.optim.Optimizer):
        inner = inner.optimizer
    total = 0
    for state in inner.state.values():
        for v in state.values():
            if torch.is_tensor(v) and v.dim() > 0:
                total += v.numel() * v.element_size()
    return total


def cast_float_inputs(module: nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...]:
    """Forward pre-hook: floating-point tensor arguments take the dtype of ``module``'s weights.

    DeepSpeed's bf16 engine casts the weights but not the inputs (fp16 has ``auto_cast``, bf16 nothing), and the
    trainer feeds fp32 images from the augmentation: without this a bf16 model fails on its first layer (float input,
    bf16 weight). The dtype is read at call time, so the hook follows the engine's cast and does nothing to an fp32
    copy of the model (the EMA, an export).
    """
    dtype = next(module.parameters()).dtype
    return tuple(a.to(dtype) if torch.is_tensor(a) and a.is_floating_point() and a.dtype != dtype else a for a in args)


@dataclass
class EngineParts:
    """What :func:`build_engine` returns."""

    engine: Any
    """The DeepSpeed engine (call it like the model; ``backward``, ``step``, ``save_checkpoint``)."""
    optimizer: Any
    """DeepSpeed's optimizer (a ZeRO wrapper around the torch optimizer for stage >= 1)."""
    scheduler: torch.optim.lr_scheduler.LambdaLR
    """Per-step LR schedule, stepped by the engine and saved in its checkpoint."""
    ds_config: dict[str, Any]
    """The DeepSpeed config used."""
    group_specs: list[tuple[float, bool]]
    """``(lr_scale, decayed)`` of each param group, in order (:func:`param_groups`); a checkpoint load replaces the
    groups' dicts with the saved ones, which checkpoints of older versions wrote without these keys."""


def reapply_optim_config(parts: EngineParts, cfg: Config) -> list[str]:
    """Put the config's optimizer hyperparameters back after a checkpoint load; returns the values that changed.

    Loading restores the param groups' lr, weight decay, betas/eps (or momentum) with the optimizer state, and
    ``LambdaLR`` restores its ``base_lrs``: a run resumed with a new ``optim.lr`` or ``optim.weight_decay`` (a PBT
    exploit, or a user lowering the lr) would otherwise train on with the checkpoint's. The current lr is recomputed
    the way ``LambdaLR`` computes it, so an unchanged config rewrites every value with itself (resume stays bitwise).
    """
    sched, optim = parts.scheduler, cfg.optim
    groups = sched.optimizer.param_groups  # after a load: the torch optimizer's new group dicts, which ZeRO steps with
    want: dict[str, Any] = (
        {"eps": optim.eps, "betas": tuple(optim.betas)} if optim.name == "adamw" else {"momentum": optim.momentum}
    )
    changes = []
    specs = parts.group_specs
    old_base = sched.base_lrs[0] / specs[0][0] if sched.base_lrs else None
    if old_base is None or not math.isclose(old_base, optim.lr, rel_tol=1e-12):
        changes.append(f"optim.lr={optim.lr:g} (the checkpoint's {old_base:g})")
    sched.base_lrs = [optim.lr * scale for scale, _ in specs]
    first_decayed = next((i for i, (_, decayed) in enumerate(specs) if decayed), 0)
    for i, (group, lmbda, (scale, decayed)) in enumerate(zip(groups, sched.lr_lambdas, specs)):
        group["initial_lr"] = sched.base_lrs[i]
        group["lr"] = sched.base_lrs[i] * lmbda(sched.last_epoch)
        group["lr_scale"], group["decayed"] = scale, decayed
        decay = optim.weight_decay if decayed else 0.0
        if i == first_decayed and group.get("weight_decay") != decay:
            changes.append(f"optim.weight_decay={decay:g} (the checkpoint's {group.get('weight_decay'):g})")
        group["weight_decay"] = decay
        for key, value in want.items():
            old = tuple(group[key]) if isinstance(group.get(key), (list, tuple)) else group.get(key)
            if i == 0 and old != value:
                changes.append(f"optim.{key}={value} (the checkpoint's {old})")
            group[key] = value
    sched._last_lr = [g["lr"] for g in groups]
    return changes


def build_engine(cfg: Config, model: nn.Module, world_size: int) -> EngineParts:
    """Wrap ``model`` in a DeepSpeed engine configured from ``cfg`` (see the module docstring for the order).

    Args:
        cfg: The resolved run config.
        model: The single-device model, already on this rank's device.
        world_size: Number of data-parallel ranks.

    Returns:
        The engine, its optimizer and LR scheduler, and the DeepSpeed config dict.
    """
    import deepspeed

    ds_config = build_ds_config(cfg, world_size)
    # 1. activation checkpointing
    if cfg.trainer.activation_checkpointing:
        model.set_grad_checkpointing(True)
    # 2. input cast: bf16/fp16 weights need inputs of their dtype (DeepSpeed casts only the weights, in step 4)
    if cfg.trainer.precision != "fp32":
        model.register_forward_pre_hook(cast_float_inputs)
    # 3. ZeRO init: the client optimizer's param groups carry the weight-decay split and the layer-wise lr scales
    groups = param_groups(model, cfg.optim.weight_decay, cfg.optim.layer_decay)
    for g in groups:
        g["lr"] = cfg.optim.lr * g["lr_scale"]
    if cfg.optim.name == "adamw":
        opt: torch.optim.Optimizer = torch.optim.AdamW(
            groups, lr=cfg.optim.lr, betas=tuple(cfg.optim.betas), eps=cfg.optim.eps
        )
    else:
        opt = torch.optim.SGD(groups, lr=cfg.optim.lr, momentum=cfg.optim.momentum)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, build_lr_lambda(cfg))
    logging.getLogger("DeepSpeed").setLevel(logging.WARNING)
    # DeepSpeed 0.19 still calls the deprecated all_gather_into_tensor in ZeRO-1/2 steps; once per rank is noise
    warnings.filterwarnings("ignore", message=".*all_gather_into_tensor.*", category=FutureWarning)
    engine, optimizer, _, scheduler = deepspeed.initialize(
        model=model, optimizer=opt, lr_scheduler=sched, config=ds_config
    )
    # 4. compile
    if cfg.trainer.compile:
        engine.compile(backend=cfg.trainer.compile_backend)
    specs = [(g["lr_scale"], g["decayed"]) for g in groups]
    return EngineParts(engine, optimizer, scheduler, ds_config, specs)
