"""One GPU check, ready to run: training throughput, the loader, SeT vs SDPA and a bf16 kill-and-resume, in one table.

``benchmarks/gpu_check.sh`` prepares the Python environment and runs this script; each stage runs in its own process
group under its own time budget (a stage past its budget is killed and its row says so), so one slow stage cannot eat
the others. Stages:

1. ``data``: synthetic JPEGs (crops of scikit-learn's two sample photos, ``--img-size`` square) in 10 class folders,
   sharded with ``pretrain data build imagefolder:``; the digits shards for the resume check;
2. ``train``: ``pretrain train configs/run/imagenet_<model>.yaml`` for a few dozen bf16 steps on those shards, for
   sepvit_tiny and setformer_tiny, with ``trainer.compile`` off and on; images/s, MFU and peak memory are read from the
   run's ``metrics.jsonl`` (the first log window, start-up and compilation, is left out). A CUDA out-of-memory halves
   the batch and tries again. ``model-bound`` divides out the loader wait (``data_wait_frac``);
3. ``loader``: one epoch of the training loader (``benchmarks/data.py``'s ``time_loader``) with the workers the
   training runs used, against the fastest model's appetite;
4. ``set``: ``SetAttention`` vs ``SoftmaxAttention`` (``benchmarks/set_attention.py``'s layers) forward+backward at
   1k to 64k tokens, on the GPU: CUDA time and ``max_memory_allocated`` (``set_attention.py`` itself measures CPU time
   and RSS, so its ``_build`` is reused here rather than its harness);
5. ``resume``: a 1-rank bf16 digits run on the GPU, SIGKILLed after its first checkpoint, started again with the same
   command, its logged losses compared with an uninterrupted run's (``tests/integration/test_bf16.py`` on CPU).

``--dry-run`` runs every stage at tiny size on CPU (the 32x32 lite models, 3 steps, 1 rank) and writes the table to
``--table`` instead of ``benchmarks/RESULTS.md``; the compile rows are skipped there (CPU inductor compiles take
minutes on a small machine).

Usage::

    bash benchmarks/gpu_check.sh              # on the GPU machine
    bash benchmarks/gpu_check.sh --dry-run    # on CPU, ~1 min
"""

from __future__ import annotations

import argparse
import datetime
import importlib.util
import json
import os
import platform
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

__all__ = ["ROW_CHECKS", "main"]

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "RESULTS.md"
PRETRAIN = [sys.executable, "-m", "launch.cli"]  # `pretrain`, with this interpreter
PGIDS_ENV = "GPU_CHECK_PGIDS"  # a file where every child group is listed, for the driver to kill after a stage

TOKENS = [1024, 4096, 16384, 65536]
# The first column of every row the table has, in order (the dry-run test checks them).
ROW_CHECKS = [
    "data build",
    "train sepvit",
    "train sepvit + compile",
    "train setformer",
    "train setformer + compile",
    "loader",
    *[f"SeT vs SDPA {n // 1024}k tokens" for n in TOKENS],
    "bf16 kill+resume",
]


