"""DeepSpeed engine from the typed config: ZeRO stage, precision, batch arithmetic (the param groups, the optimizer and
the LR schedule are :mod:`pretrain.optim`'s, the loss :mod:`pretrain.loss`'s).

``build_engine()`` is the one place where the single-device model becomes a distributed one. Order (rule 1):

1. activation checkpointing  (``model.set_grad_checkpointing``: changes what the blocks keep for backward)
2. input cast (bf16/fp16)    (a forward pre-hook gives float inputs the weights' dtype; before compile, so traced)
3. device kernels (CUDA)     (cuDNN autotuning, TF32; after ZeRO init, channels-last conv weights for ZeRO-0;
                              nothing changes on CPU)
4. ZeRO init                 (``deepspeed.initialize`` with a fused AdamW/SGD: partitions optimizer state /
                              gradients / parameters, casts the weights to bf16/fp16 (fp32 masters stay in the
                              optimizer) and installs its hooks)
5. the device step           (:class:`pretrain.optim.DeviceStep` takes over the optimizer step for ZeRO 0-2 in
                              fp32/bf16: one flat all-reduce, the global norm, clipping and the non-finite skip on
                              the device)
6. compile                   (each block of ``stages.S.blocks.B`` compiled in place, :func:`compile_blocks`:
                              parameter names, checkpoints and the EMA copy made before are those of the eager model;
                              the compilation itself happens in the first forward)

Precision: ``trainer.precision=bf16`` is DeepSpeed's bf16 engine on GPU and on CPU alike (bf16 weights and
activations, fp32 master weights and optimizer state in ZeRO's partitions); fp16 (loss-scaled) is GPU-only.
"""

from __future__ import annotations

import logging
import math
import warnings
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn as nn

from data_pipeline.config import ConfigError
from pretrain.config import Config
from pretrain.optim import DeviceStep, build_lr_lambda, build_optimizer, param_groups, uses_device_step

__all__ = [
    "EngineParts",
    "build_ds_config",
    "build_engine",
    "cast_float_inputs",
    "check_batch_sizes",
    "channels_last_weights",
    "compile_blocks",
    "configure_device_kernels",
    "optimizer_state_bytes",
    "reapply_optim_config",
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
        ds["bf16"] = {"enabled": True}
    elif cfg.trainer.precision == "fp16":
        ds["fp16"] = {"enabled": True, "initial_scale_power": 16, "loss_scale_window": 1000, "hysteresis": 2}
    merged = _merge(ds, cfg.deepspeed.overrides)
    if (merged.get("bf16") or {}).get("enabled") and "check_grad_overflow" not in merged["bf16"]:
        # the non-finite guard: DeviceStep checks the global gradient norm on the device; where DeepSpeed steps
        # itself (ZeRO-3, offload) its per-tensor overflow check must skip a non-finite update
        merged["bf16"]["check_grad_overflow"] = not uses_device_step(merged)
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
    """``(lr_scale, decayed)`` of each param group, in order (:func:`param_groups`), kept here because a checkpoint
    load replaces the groups' dicts with the saved ones."""
    device_step: DeviceStep | None = None
    """The optimizer step that reads nothing back (ZeRO 0-2, fp32/bf16); None where DeepSpeed steps itself."""


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
        _keep_fused(sched.optimizer, group)
    sched._last_lr = [g["lr"] for g in groups]
    return changes


def _keep_fused(optimizer: torch.optim.Optimizer, group: dict[str, Any]) -> None:
    """A loaded param group keeps the fused kernel: a checkpoint written by an unfused optimizer would switch it off,
    the fused kernel keeps its step counter on the parameters' device, and its multi-tensor kernels pair the elements
    of a parameter and its moments by memory order (a checkpoint from a run without channels-last weights)."""
    group["fused"], group["foreach"] = True, None
    for p in group["params"]:
        state = optimizer.state.get(p, {})
        if torch.is_tensor(state.get("step")) and state["step"].device != p.device:
            state["step"] = state["step"].to(p.device, torch.float32)
        for key, value in state.items():
            if torch.is_tensor(value) and value.shape == p.shape and value.stride() != p.stride():
                state[key] = torch.empty_like(p, dtype=value.dtype).copy_(value)


_DEEPSPEED_MUON = "deepspeed.runtime.zero.muon.muon_optimizer"


def _import_deepspeed_muon_uncompiled() -> None:
    """Imports DeepSpeed's Muon optimizer module with Dynamo switched off, so that its kernels stay plain functions.

    DeepSpeed's ZeRO and bf16 optimizers import that module when they are set up or at their first gradient reduction,
    to check whether they run Muon; its kernels are decorated with ``torch.compile``, and setting up that decoration
    imports inductor's code generator: 0.9 s of CPU per rank here, every start. This trainer never builds DeepSpeed's
    Muon optimizer, so the kernels are never called. ``TORCHDYNAMO_DISABLE=1`` (torch's own switch, read when
    ``torch.compile`` decorates) during this one import leaves them undecorated; the model's own compilation
    (``trainer.compile``) happens later and is not affected.
    """
    import importlib
    import sys

    from pretrain.lifecycle import environ_set

    if _DEEPSPEED_MUON not in sys.modules:
        with environ_set("TORCHDYNAMO_DISABLE", "1"):
            importlib.import_module(_DEEPSPEED_MUON)


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

    _import_deepspeed_muon_uncompiled()
    ds_config = build_ds_config(cfg, world_size)
    # 1. activation checkpointing
    if cfg.trainer.activation_checkpointing:
        model.set_grad_checkpointing(True)
    # 2. input cast: bf16/fp16 weights need inputs of their dtype (DeepSpeed casts only the weights, in step 4)
    if cfg.trainer.precision != "fp32":
        model.register_forward_pre_hook(cast_float_inputs)
    # 3. device kernels
    cuda = next(model.parameters()).device.type == "cuda"
    if cuda:
        configure_device_kernels()
    # 4. ZeRO init: the client optimizer's param groups carry the weight-decay split and the layer-wise lr scales
    groups = param_groups(model, cfg.optim.weight_decay, cfg.optim.layer_decay)
    for g in groups:
        g["lr"] = cfg.optim.lr * g["lr_scale"]
    opt = build_optimizer(cfg, groups)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, build_lr_lambda(cfg))
    logging.getLogger("DeepSpeed").setLevel(logging.WARNING)
    # DeepSpeed 0.19 still calls the deprecated all_gather_into_tensor in ZeRO-1/2 steps; once per rank is noise
    warnings.filterwarnings("ignore", message=".*all_gather_into_tensor.*", category=FutureWarning)
    device_step = uses_device_step(ds_config)
    # the device step clips; DeepSpeed's engine would otherwise clip ZeRO-0 fp32 gradients tensor by tensor
    init_config = {**ds_config, "gradient_clipping": 0.0} if device_step else ds_config
    engine, optimizer, _, scheduler = deepspeed.initialize(
        model=model, optimizer=opt, lr_scheduler=sched, config=init_config
    )
    if cuda and cfg.deepspeed.zero_stage == 0:
        channels_last_weights(engine)
    # 5. the device step
    step = DeviceStep.install(engine, clip=ds_config["gradient_clipping"]) if device_step else None
    # 6. compile
    if cfg.trainer.compile:
        compile_blocks(model, cfg.trainer.compile_backend)
    specs = [(g["lr_scale"], g["decayed"]) for g in groups]
    return EngineParts(engine, optimizer, scheduler, init_config, specs, step)


