"""SeTformer: a hierarchical vision transformer whose token mixer is SeT attention (optimal-transport based).

Paper: Shamsolmoali, Zareapoor, Granger, Felsberg, "SeTformer is What You Need for Vision and Language",
AAAI 2024, arXiv 2401.03540. Only the abstract and third-party summaries were reachable and no official code exists,
so almost everything below is INFERRED: the SeT layer is reconstructed from OTKE (see
:mod:`pretrain.models.set_attention` for the layer's decisions and their evidence); the backbone is CSWin's macro
design with every attention layer replaced by SeT. Reported results (VERIFIED, abstract):
ImageNet-1K top-1 84.7% (small) and 86.2% (base). Variant widths, depths, params and FLOPs of the paper were not
retrievable; the variants here reuse CSWin-T/S/B's stage tables and are not the paper's.

Decisions made here:
    * Stem: conv 7x7, stride 4, padding 3, then LayerNorm; between stages conv 3x3, stride 2, padding 1, then
      LayerNorm (CSWin's Merge_Block). Widths C, 2C, 4C, 8C.
    * Blocks are pre-norm: ``x + DropPath(SeT(LN(x)))``, then ``x + DropPath(MLP(LN(x)))``, MLP ratio 4, stochastic
      depth growing linearly over all blocks. Final LayerNorm, mean pooling, dropout, linear head.
    * Positional information ("additional positional embeddings" of [S4]) comes from two places: LePE, a depthwise
      3x3 conv on the attention values (SeT's values are the kernel features psi(X)) added to the attention output,
      as in CSWin; and the exponential distance penalty inside the OT (``pos_sigma``, scaled by a learned per-head
      factor that sets the content/position balance).
    * Reference size ``p`` per stage (``num_ref``, default 64, 64, 49, 49: an 8x8 or 7x7 reference grid) is clamped
      to the stage's token count at ``img_size`` (32x32 inputs: 64, 16, 4, 1). The OT is computed in float32. A
      stage clamped to ``p = n`` (stage 4 at 224x224) outputs the slots' aggregate directly, slot ``j`` as token
      ``j`` (``direct_output``), instead of applying the plan twice.
    * Inputs must have height and width divisible by 32 (stride-4 stem and three stride-2 merges); other sizes raise
      ``ValueError``. Any such size works at run time (positions are scaled to the unit square), non-square included.
    * Pretrained weights at another input size (``create_model(FILE, img_size=...)``, ``model.init_from``;
      :func:`pretrained_kwargs`): the only size-dependent choice is the clamping of ``num_ref`` to a stage's tokens;
      the reference slots are a learned set, so the model keeps the checkpoint's (clamped) slot counts. Positions of
      tokens and slots are scaled to the unit square and LePE is a 3x3 conv, so nothing else is tied to the token
      grid. A size at which a stage has fewer tokens than the checkpoint's reference slots is refused (the clamp
      would drop learned slots), naming the stage and the smallest size that fits. The softmax ablation has nothing
      tied to the grid.
    * ``set_impl`` picks SeT's kernels: ``"auto"`` (default) runs the fused Triton kernels on CUDA when triton imports
      and the torch reference elsewhere; ``"torch"`` / ``"triton"`` force one (``model.kwargs.set_impl`` in a
      config). Neither path factorises a matrix or reads the device from the host (see
      :mod:`pretrain.models.set_attention`); each SeT layer builds its positional log-weight for the stage's grid
      at ``img_size`` once.
    * ``attention="softmax"`` builds the same backbone with global multi-head softmax attention
      (``F.scaled_dot_product_attention``, qkv bias, same LePE) for ablations.
    * A stage with ``p = 1`` (the last stage built for 32x32) has a uniform plan whatever the input, so its SeT
      layer has no reference parameter and skips Sinkhorn (it averages the kernel features over the tokens).
      Running a model at a smaller size than it was built for can leave stages with one token; their reference
      then gets a zero gradient for that batch (the plan of one token is fixed by the marginals).

Measured here at 224x224 with 1000 classes, ``attention="set"``, default kwargs (MACs: one per multiply-add of
matmuls and convolutions, ``torch.utils.flop_counter.FlopCounterMode`` total / 2, like fvcore; the ``O(L n p)``
elementwise Sinkhorn work is not counted; the softmax ablation is counted with the math SDPA backend):

    ================  =======  ======  ================  ================
    variant           params   GMACs   softmax: params   softmax: GMACs
    ================  =======  ======  ================  ================
    setformer_lite     1.75M    0.27    1.91M             0.98
    setformer_tiny    19.47M    3.77   22.32M             6.06
    setformer_small   30.04M    5.94   34.64M            10.17
    setformer_base    66.32M   12.82   77.38M            20.01
    ================  =======  ======  ================  ================

For scale only (an inferred, loose bound): the abstract's COCO comparison would put SeTformer-B near
55M params / 10.9 GFLOPs; CSWin-T/S/B themselves are 23M/35M/78M and 4.3/6.9/15.0G (stripe attention).
"""

