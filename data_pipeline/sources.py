"""Image sources for ``pretrain data build``: where samples come from before they are sharded.

Three sources, named by a spec string:

- ``digits``: scikit-learn's 1,797 real 8x8 handwritten digits (``load_digits``), rendered as 32x32 RGB PNG
  (grey levels 0..16 scaled to 0..255, each pixel upscaled 4x4), with a fixed stratified split of 300 val samples.
- ``digit-pairs[:KEY=VALUE,...]``: two of those digits at random, distant places on a larger canvas, labelled
  ``same`` / ``different`` class; a task that needs content compared far apart (:class:`DigitPairsSource`).
- ``imagefolder:PATH``: the ImageNet layout, one folder per class (classes sorted by name). Files are stored as they
  are on disk (a JPEG is never re-encoded); the format is detected from the content, not the extension. Val comes
  from a second tree with the same classes (``val=PATH``) or a seeded stratified fraction (``val_fraction=F``).

A source is used in two steps so the writer can plan shards before it reads pixels: :meth:`Source.list_items`
names every candidate sample cheaply and deterministically, :meth:`Source.probe` checks one (decodes it) and returns
it with its stored extension and size, or raises :class:`UnreadableImage`; :meth:`Source.read` returns the bytes to
store. Sources are plain picklable objects, so writer processes can probe and read in parallel.
"""

from __future__ import annotations

import dataclasses
import io
import logging
import math
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
from PIL import Image, UnidentifiedImageError

__all__ = [
    "DigitPairsSource",
    "DigitsSource",
    "ImageFolderSource",
    "Source",
    "SourceItem",
    "UnreadableImage",
    "format_of",
    "open_source",
]

logger = logging.getLogger(__name__)

# Pillow format name -> extension stored in the tar. MPO is a JPEG with extra frames (some cameras write it).
_EXT_BY_FORMAT = {"JPEG": "jpg", "MPO": "jpg", "PNG": "png", "WEBP": "webp", "GIF": "gif", "BMP": "bmp", "TIFF": "tiff"}
_SPLITS = ("train", "val")

DIGITS_VAL_SAMPLES = 300
"""Size of the fixed digits val split (stratified; the remaining 1,497 are train)."""
DIGITS_SIZE = 32
"""Side of the rendered digits images (8x8 upscaled 4x)."""
SPLIT_SEED = 0
"""Seed of the stratified train/val splits (digits and ``val_fraction``); fixed so a re-run splits the same way."""


class UnreadableImage(Exception):
    """A source file that is not a usable image; the build skips it and lists it in ``manifest["skipped"]``."""


@dataclass(frozen=True)
class SourceItem:
    """One candidate sample. ``ext`` and ``size`` are filled in by :meth:`Source.probe`."""

    split: str
    label: int
    path: str
    """What to read: a file path (imagefolder) or ``digits:INDEX``."""
    rel: str
    """Name relative to the source root, stored in the sample's ``.json`` as ``source``."""
    ext: str = ""
    size: int = 0


class Source(Protocol):
    """What the writer needs from a source."""

    spec: str
    classes: list[str]

    def list_items(self) -> list[SourceItem]:
        """Every candidate sample, in a deterministic order, split and label assigned."""
        ...

    def probe(self, item: SourceItem) -> SourceItem:
        """Checks that ``item`` decodes; returns it with ``ext`` and ``size``. Raises :class:`UnreadableImage`."""
        ...

    def read(self, item: SourceItem) -> bytes:
        """The image bytes to store for a probed item."""
        ...

    def meta(self, item: SourceItem) -> dict[str, Any]:
        """Metadata stored as the sample's ``.json``."""
        ...


# --------------------------------------------------------------------------------------------------------- digits


