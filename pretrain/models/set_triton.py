"""Triton kernels of SeT attention (``set_impl="triton"``): the fused layer core and the whitening, with backwards.

Imported only when the layer runs with ``set_impl="triton"`` (or ``auto`` on CUDA with triton importable); the torch
path of :mod:`pretrain.models.set_attention` is the reference these kernels are tested against, under Triton's
interpreter (``TRITON_INTERPRET=1``, set before triton is imported) on CPU tensors.

**Fused core** (:func:`set_core`): one program per (batch, head) slice computes, from the head's input tokens ``x``
(n x d), the Nystrom features ``psi = |x| kappa(Z x/|x|) W``, the log-kernel ``psi y^T / eps + lambda log W_pos``,
the ``L`` log-domain Sinkhorn iterations and the transport there and back (``A = p T^T psi``, then ``rownorm(T) A``,
``n T A`` or ``A`` itself for ``direct_output``). The tokens are visited in tiles of ``BLOCK_N`` rows, so the n x p
plan is never stored: each pass over the tiles recomputes ``psi`` and the log-kernel from ``x`` (FlashAttention's
trade, three small matmuls per tile), and keeps only the potentials (``L (n + p)`` floats per slice, saved for the
backward). Where ``n <= BLOCK_N`` (n = 49 in stage 4 at 224x224, or ``n`` up to 256 by the block choice) a pass is one
tile, the whole block on chip; at n = 3136 (stage 1) a pass loops over 49 tiles. Passes: ``L`` (row updates and an
online column logsumexp in one sweep each) + 1 (``A``) + 1 (the way back). The backward recomputes in the same way in
``L + 3`` passes (``A`` and its gradient, the plan's gradient, the ``L`` reversed iterations with the row and column
softmax Jacobians of the torch path, then the kernel map), accumulating ``psi``'s gradient in a float32 scratch and
the parameter gradients of the slice in registers; they are written per slice and summed over the batch by one
``sum`` (deterministic: no atomics). All arithmetic is float32 whatever the input dtype, so a bf16 model is more
exact here than on the torch path, which rounds ``psi`` and ``S`` to bf16 before the exponentials: against the same
layer in float32, one layer's output and gradients are within 0.3-0.8% (relative norm) on this path and 3-36% on
the torch path (C = 64, 2 heads, 64-196 tokens; tests/unit/test_set_triton.py checks the order).

Status: the kernels have run only under the interpreter (no GPU was lent while they were written); tile sizes
(``_blocks``) and warps are first guesses for a GPU, to be measured with ``benchmarks/set_attention.py``.

The whitening's kernels are in :mod:`pretrain.models.set_triton_whitening`.

Every launch calls :func:`pretrain.kernel_count.record_triton_launch`, so a counted step includes them.
"""

from __future__ import annotations

import logging
import math
import os

import torch
import triton
import triton.language as tl

from pretrain.kernel_count import record_triton_launch

__all__ = ["MODE_DIRECT", "MODE_EXACT_ROWS", "MODE_N_T_A", "set_core", "set_core_backward"]

logger = logging.getLogger(__name__)

_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"  # read by triton when the kernels are decorated (import time)
NEG = -1.0e30  # "minus infinity" of padded slots: exp() gives 0 and no inf - inf = nan can arise
MODE_EXACT_ROWS, MODE_N_T_A, MODE_DIRECT = 0, 1, 2


def _launch(name: str, kernel, grid: tuple[int], *args, **kwargs) -> None:
    """Launch ``kernel`` and count it (:func:`record_triton_launch`). Under the interpreter the launch runs with
    torch's dispatch and function modes off: its host copies of the arguments are the interpreter's, not kernels."""
    record_triton_launch(name)
    if not _INTERPRET:
        kernel[grid](*args, **kwargs)
        return
    with torch.utils._python_dispatch._disable_current_modes(), torch._C.DisableTorchFunction():
        kernel[grid](*args, **kwargs)


def _block(n: int) -> int:
    return max(16, triton.next_power_of_2(n))  # tl.dot needs every dimension >= 16


# --------------------------------------------------------------------------------------------------- device helpers


