"""Whole-model training throughput on CPU: forward+backward images/s of every registered variant, and GMACs.

For each variant: build it at ``--img-size`` (fresh seed, train mode), run ``--warmup`` forward+backward steps on a
random ``(batch, 3, S, S)`` batch with a cross-entropy loss, then time ``--iters`` more. The table reports the median
and best step, images/s from the median, forward GMACs per image (``pretrain.models._flops.count_macs``) and the
compute rate this implies (``3 x 2 x GMACs`` FLOPs per image for forward+backward), which is easier to compare across
noisy runs than raw time. A second table compares ``setformer_tiny`` with ``attention=set`` and ``attention=softmax``
at 224 and 448 (skipped if SeTformer is not registered).

Usage::

    python benchmarks/models.py                                  # all variants, batch 8 at 224, appends to RESULTS.md
    python benchmarks/models.py --variants sepvit --iters 3 --no-compare
    python benchmarks/models.py --variants sepvit_lite --batch 32 --no-append
    python benchmarks/models.py --compare-only --compare-batch 2 --compare-sizes 224 448
"""

from __future__ import annotations

import argparse
import datetime
import gc
import logging
import os
import platform
import shlex
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # run as a script from anywhere
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

__all__ = ["main", "time_train_step"]

logger = logging.getLogger(__name__)

RESULTS = ROOT / "benchmarks" / "RESULTS.md"


def time_train_step(
    name: str, img_size: int, batch: int, warmup: int, iters: int, **kwargs
) -> dict[str, float | int | str]:
    """Median/best seconds of one forward+backward step of variant ``name``, and its forward GMACs per image."""
    from pretrain.models import create_model
    from pretrain.models._flops import count_macs, count_params

    torch.manual_seed(0)
    model = create_model(name, img_size=img_size, **kwargs).train()
    gmacs = count_macs(model, img_size)
    x = torch.randn(batch, 3, img_size, img_size)
    target = torch.randint(0, 1000, (batch,))
    times = []
    for i in range(warmup + iters):
        t0 = time.perf_counter()
        model.zero_grad(set_to_none=True)
        torch.nn.functional.cross_entropy(model(x), target).backward()
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    med = statistics.median(times)
    row = dict(model=name, img_size=img_size, params_m=count_params(model) / 1e6, gmacs=gmacs)
    row.update(batch=batch, median_s=med, best_s=min(times), img_per_s=batch / med)
    row["gflop_per_s"] = 6 * gmacs * batch / med  # forward+backward ~ 3 x forward, 2 FLOPs per MAC
    del model, x
    gc.collect()
    return row


def _select(patterns: list[str] | None, known: list[str]) -> list[str]:
    if not patterns:
        return known
    chosen = []
    for pat in (p for raw in patterns for p in raw.split(",") if p):
        hits = [pat] if pat in known else [n for n in known if n.startswith(pat.rstrip("*"))]
        if not hits:
            raise SystemExit(f"unknown variant '{pat}'; known: {', '.join(known)}")
        chosen += [h for h in hits if h not in chosen]
    return chosen


def _table(rows: list[dict], first_col: str) -> list[str]:
    head = f"| {first_col} | img | params (M) | GMACs/img | batch | median s/step | best s/step | img/s | GFLOP/s |"
    lines = [head, "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(
            f"| {r['label']} | {r['img_size']} | {r['params_m']:.2f} | {r['gmacs']:.2f} | {r['batch']} | "
            f"{r['median_s']:.3f} | {r['best_s']:.3f} | {r['img_per_s']:.1f} | {r['gflop_per_s']:.1f} |"
        )
    return lines


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--variants", nargs="+", default=None, help="names or prefixes (default: every registered one)")
    p.add_argument("--img-size", type=int, default=224)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--warmup", type=int, default=2, help="untimed steps first (allocator, thread pools, kernels)")
    p.add_argument("--iters", type=int, default=3, help="timed steps")
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="torch intra-op threads")
    p.add_argument("--no-compare", action="store_true", help="skip the setformer_tiny set-vs-softmax table")
    p.add_argument("--compare-only", action="store_true", help="only the setformer_tiny set-vs-softmax table")
    p.add_argument("--compare-sizes", type=int, nargs="+", default=[224, 448])
    p.add_argument("--compare-batch", type=int, default=None, help="batch of the comparison (default: --batch)")
    p.add_argument("--no-append", action="store_true", help=f"do not append to {RESULTS.relative_to(ROOT)}")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)

    import pretrain.models

    load_before = os.getloadavg()
    known = pretrain.models.list_models()
    rows = []
    for name in [] if args.compare_only else _select(args.variants, known):
        logger.info("%s at %d, batch %d ...", name, args.img_size, args.batch)
        r = time_train_step(name, args.img_size, args.batch, args.warmup, args.iters)
        rows.append({**r, "label": name})
        logger.info("  %.1f img/s", r["img_per_s"])

    compare = []
    if not args.no_compare:
        if "setformer_tiny" not in known:
            logger.info("setformer_tiny is not registered: skipping the set-vs-softmax comparison")
        else:
            batch = args.compare_batch or args.batch
            for size in args.compare_sizes:
                for attention in ("set", "softmax"):
                    logger.info("setformer_tiny attention=%s at %d, batch %d ...", attention, size, batch)
                    r = time_train_step("setformer_tiny", size, batch, args.warmup, args.iters, attention=attention)
                    compare.append({**r, "label": f"setformer_tiny ({attention})"})
                    logger.info("  %.1f img/s", r["img_per_s"])

    cmd = shlex.join(["python", "benchmarks/models.py", *(sys.argv[1:] if argv is None else argv)])
    machine = (
        f"{platform.platform()}, {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
        f"torch {torch.__version__}, {args.threads} threads; load average before/after "
        f"{load_before[0]:.1f}/{os.getloadavg()[0]:.1f} (a shared machine: other jobs compete for the cores)"
    )
    out = [
        f"## Model training throughput (CPU), {datetime.datetime.now().isoformat(timespec='minutes')}",
        "",
        f"- machine: {machine}",
        f"- command: `{cmd}`",
        f"- forward+backward (cross-entropy) of a random batch, {args.warmup} warmup + {args.iters} timed steps; "
        "img/s from the median step; GFLOP/s = 6 x GMACs x batch / median",
        "",
    ]
    if rows:
        out += _table(rows, "model") + [""]
    if compare:
        out += ["SeT vs softmax attention in the same backbone:", ""] + _table(compare, "model (attention)") + [""]
    text = "\n".join(out)
    sys.stdout.write(text + "\n")
    if not args.no_append:
        new = not RESULTS.exists()
        with RESULTS.open("a") as f:
            f.write(("# Benchmark results\n\n" if new else "\n") + text)
        logger.info("appended to %s", RESULTS)
    return 0


if __name__ == "__main__":
    sys.exit(main())
