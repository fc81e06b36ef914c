"""Whole-model training throughput on CPU: forward+backward images/s of every registered variant, and GMACs.

For each variant: build it at ``--img-size`` (fresh seed, train mode), run ``--warmup`` forward+backward steps on a
random ``(batch, 3, S, S)`` batch with a cross-entropy loss, then time ``--iters`` more. The table reports the median
and best step, images/s from the median, forward GMACs per image (``pretrain.models.flops.count_macs``) and the
compute rate this implies (``3 x 2 x GMACs`` FLOPs per image for forward+backward), which is easier to compare across
noisy runs than raw time. A second table compares ``setformer_tiny`` with ``attention=set`` and ``attention=softmax``
at 224 and 448 (skipped if SeTformer is not registered).

Usage::

    python benchmarks/models.py                                  # all variants, batch 8 at 224, appends to RESULTS.md
    python benchmarks/models.py --variants sepvit --iters 3 --no-compare
    python benchmarks/models.py --variants sepvit_lite --batch 32 --no-append
    python benchmarks/models.py --compare-only --compare-batch 2 --compare-sizes 224 448

Before/after (``--baseline REV``): the ``pretrain/`` package of git revision ``REV`` is extracted with ``git archive``
into a temporary directory (``--after REV`` does the same for the "after" side, default the working tree), and each
variant runs ``--rounds`` times in each tree, alternating (ABBA order: baseline first in even rounds, current first
in odd ones), every run a fresh process with ``--threads`` threads that times
``--iters`` steps after ``--warmup``. The table gives the median over rounds of each run's median step, the speedup
of the current tree, and, for every run, a matmul-bound reference measured in that same process: a loop of plain
``torch.mm`` of 1024x1024 matrices doing the FLOPs of one step (6 x GMACs x batch), so GFLOP/s of the model sits next
to what the same threads reach on a GEMM at that moment. ``--profile`` adds, per tree and variant, the top operators
of one profiled step by self CPU time (``torch.profiler``)::

    python benchmarks/models.py --variants sepvit_tiny setformer_tiny --baseline HEAD~3 --rounds 5 --threads 2
    python benchmarks/models.py --variants sepvit_tiny --baseline HEAD~3 --rounds 1 --profile --no-append
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import logging
import os
import platform
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TREE = os.environ.get("BENCH_MODELS_TREE")  # a worker of --baseline imports pretrain/ from there
if (TREE or str(ROOT)) not in sys.path:  # run as a script from anywhere
    sys.path.insert(0, TREE or str(ROOT))

import torch  # noqa: E402

__all__ = ["main", "matmul_reference", "time_train_step"]

logger = logging.getLogger(__name__)

RESULTS = ROOT / "benchmarks" / "RESULTS.md"


def time_train_step(
    name: str, img_size: int, batch: int, warmup: int, iters: int, **kwargs
) -> dict[str, float | int | str]:
    """Median/best seconds of one forward+backward step of variant ``name``, and its forward GMACs per image."""
    from pretrain.models import create_model
    from pretrain.models.flops import count_macs, count_params

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


def matmul_reference(gflop: float, n: int = 1024) -> float:
    """GFLOP/s of a plain ``torch.mm`` loop of (n x n) @ (n x n) doing about ``gflop`` GFLOP (after one warm-up)."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    out = torch.empty(n, n)
    reps = max(1, round(gflop * 1e9 / (2 * n**3)))
    torch.mm(a, b, out=out)
    t0 = time.perf_counter()
    for _ in range(reps):
        torch.mm(a, b, out=out)
    return 2 * n**3 * reps / (time.perf_counter() - t0) / 1e9


def profile_step(name: str, img_size: int, batch: int, top: int = 15) -> list[dict]:
    """Top ``top`` operators of one forward+backward step (after one warm-up step) by self CPU time."""
    from torch.profiler import ProfilerActivity, profile

    from pretrain.models import create_model

    torch.manual_seed(0)
    model = create_model(name, img_size=img_size).train()
    x = torch.randn(batch, 3, img_size, img_size)
    target = torch.randint(0, 1000, (batch,))

    def step() -> None:
        model.zero_grad(set_to_none=True)
        torch.nn.functional.cross_entropy(model(x), target).backward()

    step()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        step()
    events = prof.key_averages()
    total = sum(e.self_cpu_time_total for e in events)
    rows = sorted(events, key=lambda e: -e.self_cpu_time_total)[:top]
    return [
        dict(op=e.key, self_ms=e.self_cpu_time_total / 1e3, share=e.self_cpu_time_total / total, calls=e.count)
        for e in rows
    ] + [dict(op="total", self_ms=total / 1e3, share=1.0, calls=sum(e.count for e in events))]


def _worker(args: argparse.Namespace) -> int:
    name = args.variants[0]
    if args.profile:
        res = dict(profile=profile_step(name, args.img_size, args.batch))
    else:
        res = time_train_step(name, args.img_size, args.batch, args.warmup, args.iters)
        res["mm_gflop_per_s"] = matmul_reference(6 * res["gmacs"] * args.batch)
    sys.stdout.write(json.dumps(res) + "\n")
    return 0