@triton.jit
def _kernel_map(x, z, w, alpha, PREC: tl.constexpr):
    """Nystrom features of a tile ``x`` (BN, BD): returns psi (BN, BK), phi, rsqrt(|x|^2) and |x|^2 (+ 1e-12)."""
    sq = tl.sum(x * x, 1) + 1e-12
    r = 1.0 / tl.sqrt(sq)
    cos = tl.dot(x * r[:, None], tl.trans(z), input_precision=PREC)  # (BN, BK)
    phi = tl.exp(0.5 * tl.log(sq)[:, None] - alpha + alpha * cos)
    psi = tl.dot(phi, w, input_precision=PREC)
    return psi, phi, r, sq


@triton.jit
def _log_kernel(psi, y, lw_ptr, rows, offs_p, N, P, lam, inv_eps, HAS_POS: tl.constexpr, PREC: tl.constexpr):
    """``psi y^T / eps + lam log W`` of a tile (BN, BP); padded slots at NEG."""
    lk = tl.dot(psi, tl.trans(y), input_precision=PREC) * inv_eps
    pmask = offs_p < P
    if HAS_POS:
        lw = tl.load(lw_ptr + rows[:, None] * P + offs_p[None, :], mask=(rows[:, None] < N) & pmask[None, :], other=0.0)
        lk += lam * lw
    return tl.where(pmask[None, :], lk, NEG)


@triton.jit
def _load_x(x_ptr, rows, offs_d, N, D, sxn):
    mask = (rows[:, None] < N) & (offs_d[None, :] < D)
    return tl.load(x_ptr + rows[:, None] * sxn + offs_d[None, :], mask=mask, other=0.0).to(tl.float32)


@triton.jit
def _load_head_params(wz_ptr, y_ptr, pls_ptr, h, D, K, P, offs_k, offs_kc, offs_d, offs_p, HAS_SCALE: tl.constexpr):
    """Unit anchors z (BK, BD), whitening W (BK, BK), reference y (BP, BK) and the positional scale of head ``h``."""
    row = wz_ptr + h * K * (D + 2 * K) + offs_k[:, None] * (D + 2 * K)
    kmask = offs_k[:, None] < K
    z = tl.load(row + offs_d[None, :], mask=kmask & (offs_d[None, :] < D), other=0.0)
    w = tl.load(row + D + offs_kc[None, :], mask=kmask & (offs_kc[None, :] < K), other=0.0)
    ymask = (offs_p[:, None] < P) & (offs_kc[None, :] < K)
    y = tl.load(y_ptr + h * P * K + offs_p[:, None] * K + offs_kc[None, :], mask=ymask, other=0.0).to(tl.float32)
    lam = 1.0
    if HAS_SCALE:
        lam = tl.exp(tl.load(pls_ptr + h).to(tl.float32))
    return z, w, y, lam


# ------------------------------------------------------------------------------------------------------- forward


