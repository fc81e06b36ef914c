"""The stages of the GPU check (``benchmarks/gpu_check.py``), run one after another in its process.

Each stage writes its rows to the report as it finishes them (``ctx.row``), so a stage stopped at its budget keeps the
rows it finished. The models train through the trainer's own step (``Trainer.train_step``: the loader, the device
augmentation, the DeepSpeed engine, the device-side optimizer step) on the same synthetic JPEG shards, bf16:

- ``data``: synthetic JPEGs (crops of scikit-learn's two sample photos) in 10 class folders, sharded with
  ``pretrain data build imagefolder:``;
- ``augment``: the device augmentation of one training batch three ways (every op on the whole batch as before issue
  22, each op on its images with torch, the Triton kernels): time, kernels, and the Triton kernels' pixels against
  the torch path's on the same draws;
- ``train`` / ``compile``: images/s, MFU and peak memory of each model, eager and compiled per block, then a CUDA
  profile of a few steps (kernels and device time per step, top kernels) and the dispatcher's count of one step
  (``pretrain.kernel_count``, the CPU-side proxy). timm's Swin-T and ViT-S train in the same trainer (the model is the
  only part swapped), and ViT-S also in a timm-style loop (autocast, fused AdamW, mixup on the device, nothing else),
  the reference for kernels per step;
- ``infer``: inference latency at batch 1 and 64 (bf16 weights, eager), the SepViT paper's metric;
- ``loader``: one epoch of the training loader against the fastest model's appetite.

timm is imported only by :func:`_timm_model` (on the GPU image; never a dependency of the package). The dry run passes
models of our registry in its place and says so in every row.
"""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import json
import os
import signal
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

ROOT = Path(__file__).resolve().parent.parent
PRETRAIN = [sys.executable, "-m", "launch.cli"]  # `pretrain`, with this interpreter

__all__ = ["STAGES", "Ctx", "ModelSpec", "StageTimeout", "model_specs", "time_limit"]

# ImageNet recipe's augmentation (configs/run/imagenet_*.yaml): the digits configs of the dry run get it too
AUGMENT = [
    "augment.randaug_n=2", "augment.randaug_m=9.0", "augment.randaug_mstd=0.5", "augment.color_jitter=0.4",
    "augment.mixup_alpha=0.8", "augment.cutmix_alpha=1.0", "augment.label_smoothing=0.1",
    "augment.random_erasing=0.25", "augment.hflip=0.5", "augment.scale_min=0.08",
]  # fmt: skip


class StageTimeout(Exception):
    """A stage or one model's run reached its time budget."""


@contextlib.contextmanager
def time_limit(seconds: float) -> Iterator[None]:
    """Raises :class:`StageTimeout` in this (main) thread after ``seconds``: a compilation that outlasts its budget is
    interrupted between Python bytecodes, not left to eat the next stage's time. Nests: an enclosing limit that expires
    first still fires, and is re-armed with what it has left on the way out."""

    if seconds <= 0:
        raise StageTimeout("no time left")
    outer_left, _ = signal.getitimer(signal.ITIMER_REAL)
    limit = min(seconds, outer_left) if outer_left > 0 else seconds

    def expire(signum: int, frame: Any) -> None:
        raise StageTimeout(f"time budget of {limit:.1f} s reached")

    previous = signal.signal(signal.SIGALRM, expire)
    start = time.monotonic()
    signal.setitimer(signal.ITIMER_REAL, limit)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
        if outer_left > 0:
            signal.setitimer(signal.ITIMER_REAL, max(1e-3, outer_left - (time.monotonic() - start)))


@dataclass
class Ctx:
    """What every stage gets: settings, the device, the report and the results of earlier stages."""

    work: Path
    s: dict[str, Any]
    dry: bool
    device: torch.device
    row: Callable[[str, str, str, str], None]
    """``row(stage, check, setting, result)``: appends one row to the report at once."""
    deadline: float = 0.0
    results: dict[tuple[str, str], dict[str, Any]] = field(default_factory=dict)
    """``(stage, model key)`` -> the figures of its rows (``vit_s_loop`` for timm's loop)."""
    keys: dict[str, list[str]] = field(default_factory=dict)
    """The models each stage ran."""
    dist: Any = None

    def left(self) -> float:
        return self.deadline - time.monotonic()

    def sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)