@dataclass(eq=False)  # holds arrays: identity comparison
class DigitsSource:
    """scikit-learn's handwritten digits as 32x32 RGB PNG; labels are the digits 0..9."""

    spec: str = "digits"
    classes: list[str] = field(default_factory=lambda: [str(i) for i in range(10)])
    images: np.ndarray = field(default=None, repr=False)  # type: ignore[assignment]  # (N, 8, 8) uint8 0..255
    labels: np.ndarray = field(default=None, repr=False)  # type: ignore[assignment]  # (N,) int64
    val_indices: frozenset[int] = field(default_factory=frozenset, repr=False)

    def __post_init__(self) -> None:
        if self.images is None:
            from sklearn.datasets import load_digits
            from sklearn.model_selection import train_test_split

            digits = load_digits()
            # 0..16 grey levels -> 0..255 (16 -> 255 exactly)
            self.images = np.rint(digits.images * (255.0 / 16.0)).clip(0, 255).astype(np.uint8)  # (N, 8, 8)
            self.labels = digits.target.astype(np.int64)
            index = np.arange(len(self.labels))
            _, val = train_test_split(
                index, test_size=DIGITS_VAL_SAMPLES, stratify=self.labels, random_state=SPLIT_SEED
            )
            self.val_indices = frozenset(int(i) for i in val)

    def list_items(self) -> list[SourceItem]:
        items = []
        for split in _SPLITS:
            for i in range(len(self.labels)):
                if (i in self.val_indices) == (split == "val"):
                    items.append(SourceItem(split, int(self.labels[i]), f"digits:{i}", f"load_digits[{i}]"))
        return items

    def render(self, index: int) -> bytes:
        """PNG bytes of digit ``index``: 32x32 RGB, each source pixel a 4x4 block."""
        grey = self.images[index]  # (8, 8)
        scale = DIGITS_SIZE // grey.shape[0]
        big = np.repeat(np.repeat(grey, scale, axis=0), scale, axis=1)  # (32, 32)
        rgb = np.ascontiguousarray(np.stack([big] * 3, axis=-1))  # (32, 32, 3)
        buf = io.BytesIO()
        Image.fromarray(rgb).save(buf, format="PNG")
        return buf.getvalue()

    def probe(self, item: SourceItem) -> SourceItem:
        return dataclasses.replace(item, ext="png", size=len(self.read(item)))

    def read(self, item: SourceItem) -> bytes:
        return self.render(int(item.path.split(":", 1)[1]))

    def meta(self, item: SourceItem) -> dict[str, Any]:
        return {"source": item.rel}


# ---------------------------------------------------------------------------------------------------- digit pairs


