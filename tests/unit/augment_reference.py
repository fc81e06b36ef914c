"""The device augmentation as it was before issue 22: every RandAugment op computed for the whole batch and selected
per image by masks (``data_pipeline/augment.py`` at commit e3298ef, kept verbatim apart from names).

It is the reference the grouped and fused paths are compared with: for the same generator seed they must make the
same op choices with the same magnitudes and give the same pixels.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.nn.functional as F

if TYPE_CHECKING:
    from data_pipeline.config import AugmentConfig

__all__ = ["MaskedAugment"]

RANDAUG_OPS = (
    "autocontrast",
    "equalize",
    "rotate",
    "posterize",
    "solarize",
    "color",
    "contrast",
    "brightness",
    "sharpness",
    "shear_x",
    "shear_y",
    "translate_x",
    "translate_y",
)
"""The RandAugment op set; each image draws ``randaug_n`` of them (with replacement)."""
_GEOMETRIC = ("rotate", "shear_x", "shear_y", "translate_x", "translate_y")
RANDAUG_OP_PROB = 0.5
"""Probability that a drawn op is applied (timm's default for its ``rand-`` policies)."""
_MAX_LEVEL = 10.0  # magnitudes are on a 0..10 scale
_MAX_ROTATE_DEG = 30.0
_MAX_SHEAR = 0.3
_MAX_TRANSLATE = 0.45  # fraction of the image side
_MAX_ENHANCE = 0.9  # blend factor 1 +- 0.9 at full magnitude
_MAX_POSTERIZE_DROP = 4  # bits removed at full magnitude (8 -> 4 bits)
# Random erasing: area fraction and aspect-ratio range of the box, tries per image (timm's defaults)
_ERASE_AREA = (0.02, 1 / 3)
_ERASE_LOG_RATIO = (math.log(0.3), math.log(1 / 0.3))
_ERASE_ATTEMPTS = 10
# ITU-R 601-2 luma, as PIL's convert("L")
_LUMA = (0.299, 0.587, 0.114)


def _stats(values: Sequence[float], ref: torch.Tensor) -> torch.Tensor:
    return torch.tensor(list(values), dtype=torch.float32, device=ref.device).view(1, -1, 1, 1)


def _normalize_unit(x: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """(x - mean) / std for x in [0, 1]."""
    return (x - _stats(mean, x)) / _stats(std, x)


def normalize(images: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """uint8 ``(B, 3, H, W)`` (or ``(3, H, W)``) -> float32 ``(x / 255 - mean) / std``; for evaluation.

    Args:
        images: uint8 pixels.
        mean: Per-channel mean on the 0..1 scale.
        std: Per-channel std on the 0..1 scale.
    """
    squeeze = images.dim() == 3
    x = images.unsqueeze(0) if squeeze else images
    out = _normalize_unit(x.float().div(255.0), mean, std)  # (B, 3, H, W)
    return out[0] if squeeze else out


def soft_targets(labels: torch.Tensor, num_classes: int, smoothing: float = 0.0) -> torch.Tensor:
    """One-hot targets with label smoothing: ``1 - smoothing + smoothing / K`` on the label, ``smoothing / K`` off.

    Returns:
        float32 ``(B, num_classes)``, each row summing to 1.
    """
    off = smoothing / num_classes
    out = torch.full((labels.shape[0], num_classes), off, dtype=torch.float32, device=labels.device)
    return out.scatter_(1, labels.long().view(-1, 1), 1.0 - smoothing + off)


# ------------------------------------------------------------------------------------------------ pixel helpers


def _grey(x: torch.Tensor) -> torch.Tensor:
    """(B, 3, H, W) -> (B, 1, H, W) luma."""
    r, g, b = x[:, 0:1], x[:, 1:2], x[:, 2:3]
    return _LUMA[0] * r + _LUMA[1] * g + _LUMA[2] * b


def _blend(degenerate: torch.Tensor, x: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """PIL ImageEnhance: ``degenerate + factor * (x - degenerate)``, clamped; ``factor`` is (B,)."""
    return (degenerate + factor.view(-1, 1, 1, 1) * (x - degenerate)).clamp_(0.0, 1.0)


def _smooth(x: torch.Tensor) -> torch.Tensor:
    """PIL's SMOOTH filter on the interior; the 1-pixel border keeps the original values (as PIL's sharpness)."""
    if x.shape[2] < 3 or x.shape[3] < 3:
        return x
    # kernel [[1, 1, 1], [1, 5, 1], [1, 1, 1]] / 13 = (3x3 box sum + 4 * centre) / 13
    box = F.avg_pool2d(x, 3, stride=1) * 9.0  # (B, C, H-2, W-2)
    out = x.clone()
    out[:, :, 1:-1, 1:-1] = (box + 4.0 * x[:, :, 1:-1, 1:-1]) / 13.0
    return out


def _levels(x: torch.Tensor) -> torch.Tensor:
    """[0, 1] floats -> integer levels 0..255 (long)."""
    return (x * 255.0).round_().clamp_(0, 255).long()


def _autocontrast(x: torch.Tensor) -> torch.Tensor:
    """Stretch each channel of each image to [0, 1]; flat channels stay as they are."""
    lo = x.amin(dim=(2, 3), keepdim=True)
    hi = x.amax(dim=(2, 3), keepdim=True)
    span = hi - lo
    return torch.where(span > 0, (x - lo) / span.clamp_min(1e-12), x)


def _equalize(x: torch.Tensor) -> torch.Tensor:
    """Histogram equalisation per image and channel on 256 levels, with PIL's lookup-table rule."""
    b, c, h, w = x.shape
    levels = _levels(x).view(b * c, h * w)  # (BC, HW)
    hist = torch.zeros(b * c, 256, dtype=torch.long, device=x.device)
    hist.scatter_add_(1, levels, torch.ones_like(levels))  # (BC, 256)
    last = hist.gather(1, levels.amax(dim=1, keepdim=True))  # count of the highest level present, (BC, 1)
    step = (h * w - last) // 255  # (BC, 1)
    safe = step.clamp_min(1)
    # lut[i] = (step // 2 + #pixels below level i) // step
    below = torch.cumsum(hist, dim=1) - hist  # (BC, 256)
    lut = ((below + safe // 2) // safe).clamp_(0, 255)
    out = lut.gather(1, levels).to(x.dtype).div_(255.0)
    out = torch.where(step > 0, out, levels.to(x.dtype) / 255.0)  # a near-constant channel is left alone
    return out.view(b, c, h, w)


def _posterize(x: torch.Tensor, drop_bits: torch.Tensor) -> torch.Tensor:
    """Keep ``8 - drop_bits`` high bits of every level; ``drop_bits`` is (B,) integer-valued."""
    q = torch.pow(2.0, drop_bits).view(-1, 1, 1, 1)
    return torch.floor(_levels(x).to(x.dtype) / q) * q / 255.0


def _pick(mask: torch.Tensor, new: torch.Tensor, cur: torch.Tensor) -> torch.Tensor:
    """Per image: ``new`` where ``mask`` (B,) is set, else ``cur``."""
    return torch.where(mask.view(-1, 1, 1, 1), new, cur)


def _affine(x: torch.Tensor, theta: torch.Tensor, fill: torch.Tensor) -> torch.Tensor:
    """Resample ``x`` (B, C, H, W) with per-image affine maps ``theta`` (B, 2, 3) from output to input coordinates
    (normalised, centre origin); uncovered pixels get ``fill`` (1, C, 1, 1)."""
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)  # (B, H, W, 2)
    return F.grid_sample(x - fill, grid, mode="bilinear", padding_mode="zeros", align_corners=False) + fill


# ------------------------------------------------------------------------------------------------ the augmenter


class MaskedAugment:
    """Batched train-time augmentation configured by an ``augment`` config section.

    Args:
        aug: The ``augment`` section (``data_pipeline.config.AugmentConfig``); every op is off when its knob is 0
            (``randaug_n``, ``color_jitter``, ``random_erasing``, ``mixup_alpha`` and ``cutmix_alpha`` or
            ``mix_prob``, ``label_smoothing``).
        num_classes: Width of the soft targets.
    """

    def __init__(self, aug: AugmentConfig, num_classes: int):
        if num_classes <= 0:
            raise ValueError(f"num_classes={num_classes} must be positive")
        if len(aug.mean) != 3 or len(aug.std) != 3:
            raise ValueError("augment.mean and augment.std need 3 values")
        self.aug = aug
        self.num_classes = int(num_classes)
        self.mean = tuple(float(m) for m in aug.mean)
        self.std = tuple(float(s) for s in aug.std)

    @property
    def mixes(self) -> bool:
        """Whether batches can be mixed at all."""
        return self.aug.mix_prob > 0 and (self.aug.mixup_alpha > 0 or self.aug.cutmix_alpha > 0)

    def __call__(
        self, images: torch.Tensor, labels: torch.Tensor, generator: torch.Generator
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Augments one batch.

        Args:
            images: uint8 (B, 3, H, W) on any device.
            labels: int64 (B,) class indices.
            generator: The only source of randomness (the trainer seeds it per (seed, step, rank)).

        Returns:
            ``(images float32 (B, 3, H, W) normalised, targets float32 (B, num_classes))``; target rows sum to 1.
        """
        if images.dim() != 4 or images.shape[1] != 3 or images.dtype != torch.uint8:
            raise ValueError(f"images must be uint8 (B, 3, H, W), got {images.dtype} {tuple(images.shape)}")
        if labels.shape != images.shape[:1]:
            raise ValueError(f"labels must be (B,) = ({images.shape[0]},), got {tuple(labels.shape)}")
        aug = self.aug
        host_rng = None
        if self.mixes:
            # batch-level draws (mix or not, which, lambda, box) on the host, seeded by the generator's seed (a host
            # value: no draw from the device generator, so nothing waits for the device)
            host_rng = np.random.default_rng([generator.initial_seed(), 0x6D6978])
        x = images.float().div(255.0)  # (B, 3, H, W) in [0, 1]
        if aug.randaug_n > 0:
            x = self._randaugment(x, generator)
        if aug.color_jitter > 0:
            x = self._color_jitter(x, generator)
        x = _normalize_unit(x, self.mean, self.std)
        if aug.random_erasing > 0:
            x = self._erase(x, generator)
        targets = soft_targets(labels.to(x.device), self.num_classes, aug.label_smoothing)  # (B, K)
        if host_rng is not None and host_rng.random() < aug.mix_prob:
            x, targets = self._mix(x, targets, host_rng)
        return x, targets

    # -- random numbers ----------------------------------------------------------------------------------------

    @staticmethod
    def _rand(shape: Sequence[int], g: torch.Generator, device: torch.device) -> torch.Tensor:
        return torch.rand(tuple(shape), generator=g, device=g.device).to(device)

    @staticmethod
    def _randn(shape: Sequence[int], g: torch.Generator, device: torch.device) -> torch.Tensor:
        return torch.randn(tuple(shape), generator=g, device=g.device).to(device)

    # -- RandAugment -------------------------------------------------------------------------------------------

    def _randaugment(self, x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
        aug = self.aug
        b, _, h, w = x.shape
        dev = x.device
        fill = _stats(self.mean, x)  # uncovered pixels get the mean colour (0 after normalisation)
        n_ops = len(RANDAUG_OPS)
        for _ in range(aug.randaug_n):
            op = (self._rand((b,), g, dev) * n_ops).long().clamp_(max=n_ops - 1)  # (B,) op index per image
            apply = self._rand((b,), g, dev) < RANDAUG_OP_PROB
            level = (aug.randaug_m + aug.randaug_mstd * self._randn((b,), g, dev)).clamp(0.0, _MAX_LEVEL)
            frac = level / _MAX_LEVEL  # (B,) magnitude in [0, 1]
            sign = torch.where(self._rand((b,), g, dev) < 0.5, -1.0, 1.0)  # (B,)
            chosen = {name: apply & (op == i) for i, name in enumerate(RANDAUG_OPS)}
            # colour ops: each computed for the whole batch, kept where chosen
            enhance = 1.0 + sign * _MAX_ENHANCE * frac  # (B,) blend factor
            grey = _grey(x)  # (B, 1, H, W)
            y = _pick(chosen["brightness"], _blend(torch.zeros_like(x), x, enhance), x)
            y = _pick(chosen["color"], _blend(grey, x, enhance), y)
            y = _pick(chosen["contrast"], _blend(grey.mean(dim=(2, 3), keepdim=True), x, enhance), y)
            y = _pick(chosen["sharpness"], _blend(_smooth(x), x, enhance), y)
            y = _pick(chosen["autocontrast"], _autocontrast(x), y)
            y = _pick(chosen["equalize"], _equalize(x), y)
            y = _pick(chosen["posterize"], _posterize(x, torch.round(_MAX_POSTERIZE_DROP * frac)), y)
            threshold = (256.0 / 255.0) * (1.0 - frac).view(-1, 1, 1, 1)  # PIL: invert levels >= 256 * (1 - f)
            y = _pick(chosen["solarize"], torch.where(x >= threshold, 1.0 - x, x), y)
            # geometric ops: one affine map per image (identity where none is chosen), one resampling pass
            theta = self._affine_maps(chosen, frac, sign, h, w)  # (B, 2, 3)
            geometric = torch.stack([chosen[n] for n in _GEOMETRIC]).any(dim=0)  # (B,)
            y = _pick(geometric, _affine(x, theta, fill), y)
            x = y
        return x

    @staticmethod
    def _affine_maps(
        chosen: dict[str, torch.Tensor], frac: torch.Tensor, sign: torch.Tensor, h: int, w: int
    ) -> torch.Tensor:
        """Output -> input maps in affine_grid's normalised coordinates; ``h / w`` terms keep angles and shears
        true in pixels on non-square images."""
        b = frac.shape[0]
        theta = torch.zeros(b, 2, 3, dtype=torch.float32, device=frac.device)
        theta[:, 0, 0] = 1.0
        theta[:, 1, 1] = 1.0
        angle = sign * frac * math.radians(_MAX_ROTATE_DEG)
        cos, sin = torch.cos(angle), torch.sin(angle)
        rot = torch.stack(
            [
                torch.stack([cos, -sin * h / w, torch.zeros_like(cos)], -1),
                torch.stack([sin * w / h, cos, torch.zeros_like(cos)], -1),
            ],
            dim=1,
        )  # (B, 2, 3)
        theta = torch.where(chosen["rotate"].view(-1, 1, 1), rot, theta)
        shear = sign * frac * _MAX_SHEAR
        shear_x = theta.clone()
        shear_x[:, 0, 1] = shear * h / w
        theta = torch.where(chosen["shear_x"].view(-1, 1, 1), shear_x, theta)
        shear_y = theta.clone()
        shear_y[:, 1, 0] = shear * w / h
        theta = torch.where(chosen["shear_y"].view(-1, 1, 1), shear_y, theta)
        shift = sign * frac * (2.0 * _MAX_TRANSLATE)  # normalised coordinates span 2
        move_x = theta.clone()
        move_x[:, 0, 2] = shift
        theta = torch.where(chosen["translate_x"].view(-1, 1, 1), move_x, theta)
        move_y = theta.clone()
        move_y[:, 1, 2] = shift
        return torch.where(chosen["translate_y"].view(-1, 1, 1), move_y, theta)

    # -- colour jitter -----------------------------------------------------------------------------------------

    def _color_jitter(self, x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
        """Brightness, contrast, saturation factors uniform in [max(0, 1 - s), 1 + s] per image, in that order."""
        s = self.aug.color_jitter
        lo, hi = max(0.0, 1.0 - s), 1.0 + s
        factors = lo + (hi - lo) * self._rand((3, x.shape[0]), g, x.device)  # (3, B)
        x = _blend(torch.zeros_like(x), x, factors[0])
        x = _blend(_grey(x).mean(dim=(2, 3), keepdim=True), x, factors[1])
        return _blend(_grey(x), x, factors[2])

    # -- random erasing ----------------------------------------------------------------------------------------

    def _erase(self, x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
        """With probability ``random_erasing`` per image, fill one random box with N(0, 1) noise."""
        b, c, h, w = x.shape
        dev = x.device
        draws = self._rand((4, b, _ERASE_ATTEMPTS), g, dev)  # area, log-ratio, top, left
        area = (_ERASE_AREA[0] + (_ERASE_AREA[1] - _ERASE_AREA[0]) * draws[0]) * (h * w)
        ratio = torch.exp(_ERASE_LOG_RATIO[0] + (_ERASE_LOG_RATIO[1] - _ERASE_LOG_RATIO[0]) * draws[1])
        eh = torch.sqrt(area * ratio).round().long()  # (B, T)
        ew = torch.sqrt(area / ratio).round().long()
        fits = (eh > 0) & (ew > 0) & (eh < h) & (ew < w)
        first = fits.int().argmax(dim=1, keepdim=True)  # first attempt that fits, (B, 1)
        eh, ew = eh.gather(1, first)[:, 0], ew.gather(1, first)[:, 0]  # (B,)
        top = (draws[2].gather(1, first)[:, 0] * (h - eh + 1)).long().clamp_(min=0)
        left = (draws[3].gather(1, first)[:, 0] * (w - ew + 1)).long().clamp_(min=0)
        erase = (self._rand((b,), g, dev) < self.aug.random_erasing) & fits.any(dim=1)  # (B,)
        rows = torch.arange(h, device=dev).view(1, h, 1)
        cols = torch.arange(w, device=dev).view(1, 1, w)
        inside = (
            (rows >= top.view(-1, 1, 1))
            & (rows < (top + eh).view(-1, 1, 1))
            & (cols >= left.view(-1, 1, 1))
            & (cols < (left + ew).view(-1, 1, 1))
        )  # (B, H, W)
        mask = (inside & erase.view(-1, 1, 1)).unsqueeze(1)  # (B, 1, H, W)
        noise = self._randn((b, c, h, w), g, dev)
        return torch.where(mask, noise, x)

    # -- mixup / cutmix ----------------------------------------------------------------------------------------

    def _mix(
        self, x: torch.Tensor, targets: torch.Tensor, rng: np.random.Generator
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Mixes image i with image B-1-i: cutmix with probability ``switch_prob`` when both are on."""
        aug = self.aug
        if aug.mixup_alpha > 0 and aug.cutmix_alpha > 0:
            use_cutmix = rng.random() < aug.switch_prob
        else:
            use_cutmix = aug.cutmix_alpha > 0
        alpha = aug.cutmix_alpha if use_cutmix else aug.mixup_alpha
        lam = float(rng.beta(alpha, alpha))
        flipped = x.flip(0)
        if use_cutmix:
            _, _, h, w = x.shape
            cut = math.sqrt(1.0 - lam)
            ch, cw = int(h * cut), int(w * cut)
            cy, cx = int(rng.integers(0, h)), int(rng.integers(0, w))
            y0, y1 = max(cy - ch // 2, 0), min(cy + ch // 2, h)
            x0, x1 = max(cx - cw // 2, 0), min(cx + cw // 2, w)
            x = x.clone()
            x[:, :, y0:y1, x0:x1] = flipped[:, :, y0:y1, x0:x1]
            lam = 1.0 - (y1 - y0) * (x1 - x0) / float(h * w)  # the area actually pasted
        else:
            x = x * lam + flipped * (1.0 - lam)
        return x, targets * lam + targets.flip(0) * (1.0 - lam)
