"""SeT attention vs softmax attention (``F.scaled_dot_product_attention``): forward+backward time and peak memory.

Both layers are the ones the SeTformer blocks use (``pretrain.models.set_attention``), at the same width and heads,
with their default positional terms (LePE on the values for both; SeT's OT distance penalty on). SeT runs on its
torch path (``set``) and, where CUDA is present, also on its fused Triton path (``set_triton``, ``set_impl=triton``);
on a GPU the default sweep is 1k/4k/16k/64k tokens in bfloat16 with all three layers, timed with CUDA
synchronisation, peak memory from ``torch.cuda.max_memory_allocated``. On CPU (torch path and SDPA only) each
(layer, tokens) case runs in a fresh subprocess so that its memory can be read from the process's peak resident set
size:

1. build the layer and a small 8x8-token input, run one forward+backward (loads kernels, starts thread pools);
2. build the ``(B, n, C)`` input, read ``ru_maxrss`` (the baseline), run one forward+backward, read it again: the
   difference is the peak memory of that step (activations kept for backward, gradients and temporaries);
3. time ``--repeats`` further forward+backward steps and report the median and the minimum.

Usage::

    python benchmarks/set_attention.py                 # default sweep, appends to benchmarks/RESULTS.md
    python benchmarks/set_attention.py --tokens 1024 --no-append
    python benchmarks/set_attention.py --impl set set_triton sdpa --tokens 1024 4096 16384 65536   # a GPU
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


IMPLS = ("set", "set_triton", "sdpa")  # SeT torch path, SeT fused Triton path, softmax attention


def _build(impl: str, dim: int, heads: int, num_ref: int, iters: int):
    from pretrain.models.set_attention import SetAttention, SoftmaxAttention

    if impl.startswith("set"):
        set_impl = "triton" if impl == "set_triton" else "torch"
        return SetAttention(dim, heads, num_ref=num_ref, sinkhorn_iters=iters, set_impl=set_impl)
    return SoftmaxAttention(dim, heads)


def _peak_mib(device: str) -> float:
    import torch

    return torch.cuda.max_memory_allocated() / 2**20 if device == "cuda" else _peak_rss_mib()


def run_case(
    impl: str,
    tokens: int,
    dim: int,
    heads: int,
    num_ref: int,
    iters: int,
    batch: int,
    repeats: int,
    device: str = "cpu",
    dtype: str = "float32",
) -> dict:
    """One (layer, tokens) case in this process: peak memory growth of one step, then timed steps."""
    import torch

    side = int(round(tokens**0.5))
    if side * side != tokens:
        raise SystemExit(f"--tokens {tokens} is not a square number")
    torch.manual_seed(0)
    dt = getattr(torch, dtype)
    layer = _build(impl, dim, heads, num_ref, iters).to(device=device, dtype=dt)
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)

    def step(x: torch.Tensor, grid: tuple[int, int]) -> None:
        layer(x, grid).float().square().mean().backward()
        layer.zero_grad(set_to_none=True)
        x.grad = None

    step(torch.randn(batch, 64, dim, device=device, dtype=dt, requires_grad=True), (8, 8))  # warm-up at 8x8 tokens
    x = torch.randn(batch, tokens, dim, device=device, dtype=dt, requires_grad=True)
    step(x, (side, side)) if device == "cuda" else None  # CUDA: compile the kernels for this shape first
    sync()
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    base = _peak_mib(device) if device != "cuda" else torch.cuda.memory_allocated() / 2**20
    t0 = time.perf_counter()
    step(x, (side, side))
    sync()
    first_s = time.perf_counter() - t0
    peak = _peak_mib(device) - base
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        step(x, (side, side))
        sync()
        times.append(time.perf_counter() - t0)
    return dict(
        impl=impl,
        tokens=tokens,
        median_s=statistics.median(times) if times else first_s,
        min_s=min(times) if times else first_s,
        first_s=first_s,
        peak_mib=peak,
    )


def _cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


def _subprocess_case(args: argparse.Namespace, impl: str, tokens: int) -> dict:
    repeats = args.repeats if impl != "sdpa" or tokens <= 4096 else args.sdpa_large_repeats
    cmd = [sys.executable, __file__, "--worker", "--impl", impl, "--tokens", str(tokens), "--repeats", str(repeats)]
    cmd += ["--device", args.device, "--dtype", args.dtype]
    cmd += ["--dim", str(args.dim), "--heads", str(args.heads), "--num-ref", str(args.num_ref)]
    cmd += ["--iters", str(args.iters), "--batch", str(args.batch), "--threads", str(args.threads)]
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), PYTHONPATH=str(ROOT))
    out = subprocess.run(cmd, check=True, capture_output=True, text=True, env=env)
    return json.loads(out.stdout.strip().splitlines()[-1])


_LABELS = {"set": "SeT", "set_triton": "SeT fused", "sdpa": "SDPA"}


def _table(rows: list[dict], tokens: list[int], impls: list[str]) -> str:
    by = {(r["impl"], r["tokens"]): r for r in rows}
    ms = 1000.0 if any(r["median_s"] < 0.1 for r in rows) else 1.0  # a GPU's milliseconds
    unit = "ms" if ms > 1 else "s"
    header = ["tokens n"] + [f"{_LABELS[i]} fwd+bwd ({unit})" for i in impls]
    header += [f"SDPA / {_LABELS[i]} time" for i in impls if i != "sdpa" and "sdpa" in impls]
    header += [f"{_LABELS[i]} min ({unit})" for i in impls] + [f"{_LABELS[i]} peak (MiB)" for i in impls]
    header += [f"{_LABELS[i]} MiB per 1k tokens" for i in impls]
    lines = ["| " + " | ".join(header) + " |", "|" + "---:|" * len(header)]
    for n in tokens:
        rs = [by.get((i, n)) for i in impls]
        a = by.get(("sdpa", n))
        cells = [f"{n:,}"] + [f"{r['median_s'] * ms:.3f}" if r else "-" for r in rs]
        for i, r in zip(impls, rs):
            if i != "sdpa" and "sdpa" in impls:
                cells.append(f"{a['median_s'] / r['median_s']:.2f}x" if r and a else "-")
        cells += [f"{r['min_s'] * ms:.3f}" if r else "-" for r in rs]
        cells += [f"{r['peak_mib']:.0f}" if r else "-" for r in rs]
        cells += [f"{r['peak_mib'] / n * 1000:.1f}" if r else "-" for r in rs]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Run the sweep (or, with ``--worker``, one case) and print a markdown table."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    cuda = _cuda_available()
    default_tokens = [1024, 4096, 16384, 65536] if cuda else [1024, 4096, 16384]
    p.add_argument("--tokens", type=int, nargs="+", default=default_tokens, help="square token counts")
    p.add_argument("--dim", type=int, default=256, help="width C (stage 3 of setformer_tiny/small)")
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--num-ref", type=int, default=64, help="SeT reference slots p")
    p.add_argument("--iters", type=int, default=3, help="Sinkhorn iterations L")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--repeats", type=int, default=5, help="timed steps after the measured one")
    p.add_argument("--sdpa-large-repeats", type=int, default=2, help="timed steps for SDPA above 4,096 tokens")
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="torch intra-op threads")
    p.add_argument("--impl", choices=IMPLS, nargs="+", default=list(IMPLS) if cuda else ["set", "sdpa"])
    p.add_argument("--device", choices=["cpu", "cuda"], default="cuda" if cuda else "cpu")
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default="bfloat16" if cuda else "float32")
    p.add_argument("--no-append", action="store_true", help=f"do not append to {RESULTS.relative_to(ROOT)}")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)

    if args.worker:
        import torch

        torch.set_num_threads(args.threads)
        res = run_case(
            args.impl[0], args.tokens[0], args.dim, args.heads, args.num_ref, args.iters, args.batch, args.repeats,
            args.device, args.dtype,
        )  # fmt: skip
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
    if args.device == "cuda":
        machine = f"{torch.cuda.get_device_name()}, {machine}"
    memory = (
        "- Peak memory: `torch.cuda.max_memory_allocated` over one forward+backward step above what was allocated "
        "before it (input, parameters), each case in a fresh subprocess after a warm-up."
        if args.device == "cuda"
        else "- Peak memory: growth of the process's peak RSS (`resource.getrusage`) over one forward+backward step, "
        "each case in a fresh subprocess after a small warm-up (includes the input and parameter gradients)."
    )
    report = "\n".join(
        [
            f"## SeT attention vs SDPA, forward+backward ({datetime.date.today().isoformat()})",
            "",
            f"- Machine: {machine}. Shared with other jobs: timings are noisy.",
            f"- Command: `{cmd.strip()}`",
            f"- Setting: batch {args.batch}, C={args.dim}, {args.heads} heads (head width {args.dim // args.heads}), "
            f"SeT p={args.num_ref}, L={args.iters}, eps 0.5, positional penalty and LePE on; softmax layer = qkv + "
            "`F.scaled_dot_product_attention` + the same LePE + projection. Time: median (and min) of the timed steps; "
            f"{args.device}, {args.dtype}. SeT fused: `set_impl=triton`.",
            memory,
            "",
            _table(rows, args.tokens, args.impl),
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
