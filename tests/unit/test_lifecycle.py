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