@dataclass(frozen=True)
class ModelSpec:
    """One model of the comparison."""

    key: str
    """``sepvit``, ``setformer``, ``swin_t``, ``vit_s``."""
    label: str
    """Its name in the table."""
    config: str
    """The run config whose recipe trains it (for timm's models: sepvit_tiny's; in the dry run, the stand-in's)."""
    timm_name: str | None = None


def model_specs(dry: bool) -> list[ModelSpec]:
    def run(family: str) -> str:
        return f"configs/run/digits_{family}_lite.yaml" if dry else f"configs/run/imagenet_{family}_tiny.yaml"

    def peer(key: str, name: str, stand_in: str) -> ModelSpec:
        label = f"timm {name}" + (f" (dry run: stand-in {stand_in}_lite_32, timm does not import here)" if dry else "")
        return ModelSpec(key, label, run(stand_in if dry else "sepvit"), name)

    return [
        ModelSpec("sepvit", "sepvit_lite_32" if dry else "sepvit_tiny", run("sepvit")),
        ModelSpec("setformer", "setformer_lite_32" if dry else "setformer_tiny", run("setformer")),
        peer("swin_t", "swin_tiny_patch4_window7_224", "sepvit"),
        peer("vit_s", "vit_small_patch16_224", "setformer"),
    ]


def _timm_model(name: str, num_classes: int, img_size: int) -> nn.Module:
    import timm  # on the GPU image only

    return timm.create_model(name, num_classes=num_classes, img_size=img_size)


def make_model(
    spec: ModelSpec, cfg: Any, dry: bool, build_model: Callable[[Any], nn.Module] | None = None
) -> nn.Module:
    """The model of ``spec`` for the run config ``cfg``: timm's on the GPU, else our registry's (the trainer's
    ``build_model``, or ``build_model`` where that is being replaced)."""
    if spec.timm_name is not None and not dry:
        return _timm_model(spec.timm_name, cfg.model.num_classes, cfg.model.img_size)
    if build_model is None:
        from pretrain.rank import build_model
    return build_model(cfg)


def compile_peer_blocks(model: nn.Module, backend: str) -> int:
    """Per-block ``torch.compile`` of a model without our ``stages.S.blocks.B`` layout (timm's ViT ``blocks.B``, Swin
    ``layers.L.blocks.B``): every child of a module named ``blocks``, compiled in place as
    ``pretrain.engine.compile_blocks`` compiles ours."""
    blocks = [b for name, m in model.named_modules() if name.rsplit(".", 1)[-1] == "blocks" for b in m.children()]
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, len(blocks))
    for block in blocks:
        block.compile(backend=backend)
    return len(blocks)


def _free() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


# --------------------------------------------------------------------------------------------------------- data


def _photos(dry: bool) -> list:
    """scikit-learn's two sample photographs (427, 640, 3); in the dry run two smooth random fields of that shape (the
    photos' import costs seconds there)."""
    import numpy as np

    if not dry:
        from sklearn.datasets import load_sample_images

        return load_sample_images().images
    rng = np.random.default_rng(0)
    coarse = rng.uniform(0, 255, size=(2, 14, 21, 3))
    return [np.kron(c, np.ones((31, 31, 1)))[:427, :640].astype(np.uint8) for c in coarse]


def _make_jpegs(args: tuple[Path, int, int, int, list]) -> None:
    import numpy as np
    from PIL import Image

    root, start, stop, size, photos = args
    for i in range(start, stop):
        rng = np.random.default_rng(i)
        photo = photos[i % 2]
        side = int(min(photo.shape[:2]) * rng.uniform(0.3, 1.0))
        y, x = int(rng.integers(0, photo.shape[0] - side + 1)), int(rng.integers(0, photo.shape[1] - side + 1))
        img = Image.fromarray(photo[y : y + side, x : x + side]).resize((size, size), Image.BICUBIC)
        gain = rng.uniform(0.75, 1.25, size=3)  # colour cast: the 10 classes are not the same pixels
        pixels = np.clip(np.asarray(img, dtype=np.float32) * gain, 0, 255).astype(np.uint8)
        folder = root / f"class_{i % 10:02d}"
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(pixels).save(folder / f"img_{i:06d}.JPEG", quality=90)


