"""The trial guard (`python -m launch.trial_guard guard`) with real processes: it stops a trial's run when the process
it watches dies or when asked, escalates to SIGKILL after the grace period, and never interrupts a compiler build.
And the sweep hook with real 2-rank `pretrain train` runs: a trial's run waits at each eval for the decision."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import tiny_run_overrides

from pretrain.checkpoint import verify_checkpoint
from pretrain.fsutil import read_jsonl
from pretrain.sweep_hook import CONTINUE, STOP, Heartbeat, decide, install_hook, waiting_step

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the guard watches /proc")

CONFIG = "configs/run/digits_sepvit_lite.yaml"


def start_guard(tmp_path: Path, watch_pid: int, command: str, grace_s: float = 1.0) -> tuple[int, int, Path]:
    """Start a guard running ``bash -c command``; returns (process group, guard pid, exit file)."""
    exit_file = tmp_path / "exit_code"
    argv = [
        sys.executable, "-m", "launch.trial_guard", "guard", "--watch-pid", str(watch_pid),
        "--exit-file", str(exit_file), "--log", str(tmp_path / "run.log"), "--grace-s", str(grace_s),
        "--", "bash", "-c", command,
    ]  # fmt: skip
    leader = subprocess.Popen(argv, stdout=subprocess.PIPE, start_new_session=True, cwd=tmp_path)
    guard_pid = int(leader.stdout.readline())
    leader.wait()
    return leader.pid, guard_pid, exit_file


def wait_for(path: Path, timeout: float) -> str:
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert time.monotonic() < deadline, f"{path} not written within {timeout} s"
        time.sleep(0.1)
    time.sleep(0.2)
    return path.read_text()


def group_alive(pgid: int) -> bool:
    """Whether a live (not zombie) process is in group ``pgid``."""
    for proc in Path("/proc").iterdir():
        try:
            fields = (proc / "stat").read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if int(fields[2]) == pgid and fields[0] not in ("Z", "X"):
            return True
    return False


def group_ends(pgid: int, timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while group_alive(pgid):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.1)
    return True


def test_run_ends_with_exit_code_when_it_finishes(tmp_path: Path) -> None:
    _, _, exit_file = start_guard(tmp_path, os.getpid(), "echo hello; exit 7")
    assert wait_for(exit_file, 20) == "7"
    assert "hello" in (tmp_path / "run.log").read_text()


def test_watched_process_dying_stops_the_run_group(tmp_path: Path) -> None:
    watched = subprocess.Popen(["sleep", "60"])
    # a grandchild too: the whole group goes, not only the direct child
    pgid, _, exit_file = start_guard(tmp_path, watched.pid, "sleep 60 & sleep 60; wait")
    time.sleep(1.0)
    assert group_alive(pgid) and not exit_file.exists()
    watched.kill()
    watched.wait()
    assert int(wait_for(exit_file, 20)) == -signal.SIGTERM
    assert group_ends(pgid)


def test_sigterm_is_escalated_to_sigkill_after_the_grace_period(tmp_path: Path) -> None:
    pgid, guard_pid, exit_file = start_guard(tmp_path, os.getpid(), "trap '' TERM; sleep 60 & wait", grace_s=1.0)
    time.sleep(1.0)
    t0 = time.monotonic()
    os.kill(guard_pid, signal.SIGTERM)
    assert wait_for(exit_file, 20) == str(-signal.SIGKILL)
    assert time.monotonic() - t0 >= 1.0
    assert group_ends(pgid)


def test_a_running_build_is_not_interrupted(tmp_path: Path) -> None:
    # a process named `ninja` (what torch runs while it holds its extension build lock) must finish before the stop
    ninja = tmp_path / "ninja"
    ninja.symlink_to("/bin/sleep")
    _, guard_pid, exit_file = start_guard(tmp_path, os.getpid(), f"{ninja} 3 && touch built; sleep 60")
    time.sleep(1.0)
    os.kill(guard_pid, signal.SIGTERM)
    wait_for(exit_file, 30)
    assert (tmp_path / "built").exists()


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


def test_a_run_in_a_sweep_waits_at_each_eval_for_the_decision(start_train, digits_dir: Path, run_root: Path) -> None:
    # What a trial does (launch.sweep_trial): install the hook, keep a heartbeat, and after reporting an eval tell
    # the run to continue or, when Ray Tune stopped the trial, to stop. The run must train no further than the eval
    # it waits at, cost no CPU while waiting, and stop with a checkpoint of exactly that step.
    run_dir = run_root / "hooked"
    install_hook(run_dir, timeout_s=120)
    beat = Heartbeat(run_dir, every_s=1.0)
    overrides = tiny_run_overrides(digits_dir, run_root, "hooked", "trainer.eval_every_steps=5")
    run = start_train(CONFIG, overrides, "--nproc", "2")
    try:
        deadline = time.monotonic() + 180
        while waiting_step(run_dir) != 5:
            assert time.monotonic() < deadline and run.proc.poll() is None, run.output[-3000:]
            time.sleep(0.1)
        cpu0 = group_cpu_s(run.proc.pid)
        time.sleep(3.0)
        assert max(train_steps(run_dir)) == 5 and waiting_step(run_dir) == 5  # no step past the eval
        assert group_cpu_s(run.proc.pid) - cpu0 < 0.9  # 2 ranks, a launcher, loader workers: idle, not spinning
        decide(run_dir, 5, CONTINUE)
        while waiting_step(run_dir) != 10:
            assert time.monotonic() < deadline and run.proc.poll() is None, run.output[-3000:]
            time.sleep(0.1)
        decide(run_dir, 10, STOP)
        assert run.wait() == 0, run.output[-3000:]
    finally:
        beat.stop()
    status = json.loads((run_dir / "status.json").read_text())
    assert status["state"] == "stopped" and status["step"] == 10, status
    assert max(train_steps(run_dir)) == 10
    assert verify_checkpoint(run_dir / "checkpoints" / "step_000010")[0]  # saved at the stop (10 is no multiple of 4)


def test_a_run_whose_trial_is_gone_stops_by_itself(start_train, digits_dir: Path, run_root: Path) -> None:
    run_dir = run_root / "orphan"
    install_hook(run_dir, timeout_s=4)  # no heartbeat: the trial died (a killed driver, a lost node)
    overrides = tiny_run_overrides(digits_dir, run_root, "orphan", "trainer.eval_every_steps=5")
    run = start_train(CONFIG, overrides, "--nproc", "2")
    assert run.wait() == 0, run.output[-3000:]
    status = json.loads((run_dir / "status.json").read_text())
    assert status["state"] == "stopped" and status["step"] == 5, status
    assert verify_checkpoint(run_dir / "checkpoints" / "step_000005")[0]
