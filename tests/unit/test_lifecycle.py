"""Processes of a run: ranks die with their launcher (parent-death signal, and the race before it is set), stop signals
sent before a rank has its handlers wait for them, and a repeated Ctrl-C. Real processes, no training."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import REPO

from launch.local_ranks import start_local_ranks
from pretrain.lifecycle import LAUNCHER_PID_ENV, StopSignals

# a rank as `pretrain` starts one: early_start first (launch.cli.entry), here after a pause standing for slow imports
RANK = """
import sys, time
time.sleep(float(sys.argv[1]))
from pretrain.lifecycle import StopSignals, early_start
early_start(["train"])
print("ready", flush=True)
deadline = time.monotonic() + float(sys.argv[2])
while time.monotonic() < deadline and StopSignals.current().received is None:
    time.sleep(0.05)
print("received", StopSignals.current().received, flush=True)
"""

LAUNCHER = f"""
import sys, time
from launch.local_ranks import start_local_ranks
procs = start_local_ranks([sys.executable, "-c", {RANK!r}, "0", "600"], 2)
print(" ".join(str(p.pid) for p in procs), flush=True)
time.sleep(600)
"""


def _gone(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] in ("Z", "X")
    except OSError:
        return True


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux's")
def test_ranks_die_with_a_sigkilled_launcher() -> None:
    launcher = subprocess.Popen([sys.executable, "-c", LAUNCHER], cwd=REPO, stdout=subprocess.PIPE, text=True)
    ranks: list[int] = []
    try:
        ranks = [int(pid) for pid in launcher.stdout.readline().split()]
        assert len(ranks) == 2
        seen = ""
        while seen.count("ready") < 2:  # both ranks run, their parent-death signal set
            line = launcher.stdout.readline()
            assert line, seen
            seen += line
        os.kill(launcher.pid, signal.SIGKILL)
        launcher.wait()
        deadline = time.monotonic() + 10
        while not all(_gone(pid) for pid in ranks) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert all(_gone(pid) for pid in ranks), "a rank outlived its launcher"
    finally:
        for pid in ranks:
            if not _gone(pid):
                os.kill(pid, signal.SIGKILL)
        if launcher.poll() is None:
            launcher.kill()
            launcher.wait()


def test_a_rank_whose_launcher_died_before_it_asked_for_the_signal_exits_at_once() -> None:
    # the launcher named in the environment is not this process's parent any more: it died and the rank was adopted
    env = dict(os.environ, **{LAUNCHER_PID_ENV: str(os.getpid() + 1 if os.getppid() != os.getpid() + 1 else 1)})
    code = "from pretrain.lifecycle import early_start; early_start(['train']); print('trained on')"
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True, timeout=60)
    assert out.returncode == 1 and "trained on" not in out.stdout


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_sent_before_a_rank_has_its_handlers_waits_for_them(signum: int) -> None:
    # the ranks are still "importing" (1 s) when the launcher forwards the signal: it must be kept, not kill them
    (rank,) = start_local_ranks([sys.executable, "-c", RANK, "1.0", "30"], 1)
    try:
        rank.send_signal(signum)
        assert rank.wait(timeout=60) == 0
    finally:
        if rank.poll() is None:
            rank.kill()
            rank.wait()


def test_a_repeated_ctrl_c_raises_except_in_ranks_of_a_launcher(monkeypatch: pytest.MonkeyPatch) -> None:
    stop = StopSignals().install()
    try:
        assert StopSignals.current() is stop
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(0.05)
        assert stop.received == signal.SIGINT
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.05)
    finally:
        stop.restore()
    assert StopSignals.current() is None
    monkeypatch.setenv(LAUNCHER_PID_ENV, str(os.getppid()))
    stop = StopSignals().install()  # a rank of a local launcher: its launcher kills it on a second Ctrl-C
    try:
        for _ in range(3):
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.05)
        assert stop.received == signal.SIGINT
    finally:
        stop.restore()


# the collector across a start-up, as `pretrain` runs it: off from early_start (also in a process forked meanwhile, a
# data loader worker, it is on), on again with the start-up's objects frozen; where someone else turned it off, it
# stays off
GC_STATES = """
import gc, os
from pretrain.lifecycle import early_start, pause_gc, resume_gc
early_start(["train"])
states = [gc.isenabled()]
pid = os.fork()
if pid == 0:
    os._exit(0 if gc.isenabled() else 1)
states.append(os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]) == 0)
frozen = gc.get_freeze_count()
resume_gc()
states += [gc.isenabled(), gc.get_freeze_count() > frozen]
gc.disable()
pause_gc()
resume_gc()
states.append(gc.isenabled())
print(states)
"""


def test_the_collector_is_off_while_a_process_starts_and_on_in_its_forks_and_after() -> None:
    out = subprocess.run([sys.executable, "-c", GC_STATES], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split("\n")[-2] == "[False, True, True, True, False]"


# where each command turns it back on: any command but train before it runs; a training rank before it builds
# anything (here one stopped by a SIGTERM that arrived before, so that it stops right there)
GC_IN_COMMANDS = """
import gc, os, signal, sys, time
from launch.cli import main
from pretrain.lifecycle import early_start
early_start(["status"])
main(["status", sys.argv[1]])
states = [gc.isenabled()]
from pretrain.config import load_config
from pretrain.distributed import DistInfo
from pretrain.rank import run_training
import torch
early_start(["train"])
states.append(gc.isenabled())
os.kill(os.getpid(), signal.SIGTERM)
time.sleep(0.1)
cfg = load_config("configs/run/digits_sepvit_lite.yaml", [f"data.path={sys.argv[1]}", f"run.output_dir={sys.argv[1]}"])
result = run_training(cfg, DistInfo(0, 1, 0, 1, "gloo", torch.device("cpu"), "single"))
states += [result.state, gc.isenabled()]
print(states)
"""


def test_status_turns_the_collector_on_before_it_runs_and_a_training_rank_before_it_builds(tmp_path: Path) -> None:
    out = subprocess.run(
        [sys.executable, "-c", GC_IN_COMMANDS, str(tmp_path)],
        cwd=REPO, capture_output=True, text=True, timeout=120, env=dict(os.environ, DS_ACCELERATOR="cpu"),
    )  # fmt: skip
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.strip().split("\n")[-1] == "[True, False, 'preempted', True]", out.stdout + out.stderr[-3000:]
    assert "leaked" not in out.stderr  # unfrozen at exit: the teardown frees the frozen objects (Triton's bindings)