def stage_data(ctx: Ctx) -> None:
    from multiprocessing import get_context

    s, t0 = ctx.s, time.perf_counter()
    photos, shards = ctx.work / "photos", ctx.work / "shards"
    n, procs = s["images"], max(1, min(8, (os.cpu_count() or 2) - 1))
    chunks = [(photos, i, min(n, i + 256), s["img_size"], _photos(ctx.dry)) for i in range(0, n, 256)]
    if len(chunks) == 1:
        _make_jpegs(chunks[0])
    else:
        with get_context("fork").Pool(procs) as pool:  # fork before any CUDA work: the stage runs first
            pool.map(_make_jpegs, chunks)
    made = time.perf_counter() - t0
    build = [*PRETRAIN, "data", "build", f"imagefolder:{photos}", "--out", str(shards), "--val-fraction", "0.05"]
    build += ["--max-samples-per-shard", "256", "--workers", str(procs), "--no-progress"]
    proc = subprocess.run(build, cwd=ROOT, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"pretrain data build exited {proc.returncode}: {proc.stderr.strip()[-300:]}")
    train = json.loads((shards / "manifest.json").read_text())["splits"]["train"]
    kib = sum(sh["bytes"] for sh in train["shards"]) / train["num_samples"] / 1024
    result = (
        f"{train['num_samples']} train JPEGs ({kib:.0f} KiB mean) in {len(train['shards'])} shards; made in "
        f"{made:.1f} s, sharded in {time.perf_counter() - t0 - made:.1f} s"
    )
    ctx.row("data", "shards", f"{s['img_size']}x{s['img_size']}, {procs} processes", result)


# ------------------------------------------------------------------------------------------------------ augment


def _load_bench(name: str):
    """``benchmarks/<name>.py`` under a private module name (``benchmarks/data.py`` would shadow other modules)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(f"_bench_{name}", ROOT / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def stage_augment(ctx: Ctx) -> None:
    bench = _load_bench("augment")
    s, dev = ctx.s, ctx.device.type
    b, size = s["batch"], s["img_size"]
    setting = f"batch {b}, {size}x{size}, the ImageNet recipe's augment section"
    impls = ["masked", "torch", "triton"]
    interpreted = dev == "cpu"  # the dry run: Triton's interpreter, counted on a small batch, not timed
    seconds = bench.time_batches(impls[:2] if interpreted else impls, b, size, dev, s["augment_repeats"])
    notes = {"masked": "every op on the whole batch (before)", "torch": "each op on its images", "triton": "fused"}
    for impl in impls:
        if impl == "triton" and interpreted:
            c, timing = bench.count(impl, 4, size, dev), "interpreted on CPU, batch 4 (no timing)"
        else:
            c = bench.count(impl, b, size, dev)
            timing = f"{seconds[impl] * 1e3:.1f} ms per batch ({seconds['masked'] / seconds[impl]:.1f}x the masked one)"
        result = (
            f"{timing}; {c['mixup']} / {c['cutmix']} kernels per mixup / cutmix batch, "
            f"{c['mixup_reads'] + c['cutmix_reads']} host reads"
        )
        ctx.row("augment", f"{impl}: {notes[impl]}", setting, result)
    # the Triton kernels on this device against the torch path on the CPU, from the same CPU generator's draws
    images, labels = bench._inputs(4 if interpreted else min(b, 64), size, "cpu")
    want = bench.build("torch")(images, labels, torch.Generator().manual_seed(5))[0]
    got = bench.build("triton")(images.to(ctx.device), labels.to(ctx.device), torch.Generator().manual_seed(5))[0]
    diff = (got.cpu() - want).abs()
    result = f"max |triton - torch| {diff.max().item():.2e}, mean {diff.mean().item():.2e} (normalised pixels)"
    ctx.row("augment", "triton on this device vs torch on CPU, same draws", f"batch {images.shape[0]}", result)


# -------------------------------------------------------------------------------------------------- train, compile


def train_config(ctx: Ctx, spec: ModelSpec, compiled: bool, name: str) -> Any:
    from pretrain.config import load_config
    from pretrain.rank import resolve_num_classes

    s = ctx.s
    overrides = [
        f"data.path={ctx.work / 'shards'}", f"run.output_dir={ctx.work / 'runs'}", f"run.name={name}",
        "trainer.max_steps=1000000", "trainer.log_every_steps=1000000", "trainer.eval_every_steps=0",
        "trainer.global_batch_size=0", "trainer.grad_accum_steps=1", "trainer.precision=bf16",
        f"trainer.device={ctx.device.type}", "trainer.progress_bar=false",
        f"trainer.compile={str(compiled and spec.timm_name is None).lower()}",
        f"trainer.compile_backend={s['compile_backend']}", f"data.batch_size={s['batch']}",
        f"data.num_workers={s['train_workers']}", f"model.img_size={s['img_size']}", "checkpoint.every_steps=0",
        "checkpoint.every_minutes=0", "checkpoint.save_final=false", "checkpoint.keep_best=0",
        "logging.tensorboard=false", *AUGMENT,
    ]  # fmt: skip
    return resolve_num_classes(load_config(ROOT / spec.config, overrides))


@contextlib.contextmanager
def _trainer_model(factory: Callable[[Any, Callable], nn.Module] | None) -> Iterator[None]:
    """``build_trainer`` with ``factory(cfg, build_model)`` as its model (timm's; ``build_model`` is the trainer's
    own): the engine, data and step are the trainer's."""
    import pretrain.rank as rank_module

    if factory is None:
        yield
        return
    original = rank_module.build_model
    rank_module.build_model = lambda cfg, *args, **kwargs: factory(cfg, original)
    try:
        yield
    finally:
        rank_module.build_model = original


