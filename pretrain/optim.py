"""The step around the model: the param groups (weight decay, layer-wise lr decay), the LR schedule, the fused
optimizer, the EMA, and an optimizer step that never reads the device.

On a GPU, a small model's step is bound by kernel launches and by host reads of the device (each waits for the queued
work), not by arithmetic. DeepSpeed's ZeRO-1/2 step, its bf16/fp16 unfused wrapper and its engine-side clipping
launch a few kernels per parameter tensor (per-tensor overflow checks, norms, bucket copies) and read the device to
decide whether to skip an update; no DeepSpeed configuration avoids them (``check_grad_overflow: false`` drops the
overflow loop, not the norms, copies and reads). :class:`DeviceStep` replaces that step for the configurations
DeepSpeed runs through those wrappers (ZeRO 0-2, fp32 or bf16, no offload) while keeping DeepSpeed's state, so
checkpoints, resharding and the engine's counters are DeepSpeed's own:

1. after the last backward of a step, every gradient is copied into one flat buffer laid out like DeepSpeed's flat
   parameter buffer (one ``cat``), and reduced with one all-reduce;
2. the global gradient norm is one ``vector_norm`` of that buffer (fp64 accumulation, as DeepSpeed's); it is the
   same on every rank (the buffer is all-reduced), so "non-finite: skip" is decided on every rank alike, on the
   device, without a host read;
3. the fused AdamW (or SGD) takes the clipping factor as ``grad_scale`` and the non-finite flag as ``found_inf``:
   it skips the update, moments and step counter on the device (torch's AMP interface for fused optimizers);
4. the masters are copied back into the low-precision weights with one ``_foreach_copy_`` (and all-gathered for
   ZeRO-1/2 partitions).

DeepSpeed's own per-tensor gradient reduction is switched off through the engine's ``enable_backward_allreduce``
flag and ZeRO's ``_coalesce_grad_reduction`` flag (what ``engine.coalesce_grad_reduction()`` sets). The gradients
then stay where autograd leaves them until the step, so ZeRO-2 keeps a full-size low-precision gradient buffer and
does not overlap the reduction with the backward pass: one collective and one copy per step instead of ~2 kernels per
parameter tensor, the right trade for the ViT sizes trained here (<= 100M parameters: <= 200 MB of bf16 gradients).
ZeRO-3, optimizer offload and fp16 keep DeepSpeed's own step (and its host reads).
``tests/integration/test_device_step.py`` checks this step against DeepSpeed's own on every configuration it replaces,
so a DeepSpeed release that moves these structures fails there.
"""

from __future__ import annotations

import copy
import logging
import math
import re
from typing import Any

import torch
import torch.nn as nn

from data_pipeline.config import ConfigError
from pretrain.config import Config

__all__ = [
    "DeviceStep",
    "ModelEMA",
    "build_lr_lambda",
    "build_optimizer",
    "layer_ids",
    "param_groups",
    "uses_device_step",
]

logger = logging.getLogger(__name__)


def build_optimizer(cfg: Config, groups: list[dict[str, Any]]) -> torch.optim.Optimizer:
    """AdamW or SGD over ``groups``, fused: one kernel per param group and step, the step counter on the device.

    The fused kernels take ``grad_scale`` and ``found_inf`` (:class:`DeviceStep`); on CPU too (torch >= 2.4).
    """
    if cfg.optim.name == "adamw":
        return torch.optim.AdamW(groups, lr=cfg.optim.lr, betas=tuple(cfg.optim.betas), eps=cfg.optim.eps, fused=True)
    return torch.optim.SGD(groups, lr=cfg.optim.lr, momentum=cfg.optim.momentum, fused=True)


def uses_device_step(ds_config: dict[str, Any]) -> bool:
    """Whether :class:`DeviceStep` runs the optimizer step for this (merged) DeepSpeed config.

    ZeRO 0-2 in fp32 or bf16 without optimizer offload, and no ``data_types`` override (a separate gradient
    accumulation dtype moves ZeRO's gradients to another attribute); otherwise DeepSpeed steps itself.
    """
    zero = ds_config.get("zero_optimization", {})
    offload = (zero.get("offload_optimizer") or {}).get("device", "none")
    return (
        zero.get("stage", 0) <= 2
        and not (ds_config.get("fp16") or {}).get("enabled", False)
        and offload in (None, "none")
        and "data_types" not in ds_config
    )


