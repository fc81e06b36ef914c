"""The trial guard (`python -m launch.trial_guard guard`) with real processes: it stops a trial's run when the process
it watches dies or when asked, escalates to SIGKILL after the grace period, and never interrupts a compiler build."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the guard watches /proc")


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


def proc_state(pid: int) -> str:
    return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]


def count_lines(path: Path) -> int:
    return len(path.read_text().splitlines()) if path.exists() else 0


def test_a_paused_run_makes_no_progress_and_a_stop_still_ends_it(tmp_path: Path) -> None:
    # A trial's run is paused while Ray Tune decides on the result it reported; a stop decision must end it from there.
    from launch.trial_guard import LocalRun

    ticks = tmp_path / "ticks"
    run = LocalRun(["bash", "-c", f"while true; do echo x >> {ticks}; sleep 0.05; done"], tmp_path, grace_s=5.0)
    run.start()
    deadline = time.monotonic() + 20
    while count_lines(ticks) < 3:
        assert time.monotonic() < deadline, "the run never started ticking"
        time.sleep(0.05)

    run.pause()
    time.sleep(0.3)
    paused_at = count_lines(ticks)
    time.sleep(1.0)
    assert count_lines(ticks) == paused_at
    assert proc_state(run.guard_pid) != "T"  # the guard keeps watching the trial
    assert run.poll() is None

    run.resume()
    time.sleep(0.5)
    assert count_lines(ticks) > paused_at

    run.pause()
    t0 = time.monotonic()
    run.stop()
    assert run.poll() == -signal.SIGTERM  # it got the SIGTERM (and the SIGCONT to act on it), not the SIGKILL
    assert time.monotonic() - t0 < 5.0
    assert group_ends(run.pgid)
