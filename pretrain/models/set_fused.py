"""Differentiable entries of the fused SeT core (:mod:`pretrain.models.set_triton`): eager and compiled.

Eager calls go through an ``autograd.Function``, so the kernel counter (``pretrain.kernel_count``) sees the Triton
launches and the one batch-sum of the backward; under ``torch.compile`` the same work is two opaque custom ops
(``setformer::set_core``, ``setformer::set_core_backward``) with a registered autograd and fake (shape) functions, so
Dynamo traces a SeT block without a graph break.
"""

from __future__ import annotations

import logging

import torch

from .set_triton import set_core, set_core_backward

__all__ = ["fused_core"]

logger = logging.getLogger(__name__)


class _SetCore(torch.autograd.Function):
    """Eager entry of the fused core (the kernel counter sees its launches and the batch-sum)."""

    @staticmethod
    def forward(ctx, x, packed, reference, pos_log_scale, log_w, alpha, eps, iters, mode):
        out, psi, f, g = set_core(x, packed, reference, pos_log_scale, log_w, alpha, eps, iters, mode)
        ctx.save_for_backward(x, packed, reference, pos_log_scale, log_w, f, g)
        ctx.args = (alpha, eps, mode)
        return out, psi

    @staticmethod
    def backward(ctx, grad_out, grad_psi):
        x, packed, reference, pos_log_scale, log_w, f, g = ctx.saved_tensors
        gx, gpacked, gref, gpls = set_core_backward(
            grad_out, grad_psi, x, packed, reference, pos_log_scale, log_w, f, g, *ctx.args
        )
        gpls = None if gpls is None else gpls.to(pos_log_scale.dtype)
        return gx, gpacked, gref.to(reference.dtype), gpls, None, None, None, None, None


@torch.library.custom_op("setformer::set_core", mutates_args=())
def _set_core_op(
    x: torch.Tensor,
    packed: torch.Tensor,
    reference: torch.Tensor,
    pos_log_scale: torch.Tensor | None,
    log_w: torch.Tensor | None,
    alpha: float,
    eps: float,
    iters: int,
    mode: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    return set_core(x, packed, reference, pos_log_scale, log_w, alpha, eps, iters, mode)


@_set_core_op.register_fake
def _(x, packed, reference, pos_log_scale, log_w, alpha, eps, iters, mode):
    b, n, h, _d = x.shape
    k, p = packed.shape[-2], reference.shape[-2]
    f32 = dict(dtype=torch.float32)
    return (x.new_empty(b, n, h * k), x.new_empty(b, n, h * k), x.new_empty(b, h, iters, n, **f32),
            x.new_empty(b, h, iters, p, **f32))  # fmt: skip


@torch.library.custom_op("setformer::set_core_backward", mutates_args=())
def _set_core_backward_op(
    grad_out: torch.Tensor,
    grad_psi: torch.Tensor,
    x: torch.Tensor,
    packed: torch.Tensor,
    reference: torch.Tensor,
    pos_log_scale: torch.Tensor | None,
    log_w: torch.Tensor | None,
    f: torch.Tensor,
    g: torch.Tensor,
    alpha: float,
    eps: float,
    mode: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    gx, gpacked, gref, gpls = set_core_backward(
        grad_out, grad_psi, x, packed, reference, pos_log_scale, log_w, f, g, alpha, eps, mode
    )
    gpls = reference.new_zeros(0) if gpls is None else gpls.to(pos_log_scale.dtype)
    return gx.clone(), gpacked.clone(), gref.to(reference.dtype, copy=True), gpls


@_set_core_backward_op.register_fake
def _(grad_out, grad_psi, x, packed, reference, pos_log_scale, log_w, f, g, alpha, eps, mode):
    gpls = reference.new_empty(0) if pos_log_scale is None else torch.empty_like(pos_log_scale)
    return torch.empty_like(x), torch.empty_like(packed), torch.empty_like(reference), gpls


def _setup_core(ctx, inputs, output) -> None:
    x, packed, reference, pos_log_scale, log_w, alpha, eps, _iters, mode = inputs
    ctx.save_for_backward(x, packed, reference, pos_log_scale, log_w, output[2], output[3])
    ctx.args = (alpha, eps, mode)
    ctx.has_pls = pos_log_scale is not None


def _core_op_backward(ctx, grad_out, grad_psi, _gf, _gg):
    x, packed, reference, pos_log_scale, log_w, f, g = ctx.saved_tensors
    gx, gpacked, gref, gpls = _set_core_backward_op(
        grad_out, grad_psi, x, packed, reference, pos_log_scale, log_w, f, g, *ctx.args
    )
    return gx, gpacked, gref, gpls if ctx.has_pls else None, None, None, None, None, None


_set_core_op.register_autograd(_core_op_backward, setup_context=_setup_core)


def fused_core(
    x: torch.Tensor,
    packed: torch.Tensor,
    reference: torch.Tensor,
    pos_log_scale: torch.Tensor | None,
    log_w: torch.Tensor | None,
    alpha: float,
    eps: float,
    iters: int,
    mode: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Differentiable :func:`set_core`: ``(out, psi)``, each ``(B, n, h k)`` (an opaque op under torch.compile)."""
    if torch.compiler.is_compiling():
        out, psi, _f, _g = _set_core_op(x, packed, reference, pos_log_scale, log_w, alpha, eps, iters, mode)
        return out, psi
    return _SetCore.apply(x, packed, reference, pos_log_scale, log_w, alpha, eps, iters, mode)