@triton.jit
def _core_fwd_kernel(
    x_ptr, sxb, sxn, wz_ptr, y_ptr, lw_ptr, pls_ptr, out_ptr, psi_ptr, sob, son, f_ptr, g_ptr,
    N, H, alpha, inv_eps, log_a, log_b,
    D: tl.constexpr, K: tl.constexpr, P: tl.constexpr, L: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_P: tl.constexpr,
    HAS_POS: tl.constexpr, HAS_SCALE: tl.constexpr, MODE: tl.constexpr, PREC: tl.constexpr,
):  # fmt: skip
    pid = tl.program_id(0)
    b = pid // H
    h = pid % H
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    offs_k = tl.arange(0, BLOCK_K)
    offs_p = tl.arange(0, BLOCK_P)
    pmask = offs_p < P
    kmask = offs_k < K
    z, w, y, lam = _load_head_params(wz_ptr, y_ptr, pls_ptr, h, D, K, P, offs_k, offs_k, offs_d, offs_p, HAS_SCALE)
    x_base = x_ptr + b * sxb + h * D
    o_base = b * sob + h * K
    f_base = f_ptr + pid * L * N
    g_base = g_ptr + pid * L * P

    g = tl.zeros([BLOCK_P], dtype=tl.float32)
    for it in range(L):  # row update then column update; the column logsumexp is accumulated online over the tiles
        m_col = tl.full([BLOCK_P], NEG, dtype=tl.float32)
        s_col = tl.zeros([BLOCK_P], dtype=tl.float32)
        for n0 in range(0, N, BLOCK_N):
            rows = n0 + offs_n
            rmask = rows < N
            psi, _phi, _r, _sq = _kernel_map(_load_x(x_base, rows, offs_d, N, D, sxn), z, w, alpha, PREC)
            if it == 0:
                ptrs = psi_ptr + o_base + rows[:, None] * son + offs_k[None, :]
                tl.store(ptrs, psi.to(psi_ptr.dtype.element_ty), mask=rmask[:, None] & kmask[None, :])
            lk = _log_kernel(psi, y, lw_ptr, rows, offs_p, N, P, lam, inv_eps, HAS_POS, PREC)
            t = lk + g[None, :]
            m = tl.max(t, 1)
            f = log_a - (m + tl.log(tl.sum(tl.exp(t - m[:, None]), 1)))  # (BN,)
            tl.store(f_base + it * N + rows, f, mask=rmask)
            t = tl.where(rmask[:, None], lk + f[:, None], NEG)
            m_new = tl.maximum(m_col, tl.max(t, 0))
            s_col = s_col * tl.exp(m_col - m_new) + tl.sum(tl.exp(t - m_new[None, :]), 0)
            m_col = m_new
        g = tl.where(pmask, log_b - (m_col + tl.log(s_col)), 0.0)
        tl.store(g_base + it * P + offs_p, g, mask=pmask)
    tl.debug_barrier()  # the potentials f written above are read back below by other threads

    a = tl.zeros([BLOCK_P, BLOCK_K], dtype=tl.float32)  # A = p T^T psi
    for n0 in range(0, N, BLOCK_N):
        rows = n0 + offs_n
        rmask = rows < N
        psi, _phi, _r, _sq = _kernel_map(_load_x(x_base, rows, offs_d, N, D, sxn), z, w, alpha, PREC)
        lk = _log_kernel(psi, y, lw_ptr, rows, offs_p, N, P, lam, inv_eps, HAS_POS, PREC)
        f = tl.load(f_base + (L - 1) * N + rows, mask=rmask, other=0.0)
        t = tl.where(rmask[:, None], tl.exp(lk + f[:, None] + g[None, :]), 0.0)
        a += tl.dot(tl.trans(t), psi, input_precision=PREC)
    a = a * P

    if MODE == 2:  # p = n on the token grid: slot j is token j's output
        ptrs = out_ptr + o_base + offs_p[:, None] * son + offs_k[None, :]
        tl.store(ptrs, a.to(out_ptr.dtype.element_ty), mask=pmask[:, None] & kmask[None, :])
    else:
        for n0 in range(0, N, BLOCK_N):
            rows = n0 + offs_n
            rmask = rows < N
            psi, _phi, _r, _sq = _kernel_map(_load_x(x_base, rows, offs_d, N, D, sxn), z, w, alpha, PREC)
            lk = _log_kernel(psi, y, lw_ptr, rows, offs_p, N, P, lam, inv_eps, HAS_POS, PREC)
            f = tl.load(f_base + (L - 1) * N + rows, mask=rmask, other=0.0)
            t = tl.where(rmask[:, None], tl.exp(lk + f[:, None] + g[None, :]), 0.0)
            if MODE == 0:
                t = t / tl.maximum(tl.sum(t, 1), 1e-30)[:, None]  # rows renormalised: exact convex combinations
            else:
                t = t * N
            o = tl.dot(t, a, input_precision=PREC)
            ptrs = out_ptr + o_base + rows[:, None] * son + offs_k[None, :]
            tl.store(ptrs, o.to(out_ptr.dtype.element_ty), mask=rmask[:, None] & kmask[None, :])


# ------------------------------------------------------------------------------------------------------ backward


# fmt: off
@triton.jit
def _tile(x_base, n0, offs_n, offs_d, offs_p, N, D, P, sxn, z, w, y, lw_ptr, lam, alpha, inv_eps,
          HAS_POS: tl.constexpr, PREC: tl.constexpr):  # fmt: skip
    """Rows, row mask, psi (BN, BK) and log-kernel (BN, BP) of the tile of tokens starting at ``n0``."""
    rows = n0 + offs_n
    psi, _phi, _r, _sq = _kernel_map(_load_x(x_base, rows, offs_d, N, D, sxn), z, w, alpha, PREC)
    lk = _log_kernel(psi, y, lw_ptr, rows, offs_p, N, P, lam, inv_eps, HAS_POS, PREC)
    return rows, rows < N, psi, lk


