"""Training benchmarks: accuracy/throughput of the digits run configs; per-rank optimizer-state memory by ZeRO stage.

Usage::

    python benchmarks/train.py accuracy configs/run/digits_sepvit_lite.yaml configs/run/digits_setformer_lite.yaml
    python benchmarks/train.py zero-memory --nproc 2          # ZeRO 0/1/2/3, bytes of optimizer state per rank
    python benchmarks/train.py compile --repeats 3            # trainer.compile=true (inductor) against eager

``accuracy`` trains each config from scratch (``--nproc 2``, its own run dir under ``runs/bench``), timing the whole
command, and reads the final val top-1 and the mean images/s from ``metrics.jsonl``. ``zero-memory`` starts N local
ranks that build the model of a config once per ZeRO stage, take one optimizer step, and count the bytes of the
optimizer state tensors (Adam moments) each rank holds. ``compile`` trains the same short run eager and with
``trainer.compile=true``, alternated ``--repeats`` times (the machine is shared: ratios of neighbouring runs, medians),
and reads the steady images/s (logged windows after the first, which holds the compilation) and the logged compile
time. All print a table and append it to benchmarks/RESULTS.md (``--no-append`` to skip).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "RESULTS.md"
sys.path.insert(0, str(ROOT))

__all__ = ["main"]


def _machine() -> str:
    return f"{platform.node()} ({os.cpu_count()} CPUs, {platform.machine()}, Python {platform.python_version()})"


def _append(title: str, command: str, lines: list[str], notes: list[str]) -> None:
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    block = [f"\n## {title} ({stamp})\n", f"Machine: {_machine()}  ", f"Command: `{command}`\n", *lines, ""]
    block += [f"- {n}" for n in notes]
    with RESULTS.open("a") as f:
        f.write("\n".join(block) + "\n")


# -------------------------------------------------------------------------------------------------------- accuracy


def _accuracy(args: argparse.Namespace) -> int:
    from pretrain.fsutil import read_jsonl

    rows = []
    for config in args.configs:
        name = f"bench_{Path(config).stem}"
        run_dir = ROOT / "runs" / "bench" / name
        shutil.rmtree(run_dir, ignore_errors=True)
        cmd = [
            sys.executable, "-m", "launch.cli", "train", config, f"data.path={args.data}", "run.output_dir=runs/bench",
            f"run.name={name}", "trainer.progress_bar=false", *args.overrides, "--nproc", str(args.nproc),
        ]  # fmt: skip
        t0 = time.perf_counter()
        proc = subprocess.run(cmd, cwd=ROOT, env=dict(os.environ, DS_ACCELERATOR="cpu"))
        wall = time.perf_counter() - t0
        events = read_jsonl(run_dir / "metrics.jsonl")
        train = [e for e in events if e.get("event") == "train"]
        evals = [e for e in events if e.get("event") == "eval"]
        first, last = (train[0]["time"], train[-1]["time"]) if train else (0.0, 0.0)
        ips = sum(e["img_per_s"] for e in train[1:]) / max(1, len(train) - 1)  # the first window includes startup
        rows.append(
            {
                "config": config,
                "exit": proc.returncode,
                "steps": train[-1]["step"] if train else 0,
                "val_top1": evals[-1]["val_top1"] if evals else float("nan"),
                "best_top1": max((e["val_top1"] for e in evals), default=float("nan")),
                "wall_s": wall,
                "train_s": last - first,
                "img_s": ips,
            }
        )
    header = (
        "| config | exit | steps | final val top-1 | best val top-1 | command wall (s) | train loop (s) | "
        f"img/s ({args.nproc} ranks) |"
    )
    lines = [header, "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(
            f"| {r['config']} | {r['exit']} | {r['steps']} | {r['val_top1']:.4f} | {r['best_top1']:.4f} | "
            f"{r['wall_s']:.0f} | {r['train_s']:.0f} | {r['img_s']:.0f} |"
        )
    print("\n".join(lines))
    if not args.no_append:
        notes = [
            "command wall = the whole `pretrain train --nproc N` (imports, DeepSpeed init, evals, checkpoints);",
            "train loop = first to last train event in metrics.jsonl; img/s = mean of the logged windows (global).",
        ]
        _append("Training: digits run configs", "python benchmarks/train.py " + shlex.join(sys.argv[1:]), lines, notes)
    return 0 if all(r["exit"] == 0 for r in rows) else 1


# --------------------------------------------------------------------------------------------------------- compile


def _train_once(args: argparse.Namespace, name: str, extra: list[str]) -> dict[str, float]:
    from pretrain.fsutil import read_jsonl

    run_dir = ROOT / "runs" / "bench" / name
    shutil.rmtree(run_dir, ignore_errors=True)
    cmd = [
        sys.executable, "-m", "launch.cli", "train", args.config, f"data.path={args.data}", "run.output_dir=runs/bench",
        f"run.name={name}", "trainer.progress_bar=false", f"trainer.max_steps={args.steps}",
        "trainer.eval_every_steps=0", "trainer.log_every_steps=5", "checkpoint.every_steps=0",
        "checkpoint.every_minutes=0", "checkpoint.save_final=false", "schedule.warmup_steps=5", *args.overrides, *extra,
        "--nproc", str(args.nproc),
    ]  # fmt: skip
    proc = subprocess.run(cmd, cwd=ROOT, env=dict(os.environ, DS_ACCELERATOR="cpu"), capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"{shlex.join(cmd)} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    train = [e for e in read_jsonl(run_dir / "metrics.jsonl") if e.get("event") == "train"]
    compile_s = float("nan")
    for line in (proc.stdout + proc.stderr).splitlines():
        if "first step with torch.compile" in line:
            compile_s = float(line.rsplit(": ", 1)[1].split(" s")[0])
    ips = sorted(e["img_per_s"] for e in train[1:])  # the first window holds the start (and the compilation)
    return {"img_s": ips[len(ips) // 2] if ips else float("nan"), "compile_s": compile_s}


def _compile(args: argparse.Namespace) -> int:
    import statistics

    rows = []
    for i in range(args.repeats):
        eager = _train_once(args, "bench_eager", [])
        compiled = _train_once(
            args, "bench_compiled", ["trainer.compile=true", f"trainer.compile_backend={args.backend}"]
        )
        rows.append((eager, compiled))
        print(f"pair {i + 1}: eager {eager['img_s']:.1f} img/s, compiled {compiled['img_s']:.1f} img/s "
              f"(first step {compiled['compile_s']:.1f} s)", flush=True)  # fmt: skip
    ratios = [c["img_s"] / e["img_s"] for e, c in rows]
    lines = [
        "| pair | eager img/s | compiled img/s | compiled / eager | compiled first step (s) |",
        "|---|---|---|---|---|",
    ]
    for i, (e, c) in enumerate(rows, 1):
        lines.append(
            f"| {i} | {e['img_s']:.1f} | {c['img_s']:.1f} | {c['img_s'] / e['img_s']:.2f} | {c['compile_s']:.1f} |"
        )
    lines.append(
        f"| median | | | {statistics.median(ratios):.2f} | {statistics.median(c['compile_s'] for _, c in rows):.1f} |"
    )
    print("\n".join(lines))
    if not args.no_append:
        notes = [
            f"{args.config}, {args.nproc} rank(s), {args.steps} steps, backend {args.backend}, eager and compiled "
            "alternated; img/s = median of the logged 5-step windows after the first;",
            "first step = the compiled run's first optimizer step, compilation included (inductor caches compiled "
            "graphs in /tmp/torchinductor_*, so pairs after the first compile faster).",
        ]
        _append(
            "Training: torch.compile against eager",
            "python benchmarks/train.py " + shlex.join(sys.argv[1:]),
            lines,
            notes,
        )
    return 0


# ----------------------------------------------------------------------------------------------------- zero memory


def _zero_memory_rank(args: argparse.Namespace) -> int:
    """One rank of ``zero-memory``: build an engine per ZeRO stage, one step, report optimizer-state bytes."""
    import torch

    from pretrain.config import load_config
    from pretrain.distributed import destroy_distributed, init_distributed
    from pretrain.engine import build_engine, optimizer_state_bytes
    from pretrain.rank import build_model

    dist = init_distributed(device="cpu")
    results = {}
    for stage in args.stages:
        cfg = load_config(args.config, [f"deepspeed.zero_stage={stage}", "data.batch_size=4", "model.num_classes=10"])
        cfg.data.classes_from_manifest = False
        model = build_model(cfg)
        n_params = sum(p.numel() for p in model.parameters())
        parts = build_engine(cfg, model, dist.world_size)
        x = torch.randn(4, 3, cfg.model.img_size, cfg.model.img_size)
        loss = parts.engine(x).float().logsumexp(-1).mean()
        parts.engine.backward(loss)
        parts.engine.step()
        results[stage] = {"bytes": optimizer_state_bytes(parts.optimizer), "params": n_params}
        del parts, model
    gathered = [None] * dist.world_size
    torch.distributed.all_gather_object(gathered, results)
    if dist.is_main:
        Path(args.out).write_text(json.dumps(gathered))
    destroy_distributed()
    return 0


def _zero_memory(args: argparse.Namespace) -> int:
    from pretrain.distributed import find_free_port

    out = ROOT / "runs" / "bench" / "zero_memory.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    port = find_free_port()
    procs = []
    for rank in range(args.nproc):
        env = dict(
            os.environ,
            RANK=str(rank),
            WORLD_SIZE=str(args.nproc),
            LOCAL_RANK=str(rank),
            LOCAL_WORLD_SIZE=str(args.nproc),
            MASTER_ADDR="127.0.0.1",
            MASTER_PORT=str(port),
            DS_ACCELERATOR="cpu",
        )
        cmd = [sys.executable, __file__, "_zero-memory-rank", "--config", args.config, "--out", str(out)]
        cmd += ["--stages", *map(str, args.stages)]
        procs.append(subprocess.Popen(cmd, cwd=ROOT, env=env))
    codes = [p.wait() for p in procs]
    if any(codes):
        print(f"ranks exited with {codes}", file=sys.stderr)
        return 1
    per_rank = json.loads(out.read_text())
    params = per_rank[0][str(args.stages[0])]["params"]
    lines = [
        f"Model: {args.config} ({params / 1e6:.2f}M params, fp32 AdamW: 2 moments = {8 * params / 2**20:.1f} MiB "
        f"unsharded), {args.nproc} CPU ranks.\n",
        "| ZeRO stage | " + " | ".join(f"rank {r} opt. state (MiB)" for r in range(args.nproc)) + " | vs stage 0 |",
        "|---|" + "---|" * args.nproc + "---|",
    ]
    base = per_rank[0][str(args.stages[0])]["bytes"] if 0 in args.stages else None
    for stage in args.stages:
        sizes = [r[str(stage)]["bytes"] for r in per_rank]
        ratio = f"{sizes[0] / base:.2f}x" if base else "-"
        lines.append(f"| {stage} | " + " | ".join(f"{b / 2**20:.2f}" for b in sizes) + f" | {ratio} |")
    print("\n".join(lines))
    if not args.no_append:
        notes = ["bytes of the optimizer's state tensors (Adam exp_avg/exp_avg_sq) on each rank after one step."]
        _append("Training: optimizer-state memory per rank by ZeRO stage", "python benchmarks/train.py "
                + shlex.join(sys.argv[1:]), lines, notes)  # fmt: skip
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    a = sub.add_parser("accuracy", help="train run configs and report val top-1, wall time, images/s")
    a.add_argument("configs", nargs="+")
    a.add_argument("--data", default="data/digits")
    a.add_argument("--nproc", type=int, default=2)
    a.add_argument("--override", dest="overrides", action="append", default=[], help="section.field=value")
    a.add_argument("--no-append", action="store_true")
    z = sub.add_parser("zero-memory", help="optimizer-state bytes per rank for ZeRO stages")
    z.add_argument("--config", default="configs/run/digits_sepvit_lite.yaml")
    z.add_argument("--nproc", type=int, default=2)
    z.add_argument("--stages", type=int, nargs="+", default=[0, 1, 2, 3])
    z.add_argument("--no-append", action="store_true")
    c = sub.add_parser("compile", help="images/s with trainer.compile=true against eager, alternated")
    c.add_argument("--config", default="configs/run/digits_sepvit_lite.yaml")
    c.add_argument("--data", default="data/digits")
    c.add_argument("--nproc", type=int, default=1)
    c.add_argument("--steps", type=int, default=40)
    c.add_argument("--repeats", type=int, default=3)
    c.add_argument("--backend", default="inductor")
    c.add_argument("--override", dest="overrides", action="append", default=[], help="section.field=value")
    c.add_argument("--no-append", action="store_true")
    r = sub.add_parser("_zero-memory-rank")
    r.add_argument("--config", required=True)
    r.add_argument("--out", required=True)
    r.add_argument("--stages", type=int, nargs="+", required=True)
    args = p.parse_args(argv)
    commands = {"accuracy": _accuracy, "zero-memory": _zero_memory, "compile": _compile}
    return {**commands, "_zero-memory-rank": _zero_memory_rank}[args.cmd](args)


if __name__ == "__main__":
    sys.exit(main())
