"""Overhead of the sweep machinery per trial: `pretrain sweep` vs running the same training directly.

The same tiny digits training run (SepViT-Lite, one CPU rank, ``--steps`` steps, an eval and a checkpoint every
``--eval-every`` steps) is run three ways:

1. ``direct``: ``pretrain train`` as a subprocess (wall time from start to exit);
2. ``sweep x1``: ``pretrain sweep`` with one trial (FIFO);
3. ``sweep x2``: the same sweep with two trials, one after the other.

On a shared machine the speed of training itself varies several-fold from minute to minute, so the overhead is not
taken as a difference of wall times between runs. Inside each sweep, the wall time of every trial's training process
is measured (the guard's start stamp in ``sweep/train.log`` to its exit-code file), and the sweep's overhead is its
wall time minus those: Ray start and shutdown, trial scheduling, the guard, metrics polling, checkpoint hand-over to
Ray Tune, the summary and plot. The overhead one more trial adds is ``overhead(x2) - overhead(x1)``; the target is
below 10% of a 2-minute trial (12 s). The direct run is the reference for what a trial's training costs alone.

Usage::

    python benchmarks/sweep.py                      # appends a section to benchmarks/RESULTS.md
    python benchmarks/sweep.py --steps 20 --no-append
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
CONFIG = ROOT / "configs" / "run" / "digits_sepvit_lite.yaml"

__all__ = ["main"]


def _overrides(data: Path, steps: int, eval_every: int) -> list[str]:
    return [
        f"data.path={data}",
        f"trainer.max_steps={steps}",
        f"trainer.eval_every_steps={eval_every}",
        "trainer.log_every_steps=5",
        f"checkpoint.every_steps={eval_every}",
        "checkpoint.every_minutes=0",
        "schedule.warmup_steps=0",
        "data.batch_size=16",
        "data.num_workers=0",
        "trainer.progress_bar=false",
    ]


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_") and k != "RAY_ADDRESS"}
    env.update(DS_ACCELERATOR="cpu", PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")
    env["PATH"] = f"{Path(sys.executable).parent}:{env.get('PATH', '')}"
    return env


def _run(argv: list[str], cwd: Path, log: Path) -> float:
    t0 = time.monotonic()
    with open(log, "wb") as f:
        rc = subprocess.run(argv, cwd=cwd, env=_env(), stdout=f, stderr=subprocess.STDOUT).returncode
    wall = time.monotonic() - t0
    if rc != 0:
        sys.exit(f"{' '.join(argv)} failed ({rc}); see {log}")
    return wall


def _direct(work: Path, data: Path, args: argparse.Namespace) -> float:
    overrides = _overrides(data, args.steps, args.eval_every) + [f"run.output_dir={work / 'direct'}", "run.name=direct"]
    argv = [sys.executable, "-m", "launch.cli", "train", str(CONFIG), *overrides, "--nproc", "1"]
    return _run(argv, work, work / "direct.log")


def _trainer_wall_s(run_dir: Path) -> float:
    """Wall time of a trial's training process: the guard's start stamp to its exit-code file."""
    header = (run_dir / "sweep" / "train.log").read_text().split("=====")[1].strip().split()[:2]
    started = datetime.datetime.strptime(" ".join(header), "%Y-%m-%d %H:%M:%S.%f").timestamp()
    exit_file = max((run_dir / "sweep").glob("exit_code*"), key=lambda p: p.stat().st_mtime)
    return exit_file.stat().st_mtime - started


def _sweep(work: Path, data: Path, args: argparse.Namespace, trials: int) -> tuple[float, list[float]]:
    """Wall time of a FIFO sweep of ``trials`` trials and the wall time of each trial's training process."""
    name = f"bench{trials}"
    doc = {
        "name": name,
        "base": str(CONFIG),
        "overrides": _overrides(data, args.steps, args.eval_every),
        "space": {"optim.lr": {"grid": [2.0e-3, 1.0e-3][:trials]}},
        "scheduler": "fifo",
        "max_concurrent": 1,
        "metric": "val_top1",
    }
    spec = work / f"{name}.yaml"
    spec.write_text(yaml.safe_dump(doc))
    argv = [sys.executable, "-m", "launch.cli", "sweep", str(spec), "--output-dir", str(work)]
    wall = _run(argv, work, work / f"{name}.log")
    return wall, [_trainer_wall_s(d) for d in sorted((work / name / "trials").glob("*"))]