from __future__ import annotations

import inspect
import logging
import math
from collections.abc import Sequence
from typing import Any, Literal

import torch
import torch.nn as nn
from torch.utils.checkpoint import checkpoint

from pretrain.layers.common import DropPath, Mlp, init_weights_trunc_normal

from .registry import ModelFamily
from .set_attention import SetAttention, SoftmaxAttention

__all__ = [
    "ConvEmbed",
    "SeTformer",
    "SetformerBlock",
    "SetformerStage",
    "pretrained_kwargs",
    "setformer_lite",
    "setformer_tiny",
    "setformer_small",
    "setformer_base",
]

logger = logging.getLogger(__name__)

_NUM_STAGES = 4
_TOTAL_STRIDE = 32  # stem /4, then three /2 merges


class ConvEmbed(nn.Module):
    """Overlapping conv embedding followed by LayerNorm: the stem (7x7/4) and the stage merges (3x3/2)."""

    def __init__(self, in_chans: int, dim: int, kernel_size: int, stride: int):
        super().__init__()
        self.conv = nn.Conv2d(in_chans, dim, kernel_size, stride, padding=kernel_size // 2)
        self.norm = nn.LayerNorm(dim)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int]]:
        """(B, C_in, H, W) -> tokens (B, H' W', C) and the grid (H', W')."""
        # channels-last conv (the merges get a channels-last view of the previous stage's tokens anyway): the output
        # is then (B, H' W', C) in memory and the norm reads the tokens in place instead of copying a transposed view
        x = self.conv(x.contiguous(memory_format=torch.channels_last))  # (B, C, H', W'), channels-last in memory
        grid = (x.shape[-2], x.shape[-1])
        return self.norm(x.flatten(2).transpose(1, 2)), grid  # (B, N, C)


