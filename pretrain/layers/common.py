"""Stochastic depth, the transformer MLP and the ViT weight initialisation shared by both families."""

from __future__ import annotations

import math

import torch
import torch.nn as nn

__all__ = ["DropPath", "Mlp", "init_weights_trunc_normal", "trunc_normal_"]


def trunc_normal_(tensor: torch.Tensor, std: float = 0.02) -> torch.Tensor:
    """Truncated normal at +-2 std (the ViT/SepViT init)."""
    return nn.init.trunc_normal_(tensor, mean=0.0, std=std, a=-2 * std, b=2 * std)


class DropPath(nn.Module):
    """Stochastic depth per sample: zero the residual branch with probability ``p`` and rescale the rest.

    ``residual(x, y)`` is ``x + self(y)`` in one pass over memory (``addcmul`` with the per-sample scale), and ``y``
    may be any view of the shape of ``x`` (e.g. windows not yet reversed): the sum is written in the layout of ``x``.
    """

    def __init__(self, p: float = 0.0):
        super().__init__()
        self.p = float(p)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.p == 0.0 or not self.training:
            return x
        return x * self._scale(x)

    def _scale(self, x: torch.Tensor) -> torch.Tensor:
        keep = 1.0 - self.p
        shape = (x.shape[0],) + (1,) * (x.ndim - 1)  # one draw per sample
        if torch.compiler.is_compiling():
            # bernoulli_(float) would make the rate a constant of the graph, one graph per drop-path rate: compared
            # with a tensor, blocks that differ only in their rate share one compiled graph
            return (torch.rand(shape, device=x.device) < keep).to(x.dtype).div_(keep)
        return x.new_empty(shape).bernoulli_(keep).div_(keep)  # (B, 1, ..., 1): 0 or 1 / keep

    def residual(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """``x + DropPath(y)``: one elementwise pass whose output has the memory layout of ``x``."""
        if self.p == 0.0 or not self.training:
            return torch.add(x, y)
        return torch.addcmul(x, y, self._scale(y))

    def extra_repr(self) -> str:
        return f"p={self.p}"


class Mlp(nn.Module):
    """Linear(C, rC) -> GELU -> Linear(rC, C), with optional dropout."""

    def __init__(self, dim: int, hidden_dim: int, drop: float = 0.0):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden_dim)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden_dim, dim)
        self.drop = nn.Dropout(drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop(self.fc2(self.drop(self.act(self.fc1(x)))))


def init_weights_trunc_normal(module: nn.Module) -> None:
    """Linear: trunc-normal(0.02), zero bias. LayerNorm: ones/zeros. Conv: normal(sqrt(2 / fan_out))."""
    if isinstance(module, nn.Linear):
        trunc_normal_(module.weight, std=0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.LayerNorm):
        if module.weight is not None:
            nn.init.ones_(module.weight)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.Conv2d):
        fan_out = module.kernel_size[0] * module.kernel_size[1] * module.out_channels // module.groups
        nn.init.normal_(module.weight, 0.0, math.sqrt(2.0 / fan_out))
        if module.bias is not None:
            nn.init.zeros_(module.bias)