class ModelEMA:
    """Exponential moving average of a model's weights (fp32 copy, same device), evaluated as ``val_*_ema``.

    An update launches a few multi-tensor kernels whatever the number of tensors: the weights cast into an fp32 scratch
    copy (``_foreach_copy_``; none for fp32 weights), the move towards them, the buffers copied.

    Args:
        model: The (unwrapped) model to track; its current weights initialise the average.
        decay: Per optimizer step, ``ema = decay * ema + (1 - decay) * weights``.
    """

    def __init__(self, model: nn.Module, decay: float):
        self.decay = decay
        self.module = copy.deepcopy(model).float().eval()
        for p in self.module.parameters():
            p.requires_grad_(False)
        self._params = list(self.module.parameters())
        self._buffers = [b for b in self.module.buffers() if b.is_floating_point()]
        self._scratch: list[torch.Tensor] | None = None

    @torch.no_grad()
    def update(self, model: nn.Module, skipped: torch.Tensor | None = None) -> None:
        """Move the average towards ``model``'s current weights (buffers are copied).

        Args:
            model: The model whose weights the average follows (any dtype).
            skipped: A device scalar, 1.0 where this step's update was skipped: the average then stays where it is,
                decided on the device (``ema += w * (weights - ema)`` with ``w = 0``; ``_foreach_mul_`` by a device
                scalar is the multi-tensor kernel that needs no host read, unlike ``_foreach_lerp_`` by one).
        """
        weights = list(model.parameters())
        if skipped is None:
            if weights[0].dtype != torch.float32:
                weights = self._cast(weights)
            torch._foreach_lerp_(self._params, weights, 1.0 - self.decay)
        else:
            if weights[0].dtype != torch.float32:
                delta = self._cast(weights)
                torch._foreach_sub_(delta, self._params)
            else:
                delta = torch._foreach_sub(weights, self._params)
            torch._foreach_mul_(delta, (1.0 - skipped.float()) * (1.0 - self.decay))  # (weights - ema) * w
            torch._foreach_add_(self._params, delta)
        if self._buffers:
            torch._foreach_copy_(self._buffers, [b for b in model.buffers() if b.is_floating_point()])

    def _cast(self, weights: list[torch.Tensor]) -> list[torch.Tensor]:
        """``weights`` in fp32, in a scratch copy kept between updates (one kernel)."""
        if self._scratch is None:
            self._scratch = [torch.empty_like(e) for e in self._params]
        torch._foreach_copy_(self._scratch, weights)
        return self._scratch

    def state_dict(self) -> dict[str, Any]:
        return {"decay": self.decay, "module": self.module.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.module.load_state_dict(state["module"])


class DeviceStep:
    """The optimizer step of a DeepSpeed engine (ZeRO 0-2, fp32/bf16), with the reduction, the global norm, clipping
    and the non-finite skip on the device (see the module docstring).

    :meth:`install` puts it in place of the step of ``engine.optimizer`` (the object DeepSpeed's ``engine.step()``
    calls); after each ``engine.step()`` at an accumulation boundary, :attr:`grad_norm` and :attr:`skipped` hold that
    step's global gradient norm (before clipping) and 1.0/0.0 (skipped or not) as device scalars.

    Args:
        engine: A ``deepspeed.initialize`` engine whose optimizer is a ZeRO-1/2 optimizer, DeepSpeed's unfused
            bf16 wrapper (ZeRO-0 bf16) or the client torch optimizer itself (ZeRO-0 fp32).
        clip: Clip the global gradient norm to this (0: no clipping).
    """

    def __init__(self, engine: Any, clip: float):
        import deepspeed.comm as ds_comm

        self._comm = ds_comm
        self.engine, self.clip = engine, float(clip)
        opt = engine.optimizer
        self.wrapper = opt
        self.kind = _wrapper_kind(opt)
        if self.kind == "zero":
            from deepspeed.runtime.utils import all_gather_dp_groups

            self._all_gather = all_gather_dp_groups
            self.group = opt.dp_process_group
            self._params, self._pieces_at, self._size = _zero_layout(opt)
            sizes = [flat.numel() for flat in opt.bit16_groups_flat]
            self._group_starts = [sum(sizes[:i]) for i in range(len(sizes))]  # of each group's region in the buffer
            self.inner = opt.optimizer
        elif self.kind == "unfused":
            self.group = engine.seq_data_parallel_group
            self._params = [p for g in opt.fp16_groups for p in g]
            self.inner = opt.optimizer
        else:
            self.group = engine.seq_data_parallel_group
            self._params = [p for g in opt.param_groups for p in g["params"] if p.requires_grad]
            self.inner = opt
        if self.kind != "zero":
            self._pieces_at = None
            self._size = sum(p.numel() for p in self._params)
        self.world_size = ds_comm.get_world_size(group=self.group)
        dtype = self._params[0].dtype
        self._flat = torch.empty(self._size, dtype=dtype, device=self._params[0].device)
        longest = max([p.numel() for p in self._params] + (self._pieces_at[1] if self._pieces_at else []))
        self._zeros = torch.zeros(longest, dtype=dtype, device=self._flat.device)  # stands in for missing gradients
        self._master_grads: list[torch.Tensor] | None = None
        self._inner_step = self.inner.step  # as the LR scheduler wrapped it (it counts optimizer steps)
        self.grad_norm: torch.Tensor | None = None
        self.skipped: torch.Tensor | None = None

    @classmethod
    def install(cls, engine: Any, clip: float) -> DeviceStep:
        """Switch DeepSpeed's own gradient reduction off and make ``engine.optimizer.step`` this step.

        Raises:
            RuntimeError: DeepSpeed built an optimizer wrapper this step does not know (e.g. a DeepSpeed version
                that changed them; :func:`uses_device_step` decides which configs come here).
        """
        step = cls(engine, clip)
        engine.enable_backward_allreduce = False  # no bucketed all-reduce after each backward: this step reduces
        if step.kind == "zero":
            engine.optimizer._coalesce_grad_reduction = True  # ZeRO's per-parameter gradient hooks do nothing

        def device_step(closure: Any = None) -> None:
            step.step()

        # for ZeRO-0 fp32 the engine's optimizer is the one the LR scheduler counts steps of: it still calls the
        # scheduler's counting wrapper (step._inner_step), which this flag tells the scheduler
        device_step._wrapped_by_lr_sched = True  # type: ignore[attr-defined]
        engine.optimizer.step = device_step  # shadows the class's step for this instance only
        return step

    @torch.no_grad()
    def step(self, closure: Any = None) -> None:
        """Reduce the gradients, clip and update, skipping the update where the global gradient norm is not finite."""
        flat = self._reduce()
        # of the mean gradient, accumulated in fp64 as DeepSpeed does: an fp32 sum over millions of squares drifts
        # (1.3e-4 relative on CPU for 3.5M bf16 gradients)
        norm = torch.linalg.vector_norm(flat, dtype=torch.float64).float().div_(self.world_size)
        skipped = torch.sub(norm, norm).ne_(0)  # inf - inf and nan - nan are nan: 1.0 where the norm is not finite
        # fused optimizers divide the gradients by grad_scale: the rank average and the clipping in one factor
        if self.clip > 0:
            grad_scale = norm.add(1e-6).div_(self.clip).clamp_(min=1.0).mul_(self.world_size)
        else:
            grad_scale = torch.full((), float(self.world_size), device=flat.device)
        self.inner.grad_scale, self.inner.found_inf = grad_scale, skipped
        masters = self._set_master_grads(flat)
        self._inner_step()
        for m in masters:
            m.grad = None
        self._copy_masters_back(masters)
        self.grad_norm, self.skipped = norm, skipped
        if self.kind != "plain":
            self.wrapper._global_grad_norm = norm  # what engine.get_global_grad_norm() reports

    def _reduce(self) -> torch.Tensor:
        """All gradients in one flat buffer (the layout of DeepSpeed's flat weights for ZeRO), summed over ranks."""
        # ZeRO-0 keeps each parameter's own layout (channels-last conv weights on CUDA); autograd gives a gradient the
        # strides of its parameter, and it enters the buffer in memory order (a view, no copy)
        grads = [self._zeros[: p.numel()] if p.grad is None else p.grad.permute(_memory_order(p)) for p in self._params]
        if self._pieces_at is not None:  # ZeRO: padding between groups and at their ends
            pieces: list[torch.Tensor] = [self._zeros[:n] for n in self._pieces_at[1]]
            for slot, g in zip(self._pieces_at[0], grads):
                pieces[slot] = g
        else:
            pieces = grads
        torch.cat([t.reshape(-1) for t in pieces], out=self._flat)  # (N,)
        if self.world_size > 1:
            self._comm.all_reduce(self._flat, group=self.group)
        return self._flat

    def _set_master_grads(self, flat: torch.Tensor) -> list[torch.Tensor]:
        """Point the fp32 master weights' ``.grad`` at the reduced gradients (cast once where the model is bf16)."""
        if self.kind == "plain":
            offset = 0
            for p in self._params:
                p.grad = _view_like(flat[offset : offset + p.numel()], p)
                offset += p.numel()
            return []
        opt = self.wrapper
        if self.kind == "zero":
            masters = opt.single_partition_of_fp32_groups
            rank = self._comm.get_rank(group=self.group)
            sources = [
                flat[start + rank * m.numel() : start + (rank + 1) * m.numel()]  # this rank's partition of the group
                for m, start in zip(masters, self._group_starts)
            ]
        else:
            masters = [p for g in opt.fp32_groups for p in g]
            sources, offset = [], 0
            for p in self._params:  # the bf16 weights' layout: the cast below copies into the masters' own
                sources.append(_view_like(flat[offset : offset + p.numel()], p))
                offset += p.numel()
        if flat.dtype == torch.float32:
            grads = sources
        else:
            if self._master_grads is None:
                self._master_grads = [torch.empty_like(m) for m in masters]
            torch._foreach_copy_(self._master_grads, sources)  # bf16 -> fp32, one kernel
            grads = self._master_grads
        for m, g in zip(masters, grads):
            m.grad = g
        return list(masters)

    def _copy_masters_back(self, masters: list[torch.Tensor]) -> None:
        """The updated fp32 masters into the model's weights (and, for ZeRO, every rank's partitions into all)."""
        opt = self.wrapper
        if self.kind == "zero":
            rank = self._comm.get_rank(group=self.group)
            torch._foreach_copy_([parts[rank] for parts in opt.parallel_partitioned_bit16_groups], masters)
            if self.world_size > 1:
                self._all_gather(
                    groups_flat=opt.bit16_groups_flat,
                    partitioned_param_groups=opt.parallel_partitioned_bit16_groups,
                    dp_process_group=opt.real_dp_process_group,
                    start_alignment_factor=opt.nccl_start_alignment_factor,
                    allgather_bucket_size=opt.allgather_bucket_size,
                )
        elif self.kind == "unfused":
            torch._foreach_copy_(self._params, masters)


def _memory_order(t: torch.Tensor) -> list[int]:
    """The permutation of ``t``'s dimensions that lists them in memory order (the identity for a contiguous tensor)."""
    if t.is_contiguous():
        return list(range(t.dim()))
    order = sorted(range(t.dim()), key=lambda d: -t.stride(d))
    if not t.permute(order).is_contiguous():
        raise RuntimeError(f"DeviceStep: a parameter of shape {tuple(t.shape)} is not dense in any dimension order")
    return order


def _view_like(piece: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """``piece`` (1-D: the elements of a tensor like ``t``, in ``t``'s memory order) viewed with ``t``'s strides."""
    if t.is_contiguous():
        return piece.view_as(t)
    order = _memory_order(t)
    inverse = sorted(range(len(order)), key=lambda d: order[d])
    return piece.view([t.shape[d] for d in order]).permute(inverse)


def _wrapper_kind(opt: Any) -> str:
    """``zero`` (ZeRO-1/2), ``unfused`` (ZeRO-0 bf16) or ``plain`` (ZeRO-0 fp32), after checking what the step
    assumes about it (loss scale 1, no offload, gradients in ``.grad``)."""
    from deepspeed.runtime.fp16.unfused_optimizer import FP16_UnfusedOptimizer
    from deepspeed.runtime.zero.stage_1_and_2 import DeepSpeedZeroOptimizer

    if type(opt) is DeepSpeedZeroOptimizer:
        if opt.cpu_offload or opt.use_grad_accum_attribute or opt.has_moe_layers or opt.loss_scale != 1.0:
            raise RuntimeError("DeviceStep: this ZeRO optimizer offloads, accumulates apart or scales the loss")
        return "zero"
    if type(opt) is FP16_UnfusedOptimizer:
        if opt.loss_scale_config.cur_scale != 1.0 or opt.low_precision_dtype != torch.bfloat16:
            raise RuntimeError("DeviceStep: DeepSpeed's unfused wrapper scales the loss (fp16?)")
        return "unfused"
    if isinstance(opt, torch.optim.Optimizer):
        return "plain"
    raise RuntimeError(f"DeviceStep: unknown DeepSpeed optimizer wrapper {type(opt).__name__}")


def _zero_layout(opt: Any) -> tuple[list[nn.Parameter], tuple[list[int], list[int]], int]:
    """ZeRO-1/2's flat weight buffers, group after group: the parameters in buffer order, where each goes among the
    buffer's pieces (parameters and zero padding), and the total size.

    Raises:
        RuntimeError: A parameter is not a view of its group's flat buffer, or two overlap (DeepSpeed changed).
    """
    params: list[nn.Parameter] = []
    slots: list[int] = []
    pads: list[int] = []  # size of every piece; a parameter's slot holds its gradient instead of padding
    total = 0
    for group, flat in zip(opt.bit16_groups, opt.bit16_groups_flat):
        base, size = flat.data_ptr(), flat.element_size()
        placed = sorted(((p.data_ptr() - base) // size, i) for i, p in enumerate(group))
        at = 0
        for offset, i in placed:
            p = group[i]
            if offset < at or offset + p.numel() > flat.numel() or not p.is_contiguous():
                raise RuntimeError("DeviceStep: a ZeRO parameter is not a distinct view of its flat buffer")
            if offset > at:
                pads.append(offset - at)
            slots.append(len(pads))
            pads.append(p.numel())
            params.append(p)
            at = offset + p.numel()
        if at < flat.numel():
            pads.append(flat.numel() - at)
        total += flat.numel()
    return params, (slots, pads), total


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
