"""SeT attention: tokens transported onto a learned reference set by entropic optimal transport, and back.

SeTformer (Shamsolmoali et al., "SeTformer is What You Need for Vision and Language", AAAI 2024, arXiv 2401.03540)
replaces dot-product self-attention with "SeT": embed the tokens in an RKHS (Nystrom approximation of a
positive-definite kernel), align them with a learned reference set by Sinkhorn's algorithm, and aggregate along the
transport plan. Verified from the paper (abstract and third-party summaries; its body and code were not reachable):
a non-negative transport plan, a kernel-based cost, OT to a learned reference, a cost linear in the number of tokens,
and an exponential distance penalty as the positional term. Everything else is reconstructed from OTKE (Mialon et
al., ICLR 2021, ``claying/OTK``), whose layer SeT's description matches, or is our choice; each point says which.

Evidence from the SeT quality ablation (benchmarks/set_quality.py; tables "SeT quality ablation" in
benchmarks/RESULTS.md, the 3-seed table of 2026-12-07 05:42 for this layer). Digit pairs (two digits far apart,
same/different class) is unlearned from scratch by every model tried (SeT, softmax, sepvit_lite; up to 5,000 steps),
so the ablation fine-tunes each row from a digits run of the same model: 400 digits steps, then 400 pair steps on a
64x64 canvas. There issue 15's layer (kernel sigma 2.0, learned positional scale with ``pos_sigma = 0.5``, rows
renormalised on the way back, direct output at ``p = n``) reaches 0.794 +- 0.057 val top-1 (3 seeds: 0.838, 0.814,
0.730; the ``eigh`` layer before it 0.784 +- 0.066) against 0.848 +- 0.017 for the same backbone with softmax
attention. No single change of it clears the seed noise (3 seeds each): kernel sigma 0.5 0.816 +- 0.029; the plan
applied twice 0.794, 10 Sinkhorn iterations 0.785, rows not renormalised 0.784, ``pos_sigma = 0.25`` 0.784, the
positional scale fixed 0.779, 5 iterations 0.756, 64 reference slots in stage 1 0.741, 64 anchors 0.532 (one seed).
The review's five changes together reach 0.829 +- 0.042 (0.860, 0.846, 0.781): above issue 15's layer on every seed,
by 2.2 to 5.1 points, 1.9 points below softmax, and 1.07-1.11x softmax's step time against 1.14-1.19x (interleaved
fwd+bwd, batch 64, 64x64). They are the defaults since (rows ``set_review``, ``set_issue15``); the combinations of
two to four of them were not measured, so which of them carry the gain is open. Issue 15's settings stay reachable
through the keywords. Every row's 400-step digits run reaches 98.3-100% val top-1. At 224x224 SeT's ``O(n p)`` wins
(setformer docstring and the "SeT vs softmax attention" rows of RESULTS.md).

- Per head: an input projection (one ``Linear(C, C)`` split into heads, like a query projection; optional), then the
  Nystrom map ``psi(x) = |x| kappa(Z x/|x|) kappa(Z Z^T)^(-1/2)`` with ``k`` learnable anchors ``Z`` renormalised
  to unit norm in every forward, ``kappa(t) = exp(alpha (t - 1))``, ``alpha = 1 / kernel_sigma**2`` (OTKE/CKN form).
  The whitening ``(kappa(Z Z^T) + ridge I)^(-1/2)`` is computed without a factorisation (no host sync on GPUs):
  coupled Newton-Schulz iterations in float32, a Lyapunov solve for the exact backward, cached once per optimizer
  step (:mod:`pretrain.models.set_whitening` says how, and how the iteration count was measured).
- ``kernel_sigma = 0.5`` (CKN's default; the digit-pairs table chose it with the other review settings over 2.0).
  ``psi(x)^T psi(y)`` approximates ``kappa(x, y) = |x| |y| exp(alpha (cos(x, y) - 1))`` only where the anchors cover
  the sphere: measured at init on 512 random inputs with ``k = d = 32`` (error relative to ``|x| |y|``), sigma 0.5
  gives ``psi(x)^T psi(x) = 0.02`` where the kernel is 1 and a max error of 0.99; sigma 1.0: 0.61 max, 0.050 rms;
  sigma 2.0: 0.15 max, 0.016 rms (``k = 64``: 0.064 max, 0.006 rms). So at init the narrow map is far from its
  kernel and the plan starts near the positional pooling below; the anchors and the reference are learned, and the
  trained layer does better than the wide-kernel one (tests/unit/test_set_attention.py measures both settings).
- Reference ``y``: ``p`` learnable slots per head, ``N(0, 1)`` at init, laid out on an ``a x b`` grid (``a = b =
  sqrt(p)`` when ``p`` is square, otherwise the most square factorisation), used by the positional term.
- Similarity ``S = psi(X) y^T`` (the kernel cost is ``-S``); log Gibbs kernel ``S / eps + lambda_h log W`` with
  ``log W_ij = -|pos_i - pos_j|_1 / pos_sigma``, token and reference positions being cell centres scaled to
  ``[0, 1]^2``. Our choice of form: an additive, linear-in-distance term of the cost keeps its meaning for
  similarities of either sign (OTKE's ``W * S`` flips for negative ``S``) and leaves the marginals exact (OTKE also
  multiplies the final plan by ``W``, which breaks them); the L1 distance makes ``W`` separable over rows/columns.
- Content/position balance: ``pos_sigma = 0.25`` with the positional term's scale fixed at 1 (the review's;
  ``learn_pos_scale`` makes it ``lambda_h = exp(pos_log_scale_h)``, learned per head, 1 at init). At init the
  spread of ``S / eps`` is 0.10-0.25 of the positional term's (std over token/slot pairs after removing row and
  column means, which the potentials absorb; setformer_lite at 64 and 224): the plan starts as a nearly fixed
  spatial pooling and the content term grows with training. Issue 15's setting (sigma 2.0, ``pos_sigma = 0.5``,
  learned scale) starts balanced (0.73-1.94) but trains to a lower accuracy on digit pairs (above).
- Entropic OT with uniform marginals (rows ``1/n``, columns ``1/p``), log-domain Sinkhorn (OTKE), ``L = 3``
  iterations of (row, column) updates, the column update last: column marginals are exact, row marginals converge
  (measured at init with the default kernel: within 2-13% of ``1/n`` after 3 iterations, 0.3% after 5, 1e-5 after
  10). The backward of the unrolled iterations is hand-written: it recomputes the ``n x p`` softmax factors from the
  saved log-kernel and the ``L`` pairs of potentials, so two ``n x p`` tensors per head are kept for backward
  instead of ``2 L + 1``.
- Output, transport there and back (our choice; linear in ``n``): ``A = p T^T psi(X)``, every slot an exact convex
  combination of tokens (columns are exact), then ``out = n T A`` (the review's), off by the plan's row error (within
  2.2% of ``1/n`` after 3 iterations at init with the default kernel). ``exact_rows`` renormalises the rows instead,
  ``out_i = sum_j T_ij A_j / sum_j T_ij``, so that every token is an exact convex combination of slots: one ``n x p``
  division, not measurable in the step time, and no better on digit pairs (0.784, row ``set_inexact_rows``). Heads
  merged, ``Linear(h k, C)``. Cost and memory are ``O(n p)`` per head: no ``n x n`` tensor.
- ``p = n`` with the slots on the token grid (a stage whose ``num_ref`` is clamped to its token count): the plan is
  applied a second time by default, the symmetric rank-``p`` mixing ``n p T T^T`` (the review's).
  ``direct_output`` outputs ``A`` itself instead, slot ``j`` read as token ``j`` (OTKE's output when the reference
  has the input's size; needs the positional term, which ties slot ``j`` to token ``j``): with ``p = n`` in stages
  2-4 at 64x64 the step takes 0.285 s against 0.321 s twice (rows ``set_p_n``, ``set_p_n_twice``), no better on
  digit pairs alone (0.794, row ``set_plan_twice`` against issue 15's layer).
- Positional term of the backbone: a LePE-style depthwise 3x3 conv on the values ``psi(X)`` (as CSWin does on V),
  added to the transported output before the head merge (our choice). The OT's positional log-weight is a
  non-persistent float32 buffer built once per token grid (kept float32 when the model is cast).

GPU path (``set_impl``): ``"triton"`` runs the kernel map, the log-kernel, the Sinkhorn iterations and the transport
there and back as one Triton kernel per direction (:mod:`pretrain.models.set_triton`), and the whitening as one
kernel per direction; ``"torch"`` is this file's reference path; ``"auto"`` (default) is triton on CUDA tensors when
triton imports, torch elsewhere. Both are registered as custom ops under ``torch.compile`` (no graph break). Counted
on CPU (``pretrain.kernel_count``; bf16, batch 2, one forward+backward; benchmarks/model_kernels.py and its tables in
benchmarks/RESULTS.md, "Kernels per training step"): one layer at n = 196, p = 49, 8 heads took 302 kernels and one
``eigh`` before; now 27 fused (4 Triton launches; 7 of the 27 are the loss's) and 354 on the torch path, whose
matmul-only whitening costs more kernels than ``eigh`` did; setformer_tiny 7,986 and 25 ``eigh`` before, now 1,128
fused, 9,286 torch; no factorisation or host read on either path (VERIFIED by the counter on CPU; GPU speed is not
measured yet: INFERRED from the launch counts only). The fused path is float32 inside, so in bf16 it is closer to the
float32 layer than the torch path (see :mod:`pretrain.models.set_triton`).
"""