def _settings(dry: bool) -> dict[str, Any]:
    cpus = os.cpu_count() or 2
    if dry:
        return dict(
            images=240, img_size=32, batch=16, steps=3, log_every=1, compile_steps=3, compile_log_every=1, workers=1,
            tokens=[64, 144, 256, 400],
            dim=32, heads=4, num_ref=8, models={"sepvit": "sepvit_lite_32", "setformer": "setformer_lite_32"},
            configs={f: f"configs/run/digits_{f}_lite.yaml" for f in ("sepvit", "setformer")},
            compile=False, resume=dict(steps=6, every=2, batch=8, workers=1),
            # seconds per stage; the dry run's total stays under ~90 s on 2 busy cores
            budget_s=dict(data=30, train=60, train_compile=60, loader=30, set=30, resume=75),
        )  # fmt: skip
    return dict(
        images=4096, img_size=224, batch=256, steps=20, log_every=5, compile_steps=10, compile_log_every=5,
        workers=max(1, min(12, cpus - 2)), tokens=TOKENS,
        dim=256, heads=8, num_ref=64, models={"sepvit": "sepvit_tiny", "setformer": "setformer_tiny"},
        configs={f: f"configs/run/imagenet_{f}_tiny.yaml" for f in ("sepvit", "setformer")},
        # measured on an H200: ~0.09 s a step (log and checkpoint included), so 30 steps after the kill's checkpoint
        compile=True, resume=dict(steps=40, every=10, batch=16, workers=2),
        # seconds per stage, from two H200 runs: ~15 s start-up a run, a first CUDA step of 5-8 s, then 0.23 s a step
        # for sepvit_tiny and 0.47 s for setformer_tiny at batch 256; sepvit_tiny compiles in ~95 s, setformer_tiny in
        # over 105 s. 15 + 2 x 30 + 2 x 110 + 12 + 18 + 95 = 420 s, under 8 min with gpu_check.sh's install (27-41 s)
        budget_s=dict(data=15, train=30, train_compile=110, loader=12, set=18, resume=95),
    )  # fmt: skip