def _run_worker(tree: Path, name: str, args: argparse.Namespace, profile: bool = False) -> dict:
    cmd = [sys.executable, __file__, "--worker", "--variants", name, "--img-size", str(args.img_size)]
    cmd += ["--batch", str(args.batch), "--warmup", str(args.warmup), "--iters", str(args.iters)]
    cmd += ["--threads", str(args.threads)] + (["--profile"] if profile else [])
    env = dict(os.environ, BENCH_MODELS_TREE=str(tree), OMP_NUM_THREADS=str(args.threads))
    out = subprocess.run(cmd, check=True, capture_output=True, text=True, env=env, cwd=tree)
    return json.loads(out.stdout.strip().splitlines()[-1])


def _extract(rev: str, dest: Path) -> str:
    """``pretrain/`` of git revision ``rev`` into ``dest``; returns the full commit id."""
    commit = subprocess.run(["git", "rev-parse", rev], cwd=ROOT, check=True, capture_output=True, text=True)
    archive = subprocess.run(["git", "archive", rev, "pretrain"], cwd=ROOT, check=True, capture_output=True)
    subprocess.run(["tar", "-x", "-C", str(dest)], input=archive.stdout, check=True)
    return commit.stdout.strip()


def _compare_trees(names: list[str], args: argparse.Namespace) -> list[str]:
    """Alternated whole-process runs of the baseline and current trees; markdown lines (tables and profiles)."""
    lines: list[str] = []
    with tempfile.TemporaryDirectory(prefix="bench_models_") as tmp:
        before, after = Path(tmp) / "before", Path(tmp) / "after"
        before.mkdir()
        commit = _extract(args.baseline, before)
        trees = {f"before ({args.baseline} = {commit[:8]})": before, "after (working tree)": ROOT}
        if args.after:  # a committed state instead of the working tree (others' uncommitted edits left out)
            after.mkdir()
            trees = {
                **dict(list(trees.items())[:1]),
                f"after ({args.after} = {_extract(args.after, after)[:8]})": after,
            }
        labels = list(trees)
        runs: dict[tuple[str, str], list[dict]] = {}
        for name in names:
            for r in range(args.rounds):
                for label in labels if r % 2 == 0 else labels[::-1]:
                    res = _run_worker(trees[label], name, args)
                    runs.setdefault((name, label), []).append(res)
                    logger.info("%s %s round %d: %.3f s/step", name, label.split()[0], r, res["median_s"])
        if args.rounds == 0:  # --profile only
            names_timed: list[str] = []
        else:
            names_timed = names
        head = "| model | tree | runs | median s/step (per run) | img/s | GFLOP/s | mm GFLOP/s | of mm | speedup"
        head += " |"
        lines += [head, "|---|---|---:|---|---:|---:|---:|---:|---:|"] if names_timed else []
        for name in names_timed:
            base_med = statistics.median(r["median_s"] for r in runs[(name, labels[0])])
            for label in labels:
                rs = runs[(name, label)]
                med = statistics.median(r["median_s"] for r in rs)
                gflops = 6 * rs[0]["gmacs"] * args.batch / med
                mm = statistics.median(r["mm_gflop_per_s"] for r in rs)
                each = ", ".join(f"{r['median_s']:.2f}" for r in rs)
                lines.append(
                    f"| {name} | {label} | {len(rs)} | {med:.3f} ({each}) | {args.batch / med:.2f} | {gflops:.1f} | "
                    f"{mm:.1f} | {gflops / mm:.0%} | {base_med / med:.2f}x |"
                )
        if args.profile:
            for name in names:
                for label in labels:
                    prof = _run_worker(trees[label], name, args, profile=True)["profile"]
                    lines += ["", f"Profile of one step, {name}, {label} (top operators by self CPU time):", ""]
                    lines += ["| operator | self CPU ms | share | calls |", "|---|---:|---:|---:|"]
                    lines += [f"| `{p['op']}` | {p['self_ms']:.0f} | {p['share']:.1%} | {p['calls']} |" for p in prof]
    return lines


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
    p.add_argument("--baseline", default=None, help="git revision to compare against, alternating (no compare table)")
    p.add_argument(
        "--after", default=None, help="with --baseline: git revision of the 'after' tree (default: working tree)"
    )
    p.add_argument("--rounds", type=int, default=5, help="alternated runs per tree with --baseline (0: --profile only)")
    p.add_argument("--profile", action="store_true", help="with --baseline: top operators of one step per tree")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.worker:
        return _worker(args)

    import pretrain.models

    load_before = os.getloadavg()
    known = pretrain.models.list_models()
    rows = []
    tree_lines = _compare_trees(_select(args.variants, known), args) if args.baseline else []
    for name in [] if args.compare_only or args.baseline else _select(args.variants, known):
        logger.info("%s at %d, batch %d ...", name, args.img_size, args.batch)
        r = time_train_step(name, args.img_size, args.batch, args.warmup, args.iters)
        rows.append({**r, "label": name})
        logger.info("  %.1f img/s", r["img_per_s"])

    compare = []
    if not args.no_compare and not args.baseline:
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
    if tree_lines:
        out[-2] = (
            f"- before/after: {args.rounds} alternated runs per tree (fresh process each), {args.warmup} warmup + "
            f"{args.iters} timed steps per run; GFLOP/s = 6 x GMACs x batch / median; mm GFLOP/s: a torch.mm loop of "
            "1024x1024 matrices with the FLOPs of one step, in the same processes"
        )
        out += tree_lines + [""]
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