from __future__ import annotations

import contextlib
import importlib.util
import logging
import math
from typing import Literal

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

from .set_whitening import whitening

__all__ = [
    "SET_IMPLS",
    "SetAttention",
    "SoftmaxAttention",
    "log_sinkhorn",
    "log_sinkhorn_unrolled",
    "positional_log_weight",
    "reference_grid_shape",
]

logger = logging.getLogger(__name__)

SET_IMPLS = ("auto", "torch", "triton")
_HAVE_TRITON = importlib.util.find_spec("triton") is not None  # imported only when the triton path runs


def _autocast_off(device: torch.device) -> contextlib.AbstractContextManager:
    """Leave autocast for a float32 region (a no-op where autocast is off or the device has none, e.g. meta)."""
    if device.type in ("cpu", "cuda", "xpu") and torch.is_autocast_enabled(device.type):
        return torch.autocast(device_type=device.type, enabled=False)
    return contextlib.nullcontext()


# ----------------------------------------------------------------------------------------------------------- Sinkhorn


def _log_marginals(log_kernel: torch.Tensor) -> tuple[float, float]:
    n, p = log_kernel.shape[-2:]
    return -math.log(n), -math.log(p)


def _logsumexp_(tmp: torch.Tensor, dim: int) -> torch.Tensor:
    """``logsumexp`` over ``dim`` that overwrites ``tmp`` (no full-size temporary)."""
    peak = tmp.amax(dim, keepdim=True)
    return tmp.sub_(peak).exp_().sum(dim).log_().add_(peak.squeeze(dim))