def _machine() -> str:
    load = os.getloadavg()
    return (
        f"{platform.platform()}, {os.cpu_count()} CPUs, Python {platform.python_version()}; "
        f"load average {load[0]:.1f} (a shared machine: other jobs compete for the cores)"
    )


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=300, help="training steps per run (default 300: ~2 min on 2 cores)")
    p.add_argument("--eval-every", type=int, default=50, help="eval + checkpoint interval in steps (default 50)")
    p.add_argument("--data", type=Path, default=None, help="digits shards (default: built in a temp dir)")
    p.add_argument("--no-append", action="store_true", help="print only; do not append to benchmarks/RESULTS.md")
    args = p.parse_args(argv)
    load_before = os.getloadavg()[0]
    with tempfile.TemporaryDirectory(prefix="bench-sweep-") as tmp:
        work = Path(tmp)
        data = args.data
        if data is None:
            data = work / "digits"
            _run(
                [sys.executable, "-m", "launch.cli", "data", "build", "digits", "--out", str(data)],
                work,
                work / "d.log",
            )
        direct = _direct(work, data, args)
        one, train1 = _sweep(work, data, args, 1)
        two, train2 = _sweep(work, data, args, 2)
    over1, over2 = one - sum(train1), two - sum(train2)
    per_trial = over2 - over1
    fixed = over1 - per_trial
    trial_s = statistics.mean(train1 + train2)
    rows = [
        ("direct `pretrain train` (wall)", f"{direct:.1f} s", "reference: the training alone"),
        ("trial training processes in the sweeps (wall, mean)", f"{trial_s:.1f} s", f"{len(train1 + train2)} runs"),
        ("sweep with 1 trial (wall)", f"{one:.1f} s", f"overhead {over1:.1f} s"),
        ("sweep with 2 trials, one after the other (wall)", f"{two:.1f} s", f"overhead {over2:.1f} s"),
        ("fixed cost of a sweep (Ray start/stop, summary, plot)", f"{fixed:.1f} s", "once per sweep"),
        (
            "overhead per trial",
            f"{per_trial:.1f} s",
            f"{100 * per_trial / 120:.1f}% of a 2-minute trial; {100 * per_trial / trial_s:.1f}% of these trials",
        ),
    ]
    table = "| measure | value | note |\n|---|---:|---|\n" + "\n".join(f"| {a} | {b} | {c} |" for a, b, c in rows)
    verdict = "meets" if per_trial < 0.10 * 120 else "misses"
    cmd = "python benchmarks/sweep.py " + " ".join(shlex.quote(a) for a in (argv if argv is not None else sys.argv[1:]))
    text = (
        f"## Sweep overhead per trial, {datetime.datetime.now().strftime('%Y-%m-%dT%H:%M')}\n\n"
        f"- machine: {_machine()}; load average before {load_before:.1f}\n"
        f"- command: `{cmd.strip()}`\n"
        f"- trial: digits SepViT-Lite, 1 CPU rank, {args.steps} steps of 16 images, eval + checkpoint every "
        f"{args.eval_every}; sweeps are FIFO with trials one at a time\n"
        f"- overhead per trial {per_trial:.1f} s = {100 * per_trial / 120:.1f}% of a 2-minute trial: {verdict} the "
        f"< 10% target. Overheads are sweep wall time minus the trials' training-process wall time (the training "
        f"speed itself varies several-fold on this shared machine; compare the direct run with the trial runs)\n\n"
        f"{table}\n"
    )
    print(text)
    if not args.no_append:
        with open(ROOT / "benchmarks" / "RESULTS.md", "a") as f:
            f.write("\n" + text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
