"""Parameter and MAC counts of a model, for ``pretrain models``, benchmarks and docstrings.

MACs are counted like fvcore (one per multiply-add of matmuls, linears, convolutions and attention; norms,
activations and softmax are free), using ``torch.utils.flop_counter.FlopCounterMode`` (which counts 2 FLOPs per
multiply-add) and halving its total.
"""

from __future__ import annotations

import logging

import torch
import torch.nn as nn
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

__all__ = ["count_macs", "count_params"]

logger = logging.getLogger(__name__)


def count_params(model: nn.Module) -> int:
    """Number of parameter elements (shared parameters counted once)."""
    return sum(p.numel() for p in model.parameters())


def count_macs(model: nn.Module, img_size: int, batch: int = 1, in_chans: int = 3) -> float:
    """Forward multiply-adds, in GMACs, of one ``(batch, in_chans, img_size, img_size)`` input.

    Works on any device, including ``meta`` (shapes only, nothing is computed), so large variants are cheap to
    count. The model runs in eval mode under ``no_grad`` and its previous mode is restored.

    Args:
        model: an image classifier taking ``(B, C, H, W)``.
        img_size: input side length.
        batch: batch size of the counted forward pass.
        in_chans: input channels.

    Returns:
        GMACs (1e9 multiply-adds) of the whole batch.
    """
    param = next(model.parameters(), None)
    device = param.device if param is not None else torch.device("cpu")
    dtype = param.dtype if param is not None and param.is_floating_point() else torch.float32
    x = torch.zeros(batch, in_chans, img_size, img_size, device=device, dtype=dtype)
    was_training = model.training
    model.eval()
    counter = FlopCounterMode(display=False)
    try:
        # The math SDPA backend decomposes attention into matmuls that FlopCounterMode counts; the fused CPU
        # kernel (_scaled_dot_product_flash_attention_for_cpu) has no flop formula and would count as zero.
        with torch.no_grad(), sdpa_kernel(SDPBackend.MATH), counter:
            model(x)
    finally:
        model.train(was_training)
    return counter.get_total_flops() / 2 / 1e9
