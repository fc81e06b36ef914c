"""CPU transforms run in DataLoader workers: decode, crop, resize, flip -> ``uint8 (3, S, S)``.

Everything that costs per pixel (RandAugment-like ops, mixup/cutmix, erasing, normalisation) runs batched on the
training device (``data_pipeline.augment``); the workers only produce small uint8 crops.

Speed, per image (the decode dominates, see ``benchmarks/data.py``):

- JPEG is decoded by ``simplejpeg`` (libjpeg-turbo, ~1.4x faster than Pillow's path) when it is installed, else by
  Pillow. Other formats go through Pillow. Formats are recognised by content, not by the extension.
- The crop box is chosen from the JPEG header before decoding; when the crop is at least 2x, 4x or 8x the output
  size, the JPEG is decoded at 1/2, 1/4 or 1/8 scale in the DCT domain (cheaper decode, smaller resize).
- Only the crop box of a JPEG is decoded, by the C extension ``data_pipeline._jpeg_roi`` (libjpeg-turbo's
  ``jpeg_crop_scanline`` and ``jpeg_skip_scanlines``; rows below the box are never decoded). Its pixels equal those of
  a full decode, cropped. Without the extension (built at install where libjpeg-turbo's headers are), or for a JPEG
  it refuses, the whole image is decoded and cropped as above. Damage to the data below the box goes unnoticed; a
  truncated file still fails, as the ROI path needs the end-of-image marker.
- Only the crop is resized, by ``torch.nn.functional.interpolate`` on uint8 with antialiasing (SIMD kernels,
  4-5x faster than Pillow's resample), straight from the decoder's HWC buffer without a copy.
- The resized crop is copied once, doing the CHW layout change and the flip in the same copy, into ``out`` when the
  caller passes one (the stream passes its batch row, already in shared memory in a DataLoader worker).

All randomness comes from the ``numpy.random.Generator`` the stream passes per sample, never from global state,
so a resumed run decodes bit-identical crops. As in the usual ImageNet pipelines, EXIF orientation is not applied.
"""

from __future__ import annotations

import io
import logging
import math
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from data_pipeline.errors import DECODE_ERROR, MISSING_IMAGE, CorruptSample

try:  # optional fast JPEG decoder; Pillow is the fallback
    import simplejpeg
except ImportError:  # pragma: no cover - depends on the environment
    simplejpeg = None

try:  # optional crop-box JPEG decoder (C extension of this package, see setup.py); full decodes are the fallback
    from data_pipeline import _jpeg_roi
except ImportError:  # pragma: no cover - depends on the build
    _jpeg_roi = None

if TYPE_CHECKING:
    from data_pipeline.config import AugmentConfig

__all__ = [
    "EvalTransform",
    "TrainTransform",
    "build_transforms",
    "center_crop_box",
    "decode_rgb",
    "random_resized_crop_box",
]

logger = logging.getLogger(__name__)

INTERPOLATIONS = ("bilinear", "bicubic")
_JPEG_MAGIC = b"\xff\xd8\xff"
_JPEG_EOI = b"\xff\xd9"  # end-of-image marker: a JPEG that lacks it is truncated
_DCT_SCALES = (8, 4, 2)  # libjpeg-turbo's fast power-of-two downscales; others (e.g. 5/8) decode slower than 1/1
_RRC_ATTEMPTS = 10  # tries at a random (area, ratio) before falling back to a centre crop

Box = tuple[int, int, int, int]  # (x, y, w, h) in pixels of the full-size image


# ------------------------------------------------------------------------------------------------------ crop boxes


