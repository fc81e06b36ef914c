"""Triton kernels of :class:`data_pipeline.augment.DeviceAugment`: RandAugment rounds, colour jitter, normalisation and
random erasing in a few launches per batch, each image computing only the op it drew.

Imported only by the augmentation's Triton path (CUDA tensors; on CPU tensors under Triton's interpreter,
``TRITON_INTERPRET=1`` set before triton is imported, which is how the tests run it against the torch path).

Launches per batch: one ``randaug_stats`` and one ``augment_apply`` per RandAugment round, plus ``jitter_stats`` and
an ``augment_apply`` for colour jitter; the first kernel reads the uint8 images, the last one normalises and erases.

- ``randaug_stats`` (one program per image): the per-image reductions the round's op needs, and nothing for the images
  whose op needs none (their programs return at once): channel min/max (autocontrast), mean luma (contrast), and the
  equalisation lookup table from the 256-level histogram of each channel.
- ``augment_apply`` (one program per image and tile of ``BLOCK`` pixels, all 3 channels): the image's op, chosen by a
  branch on the op it drew: the colour ops pointwise (sharpness reads the 3x3 neighbourhood), the five geometric ops
  as one bilinear resampling from an affine map built in the program (``affine_grid`` + ``grid_sample``'s formulas,
  zeros padding around ``x - fill``); then, where asked, colour jitter, ``(x - mean) / std`` and the erased box.
- ``jitter_stats`` (one program per image): the mean luma after the brightness factor, for the contrast factor.

The per-image draws are the generator's, in the torch path's order, and the derived magnitudes use the torch path's
float32 operations in its order; launches pass ``enable_fp_fusion=False`` and divisions and square roots are
correctly rounded, so the arithmetic differs from torch's only in reduction order and transcendental functions.

Each launch goes through a ``torch.library`` custom op (``vitpretrain::*``), so it is dispatched like an aten op:
:class:`pretrain.kernel_count.KernelCounter` counts one kernel per launch (as a GPU runs it), and nothing the
interpreter does inside a launch.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch
import triton
import triton.language as tl

from data_pipeline import augment as A

if TYPE_CHECKING:
    from data_pipeline.config import AugmentConfig

__all__ = ["augment_pixels"]

# op codes: positions in RANDAUG_OPS (module globals a kernel reads must be constexpr)
_C = tl.constexpr
AUTOCONTRAST, EQUALIZE, ROTATE, POSTERIZE, SOLARIZE = _C(0), _C(1), _C(2), _C(3), _C(4)
COLOR, CONTRAST, BRIGHTNESS, SHARPNESS = _C(5), _C(6), _C(7), _C(8)
SHEAR_X, SHEAR_Y, TRANSLATE_X, TRANSLATE_Y = _C(9), _C(10), _C(11), _C(12)
assert [A.RANDAUG_OPS.index(n) for n in ("rotate", "sharpness", "shear_x", "translate_y")] == [2, 8, 9, 12]
N_OPS = _C(len(A.RANDAUG_OPS))
BLOCK = 512  # pixels per program of augment_apply (x 3 channels)
STATS_BLOCK = 1024  # pixels per loop step of the per-image reductions
T_BLOCK = _C(16)  # erasing attempts, padded to a power of two
ROTATE_RAD = _C(math.radians(A._MAX_ROTATE_DEG))
SHEAR = _C(A._MAX_SHEAR)
ENHANCE = _C(A._MAX_ENHANCE)
TRANSLATE_SCALE = _C(2.0 * A._MAX_TRANSLATE)
SOLARIZE_SCALE = _C(256.0 / 255.0)
AREA_LO, AREA_SPAN = _C(A._ERASE_AREA[0]), _C(A._ERASE_AREA[1] - A._ERASE_AREA[0])
LOG_RATIO_LO = _C(A._ERASE_LOG_RATIO[0])
LOG_RATIO_SPAN = _C(A._ERASE_LOG_RATIO[1] - A._ERASE_LOG_RATIO[0])
LUMA_R, LUMA_G, LUMA_B = (_C(v) for v in A._LUMA)


# --------------------------------------------------------------------------------------------------- device helpers


@triton.jit
def _round_op(u_op_ptr, u_apply_ptr, z_ptr, u_sign_ptr, b, m, mstd):
    """The op (-1: none), magnitude in [0, 1] and sign image ``b`` drew in a round, from the round's four draws."""
    op = tl.minimum((tl.load(u_op_ptr + b) * 13.0).to(tl.int32), N_OPS - 1)  # (u * 13).long() in float32
    op = tl.where(tl.load(u_apply_ptr + b) < 0.5, op, -1)
    level = tl.minimum(tl.maximum(tl.load(z_ptr + b) * mstd + m, 0.0), 10.0)
    frac = tl.div_rn(level, 10.0)
    sign = tl.where(tl.load(u_sign_ptr + b) < 0.5, -1.0, 1.0)
    return op, frac, sign


