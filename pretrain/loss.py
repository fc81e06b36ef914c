"""The training loss: cross-entropy against soft targets (label smoothing, mixup and cutmix make them), over the
valid rows of a batch (a corrupt sample's row counts nothing)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["soft_target_cross_entropy"]


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