@triton.jit
def _bwd_transport(x_base, go_base, f_last, g_last, offs_n, offs_d, offs_k, offs_p, N, D, K, P, sxn, sgn, z, w, y,
                   lw_ptr, lam, alpha, inv_eps, BLOCK_N: tl.constexpr, BLOCK_P: tl.constexpr,
                   BLOCK_K: tl.constexpr, HAS_POS: tl.constexpr, MODE: tl.constexpr, PREC: tl.constexpr):  # fmt: skip
    """Pass 1: ``A = p T^T psi`` and ``A_bar``, the gradient reaching ``A`` from the output."""
    kmask = offs_k < K
    a = tl.zeros([BLOCK_P, BLOCK_K], dtype=tl.float32)
    a_bar = tl.zeros([BLOCK_P, BLOCK_K], dtype=tl.float32)
    if MODE == 2:  # out = A: slot j is token j
        gmask = (offs_p[:, None] < P) & kmask[None, :]
        a_bar = tl.load(go_base + offs_p[:, None] * sgn + offs_k[None, :], mask=gmask, other=0.0).to(tl.float32)
    else:
        for n0 in range(0, N, BLOCK_N):
            rows, rmask, psi, lk = _tile(x_base, n0, offs_n, offs_d, offs_p, N, D, P, sxn, z, w, y, lw_ptr, lam,
                                         alpha, inv_eps, HAS_POS, PREC)  # fmt: skip
            f = tl.load(f_last + rows, mask=rmask, other=0.0)
            t = tl.where(rmask[:, None], tl.exp(lk + f[:, None] + g_last[None, :]), 0.0)
            a += tl.dot(tl.trans(t), psi, input_precision=PREC)
            go = tl.load(go_base + rows[:, None] * sgn + offs_k[None, :], mask=rmask[:, None] & kmask[None, :],
                         other=0.0).to(tl.float32)  # fmt: skip
            if MODE == 0:
                t = t / tl.maximum(tl.sum(t, 1), 1e-30)[:, None]
            else:
                t = t * N
            a_bar += tl.dot(tl.trans(t), go, input_precision=PREC)
        a = a * P
    return a, a_bar


@triton.jit
def _bwd_plan(x_base, go_base, f_last, g_last, acc_base, fbar_base, a, a_bar, offs_n, offs_d, offs_k, offs_p, N, D,
              K, P, sxn, sgn, z, w, y, lw_ptr, lam, alpha, inv_eps, BLOCK_N: tl.constexpr, BLOCK_P: tl.constexpr,
              BLOCK_K: tl.constexpr, HAS_POS: tl.constexpr, MODE: tl.constexpr, PREC: tl.constexpr):  # fmt: skip
    """Pass 2: the plan's gradient ``T_bar``, then ``grad_k = T_bar * T``; stores psi's gradient so far and the row
    sums of ``grad_k``; returns the column sums and the reference and positional-scale gradients so far."""
    kmask = offs_k < K
    pmask = offs_p < P
    g_bar = tl.zeros([BLOCK_P], dtype=tl.float32)
    y_bar = tl.zeros([BLOCK_P, BLOCK_K], dtype=tl.float32)
    lam_bar = tl.zeros([BLOCK_P], dtype=tl.float32)
    for n0 in range(0, N, BLOCK_N):
        rows, rmask, psi, lk = _tile(x_base, n0, offs_n, offs_d, offs_p, N, D, P, sxn, z, w, y, lw_ptr, lam, alpha,
                                     inv_eps, HAS_POS, PREC)  # fmt: skip
        f = tl.load(f_last + rows, mask=rmask, other=0.0)
        t = tl.where(rmask[:, None], tl.exp(lk + f[:, None] + g_last[None, :]), 0.0)
        t_bar = P * tl.dot(psi, tl.trans(a_bar), input_precision=PREC)  # from A = p T^T psi
        if MODE != 2:
            go = tl.load(go_base + rows[:, None] * sgn + offs_k[None, :], mask=rmask[:, None] & kmask[None, :],
                         other=0.0).to(tl.float32)  # fmt: skip
            b_bar = tl.dot(go, tl.trans(a), input_precision=PREC)  # (BN, BP)
            if MODE == 0:  # out = (T / r) A with r the row sums
                r = tl.maximum(tl.sum(t, 1), 1e-30)
                rho = tl.sum(b_bar * t, 1) / r
                t_bar += (b_bar - rho[:, None]) / r[:, None]
            else:
                t_bar += N * b_bar
        grad_k = t_bar * t
        tl.store(fbar_base + rows, tl.sum(grad_k, 1), mask=rmask)
        g_bar += tl.sum(grad_k, 0)
        psi_bar = P * tl.dot(t, a_bar, input_precision=PREC) + tl.dot(grad_k, y, input_precision=PREC) * inv_eps
        tl.store(acc_base + rows[:, None] * K + offs_k[None, :], psi_bar, mask=rmask[:, None] & kmask[None, :])
        y_bar += tl.dot(tl.trans(grad_k), psi, input_precision=PREC) * inv_eps
        if HAS_POS:
            lw = tl.load(lw_ptr + rows[:, None] * P + offs_p[None, :], mask=rmask[:, None] & pmask[None, :], other=0.0)
            lam_bar += tl.sum(grad_k * lw, 0)
    return g_bar, y_bar, lam_bar