@triton.jit
def _load(ptr, offs, mask, IN_U8: tl.constexpr):
    """Pixels in [0, 1]: uint8 / 255 (as ``images.float().div(255)``) or float32 as stored."""
    if IN_U8:
        return tl.div_rn(tl.load(ptr + offs, mask=mask, other=0).to(tl.float32), 255.0)
    return tl.load(ptr + offs, mask=mask, other=0.0)


@triton.jit
def _grey(r, g, b):
    return r * LUMA_R + g * LUMA_G + b * LUMA_B


@triton.jit
def _blend(deg, x, f):
    return tl.minimum(tl.maximum(deg + f * (x - deg), 0.0), 1.0)


@triton.jit
def _round_half_even(v):
    """``torch.round`` (ties to even), exactly: floor, then the fraction decides."""
    f = tl.floor(v)
    d = v - f
    odd = (f.to(tl.int32) & 1) == 1
    return tl.where((d > 0.5) | ((d == 0.5) & odd), f + 1.0, f)


@triton.jit
def _levels(x):
    """[0, 1] -> integer levels 0..255 (int32), as ``(x * 255).round().clamp(0, 255)``."""
    return tl.minimum(tl.maximum(_round_half_even(x * 255.0), 0.0), 255.0).to(tl.int32)


@triton.jit
def _smooth(ptr, offs, mask, py, px, H, W, xc, IN_U8: tl.constexpr):
    """PIL's SMOOTH on the interior: ``(avg_pool3x3 * 9 + 4 centre) / 13``; the 1-pixel border keeps ``xc``."""
    inner = mask & (py >= 1) & (py < H - 1) & (px >= 1) & (px < W - 1)
    total = tl.zeros_like(xc)
    for dy in tl.static_range(3):
        for dx in tl.static_range(3):
            total += _load(ptr, offs + (dy - 1) * W + (dx - 1), inner, IN_U8)
    box = tl.div_rn(total, 9.0) * 9.0
    return tl.where(inner, tl.div_rn(box + 4.0 * xc, 13.0), xc)


@triton.jit
def _bilinear(ptr, ix, iy, mask, H, W, fill, IN_U8: tl.constexpr):
    """``grid_sample`` (bilinear, zeros padding, align_corners=False) of ``x - fill`` at source pixel coordinates
    (``ix``, ``iy``), plus ``fill``."""
    x0 = tl.floor(ix)
    y0 = tl.floor(iy)
    x1 = x0 + 1.0
    y1 = y0 + 1.0
    w_nw = (x1 - ix) * (y1 - iy)
    w_ne = (ix - x0) * (y1 - iy)
    w_sw = (x1 - ix) * (iy - y0)
    w_se = (ix - x0) * (iy - y0)
    xi0 = x0.to(tl.int32)
    yi0 = y0.to(tl.int32)
    in_x0 = (xi0 >= 0) & (xi0 < W)
    in_x1 = (xi0 + 1 >= 0) & (xi0 + 1 < W)
    in_y0 = (yi0 >= 0) & (yi0 < H)
    in_y1 = (yi0 + 1 >= 0) & (yi0 + 1 < H)
    base = yi0 * W + xi0
    m = mask & in_y0 & in_x0
    v_nw = tl.where(m, _load(ptr, base, m, IN_U8) - fill, 0.0)
    m = mask & in_y0 & in_x1
    v_ne = tl.where(m, _load(ptr, base + 1, m, IN_U8) - fill, 0.0)
    m = mask & in_y1 & in_x0
    v_sw = tl.where(m, _load(ptr, base + W, m, IN_U8) - fill, 0.0)
    m = mask & in_y1 & in_x1
    v_se = tl.where(m, _load(ptr, base + W + 1, m, IN_U8) - fill, 0.0)
    return v_nw * w_nw + v_ne * w_ne + v_sw * w_sw + v_se * w_se + fill