def configure_device_kernels() -> None:
    """CUDA kernel choices: cuDNN picks the fastest algorithm per conv shape once (the shapes never change), and fp32
    matmuls and convs run on TF32 tensor cores (the whole model of an fp32 run; the loss and the EMA's evaluation of a
    bf16 one)."""
    torch.backends.cudnn.benchmark = True
    torch.backends.cuda.matmul.fp32_precision = "tf32"
    torch.backends.cudnn.conv.fp32_precision = "tf32"


def channels_last_weights(engine: Any) -> int:
    """Make the conv weights of a ZeRO-0 engine channels-last (the layout of cuDNN's fastest conv kernels), with their
    fp32 masters where DeepSpeed's bf16 wrapper keeps one per parameter; returns how many tensors changed.

    After ``deepspeed.initialize``, not before: the engine broadcasts every parameter as bytes at start-up, which needs
    contiguous tensors. Not under ZeRO-1/2 (every parameter is a contiguous view of one flat buffer) nor ZeRO-3
    (partitions).
    """
    tensors = [p for p in engine.module.parameters() if p.dim() == 4]
    tensors += [m for group in getattr(engine.optimizer, "fp32_groups", []) for m in group if m.dim() == 4]
    for t in tensors:
        t.data = t.data.contiguous(memory_format=torch.channels_last)
    return len(tensors)


def compile_blocks(model: nn.Module, backend: str) -> int:
    """``torch.compile`` each block of ``stages.S.blocks.B`` in place (``nn.Module.compile``), the way large runs
    compile: blocks of the same configuration share one graph from dynamo's cache, so the compile time grows with the
    number of distinct block configurations (stage width, window size), not with the depth, and the parameter names
    stay the eager model's. Returns the number of blocks compiled.

    Dynamo's recompile limit (8 graphs per code object) is raised to 4 graphs per block: each distinct block
    configuration compiles a training graph, an evaluation graph and, once the evaluation batch size differs, one with
    a dynamic batch size, and past the limit dynamo would run the rest eagerly.
    """
    blocks = [block for stage in model.stages for block in stage.blocks]
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 4 * len(blocks))
    for block in blocks:
        block.compile(backend=backend)
    return len(blocks)
