"""Blocks used by both model families (SepViT and SeTformer)."""

from .common import DropPath, Mlp, init_weights_trunc_normal, trunc_normal_

__all__ = ["DropPath", "Mlp", "init_weights_trunc_normal", "trunc_normal_"]