def _broadcast_sum_(out: torch.Tensor, log_kernel: torch.Tensor, f: torch.Tensor | None, g: torch.Tensor | None):
    """Write ``logK_ij + f_i + g_j`` into ``out`` (``f``/``g`` may be None) and return it."""
    if f is not None:
        torch.add(log_kernel, f.unsqueeze(-1), out=out)
        return out if g is None else out.add_(g.unsqueeze(-2))
    return torch.add(log_kernel, g.unsqueeze(-2), out=out)


class _LogSinkhorn(torch.autograd.Function):
    """Unrolled log-domain Sinkhorn with a recomputing backward (saves the log-kernel, the plan and the potentials).

    Autograd through the iterations would keep ``2 L + 1`` tensors of size ``n x p``; this keeps two and rebuilds the
    row and column softmax factors of every iteration from the potentials in the backward pass. All full-size
    temporaries live in one reused workspace (the forward's becomes the plan): fresh large buffers are costly on the
    CPU (page faults of new mappings), and peak memory stays at two ``n x p`` buffers beyond the inputs.
    """

    @staticmethod
    def forward(ctx, log_kernel: torch.Tensor, num_iters: int) -> torch.Tensor:
        log_a, log_b = _log_marginals(log_kernel)
        work = torch.empty_like(log_kernel)  # (..., n, p)
        g = log_kernel.new_zeros(log_kernel.shape[:-2] + log_kernel.shape[-1:])  # (..., p)
        fs, gs = [], []
        for _ in range(num_iters):
            f = log_a - _logsumexp_(_broadcast_sum_(work, log_kernel, None, g), dim=-1)  # (..., n) rows -> 1/n
            g = log_b - _logsumexp_(_broadcast_sum_(work, log_kernel, f, None), dim=-2)  # (..., p) columns -> 1/p
            fs.append(f)
            gs.append(g)
        plan = _broadcast_sum_(work, log_kernel, f, g).exp_()  # (..., n, p)
        ctx.save_for_backward(log_kernel, plan, torch.stack(fs), torch.stack(gs))
        return plan

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_plan: torch.Tensor) -> tuple[torch.Tensor, None]:
        log_kernel, plan, fs, gs = ctx.saved_tensors
        log_a, log_b = _log_marginals(log_kernel)
        grad_k = grad_plan * plan  # d plan_ij / d logK_ij = plan_ij
        f_bar_plan = grad_k.sum(-1)  # (..., n) gradient reaching f^L through the plan
        g_bar = grad_k.sum(-2)  # (..., p) gradient reaching g^L through the plan
        work = torch.empty_like(log_kernel)
        for step in reversed(range(fs.shape[0])):
            f, g = fs[step], gs[step]
            # column update g = log_b - lse_i(logK + f): its Jacobian is the column softmax exp(logK + f + g - log_b)
            col = _broadcast_sum_(work, log_kernel, f, g - log_b).exp_().mul_(g_bar.unsqueeze(-2))  # (..., n, p)
            grad_k.sub_(col)
            f_bar = -col.sum(-1)
            if step == fs.shape[0] - 1:
                f_bar.add_(f_bar_plan)
            # row update f = log_a - lse_j(logK + g_prev): Jacobian is the row softmax exp(logK + g_prev + f - log_a)
            g_prev = gs[step - 1] if step > 0 else None
            row = _broadcast_sum_(work, log_kernel, f - log_a, g_prev).exp_().mul_(f_bar.unsqueeze(-1))  # (..., n, p)
            grad_k.sub_(row)
            g_bar = -row.sum(-2)  # gradient reaching g^(step - 1)
        return grad_k, None