@dataclass(eq=False)  # holds arrays: identity comparison
class DigitPairsSource:
    """Pairs of real digits far apart on a blank canvas; label 1 (``same``) when both are the same digit class.

    Generator (deterministic in ``seed``; the manifest's ``source`` field spells every parameter):

    - Digit images come from :class:`DigitsSource`'s fixed split: train pairs use only its 1,497 train images, val
      pairs only its 300 val images, so no val pair shares a digit image with any train pair.
    - Sample ``i`` of a split is ``same`` for exactly half of the split: labels ``[0, 1] * (n / 2)`` (one extra
      ``different`` when ``n`` is odd), shuffled. A ``same`` sample draws a class uniformly, then two distinct images
      of it; a ``different`` sample draws two distinct classes uniformly, then one image of each. Within a class every
      image is equally likely.
    - Each digit is its 8x8 grey levels upscaled ``scale`` x ``scale`` (a ``8 scale`` pixel square) pasted at integer
      positions drawn uniformly on the ``canvas`` x ``canvas`` black image, redrawn until the two squares' centres are
      at least ``min_distance`` pixels apart (Euclidean). With ``distractors > 0``, that many further digits of random
      classes (from the same split's images) are pasted at ``distractor_level`` of full brightness, on positions that
      overlap no other digit; they carry no label information and the pair stays the two full-brightness digits.
    - One ``numpy.random.default_rng([seed, split])`` stream per split draws, per sample in order: the label slot
      permutation first (once), then classes, images and positions. ``seed`` changes the pairs; the digit split
      stays :data:`SPLIT_SEED`'s.

    Args:
        canvas: side of the square RGB canvas in pixels.
        scale: upscaling of each 8x8 digit.
        train_pairs: samples in train.
        val_pairs: samples in val.
        distractors: dimmed extra digits per image.
        distractor_level: brightness of distractors relative to the pair (0..1).
        min_distance: least distance between the two digit centres, in pixels.
        digit_classes: the digit classes pairs are drawn from (e.g. ``01``: pairs of 0s and 1s only).
        seed: seed of the pair generator.
    """

    canvas: int = 64
    scale: int = 2
    train_pairs: int = 20000
    val_pairs: int = 2000
    distractors: int = 0
    distractor_level: float = 0.4
    min_distance: float = 32.0
    digit_classes: str = "0123456789"
    seed: int = 0
    spec: str = ""
    classes: list[str] = field(default_factory=lambda: ["different", "same"])
    digits: DigitsSource = field(default=None, repr=False)  # type: ignore[assignment]
    layouts: dict[str, np.ndarray] = field(default_factory=dict, repr=False)  # split -> (n, 1 + 2 + 3 m) int64

    def __post_init__(self) -> None:
        side = 8 * self.scale
        if self.canvas < 2 * side or self.min_distance > (self.canvas - side) * math.sqrt(2) * 0.9:
            raise ValueError(
                f"digit-pairs: canvas={self.canvas} too small for two {side}px digits at min_distance="
                f"{self.min_distance:g} (need canvas >= {2 * side} and min_distance well under the diagonal)"
            )
        if self.train_pairs < 2 or self.val_pairs < 2 or self.distractors < 0:
            raise ValueError("digit-pairs: train_pairs and val_pairs must be >= 2, distractors >= 0")
        if not 0.0 < self.distractor_level <= 1.0:
            raise ValueError(f"digit-pairs: distractor_level={self.distractor_level} must be in (0, 1]")
        if len(set(self.digit_classes)) < 2 or not set(self.digit_classes) <= set("0123456789"):
            raise ValueError(f"digit-pairs: digit_classes={self.digit_classes!r} must name >= 2 digits, e.g. 0123")
        self.digit_classes = "".join(sorted(set(self.digit_classes)))
        self.spec = "digit-pairs:" + ",".join(
            f"{k}={v:g}" if isinstance(v := getattr(self, k), (int, float)) else f"{k}={v}" for k in _PAIR_KEYS
        )
        if self.digits is None:
            self.digits = DigitsSource()
        if not self.layouts:
            for split, n in (("train", self.train_pairs), ("val", self.val_pairs)):
                self.layouts[split] = self._generate(split, n)

    def _generate(self, split: str, n: int) -> np.ndarray:
        """Per sample: ``[label, img_a, img_b, ya, xa, yb, xb, (img, y, x) per distractor]``."""
        rng = np.random.default_rng([self.seed, _SPLITS.index(split)])
        in_split = np.array(
            [i for i in range(len(self.digits.labels)) if (i in self.digits.val_indices) == (split == "val")]
        )
        classes = [int(c) for c in self.digit_classes]
        by_class = [in_split[self.digits.labels[in_split] == c] for c in classes]
        labels = rng.permutation(np.arange(n) % 2)  # exactly n // 2 "same" (1); the odd one out is "different"
        side, span = 8 * self.scale, self.canvas - 8 * self.scale + 1
        rows = np.zeros((n, 7 + 3 * self.distractors), dtype=np.int64)
        for i, same in enumerate(labels):
            if same:
                c = rng.integers(len(classes))
                a, b = rng.choice(by_class[c], size=2, replace=False)
            else:
                ca, cb = rng.choice(len(classes), size=2, replace=False)
                a, b = rng.choice(by_class[ca]), rng.choice(by_class[cb])
            while True:
                ya, xa, yb, xb = rng.integers(span, size=4)
                if math.hypot(ya - yb, xa - xb) >= self.min_distance:
                    break
            boxes = [(ya, xa), (yb, xb)]
            row = [same, a, b, ya, xa, yb, xb]
            for _ in range(self.distractors):
                for _attempt in range(1000):
                    y, x = rng.integers(span, size=2)
                    if all(abs(y - by) >= side or abs(x - bx) >= side for by, bx in boxes):
                        break
                else:
                    raise ValueError(f"digit-pairs: no room for {self.distractors} distractors on {self.canvas}px")
                boxes.append((y, x))
                row += [rng.choice(in_split), y, x]  # any of the 10 digit classes
            rows[i] = row
        return rows

    def list_items(self) -> list[SourceItem]:
        return [
            SourceItem(split, int(rows[i, 0]), f"digit-pairs:{split}:{i}", f"{split}/{i:06d}")
            for split, rows in self.layouts.items()
            for i in range(len(rows))
        ]

    def _row(self, item: SourceItem) -> np.ndarray:
        _, split, i = item.path.split(":")
        return self.layouts[split][int(i)]

    def render(self, row: np.ndarray) -> np.ndarray:
        """The ``(canvas, canvas, 3)`` uint8 image of one layout row."""
        img = np.zeros((self.canvas, self.canvas), dtype=np.float32)
        side = 8 * self.scale
        pasted = [(row[1], row[3], row[4], 1.0), (row[2], row[5], row[6], 1.0)]
        pasted += [
            (row[7 + 3 * j], row[8 + 3 * j], row[9 + 3 * j], self.distractor_level) for j in range(self.distractors)
        ]
        for index, y, x, level in pasted:
            big = np.repeat(np.repeat(self.digits.images[index], self.scale, 0), self.scale, 1)  # (side, side)
            img[y : y + side, x : x + side] = np.maximum(img[y : y + side, x : x + side], big * level)
        return np.ascontiguousarray(np.stack([np.rint(img).astype(np.uint8)] * 3, axis=-1))

    def probe(self, item: SourceItem) -> SourceItem:
        return dataclasses.replace(item, ext="png", size=len(self.read(item)))

    def read(self, item: SourceItem) -> bytes:
        buf = io.BytesIO()
        Image.fromarray(self.render(self._row(item))).save(buf, format="PNG")
        return buf.getvalue()

    def meta(self, item: SourceItem) -> dict[str, Any]:
        row = self._row(item)
        classes = [int(self.digits.labels[row[1]]), int(self.digits.labels[row[2]])]
        return {"source": item.rel, "digits": [int(row[1]), int(row[2])], "digit_classes": classes}