def random_resized_crop_box(
    width: int, height: int, scale: tuple[float, float], ratio: tuple[float, float], rng: np.random.Generator
) -> Box:
    """Samples a RandomResizedCrop box: area fraction uniform in ``scale``, aspect ratio log-uniform in ``ratio``.

    Up to 10 tries for a box that fits the image; otherwise the largest centred box whose ratio is clamped to
    ``ratio``.

    Returns:
        ``(x, y, w, h)`` in pixels.
    """
    area = width * height
    log_lo, log_hi = math.log(ratio[0]), math.log(ratio[1])
    for _ in range(_RRC_ATTEMPTS):
        target_area = area * rng.uniform(scale[0], scale[1])
        aspect = math.exp(rng.uniform(log_lo, log_hi))
        w = int(round(math.sqrt(target_area * aspect)))
        h = int(round(math.sqrt(target_area / aspect)))
        if 0 < w <= width and 0 < h <= height:
            x = int(rng.integers(0, width - w + 1))
            y = int(rng.integers(0, height - h + 1))
            return x, y, w, h
    in_ratio = width / height
    if in_ratio < ratio[0]:
        w, h = width, max(1, int(round(width / ratio[0])))
    elif in_ratio > ratio[1]:
        w, h = max(1, int(round(height * ratio[1]))), height
    else:
        w, h = width, height
    return (width - w) // 2, (height - h) // 2, w, h


def center_crop_box(width: int, height: int, img_size: int, crop_ratio: float) -> Box:
    """The box that "resize the shorter side to ``floor(img_size / crop_ratio)``, centre crop ``img_size``" keeps.

    Returns:
        ``(x, y, w, h)`` in pixels of the full-size image (a square).
    """
    resized_short = math.floor(img_size / crop_ratio)
    side = min(width, height) * img_size / resized_short  # the crop, in full-size pixels
    side_px = max(1, min(width, height, int(round(side))))
    return (width - side_px) // 2, (height - side_px) // 2, side_px, side_px


# -------------------------------------------------------------------------------------------------------- decoding


def _reduction(box: Box, out_size: int) -> int:
    """Largest DCT downscale (8, 4, 2 or 1) that still leaves the crop at least ``out_size`` on both sides."""
    for k in _DCT_SCALES:
        if box[2] >= k * out_size and box[3] >= k * out_size:
            return k
    return 1


def _scaled_box(box: Box, k: int, width: int, height: int) -> tuple[int, int, int, int]:
    """``box`` in pixels of the image decoded at 1/k, ``width`` x ``height``: ``(x0, y0, x1, y1)``, at least 1x1.

    DCT scaling shrinks by exactly 1/k (the last row/column may be partial): the box maps with 1/k, not H'/H.
    """
    x0 = min(int(round(box[0] / k)), width - 1)
    y0 = min(int(round(box[1] / k)), height - 1)
    x1 = max(x0 + 1, min(int(round((box[0] + box[2]) / k)), width))
    y1 = max(y0 + 1, min(int(round((box[1] + box[3]) / k)), height))
    return x0, y0, x1, y1


def _pil_to_rgb(img: Image.Image) -> np.ndarray:
    """Any Pillow mode -> (H, W, 3) uint8: grey and palette expanded, alpha dropped, 16-bit scaled to 8."""
    if img.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        a = np.asarray(img, dtype=np.float64)
        if a.size and a.max() > 255:
            a = a / 257.0  # 16-bit range -> 8-bit
        grey = np.clip(np.rint(a), 0, 255).astype(np.uint8)
        return np.repeat(grey[..., None], 3, axis=-1)
    if img.mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")  # Pillow asks palette transparency to go through RGBA
    if img.mode != "RGB":
        img = img.convert("RGB")
    a = np.asarray(img)  # (H, W, 3)
    return a if a.flags.writeable else a.copy()


