"""A run's processes live and stop together: real 2-rank `pretrain train --nproc 2` runs on the digits shards.

- A SIGKILLed launcher takes its ranks along (parent-death signal); the restart takes the lease over only once every
  process of the first run is gone, and the history holds every step once.
- SIGINT or SIGTERM at any moment of set-up (0.5 s after the start, as the ranks start, while DeepSpeed is set up)
  stops the run untrained: exit 3, `stopped` or `preempted`, and the same command then trains it.
- A second run is told who holds the directory from the first second, and `pretrain cancel` stops a local run.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import REPO, TINY_RUN_STEPS, tiny_run_overrides, train_env
from test_train_resume import wait_for

from pretrain.checkpoint import verify_checkpoint
from pretrain.fsutil import read_jsonl
from pretrain.rundir import COMPLETE_MARKER

pytestmark = [pytest.mark.slow, pytest.mark.world_size(2)]

CONFIG = "configs/run/digits_sepvit_lite.yaml"
EXIT_PREEMPTED = 3


def train_steps(run_dir: Path) -> list[int]:
    return [e["step"] for e in read_jsonl(run_dir / "metrics.jsonl") if e.get("event") == "train"]


def gone(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] in ("Z", "X")
    except OSError:
        return True


def mtimes(run_dir: Path) -> dict[str, int]:
    return {str(p.relative_to(run_dir)): p.stat().st_mtime_ns for p in run_dir.rglob("*") if p.is_file()}


def test_a_sigkilled_launcher_takes_its_ranks_along_and_the_restart_owns_the_run(digits_dir, run_root, start_train):
    args = (CONFIG, tiny_run_overrides(digits_dir, run_root, "orphans"), "--nproc", "2")
    run_dir = run_root / "orphans"
    first = start_train(*args)
    wait_for((run_dir / "checkpoints" / "step_000008" / COMPLETE_MARKER).exists, 180, first, "checkpoint step_000008")
    ranks = [int(pid) for pid in Path(f"/proc/{first.proc.pid}/task/{first.proc.pid}/children").read_text().split()]
    pids = [first.proc.pid, *ranks]
    lease = json.loads((run_dir / "lease.json").read_text())

    os.kill(first.proc.pid, signal.SIGKILL)  # the launcher alone: nobody signals its ranks
    first.proc.wait()
    wait_for(lambda: all(gone(pid) for pid in ranks), 10, what=f"the ranks {ranks} to die with their launcher")
    before = mtimes(run_dir)
    time.sleep(1.0)
    assert mtimes(run_dir) == before, "a process of the killed run still writes"
    assert 8 <= max(train_steps(run_dir)) < TINY_RUN_STEPS, "orphaned ranks trained on after their launcher died"
    assert lease["pid"] == first.proc.pid and [p["pid"] for p in lease["processes"]] == pids  # launcher, 2 ranks

    second = start_train(*args)
    assert second.wait() == 0, second.output[-5000:]
    assert f"took over the lease of {run_dir}" in second.output
    assert f"processes {', '.join(map(str, pids))} on this host are gone" in second.output
    assert train_steps(run_dir) == list(range(1, TINY_RUN_STEPS + 1)), "every step logged exactly once"
    status = json.loads((run_dir / "status.json").read_text())
    assert status["state"] == "finished" and status["restarts"] == 1 and status["pid"] not in pids
    assert not (run_dir / "lease.json").exists()


# when to send the signal, and how: a Ctrl-C reaches the whole process group (as from a terminal), SIGTERM the launcher
MOMENTS = {
    "0.5 s after the start": None,
    "as the ranks start": "started 2 ranks",
    "while DeepSpeed is set up": "initialising the DeepSpeed engine",
}


@pytest.mark.parametrize(
    ("moment", "signum", "state"),
    [
        ("0.5 s after the start", signal.SIGINT, "stopped"),
        ("as the ranks start", signal.SIGTERM, "preempted"),
        ("while DeepSpeed is set up", signal.SIGINT, "stopped"),
    ],
)
def test_a_stop_signal_at_any_moment_of_set_up_stops_the_run_untrained(
    moment, signum, state, digits_dir, run_root, start_train
):
    name = f"early_{signum}"
    steps = ("trainer.max_steps=4", "schedule.warmup_steps=2", "trainer.eval_every_steps=0")
    args = (CONFIG, tiny_run_overrides(digits_dir, run_root, name, *steps), "--nproc", "2")
    run_dir = run_root / name
    run = start_train(*args)
    if MOMENTS[moment] is None:
        time.sleep(0.5)
    else:
        wait_for(lambda: MOMENTS[moment] in run.output, 180, run, f"log line {MOMENTS[moment]!r}")
    if signum == signal.SIGINT:
        run.kill_all(signum)
    else:
        run.proc.send_signal(signum)
    assert run.wait() == EXIT_PREEMPTED, run.output[-5000:]
    assert "Traceback" not in run.output
    status = json.loads((run_dir / "status.json").read_text())
    assert status["state"] == state and status["exit_code"] == EXIT_PREEMPTED and status["step"] == 0
    assert status["message"].startswith(f"stopped by {signal.Signals(signum).name} ")
    assert train_steps(run_dir) == [] and not (run_dir / "checkpoints").exists(), "a step was trained after the signal"
    assert not (run_dir / "lease.json").exists()
    if moment == "while DeepSpeed is set up":  # the directory is as good as new: the same command trains it
        again = start_train(*args)
        assert again.wait() == 0, again.output[-5000:]
        assert train_steps(run_dir) == [1, 2, 3, 4]
        assert json.loads((run_dir / "status.json").read_text())["state"] == "finished"


def test_the_holder_is_named_from_the_first_second_and_cancel_stops_a_local_run(digits_dir, run_root, start_train):
    # no checkpoint until the end: a second run must not mistake the first one's history for an abandoned run's
    overrides = tiny_run_overrides(
        digits_dir, run_root, "cancelled", "trainer.max_steps=100", "checkpoint.every_steps=0",
        "trainer.eval_every_steps=0",
    )  # fmt: skip
    run_dir = run_root / "cancelled"
    first = start_train(CONFIG, overrides, "--nproc", "2")
    wait_for(lambda: train_steps(run_dir), 180, first, "the first step")
    second = start_train(CONFIG, overrides, "--nproc", "2")
    assert second.wait(timeout=120) == 2, second.output[-3000:]
    assert f"is in use by another run (pid {first.proc.pid} on " in second.output
    assert "no usable checkpoint" not in second.output and "Traceback" not in second.output

    cancel = subprocess.run(
        [sys.executable, "-m", "launch.cli", "cancel", str(run_dir)],
        cwd=REPO, env=train_env(), capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert cancel.returncode == 0, cancel.stderr
    assert f"sent SIGINT to the run holding {run_dir} (pids {first.proc.pid}, " in cancel.stdout
    assert first.wait() == EXIT_PREEMPTED, first.output[-5000:]
    status = json.loads((run_dir / "status.json").read_text())
    stopped = status["step"]
    assert status["state"] == "stopped" and status["exit_code"] == EXIT_PREEMPTED and 1 <= stopped < 100
    assert status["message"] == f"stopped by SIGINT at step {stopped}"
    assert status["last_checkpoint"].endswith(f"step_{stopped:06d}")
    assert verify_checkpoint(status["last_checkpoint"]) == (True, "ok")
    assert train_steps(run_dir) == list(range(1, stopped + 1))


def test_a_run_whose_lease_is_taken_stops_at_once_and_writes_nothing_more(digits_dir, run_root, start_train):
    # another run judged this one dead and took the directory (a frozen node that woke up): it must not write on
    overrides = tiny_run_overrides(digits_dir, run_root, "usurped", "trainer.max_steps=200")
    run_dir = run_root / "usurped"
    run = start_train(CONFIG, overrides, "--nproc", "2")
    wait_for((run_dir / "checkpoints" / "step_000004" / COMPLETE_MARKER).exists, 180, run, "checkpoint step_000004")
    lease = json.loads((run_dir / "lease.json").read_text())
    usurper = {
        **lease,
        "token": "the-new-holder",
        "pid": 1,
        "processes": [{"host": lease["host"], "pid": 1, "start": 1}],
    }
    (run_dir / ".usurper").write_text(json.dumps(usurper))
    os.replace(run_dir / ".usurper", run_dir / "lease.json")
    t0 = time.monotonic()
    assert run.wait(timeout=60) == 1, run.output[-3000:]
    assert time.monotonic() - t0 < 10
    assert "the run's lease is lost" in run.output and "now names another run (pid 1 on " in run.output
    assert (
        json.loads((run_dir / "lease.json").read_text())["token"] == "the-new-holder"
    )  # neither removed nor rewritten
    assert json.loads((run_dir / "status.json").read_text())["state"] == "running"  # no end state written over it
    assert max(train_steps(run_dir)) < 200
