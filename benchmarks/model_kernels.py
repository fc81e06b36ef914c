"""Kernels, linalg factorisations and host reads of one training step per model, counted on CPU (the GPU's cost).

On a GPU a small model's step is bound by kernel launches and host syncs, which CPU timings do not show;
``pretrain.kernel_count`` counts them at the dispatcher on any device (see its docstring), Triton launches included.
Each row builds its model (or layer) on CPU in bfloat16, runs one warm-up forward+backward, forgets the SeT
whitening cache (as an optimizer step does), sets every gradient to None and counts one forward+backward:
``cross_entropy(model(x).float(), y).backward()`` on a random batch (a layer: ``layer(x).float().square().mean()``).
Rows whose SeT runs the fused Triton path (``set_impl=triton``) run its kernels under Triton's interpreter
(``TRITON_INTERPRET=1``, set here before triton is imported): a launch counts one kernel, as on a GPU.

``--baseline REV`` adds the same rows counted on the ``pretrain/`` package of git revision ``REV`` (extracted with
``git archive``; rows its models cannot build, such as a ``set_impl`` it does not have, are left out).

Usage::

    python benchmarks/model_kernels.py                        # every row, appends the table to benchmarks/RESULTS.md
    python benchmarks/model_kernels.py --baseline HEAD --rows set_layer_torch set_layer_triton --no-append
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

__all__ = ["ROWS", "count_row", "main"]

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "RESULTS.md"

# name -> (kind, what, kwargs, description)
ROWS: dict[str, tuple[str, str, dict, str]] = {
    "setformer_tiny_torch": ("model", "setformer_tiny", {"set_impl": "torch"}, "setformer_tiny, torch path"),
    "setformer_tiny_triton": ("model", "setformer_tiny", {"set_impl": "triton"}, "setformer_tiny, fused path"),
    "set_layer_torch": ("set", "", {"set_impl": "torch"}, "one SeT layer (n=196, p=49, C=256, 8 heads), torch"),
    "set_layer_triton": ("set", "", {"set_impl": "triton"}, "one SeT layer (n=196, p=49, C=256, 8 heads), fused"),
    "softmax_layer": ("softmax", "", {}, "the softmax ablation layer (n=196, C=256, 8 heads)"),
    "sepvit_tiny": ("model", "sepvit_tiny", {}, "sepvit_tiny"),
    "sepvit_lite": ("model", "sepvit_lite", {}, "sepvit_lite"),
    "setformer_lite_torch": ("model", "setformer_lite", {"set_impl": "torch"}, "setformer_lite, torch path"),
    "setformer_lite_triton": ("model", "setformer_lite", {"set_impl": "triton"}, "setformer_lite, fused path"),
}


def _supports_set_impl() -> bool:
    import inspect

    from pretrain.models.set_attention import SetAttention

    return "set_impl" in inspect.signature(SetAttention.__init__).parameters


def count_row(name: str, batch: int, img_size: int) -> dict:
    """Count one bf16 forward+backward of row ``name`` in this process (``pretrain`` from ``sys.path``)."""
    import torch
    import torch.nn.functional as F

    from pretrain.kernel_count import count_kernels

    kind, what, kwargs, _ = ROWS[name]
    if kwargs.get("set_impl") and not _supports_set_impl():
        if kwargs["set_impl"] != "torch":
            return {"row": name, "skipped": "no set_impl in this tree"}
        kwargs = {}
    torch.manual_seed(0)
    if kind == "model":
        from pretrain.models import create_model

        module = create_model(what, num_classes=1000, img_size=img_size, **kwargs)
        x = torch.randn(batch, 3, img_size, img_size, dtype=torch.bfloat16)
        y = torch.randint(0, 1000, (batch,))
        loss_fn = lambda: F.cross_entropy(module(x).float(), y)
    else:
        from pretrain.models.set_attention import SetAttention, SoftmaxAttention

        module = SetAttention(256, 8, num_ref=49, **kwargs) if kind == "set" else SoftmaxAttention(256, 8)
        x = torch.randn(batch, 196, 256, dtype=torch.bfloat16, requires_grad=True)
        loss_fn = lambda: module(x, (14, 14)).float().square().mean()
    module = module.to(torch.bfloat16).train()

    def step() -> None:
        module.zero_grad(set_to_none=True)
        if x.requires_grad:
            x.grad = None
        loss_fn().backward()

    step()  # warm-up: lazy buffers and first-call work are not per-step costs
    try:
        from pretrain.models.set_whitening import clear_whitening_cache

        clear_whitening_cache()  # what an optimizer step does: the first forward of a step whitens again
    except ImportError:  # a tree from before the cache
        pass
    t0 = time.perf_counter()
    count = count_kernels(step)
    return {
        "row": name,
        "kernels": count.kernels,
        "triton": count.triton,
        "linalg": len(count.linalg),
        "linalg_ops": sorted(set(count.linalg)),
        "host_reads": len(count.host_reads),
        "host_read_sites": sorted(set(count.host_reads))[:5],
        "top": count.top(6),
        "seconds": round(time.perf_counter() - t0, 1),
    }


def _worker(tree: Path, name: str, args: argparse.Namespace) -> dict:
    cmd = [sys.executable, __file__, "--worker", "--rows", name, "--batch", str(args.batch)]
    cmd += ["--img-size", str(args.img_size)]
    env = dict(os.environ, BENCH_KERNELS_TREE=str(tree), OMP_NUM_THREADS=str(args.threads), TRITON_INTERPRET="1")
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT)
    if out.returncode:
        return {
            "row": name,
            "skipped": f"failed: {out.stderr.strip().splitlines()[-1] if out.stderr else out.returncode}",
        }
    return json.loads(out.stdout.strip().splitlines()[-1])


def _extract(rev: str, dest: Path) -> str:
    """``pretrain/`` of git revision ``rev`` into ``dest``; returns the full commit id."""
    commit = subprocess.run(["git", "rev-parse", rev], cwd=ROOT, check=True, capture_output=True, text=True)
    archive = subprocess.run(["git", "archive", rev, "pretrain"], cwd=ROOT, check=True, capture_output=True)
    subprocess.run(["tar", "-x", "-C", str(dest)], input=archive.stdout, check=True)
    return commit.stdout.strip()


def _cell(r: dict | None, key: str) -> str:
    if r is None or "skipped" in r:
        return "-"
    return f"{r[key]:,}"


def _table(rows: list[str], now: dict[str, dict], before: dict[str, dict], before_label: str) -> list[str]:
    header = ["row", "kernels", "of which Triton", "linalg", "host reads"]
    if before:
        header += [f"kernels {before_label}", f"linalg {before_label}", f"host reads {before_label}"]
    header += ["top ops"]
    lines = ["| " + " | ".join(header) + " |", "|---|" + "---:|" * (len(header) - 2) + "---|"]
    for name in rows:
        r, b = now.get(name), before.get(name)
        cells = [ROWS[name][3], _cell(r, "kernels"), _cell(r, "triton"), _cell(r, "linalg"), _cell(r, "host_reads")]
        if before:
            cells += [_cell(b, "kernels"), _cell(b, "linalg"), _cell(b, "host_reads")]
        top = ", ".join(f"{op} {n}" for op, n in r["top"]) if r and "top" in r else (r or {}).get("skipped", "-")
        lines.append("| " + " | ".join([*cells, top]) + " |")
    return lines


def main(argv: list[str] | None = None) -> int:
    """Count every row (each in a fresh process) and print, and by default append, the markdown table."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rows", nargs="+", choices=list(ROWS), default=list(ROWS))
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--img-size", type=int, default=224)
    p.add_argument("--threads", type=int, default=1, help="torch threads per worker (counts do not depend on it)")
    p.add_argument("--baseline", default=None, help="also count the rows on the pretrain/ of this git revision")
    p.add_argument("--no-append", action="store_true", help=f"do not append to {RESULTS.relative_to(ROOT)}")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)

    if args.worker:
        sys.path.insert(0, os.environ.get("BENCH_KERNELS_TREE", str(ROOT)))
        import torch

        torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
        sys.stdout.write(json.dumps(count_row(args.rows[0], args.batch, args.img_size)) + "\n")
        return 0

    now, before, before_label = {}, {}, ""
    with tempfile.TemporaryDirectory(prefix="bench_kernels_") as tmp:
        if args.baseline:
            commit = _extract(args.baseline, Path(tmp))
            before_label = f"at {args.baseline} ({commit[:7]})"
        for name in args.rows:
            now[name] = _worker(ROOT, name, args)
            sys.stderr.write(f"{name}: {now[name]}\n")
            if args.baseline:
                before[name] = _worker(Path(tmp), name, args)
                sys.stderr.write(f"{name} {before_label}: {before[name]}\n")

    import torch

    cmd = "python benchmarks/model_kernels.py " + " ".join(shlex.quote(a) for a in (argv or sys.argv[1:]))
    machine = f"{platform.platform()}, {os.cpu_count()} CPUs, torch {torch.__version__}"
    try:
        import triton

        machine += f", triton {triton.__version__} (interpreter)"
    except ImportError:
        pass
    report = [
        f"## Kernels per training step, counted on CPU ({datetime.date.today().isoformat()})",
        "",
        f"- Machine: {machine}.",
        f"- Command: `{cmd.strip()}`",
        f"- Setting: bfloat16 weights and inputs, batch {args.batch}, {args.img_size}x{args.img_size} (layers: 196 "
        "tokens on 14x14), one forward+backward after a warm-up, the SeT whitening cache cleared first (a step's "
        "first micro-batch), gradients None. Kernels: aten ops that launch one plus Triton launches "
        "(`pretrain.kernel_count`); linalg: factorisations and solves (each a host sync on CUDA); host reads: "
        "`.item()`-like reads and data-dependent shapes.",
        "",
        *_table(args.rows, now, before, before_label),
        "",
    ]
    sys.stdout.write("\n".join(report) + "\n")
    if not args.no_append:
        with RESULTS.open("a") as f:
            f.write("\n" + "\n".join(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