@triton.jit
def _bwd_sinkhorn_step(x_base, f_s, g_s, g_prev, g_bar, first, acc_base, fbar_base, y_bar, lam_bar, offs_n, offs_d,
                       offs_k, offs_p, N, D, K, P, sxn, z, w, y, lw_ptr, lam, alpha, inv_eps, log_a, log_b,
                       BLOCK_N: tl.constexpr, BLOCK_P: tl.constexpr, HAS_POS: tl.constexpr,
                       PREC: tl.constexpr):  # fmt: skip
    """One Sinkhorn iteration in reverse (column then row update; their Jacobians are the column and row softmax
    factors of the torch path's backward); returns the gradient reaching the previous column potentials."""
    kmask = offs_k < K
    pmask = offs_p < P
    g_next = tl.zeros([BLOCK_P], dtype=tl.float32)
    for n0 in range(0, N, BLOCK_N):
        rows, rmask, psi, lk = _tile(x_base, n0, offs_n, offs_d, offs_p, N, D, P, sxn, z, w, y, lw_ptr, lam, alpha,
                                     inv_eps, HAS_POS, PREC)  # fmt: skip
        f = tl.load(f_s + rows, mask=rmask, other=0.0)
        col = tl.where(rmask[:, None], tl.exp(lk + f[:, None] + g_s[None, :] - log_b), 0.0) * g_bar[None, :]
        f_bar = -tl.sum(col, 1)
        if first:  # the last iteration also feeds the plan directly
            f_bar += tl.load(fbar_base + rows, mask=rmask, other=0.0)
        row = tl.where(rmask[:, None], tl.exp(lk + f[:, None] - log_a + g_prev[None, :]), 0.0) * f_bar[:, None]
        g_next -= tl.sum(row, 0)
        dk = -(col + row)
        acc_ptrs = acc_base + rows[:, None] * K + offs_k[None, :]
        amask = rmask[:, None] & kmask[None, :]
        psi_bar = tl.load(acc_ptrs, mask=amask, other=0.0) + tl.dot(dk, y, input_precision=PREC) * inv_eps
        tl.store(acc_ptrs, psi_bar, mask=amask)
        y_bar += tl.dot(tl.trans(dk), psi, input_precision=PREC) * inv_eps
        if HAS_POS:
            lw = tl.load(lw_ptr + rows[:, None] * P + offs_p[None, :], mask=rmask[:, None] & pmask[None, :], other=0.0)
            lam_bar += tl.sum(dk * lw, 0)
    return g_next, y_bar, lam_bar


