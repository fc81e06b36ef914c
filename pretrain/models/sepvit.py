"""SepViT: Separable Vision Transformer (Wei Li et al., arXiv 2203.15380; official code ``liwei109/SepViT``).

Depthwise separable self-attention (DSSA): inside each window, multi-head softmax attention over the window's
pixels plus one learnable *window token* (depthwise self-attention, DWA); then, across windows, an attention
between the window tokens whose values are the DWA outputs of whole windows (pointwise self-attention, PWA).
Grouped self-attention (GSA) is the official code's 7/14 window-size alternation inside a stage. The macro design
is hierarchical: overlapping conv embeddings (7x7/4, then 3x3/2), pre-norm blocks, one PEG per stage after the
first block, final LayerNorm, mean pooling and a linear head. Inside DSSA, DWA adds its (normed) input back to the
attention output (inner shortcut); PWA's queries and keys come from GELU(LN(window tokens)), its values are the DWA
outputs of whole windows (no value projection) and its output is added to them (second shortcut); a single-window
block (global attention) has no token and no PWA.

Layout, for speed (the math is the official one; ``tests/unit/test_model_reference.py`` holds it): the token map
stays (B, H, W, C) in memory between blocks (the convs run channels-last), norm1 runs on it before the window
partition, which is one copy into the attention input with the tokens in front; q/k/v are strided views of the qkv
output, and the window reverse, the residual and drop-path are one ``addcmul`` pass.

What differs from the official classification code:
    * The window count is computed from ``img_size`` instead of being hard-wired for 224x224, so any input size
      works whose stage resolutions are divisible by the window sizes. Windows larger than a stage's resolution
      are clamped to it (the official stage-4 behaviour), ``window_sizes`` overrides the per-block sizes, and
      ``fit_window_sizes`` adapts a window plan to a resolution (e.g. 32x32 CPU demos). Window tokens are sized
      for the ``img_size`` the model was built with: a forward pass at another size raises ``ValueError``.
    * Pretrained weights at another input size (``create_model(FILE, img_size=...)``, ``model.init_from``;
      :func:`adapt_pretrained`): the window sizes stay those of the checkpoint's config unless given, so the number
      of windows of a block changes with the resolution, and its window tokens (one per window, a learned embedding
      of the window's place in the grid) are resampled as a grid, bicubic, like the position embeddings of a ViT.
      Nothing else depends on the size (DWA, PWA and the PEG are size-free). A block whose kind would change, one
      window (global attention, no PWA weights) against several (PWA weights and tokens), is refused: it would drop
      trained weights or add untrained ones. The error names the block and a ``window_sizes`` that keeps every
      block's window count where one exists.
    * ``drop_rate`` is the dropout before the classifier (the project's ``ModelConfig`` meaning); the official
      ``drop_rate`` (after each embedding, in the MLP and after the attention projection) is ``proj_drop_rate``.
    * Attention uses ``F.scaled_dot_product_attention``; an explicit-softmax path (same outputs) runs while
      attention maps are being kept (``set_keep_attn``) for inspection.
    * LayerNorm eps as in the official code: 1e-6 in the blocks and the final norm; 1e-5 (PyTorch default) in
      the patch embeddings and the window-token norm of PWA.

Measured here at 224x224 with 1000 classes (MACs counted one per multiply-add, like fvcore; ``pretrain models``):

    ============  =======  ======  ======================
    variant       params   GMACs   reported (params/FLOPs)
    ============  =======  ======  ======================
    sepvit_lite    3.66M    0.57   not retrieved
    sepvit_tiny   31.18M    4.52   31.2M / 4.5G
    sepvit_small  46.57M    7.46   46.6M / 7.5G
    sepvit_base   82.38M   13.05   82.3M / 13.1G
    ============  =======  ======  ======================
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from pretrain.layers.common import DropPath, Mlp, init_weights_trunc_normal

from .registry import ModelFamily
from .sepvit_windows import check_window_sizes, keep_counts_plan, stage_resolutions

__all__ = [
    "SepViT",
    "SepViTBlock",
    "SepViTStage",
    "SeparableAttention",
    "adapt_pretrained",
    "resample_window_tokens",
    "sepvit_lite",
    "sepvit_tiny",
    "sepvit_small",
    "sepvit_base",
]

logger = logging.getLogger(__name__)

_BLOCK_LN_EPS = 1e-6  # official: norm_layer=partial(nn.LayerNorm, eps=1e-6) for block and final norms


class OverlapPatchEmbed(nn.Module):
    """Overlapping conv embedding (kernel k, stride s, padding k // 2) then LayerNorm; it is also the merge layer."""

    def __init__(self, in_chans: int, dim: int, kernel_size: int, stride: int):
        super().__init__()
        self.proj = nn.Conv2d(in_chans, dim, kernel_size, stride, padding=kernel_size // 2)
        self.norm = nn.LayerNorm(dim)  # official PatchEmbed keeps the PyTorch default eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # channels-last conv (the later stages get a channels-last view of the previous map anyway): the output is
        # then (B, H, W, C) in memory and the norm reads it in place instead of copying a permuted view
        x = self.proj(x.contiguous(memory_format=torch.channels_last))  # (B, C, H, W), channels-last in memory
        return self.norm(x.permute(0, 2, 3, 1))  # (B, H, W, C)


class PosConv(nn.Module):
    """PEG (CPVT): depthwise 3x3 conv with bias, added to its input."""

    def __init__(self, dim: int):
        super().__init__()
        self.proj = nn.Conv2d(dim, dim, 3, 1, 1, groups=dim, bias=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.permute(0, 3, 1, 2)  # (B, C, H, W), channels-last in memory
        return (self.proj(x) + x).permute(0, 2, 3, 1)  # (B, H, W, C)


class SeparableAttention(nn.Module):
    """DSSA on windows: DWA inside each window (token included), then PWA across windows, then a projection.

    With one window (``use_pwa=False``) there is no token and no PWA: global multi-head attention with the inner
    shortcut. Set ``keep_attn`` to run the explicit-softmax path and keep the maps in ``last_dwa_attn``
    (B, N_w, heads, L, L) and ``last_pwa_attn`` (B, heads, N_w, N_w); otherwise SDPA is used.
    """

    def __init__(self, dim: int, num_heads: int, use_pwa: bool, proj_drop: float = 0.0):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"dim {dim} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.scale = self.head_dim**-0.5
        self.use_pwa = use_pwa
        self.qkv = nn.Linear(dim, dim * 3, bias=True)
        if use_pwa:
            self.win_tokens_norm = nn.LayerNorm(dim)  # official: PyTorch default eps
            self.win_tokens_act = nn.GELU()
            self.pwa_qk = nn.Linear(dim, dim * 2, bias=True)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)
        self.keep_attn = False
        self.last_dwa_attn: torch.Tensor | None = None
        self.last_pwa_attn: torch.Tensor | None = None

    def _attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        if not self.keep_attn:
            return F.scaled_dot_product_attention(q, k, v), None
        attn = ((q * self.scale) @ k.transpose(-2, -1)).softmax(dim=-1)
        return attn @ v, attn.detach()

    def _window_attend(self, qw: torch.Tensor, kw: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """PWA: softmax over windows (N_w x N_w per head, small) applied to whole windows by one batched matmul.

        SDPA would do the same math, but its kernels are tuned for head widths near 64, not ``w*w*d`` (1,568 at
        w = 7): the explicit product is a plain GEMM.
        """
        attn = ((qw * self.scale) @ kw.transpose(-2, -1)).softmax(dim=-1)  # (B, h, Nw, Nw)
        if self.keep_attn:
            self.last_pwa_attn = attn.detach()
        return attn @ v  # (B, h, Nw, P*d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """DWA, the inner shortcut, PWA (several windows) and the output projection.

        Args:
            x: normed windows (B, N_w, L, C), L = w*w, plus a leading window token when ``use_pwa``.

        Returns:
            Window features (B, N_w, w*w, C), the window tokens dropped.
        """
        B, Nw, L, C = x.shape
        h, d = self.num_heads, self.head_dim
        # DWA: attention inside each window over its pixels and its token. q, k, v are strided views of one qkv
        # buffer (split, not unbind: the backward concatenates the three gradients straight into one buffer).
        qkv = self.qkv(x).view(B * Nw, L, 3 * C)  # (B*Nw, L, 3C)
        q, k, v = (t.view(B * Nw, L, h, d).transpose(1, 2) for t in qkv.split(C, dim=-1))  # (B*Nw, h, L, d)
        o, attn = self._attend(q, k, v)  # (B*Nw, h, L, d), laid out (B*Nw, L, h, d) by SDPA
        if attn is not None:  # only touched while keeping maps (no module mutation on the fast path)
            self.last_dwa_attn = attn.reshape(B, Nw, h, L, L)
        o = torch.add(x, o.transpose(1, 2).reshape(B, Nw, L, C))  # inner shortcut, (B, Nw, L, C)
        if not self.use_pwa:
            return self.proj_drop(self.proj(o))

        # PWA: window tokens attend to each other; the values are whole DWA windows, flattened per head
        P = L - 1
        t, f = o.split([1, P], dim=2)  # (B, Nw, 1, C) window tokens, (B, Nw, P, C) window features, P = w*w
        qk = self.pwa_qk(self.win_tokens_act(self.win_tokens_norm(t)))  # (B, Nw, 1, 2C)
        qw, kw = (u.view(B, Nw, h, d).transpose(1, 2) for u in qk.split(C, dim=-1))  # 2 x (B, h, Nw, d)
        v = f.reshape(B, Nw, P, h, d).permute(0, 3, 1, 2, 4).reshape(B, h, Nw, P * d)  # no value projection
        y = self._window_attend(qw, kw, v)  # (B, h, Nw, P*d)
        y = torch.add(f, y.view(B, h, Nw, P, d).permute(0, 2, 3, 1, 4).reshape(B, Nw, P, C))  # 2nd shortcut
        return self.proj_drop(self.proj(y))  # (B, Nw, P, C)


class SepViTBlock(nn.Module):
    """Pre-norm block: x + DropPath(DSSA(LN(windows of x, with tokens))), then x + DropPath(MLP(LN(x)))."""

    def __init__(
        self,
        dim: int,
        num_heads: int,
        resolution: int,
        window_size: int,
        mlp_ratio: float = 4.0,
        proj_drop: float = 0.0,
        drop_path: float = 0.0,
    ):
        super().__init__()
        if resolution % window_size:
            raise ValueError(f"window_size {window_size} does not divide resolution {resolution}")
        self.window_size = window_size
        self.num_windows = (resolution // window_size) ** 2
        use_pwa = self.num_windows > 1
        if use_pwa:  # one learnable token per window, zero init (official); none for a single window
            self.win_tokens = nn.Parameter(torch.zeros(1, self.num_windows, 1, dim))
        else:
            self.register_parameter("win_tokens", None)
        self.norm1 = nn.LayerNorm(dim, eps=_BLOCK_LN_EPS)
        self.attn = SeparableAttention(dim, num_heads, use_pwa, proj_drop)
        self.drop_path = DropPath(drop_path)
        self.norm2 = nn.LayerNorm(dim, eps=_BLOCK_LN_EPS)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), drop=proj_drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, H, W, C = x.shape
        ws = self.window_size
        gh, gw = H // ws, W // ws
        L = ws * ws + (self.win_tokens is not None)
        # norm1 is per token, so it runs on the contiguous map (and once on the tokens, not per sample); the windows
        # are then written once into the attention input, tokens first: (B, Nw, L, C)
        xn = self.norm1(x)  # (B, H, W, C)
        if self.win_tokens is None and gh == gw == 1:
            win = xn.view(B, 1, L, C)  # one window: the map itself
        else:
            win = xn.new_empty(B, gh * gw, L, C)
            if self.win_tokens is not None:
                n1 = self.norm1  # the functional call: module hooks (e.g. FLOP counters) see norm1 once per forward
                tokens = F.layer_norm(self.win_tokens[:, :, 0], n1.normalized_shape, n1.weight, n1.bias, n1.eps)
                win[:, :, 0] = tokens  # (1, Nw, C) broadcast over the batch
            pixels = win[:, :, L - ws * ws :].view(B, gh, gw, ws, ws, C)
            pixels.copy_(xn.view(B, gh, ws, gw, ws, C).transpose(2, 3))  # window partition
        y = self.attn(win)  # (B, Nw, w*w, C)
        # window reverse, residual and drop path in one pass, written in the layout of x
        y = y.view(B, gh, gw, ws, ws, C).transpose(2, 3)  # (B, gh, ws, gw, ws, C)
        x = self.drop_path.residual(x.view(B, gh, ws, gw, ws, C), y).view(B, H, W, C)
        return self.drop_path.residual(x, self.mlp(self.norm2(x)))  # (B, H, W, C)

    def extra_repr(self) -> str:
        return f"window_size={self.window_size}, num_windows={self.num_windows}"


class SepViTStage(nn.Module):
    """Overlapping conv embedding (the merge), blocks, and the PEG after the first block."""

    def __init__(
        self,
        in_chans: int,
        dim: int,
        num_heads: int,
        resolution: int,
        window_sizes: Sequence[int],
        first: bool,
        mlp_ratio: float = 4.0,
        proj_drop: float = 0.0,
        drop_path: Sequence[float] = (),
    ):
        super().__init__()
        self.patch_embed = OverlapPatchEmbed(in_chans, dim, 7 if first else 3, 4 if first else 2)
        self.pos_drop = nn.Dropout(proj_drop)
        self.blocks = nn.ModuleList(
            SepViTBlock(dim, num_heads, resolution, w, mlp_ratio, proj_drop, dp)
            for w, dp in zip(window_sizes, drop_path)
        )
        self.pos_conv = PosConv(dim)
        self.resolution = resolution
        self.grad_checkpointing = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C_in, H_in, W_in) -> (B, H, W, C)."""
        x = self.pos_drop(self.patch_embed(x))  # (B, H, W, C)
        for i, blk in enumerate(self.blocks):
            if self.grad_checkpointing and torch.is_grad_enabled():
                x = checkpoint(blk, x, use_reentrant=False)
            else:
                x = blk(x)
            if i == 0:
                x = self.pos_conv(x)  # PEG once per stage, after the first block
        return x


class SepViT(nn.Module):
    """Hierarchical SepViT backbone and classifier.

    Args:
        img_size: input side length the window tokens are sized for.
        num_classes: classifier outputs; 0 leaves the pooled features (``head`` is Identity).
        embed_dims: channels per stage.
        num_heads: attention heads per stage.
        depths: blocks per stage.
        window_sizes: per stage, one int or per-block sizes; larger than the stage means global.
        mlp_ratio: MLP hidden width over the block width.
        in_chans: input channels.
        drop_rate: dropout on the pooled features before the classifier.
        proj_drop_rate: dropout after each embedding, in the MLP and after the attention projection.
        drop_path_rate: stochastic depth, growing linearly from 0 to this over all blocks.
    """

    def __init__(
        self,
        img_size: int = 224,
        num_classes: int = 1000,
        embed_dims: Sequence[int] = (32, 64, 128, 256),
        num_heads: Sequence[int] = (1, 2, 4, 8),
        depths: Sequence[int] = (1, 2, 6, 2),
        window_sizes: Sequence[int | Sequence[int]] = ((7,), (7, 14), (7, 14) * 3, (7, 7)),
        mlp_ratio: float = 4.0,
        in_chans: int = 3,
        drop_rate: float = 0.0,
        proj_drop_rate: float = 0.0,
        drop_path_rate: float = 0.0,
    ):
        super().__init__()
        if not len(embed_dims) == len(num_heads) == len(depths):
            raise ValueError(f"embed_dims {embed_dims}, num_heads {num_heads} and depths {depths} differ in length")
        self.img_size = img_size
        self.num_classes = num_classes
        self.num_features = embed_dims[-1]
        self.resolutions = stage_resolutions(img_size, len(depths))
        self.window_sizes = check_window_sizes(window_sizes, depths, img_size)
        n_blocks = sum(depths)
        dpr = [drop_path_rate * i / max(n_blocks - 1, 1) for i in range(n_blocks)]  # linear 0 -> rate over blocks
        self.stages = nn.ModuleList()
        for i, depth in enumerate(depths):
            start = sum(depths[:i])
            self.stages.append(
                SepViTStage(
                    in_chans if i == 0 else embed_dims[i - 1],
                    embed_dims[i],
                    num_heads[i],
                    self.resolutions[i],
                    self.window_sizes[i],
                    first=i == 0,
                    mlp_ratio=mlp_ratio,
                    proj_drop=proj_drop_rate,
                    drop_path=dpr[start : start + depth],
                )
            )
        self.feature_info = [
            dict(num_chs=d, reduction=4 * 2**i, module=f"stages.{i}") for i, d in enumerate(embed_dims)
        ]  # fmt: skip
        self.norm = nn.LayerNorm(self.num_features, eps=_BLOCK_LN_EPS)
        self.head_drop = nn.Dropout(drop_rate)
        self.head = nn.Linear(self.num_features, num_classes) if num_classes > 0 else nn.Identity()
        self.apply(init_weights_trunc_normal)  # window tokens stay zero

    @torch.jit.ignore
    def no_weight_decay(self) -> set[str]:
        """Names of the window tokens (norms and biases are excluded by the optimizer by ndim)."""
        return {n for n, _ in self.named_parameters() if n.endswith("win_tokens")}

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute each block in the backward pass (``torch.utils.checkpoint``, non-reentrant)."""
        for stage in self.stages:
            stage.grad_checkpointing = enable

    def reset_classifier(self, num_classes: int) -> None:
        """Replace the head with a freshly initialised one of ``num_classes`` outputs (0: Identity)."""
        self.num_classes = num_classes
        self.head = nn.Linear(self.num_features, num_classes) if num_classes > 0 else nn.Identity()
        self.head.apply(init_weights_trunc_normal)

    def set_keep_attn(self, enable: bool = True) -> None:
        """Run the explicit-softmax path and keep DWA/PWA maps on every ``SeparableAttention`` (for inspection)."""
        for m in self.modules():
            if isinstance(m, SeparableAttention):
                m.keep_attn = enable
                m.last_dwa_attn = m.last_pwa_attn = None

    def _check_input(self, x: torch.Tensor) -> None:
        if x.ndim != 4 or x.shape[-2:] != (self.img_size, self.img_size):
            raise ValueError(
                f"SepViT was built for {self.img_size}x{self.img_size} inputs (its window tokens are sized for that), "
                f"got shape {tuple(x.shape)}; build the model with img_size={x.shape[-1]} (window_sizes must divide "
                "its stage resolutions) or resize the input"
            )

    def forward_intermediates(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Stage outputs before the final norm: [(B, C_i, H_i, W_i)] for i = 1..4."""
        self._check_input(x)
        maps = []
        for stage in self.stages:
            x = stage(x).permute(0, 3, 1, 2)  # (B, C, H, W), channels-last in memory
            maps.append(x)
        return maps

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) -> final-normed tokens (B, N, C) of the last stage."""
        x = self.forward_intermediates(x)[-1]  # (B, C, h, w)
        return self.norm(x.flatten(2).transpose(1, 2))  # (B, N, C)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """Mean-pool the tokens (B, N, C) and classify; ``pre_logits`` returns the pooled (B, C)."""
        x = self.head_drop(x.mean(dim=1))  # (B, C)
        return x if pre_logits else self.head(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


# Per-block window sizes (GSA = the 7/14 alternation) from the official code, for 224x224.
_ARCHS: dict[str, dict[str, Any]] = {
    "sepvit_lite": dict(
        embed_dims=(32, 64, 128, 256),
        num_heads=(1, 2, 4, 8),
        depths=(1, 2, 6, 2),
        window_sizes=[[7], [7, 14], [7, 14] * 3, [7, 7]],
    ),
    "sepvit_tiny": dict(
        embed_dims=(96, 192, 384, 768),
        num_heads=(3, 6, 12, 24),
        depths=(1, 2, 6, 2),
        window_sizes=[[7], [7, 14], [7, 14] * 3, [7, 7]],
    ),
    "sepvit_small": dict(
        embed_dims=(96, 192, 384, 768),
        num_heads=(3, 6, 12, 24),
        depths=(1, 2, 14, 2),
        window_sizes=[[7], [7, 14], [7, 14] * 7, [7, 7]],
    ),
    "sepvit_base": dict(
        embed_dims=(128, 256, 512, 1024),
        num_heads=(4, 8, 16, 32),
        depths=(1, 2, 14, 2),
        window_sizes=[[7], [7, 14], [7, 14] * 7, [7, 7]],
    ),
}

# Keyword arguments a variant factory accepts besides num_classes, img_size, drop_path_rate and drop_rate.
_EXTRA_KWARGS = ("window_sizes", "in_chans", "proj_drop_rate")


def _create_sepvit(
    variant: str, num_classes: int, img_size: int, drop_path_rate: float, drop_rate: float, **kwargs: Any
) -> SepViT:
    unknown = sorted(set(kwargs) - set(_EXTRA_KWARGS))
    if unknown:
        accepted = ["num_classes", "img_size", "drop_path_rate", "drop_rate", *_EXTRA_KWARGS]
        raise ValueError(f"{variant}: unknown keyword argument(s) {unknown}; accepted: {', '.join(accepted)}")
    arch = dict(_ARCHS[variant])
    window_sizes = kwargs.pop("window_sizes", None)
    if window_sizes is not None:  # None keeps the official plan
        arch["window_sizes"] = window_sizes
    return SepViT(
        img_size=img_size,
        num_classes=num_classes,
        drop_path_rate=drop_path_rate,
        drop_rate=drop_rate,
        **arch,
        **kwargs,
    )


def resample_window_tokens(tokens: torch.Tensor, num_windows: int) -> torch.Tensor:
    """Window tokens (1, N, 1, C) of a sqrt(N) x sqrt(N) window grid resampled (bicubic) to ``num_windows``."""
    _, n, _, c = tokens.shape
    old, new = round(n**0.5), round(num_windows**0.5)
    if old * old != n or new * new != num_windows:
        raise ValueError(f"window tokens of {n} -> {num_windows} windows: both must be square grids")
    grid = tokens.reshape(1, old, old, c).permute(0, 3, 1, 2).float()  # (1, C, g, g), windows row-major
    grid = F.interpolate(grid, size=(new, new), mode="bicubic", align_corners=False, antialias=new < old)
    return grid.permute(0, 2, 3, 1).reshape(1, num_windows, 1, c).to(tokens.dtype)  # (1, N', 1, C)


def adapt_pretrained(model: SepViT, state: dict[str, torch.Tensor], source: dict[str, Any]) -> dict[str, torch.Tensor]:
    """Fit a checkpoint's ``state`` (a model of config ``source``) to ``model``, built at another size or window plan.

    Window tokens are resampled to the model's window grid; a block that would switch between one window and several
    raises ``ValueError`` naming it (see the module docstring).
    """
    out = dict(state)
    bad = []
    for s, stage in enumerate(model.stages):
        for b, blk in enumerate(stage.blocks):
            key = f"stages.{s}.blocks.{b}.win_tokens"
            old = state.get(key)
            if (old is None) != (blk.win_tokens is None):
                bad.append(f"stages.{s}.blocks.{b} ({1 if old is None else old.shape[1]} -> {blk.num_windows} windows)")
            elif old is not None and old.shape != blk.win_tokens.shape:
                out[key] = resample_window_tokens(old, blk.num_windows)
    if bad:
        depths = [len(st.blocks) for st in model.stages]
        src_plan = (source.get("kwargs") or {}).get("window_sizes") or _ARCHS[source["name"]]["window_sizes"]
        src_res = stage_resolutions(source["img_size"], len(depths))
        keep = keep_counts_plan(check_window_sizes(src_plan, depths, source["img_size"]), src_res, model.resolutions)
        hint = f"; window_sizes={keep} keeps every block's window count" if keep else ""
        raise ValueError(
            f"cannot adapt the {source['name']} checkpoint (img_size={source['img_size']}) to img_size="
            f"{model.img_size} with window_sizes={model.window_sizes}: {', '.join(bad)}. A block with one window is "
            "global attention without PWA weights and window tokens, one with several has them, so the switch would "
            f"drop trained weights or add untrained ones{hint}"
        )
    return out


SEPVIT = ModelFamily("sepvit", adapt_pretrained=adapt_pretrained)


@SEPVIT.register
def sepvit_lite(
    num_classes: int = 1000, img_size: int = 224, drop_path_rate: float = 0.1, drop_rate: float = 0.0, **kwargs: Any
) -> SepViT:
    """SepViT-Lite: dims 32-256, heads 1-8, depths 1,2,6,2 (3.66M params, 0.57 GMACs at 224)."""
    return _create_sepvit("sepvit_lite", num_classes, img_size, drop_path_rate, drop_rate, **kwargs)


@SEPVIT.register
def sepvit_tiny(
    num_classes: int = 1000, img_size: int = 224, drop_path_rate: float = 0.1, drop_rate: float = 0.0, **kwargs: Any
) -> SepViT:
    """SepViT-T: dims 96-768, heads 3-24, depths 1,2,6,2 (31.2M params, 4.5 GMACs at 224)."""
    return _create_sepvit("sepvit_tiny", num_classes, img_size, drop_path_rate, drop_rate, **kwargs)


@SEPVIT.register
def sepvit_small(
    num_classes: int = 1000, img_size: int = 224, drop_path_rate: float = 0.1, drop_rate: float = 0.0, **kwargs: Any
) -> SepViT:
    """SepViT-S: dims 96-768, heads 3-24, depths 1,2,14,2 (46.6M params, 7.5 GMACs at 224)."""
    return _create_sepvit("sepvit_small", num_classes, img_size, drop_path_rate, drop_rate, **kwargs)


@SEPVIT.register
def sepvit_base(
    num_classes: int = 1000, img_size: int = 224, drop_path_rate: float = 0.1, drop_rate: float = 0.0, **kwargs: Any
) -> SepViT:
    """SepViT-B: dims 128-1024, heads 4-32, depths 1,2,14,2 (82.4M params, 13.1 GMACs at 224)."""
    return _create_sepvit("sepvit_base", num_classes, img_size, drop_path_rate, drop_rate, **kwargs)