def _profile(ctx: Ctx, step: Callable[[], Any], steps: int, compiled: bool) -> dict[str, Any]:
    """CUDA kernels, device time and top kernels per step from ``torch.profiler`` (CPU ops in the dry run), and one
    eager step's dispatcher count (``pretrain.kernel_count``; compiled code launches its kernels past the dispatcher,
    and a dispatch mode would make dynamo trace the blocks again)."""
    from torch.profiler import ProfilerActivity, profile

    from pretrain.kernel_count import count_kernels

    counted = count_kernels(step) if not compiled or ctx.dry else None
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if ctx.device.type == "cuda" else [])
    with profile(activities=acts) as prof:
        for _ in range(steps):
            step()
        ctx.sync()
    averages = prof.key_averages()
    if ctx.device.type == "cuda":
        gpu = [e for e in averages if e.device_type == torch.autograd.DeviceType.CUDA]
        kernels = [e for e in gpu if not e.key.startswith(("Memcpy", "Memset"))]
        self_us = lambda e: getattr(e, "self_device_time_total", 0.0)  # noqa: E731
        n_kernels = sum(e.count for e in kernels) / steps
    else:  # the dry run: the CPU ops stand in for kernels
        kernels = [e for e in averages if e.device_type == torch.autograd.DeviceType.CPU]
        self_us = lambda e: e.self_cpu_time_total  # noqa: E731
        n_kernels = None
    total = sum(self_us(e) for e in kernels) or 1.0
    top = sorted(kernels, key=self_us, reverse=True)[:4]
    return dict(
        kernels=n_kernels,
        dispatched=counted.kernels if counted is not None else None,
        host_reads=len(counted.host_reads) if counted is not None else None,
        busy_ms=total / steps / 1e3,
        top="; ".join(f"{e.key[:48]} {self_us(e) / total:.0%}" for e in top),
    )


def _measure(
    ctx: Ctx, step: Callable[[], dict[str, Any]], flops_per_image: float | None, compiled: bool
) -> dict[str, Any]:
    """Warm-up (the first step compiles), timed steps, then the profile; per-step figures."""
    from pretrain.metrics import device_peak_flops, peak_memory_mb

    s = ctx.s
    t0 = time.perf_counter()
    step()
    ctx.sync()
    first = time.perf_counter() - t0
    for _ in range(s["warmup"] - 1):
        step()
    ctx.sync()
    if ctx.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(ctx.device)
    wait, cpu0, t0 = 0.0, time.process_time(), time.perf_counter()
    for _ in range(s["steps"]):
        wait += step().get("data_wait_s", 0.0)
    ctx.sync()
    wall, cpu = time.perf_counter() - t0, time.process_time() - cpu0
    img_s = s["steps"] * s["batch"] / wall
    peak = device_peak_flops(ctx.device, "bf16")
    out = dict(
        img_s=img_s,
        model_img_s=img_s / max(1e-6, 1.0 - wait / wall),
        mfu=flops_per_image * img_s / peak if flops_per_image and peak else None,
        peak_mb=peak_memory_mb(ctx.device),
        first_s=first,
        cpu_ms=cpu / s["steps"] * 1e3,
        step_ms=wall / s["steps"] * 1e3,
        data_wait=wait / wall,
    )
    return out | _profile(ctx, step, s["profile_steps"], compiled)