@triton.jit
def _linspace_coord(i, n):
    """``affine_grid``'s base coordinate of pixel ``i`` of ``n``: ``linspace(-1, 1, n)[i] * (n - 1) / n``."""
    nf = n.to(tl.float32)
    step = tl.div_rn(2.0, tl.maximum(nf - 1.0, 1.0))
    fi = i.to(tl.float32)
    v = tl.where(i < n // 2, -1.0 + step * fi, 1.0 - step * (nf - 1.0 - fi))
    v = tl.where(n == 1, -1.0, v)
    return tl.div_rn(v * (nf - 1.0), nf)


# --------------------------------------------------------------------------------------------------------- kernels


# runtime sizes are never specialised: a batch or image side of 1 would turn them into constexprs
@triton.jit(do_not_specialize=["HW"])
def _randaug_stats_kernel(
    x_ptr, u_op_ptr, u_apply_ptr, z_ptr, u_sign_ptr, lo_ptr, hi_ptr, mean_ptr, lut_ptr, m, mstd, HW,
    IN_U8: tl.constexpr, BLOCK_S: tl.constexpr,
):  # fmt: skip
    b = tl.program_id(0)
    op, frac, sign = _round_op(u_op_ptr, u_apply_ptr, z_ptr, u_sign_ptr, b, m, mstd)
    img = x_ptr + b.to(tl.int64) * 3 * HW
    offs0 = tl.arange(0, BLOCK_S)
    if op == AUTOCONTRAST:
        for c in tl.static_range(3):
            lo = tl.full((BLOCK_S,), float("inf"), tl.float32)
            hi = tl.full((BLOCK_S,), float("-inf"), tl.float32)
            for start in range(0, HW, BLOCK_S):
                offs = start + offs0
                mask = offs < HW
                v = _load(img + c * HW, offs, mask, IN_U8)
                lo = tl.minimum(lo, tl.where(mask, v, float("inf")))
                hi = tl.maximum(hi, tl.where(mask, v, float("-inf")))
            tl.store(lo_ptr + b * 3 + c, tl.min(lo, 0))
            tl.store(hi_ptr + b * 3 + c, tl.max(hi, 0))
    if op == CONTRAST:
        acc = tl.zeros((BLOCK_S,), tl.float32)
        for start in range(0, HW, BLOCK_S):
            offs = start + offs0
            mask = offs < HW
            r = _load(img, offs, mask, IN_U8)
            g = _load(img + HW, offs, mask, IN_U8)
            bl = _load(img + 2 * HW, offs, mask, IN_U8)
            acc += tl.where(mask, _grey(r, g, bl), 0.0)
        tl.store(mean_ptr + b, tl.div_rn(tl.sum(acc, 0), HW.to(tl.float32)))
    if op == EQUALIZE:
        bins = tl.arange(0, 256)
        padded = tl.cdiv(HW, BLOCK_S) * BLOCK_S - HW  # lanes past the image, counted in bin 0 below
        for c in tl.static_range(3):
            hist = tl.zeros((256,), tl.int32)
            top = tl.zeros((BLOCK_S,), tl.int32)
            for start in range(0, HW, BLOCK_S):
                offs = start + offs0
                mask = offs < HW
                lv = tl.where(mask, _levels(_load(img + c * HW, offs, mask, IN_U8)), 0)
                hist += tl.histogram(lv, 256)
                top = tl.maximum(top, lv)
            hist -= tl.where(bins == 0, padded, 0)
            last = tl.sum(tl.where(bins == tl.max(top, 0), hist, 0), 0)  # count of the highest level present
            step = (HW - last) // 255
            safe = tl.maximum(step, 1)
            below = tl.cumsum(hist, 0) - hist
            lut = tl.minimum((below + safe // 2) // safe, 255)
            lut = tl.where(step > 0, lut, bins)  # a near-constant channel is left alone
            tl.store(lut_ptr + (b * 3 + c) * 256 + bins, lut)


@triton.jit(do_not_specialize=["B", "HW"])
def _jitter_stats_kernel(x_ptr, f_ptr, mean_ptr, B, HW, lo, span, IN_U8: tl.constexpr, BLOCK_S: tl.constexpr):
    b = tl.program_id(0)
    f0 = tl.load(f_ptr + b) * span + lo
    img = x_ptr + b.to(tl.int64) * 3 * HW
    offs0 = tl.arange(0, BLOCK_S)
    acc = tl.zeros((BLOCK_S,), tl.float32)
    for start in range(0, HW, BLOCK_S):
        offs = start + offs0
        mask = offs < HW
        r = _blend(0.0, _load(img, offs, mask, IN_U8), f0)
        g = _blend(0.0, _load(img + HW, offs, mask, IN_U8), f0)
        bl = _blend(0.0, _load(img + 2 * HW, offs, mask, IN_U8), f0)
        acc += tl.where(mask, _grey(r, g, bl), 0.0)
    tl.store(mean_ptr + b, tl.div_rn(tl.sum(acc, 0), HW.to(tl.float32)))


@triton.jit
def _colour_op(op, x, c, img, offs, mask, py, px, H, W, HW, b, frac, enhance, grey, mean_grey, lo_ptr, hi_ptr,
               lut_ptr, IN_U8: tl.constexpr):  # fmt: skip
    """Channel ``c`` (values ``x``) of the colour op ``op``; ``x`` itself for any other op."""
    y = x
    if op == BRIGHTNESS:
        y = _blend(0.0, x, enhance)
    if op == COLOR:
        y = _blend(grey, x, enhance)
    if op == CONTRAST:
        y = _blend(mean_grey, x, enhance)
    if op == SHARPNESS:
        y = _blend(_smooth(img + c * HW, offs, mask, py, px, H, W, x, IN_U8), x, enhance)
    if op == AUTOCONTRAST:
        lo = tl.load(lo_ptr + b * 3 + c)
        span = tl.load(hi_ptr + b * 3 + c) - lo
        y = tl.where(span > 0, tl.div_rn(x - lo, tl.maximum(span, 1e-12)), x)
    if op == EQUALIZE:
        lut = tl.load(lut_ptr + (b * 3 + c) * 256 + _levels(x), mask=mask, other=0)
        y = tl.div_rn(lut.to(tl.float32), 255.0)
    if op == POSTERIZE:
        q = (1 << _round_half_even(4.0 * frac).to(tl.int32)).to(tl.float32)
        y = tl.div_rn(tl.floor(tl.div_rn(_levels(x).to(tl.float32), q)) * q, 255.0)
    if op == SOLARIZE:
        y = tl.where(x >= SOLARIZE_SCALE * (1.0 - frac), 1.0 - x, x)
    return y


@triton.jit
def _geometric(op, img, offs, mask, py, px, H, W, HW, frac, sign, fill0, fill1, fill2, IN_U8: tl.constexpr):
    """The three channels of the geometric op ``op``: one affine map (output -> input, normalised), resampled."""
    hf = H.to(tl.float32)
    wf = W.to(tl.float32)
    angle = sign * frac * ROTATE_RAD
    cos = tl.cos(angle)
    sin = tl.sin(angle)
    shear = sign * frac * SHEAR
    shift = sign * frac * TRANSLATE_SCALE
    rot = op == ROTATE
    t00 = tl.where(rot, cos, 1.0)
    t01 = tl.where(rot, tl.div_rn(-sin * hf, wf), tl.where(op == SHEAR_X, tl.div_rn(shear * hf, wf), 0.0))
    t02 = tl.where(op == TRANSLATE_X, shift, 0.0)
    t10 = tl.where(rot, tl.div_rn(sin * wf, hf), tl.where(op == SHEAR_Y, tl.div_rn(shear * wf, hf), 0.0))
    t11 = tl.where(rot, cos, 1.0)
    t12 = tl.where(op == TRANSLATE_Y, shift, 0.0)
    bx = _linspace_coord(px, W)
    by = _linspace_coord(py, H)
    gx = bx * t00 + by * t01 + t02
    gy = bx * t10 + by * t11 + t12
    ix = tl.div_rn((gx + 1.0) * wf - 1.0, 2.0)  # grid_sample's unnormalisation, align_corners=False
    iy = tl.div_rn((gy + 1.0) * hf - 1.0, 2.0)
    r = _bilinear(img, ix, iy, mask, H, W, fill0, IN_U8)
    g = _bilinear(img + HW, ix, iy, mask, H, W, fill1, IN_U8)
    bl = _bilinear(img + 2 * HW, ix, iy, mask, H, W, fill2, IN_U8)
    return r, g, bl


@triton.jit
def _erase_box(ed_ptr, ef_ptr, b, B, H, W, prob, T: tl.constexpr):
    """Image ``b``'s random-erasing box (top, height, left, width; height 0 where the image is not erased): the first
    of ``T`` attempts that fits, as the torch path draws and rounds it."""
    tt = tl.arange(0, T_BLOCK)
    tm = tt < T
    row = b * T + tt
    d0 = tl.load(ed_ptr + row, mask=tm, other=0.0)
    d1 = tl.load(ed_ptr + B * T + row, mask=tm, other=0.0)
    d2 = tl.load(ed_ptr + 2 * B * T + row, mask=tm, other=0.0)
    d3 = tl.load(ed_ptr + 3 * B * T + row, mask=tm, other=0.0)
    area = (d0 * AREA_SPAN + AREA_LO) * (H * W).to(tl.float32)
    ratio = tl.exp(d1 * LOG_RATIO_SPAN + LOG_RATIO_LO)
    eh = _round_half_even(tl.sqrt_rn(area * ratio)).to(tl.int32)
    ew = _round_half_even(tl.sqrt_rn(tl.div_rn(area, ratio))).to(tl.int32)
    fits = tm & (eh > 0) & (ew > 0) & (eh < H) & (ew < W)
    first = tl.min(tl.where(fits, tt, T_BLOCK), 0)
    erase = (first < T_BLOCK) & (tl.load(ef_ptr + b) < prob)
    first = tl.where(first < T_BLOCK, first, 0)  # argmax of no fit: attempt 0
    pick = tt == first
    eh1 = tl.sum(tl.where(pick, eh, 0), 0)
    ew1 = tl.sum(tl.where(pick, ew, 0), 0)
    top = tl.maximum((tl.sum(tl.where(pick, d2, 0.0), 0) * (H - eh1 + 1).to(tl.float32)).to(tl.int32), 0)
    left = tl.maximum((tl.sum(tl.where(pick, d3, 0.0), 0) * (W - ew1 + 1).to(tl.float32)).to(tl.int32), 0)
    return top, tl.where(erase, eh1, 0), left, ew1  # no box where nothing is erased


@triton.jit(do_not_specialize=["B", "H", "W"])
def _apply_kernel(
    x_ptr, out_ptr,
    u_op_ptr, u_apply_ptr, z_ptr, u_sign_ptr, lo_ptr, hi_ptr, mean_ptr, lut_ptr, m, mstd, fill0, fill1, fill2,
    jf_ptr, jmean_ptr, j_lo, j_span,
    mean0, mean1, mean2, std0, std1, std2,
    ed_ptr, ef_ptr, noise_ptr, erase_prob,
    B, H, W,
    IN_U8: tl.constexpr, RANDAUG: tl.constexpr, JITTER: tl.constexpr, NORMALIZE: tl.constexpr, ERASE: tl.constexpr,
    T: tl.constexpr, BLOCK_P: tl.constexpr,
):  # fmt: skip
    b = tl.program_id(0)
    HW = H * W
    offs = tl.program_id(1) * BLOCK_P + tl.arange(0, BLOCK_P)
    mask = offs < HW
    py = offs // W
    px = offs % W
    img = x_ptr + b.to(tl.int64) * 3 * HW
    r = _load(img, offs, mask, IN_U8)
    g = _load(img + HW, offs, mask, IN_U8)
    bl = _load(img + 2 * HW, offs, mask, IN_U8)
    if RANDAUG:
        op, frac, sign = _round_op(u_op_ptr, u_apply_ptr, z_ptr, u_sign_ptr, b, m, mstd)
        if (op == ROTATE) | (op >= SHEAR_X):
            r, g, bl = _geometric(op, img, offs, mask, py, px, H, W, HW, frac, sign, fill0, fill1, fill2, IN_U8)
        elif op >= 0:
            enhance = sign * ENHANCE * frac + 1.0
            grey = _grey(r, g, bl)
            mean_grey = tl.load(mean_ptr + b, mask=op == CONTRAST, other=0.0)
            r = _colour_op(op, r, 0, img, offs, mask, py, px, H, W, HW, b, frac, enhance, grey, mean_grey, lo_ptr,
                           hi_ptr, lut_ptr, IN_U8)  # fmt: skip
            g = _colour_op(op, g, 1, img, offs, mask, py, px, H, W, HW, b, frac, enhance, grey, mean_grey, lo_ptr,
                           hi_ptr, lut_ptr, IN_U8)  # fmt: skip
            bl = _colour_op(op, bl, 2, img, offs, mask, py, px, H, W, HW, b, frac, enhance, grey, mean_grey, lo_ptr,
                            hi_ptr, lut_ptr, IN_U8)  # fmt: skip
    if JITTER:  # brightness, contrast, saturation, as DeviceAugment._color_jitter
        f0 = tl.load(jf_ptr + b) * j_span + j_lo
        f1 = tl.load(jf_ptr + B + b) * j_span + j_lo
        f2 = tl.load(jf_ptr + 2 * B + b) * j_span + j_lo
        r = _blend(0.0, r, f0)
        g = _blend(0.0, g, f0)
        bl = _blend(0.0, bl, f0)
        jm = tl.load(jmean_ptr + b)
        r = _blend(jm, r, f1)
        g = _blend(jm, g, f1)
        bl = _blend(jm, bl, f1)
        grey = _grey(r, g, bl)
        r = _blend(grey, r, f2)
        g = _blend(grey, g, f2)
        bl = _blend(grey, bl, f2)
    if NORMALIZE:
        r = tl.div_rn(r - mean0, std0)
        g = tl.div_rn(g - mean1, std1)
        bl = tl.div_rn(bl - mean2, std2)
    out = out_ptr + b.to(tl.int64) * 3 * HW
    if ERASE:
        top, eh, left, ew = _erase_box(ed_ptr, ef_ptr, b, B, H, W, erase_prob, T)
        inside = mask & (py >= top) & (py < top + eh) & (px >= left) & (px < left + ew)
        noise = noise_ptr + b.to(tl.int64) * 3 * HW
        r = tl.where(inside, tl.load(noise + offs, mask=inside, other=0.0), r)
        g = tl.where(inside, tl.load(noise + HW + offs, mask=inside, other=0.0), g)
        bl = tl.where(inside, tl.load(noise + 2 * HW + offs, mask=inside, other=0.0), bl)
    tl.store(out + offs, r, mask=mask)
    tl.store(out + HW + offs, g, mask=mask)
    tl.store(out + 2 * HW + offs, bl, mask=mask)


# ---------------------------------------------------------------------------------------------------- launches


def _check(x: torch.Tensor) -> None:
    if x.device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        raise RuntimeError(
            f"the Triton augmentation runs on CUDA tensors (or on CPU under TRITON_INTERPRET=1), got {x.device}"
        )


@torch.library.custom_op("vitpretrain::randaug_stats", mutates_args=())
def randaug_stats(
    x: torch.Tensor, draws: list[torch.Tensor], m: float, mstd: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-image reductions of one RandAugment round: channel min and max (B, 3), mean luma (B,), equalisation
    lookup tables int32 (B, 3, 256); entries of images whose op needs none are left unwritten."""
    _check(x)
    b, _, h, w = x.shape
    lo = torch.empty((b, 3), dtype=torch.float32, device=x.device)
    hi, mean = torch.empty_like(lo), torch.empty((b,), dtype=torch.float32, device=x.device)
    lut = torch.empty((b, 3, 256), dtype=torch.int32, device=x.device)
    _randaug_stats_kernel[(b,)](
        x, *draws, lo, hi, mean, lut, m, mstd, h * w,
        IN_U8=x.dtype == torch.uint8, BLOCK_S=STATS_BLOCK, num_warps=4, enable_fp_fusion=False,
    )  # fmt: skip
    return lo, hi, mean, lut


@torch.library.custom_op("vitpretrain::jitter_stats", mutates_args=())
def jitter_stats(x: torch.Tensor, factors: torch.Tensor, lo: float, span: float) -> torch.Tensor:
    """Mean luma (B,) of each image after colour jitter's brightness factor ``lo + span * factors[0]``."""
    _check(x)
    b, _, h, w = x.shape
    mean = torch.empty((b,), dtype=torch.float32, device=x.device)
    _jitter_stats_kernel[(b,)](
        x, factors, mean, b, h * w, lo, span,
        IN_U8=x.dtype == torch.uint8, BLOCK_S=STATS_BLOCK, num_warps=4, enable_fp_fusion=False,
    )  # fmt: skip
    return mean


@torch.library.custom_op("vitpretrain::augment_apply", mutates_args=())
def augment_apply(
    x: torch.Tensor,
    draws: list[torch.Tensor],
    stats: list[torch.Tensor],
    m: float,
    mstd: float,
    fill: list[float],
    jitter: list[torch.Tensor],
    jitter_lo: float,
    jitter_span: float,
    norm: list[float],
    erase: list[torch.Tensor],
    erase_prob: float,
) -> torch.Tensor:
    """One pass over the pixels: the RandAugment round of ``draws`` (with its ``stats``), colour jitter (``jitter``:
    factors (3, B) and ``jitter_stats``), ``(x - mean) / std`` (``norm`` = mean + std) and random erasing (``erase``:
    box draws (4, B, T), erase draws (B,), noise (B, 3, H, W)); an empty list skips its stage. float32 (B, 3, H, W)."""
    _check(x)
    b, _, h, w = x.shape
    out = torch.empty((b, 3, h, w), dtype=torch.float32, device=x.device)
    none = out  # the pointer of a stage that is off: never read
    u_op, u_apply, z, u_sign = draws or [none] * 4
    lo, hi, mean, lut = stats or [none] * 4
    jf, jmean = jitter or [none] * 2
    ed, ef, noise = erase or [none] * 3
    norm_args = norm or [0.0, 0.0, 0.0, 1.0, 1.0, 1.0]
    fill_args = fill or [0.0, 0.0, 0.0]
    _apply_kernel[(b, triton.cdiv(h * w, BLOCK))](
        x, out, u_op, u_apply, z, u_sign, lo, hi, mean, lut, m, mstd, *fill_args,
        jf, jmean, jitter_lo, jitter_span, *norm_args, ed, ef, noise, erase_prob, b, h, w,
        IN_U8=x.dtype == torch.uint8, RANDAUG=bool(draws), JITTER=bool(jitter), NORMALIZE=bool(norm),
        ERASE=bool(erase), T=A._ERASE_ATTEMPTS, BLOCK_P=BLOCK, num_warps=4, enable_fp_fusion=False,
    )  # fmt: skip
    return out


def augment_pixels(
    images: torch.Tensor, g: torch.Generator, aug: AugmentConfig, mean: Sequence[float], std: Sequence[float]
) -> torch.Tensor:
    """uint8 (B, 3, H, W) -> RandAugment, colour jitter, normalisation, random erasing: float32 (B, 3, H, W).

    Draws from ``g`` what the torch path draws, in its order (on ``g``'s device, moved to the images' if another).
    """
    b, _, h, w = images.shape
    dev = images.device

    def rand(*shape: int, normal: bool = False) -> torch.Tensor:
        return (torch.randn if normal else torch.rand)(shape, generator=g, device=g.device).to(dev)

    rounds = [[rand(b), rand(b), rand(b, normal=True), rand(b)] for _ in range(aug.randaug_n)]
    jitter = [rand(3, b)] if aug.color_jitter > 0 else []
    erase = []
    if aug.random_erasing > 0:
        erase = [rand(4, b, A._ERASE_ATTEMPTS), rand(b), rand(b, 3, h, w, normal=True)]
    s = aug.color_jitter
    j_lo = max(0.0, 1.0 - s)
    j_span = (1.0 + s) - j_lo
    m, mstd, p = float(aug.randaug_m), float(aug.randaug_mstd), float(aug.random_erasing)
    norm, fill = [*mean, *std], list(mean)
    ops = torch.ops.vitpretrain
    x = images.contiguous()
    for i, draws in enumerate(rounds):
        last = i == len(rounds) - 1 and not jitter
        stats = list(ops.randaug_stats(x, draws, m, mstd))
        x = ops.augment_apply(
            x, draws, stats, m, mstd, fill, [], 0.0, 0.0, norm if last else [], erase if last else [], p
        )  # (B, 3, H, W) float32
    if jitter or not rounds:
        jitter_args = [jitter[0], ops.jitter_stats(x, jitter[0], j_lo, j_span)] if jitter else []
        x = ops.augment_apply(x, [], [], m, mstd, fill, jitter_args, j_lo, j_span, norm, erase, p)
    return x
