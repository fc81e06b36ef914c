"""The GPU check: our models against timm's Swin-T and ViT-S in one process, on the same data, bf16, batch 256.

``benchmarks/gpu_check.sh`` prepares the Python environment and runs this script, at most 8 minutes in all. The
stages (``benchmarks/gpu_stages.py``) run one after another in this process, each within its budget, and every row
is appended to ``benchmarks/RESULTS.md`` the moment it is measured, so a stage cut short by its budget (or the whole
run by the outer timeout) leaves every row finished before it:

1. ``data``: synthetic 224x224 JPEG shards (runs first whenever the shards are missing);
2. ``augment``: the device augmentation before issue 22 (every op on the whole batch), grouped (torch) and fused
   (Triton): ms and kernels per batch, and the Triton kernels' pixels against the torch path's;
3. ``train``: eager training of sepvit_tiny, setformer_tiny, timm's Swin-T and ViT-S through our trainer's step, and
   ViT-S in a timm-style loop: img/s, MFU, peak memory, then a CUDA profile (kernels and device time per step, top
   kernels, host CPU time per step);
4. ``infer``: inference latency at batch 1 and 64;
5. ``loader``: the loader's img/s against the fastest model's appetite;
6. ``compile``: as ``train``, compiled per block (our models through ``trainer.compile``).

After ``train`` and ``compile``, ``targets`` rows give the ratios issue 22 asks for: sepvit_tiny / Swin-T img/s
(>= 1), setformer_tiny / Swin-T (>= 0.8), sepvit_tiny's MFU compiled (>= 30%), and kernels per step of our trainer
over timm's loop with ViT-S (<= 1.3).

``--stages`` and ``--models`` rerun part of it (a short lease reruns what failed); ``--table FILE`` writes the rows
to FILE instead of RESULTS.md (somewhere that outlives a lent machine). ``--dry-run`` runs every stage at tiny size on
CPU (the 32x32 lite models, models of our registry standing in for timm's, dynamo disabled so the compile stage makes
the compile calls without tracing) and writes the table to ``--table`` (default: a temp file), never to RESULTS.md.

Usage::

    bash benchmarks/gpu_check.sh                               # on the GPU machine
    bash benchmarks/gpu_check.sh --stages compile --models setformer vit_s
    bash benchmarks/gpu_check.sh --dry-run                     # on CPU, 25-55 s on 2 busy cores
"""

from __future__ import annotations

import argparse
import datetime
import importlib.util
import logging
import os
import platform
import shutil
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any

__all__ = ["MODEL_KEYS", "STAGE_NAMES", "main", "settings"]

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "RESULTS.md"
STAGE_NAMES = ("data", "augment", "train", "infer", "loader", "compile")
MODEL_KEYS = ("sepvit", "setformer", "swin_t", "vit_s")
NEED_SHARDS = ("train", "infer", "loader", "compile")


def settings(dry: bool) -> dict[str, Any]:
    """Sizes, step counts and per-stage budgets (seconds)."""
    if dry:
        return dict(
            images=160, img_size=32, batch=8, warmup=1, steps=2, profile_steps=1, augment_repeats=1, infer_batch=4,
            infer_iters=4, workers=1, train_workers=1, compile_backend="eager",
            budget_s=dict(data=40, augment=40, train=90, infer=20, loader=20, compile=90),
        )  # fmt: skip
    workers = max(1, min(12, (os.cpu_count() or 2) - 2))
    return dict(
        images=4096, img_size=224, batch=256, warmup=3, steps=10, profile_steps=2, augment_repeats=5, infer_batch=64,
        infer_iters=20, workers=workers, train_workers=workers, compile_backend="inductor",
        # 410 s of stages + ~10 s of imports + the install (<= 45 s from carried wheels) < 8 min. Estimates, nothing
        # measured yet: augment builds 6 Triton kernels (a few s each); compile gets the most, 5 runs of per-block
        # compilation at ~40 s each
        budget_s=dict(data=20, augment=55, train=95, infer=25, loader=15, compile=200),
    )  # fmt: skip


def _stages_module():
    """``benchmarks/gpu_stages.py`` under a private name (benchmarks/ on sys.path would shadow other modules)."""
    name = "_gpu_stages"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, ROOT / "benchmarks" / "gpu_stages.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module  # before exec: its dataclasses look their module up
        spec.loader.exec_module(module)
    return sys.modules[name]