@triton.jit
def _bwd_kernel_map(x_base, gx_base, gp_base, acc_base, offs_n, offs_d, offs_k, N, D, K, sxn, sxgn, spn, z, w, alpha,
                    BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_K: tl.constexpr, HAS_GPSI: tl.constexpr,
                    PREC: tl.constexpr):  # fmt: skip
    """Last pass, through ``psi = |x| exp(alpha (cos - 1)) W`` with ``cos = (x / |x|) z^T``: stores ``x``'s gradient,
    returns those of ``z`` and ``W``."""
    kmask = offs_k < K
    z_bar = tl.zeros([BLOCK_K, BLOCK_D], dtype=tl.float32)
    w_bar = tl.zeros([BLOCK_K, BLOCK_K], dtype=tl.float32)
    for n0 in range(0, N, BLOCK_N):
        rows = n0 + offs_n
        rmask = rows < N
        x = _load_x(x_base, rows, offs_d, N, D, sxn)
        _psi, phi, r, sq = _kernel_map(x, z, w, alpha, PREC)
        amask = rmask[:, None] & kmask[None, :]
        psi_bar = tl.load(acc_base + rows[:, None] * K + offs_k[None, :], mask=amask, other=0.0)
        if HAS_GPSI:
            psi_bar += tl.load(gp_base + rows[:, None] * spn + offs_k[None, :], mask=amask, other=0.0).to(tl.float32)
        phi_bar = tl.dot(psi_bar, tl.trans(w), input_precision=PREC)
        w_bar += tl.dot(tl.trans(phi), psi_bar, input_precision=PREC)
        q = phi_bar * phi
        cos_bar = alpha * q
        sq_bar = tl.sum(q, 1) * 0.5 / sq
        u = x * r[:, None]
        u_bar = tl.dot(cos_bar, z, input_precision=PREC)  # (BN, BD)
        z_bar += tl.dot(tl.trans(cos_bar), u, input_precision=PREC)
        r_bar = tl.sum(u_bar * x, 1)
        x_bar = r[:, None] * u_bar + 2.0 * x * (sq_bar - 0.5 * r_bar * r * r * r)[:, None]
        gx_ptrs = gx_base + rows[:, None] * sxgn + offs_d[None, :]
        tl.store(gx_ptrs, x_bar.to(gx_base.dtype.element_ty), mask=rmask[:, None] & (offs_d[None, :] < D))
    return z_bar, w_bar


@triton.jit
def _core_bwd_kernel(
    x_ptr, sxb, sxn, wz_ptr, y_ptr, lw_ptr, pls_ptr, f_ptr, g_ptr,
    go_ptr, sgb, sgn, gp_ptr, spb, spn, gx_ptr, sxgb, sxgn, part_ptr, acc_ptr, fbar_ptr,
    N, H, alpha, inv_eps, log_a, log_b, part_stride, off_y, off_lam,
    D: tl.constexpr, K: tl.constexpr, P: tl.constexpr, L: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_P: tl.constexpr,
    HAS_POS: tl.constexpr, HAS_SCALE: tl.constexpr, HAS_GPSI: tl.constexpr, MODE: tl.constexpr,
    PREC: tl.constexpr,
):  # fmt: skip
    pid = tl.program_id(0)
    b = pid // H
    h = pid % H
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    offs_k = tl.arange(0, BLOCK_K)
    offs_p = tl.arange(0, BLOCK_P)
    pmask = offs_p < P
    kmask = offs_k < K
    z, w, y, lam = _load_head_params(wz_ptr, y_ptr, pls_ptr, h, D, K, P, offs_k, offs_k, offs_d, offs_p, HAS_SCALE)
    x_base = x_ptr + b * sxb + h * D
    go_base = go_ptr + b * sgb + h * K
    f_base = f_ptr + pid * L * N
    g_base = g_ptr + pid * L * P
    acc_base = acc_ptr + pid * N * K  # float32 gradient of psi, (N, K) per slice
    fbar_base = fbar_ptr + pid * N
    g_last = tl.load(g_base + (L - 1) * P + offs_p, mask=pmask, other=0.0)
    f_last = f_base + (L - 1) * N
    a, a_bar = _bwd_transport(x_base, go_base, f_last, g_last, offs_n, offs_d, offs_k, offs_p, N, D, K, P, sxn, sgn,
                              z, w, y, lw_ptr, lam, alpha, inv_eps, BLOCK_N, BLOCK_P, BLOCK_K, HAS_POS, MODE, PREC)
    g_bar, y_bar, lam_bar = _bwd_plan(x_base, go_base, f_last, g_last, acc_base, fbar_base, a, a_bar, offs_n, offs_d,
                                      offs_k, offs_p, N, D, K, P, sxn, sgn, z, w, y, lw_ptr, lam, alpha, inv_eps,
                                      BLOCK_N, BLOCK_P, BLOCK_K, HAS_POS, MODE, PREC)
    tl.debug_barrier()  # psi's gradient and the row sums stored above are read back by other threads
    for i in range(L):
        step = L - 1 - i
        g_s = tl.load(g_base + step * P + offs_p, mask=pmask, other=0.0)
        g_prev = tl.zeros([BLOCK_P], dtype=tl.float32)
        if step > 0:
            g_prev = tl.load(g_base + (step - 1) * P + offs_p, mask=pmask, other=0.0)
        g_bar, y_bar, lam_bar = _bwd_sinkhorn_step(x_base, f_base + step * N, g_s, g_prev, g_bar, i == 0, acc_base,
                                                   fbar_base, y_bar, lam_bar, offs_n, offs_d, offs_k, offs_p, N, D, K,
                                                   P, sxn, z, w, y, lw_ptr, lam, alpha, inv_eps, log_a, log_b,
                                                   BLOCK_N, BLOCK_P, HAS_POS, PREC)
        tl.debug_barrier()
    z_bar, w_bar = _bwd_kernel_map(x_base, gx_ptr + b * sxgb + h * D, gp_ptr + b * spb + h * K, acc_base, offs_n,
                                   offs_d, offs_k, N, D, K, sxn, sxgn, spn, z, w, alpha, BLOCK_N, BLOCK_D, BLOCK_K,
                                   HAS_GPSI, PREC)
    # this slice's parameter gradients: [Z_hat | W | R] of head h, the reference of head h, the positional log-scale
    part = part_ptr + b * part_stride
    wz_row = part + h * K * (D + 2 * K) + offs_k[:, None] * (D + 2 * K)
    kk_mask = kmask[:, None] & kmask[None, :]
    tl.store(wz_row + offs_d[None, :], z_bar, mask=kmask[:, None] & (offs_d[None, :] < D))
    tl.store(wz_row + D + offs_k[None, :], w_bar, mask=kk_mask)
    tl.store(wz_row + D + K + offs_k[None, :], tl.zeros([BLOCK_K, BLOCK_K], tl.float32), mask=kk_mask)
    y_ptrs = part + off_y + h * P * K + offs_p[:, None] * K + offs_k[None, :]
    tl.store(y_ptrs, y_bar, mask=pmask[:, None] & kmask[None, :])
    tl.store(part + off_lam + h, tl.sum(lam_bar, 0) * lam)