class SetformerBlock(nn.Module):
    """Pre-norm transformer block with SeT (or softmax) attention and an MLP.

    Args:
        dim: token width.
        num_heads: attention heads.
        attention: ``"set"`` or ``"softmax"``.
        mlp_ratio: MLP hidden width over ``dim``.
        drop_path: stochastic depth of both residual branches.
        proj_drop: dropout after the attention projection and in the MLP.
        attn_kwargs: passed to :class:`SetAttention` (``num_ref``, ``sinkhorn_eps``, ...) or, for softmax, only
            ``lepe``.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        attention: Literal["set", "softmax"] = "set",
        mlp_ratio: float = 4.0,
        drop_path: float = 0.0,
        proj_drop: float = 0.0,
        **attn_kwargs: Any,
    ):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        if attention == "set":
            self.attn = SetAttention(dim, num_heads, proj_drop=proj_drop, **attn_kwargs)
        else:
            self.attn = SoftmaxAttention(dim, num_heads, lepe=attn_kwargs.get("lepe", True), proj_drop=proj_drop)
        self.drop_path = DropPath(drop_path)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), drop=proj_drop)

    def forward(self, x: torch.Tensor, grid_size: tuple[int, int]) -> torch.Tensor:
        """(B, N, C) tokens on a (H, W) grid -> (B, N, C)."""
        x = self.drop_path.residual(x, self.attn(self.norm1(x), grid_size))  # x + DropPath(attn), one pass
        return self.drop_path.residual(x, self.mlp(self.norm2(x)))


class SetformerStage(nn.Module):
    """A conv embedding (stem or merge) followed by ``depth`` blocks."""

    def __init__(
        self,
        in_chans: int,
        dim: int,
        depth: int,
        num_heads: int,
        first: bool,
        drop_path: Sequence[float],
        **block_kwargs: Any,
    ):
        super().__init__()
        self.downsample = ConvEmbed(in_chans, dim, kernel_size=7, stride=4) if first else ConvEmbed(in_chans, dim, 3, 2)
        self.blocks = nn.ModuleList(
            [SetformerBlock(dim, num_heads, drop_path=drop_path[i], **block_kwargs) for i in range(depth)]
        )
        self.grad_checkpointing = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C_in, H, W) -> (B, C, H', W')."""
        x, grid = self.downsample(x)  # (B, N, C)
        for blk in self.blocks:
            if self.grad_checkpointing and torch.is_grad_enabled():
                x = checkpoint(blk, x, grid, use_reentrant=False)
            else:
                x = blk(x, grid)
        return x.transpose(1, 2).reshape(x.shape[0], -1, *grid)  # (B, C, H', W')


def _per_stage(value: Any, name: str) -> tuple:
    values = tuple(value) if isinstance(value, (list, tuple)) else (value,) * _NUM_STAGES
    if len(values) != _NUM_STAGES:
        raise ValueError(f"{name} needs one value per stage ({_NUM_STAGES}), got {list(values)}")
    return values


