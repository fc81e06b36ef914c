"""Overhead of the sweep machinery per trial: `pretrain sweep` vs running the same training directly.

The same tiny digits training run (SepViT-Lite, one CPU rank, ``--steps`` steps, an eval and a checkpoint every
``--eval-every`` steps) is run three ways:

1. ``direct``: ``pretrain train`` as a subprocess (wall time from start to exit);
2. ``sweep x1``: ``pretrain sweep`` with one trial (FIFO);
3. ``sweep x2``: the same sweep with two trials, one after the other.

On a shared machine the speed of training itself varies several-fold from minute to minute, so the overhead is not
taken as a difference of wall times between runs. Inside each sweep, the wall time of every trial's training process
is measured (the start stamp in ``sweep/train.log`` to that log's last write, the run's exit summary), and the
sweep's overhead is its wall time minus those: Ray start and shutdown, trial scheduling, waiting for decisions,
checkpoint hand-over to Ray Tune, the summary and plot. The overhead one more trial adds is
``overhead(x2) - overhead(x1)``; the target is below 10% of a 2-minute trial (12 s). The direct run is the
reference for what a trial's training costs alone.

``--readme`` measures the README's demo instead: ``pretrain sweep configs/sweep/digits_asha.yaml`` run literally from
the repository root (8 trials, 2 at a time, 1 CPU each), against the time its trials' steps take in a direct
``pretrain train`` of the same trial config at the same CPU share (two direct runs side by side, one thread each, the
median ``step_time_s`` of their logs). The target: sweep wall time within 1.25x of (steps all trials trained x that
step time / trials at once) plus the sweep's fixed start (driver start to the first trial's run start).

Usage::

    python benchmarks/sweep.py                      # appends a section to benchmarks/RESULTS.md
    python benchmarks/sweep.py --steps 20 --no-append
    python benchmarks/sweep.py --readme             # the README's digits ASHA sweep
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
    """Wall time of a trial's training process: its start stamp to the last write of its log (the exit summary)."""
    return (run_dir / "sweep" / "train.log").stat().st_mtime - _started_at(run_dir)


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


def _step_time_s(run_dir: Path) -> list[float]:
    events = [yaml.safe_load(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return [e["step_time_s"] for e in events if e.get("event") == "train" and e["step"] > 10]


def _started_at(run_dir: Path) -> float:
    header = (run_dir / "sweep" / "train.log").read_text().split("=====")[1].strip().split()[:2]
    return datetime.datetime.strptime(" ".join(header), "%Y-%m-%d %H:%M:%S.%f").timestamp()


def _readme(args: argparse.Namespace) -> str:
    """The README's digits ASHA sweep against direct runs of its trial config; returns the RESULTS.md section."""
    import json  # noqa: PLC0415

    from launch.sweep.spec import load_sweep  # noqa: PLC0415

    sweep_yaml = "configs/sweep/digits_asha.yaml"
    if not (ROOT / "data" / "digits" / "manifest.json").is_file():
        _run(
            [sys.executable, "-m", "launch.cli", "data", "build", "digits", "--out", "data/digits"],
            ROOT,
            Path(os.devnull),
        )
    spec = load_sweep(ROOT / sweep_yaml)
    with tempfile.TemporaryDirectory(prefix="bench-sweep-") as tmp:
        work = Path(tmp)
        # the trial config at the same CPU share: two runs side by side, one thread each (as 2 concurrent trials)
        overrides = [*spec.trial_overrides(), "optim.lr=1.0e-3", f"trainer.max_steps={args.direct_steps}"]
        procs = []
        for i in range(spec.max_concurrent):
            argv = [sys.executable, "-m", "launch.cli", "train", spec.base, *overrides, f"run.output_dir={work}",
                    f"run.name=direct{i}", "--nproc", "1"]  # fmt: skip
            procs.append(
                subprocess.Popen(argv, cwd=ROOT, env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
            )
        for p in procs:
            if p.wait() != 0:
                sys.exit(f"direct run failed ({p.returncode})")
        step_s = statistics.median([t for i in range(spec.max_concurrent) for t in _step_time_s(work / f"direct{i}")])
        name = f"bench_readme_{time.strftime('%Y%m%d_%H%M%S')}"
        env = {k: v for k, v in _env().items() if k != "OMP_NUM_THREADS"}  # the user's shell
        argv = [sys.executable, "-m", "launch.cli", "sweep", sweep_yaml, "--name", name, "--output-dir", str(work)]
        t0 = time.time()
        with open(work / "sweep.log", "wb") as log:
            rc = subprocess.run(argv, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT).returncode
        wall = time.time() - t0
        if rc != 0:
            sys.exit(f"the sweep failed ({rc}):\n{(work / 'sweep.log').read_text()[-3000:]}")
        summary = json.loads((work / name / "summary.json").read_text())
        fixed = min(_started_at(Path(r["run_dir"])) for r in summary) - t0
    steps = sum(int(r["step"]) for r in summary)
    statuses = {s: sum(r["status"] == s for r in summary) for s in sorted({r["status"] for r in summary})}
    ideal = steps * step_s / spec.max_concurrent + fixed
    ratio = wall / ideal
    rows = [
        ("sweep wall time", f"{wall:.0f} s", ", ".join(f"{n} {s}" for s, n in statuses.items())),
        ("steps all trials trained", f"{steps}", f"{len(summary)} trials, {spec.max_concurrent} at a time"),
        ("direct step time at 1 CPU (2 runs side by side)", f"{step_s:.3f} s", f"median, {args.direct_steps} steps"),
        ("fixed start (driver start to first trial start)", f"{fixed:.1f} s", "config checks, Ray start"),
        ("bound: steps x step time / 2 + fixed start", f"{ideal:.0f} s", "the trials' training alone"),
        ("sweep / bound", f"{ratio:.2f}", "target <= 1.25 (" + ("met" if ratio <= 1.25 else "missed") + ")"),
        (
            "serial bound: steps x step time + fixed start",
            f"{steps * step_s + fixed:.0f} s",
            "the issue's literal bound",
        ),
    ]
    table = "| measure | value | note |\n|---|---:|---|\n" + "\n".join(f"| {a} | {b} | {c} |" for a, b, c in rows)
    return (
        f"## README digits ASHA sweep vs its trials' training, {datetime.datetime.now().strftime('%Y-%m-%dT%H:%M')}\n\n"
        f"- machine: {_machine()}\n- command: `python benchmarks/sweep.py --readme` (runs `pretrain sweep "
        f"{sweep_yaml}` from the repository root, as the README does)\n\n{table}\n"
    )


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
    p.add_argument("--readme", action="store_true", help="time the README's digits ASHA sweep (see the docstring)")
    p.add_argument("--direct-steps", type=int, default=120, help="--readme: steps of each direct reference run")
    args = p.parse_args(argv)
    if args.readme:
        text = _readme(args)
        print(text)
        if not args.no_append:
            with open(ROOT / "benchmarks" / "RESULTS.md", "a") as f:
                f.write("\n" + text)
        return 0
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