class Report:
    """The table, appended line by line to ``path`` (and echoed to stdout) as rows are measured."""

    def __init__(self, path: Path, header: list[str]):
        self.path = path
        self.rows: list[list[str]] = []
        self._write(["", *header, "", "| stage | check | setting | result |", "|---|---|---|---|"])

    def _write(self, lines: list[str]) -> None:
        with self.path.open("a") as f:
            f.write("\n".join(lines) + "\n")
        sys.stdout.write("\n".join(lines) + "\n")
        sys.stdout.flush()

    def row(self, stage: str, check: str, setting: str, result: str) -> None:
        cells = [stage, check, setting, result]
        self.rows.append(cells)
        self._write(["| " + " | ".join(c.replace("|", "/").replace("\n", " ") for c in cells) + " |"])

    def note(self, text: str) -> None:
        self._write(["", text])


def _targets(ctx: Any, stage: str) -> None:
    """The ratios issue 22 sets as targets, from this stage's rows (model-bound img/s: the loader's waits out)."""
    got = {key: r for (st, key), r in ctx.results.items() if st == stage}
    dry = " (dry run: stand-ins, not a measurement)" if ctx.dry else ""

    def ratio(num: str, den: str, field: str, target: str) -> str:
        skipped = [k for k in (num, den) if k.removesuffix("_loop") not in ctx.keys[stage]]
        if skipped:
            return f"n/a: {', '.join(skipped)} not run in this {'dry run' if ctx.dry else 'run'} (--models)"
        if num not in got or den not in got or not got[den].get(field):
            return f"n/a: a row is missing ({num}, {den})"
        a, b = got[num][field], got[den][field]
        return f"{a / b:.2f}x ({a:,.1f} / {b:,.1f}; target {target}){dry}"

    ctx.row("targets", f"{stage}: sepvit_tiny / Swin-T img/s", "", ratio("sepvit", "swin_t", "model_img_s", ">= 1"))
    ctx.row(
        "targets", f"{stage}: setformer_tiny / Swin-T img/s", "", ratio("setformer", "swin_t", "model_img_s", ">= 0.8")
    )
    field = "dispatched" if ctx.dry else "kernels"  # no CUDA profile on CPU: the dispatcher's count stands in
    kernels = ratio("vit_s", "vit_s_loop", field, "<= 1.3")
    ctx.row("targets", f"{stage}: kernels/step, our trainer / timm loop (ViT-S)", "", kernels)
    ctx.row(
        "targets",
        f"{stage}: kernels/step, sepvit_tiny / timm loop ViT-S",
        "",
        ratio("sepvit", "vit_s_loop", field, "-"),
    )
    if stage == "compile":
        mfu = got.get("sepvit", {}).get("mfu")
        result = f"{mfu:.1%} (target >= 30%)" if mfu is not None else "n/a (no row, or no peak FLOP/s on this device)"
        ctx.row("targets", "compile: sepvit_tiny MFU", "", result)


