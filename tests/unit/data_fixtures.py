"""Tiny WebDataset shards and manifests for data tests, in the agreed layout.

Layout: ``DIR/{split}/shard-%06d.tar``; sample ``i`` of a split is ``{split}_{i:08d}.png`` (an 8x8 RGB PNG whose pixels
encode ``i``) plus ``{split}_{i:08d}.cls`` (``i % num_classes``); ``DIR/manifest.json`` is version 1.
"""

from __future__ import annotations

import hashlib
import io
import json
import tarfile
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from data_pipeline.errors import DECODE_ERROR, CorruptSample

__all__ = [
    "NUM_CLASSES",
    "SIZE",
    "build_png_dataset",
    "make_dataset",
    "png_bytes",
    "png_transform",
    "sample_members",
    "shard_name",
    "write_manifest",
    "write_tar",
]

NUM_CLASSES = 3
SIZE = 8

Sample = tuple[str, dict[str, bytes]]


def png_bytes(index: int, size: int = SIZE) -> bytes:
    """An RGB PNG identifying ``index``: R, G hold its low and high byte, B ramps along x (so a roll shows)."""
    pixels = np.zeros((size, size, 3), dtype=np.uint8)
    pixels[..., 0] = index % 256
    pixels[..., 1] = (index // 256) % 256
    pixels[..., 2] = (np.arange(size, dtype=np.uint8) * (256 // size))[None, :]
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")
    return buf.getvalue()


def png_transform(data: bytes, ext: str, rng: np.random.Generator | None) -> torch.Tensor:
    """Test transform: decodes to uint8 (3, H, W) and, given an rng, rolls along x by a random amount."""
    try:
        with Image.open(io.BytesIO(data)) as img:
            array = np.asarray(img.convert("RGB"))
    except Exception as e:
        raise CorruptSample(DECODE_ERROR, f"cannot decode .{ext}: {e}") from e
    image = torch.from_numpy(array.copy()).permute(2, 0, 1).contiguous()  # (3, H, W)
    if rng is not None:
        image = torch.roll(image, shifts=int(rng.integers(0, image.shape[-1])), dims=-1)
    return image


def sample_members(split: str, index: int, num_classes: int = NUM_CLASSES) -> Sample:
    """The well-formed sample ``index`` of ``split``: key and ``{ext: bytes}``."""
    return f"{split}_{index:08d}", {"png": png_bytes(index), "cls": str(index % num_classes).encode()}


def shard_name(split: str, shard: int) -> str:
    return f"{split}/shard-{shard:06d}.tar"


def write_tar(path: Path, samples: Iterable[Sample]) -> None:
    """Writes the samples' members contiguously, in order."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w", format=tarfile.USTAR_FORMAT) as tar:
        for key, members in samples:
            for ext, data in members.items():
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size, info.mode, info.mtime = len(data), 0o644, 0
                tar.addfile(info, io.BytesIO(data))


def write_manifest(data_dir: Path, splits: dict[str, Sequence[int]], num_classes: int = NUM_CLASSES) -> None:
    """Writes ``manifest.json`` listing ``splits[split][i]`` samples for shard ``i`` (bytes/sha256 from disk if any)."""
    out = {}
    for split, sizes in splits.items():
        shards = []
        for i, n in enumerate(sizes):
            path = data_dir / shard_name(split, i)
            data = path.read_bytes() if path.exists() else b""
            shards.append(
                {
                    "name": shard_name(split, i),
                    "samples": n,
                    "bytes": len(data),
                    "sha256": hashlib.sha256(data).hexdigest(),
                }
            )
        total = sum(sizes)
        counts = {f"class{c}": sum(1 for i in range(total) if i % num_classes == c) for c in range(num_classes)}
        out[split] = {"num_samples": total, "class_counts": counts, "shards": shards}
    manifest = {
        "version": 1,
        "source": "synthetic",
        "format": "png",
        "classes": [f"class{c}" for c in range(num_classes)],
        "created": "2026-01-01T00:00:00Z",
        "splits": out,
        "skipped": [],
    }
    (data_dir / "manifest.json").write_text(json.dumps(manifest, indent=1))


def make_dataset(data_dir: Path, splits: dict[str, Sequence[int]]) -> Path:
    """Writes well-formed shards of the given sizes per split plus the manifest; returns ``data_dir``."""
    for split, sizes in splits.items():
        start = 0
        for i, n in enumerate(sizes):
            write_tar(data_dir / shard_name(split, i), (sample_members(split, j) for j in range(start, start + n)))
            start += n
    write_manifest(data_dir, splits)
    return data_dir


def build_png_dataset(root: Path, num_images: int, **build: object) -> Path:
    """``num_images`` tiny PNGs in ``NUM_CLASSES`` class folders under ``root/images``, built by ``pretrain data build``
    (``data_pipeline.writer.build_shards``, no val split, 1 worker, plus ``build``) into ``root/ds``; returns it."""
    from data_pipeline.writer import build_shards

    for i in range(num_images):
        folder = root / "images" / f"class{i % NUM_CLASSES}"
        folder.mkdir(parents=True, exist_ok=True)
        (folder / f"img{i:02d}.png").write_bytes(png_bytes(i))
    build_shards(f"imagefolder:{root / 'images'}", root / "ds", val_fraction=0.0, workers=1, progress=False, **build)
    return root / "ds"