def _load_bench(name: str):
    """Imports ``benchmarks/<name>.py`` under a private module name (``data`` would shadow other modules)."""
    spec = importlib.util.spec_from_file_location(f"_bench_{name}", ROOT / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _read_jsonl(path: Path) -> list[dict]:
    if not path.exists():
        return []
    events = []
    for line in path.read_text().splitlines():
        try:
            events.append(json.loads(line))
        except json.JSONDecodeError:  # a line cut by SIGKILL
            pass
    return events


class Proc:
    """A child in its own process group, so a kill reaches the ranks and loader workers it started."""

    def __init__(self, cmd: list[str], log: Path, env: dict[str, str] | None = None):
        self.log = log
        self._f = log.open("ab")
        self.proc = subprocess.Popen(
            cmd, cwd=ROOT, stdout=self._f, stderr=subprocess.STDOUT, start_new_session=True, env=env
        )
        if os.environ.get(PGIDS_ENV):  # a stage's own children have their own groups: the driver kills them too
            with open(os.environ[PGIDS_ENV], "a") as f:
                f.write(f"{self.proc.pid}\n")

    def kill(self, sig: int = signal.SIGKILL) -> None:
        try:
            os.killpg(self.proc.pid, sig)
        except ProcessLookupError:
            pass

    def wait(self, timeout: float | None = None) -> int | None:
        """The exit status, or None after killing the group at ``timeout``."""
        try:
            rc = self.proc.wait(timeout=None if timeout is None else max(0.1, timeout))
        except subprocess.TimeoutExpired:
            self.kill()
            self.proc.wait()
            rc = None
        self.kill()  # loader workers or ranks left behind
        self._f.close()
        return rc

    def output(self, chars: int = 4000) -> str:
        return self.log.read_text(errors="replace")[-chars:]


# --- stages: each runs in a child process and writes its rows as JSON lines to <work>/<stage>.jsonl ------------


def _emit(work: Path, stage: str, row: dict) -> None:
    with (work / f"{stage}.jsonl").open("a") as f:
        f.write(json.dumps(row) + "\n")


def _make_jpegs(args: tuple[Path, int, int, int]) -> None:
    import numpy as np
    from PIL import Image
    from sklearn.datasets import load_sample_images

    root, start, stop, size = args
    photos = load_sample_images().images  # two (427, 640, 3) uint8 photographs
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


def stage_data(work: Path, s: dict) -> None:
    from multiprocessing import Pool

    t0 = time.perf_counter()
    photos, shards = work / "photos", work / "shards"
    n, procs = s["images"], max(1, min(8, (os.cpu_count() or 2) - 1))
    chunks = [(photos, i, min(n, i + 256), s["img_size"]) for i in range(0, n, 256)]
    with Pool(procs) as pool:
        pool.map(_make_jpegs, chunks)
    made = time.perf_counter() - t0
    build = [*PRETRAIN, "data", "build", f"imagefolder:{photos}", "--out", str(shards), "--val-fraction", "0.05"]
    build += ["--max-samples-per-shard", "256", "--workers", str(procs), "--no-progress"]
    subprocess.run(build, cwd=ROOT, check=True, capture_output=True)
    digits = [*PRETRAIN, "data", "build", "digits", "--out", str(work / "digits"), "--no-progress"]
    subprocess.run(digits, cwd=ROOT, check=True, capture_output=True)
    manifest = json.loads((shards / "manifest.json").read_text())
    train = manifest["splits"]["train"]
    kib = sum(sh["bytes"] for sh in train["shards"]) / train["num_samples"] / 1024
    result = (
        f"{train['num_samples']} train JPEGs ({kib:.0f} KiB mean) in {len(train['shards'])} shards; made in "
        f"{made:.1f} s, all built in {time.perf_counter() - t0:.1f} s; digits shards for the resume check"
    )
    _emit(
        work, "data", dict(check="data build", setting=f"{s['img_size']}x{s['img_size']}, {procs} procs", result=result)
    )


def _train_overrides(work: Path, s: dict, name: str, batch: int, compile_: bool) -> list[str]:
    return [
        f"data.path={work / 'shards'}",
        f"run.output_dir={work / 'runs'}",
        f"run.name={name}",
        f"trainer.max_steps={s['compile_steps' if compile_ else 'steps']}",
        f"trainer.log_every_steps={s['compile_log_every' if compile_ else 'log_every']}",
        "trainer.eval_every_steps=0",
        "trainer.global_batch_size=0",
        "trainer.precision=bf16",
        f"trainer.compile={str(compile_).lower()}",
        "trainer.progress_bar=false",
        f"data.batch_size={batch}",
        f"data.val_batch_size={batch}",
        f"data.num_workers={s['workers']}",
        f"model.img_size={s['img_size']}",
        "schedule.warmup_steps=0",
        "checkpoint.every_steps=0",
        "checkpoint.every_minutes=0",
        "checkpoint.save_final=false",
        "checkpoint.keep_best=0",
        "logging.tensorboard=false",
    ]


def _train_row(events: list[dict], batch: int) -> dict[str, Any] | None:
    train = [e for e in events if e.get("event") == "train"]
    steady = train[1:]  # the first window holds the first steps' kernel loading (and compilation)
    if not steady:
        return None
    img_s = sum(e["img_per_s"] for e in steady) / len(steady)
    wait = sum(e["data_wait_frac"] for e in steady) / len(steady)
    mfu = [e["mfu"] for e in steady if "mfu" in e]
    return dict(
        img_per_s=img_s,
        model_img_per_s=img_s / max(1e-6, 1 - wait),
        mfu=sum(mfu) / len(mfu) if mfu else None,
        data_wait=wait,
        peak_mem_mb=max(e["peak_mem_mb"] for e in train),
        steps=train[-1]["step"],
        batch=batch,
    )


def stage_train(work: Path, s: dict, family: str, compile_: bool, budget_s: float) -> None:
    check = f"train {family}" + (" + compile" if compile_ else "")
    model = s["models"][family]
    deadline = time.monotonic() + budget_s - 2
    batch = s["batch"]
    while True:
        name = f"{family}_{'compile' if compile_ else 'eager'}_b{batch}"
        run_dir = work / "runs" / name
        cmd = [*PRETRAIN, "train", s["configs"][family], *_train_overrides(work, s, name, batch, compile_)]
        (work / "logs").mkdir(exist_ok=True)
        proc = Proc(cmd, work / "logs" / f"{name}.log")
        rc = proc.wait(timeout=deadline - time.monotonic())
        out = proc.output()
        if rc not in (0, None) and "out of memory" in out.lower() and batch > 8 and time.monotonic() < deadline - 10:
            batch //= 2  # CUDA OOM: half the batch, same budget
            continue
        break
    events = _read_jsonl(run_dir / "metrics.jsonl")
    got = _train_row(events, batch)
    setting = f"{model}, {s['img_size']}², bf16, batch {batch}, {s['workers']} loader workers"
    first = next((e for e in events if e.get("event") == "train"), None)
    if got is None and first is not None:  # a measurement too, not a failure: what the first steps cost
        result = (
            f"INCOMPLETE: the first {first['step']} steps (compilation included) took "
            f"{first['step_time_s'] * first['step']:.0f} s; no later log window within the {budget_s:.0f} s budget"
        )
        _emit(work, "train", dict(check=check, setting=setting, result=result))
        return
    if got is None:
        why = "timed out" if rc is None else f"exit {rc}"
        tail = " | ".join(out.strip().splitlines()[-2:])[-300:]
        _emit(work, "train", dict(check=check, setting=setting, result=f"FAILED ({why}, no steady log window): {tail}"))
        return
    mfu = f"MFU {got['mfu']:.1%}" if got["mfu"] is not None else "MFU n/a (no peak FLOP/s for this device)"
    result = (
        f"{got['img_per_s']:,.0f} img/s ({got['model_img_per_s']:,.0f} model-bound), {mfu}, "
        f"peak {got['peak_mem_mb']:,.0f} MiB, data wait {got['data_wait']:.0%}, {got['steps']} steps; the first "
        f"{first['step']} (compilation included) took {first['step_time_s'] * first['step']:.0f} s"
        + ("" if rc == 0 else " (stopped at the stage budget)")
    )
    _emit(work, "train", dict(check=check, setting=setting, result=result, **got))


def stage_loader(work: Path, s: dict) -> None:
    data = _load_bench("data")
    wall, _, n = data.time_loader(work / "shards", s["workers"], s["batch"], s["img_size"])
    rate = n / wall
    rows = [r for r in _read_stage(work, "train") if "model_img_per_s" in r]
    if rows:
        best = max(rows, key=lambda r: r["model_img_per_s"])
        vs = f"{rate / best['model_img_per_s']:.2f}x the appetite of {best['check']} ({best['model_img_per_s']:,.0f})"
    else:
        vs = "no training rate to compare with"
    result = f"{rate:,.0f} img/s over one epoch ({n} samples, worker start-up included); {vs}"
    setting = f"TrainTransform({s['img_size']}), batch {s['batch']}, {s['workers']} workers"
    _emit(work, "loader", dict(check="loader", setting=setting, result=result))


def _fwd_bwd(layer, x, side: int) -> None:
    layer(x, (side, side)).float().square().mean().backward()
    layer.zero_grad(set_to_none=True)
    x.grad = None


def stage_set(work: Path, s: dict, dry: bool) -> None:
    import torch

    build = _load_bench("set_attention")._build
    device = torch.device("cpu" if dry else "cuda")
    dtype = torch.bfloat16

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize()

    for n, label in zip(s["tokens"], TOKENS):
        side = int(round(n**0.5))
        row = dict(check=f"SeT vs SDPA {label // 1024}k tokens", setting=f"n={n:,}, C={s['dim']}, {s['heads']} heads")
        parts = []
        for impl in ("set", "sdpa"):
            torch.manual_seed(0)
            layer = build(impl, s["dim"], s["heads"], s["num_ref"], 3).to(device, dtype)
            x = torch.randn(1, n, s["dim"], device=device, dtype=dtype, requires_grad=True)

            try:
                _fwd_bwd(layer, x, side)  # warm-up: kernels, autotuning
                sync()
                if device.type == "cuda":
                    torch.cuda.reset_peak_memory_stats(device)
                base = torch.cuda.memory_allocated(device) if device.type == "cuda" else 0
                times = []
                for _ in range(3):
                    t0 = time.perf_counter()
                    _fwd_bwd(layer, x, side)
                    sync()
                    times.append(time.perf_counter() - t0)
                peak = (torch.cuda.max_memory_allocated(device) - base) / 2**20 if device.type == "cuda" else None
                ms = sorted(times)[1] * 1e3
                row[f"{impl}_ms"] = ms
                parts.append(
                    f"{impl.upper() if impl == 'sdpa' else 'SeT'} {ms:.2f} ms"
                    + (f", {peak:,.0f} MiB" if peak is not None else "")
                )
            except torch.OutOfMemoryError:
                parts.append(f"{impl}: CUDA out of memory")
            del layer, x
            if device.type == "cuda":
                torch.cuda.empty_cache()
        if "set_ms" in row and "sdpa_ms" in row:
            parts.append(f"SDPA/SeT time {row['sdpa_ms'] / row['set_ms']:.2f}x")
        row["result"] = "; ".join(parts) + ("" if device.type == "cuda" else " (CPU, no memory figure)")
        _emit(work, "set", row)


def _losses(run_dir: Path) -> dict[int, float]:
    return {e["step"]: e["loss"] for e in _read_jsonl(run_dir / "metrics.jsonl") if e.get("event") == "train"}


def stage_resume(work: Path, s: dict, dry: bool, budget_s: float) -> None:
    steps, every = s["resume"]["steps"], s["resume"]["every"]
    kill_at = every  # the first checkpoint
    deadline = time.monotonic() + budget_s - 2
    overrides = [
        f"data.path={work / 'digits'}",
        f"run.output_dir={work / 'resume'}",
        f"trainer.max_steps={steps}",
        "trainer.precision=bf16",
        f"trainer.device={'cpu' if dry else 'cuda'}",
        "trainer.eval_every_steps=0",
        "trainer.log_every_steps=1",
        "trainer.progress_bar=false",
        f"data.batch_size={s['resume']['batch']}",
        f"data.num_workers={s['resume']['workers']}",
        "model.drop_path_rate=0",
        f"schedule.warmup_steps={min(5, steps)}",
        f"checkpoint.every_steps={every}",
        "checkpoint.every_minutes=0",
        "checkpoint.keep_last=3",
        "checkpoint.keep_best=0",
        "logging.tensorboard=false",
    ]
    config = "configs/run/digits_sepvit_lite.yaml"
    setting = f"sepvit_lite_32 on digits, 1 rank, {steps} steps, SIGKILL after the step-{kill_at} checkpoint"
    logs = work / "logs"
    logs.mkdir(exist_ok=True)

    def fail(why: str, proc: Proc | None = None) -> None:
        tail = " | ".join(proc.output().strip().splitlines()[-2:])[-300:] if proc else ""
        _emit(work, "resume", dict(check="bf16 kill+resume", setting=setting, result=f"FAILED: {why} {tail}".strip()))

    ref = Proc([*PRETRAIN, "train", config, *overrides, "run.name=ref"], logs / "resume_ref.log")
    if ref.wait(timeout=deadline - time.monotonic()) != 0:
        return fail("the uninterrupted run did not finish", ref)
    killed_dir = work / "resume" / "killed"
    cmd = [*PRETRAIN, "train", config, *overrides, "run.name=killed"]
    first = Proc(cmd, logs / "resume_killed.log")
    marker = killed_dir / "checkpoints" / f"step_{kill_at:06d}"
    from pretrain.checkpoint import COMPLETE_MARKER

    while not (marker / COMPLETE_MARKER).exists():
        if first.proc.poll() is not None or time.monotonic() > deadline:
            first.wait(timeout=0)
            return fail(f"no step-{kill_at} checkpoint before the run ended", first)
        time.sleep(0.02)
    first.kill(signal.SIGKILL)
    first.wait()
    logged = max(_losses(killed_dir), default=0)
    if logged >= steps:
        return fail(f"the run finished (step {logged}) before the kill")
    again = Proc(cmd, logs / "resume_again.log")
    if again.wait(timeout=deadline - time.monotonic()) != 0:
        return fail("the resumed run did not finish", again)
    got, want = _losses(killed_dir), _losses(work / "resume" / "ref")
    if sorted(got) != list(range(1, steps + 1)):
        return fail(f"logged steps {sorted(got)}")
    diff = max(abs(got[k] - want[k]) / max(1e-12, abs(want[k])) for k in want)
    verdict = "PASS: the same losses bit for bit" if diff == 0 else f"losses differ: max relative {diff:.2e}"
    result = f"{verdict}; killed at step {logged}, every step logged once, final loss {got[steps]:.4f}"
    _emit(work, "resume", dict(check="bf16 kill+resume", setting=setting, result=result, max_rel_diff=diff))


def _read_stage(work: Path, stage: str) -> list[dict]:
    return _read_jsonl(work / f"{stage}.jsonl")


def run_stage(argv: list[str]) -> int:
    """``--stage NAME WORK DRY [ARG]``: one stage, in this (child) process."""
    name, work, dry = argv[0], Path(argv[1]), argv[2] == "1"
    s = _settings(dry)
    if name == "data":
        stage_data(work, s)
    elif name == "train":
        family, compile_ = argv[3], argv[4] == "1"
        stage_train(work, s, family, compile_, s["budget_s"]["train_compile" if compile_ else "train"])
    elif name == "loader":
        stage_loader(work, s)
    elif name == "set":
        stage_set(work, s, dry)
    elif name == "resume":
        stage_resume(work, s, dry, s["budget_s"]["resume"])
    return 0


# --- the driver ------------------------------------------------------------------------------------------------


def _device_name(dry: bool) -> str:
    if not dry:
        try:
            out = subprocess.run(
                ["nvidia-smi", "--query-gpu=name,memory.total,driver_version", "--format=csv,noheader"],
                capture_output=True, text=True, timeout=20, check=True,
            )  # fmt: skip
            return out.stdout.strip().splitlines()[0]
        except (OSError, subprocess.SubprocessError, IndexError):
            pass
    import torch

    if torch.cuda.is_available():
        return torch.cuda.get_device_name(0)
    return f"CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} cores), dry run"


def _run_child(work: Path, dry: bool, budget_s: float, *stage_args: str) -> tuple[str, float]:
    """Runs one stage in its own process group; returns how it ended and its seconds."""
    cmd = [sys.executable, __file__, "--stage", stage_args[0], str(work), "1" if dry else "0", *stage_args[1:]]
    t0 = time.monotonic()
    pgids = work / "logs" / f"pgids_{'_'.join(stage_args)}"
    proc = Proc(
        cmd, work / "logs" / f"stage_{'_'.join(stage_args)}.log", env=dict(os.environ, **{PGIDS_ENV: str(pgids)})
    )
    rc = proc.wait(timeout=budget_s)
    seconds = time.monotonic() - t0
    for pgid in pgids.read_text().split() if pgids.exists() else []:  # training runs and loader workers it left
        try:
            os.killpg(int(pgid), signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
    if rc is None:
        return f"timed out after {budget_s:.0f} s", seconds
    if rc != 0:
        lines = [ln for ln in proc.output().strip().splitlines() if ln.strip()]
        return f"exit {rc}: {(lines[-1] if lines else '')[-300:]}", seconds
    return "", seconds


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--stage"]:
        return run_stage(argv[1:])
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dry-run", action="store_true", help="every stage at tiny size on CPU; table to --table")
    p.add_argument("--table", default=None, help="write the table here (dry run default: a temp file)")
    p.add_argument("--work", default=None, help="scratch folder (default: a temp folder, removed at the end)")
    p.add_argument("--skip", nargs="*", default=[], choices=["eager", "compile", "loader", "set", "resume"])
    args = p.parse_args(argv)
    dry = args.dry_run or os.environ.get("GPU_CHECK_DRY") == "1"
    s = _settings(dry)
    budget = s["budget_s"]
    work = Path(args.work or tempfile.mkdtemp(prefix="gpu-check-"))
    (work / "logs").mkdir(parents=True, exist_ok=True)
    t_start = time.monotonic()

    def note(msg: str) -> None:
        sys.stderr.write(f"[gpu_check {time.monotonic() - t_start:5.0f} s] {msg}\n")
        sys.stderr.flush()

    skipped: dict[str, str] = {}  # stage file -> why its rows are missing
    ran: dict[str, str] = {}  # check -> "seconds / budget"

    def stage(file: str, checks: list[str], seconds_budget: float, *stage_args: str) -> None:
        note(f"{' '.join(stage_args)}: budget {seconds_budget:.0f} s")
        before = {r["check"] for r in _read_stage(work, file)}
        why, seconds = _run_child(work, dry, seconds_budget, *stage_args)
        for c in checks:
            ran[c] = f"{seconds:.0f} / {seconds_budget:.0f}"
        if why:
            note(f"{' '.join(stage_args)}: {why}")
            for c in checks:
                if c not in before and c not in {r["check"] for r in _read_stage(work, file)}:
                    _emit(work, file, dict(check=c, setting="", result=f"FAILED: {why}"))

    stage("data", ["data build"], budget["data"], "data")
    data_ok = (work / "shards" / "manifest.json").exists()
    for family in ("sepvit", "setformer"):
        for compile_ in (False, True):
            check = f"train {family}" + (" + compile" if compile_ else "")
            if not data_ok:
                skipped[check] = "skipped: no shards (data build failed)"
            elif ("compile" if compile_ else "eager") in args.skip:
                skipped[check] = "skipped (--skip)"
            elif compile_ and not s["compile"]:
                skipped[check] = "skipped in the dry run (CPU inductor compiles take minutes); GPU runs it"
            else:
                key = "train_compile" if compile_ else "train"
                stage("train", [check], budget[key], "train", family, "1" if compile_ else "0")
    if not data_ok or "loader" in args.skip:
        skipped["loader"] = "skipped: no shards" if not data_ok else "skipped (--skip)"
    else:
        stage("loader", ["loader"], budget["loader"], "loader")
    set_checks = [c for c in ROW_CHECKS if c.startswith("SeT vs SDPA")]
    if "set" in args.skip:
        skipped.update(dict.fromkeys(set_checks, "skipped (--skip)"))
    else:
        stage("set", set_checks, budget["set"], "set")
    if not (work / "digits" / "manifest.json").exists() or "resume" in args.skip:
        skipped["bf16 kill+resume"] = "skipped (--skip)" if "resume" in args.skip else "skipped: no digits shards"
    else:
        stage("resume", ["bf16 kill+resume"], budget["resume"], "resume")

    rows = {r["check"]: r for f in ("data", "train", "loader", "set", "resume") for r in _read_stage(work, f)}
    lines = ["| check | setting | result | stage s / budget |", "|---|---|---|---:|"]
    for check in ROW_CHECKS:
        r = rows.get(check, dict(setting="", result=skipped.get(check, "missing: the stage wrote no row")))
        cells = [check, r["setting"], r["result"], ran.get(check, "-")]
        lines.append("| " + " | ".join(c.replace("|", "/") for c in cells) + " |")
    total = time.monotonic() - t_start
    now = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    import torch

    text = "\n".join(
        [
            f"## GPU check{' (dry run on CPU)' if dry else ''}, {now}",
            "",
            f"- device: {_device_name(dry)}; torch {torch.__version__}, Python {platform.python_version()}, "
            f"{os.cpu_count()} CPU cores",
            f"- command: `bash benchmarks/gpu_check.sh{' --dry-run' if dry else ''}` ({total:.0f} s for the stages)",
            "- train rows: mean of the log windows after the first (start-up, compilation); model-bound = img/s / "
            "(1 - data wait); MFU against the device's dense bf16 peak (pretrain/metrics.py PEAK_FLOPS)",
            "",
            *lines,
            "",
        ]
    )
    sys.stdout.write(text + "\n")
    if dry or args.table:
        table = Path(args.table) if args.table else Path(tempfile.mkstemp(prefix="gpu-check-", suffix=".md")[1])
        table.write_text(text)
        note(f"table written to {table}")
    else:
        with RESULTS.open("a") as f:
            f.write("\n" + text)
        note(f"appended to {RESULTS}")
    if not args.work:
        shutil.rmtree(work, ignore_errors=True)
    else:
        note(f"logs under {work / 'logs'}")
    failed = [c for c in ROW_CHECKS if c in rows and re.match(r"FAILED", rows[c]["result"])]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
