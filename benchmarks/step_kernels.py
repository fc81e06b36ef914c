"""Kernels and host reads of one train step, split into the model, the augmentation and the step around them.

A GPU pays for a small model's step in kernel launches and host reads of the device, which CPU timings do not show;
:mod:`pretrain.kernel_count` counts both at the dispatcher, every caller included (DeepSpeed and the optimizer). For
each row this builds the trainer of ``configs/run/digits_sepvit_lite.yaml`` with the row's overrides in a world of one
(data prefetched: the loader's own reads are not the step's), runs two steps, and counts the third:

- **model**: the model's own forward and backward, counted alone on a fresh copy (same dtype, train mode);
- **augmentation**: the device-side augmentation call inside the step (a nested counter);
- **outside**: everything else in the step: input cast, loss, the loss all-reduce, DeepSpeed's backward hooks and
  optimizer step, clipping, the EMA;
- **host reads**: every read of the device in the step, by caller (``op@file:function``).

The first row is issue 22's step: sepvit_lite, bf16, ZeRO-2, EMA, and the augmentation settings of
``configs/run/imagenet_sepvit_tiny.yaml``.

Usage::

    python benchmarks/step_kernels.py                      # the working tree; appends to benchmarks/RESULTS.md
    python benchmarks/step_kernels.py --baseline HEAD      # the same rows at revision HEAD too (git archive)
    python benchmarks/step_kernels.py --rows issue --no-append

Both sides are counted with the working tree's ``pretrain/kernel_count.py``.
"""

from __future__ import annotations

import argparse
import datetime
import importlib.util
import json
import os
import platform
import subprocess
import sys
import tempfile
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "RESULTS.md"

IMAGENET_AUGMENT = [  # configs/run/imagenet_sepvit_tiny.yaml's augment section
    "augment.scale_min=0.08", "augment.hflip=0.5", "augment.randaug_n=2", "augment.randaug_m=9.0",
    "augment.randaug_mstd=0.5", "augment.color_jitter=0.4", "augment.mixup_alpha=0.8", "augment.cutmix_alpha=1.0",
    "augment.mix_prob=1.0", "augment.switch_prob=0.5", "augment.label_smoothing=0.1", "augment.random_erasing=0.25",
]  # fmt: skip
ROWS = {
    "issue": ("bf16 ZeRO-2 EMA", ["trainer.precision=bf16", "deepspeed.zero_stage=2", "trainer.ema_decay=0.9998"]),
    "bf16-z0": ("bf16 ZeRO-0 EMA", ["trainer.precision=bf16", "deepspeed.zero_stage=0", "trainer.ema_decay=0.9998"]),
    "bf16-z1": ("bf16 ZeRO-1 EMA", ["trainer.precision=bf16", "deepspeed.zero_stage=1", "trainer.ema_decay=0.9998"]),
    "fp32-z0": ("fp32 ZeRO-0 EMA", ["deepspeed.zero_stage=0", "trainer.ema_decay=0.9998"]),
    "fp32-z1": ("fp32 ZeRO-1 EMA", ["deepspeed.zero_stage=1", "trainer.ema_decay=0.9998"]),
    "fp32-z2": ("fp32 ZeRO-2 EMA", ["deepspeed.zero_stage=2", "trainer.ema_decay=0.9998"]),
    "fp32-z3": ("fp32 ZeRO-3 (no EMA)", ["deepspeed.zero_stage=3"]),
}

WORKER = r"""
import importlib.util, json, sys
from collections import Counter
import torch

spec = importlib.util.spec_from_file_location("counter", sys.argv[1])
counter_mod = sys.modules["counter"] = importlib.util.module_from_spec(spec)
spec.loader.exec_module(counter_mod)
from pretrain.config import load_config
from pretrain.distributed import init_distributed
from pretrain.rank import build_model, build_trainer, resolve_num_classes

dist = init_distributed(device="cpu")
out = {}
for name, overrides in json.loads(sys.argv[2]).items():
    cfg = resolve_num_classes(load_config("configs/run/digits_sepvit_lite.yaml", overrides + [f"run.name={name}"]))
    cfg.run_dir.mkdir(parents=True)
    trainer = build_trainer(cfg, dist)
    augment, aug = trainer.data.augment, []

    def counted(*args, **kwargs):
        with counter_mod.KernelCounter() as c:
            result = augment(*args, **kwargs)
        aug.append(c.count.kernels)
        return result

    trainer.data.augment = counted
    stream = trainer._batch_stream()
    trainer._batches = iter([next(stream) for _ in range(3)])
    # the steps not yet logged (a --baseline revision before pretrain.run_state keeps them on the trainer)
    window = trainer.state.window if hasattr(trainer, "state") else trainer._window
    for _ in range(2):
        window.add(trainer.train_step())
    aug.clear()
    with counter_mod.KernelCounter() as c:
        window.add(trainer.train_step())
    step = c.count
    model = build_model(cfg).to(next(trainer.engine.module.parameters()).dtype).train()
    x = torch.randn(cfg.data.batch_size, 3, cfg.model.img_size, cfg.model.img_size, dtype=model.head.weight.dtype)

    def fwd_bwd():
        y = model(x)
        y.backward(torch.ones_like(y))

    fwd_bwd()
    model.zero_grad(set_to_none=True)
    out[name] = {"step": step.kernels, "model": counter_mod.count_kernels(fwd_bwd).kernels, "aug": sum(aug),
                 "reads": step.host_reads, "collectives": dict(step.collectives),
                 "params": len(list(trainer.engine.module.parameters())), "top": step.top(8)}
    trainer.close()
print("RESULT " + json.dumps(out))
"""