def _rows(ctx: Ctx, stage: str, label: str, setting: str, got: dict[str, Any]) -> None:
    mfu = f"MFU {got['mfu']:.1%}" if got["mfu"] is not None else "MFU n/a (CPU or unknown peak)"
    ctx.row(
        stage,
        f"{label}: train",
        setting,
        f"{got['img_s']:,.0f} img/s ({got['model_img_s']:,.0f} model-bound), {mfu}, peak {got['peak_mb']:,.0f} MiB, "
        f"{got['step_ms']:.0f} ms/step, data wait {got['data_wait']:.0%}, first step {got['first_s']:.1f} s",
    )
    kernels = f"{got['kernels']:,.0f} CUDA kernels/step" if got["kernels"] is not None else "CPU ops (dry run)"
    if got["dispatched"] is not None:
        kernels += f", {got['dispatched']:,} dispatched kernels/step (kernel_count), {got['host_reads']} host reads"
    busy = f"busy {got['busy_ms']:.1f} ms/step, host CPU {got['cpu_ms']:.0f} ms/step"
    ctx.row(stage, f"{label}: profile", setting, f"{kernels}; {busy}; top: {got['top']}")


def _trainer_run(ctx: Ctx, spec: ModelSpec, compiled: bool) -> tuple[dict[str, Any], str]:
    from pretrain.rank import build_trainer

    cfg = train_config(ctx, spec, compiled, f"{spec.key}_{'compiled' if compiled else 'eager'}")
    factory = (lambda c, build: make_model(spec, c, ctx.dry, build)) if spec.timm_name else None
    with _trainer_model(factory):
        trainer = build_trainer(cfg, ctx.dist)
    how = "trainer.compile (per block)" if compiled else "eager"
    if compiled and spec.timm_name:
        n = compile_peer_blocks(trainer.engine.module, ctx.s["compile_backend"])
        how = f"{n} blocks compiled per block as the engine compiles ours"
    try:
        trainer._batches = trainer._batch_stream()
        got = _measure(ctx, trainer.train_step, trainer.flops_per_image, compiled)
    finally:
        trainer.close()
    setting = f"our trainer, bf16 ZeRO-{cfg.deepspeed.zero_stage}, batch {ctx.s['batch']}, {how}"
    return got, setting


def _timm_loop_run(ctx: Ctx, spec: ModelSpec, compiled: bool) -> tuple[dict[str, Any], str]:
    """ViT-S as timm's train loop steps it: autocast bf16, fused AdamW, mixup/cutmix and label smoothing on the device
    (RandAugment runs in timm's loader workers), nothing else."""
    from data_pipeline.loader import build_data
    from pretrain.loss import soft_target_cross_entropy
    from pretrain.models.flops import count_macs

    cfg = train_config(ctx, spec, False, f"{spec.key}_loop")
    dev = ctx.device
    model = make_model(spec, cfg, ctx.dry).to(dev)
    flops = count_macs(model, cfg.model.img_size) * 1e9 * 2 * 3 if dev.type == "cuda" else None
    how = f"{compile_peer_blocks(model, ctx.s['compile_backend'])} blocks compiled" if compiled else "eager"
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.05, fused=True)
    lean = dataclasses.replace(cfg.augment, randaug_n=0, color_jitter=0.0, random_erasing=0.0)
    data = build_data(
        cfg.data, lean, img_size=cfg.model.img_size, num_classes=cfg.model.num_classes, rank=0, world_size=1,
        pin_memory=dev.type == "cuda",
    )  # fmt: skip
    batches = data.train.iter_batches()
    seed = iter(range(10**9))

    def step() -> dict[str, Any]:
        t0 = time.perf_counter()
        batch = next(batches)
        wait = time.perf_counter() - t0
        labels = batch["label"].to(dev, non_blocking=True).clamp_min(0)
        gen = torch.Generator(device=dev).manual_seed(next(seed))
        images, targets = data.augment(batch["image"].to(dev, non_blocking=True), labels, generator=gen)
        with torch.autocast(dev.type, dtype=torch.bfloat16):
            loss = soft_target_cross_entropy(model(images), targets, batch["valid"].to(dev, non_blocking=True))
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return {"data_wait_s": wait}

    try:
        got = _measure(ctx, step, flops, compiled)
    finally:
        data.train.close()
    return got, f"timm-style loop, autocast bf16, fused AdamW, batch {ctx.s['batch']}, {how}"