def log_sinkhorn(log_kernel: torch.Tensor, num_iters: int = 3) -> torch.Tensor:
    """Entropic OT plan with uniform marginals by ``num_iters`` log-domain Sinkhorn iterations.

    Solves ``max_T <T, log K> + H(T)`` s.t. ``T 1 = 1/n`` and ``T^T 1 = 1/p`` approximately: each iteration updates
    the row potentials, then the column potentials, so on return the column sums are ``1/p`` to float precision and
    the row sums approach ``1/n`` geometrically.

    Args:
        log_kernel: ``(..., n, p)`` log Gibbs kernel, e.g. ``S / eps + log W``; computed on in its own dtype.
        num_iters: Sinkhorn iterations ``L >= 1``.

    Returns:
        The plan ``T``, ``(..., n, p)``, non-negative, total mass 1 per leading index.
    """
    if num_iters < 1:
        raise ValueError(f"num_iters={num_iters} must be >= 1")
    return _LogSinkhorn.apply(log_kernel, num_iters)


def log_sinkhorn_unrolled(log_kernel: torch.Tensor, num_iters: int = 3) -> torch.Tensor:
    """Same plan as :func:`log_sinkhorn` with plain autograd through the iterations (reference for tests)."""
    log_a, log_b = _log_marginals(log_kernel)
    g = log_kernel.new_zeros(log_kernel.shape[:-2] + log_kernel.shape[-1:])
    for _ in range(num_iters):
        f = log_a - torch.logsumexp(log_kernel + g.unsqueeze(-2), dim=-1)
        g = log_b - torch.logsumexp(log_kernel + f.unsqueeze(-1), dim=-2)
    return torch.exp(log_kernel + f.unsqueeze(-1) + g.unsqueeze(-2))


# ------------------------------------------------------------------------------------------------ positional penalty


def reference_grid_shape(num_ref: int) -> tuple[int, int]:
    """Grid ``(a, b)`` with ``a * b = num_ref`` for the reference slots: ``sqrt`` when square, else most square."""
    a = math.isqrt(num_ref)
    while num_ref % a:
        a -= 1
    return a, num_ref // a


def _cell_centres(size: int, device: torch.device) -> torch.Tensor:
    return (torch.arange(size, device=device, dtype=torch.float32) + 0.5) / size  # (size,) in (0, 1)


def positional_log_weight(
    grid_size: tuple[int, int], ref_grid: tuple[int, int], sigma: float, device: torch.device | None = None
) -> torch.Tensor:
    """``log W = -|pos_token - pos_ref|_1 / sigma`` between a token grid and a reference grid, both in ``[0, 1]^2``.

    Args:
        grid_size: token grid ``(H, W)``; tokens are flattened row-major.
        ref_grid: reference grid ``(a, b)``; slots are flattened row-major.
        sigma: length scale of the exponential penalty (in units of the image side).
        device: where to build it.

    Returns:
        ``(H * W, a * b)`` float32.
    """
    (h, w), (a, b) = grid_size, ref_grid
    dy = (_cell_centres(h, device).unsqueeze(1) - _cell_centres(a, device).unsqueeze(0)).abs()  # (H, a)
    dx = (_cell_centres(w, device).unsqueeze(1) - _cell_centres(b, device).unsqueeze(0)).abs()  # (W, b)
    dist = dy.view(h, 1, a, 1) + dx.view(1, w, 1, b)  # (H, W, a, b)
    return dist.reshape(h * w, a * b).div_(-sigma)