_PAIR_KEYS = (
    "canvas", "scale", "train_pairs", "val_pairs", "distractors", "distractor_level", "min_distance", "digit_classes",
    "seed",
)  # fmt: skip


def _parse_pairs_spec(spec: str) -> DigitPairsSource:
    """``digit-pairs`` or ``digit-pairs:canvas=96,distractors=2,...`` (keys of :class:`DigitPairsSource`)."""
    _, _, opts = spec.partition(":")
    kwargs: dict[str, Any] = {}
    for part in filter(None, opts.split(",")):
        key, eq, value = part.partition("=")
        if not eq or key not in _PAIR_KEYS:
            raise ValueError(f"digit-pairs option {part!r}: use KEY=VALUE with KEY one of {', '.join(_PAIR_KEYS)}")
        kind = type(getattr(DigitPairsSource, key))
        try:
            kwargs[key] = int(float(value)) if kind is int and float(value).is_integer() else kind(value)
        except ValueError:
            raise ValueError(f"digit-pairs option {key}={value!r} is not a {kind.__name__}") from None
    return DigitPairsSource(**kwargs)


# ---------------------------------------------------------------------------------------------------- imagefolder


def format_of(data: bytes) -> str:
    """Extension to store ``data`` under (``jpg``, ``png``, ``webp``...), from its content; decodes it fully.

    Raises:
        UnreadableImage: Empty, not an image, truncated or otherwise undecodable; the message is the reason.
    """
    if not data:
        raise UnreadableImage("empty file")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # EXIF and palette warnings are not our business here
        try:
            img = Image.open(io.BytesIO(data))
        except UnidentifiedImageError:
            raise UnreadableImage("not an image (no decoder recognises the content)") from None
        except Exception as e:  # Pillow raises many types for broken headers
            raise UnreadableImage(f"unreadable image header ({type(e).__name__}: {e})") from None
        fmt = img.format or ""
        try:
            if fmt in ("JPEG", "MPO"):
                img.draft("RGB", (max(1, img.width // 8), max(1, img.height // 8)))  # 1/8 DCT decode: still checks
            img.load()  # every entropy-coded byte, so truncation is caught at a fraction of the cost
        except Exception as e:
            raise UnreadableImage(f"truncated or corrupt image data ({type(e).__name__}: {e})") from None
        if img.width < 1 or img.height < 1:
            raise UnreadableImage("image has no pixels")
    return _EXT_BY_FORMAT.get(fmt, fmt.lower() or "img")


@dataclass
class ImageFolderSource:
    """An ImageNet-layout folder tree: ``ROOT/<class>/**/<file>``; class names are the sorted folder names.

    Args:
        root: The (train) tree.
        val: A second tree with the same classes for the val split.
        val_fraction: Instead of ``val``: the fraction of each class moved to val (seeded, stratified).
    """

    root: str
    val: str | None = None
    val_fraction: float | None = None
    spec: str = ""
    classes: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        root = Path(self.root)
        if not root.is_dir():
            raise FileNotFoundError(f"imagefolder source {root} is not a folder")
        if self.val is not None and self.val_fraction is not None:
            raise ValueError("give either val (a second folder tree) or val_fraction, not both")
        if self.val_fraction is not None and not 0.0 <= self.val_fraction < 1.0:
            raise ValueError(f"val_fraction={self.val_fraction} must be in [0, 1)")
        self.classes = _class_folders(root)
        if not self.classes:
            raise ValueError(f"imagefolder source {root} has no class folders (expected ROOT/<class>/<image>)")
        self.spec = f"imagefolder:{root}"
        if self.val is not None:
            val_root = Path(self.val)
            if not val_root.is_dir():
                raise FileNotFoundError(f"val folder {val_root} is not a folder")
            val_classes = _class_folders(val_root)
            extra = sorted(set(val_classes) - set(self.classes))
            if extra:
                raise ValueError(f"val folder {val_root} has classes not in {root}: {extra[:5]}")
            missing = sorted(set(self.classes) - set(val_classes))
            if missing:
                logger.warning("val folder %s lacks %d classes, e.g. %s", val_root, len(missing), missing[:3])
            self.spec += f" --val {val_root}"
        elif self.val_fraction:
            self.spec += f" --val-fraction {self.val_fraction:g}"

    def list_items(self) -> list[SourceItem]:
        items: list[SourceItem] = []
        root = Path(self.root)
        for label, name in enumerate(self.classes):
            files = _files_under(root, name)
            val_set: set[str] = set()
            if self.val_fraction:
                # seeded per class, so adding a class does not move files of the others
                n_val = int(round(self.val_fraction * len(files)))
                perm = np.random.default_rng([SPLIT_SEED, label]).permutation(len(files))
                val_set = {files[i] for i in perm[:n_val]}
            items += [SourceItem("val" if rel in val_set else "train", label, str(root / rel), rel) for rel in files]
        if self.val is not None:
            val_root = Path(self.val)
            for label, name in enumerate(self.classes):
                if (val_root / name).is_dir():
                    files = _files_under(val_root, name)
                    items += [SourceItem("val", label, str(val_root / rel), rel) for rel in files]
        return items

    def probe(self, item: SourceItem) -> SourceItem:
        data = self.read(item)
        return dataclasses.replace(item, ext=format_of(data), size=len(data))

    def read(self, item: SourceItem) -> bytes:
        try:
            with open(item.path, "rb") as f:
                return f.read()
        except OSError as e:
            raise UnreadableImage(f"cannot read file ({e.strerror or e})") from None

    def meta(self, item: SourceItem) -> dict[str, Any]:
        return {"source": item.rel}


def _class_folders(root: Path) -> list[str]:
    return sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))


def _files_under(root: Path, class_name: str) -> list[str]:
    """Paths relative to ``root`` of every non-hidden file under ``root/class_name``, sorted."""
    out = []
    for dirpath, dirnames, filenames in os.walk(root / class_name, followlinks=True):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        rel_dir = Path(dirpath).relative_to(root)
        out += [(rel_dir / f).as_posix() for f in filenames if not f.startswith(".")]
    return sorted(out)


# ------------------------------------------------------------------------------------------------------- factory


def open_source(spec: str, *, val: str | os.PathLike | None = None, val_fraction: float | None = None) -> Source:
    """Builds the source named by ``spec``: ``digits``, ``digit-pairs[:KEY=VALUE,...]`` or ``imagefolder:PATH``.

    Raises:
        ValueError: Unknown spec, or options the source does not take.
        FileNotFoundError: An imagefolder path does not exist.
    """
    if spec == "digits":
        if val is not None or val_fraction is not None:
            raise ValueError("the digits source has a fixed train/val split; drop --val / --val-fraction")
        return DigitsSource()
    if spec == "digit-pairs" or spec.startswith("digit-pairs:"):
        if val is not None or val_fraction is not None:
            raise ValueError("the digit-pairs source has a fixed train/val split; drop --val / --val-fraction")
        return _parse_pairs_spec(spec)
    if spec.startswith("imagefolder:"):
        path = spec.split(":", 1)[1]
        if not path:
            raise ValueError("imagefolder needs a path: imagefolder:PATH")
        return ImageFolderSource(path, None if val is None else str(val), val_fraction)
    raise ValueError(f"unknown source {spec!r}; use 'digits', 'digit-pairs' or 'imagefolder:PATH'")