def _parse(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dry-run", action="store_true", help="every stage at tiny size on CPU; table to --table")
    p.add_argument("--stages", nargs="+", default=None, help=f"some of {', '.join(STAGE_NAMES)} (default: all)")
    p.add_argument("--models", nargs="+", default=None, help=f"some of {', '.join(MODEL_KEYS)} (default: all)")
    p.add_argument("--table", default=None, help="write the table here (dry run default: a temp file)")
    p.add_argument("--work", default=None, help="scratch folder, kept (default: a temp folder, removed at the end)")
    args = p.parse_args(argv)
    args.stages = [s for item in (args.stages or STAGE_NAMES) for s in item.split(",") if s]
    args.models = [m for item in (args.models or MODEL_KEYS) for m in item.split(",") if m]
    for kind, got, known in (("stage", args.stages, STAGE_NAMES), ("model", args.models, MODEL_KEYS)):
        unknown = [x for x in got if x not in known]
        if unknown:
            p.error(f"unknown {kind} {', '.join(unknown)}: choose from {', '.join(known)}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = _parse(sys.argv[1:] if argv is None else argv)
    dry = args.dry_run or os.environ.get("GPU_CHECK_DRY") == "1"
    if dry:  # before triton and DeepSpeed are imported: the Triton augmentation runs interpreted, DeepSpeed on CPU
        os.environ.setdefault("TRITON_INTERPRET", "1")
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    import torch

    if not dry and not torch.cuda.is_available():
        sys.stderr.write("gpu_check: torch sees no CUDA device; run with --dry-run on CPU\n")
        return 2
    st = _stages_module()
    s = settings(dry)
    if dry:
        torch._dynamo.config.disable = True  # the compile calls are made; CPU tracing would take minutes
    work = Path(args.work or tempfile.mkdtemp(prefix="gpu-check-"))
    work.mkdir(parents=True, exist_ok=True)
    table = Path(args.table) if args.table else None
    if dry and table is None:
        table = Path(tempfile.mkstemp(prefix="gpu-check-", suffix=".md")[1])
    device = torch.device("cpu" if dry else "cuda")
    now = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    name = torch.cuda.get_device_name(0) if not dry else f"CPU ({platform.machine()}, {os.cpu_count()} cores)"
    report = Report(
        table or RESULTS,
        [
            f"## GPU check{' (dry run on CPU)' if dry else ''}, {now}",
            "",
            f"- device: {name}; torch {torch.__version__}, Python {platform.python_version()}, {os.cpu_count()} CPUs",
            f"- command: `bash benchmarks/gpu_check.sh {' '.join(argv if argv is not None else sys.argv[1:])}`"
            f"; stages {', '.join(args.stages)}; models {', '.join(args.models)}",
            "- rows are appended as measured; model-bound img/s = img/s / (1 - data wait); MFU against the device's "
            "dense bf16 peak (pretrain/metrics.py PEAK_FLOPS)"
            + ("; dry run: dynamo disabled, so the compile rows run eagerly" if dry else ""),
        ],
    )
    ctx = st.Ctx(work=work, s=s, dry=dry, device=device, row=report.row)
    t_start = time.monotonic()
    todo = list(args.stages)
    if any(x in todo for x in NEED_SHARDS) and "data" not in todo and not (work / "shards" / "manifest.json").exists():
        todo.insert(0, "data")  # a bare machine: the shards first
    for stage in [x for x in STAGE_NAMES if x in todo]:
        if stage in NEED_SHARDS and not (work / "shards" / "manifest.json").exists():
            report.row(stage, "stage", "", "skipped: no shards (the data stage failed)")
            continue
        budget = s["budget_s"][stage]
        ctx.deadline = time.monotonic() + budget
        t0 = time.monotonic()
        sys.stderr.write(f"[gpu_check {t0 - t_start:5.0f} s] {stage}: budget {budget} s\n")
        try:
            if stage in ("train", "compile") and ctx.dist is None:
                from pretrain.distributed import init_distributed

                ctx.dist = init_distributed(device=device.type)
            keys = list(args.models)
            if stage == "compile" and dry:  # dynamo is off: one model per compile path (trainer, peer, timm loop)
                keys = [k for k in keys if k in ("sepvit", "vit_s")]
            ctx.keys[stage] = keys
            fn = st.STAGES[stage]
            with st.time_limit(budget + 5):  # the model runs keep to their shares; this guards the rest
                fn(ctx, keys) if stage in ("train", "infer", "compile") else fn(ctx)
        except st.StageTimeout as e:
            report.row(stage, "stage", "", f"INCOMPLETE: {e}; the rows above are what it finished")
        except Exception as e:
            traceback.print_exc()
            report.row(stage, "stage", "", f"FAILED: {type(e).__name__}: {str(e)[:300]}")
        if stage in ("train", "compile"):
            _targets(ctx, stage)
        sys.stderr.write(f"[gpu_check {time.monotonic() - t_start:5.0f} s] {stage}: {time.monotonic() - t0:.0f} s\n")
    report.note(f"- {time.monotonic() - t_start:.0f} s for the stages")
    if args.work is None:
        shutil.rmtree(work, ignore_errors=True)
    if table is not None:
        sys.stderr.write(f"gpu_check: table written to {table}\n")
    return 1 if any(cells[3].startswith("FAILED") for cells in report.rows) else 0


if __name__ == "__main__":
    sys.exit(main())
