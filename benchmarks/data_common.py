"""What the data benchmarks share (``benchmarks/data.py``, ``data_scale.py``, ``data_index.py``): the ImageNet-like
photographs, streaming tar reads, one timed epoch of the training loader, and the report appended to
``benchmarks/RESULTS.md``. Not a benchmark of its own.

Other scripts load this file by path under a private module name (``benchmarks/`` on sys.path would shadow other
modules), as ``benchmarks/remote_data.py`` does for :func:`make_photos`: it imports no sibling benchmark module.
"""

from __future__ import annotations

import logging
import os
import platform
import resource
import shlex
import sys
import tarfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # run as a script from anywhere
    sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402
from torch.utils.data import DataLoader, IterableDataset  # noqa: E402

__all__ = ["RESULTS", "ROOT", "make_photos", "time_loader", "worker_startup_cpu"]

logger = logging.getLogger(__name__)

RESULTS = ROOT / "benchmarks" / "RESULTS.md"
SIZES = [(500, 375)] * 6 + [(375, 500)] * 3 + [(500, 333)]  # (w, h): ImageNet's common shapes, landscape-heavy


def make_photos(root: Path, n: int, seed: int = 0) -> None:
    """Writes ``n`` ImageNet-like JPEGs in 10 class folders under ``root`` from sklearn's two sample photos."""
    from sklearn.datasets import load_sample_images

    photos = load_sample_images().images  # two (427, 640, 3) uint8 photographs
    rng = np.random.default_rng(seed)
    for i in range(n):
        photo = photos[i % 2]
        ph, pw = photo.shape[:2]
        w, h = SIZES[int(rng.integers(len(SIZES)))]
        frac = rng.uniform(0.35, 1.0)  # crop side as a fraction of the photo, aspect of the target
        ch = int(min(ph, pw * h / w) * frac)
        cw = int(ch * w / h)
        y, x = int(rng.integers(0, ph - ch + 1)), int(rng.integers(0, pw - cw + 1))
        img = Image.fromarray(photo[y : y + ch, x : x + cw]).resize((w, h), Image.BICUBIC)
        if rng.random() < 0.5:
            img = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        gain = rng.uniform(0.75, 1.25, size=3) * rng.uniform(0.8, 1.15)  # colour cast and exposure
        pixels = np.clip(np.asarray(img, dtype=np.float32) * gain, 0, 255).astype(np.uint8)
        folder = root / f"class_{i % 10:02d}"
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(pixels).save(folder / f"img_{i:06d}.JPEG", quality=int(rng.integers(85, 96)))


def _iter_tar(path: Path):
    """(key, ext, bytes) of every member, streaming."""
    with tarfile.open(path, mode="r|") as tar:
        for m in tar:
            f = tar.extractfile(m)
            key, _, ext = m.name.partition(".")
            yield key, ext, f.read() if f is not None else b""


def _children_cpu_seconds() -> float:
    """User + system CPU seconds of this process's terminated and joined children."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


class _Empty(IterableDataset):
    def __iter__(self):
        return iter(())


def worker_startup_cpu(workers: int, repeats: int = 3) -> float:
    """CPU seconds of starting and stopping ``workers`` idle DataLoader workers (the default context, as the loader)."""
    best = float("inf")
    for _ in range(repeats):
        cpu0 = _children_cpu_seconds()
        list(DataLoader(_Empty(), num_workers=workers))
        best = min(best, _children_cpu_seconds() - cpu0)
    return best


def time_loader(
    data_dir: Path, workers: int, batch_size: int, img_size: int, transform: Any = None
) -> tuple[float, float, int]:
    """One epoch of the training loader (``build_loader`` + ``TrainTransform``, as ``pretrain train`` builds them, or
    ``transform``): wall seconds (worker start-up included), worker CPU seconds (start-up and shut-down included; in
    this process for ``workers=0``), samples yielded."""
    from data_pipeline.loader import build_loader
    from data_pipeline.transforms import TrainTransform

    loader = build_loader(
        data_dir,
        "train",
        train=True,
        rank=0,
        world_size=1,
        batch_size=batch_size,
        num_workers=workers,
        seed=0,
        shuffle_buffer=1000,  # the data config's default
        transform=TrainTransform(img_size) if transform is None else transform,
        persistent_workers=False,  # the DataLoader joins the workers at the end of the epoch: their CPU is counted
        image_size=img_size,
    )
    cpu = _children_cpu_seconds if workers > 0 else time.process_time
    cpu0, t0 = cpu(), time.perf_counter()
    n = 0
    for batch in loader:
        n += len(batch["index"])
    wall = time.perf_counter() - t0
    loader.close()
    return wall, cpu() - cpu0, n


def _command(prefix: str, argv: list[str]) -> str:
    """The command line recorded in a report: ``prefix`` (e.g. ``python benchmarks/data.py scale``) and ``argv``."""
    return prefix + "".join(f" {shlex.quote(a)}" for a in argv)


def _report(text: str, append: bool) -> None:
    """Prints a section and, if ``append``, appends it to :data:`RESULTS`."""
    sys.stdout.write(text + "\n")
    if append:
        new = not RESULTS.exists()
        with RESULTS.open("a") as f:
            f.write(("# Benchmark results\n\n" if new else "\n") + text)
        logger.info("appended to %s", RESULTS)


def _machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    try:
        import simplejpeg

        decoder = f"simplejpeg {simplejpeg.__version__}"
    except ImportError:
        decoder = "Pillow (simplejpeg not installed)"
    try:
        from data_pipeline import _jpeg_roi

        roi = f"data_pipeline._jpeg_roi (libjpeg-turbo {_jpeg_roi.LIBJPEG_TURBO_VERSION})"
    except ImportError:
        roi = "none (data_pipeline._jpeg_roi not built: full decodes)"
    import PIL

    return (
        f"{platform.platform()}, {cpu}, {os.cpu_count()} CPUs, torch {torch.__version__}, Pillow {PIL.__version__}, "
        f"JPEG decoder {decoder}, crop-box decoder {roi}"
    )