# fmt: on


# ------------------------------------------------------------------------------------------------------ wrappers


def _check_device(t: torch.Tensor) -> None:
    if t.device.type != "cuda" and not _INTERPRET:
        raise ValueError(
            f"set_impl='triton' on a {t.device.type} tensor needs a CUDA device, or Triton's interpreter for tests "
            "(TRITON_INTERPRET=1 set before triton is imported); use set_impl='torch' or 'auto' on CPU"
        )


def _blocks(n: int, d: int, k: int, p: int) -> dict[str, int]:
    """Tile sizes: a (BLOCK_N, BLOCK_P) float32 tile of at most 2k elements per program on a GPU (several such tiles
    are live at once in 4 warps' registers); the interpreter, which runs each program as numpy, takes larger tiles."""
    block_p = _block(p)
    budget = 16384 if _INTERPRET else 2048
    block_n = min(_block(n), 256, max(16, budget // block_p))
    return dict(BLOCK_N=block_n, BLOCK_D=_block(d), BLOCK_K=_block(k), BLOCK_P=block_p)


def _common(x: torch.Tensor, packed: torch.Tensor, reference: torch.Tensor, iters: int) -> tuple:
    b, n, h, d = x.shape
    k, p = packed.shape[-2], reference.shape[-2]
    if x.stride(-1) != 1:
        raise ValueError("set_core: x (B, n, h, d) needs a unit stride over d")
    prec = "ieee" if x.dtype == torch.float32 else "tf32"  # float32 models keep float32 matmuls
    consts = dict(D=d, K=k, P=p, L=iters, **_blocks(n, d, k, p), PREC=prec)
    return b, n, h, d, k, p, consts


def set_core(
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
    """Fused SeT core of per-head tokens ``x`` (B, n, h, d), a strided view with unit stride over ``d``.

    Args:
        x: per-head inputs.
        packed: ``[Z_hat | W | R]`` ``(h, k, d + 2 k)`` float32 (:func:`pretrain.models.set_whitening.whitening`).
        reference: ``(h, p, k)``.
        pos_log_scale: ``(h,)`` log of the per-head positional scale, or None (scale 1).
        log_w: ``(n, p)`` float32 positional log-weight, or None (no positional term).
        alpha: kernel ``1 / sigma^2``.
        eps: entropic regularisation.
        iters: Sinkhorn iterations.
        mode: ``MODE_EXACT_ROWS``, ``MODE_N_T_A`` or ``MODE_DIRECT`` (``p = n``).

    Returns:
        ``out`` and ``psi`` ``(B, n, h k)`` in ``x``'s dtype, and the potentials ``f`` ``(B, h, L, n)`` and ``g``
        ``(B, h, L, p)`` float32 (for the backward).
    """
    _check_device(x)
    b, n, h, d, k, p, consts = _common(x, packed, reference, iters)
    out = x.new_empty(b, n, h * k)
    psi = x.new_empty(b, n, h * k)
    f = x.new_empty(b, h, iters, n, dtype=torch.float32)
    g = x.new_empty(b, h, iters, p, dtype=torch.float32)
    dummy = packed  # stands in for absent optional pointers (never read: HAS_POS / HAS_SCALE are False)
    _launch(
        "set_core_fwd", _core_fwd_kernel, (b * h,),
        x, x.stride(0), x.stride(1), packed, reference.contiguous(),
        dummy if log_w is None else log_w, dummy if pos_log_scale is None else pos_log_scale,
        out, psi, out.stride(0), out.stride(1), f, g,
        n, h, alpha, 1.0 / eps, -math.log(n), -math.log(p),
        HAS_POS=log_w is not None, HAS_SCALE=pos_log_scale is not None, MODE=mode, **consts,
    )  # fmt: skip
    return out, psi, f, g


def set_core_backward(
    grad_out: torch.Tensor,
    grad_psi: torch.Tensor | None,
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
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Gradients of :func:`set_core` w.r.t. ``x``, ``packed``, ``reference`` and ``pos_log_scale``.

    ``grad_out`` and ``grad_psi`` (None: zero) are ``(B, n, h k)`` with unit stride over the last dimension. The
    per-slice parameter gradients are written to one ``(B, total)`` float32 buffer and summed over the batch by one
    ``sum``; ``grad_x`` is ``(B, n, h, d)`` in ``x``'s dtype.
    """
    b, n, h, d, k, p, consts = _common(x, packed, reference, f.shape[2])
    grad_out = grad_out if grad_out.stride(-1) == 1 else grad_out.contiguous()
    if grad_psi is not None and grad_psi.stride(-1) != 1:
        grad_psi = grad_psi.contiguous()
    grad_x = x.new_empty(b, n, h * d)
    off_y = h * k * (d + 2 * k)
    off_lam = off_y + h * p * k
    part = x.new_empty(b, off_lam + h, dtype=torch.float32)
    acc = x.new_empty(b * h, n, k, dtype=torch.float32)
    fbar = x.new_empty(b * h, n, dtype=torch.float32)
    dummy = packed
    gp = grad_out if grad_psi is None else grad_psi
    _launch(
        "set_core_bwd", _core_bwd_kernel, (b * h,),
        x, x.stride(0), x.stride(1), packed, reference.contiguous(),
        dummy if log_w is None else log_w, dummy if pos_log_scale is None else pos_log_scale, f, g,
        grad_out, grad_out.stride(0), grad_out.stride(1), gp, gp.stride(0), gp.stride(1),
        grad_x, grad_x.stride(0), grad_x.stride(1), part, acc, fbar,
        n, h, alpha, 1.0 / eps, -math.log(n), -math.log(p), part.stride(0), off_y, off_lam,
        HAS_POS=log_w is not None, HAS_SCALE=pos_log_scale is not None, HAS_GPSI=grad_psi is not None, MODE=mode,
        **consts,
    )  # fmt: skip
    total = part.sum(0)  # (total,): the batch sum of every parameter gradient in one kernel
    grad_packed = total[:off_y].view(h, k, d + 2 * k)
    grad_ref = total[off_y:off_lam].view(h, p, k)
    grad_pls = total[off_lam:] if pos_log_scale is not None else None
    return grad_x.view(b, n, h, d), grad_packed, grad_ref, grad_pls