# ------------------------------------------------------------------------------------------------------------ layers


def _grid_or_infer(grid_size: tuple[int, int] | None, n: int, needed: bool) -> tuple[int, int] | None:
    if grid_size is not None:
        if grid_size[0] * grid_size[1] != n:
            raise ValueError(f"grid_size={tuple(grid_size)} does not match {n} tokens")
        return tuple(grid_size)
    if not needed:
        return None
    side = math.isqrt(n)
    if side * side != n:
        raise ValueError(f"{n} tokens are not a square grid; pass grid_size=(H, W)")
    return side, side


def _lepe(conv: nn.Conv2d, values: torch.Tensor, grid_size: tuple[int, int]) -> torch.Tensor:
    """Depthwise conv of ``values`` (B, n, C) laid out on the token grid; returns (B, n, C)."""
    b, n, c = values.shape
    img = values.transpose(1, 2).reshape(b, c, *grid_size)  # (B, C, H, W)
    return conv(img).flatten(2).transpose(1, 2)  # (B, n, C)


class SetAttention(nn.Module):
    """SeT token mixer: Nystrom kernel features, Sinkhorn transport to ``p`` reference slots and back.

    Args:
        dim: token width ``C``.
        num_heads: heads ``h``; ``C`` must be divisible by ``h``.
        num_ref: reference slots ``p`` per head. With ``p = 1`` the plan is uniform whatever the input: no reference
            parameter is created and Sinkhorn is skipped.
        num_anchors: Nystrom width ``k`` per head (default: the head width ``C / h``).
        input_proj: apply ``Linear(C, C)`` before splitting into heads (the optional ``d -> k`` projection).
        kernel_sigma: ``sigma`` of ``kappa(t) = exp((t - 1) / sigma^2)`` (0.5, CKN's default).
        sinkhorn_eps: entropic regularisation ``eps``.
        sinkhorn_iters: Sinkhorn iterations ``L``.
        pos_sigma: length scale of the positional penalty; ``None`` or 0 turns it off.
        lepe: add a depthwise 3x3 conv of the values (LePE) to the output.
        whiten_ridge: ridge added to ``kappa(Z Z^T)`` before the inverse square root.
        proj_drop: dropout after the output projection.
        learn_pos_scale: a learnable per-head scale (1 at init) of the positional term.
        exact_rows: renormalise the plan's rows on the way back (default: ``n T A``).
        direct_output: at ``p = n`` on the token grid, output the slots' aggregate directly (default: the plan
            applied twice).
        set_impl: ``"auto"`` (triton on CUDA when it imports, else torch), ``"torch"`` or ``"triton"``.
        grid_size: the token grid the layer will mostly see; its positional log-weight is built now (any other grid
            is built on first use).
    """

    def __init__(
        self,
        dim: int,
        num_heads: int = 8,
        num_ref: int = 64,
        num_anchors: int | None = None,
        input_proj: bool = True,
        kernel_sigma: float = 0.5,
        sinkhorn_eps: float = 0.5,
        sinkhorn_iters: int = 3,
        pos_sigma: float | None = 0.25,
        lepe: bool = True,
        whiten_ridge: float = 1e-3,
        proj_drop: float = 0.0,
        learn_pos_scale: bool = False,
        exact_rows: bool = False,
        direct_output: bool = False,
        set_impl: Literal["auto", "torch", "triton"] = "auto",
        grid_size: tuple[int, int] | None = None,
    ):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"dim={dim} is not divisible by num_heads={num_heads}")
        if num_ref < 1 or sinkhorn_iters < 1 or sinkhorn_eps <= 0 or kernel_sigma <= 0 or whiten_ridge <= 0:
            raise ValueError(
                f"need num_ref >= 1, sinkhorn_iters >= 1, sinkhorn_eps > 0, kernel_sigma > 0 and whiten_ridge > 0; "
                f"got {num_ref}, {sinkhorn_iters}, {sinkhorn_eps}, {kernel_sigma}, {whiten_ridge}"
            )
        if set_impl not in SET_IMPLS:
            raise ValueError(f"set_impl={set_impl!r} must be one of {', '.join(SET_IMPLS)}")
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.num_anchors = num_anchors or self.head_dim
        self.num_ref = num_ref
        self.ref_grid = reference_grid_shape(num_ref)
        self.alpha = 1.0 / kernel_sigma**2
        self.sinkhorn_eps = float(sinkhorn_eps)
        self.sinkhorn_iters = int(sinkhorn_iters)
        self.pos_sigma = float(pos_sigma) if pos_sigma else None
        self.whiten_ridge = float(whiten_ridge)
        self.exact_rows = bool(exact_rows)
        self.direct_output = bool(direct_output)
        self.set_impl = set_impl
        inner = num_heads * self.num_anchors

        self.in_proj = nn.Linear(dim, dim) if input_proj else nn.Identity()
        self.anchors = nn.Parameter(torch.empty(num_heads, self.num_anchors, self.head_dim))  # Z, unit rows
        # y. With one slot the plan is fixed by its marginals (T = 1/n), so there is nothing to learn.
        self.reference = nn.Parameter(torch.empty(num_heads, num_ref, self.num_anchors)) if num_ref > 1 else None
        # log of a per-head scale of the positional term (learnable: each head sets its own content/position balance)
        with_pos = self.pos_sigma is not None and self.reference is not None
        self.pos_log_scale = nn.Parameter(torch.zeros(num_heads)) if with_pos and learn_pos_scale else None
        self.lepe = nn.Conv2d(inner, inner, 3, padding=1, groups=inner) if lepe else None
        self.proj = nn.Linear(inner, dim)
        self.proj_drop = nn.Dropout(proj_drop)
        self._log_w_grid = tuple(grid_size) if grid_size is not None and with_pos else None
        log_w = None
        if self._log_w_grid is not None:
            log_w = positional_log_weight(self._log_w_grid, self.ref_grid, self.pos_sigma)
        self.register_buffer("log_w", log_w, persistent=False)  # (n, p) float32 of the grid _log_w_grid
        self.record_plan = False  # debug: keep the last plan (detached) in `last_plan`
        self.last_plan: torch.Tensor | None = None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Anchors: random unit directions. Reference: N(0, 1), so that ``S / eps`` spreads over a few units at init."""
        nn.init.normal_(self.anchors)
        with torch.no_grad():
            self.anchors.div_(self.anchors.norm(dim=-1, keepdim=True))
        if self.reference is not None:
            nn.init.normal_(self.reference)
        if self.pos_log_scale is not None:
            nn.init.zeros_(self.pos_log_scale)

    def extra_repr(self) -> str:
        return (
            f"heads={self.num_heads}, head_dim={self.head_dim}, anchors={self.num_anchors}, num_ref={self.num_ref}, "
            f"eps={self.sinkhorn_eps}, iters={self.sinkhorn_iters}, pos_sigma={self.pos_sigma}, impl={self.set_impl}"
        )

    def _apply(self, fn, recurse=True):
        """After a move or cast (``.to(bfloat16)``, ``.half()``, ``to_empty``) the positional log-weight is rebuilt in
        float32 on the new device: a cast would round it, ``to_empty`` would leave it uninitialised."""
        super()._apply(fn, recurse)
        if self.log_w is not None:
            self.log_w = positional_log_weight(self._log_w_grid, self.ref_grid, self.pos_sigma, self.log_w.device)
        return self

    def _log_weight(self, grid: tuple[int, int], device: torch.device) -> torch.Tensor:
        """The ``(n, p)`` float32 positional log-weight of ``grid``, built once per grid and device."""
        if self.log_w is None or self._log_w_grid != tuple(grid) or self.log_w.device != device:
            self._log_w_grid = tuple(grid)
            self.log_w = positional_log_weight(self._log_w_grid, self.ref_grid, self.pos_sigma, device)
        return self.log_w

    def _use_triton(self, x: torch.Tensor) -> bool:
        return self.set_impl == "triton" or (self.set_impl == "auto" and x.is_cuda and _HAVE_TRITON)

    def whitening(self, use_triton: bool = False) -> torch.Tensor:
        """Packed ``[Z_hat | W | R]`` per head, float32 ``(h, k, d + 2 k)``: unit anchors, ``(kappa(Z Z^T) + ridge
        I)^(-1/2)`` and its inverse (:func:`pretrain.models.set_whitening.whitening`; cached per optimizer step)."""
        return whitening(self.anchors, self.alpha, self.whiten_ridge, use_triton)

    def kernel_map(self, x: torch.Tensor, packed: torch.Tensor | None = None) -> torch.Tensor:
        """Nystrom features ``psi(x) = |x| kappa(Z x / |x|) kappa(Z Z^T)^(-1/2)`` of per-head inputs (torch path).

        Args:
            x: ``(B, h, n, d)``.
            packed: the whitening (:meth:`whitening`); computed when omitted.

        Returns:
            ``(B, h, n, k)``.
        """
        packed = (self.whitening() if packed is None else packed).to(x.dtype)  # (h, k, d + 2 k)
        z, w = packed[..., : self.head_dim], packed[..., self.head_dim : self.head_dim + self.num_anchors]
        sq_norm = x.square().sum(-1, keepdim=True).add(1e-12)  # (B, h, n, 1); the 1e-12 keeps gradients finite at 0
        cos = (x * sq_norm.rsqrt()) @ z.mT  # (B, h, n, k)
        # |x| exp(alpha (cos - 1)) as one exp (autograd keeps only its output, which the next matmul keeps anyway)
        phi = torch.exp(torch.add(0.5 * sq_norm.log() - self.alpha, cos, alpha=self.alpha))  # (B, h, n, k)
        return phi @ w  # (B, h, n, k)

    def log_kernel_terms(
        self, x: torch.Tensor, grid_size: tuple[int, int] | None = None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The two terms of the log Gibbs kernel for inputs ``x`` (B, n, C), for diagnostics (no grad kept).

        Returns:
            Content ``S / eps`` ``(B, h, n, p)`` and the scaled positional term ``scale * log W`` ``(h, n, p)`` (None
            when off); the plan is Sinkhorn of their sum.
        """
        if self.reference is None:
            raise ValueError("num_ref=1: the plan does not depend on a kernel")
        b, n, _ = x.shape
        with torch.no_grad():
            xh = self.in_proj(x).view(b, n, self.num_heads, self.head_dim).transpose(1, 2)  # (B, h, n, d)
            content = (self.kernel_map(xh) @ self.reference.mT).float() / self.sinkhorn_eps  # (B, h, n, p)
            if self.pos_sigma is None:
                return content, None
            log_w = positional_log_weight(_grid_or_infer(grid_size, n, True), self.ref_grid, self.pos_sigma, x.device)
            scale = self.pos_log_scale.float().exp() if self.pos_log_scale is not None else x.new_ones(self.num_heads)
            return content, scale.view(-1, 1, 1) * log_w  # (h, n, p)

    def transport_plan(self, psi: torch.Tensor, grid_size: tuple[int, int] | None = None) -> torch.Tensor:
        """Plan ``T`` between tokens (rows, mass ``1/n`` each) and reference slots (columns, mass ``1/p`` each).

        Args:
            psi: kernel features ``(B, h, n, k)``.
            grid_size: token grid ``(H, W)``; needed when the positional penalty is on.

        Returns:
            ``(B, h, n, p)`` float32.
        """
        if self.reference is None:  # p = 1: the marginals alone fix the plan
            return psi.new_full((*psi.shape[:-1], 1), 1.0 / psi.shape[-2], dtype=torch.float32)
        sim = psi @ self.reference.to(psi.dtype).mT  # S = <psi(x_i), y_j>, (B, h, n, p)
        with _autocast_off(psi.device):  # the OT runs in float32 even under autocast
            log_kernel = sim.float().div_(self.sinkhorn_eps)  # -C / eps, (B, h, n, p); in place, nothing saved
            del sim
            if self.pos_sigma is not None:
                log_w = self._log_weight(_grid_or_infer(grid_size, psi.shape[-2], needed=True), psi.device)  # (n, p)
                if self.pos_log_scale is None:
                    log_kernel.add_(log_w)  # in place: the division keeps nothing for backward
                else:  # a bf16 scale times the float32 weight promotes to float32 without a copy
                    log_kernel = log_kernel + self.pos_log_scale.exp().view(-1, 1, 1) * log_w  # (B, h, n, p)
            return log_sinkhorn(log_kernel, self.sinkhorn_iters)

    def _slots_are_tokens(self, grid: tuple[int, int] | None, n: int) -> bool:
        """Whether slot ``j`` sits on token ``j``: ``p = n``, the positional term on and the same grid shape."""
        return self.pos_sigma is not None and self.num_ref == n and grid is not None and tuple(grid) == self.ref_grid

    def _fused(self, xh: torch.Tensor, grid: tuple[int, int] | None) -> tuple[torch.Tensor, torch.Tensor]:
        """Triton path: ``(out, psi)``, each ``(B, n, h k)``, from per-head inputs ``xh`` (B, n, h, d)."""
        from .set_fused import fused_core
        from .set_triton import MODE_DIRECT, MODE_EXACT_ROWS, MODE_N_T_A

        n = xh.shape[1]
        reference = self.reference
        if reference is None:  # one slot: any reference gives the uniform plan; its gradient is dropped
            reference = xh.new_zeros(self.num_heads, 1, self.num_anchors)
        with_pos = self.pos_sigma is not None and self.reference is not None
        log_w = self._log_weight(grid, xh.device) if with_pos else None
        if self.direct_output and self._slots_are_tokens(grid, n):
            mode = MODE_DIRECT
        else:
            mode = MODE_EXACT_ROWS if self.exact_rows else MODE_N_T_A
        packed = self.whitening(use_triton=True)
        return fused_core(
            xh, packed, reference, self.pos_log_scale, log_w, self.alpha, self.sinkhorn_eps, self.sinkhorn_iters, mode
        )

    def forward(
        self, x: torch.Tensor, grid_size: tuple[int, int] | None = None, return_plan: bool = False
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """Mix tokens through the reference set.

        Args:
            x: ``(B, n, C)`` tokens (after the block's LayerNorm).
            grid_size: token grid ``(H, W)`` with ``H * W = n``; inferred for square ``n`` when omitted.
            return_plan: also return the plan ``T``, ``(B, h, n, p)`` float32 (torch path: the fused path never
                forms it, so this and ``record_plan`` run the torch path).

        Returns:
            ``(B, n, C)``, or ``(out, plan)`` with ``return_plan``.
        """
        b, n, c = x.shape
        grid = _grid_or_infer(grid_size, n, needed=self.pos_sigma is not None or self.lepe is not None)
        xh = self.in_proj(x).view(b, n, self.num_heads, self.head_dim)  # (B, n, h, d)
        plan = None
        if self._use_triton(x) and not (return_plan or self.record_plan):
            out, psi = self._fused(xh, grid)  # (B, n, h k) each
        else:
            psi = self.kernel_map(xh.transpose(1, 2))  # (B, h, n, k)
            plan = self.transport_plan(psi, grid)  # (B, h, n, p)
            t = plan.to(psi.dtype)
            slots = (t.mT @ psi) * self.num_ref  # A = p T^T psi: every slot a convex combination of tokens
            if self.direct_output and self._slots_are_tokens(grid, n):
                out = slots  # p = n on the token grid: slot j is token j's output (OTKE reads it off the grid)
            elif self.exact_rows:
                back = t / t.sum(-1, keepdim=True).clamp_min(1e-30)  # rows of n T, renormalised to sum to 1 exactly
                out = back @ slots  # every token an exact convex combination of slots, (B, h, n, k)
            else:
                out = (t @ slots) * n  # n T A, (B, h, n, k)
            out = out.transpose(1, 2).reshape(b, n, -1)  # (B, n, h k)
            psi = psi.transpose(1, 2).reshape(b, n, -1)  # (B, n, h k)
        if self.lepe is not None:
            out = out + _lepe(self.lepe, psi, grid)
        out = self.proj_drop(self.proj(out))  # (B, n, C)
        if self.record_plan:
            self.last_plan = plan.detach()
        return (out, plan) if return_plan else out


class SoftmaxAttention(nn.Module):
    """Global multi-head softmax attention (``F.scaled_dot_product_attention``) with LePE on V: the ablation of SeT.

    Args:
        dim: token width ``C``.
        num_heads: heads; ``C`` must be divisible by it.
        qkv_bias: bias of the qkv projection.
        lepe: add a depthwise 3x3 conv of V to the output.
        proj_drop: dropout after the output projection.
    """

    def __init__(self, dim: int, num_heads: int = 8, qkv_bias: bool = True, lepe: bool = True, proj_drop: float = 0.0):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"dim={dim} is not divisible by num_heads={num_heads}")
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.lepe = nn.Conv2d(dim, dim, 3, padding=1, groups=dim) if lepe else None
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)

    def forward(self, x: torch.Tensor, grid_size: tuple[int, int] | None = None) -> torch.Tensor:
        """Args: ``x`` (B, n, C); ``grid_size`` (H, W), needed for LePE unless ``n`` is square. Returns (B, n, C)."""
        b, n, c = x.shape
        grid = _grid_or_infer(grid_size, n, needed=self.lepe is not None)
        q, k, v = self.qkv(x).view(b, n, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)  # (B, h, n, d)
        out = F.scaled_dot_product_attention(q, k, v)  # (B, h, n, d)
        out = out.transpose(1, 2).reshape(b, n, c)  # (B, n, C)
        if self.lepe is not None:
            out = out + _lepe(self.lepe, v.transpose(1, 2).reshape(b, n, c), grid)
        return self.proj_drop(self.proj(out))