class SeTformer(nn.Module):
    """Hierarchical SeTformer backbone and classifier (CSWin-like macro design, SeT attention in every block).

    Args:
        img_size: input side length the model is built for (fixes the clamping of ``num_ref``); divisible by 32.
        num_classes: classifier outputs; 0 leaves the pooled features (``head`` is Identity).
        embed_dim: width ``C`` of stage 1; stage ``i`` has ``C * 2**i``.
        depths: blocks per stage.
        num_heads: attention heads per stage.
        attention: ``"set"`` (SeT) or ``"softmax"`` (global multi-head softmax attention, the ablation).
        num_ref: SeT reference slots ``p`` per stage (one int for all stages, or four), clamped to the stage's tokens.
        num_anchors: Nystrom width ``k`` per head; ``None`` is the head width.
        input_proj: SeT's input projection ``Linear(C, C)`` before the kernel map.
        kernel_sigma: ``sigma`` of the kernel ``kappa(t) = exp((t - 1) / sigma^2)``.
        sinkhorn_eps: entropic regularisation ``eps`` of the OT.
        sinkhorn_iters: Sinkhorn iterations ``L``.
        pos_sigma: length scale of the OT positional penalty ``exp(-|pos_i - pos_j|_1 / pos_sigma)``; ``None``/0 off.
        learn_pos_scale: a learnable per-head scale (1 at init) on the positional term of the OT cost.
        exact_rows: renormalise the plan's rows for the way back, so every output token is an exact convex
            combination of the reference slots.
        direct_output: where a stage has as many slots as tokens (``p = n``, same grid), output the slots' aggregate
            directly instead of transporting it back a second time.
        lepe: depthwise-conv positional term on the attention values.
        whiten_ridge: ridge of the whitening ``(kappa(Z Z^T) + ridge I)^(-1/2)``.
        set_impl: SeT's implementation: ``"auto"`` (the fused Triton kernels on CUDA when triton imports, the torch
            reference elsewhere), ``"torch"`` or ``"triton"`` (CUDA, or Triton's interpreter in tests).
        mlp_ratio: MLP hidden width over the block width.
        in_chans: input channels.
        drop_rate: dropout on the pooled features before the classifier.
        proj_drop_rate: dropout after the attention projection and in the MLP.
        drop_path_rate: stochastic depth, growing linearly from 0 to this over all blocks.
    """

    def __init__(
        self,
        img_size: int = 224,
        num_classes: int = 1000,
        embed_dim: int = 64,
        depths: Sequence[int] = (1, 2, 21, 1),
        num_heads: Sequence[int] = (2, 4, 8, 16),
        attention: Literal["set", "softmax"] = "set",
        num_ref: int | Sequence[int] = (64, 64, 49, 49),
        num_anchors: int | None = None,
        input_proj: bool = True,
        kernel_sigma: float = 0.5,
        sinkhorn_eps: float = 0.5,
        sinkhorn_iters: int = 3,
        pos_sigma: float | None = 0.25,
        learn_pos_scale: bool = False,
        exact_rows: bool = False,
        direct_output: bool = False,
        lepe: bool = True,
        whiten_ridge: float = 1e-3,
        set_impl: Literal["auto", "torch", "triton"] = "auto",
        mlp_ratio: float = 4.0,
        in_chans: int = 3,
        drop_rate: float = 0.0,
        proj_drop_rate: float = 0.0,
        drop_path_rate: float = 0.0,
    ):
        super().__init__()
        if attention not in ("set", "softmax"):
            raise ValueError(f"attention={attention!r} must be 'set' or 'softmax'")
        if img_size % _TOTAL_STRIDE:
            raise ValueError(f"img_size={img_size} must be divisible by {_TOTAL_STRIDE} (stem /4, three /2 merges)")
        depths, num_heads, num_ref = (
            _per_stage(depths, "depths"),
            _per_stage(num_heads, "num_heads"),
            _per_stage(num_ref, "num_ref"),
        )
        dims = [embed_dim * 2**i for i in range(_NUM_STAGES)]
        for i, (dim, heads) in enumerate(zip(dims, num_heads)):
            if dim % heads:
                raise ValueError(f"stage {i + 1}: width {dim} is not divisible by num_heads={heads}")
        self.img_size = img_size
        self.num_classes = num_classes
        self.num_features = dims[-1]
        self.attention = attention
        self.resolutions = [img_size // (4 * 2**i) for i in range(_NUM_STAGES)]
        self.num_ref = [min(int(p), r * r) for p, r in zip(num_ref, self.resolutions)]
        dpr = [drop_path_rate * i / max(sum(depths) - 1, 1) for i in range(sum(depths))]  # linear 0 -> rate, per block
        set_shared = dict(
            num_anchors=num_anchors, input_proj=input_proj, kernel_sigma=kernel_sigma, sinkhorn_eps=sinkhorn_eps,
            sinkhorn_iters=sinkhorn_iters, pos_sigma=pos_sigma, learn_pos_scale=learn_pos_scale, exact_rows=exact_rows,
            direct_output=direct_output, whiten_ridge=whiten_ridge, set_impl=set_impl,
        )  # fmt: skip
        self.stages = nn.ModuleList()
        for i in range(_NUM_STAGES):
            res = self.resolutions[i]
            set_kwargs = dict(set_shared, num_ref=self.num_ref[i], grid_size=(res, res)) if attention == "set" else {}
            start = sum(depths[:i])
            self.stages.append(
                SetformerStage(
                    in_chans if i == 0 else dims[i - 1],
                    dims[i],
                    depths[i],
                    num_heads[i],
                    first=i == 0,
                    drop_path=dpr[start : start + depths[i]],
                    attention=attention,
                    mlp_ratio=mlp_ratio,
                    proj_drop=proj_drop_rate,
                    lepe=lepe,
                    **set_kwargs,
                )
            )
        self.feature_info = [
            dict(num_chs=d, reduction=4 * 2**i, module=f"stages.{i}") for i, d in enumerate(dims)
        ]  # fmt: skip
        self.norm = nn.LayerNorm(self.num_features)
        self.head_drop = nn.Dropout(drop_rate)
        self.head = nn.Linear(self.num_features, num_classes) if num_classes > 0 else nn.Identity()
        self.apply(init_weights_trunc_normal)  # SeT anchors and references keep their own init

    @torch.jit.ignore
    def no_weight_decay(self) -> set[str]:
        """Names of the SeT anchors (renormalised in forward) and references (norms and biases go by ndim)."""
        return {n for n, _ in self.named_parameters() if n.endswith((".anchors", ".reference"))}

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

    def _check_input(self, x: torch.Tensor) -> None:
        if x.ndim != 4:
            raise ValueError(f"SeTformer expects images (B, C, H, W), got shape {tuple(x.shape)}")
        h, w = x.shape[-2:]
        if h % _TOTAL_STRIDE or w % _TOTAL_STRIDE:
            up = lambda s: -(-s // _TOTAL_STRIDE) * _TOTAL_STRIDE
            raise ValueError(
                f"SeTformer needs input height and width divisible by {_TOTAL_STRIDE} (a stride-4 stem and three "
                f"stride-2 merges), got {h}x{w}; resize or pad to e.g. {up(h)}x{up(w)}"
            )

    def forward_intermediates(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Stage outputs before the final norm: [(B, C_i, H_i, W_i)] for i = 1..4 (H_i = H / 4 / 2**(i-1))."""
        self._check_input(x)
        maps = []
        for stage in self.stages:
            x = stage(x)  # (B, C_i, H_i, W_i)
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
        """(B, 3, H, W) -> logits (B, num_classes)."""
        return self.forward_head(self.forward_features(x))


# Stage tables: CSWin-T/S/B's (Dong et al., "CSWin Transformer", CVPR 2022) and a small CPU demo variant.
_ARCHS: dict[str, dict[str, Any]] = {
    "setformer_lite": dict(embed_dim=32, depths=(1, 1, 2, 1), num_heads=(1, 2, 4, 8)),
    "setformer_tiny": dict(embed_dim=64, depths=(1, 2, 21, 1), num_heads=(2, 4, 8, 16)),
    "setformer_small": dict(embed_dim=64, depths=(2, 4, 32, 2), num_heads=(2, 4, 8, 16)),
    "setformer_base": dict(embed_dim=96, depths=(2, 4, 32, 2), num_heads=(4, 8, 16, 32)),
}

# The one source of truth for what a factory accepts: SeTformer's own keyword arguments.
_FACTORY_ARGS = ("num_classes", "img_size", "drop_path_rate", "drop_rate")
_EXTRA_KWARGS = tuple(n for n in inspect.signature(SeTformer.__init__).parameters if n not in ("self", *_FACTORY_ARGS))


def _create_setformer(
    variant: str, num_classes: int, img_size: int, drop_path_rate: float, drop_rate: float, **kwargs: Any
) -> SeTformer:
    unknown = sorted(set(kwargs) - set(_EXTRA_KWARGS))
    if unknown:
        accepted = [*_FACTORY_ARGS, *_EXTRA_KWARGS]
        raise ValueError(f"{variant}: unknown keyword argument(s) {unknown}; accepted: {', '.join(accepted)}")
    arch = {**_ARCHS[variant], **kwargs}
    return SeTformer(
        img_size=img_size, num_classes=num_classes, drop_path_rate=drop_path_rate, drop_rate=drop_rate, **arch
    )


def _built_num_ref(cfg: dict[str, Any]) -> list[int]:
    """Per-stage reference slots of the model a ``model`` config builds (``num_ref`` clamped at its img_size)."""
    default = inspect.signature(SeTformer.__init__).parameters["num_ref"].default
    num_ref = _per_stage((cfg.get("kwargs") or {}).get("num_ref", default), "num_ref")
    res = [cfg["img_size"] // (4 * 2**i) for i in range(_NUM_STAGES)]
    return [min(int(p), r * r) for p, r in zip(num_ref, res)]


def pretrained_kwargs(source: dict[str, Any], kwargs: dict[str, Any]) -> dict[str, Any]:
    """Build kwargs of a model at another ``img_size`` that loads the weights of a model of config ``source``.

    Keeps the checkpoint's reference slot counts; raises ``ValueError`` when a stage at the new size has fewer tokens
    than them (see the module docstring).
    """
    if kwargs.get("attention", "set") != "set":
        return kwargs
    slots = _built_num_ref(source)
    img = kwargs["img_size"]
    bad, fit = [], img
    for i, p in enumerate(slots):
        r = img // (4 * 2**i)
        if p > r * r:
            bad.append(f"stage {i + 1} ({p} slots, {r}x{r}={r * r} tokens)")
            need = 4 * 2**i * math.ceil(p**0.5)  # the stage needs ceil(sqrt(p)) tokens a side
            fit = max(fit, -(-need // _TOTAL_STRIDE) * _TOTAL_STRIDE)
    if bad:
        raise ValueError(
            f"cannot adapt the {source['name']} checkpoint (img_size={source['img_size']}) to img_size={img}: the SeT "
            f"reference of {', '.join(bad)} has more learned slots than the stage has tokens, and the model clamps "
            f"its reference to the token count (dropping learned slots); use img_size >= {fit}"
        )
    return {**kwargs, "num_ref": slots}


SETFORMER = ModelFamily("setformer", pretrained_kwargs=pretrained_kwargs)


@SETFORMER.register
def setformer_lite(
    num_classes: int = 1000, img_size: int = 224, drop_path_rate: float = 0.1, drop_rate: float = 0.0, **kwargs: Any
) -> SeTformer:
    """SeTformer-Lite (CPU demos): C=32, depths 1,1,2,1, heads 1,2,4,8 (1.75M params, 0.27 GMACs at 224)."""
    return _create_setformer("setformer_lite", num_classes, img_size, drop_path_rate, drop_rate, **kwargs)


@SETFORMER.register
def setformer_tiny(
    num_classes: int = 1000, img_size: int = 224, drop_path_rate: float = 0.1, drop_rate: float = 0.0, **kwargs: Any
) -> SeTformer:
    """SeTformer-T: C=64, depths 1,2,21,1, heads 2,4,8,16 (19.47M params, 3.77 GMACs at 224)."""
    return _create_setformer("setformer_tiny", num_classes, img_size, drop_path_rate, drop_rate, **kwargs)


@SETFORMER.register
def setformer_small(
    num_classes: int = 1000, img_size: int = 224, drop_path_rate: float = 0.1, drop_rate: float = 0.0, **kwargs: Any
) -> SeTformer:
    """SeTformer-S: C=64, depths 2,4,32,2, heads 2,4,8,16 (30.04M params, 5.94 GMACs at 224)."""
    return _create_setformer("setformer_small", num_classes, img_size, drop_path_rate, drop_rate, **kwargs)


@SETFORMER.register
def setformer_base(
    num_classes: int = 1000, img_size: int = 224, drop_path_rate: float = 0.1, drop_rate: float = 0.0, **kwargs: Any
) -> SeTformer:
    """SeTformer-B: C=96, depths 2,4,32,2, heads 4,8,16,32 (66.32M params, 12.82 GMACs at 224)."""
    return _create_setformer("setformer_base", num_classes, img_size, drop_path_rate, drop_rate, **kwargs)