def measure(tree: Path, rows: list[str], out_dir: Path, threads: int) -> dict:
    """Count ``rows`` with the code of ``tree`` (a fresh world-of-one process run from that tree)."""
    common = [
        f"data.path={ROOT / 'data' / 'digits'}",
        f"run.output_dir={out_dir}",
        "data.num_workers=0",
        "trainer.progress_bar=false",
        "trainer.log_every_steps=1000",
        *IMAGENET_AUGMENT,
    ]
    cases = {name: [*common, *ROWS[name][1]] for name in rows}
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT")}
    env.update(DS_ACCELERATOR="cpu", OMP_NUM_THREADS=str(threads), PYTHONPATH=str(tree))
    proc = subprocess.run(
        [sys.executable, "-c", WORKER, str(ROOT / "pretrain" / "kernel_count.py"), json.dumps(cases)],
        cwd=tree,
        env=env,
        capture_output=True,
        text=True,
        timeout=1800,
    )
    if proc.returncode != 0:
        raise SystemExit(f"the worker failed in {tree}:\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.split("RESULT ", 1)[1])


def reads_by_caller(reads: list[str]) -> str:
    if not reads:
        return "none"
    return ", ".join(f"{n} x `{r}`" for r, n in Counter(reads).most_common())


def table(results: dict[str, dict], label: str) -> list[str]:
    lines = [
        f"| {label} | model fwd+bwd | augmentation | outside | step total | host reads | reads by caller |",
        "|---|---:|---:|---:|---:|---:|---|",
    ]
    for name, r in results.items():
        outside = r["step"] - r["model"] - r["aug"]
        lines.append(
            f"| {ROWS[name][0]} | {r['model']} | {r['aug']} | {outside} | {r['step']} | {len(r['reads'])} | "
            f"{reads_by_caller(r['reads'])} |"
        )
    return lines


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rows", nargs="+", default=list(ROWS), choices=list(ROWS), help="rows to count (default: all)")
    p.add_argument("--baseline", default=None, help="also count at this git revision (e.g. HEAD), for before/after")
    p.add_argument("--threads", type=int, default=1, help="intra-op threads of the worker (counts do not depend on it)")
    p.add_argument("--note", default="", help="a line added under the table")
    p.add_argument("--no-append", action="store_true", help="print only; do not append to benchmarks/RESULTS.md")
    args = p.parse_args(argv)
    if not (ROOT / "data" / "digits" / "manifest.json").exists():
        raise SystemExit("needs the digits shards: pretrain data build digits --out data/digits")
    with tempfile.TemporaryDirectory(prefix="step_kernels_") as tmp:
        sections = []
        if args.baseline:
            base = Path(tmp) / "baseline"
            base.mkdir()
            archive = subprocess.run(["git", "archive", args.baseline], cwd=ROOT, capture_output=True, check=True)
            subprocess.run(["tar", "-x", "-C", str(base)], input=archive.stdout, check=True)
            rev = subprocess.run(
                ["git", "rev-parse", "--short", args.baseline], cwd=ROOT, capture_output=True, text=True, check=True
            ).stdout.strip()
            sections.append(table(measure(base, args.rows, Path(tmp) / "runs_base", args.threads), f"before ({rev})"))
        after = measure(ROOT, args.rows, Path(tmp) / "runs", args.threads)
        sections.append(table(after, "after (working tree)" if args.baseline else "step"))
    now = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    command = "python benchmarks/step_kernels.py " + " ".join(argv if argv is not None else sys.argv[1:])
    issue = after.get("issue")
    lines = [
        f"## Step kernels and host reads ({now})",
        "",
        f"Machine: {platform.node()} ({os.cpu_count()} CPUs, {platform.platform()}), torch "
        f"{_torch_version()}, world of one, batch 16 at 32x32 (counts do not depend on the batch size)  ",
        f"Command: `{command.strip()}`",
        "",
    ]
    for section in sections:
        lines += [*section, ""]
    lines.append(
        "- sepvit_lite (`configs/run/digits_sepvit_lite.yaml`), the ImageNet augmentation settings, one counted step "
        "after two; model = the model's own forward+backward counted alone, outside = step - model - augmentation."
    )
    if issue is not None:
        lines.append(f"- {issue['params']} parameter tensors; top kernels of the issue step: {issue['top']}")
    if args.note:
        lines.append(f"- {args.note}")
    text = "\n".join(lines) + "\n"
    print(text)
    if not args.no_append:
        with RESULTS.open("a") as f:
            f.write("\n" + text)
    return 0


def _torch_version() -> str:
    spec = importlib.util.find_spec("torch")
    return "?" if spec is None else __import__("torch").__version__


if __name__ == "__main__":
    sys.exit(main())