class _Image:
    """An encoded image whose size is known (from the header) before its pixels are decoded."""

    def __init__(self, data: bytes):
        if not data:
            raise CorruptSample(MISSING_IMAGE, "empty image payload")
        self.data = data
        self.pil: Image.Image | None = None
        self.max_pixels = 2 * (Image.MAX_IMAGE_PIXELS or 0)  # Pillow's decompression-bomb rule; 0: no limit
        try:
            if simplejpeg is not None and data[:3] == _JPEG_MAGIC:
                height, width, colorspace, _ = simplejpeg.decode_jpeg_header(data)
                if colorspace not in ("CMYK", "YCCK"):  # libjpeg-turbo cannot convert those to RGB: Pillow can
                    self.width, self.height = int(width), int(height)
                    if self.max_pixels and self.width * self.height > self.max_pixels:
                        raise ValueError(f"{self.width}x{self.height} pixels exceeds the limit of {self.max_pixels}")
                    return
            self.pil = Image.open(io.BytesIO(data))
            self.width, self.height = self.pil.size
        except Exception as e:  # Pillow and simplejpeg raise many types on garbage
            raise CorruptSample(DECODE_ERROR, f"unreadable image header ({type(e).__name__}: {e})") from None
        if self.width < 1 or self.height < 1:
            raise CorruptSample(DECODE_ERROR, f"image of size {self.width}x{self.height}")

    def decode(self, reduce: int = 1) -> np.ndarray:
        """Pixels as (H', W', 3) uint8, H' = ceil(H / r), W' = ceil(W / r), for a power of two r <= ``reduce``
        (DCT scaling where the decoder has it, else r = 1)."""
        try:
            if self.pil is None:
                try:
                    return simplejpeg.decode_jpeg(
                        self.data,
                        colorspace="RGB",
                        min_height=-(-self.height // reduce),
                        min_width=-(-self.width // reduce),
                    )  # (H', W', 3)
                except ValueError:  # rare JPEG features libjpeg-turbo refuses: give Pillow a try before failing
                    self.pil = Image.open(io.BytesIO(self.data))
            if reduce > 1 and self.pil.format in ("JPEG", "MPO"):
                # Pillow picks the largest of 1/8, 1/4, 1/2 that keeps the image >= this size: at most 1/reduce
                self.pil.draft("RGB", (max(1, self.width // reduce), max(1, self.height // reduce)))
            self.pil.load()
            return _pil_to_rgb(self.pil)
        except CorruptSample:
            raise
        except Exception as e:
            raise CorruptSample(DECODE_ERROR, f"{type(e).__name__}: {e}") from None

    def decode_box(self, box: Box, reduce: int = 1) -> np.ndarray:
        """Pixels of ``box`` as (h, w, 3) uint8, decoded at 1/r for a power of two r <= ``reduce`` (as ``decode``),
        the box mapped by 1/r. The same pixels whichever decoder runs."""
        if self.pil is None and _jpeg_roi is not None and self.data[-2:] == _JPEG_EOI:
            # rows below the box are not read: a truncated file (no end-of-image marker) takes the full decode and fails
            width, height = -(-self.width // reduce), -(-self.height // reduce)  # libjpeg's size at 1/reduce
            x0, y0, x1, y1 = _scaled_box(box, reduce, width, height)
            try:
                rgb, offset, span = _jpeg_roi.decode_roi(
                    self.data, x0, y0, x1 - x0, y1 - y0, reduce, max_pixels=self.max_pixels
                )  # the box's rows, over a span of block columns that covers it
            except ValueError:
                pass  # corrupt (libjpeg warnings included) or unsupported: the full decode fails or copes, as before
            else:
                rows = np.frombuffer(rgb, np.uint8).reshape(y1 - y0, span, 3)  # writable: rgb is a bytearray
                return rows[:, offset : offset + x1 - x0]
        pixels = self.decode(reduce)  # (H', W', 3)
        # the scale actually used: Pillow's draft may pick a smaller reduction than asked
        k = 2 ** round(math.log2(max(self.width / pixels.shape[1], self.height / pixels.shape[0])))
        x0, y0, x1, y1 = _scaled_box(box, k, pixels.shape[1], pixels.shape[0])
        return pixels[y0:y1, x0:x1]


def decode_rgb(data: bytes, ext: str = "") -> np.ndarray:
    """Decodes an encoded image (any format Pillow reads; ``ext`` is only a hint) to (H, W, 3) uint8.

    Raises:
        CorruptSample: With reason ``decode_error`` (or ``missing_image`` for empty data).
    """
    return _Image(data).decode()


def _check_out(out: torch.Tensor, out_size: int) -> None:
    if out.dtype != torch.uint8 or tuple(out.shape) != (3, out_size, out_size) or out.device.type != "cpu":
        raise ValueError(
            f"out must be a CPU uint8 tensor (3, {out_size}, {out_size}); got {out.device.type} {out.dtype} "
            f"{tuple(out.shape)}"
        )


def _crop_resize(
    img: _Image, box: Box, out_size: int, interpolation: str, flip: bool = False, out: torch.Tensor | None = None
) -> torch.Tensor:
    """Decodes ``box`` at the smallest DCT scale that covers it at ``out_size``, resizes -> (3, S, S) uint8.

    The result is written into ``out`` when given (a batch row, say) and returned; else into a new tensor.
    """
    if out is not None:
        _check_out(out, out_size)
    pixels = img.decode_box(box, _reduction(box, out_size))  # (h, w, 3) uint8
    crop = torch.from_numpy(pixels).permute(2, 0, 1).unsqueeze(0)  # (1, 3, h, w) view of HWC
    if crop.shape[2:] == (out_size, out_size):
        resized = crop[0]  # (3, S, S) view of the decoder's HWC buffer
    else:
        # a channels-last copy of the crop puts interpolate on its vectorised uint8 path (~1.4x faster than the view)
        crop = crop.contiguous(memory_format=torch.channels_last)
        resized = F.interpolate(crop, size=(out_size, out_size), mode=interpolation, antialias=True)[0]  # HWC memory
    if out is None:
        out = torch.empty(3, out_size, out_size, dtype=torch.uint8)
    # One copy does the HWC -> CHW layout change and the flip: numpy copies from the reversed view (negative stride,
    # which torch lacks) as fast as a plain copy.
    src = resized.numpy()  # (3, S, S)
    np.copyto(out.numpy(), src[..., ::-1] if flip else src)
    return out


# ------------------------------------------------------------------------------------------------------ transforms


def _check_interpolation(interpolation: str) -> None:
    if interpolation not in INTERPOLATIONS:
        raise ValueError(f"interpolation={interpolation!r} must be one of {list(INTERPOLATIONS)}")


class TrainTransform:
    """Decode, RandomResizedCrop to ``img_size``, horizontal flip -> ``uint8 (3, img_size, img_size)``.

    Args:
        img_size: Output side.
        scale: Range of the crop's area as a fraction of the image.
        ratio: Range of the crop's aspect ratio (w / h), sampled log-uniformly.
        hflip: Probability of a horizontal flip.
        interpolation: ``bilinear`` or ``bicubic`` (antialiased when downscaling).
    """

    def __init__(
        self,
        img_size: int,
        scale: tuple[float, float] = (0.08, 1.0),
        ratio: tuple[float, float] = (3 / 4, 4 / 3),
        hflip: float = 0.5,
        interpolation: str = "bicubic",
    ):
        if img_size <= 0:
            raise ValueError(f"img_size={img_size} must be positive")
        if not 0.0 < scale[0] <= scale[1] <= 1.0:
            raise ValueError(f"scale={scale} must satisfy 0 < min <= max <= 1")
        if not 0.0 < ratio[0] <= ratio[1]:
            raise ValueError(f"ratio={ratio} must satisfy 0 < min <= max")
        if not 0.0 <= hflip <= 1.0:
            raise ValueError(f"hflip={hflip} must be a probability")
        _check_interpolation(interpolation)
        self.img_size = int(img_size)
        self.scale = (float(scale[0]), float(scale[1]))
        self.ratio = (float(ratio[0]), float(ratio[1]))
        self.hflip = float(hflip)
        self.interpolation = interpolation

    def __call__(
        self, data: bytes, ext: str, rng: np.random.Generator, out: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Transforms one encoded image.

        Args:
            data: Encoded image bytes.
            ext: The tar member's extension (a hint only; the content decides the decoder).
            rng: The sample's generator; the only source of randomness.
            out: Optional uint8 (3, img_size, img_size) tensor to write the crop into (a row of the batch), saving a
                copy; untouched when the image does not decode.

        Returns:
            ``uint8`` tensor (3, img_size, img_size): ``out`` when given.

        Raises:
            CorruptSample: The bytes do not decode.
            ValueError: ``rng`` is missing, or ``out`` has another shape or dtype.
        """
        if rng is None:
            raise ValueError("TrainTransform needs the sample's numpy Generator (rng=None is for EvalTransform)")
        img = _Image(data)
        box = random_resized_crop_box(img.width, img.height, self.scale, self.ratio, rng)
        flip = self.hflip > 0 and rng.random() < self.hflip
        return _crop_resize(img, box, self.img_size, self.interpolation, flip, out)

    def __repr__(self) -> str:
        return (
            f"TrainTransform(img_size={self.img_size}, scale={self.scale}, ratio={self.ratio}, hflip={self.hflip}, "
            f"interpolation={self.interpolation!r})"
        )


class EvalTransform:
    """Decode, resize the shorter side to ``img_size / crop_ratio``, centre crop ``img_size`` -> uint8 (3, S, S).

    The resize and the crop are done as one resize of the crop box, which is what the two steps keep.

    Args:
        img_size: Output side.
        crop_ratio: Fraction of the resized shorter side that the crop keeps (0.875 -> 256 for 224).
        interpolation: ``bilinear`` or ``bicubic``.
    """

    def __init__(self, img_size: int, crop_ratio: float = 0.875, interpolation: str = "bicubic"):
        if img_size <= 0:
            raise ValueError(f"img_size={img_size} must be positive")
        if not 0.0 < crop_ratio <= 1.0:
            raise ValueError(f"crop_ratio={crop_ratio} must be in (0, 1]")
        _check_interpolation(interpolation)
        self.img_size = int(img_size)
        self.crop_ratio = float(crop_ratio)
        self.interpolation = interpolation

    def __call__(self, data: bytes, ext: str, rng: Any = None, out: torch.Tensor | None = None) -> torch.Tensor:
        """Transforms one encoded image deterministically (``rng`` is ignored).

        Args:
            data: Encoded image bytes.
            ext: The tar member's extension (a hint only).
            rng: Ignored.
            out: Optional uint8 (3, img_size, img_size) tensor to write the crop into, as for ``TrainTransform``.

        Returns:
            ``uint8`` tensor (3, img_size, img_size): ``out`` when given.

        Raises:
            CorruptSample: The bytes do not decode.
            ValueError: ``out`` has another shape or dtype.
        """
        img = _Image(data)
        box = center_crop_box(img.width, img.height, self.img_size, self.crop_ratio)
        return _crop_resize(img, box, self.img_size, self.interpolation, out=out)

    def __repr__(self) -> str:
        return (
            f"EvalTransform(img_size={self.img_size}, crop_ratio={self.crop_ratio}, "
            f"interpolation={self.interpolation!r})"
        )


def build_transforms(aug: AugmentConfig, img_size: int) -> tuple[TrainTransform, EvalTransform]:
    """The train and eval CPU transforms of an ``augment`` config section."""
    train = TrainTransform(
        img_size,
        scale=(aug.scale_min, 1.0),
        ratio=(aug.ratio_min, aug.ratio_max),
        hflip=aug.hflip,
        interpolation=aug.interpolation,
    )
    return train, EvalTransform(img_size, crop_ratio=aug.eval_crop_ratio, interpolation=aug.interpolation)
