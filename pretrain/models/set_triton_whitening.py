"""Triton kernels of the SeT whitening (``set_impl="triton"``): one program per head, forward and backward.

The forward runs the coupled Newton-Schulz iterations of :mod:`pretrain.models.set_whitening` on chip, the backward
its Lyapunov sign iterations (block-wise on ``[[S11, S12], [0, S22]]``), both in full float32
(``input_precision="ieee"``: TF32 would lose the small eigenvalues, whose condition number reaches 1e4). Tested
against the torch versions under Triton's interpreter (tests/unit/test_set_triton.py).
"""

from __future__ import annotations

import logging

import torch
import triton
import triton.language as tl

from .set_triton import _block, _check_device, _launch

__all__ = ["whiten_backward", "whiten_forward"]

logger = logging.getLogger(__name__)


@triton.jit
def _unit_anchors(a_ptr, h, K, D, offs_k, offs_d):
    mask = (offs_k[:, None] < K) & (offs_d[None, :] < D)
    a = tl.load(a_ptr + h * K * D + offs_k[:, None] * D + offs_d[None, :], mask=mask, other=0.0).to(tl.float32)
    norm = tl.maximum(tl.sqrt(tl.sum(a * a, 1)), 1e-12)
    return a / norm[:, None], norm


@triton.jit
def _whiten_fwd_kernel(
    a_ptr, out_ptr, alpha, ridge, K: tl.constexpr, D: tl.constexpr, ITERS: tl.constexpr,
    BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    h = tl.program_id(0)
    offs_k = tl.arange(0, BLOCK_K)
    offs_d = tl.arange(0, BLOCK_D)
    z, _norm = _unit_anchors(a_ptr, h, K, D, offs_k, offs_d)
    valid = (offs_k[:, None] < K) & (offs_k[None, :] < K)
    eye = tl.where(valid & (offs_k[:, None] == offs_k[None, :]), 1.0, 0.0)
    gram = tl.dot(z, tl.trans(z), input_precision="ieee")
    m = tl.where(valid, tl.exp(alpha * (gram - 1.0)), 0.0) + ridge * eye
    c = tl.sqrt(tl.sum(tl.sum(m * m, 1), 0))
    y = m / c
    zz = eye
    for _ in range(ITERS):
        t = 1.5 * eye - 0.5 * tl.dot(zz, y, input_precision="ieee")
        y, zz = tl.dot(y, t, input_precision="ieee"), tl.dot(t, zz, input_precision="ieee")
    root = tl.sqrt(c)
    row = out_ptr + h * K * (D + 2 * K) + offs_k[:, None] * (D + 2 * K)
    tl.store(row + offs_d[None, :], z, mask=(offs_k[:, None] < K) & (offs_d[None, :] < D))
    tl.store(row + D + offs_k[None, :], zz / root, mask=valid)
    tl.store(row + D + K + offs_k[None, :], y * root, mask=valid)


@triton.jit
def _whiten_bwd_kernel(
    a_ptr, wz_ptr, grad_ptr, out_ptr, alpha, K: tl.constexpr, D: tl.constexpr, ITERS: tl.constexpr,
    BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    h = tl.program_id(0)
    offs_k = tl.arange(0, BLOCK_K)
    offs_d = tl.arange(0, BLOCK_D)
    kd_mask = (offs_k[:, None] < K) & (offs_d[None, :] < D)
    valid = (offs_k[:, None] < K) & (offs_k[None, :] < K)
    base = h * K * (D + 2 * K) + offs_k[:, None] * (D + 2 * K)
    z = tl.load(wz_ptr + base + offs_d[None, :], mask=kd_mask, other=0.0)
    w = tl.load(wz_ptr + base + D + offs_k[None, :], mask=valid, other=0.0)
    r = tl.load(wz_ptr + base + D + K + offs_k[None, :], mask=valid, other=0.0)
    z_bar = tl.load(grad_ptr + base + offs_d[None, :], mask=kd_mask, other=0.0)
    w_bar = tl.load(grad_ptr + base + D + offs_k[None, :], mask=valid, other=0.0)
    c = -tl.dot(tl.dot(w, w_bar, input_precision="ieee"), w, input_precision="ieee")  # R X + X R = -W Wbar W
    s = tl.sqrt(tl.sum(tl.sum(r * r, 1), 0))
    # sign([[R, C], [0, -R]]) = [[I, 2X], [0, -I]], iterated block-wise: S = [[S11, S12], [0, S22]]
    s11 = r / s
    s12 = c / s
    s22 = -r / s
    for _ in range(ITERS):
        q11 = tl.dot(s11, s11, input_precision="ieee")
        q22 = tl.dot(s22, s22, input_precision="ieee")
        q12 = tl.dot(s11, s12, input_precision="ieee") + tl.dot(s12, s22, input_precision="ieee")
        n11 = 1.5 * s11 - 0.5 * tl.dot(s11, q11, input_precision="ieee")
        n12 = 1.5 * s12 - 0.5 * (tl.dot(s11, q12, input_precision="ieee") + tl.dot(s12, q22, input_precision="ieee"))
        s22 = 1.5 * s22 - 0.5 * tl.dot(s22, q22, input_precision="ieee")
        s11 = n11
        s12 = n12
    m_bar = 0.5 * s12
    gram = tl.where(valid, tl.exp(alpha * (tl.dot(z, tl.trans(z), input_precision="ieee") - 1.0)), 0.0)
    g_bar = alpha * m_bar * gram
    z_bar += tl.dot(g_bar + tl.trans(g_bar), z, input_precision="ieee")
    _z, norm = _unit_anchors(a_ptr, h, K, D, offs_k, offs_d)
    a_bar = (z_bar - z * tl.sum(z * z_bar, 1)[:, None]) / norm[:, None]
    tl.store(
        out_ptr + h * K * D + offs_k[:, None] * D + offs_d[None, :], a_bar.to(out_ptr.dtype.element_ty), mask=kd_mask
    )


def whiten_forward(anchors: torch.Tensor, alpha: float, ridge: float, iters: int) -> torch.Tensor:
    """Packed ``[Z_hat | W | R]`` ``(h, k, d + 2 k)`` float32 of anchors ``(h, k, d)`` (one program per head)."""
    _check_device(anchors)
    h, k, d = anchors.shape
    anchors = anchors.detach().contiguous()
    out = anchors.new_empty(h, k, d + 2 * k, dtype=torch.float32)
    warps = 4 if k <= 32 else 8  # up to ten live k x k float32 matrices per program
    args = (anchors, out, alpha, ridge, k, d, iters, _block(k), _block(d))
    _launch("set_whiten_fwd", _whiten_fwd_kernel, (h,), *args, num_warps=warps)
    return out


def whiten_backward(
    anchors: torch.Tensor, packed: torch.Tensor, grad: torch.Tensor, alpha: float, iters: int
) -> torch.Tensor:
    """Gradient w.r.t. the anchors from the gradient of the packed whitening (one program per head)."""
    h, k, d = anchors.shape
    anchors = anchors.detach().contiguous()
    grad = grad.float().contiguous()
    out = torch.empty_like(anchors)
    args = (anchors, packed.contiguous(), grad, out, alpha, k, d, iters, _block(k), _block(d))
    _launch("set_whiten_bwd", _whiten_bwd_kernel, (h,), *args, num_warps=4 if k <= 32 else 8)
    return out
