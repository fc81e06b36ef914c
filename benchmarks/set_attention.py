"""SeT attention vs softmax attention (``F.scaled_dot_product_attention``): forward+backward time and peak memory.

Both layers are the ones the SeTformer blocks use (``pretrain.models.set_attention``), at the same width and heads,
with their default positional terms (LePE on the values for both; SeT's OT distance penalty on). Each (layer, tokens)
case runs in a fresh subprocess so that its memory can be read from the process's peak resident set size:

1. build the layer and a small 8x8-token input, run one forward+backward (loads kernels, starts thread pools);
2. build the ``(B, n, C)`` input, read ``ru_maxrss`` (the baseline), run one forward+backward, read it again: the
   difference is the peak memory of that step (activations kept for backward, gradients and temporaries);
3. time ``--repeats`` further forward+backward steps and report the median and the minimum.

Usage::

    python benchmarks/set_attention.py                 # default sweep, appends to benchmarks/RESULTS.md
    python benchmarks/set_attention.py --tokens 1024 --no-append
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import resource
import shlex
import statistics
import subprocess
import sys
import time
from pathlib import Path

__all__ = ["main", "run_case"]

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "RESULTS.md"


def _peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def _build(impl: str, dim: int, heads: int, num_ref: int, iters: int):
    from pretrain.models.set_attention import SetAttention, SoftmaxAttention

    if impl == "set":
        return SetAttention(dim, heads, num_ref=num_ref, sinkhorn_iters=iters)
    return SoftmaxAttention(dim, heads)


def run_case(impl: str, tokens: int, dim: int, heads: int, num_ref: int, iters: int, batch: int, repeats: int) -> dict:
    """One (layer, tokens) case in this process: peak RSS growth of one step, then timed steps."""
    import torch

    side = int(round(tokens**0.5))
    if side * side != tokens:
        raise SystemExit(f"--tokens {tokens} is not a square number")
    torch.manual_seed(0)
    layer = _build(impl, dim, heads, num_ref, iters)

    def step(x: torch.Tensor, grid: tuple[int, int]) -> None:
        layer(x, grid).square().mean().backward()
        layer.zero_grad(set_to_none=True)
        x.grad = None

    step(torch.randn(batch, 64, dim, requires_grad=True), (8, 8))  # warm-up at 8x8 tokens
    x = torch.randn(batch, tokens, dim, requires_grad=True)
    base = _peak_rss_mib()
    t0 = time.perf_counter()
    step(x, (side, side))
    first_s = time.perf_counter() - t0
    peak = _peak_rss_mib() - base
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        step(x, (side, side))
        times.append(time.perf_counter() - t0)
    return dict(
        impl=impl,
        tokens=tokens,
        median_s=statistics.median(times) if times else first_s,
        min_s=min(times) if times else first_s,
        first_s=first_s,
        peak_mib=peak,
    )


def _subprocess_case(args: argparse.Namespace, impl: str, tokens: int) -> dict:
    repeats = args.repeats if impl == "set" or tokens <= 4096 else args.sdpa_large_repeats
    cmd = [sys.executable, __file__, "--worker", "--impl", impl, "--tokens", str(tokens), "--repeats", str(repeats)]
    cmd += ["--dim", str(args.dim), "--heads", str(args.heads), "--num-ref", str(args.num_ref)]
    cmd += ["--iters", str(args.iters), "--batch", str(args.batch), "--threads", str(args.threads)]
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), PYTHONPATH=str(ROOT))
    out = subprocess.run(cmd, check=True, capture_output=True, text=True, env=env)
    return json.loads(out.stdout.strip().splitlines()[-1])


def _table(rows: list[dict], tokens: list[int]) -> str:
    by = {(r["impl"], r["tokens"]): r for r in rows}
    header = ["tokens n", "SeT fwd+bwd (s)", "SDPA fwd+bwd (s)", "SDPA / SeT time", "SeT min (s)", "SDPA min (s)"]
    header += ["SeT peak (MiB)", "SDPA peak (MiB)", "SeT MiB per 1k tokens", "SDPA MiB per 1k tokens"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---:|" * len(header)]
    for n in tokens:
        s, a = by.get(("set", n)), by.get(("sdpa", n))
        cells = [f"{n:,}"]
        cells += [f"{r['median_s']:.3f}" if r else "-" for r in (s, a)]
        cells.append(f"{a['median_s'] / s['median_s']:.1f}x" if s and a else "-")
        cells += [f"{r['min_s']:.3f}" if r else "-" for r in (s, a)]
        cells += [f"{r['peak_mib']:.0f}" if r else "-" for r in (s, a)]
        cells += [f"{r['peak_mib'] / n * 1000:.1f}" if r else "-" for r in (s, a)]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Run the sweep (or, with ``--worker``, one case) and print a markdown table."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tokens", type=int, nargs="+", default=[1024, 4096, 16384], help="square token counts")
    p.add_argument("--dim", type=int, default=256, help="width C (stage 3 of setformer_tiny/small)")
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--num-ref", type=int, default=64, help="SeT reference slots p")
    p.add_argument("--iters", type=int, default=3, help="Sinkhorn iterations L")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--repeats", type=int, default=5, help="timed steps after the measured one")
    p.add_argument("--sdpa-large-repeats", type=int, default=2, help="timed steps for SDPA above 4,096 tokens")
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="torch intra-op threads")
    p.add_argument("--impl", choices=["set", "sdpa"], nargs="+", default=["set", "sdpa"])
    p.add_argument("--no-append", action="store_true", help=f"do not append to {RESULTS.relative_to(ROOT)}")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)

    if args.worker:
        import torch

        torch.set_num_threads(args.threads)
        res = run_case(
            args.impl[0], args.tokens[0], args.dim, args.heads, args.num_ref, args.iters, args.batch, args.repeats
        )
        sys.stdout.write(json.dumps(res) + "\n")
        return 0

    import torch

    rows = []
    for n in args.tokens:
        for impl in args.impl:
            res = _subprocess_case(args, impl, n)
            rows.append(res)
            sys.stderr.write(
                f"{impl:>4} n={n:>6}: median {res['median_s']:.3f}s min {res['min_s']:.3f}s "
                f"first {res['first_s']:.3f}s peak +{res['peak_mib']:.0f} MiB\n"
            )
    cmd = "python benchmarks/set_attention.py " + " ".join(shlex.quote(a) for a in (argv or sys.argv[1:]))
    machine = (
        f"{platform.platform()}, {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs "
        f"(torch threads {args.threads}), torch {torch.__version__}, Python {platform.python_version()}"
    )
    report = "\n".join(
        [
            f"## SeT attention vs SDPA, forward+backward ({datetime.date.today().isoformat()})",
            "",
            f"- Machine: {machine}. Shared with other jobs: timings are noisy.",
            f"- Command: `{cmd.strip()}`",
            f"- Setting: batch {args.batch}, C={args.dim}, {args.heads} heads (head width {args.dim // args.heads}), "
            f"SeT p={args.num_ref}, L={args.iters}, eps 0.5, positional penalty and LePE on; softmax layer = qkv + "
            "`F.scaled_dot_product_attention` + the same LePE + projection. Time: median (and min) of the timed steps.",
            "- Peak memory: growth of the process's peak RSS (`resource.getrusage`) over one forward+backward step, "
            "each case in a fresh subprocess after a small warm-up (includes the input and parameter gradients).",
            "",
            _table(rows, args.tokens),
            "",
        ]
    )
    sys.stdout.write(report + "\n")
    if not args.no_append:
        with RESULTS.open("a") as f:
            f.write("\n" + report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
