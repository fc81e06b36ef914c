"""The SeT whitening as it was before issue 21 (``eigh`` with a Daleckii-Krein backward), kept as a test reference.

The layer now whitens by Newton-Schulz iterations (``pretrain.models.set_whitening``); tests compare it, and the
whole layer, against this eigendecomposition.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

from pretrain.models.set_attention import SetAttention

__all__ = ["EighSetAttention", "inverse_sqrt_eigh"]


class _InverseSqrtEigh(torch.autograd.Function):
    """``M^(-1/2)`` of symmetric positive-definite ``M`` by ``eigh``; backward ``V (D o (V^T G_sym V)) V^T`` with the
    divided differences ``D_ij = -1 / (r_i r_j (r_i + r_j))`` of ``s^(-1/2)`` (``r = sqrt(s)``)."""

    @staticmethod
    def forward(ctx, matrix: torch.Tensor) -> torch.Tensor:
        eigvals, eigvecs = torch.linalg.eigh(matrix)  # (..., k), (..., k, k)
        root = eigvals.sqrt()
        ctx.save_for_backward(eigvecs, root)
        return (eigvecs / root.unsqueeze(-2)) @ eigvecs.mT

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out: torch.Tensor) -> torch.Tensor:
        eigvecs, root = ctx.saved_tensors
        inner = eigvecs.mT @ (0.5 * (grad_out + grad_out.mT)) @ eigvecs
        ri, rj = root.unsqueeze(-1), root.unsqueeze(-2)
        return eigvecs @ (-1.0 / (ri * rj * (ri + rj)) * inner) @ eigvecs.mT


def inverse_sqrt_eigh(matrix: torch.Tensor, ridge: float) -> torch.Tensor:
    """``(M + ridge I)^(-1/2)`` by ``eigh`` in the dtype of ``matrix``."""
    eye = torch.eye(matrix.shape[-1], dtype=matrix.dtype, device=matrix.device)
    return _InverseSqrtEigh.apply(0.5 * (matrix + matrix.mT) + ridge * eye)


class EighSetAttention(SetAttention):
    """The layer with the pre-issue-21 whitening (``eigh`` in float32, or float64 for float64 anchors)."""

    def whitening(self, use_triton: bool = False) -> torch.Tensor:
        dtype = torch.float64 if self.anchors.dtype == torch.float64 else torch.float32
        z = F.normalize(self.anchors.to(dtype), dim=-1)  # (h, k, d)
        w = inverse_sqrt_eigh(torch.exp(self.alpha * (z @ z.mT - 1.0)), self.whiten_ridge)  # (h, k, k)
        return torch.cat([z, w, torch.zeros_like(w)], dim=-1)  # R is not used by the torch path's forward
