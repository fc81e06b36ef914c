"""Device augmentation, before and after issue 22: kernels, host reads and time per batch.

Three implementations of the same augmentation (same draws from the same seed):

- ``masked``: every RandAugment op computed for the whole batch and selected per image (the code before issue 22, kept
  as the test reference ``tests/unit/augment_reference.py``);
- ``torch``: each op on the images that drew it (``DeviceAugment(impl="torch")``, the CPU path);
- ``triton``: the fused kernels (``DeviceAugment(impl="triton")``, the CUDA path). On a CPU it runs under Triton's
  interpreter: its launches are counted (at ``--triton-size`` pixels, since the count does not depend on the image
  size) and not timed.

Kernels and host reads come from ``pretrain.kernel_count.count_kernels`` (one batch each, mixup and cutmix batches
both counted); times are medians of ``--repeats`` batches per implementation, the implementations alternated. Settings:
``configs/run/imagenet_*.yaml``'s augment section (RandAugment n=2 m=9 mstd=0.5, colour jitter 0.4, mixup 0.8 /
cutmix 1.0, label smoothing 0.1, random erasing 0.25).

Usage::

    python benchmarks/augment.py                          # batch 32 and 256 at 224x224 on CPU, appends to RESULTS.md
    python benchmarks/augment.py --batches 32 --repeats 3 --no-append
"""

from __future__ import annotations

import argparse
import datetime
import importlib.util
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "RESULTS.md"
sys.path.insert(0, str(ROOT))

__all__ = ["IMPLS", "build", "count", "main", "time_batches"]

IMPLS = ("masked", "torch", "triton")


def _reference():
    spec = importlib.util.spec_from_file_location(
        "_augment_reference", ROOT / "tests" / "unit" / "augment_reference.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.MaskedAugment


def build(impl: str, num_classes: int = 1000):
    """The augmentation ``impl`` with the ImageNet run configs' settings."""
    from data_pipeline.augment import DeviceAugment
    from data_pipeline.config import AugmentConfig

    cfg = AugmentConfig(color_jitter=0.4)
    return _reference()(cfg, num_classes) if impl == "masked" else DeviceAugment(cfg, num_classes, impl=impl)


def _inputs(batch: int, size: int, device: str):
    import torch

    g = torch.Generator().manual_seed(batch)
    images = torch.randint(0, 256, (batch, 3, size, size), dtype=torch.uint8, generator=g).to(device)
    return images, torch.randint(0, 1000, (batch,), generator=g).to(device)


def _gen(seed: int, device: str):
    import torch

    return torch.Generator(device=device).manual_seed(seed)


def count(impl: str, batch: int, size: int, device: str) -> dict[str, Any]:
    """Kernels and host reads of one mixup batch and one cutmix batch (seeds 1 and 2)."""
    from pretrain.kernel_count import count_kernels

    aug = build(impl)
    images, labels = _inputs(batch, size, device)
    out = {}
    for seed, kind in ((1, "mixup"), (2, "cutmix")):
        c = count_kernels(lambda s=seed: aug(images, labels, _gen(s, device)))
        out[kind] = c.kernels
        out[f"{kind}_reads"] = len(c.host_reads)
    return out


def time_batches(impls: list[str], batch: int, size: int, device: str, repeats: int) -> dict[str, float]:
    """Median seconds per batch of each implementation, the implementations alternated (one warm-up each)."""
    import torch

    augs = {impl: build(impl) for impl in impls}
    images, labels = _inputs(batch, size, device)
    times: dict[str, list[float]] = {impl: [] for impl in impls}

    def sync():
        if device == "cuda":
            torch.cuda.synchronize()

    for r in range(repeats + 1):
        for impl, aug in augs.items():
            sync()
            t0 = time.perf_counter()
            aug(images, labels, _gen(100 + r, device))
            sync()
            if r:  # the first round warms up (kernel builds, allocator)
                times[impl].append(time.perf_counter() - t0)
    return {impl: statistics.median(t) for impl, t in times.items()}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batches", type=int, nargs="+", default=[32, 256])
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--triton-size", type=int, default=16, help="image side of the interpreted Triton count on CPU")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--no-append", action="store_true")
    args = p.parse_args(argv)
    os.environ.setdefault("TRITON_INTERPRET", "1")  # read when the kernels are decorated; this is the CPU benchmark
    import torch

    torch.set_num_threads(args.threads)
    lines = [
        "| batch | implementation | kernels (mixup / cutmix batch) | host reads | median s per batch | vs masked |",
        "|---:|---|---:|---:|---:|---:|",
    ]
    for batch in args.batches:
        seconds = time_batches(["masked", "torch"], batch, args.size, "cpu", args.repeats)
        for impl in IMPLS:
            size = args.triton_size if impl == "triton" else args.size
            c = count(impl, batch, size, "cpu")
            t = seconds.get(impl)
            timing = f"{t:.3f}" if t is not None else f"not timed (interpreter; counted at {size}x{size})"
            ratio = f"{seconds['masked'] / t:.1f}x faster" if t is not None and impl != "masked" else ""
            lines.append(
                f"| {batch} | {impl} | {c['mixup']} / {c['cutmix']} | {c['mixup_reads'] + c['cutmix_reads']} | "
                f"{timing} | {ratio} |"
            )
            print(lines[-1], flush=True)
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    load = os.getloadavg()[0]
    text = "\n".join(
        [
            f"## Device augmentation before/after issue 22 (CPU), {stamp}",
            "",
            f"- machine: {platform.platform()}, {os.cpu_count()} CPUs, torch {torch.__version__}, {args.threads} "
            f"thread(s); load average {load:.1f} (shared machine)",
            f"- command: `{' '.join(['python benchmarks/augment.py', *(argv if argv is not None else sys.argv[1:])])}`",
            f"- {args.size}x{args.size} uint8 batches, the ImageNet configs' augment settings; masked = every op on "
            "the whole batch (before), torch = each op on its images (after, CPU path), triton = fused kernels "
            "(after, CUDA path; its launch count does not depend on the image size)",
            "",
            *lines,
            "",
        ]
    )
    print(text)
    if not args.no_append:
        with RESULTS.open("a") as f:
            f.write("\n" + text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