def stage_train(ctx: Ctx, compiled: bool, keys: list[str]) -> None:
    """Every model of ``keys`` (then timm's ViT-S loop), in this order, each within its share of the time left."""
    stage = "compile" if compiled else "train"
    specs = [spec for spec in model_specs(ctx.dry) if spec.key in keys]
    runs: list[tuple[ModelSpec, str, Callable]] = [(spec, spec.label, _trainer_run) for spec in specs]
    runs += [(spec, f"{spec.label}: timm-style loop", _timm_loop_run) for spec in specs if spec.key == "vit_s"]
    for i, (spec, label, run) in enumerate(runs):
        budget = ctx.left() / (len(runs) - i)
        try:
            with time_limit(budget):
                got, setting = run(ctx, spec, compiled)
        except StageTimeout:
            ctx.row(stage, f"{label}: train", "", f"INCOMPLETE: its share of the stage budget ({budget:.0f} s) ran out")
            continue
        except torch.OutOfMemoryError:
            ctx.row(stage, f"{label}: train", "", "FAILED: CUDA out of memory")
            continue
        finally:
            torch._dynamo.reset()
            _free()
        key = spec.key + ("_loop" if run is _timm_loop_run else "")
        ctx.results[(stage, key)] = got
        _rows(ctx, stage, label, setting, got)


# --------------------------------------------------------------------------------------------------- infer, loader


def stage_infer(ctx: Ctx, keys: list[str]) -> None:
    specs = [spec for spec in model_specs(ctx.dry) if spec.key in keys]
    for i, spec in enumerate(specs):
        budget = ctx.left() / (len(specs) - i)
        try:
            with time_limit(budget):
                result = _latency(ctx, spec)
        except StageTimeout:
            result = f"INCOMPLETE: its share of the stage budget ({budget:.0f} s) ran out"
        finally:
            _free()
        ctx.row("infer", f"{spec.label}: latency", f"bf16 weights, eager, median of {ctx.s['infer_iters']}", result)


def _latency(ctx: Ctx, spec: ModelSpec) -> str:
    """Median forward time at batch 1 and ``infer_batch`` after 3 warm-up calls (kernel builds, autotuning)."""
    s, dev = ctx.s, ctx.device
    cfg = train_config(ctx, spec, False, f"{spec.key}_infer")
    model = make_model(spec, cfg, ctx.dry).to(dev).eval().to(torch.bfloat16)
    parts = []
    for batch, iters in ((1, s["infer_iters"]), (s["infer_batch"], max(3, s["infer_iters"] // 4))):
        x = torch.randn(batch, 3, s["img_size"], s["img_size"], device=dev, dtype=torch.bfloat16)
        times = []
        with torch.inference_mode():
            for i in range(iters + 3):
                ctx.sync()
                t0 = time.perf_counter()
                model(x)
                ctx.sync()
                if i >= 3:
                    times.append(time.perf_counter() - t0)
        ms = statistics.median(times) * 1e3
        parts.append(f"batch {batch}: {ms:.2f} ms" + (f" ({batch / ms * 1e3:,.0f} img/s)" if batch > 1 else ""))
    return "; ".join(parts)


def stage_loader(ctx: Ctx) -> None:
    data = _load_bench("data_common")  # time_loader: one epoch of the training loader
    s = ctx.s
    wall, _, n = data.time_loader(ctx.work / "shards", s["workers"], s["batch"], s["img_size"])
    rate = n / wall
    rows = [(key, r) for (stage, key), r in ctx.results.items() if stage in ("train", "compile")]
    if rows:
        key, best = max(rows, key=lambda kv: kv[1]["model_img_s"])
        vs = f"{rate / best['model_img_s']:.2f}x the appetite of the fastest model ({key}, {best['model_img_s']:,.0f})"
    else:
        vs = "no training rate to compare with (run the train stage)"
    setting = f"TrainTransform({s['img_size']}), batch {s['batch']}, {s['workers']} workers"
    ctx.row("loader", "one epoch", setting, f"{rate:,.0f} img/s ({n} samples, worker start-up included); {vs}")


STAGES: dict[str, Callable[..., None]] = {
    "data": stage_data,
    "augment": stage_augment,
    "train": lambda ctx, keys: stage_train(ctx, False, keys),
    "infer": stage_infer,
    "loader": stage_loader,
    "compile": lambda ctx, keys: stage_train(ctx, True, keys),
}
"""The stages in their run order (``--stages`` picks some; the data stage also runs whenever the shards are missing)."""
