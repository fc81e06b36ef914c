"""The sweep hook with real 2-rank `pretrain train` runs: a trial's run waits at each eval for the trial's decision
(idle, no signals), and stops by itself, with a checkpoint, when its trial asks it to or is gone."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

from conftest import tiny_run_overrides

from pretrain.checkpoint import verify_checkpoint
from pretrain.fsutil import read_jsonl
from pretrain.sweep_hook import CONTINUE, STOP, decide, install_hook, start_heartbeat, waiting_step

CONFIG = "configs/run/digits_sepvit_lite.yaml"


def group_cpu_s(pgid: int) -> float:
    """User + system CPU seconds of the live processes of a process group (clock ticks of /proc/PID/stat)."""
    total = 0
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            try:
                fields = (proc / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[2]) == pgid:
                total += int(fields[11]) + int(fields[12])
    return total / os.sysconf("SC_CLK_TCK")


def train_steps(run_dir: Path) -> list[int]:
    return [e["step"] for e in read_jsonl(run_dir / "metrics.jsonl") if e.get("event") == "train"]


def start_hooked(start_train, digits_dir: Path, run_root: Path, name: str, eval_every: int, timeout_s: float = 120):
    """What a trial does before its run starts (install the hook, beat), then a 2-rank run; (run dir, run, beat)."""
    run_dir = run_root / name
    install_hook(run_dir, timeout_s=timeout_s)
    beat = start_heartbeat(run_dir, every_s=1.0)
    overrides = tiny_run_overrides(digits_dir, run_root, name, f"trainer.eval_every_steps={eval_every}")
    return run_dir, start_train(CONFIG, overrides, "--nproc", "2"), beat


def wait_until(done, run, timeout_s: float = 180.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not done():
        assert time.monotonic() < deadline and run.proc.poll() is None, run.output[-3000:]
        time.sleep(0.1)


def test_a_run_in_a_sweep_waits_at_each_eval_for_the_decision(start_train, digits_dir: Path, run_root: Path) -> None:
    # After reporting an eval, a trial (launch.sweep.trial) tells the run to continue or, when Ray Tune stopped the
    # trial, to stop. The run must train no further than the eval it waits at, cost no CPU while waiting, and stop
    # with a checkpoint of exactly that step.
    run_dir, run, beat = start_hooked(start_train, digits_dir, run_root, "hooked", eval_every=5)
    try:
        wait_until(lambda: waiting_step(run_dir) == 5, run)
        cpu0 = group_cpu_s(run.proc.pid)
        time.sleep(3.0)
        assert max(train_steps(run_dir)) == 5 and waiting_step(run_dir) == 5  # no step past the eval
        assert group_cpu_s(run.proc.pid) - cpu0 < 0.9  # 2 ranks, a launcher, loader workers: idle, not spinning
        decide(run_dir, CONTINUE, 5)
        wait_until(lambda: waiting_step(run_dir) == 10, run)
        decide(run_dir, STOP)
        assert run.wait() == 0, run.output[-3000:]
    finally:
        beat.set()
    status = json.loads((run_dir / "status.json").read_text())
    assert status["state"] == "stopped" and status["step"] == 10, status
    assert max(train_steps(run_dir)) == 10
    assert verify_checkpoint(run_dir / "checkpoints" / "step_000010")[0]  # saved at the stop (10 is no multiple of 4)


def test_a_run_whose_trial_is_gone_stops_by_itself(start_train, digits_dir: Path, run_root: Path) -> None:
    # the heartbeat stops at once: the trial died (a killed driver, a lost node). The run notices at a step boundary.
    run_dir, run, beat = start_hooked(start_train, digits_dir, run_root, "orphan", eval_every=5, timeout_s=4)
    beat.set()
    assert run.wait() == 0, run.output[-3000:]
    status = json.loads((run_dir / "status.json").read_text())
    assert status["state"] == "stopped" and 1 <= status["step"] < 5, status
    assert "its trial is gone" in run.output
    assert verify_checkpoint(run_dir / "checkpoints" / f"step_{status['step']:06d}")[0]


def test_a_run_asked_to_stop_between_evals_stops_at_a_step(start_train, digits_dir: Path, run_root: Path) -> None:
    run_dir, run, beat = start_hooked(start_train, digits_dir, run_root, "asked", eval_every=100)
    try:
        wait_until(lambda: bool(train_steps(run_dir)), run)
        decide(run_dir, STOP)
        assert run.wait() == 0, run.output[-3000:]
    finally:
        beat.set()
    status = json.loads((run_dir / "status.json").read_text())
    assert status["state"] == "stopped" and status["step"] < 20, status
    assert verify_checkpoint(run_dir / "checkpoints" / f"step_{status['step']:06d}")[0]
