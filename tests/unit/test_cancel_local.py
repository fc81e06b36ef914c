"""`pretrain cancel RUN_DIR` on a run started with `pretrain train` (no recorded job): SIGINT to every process its
lease lists on this host, each checked by start time. Real processes standing for the launcher and its ranks."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

from launch.cli import main
from pretrain.lease import LeaseProcess, acquire_lease
from pretrain.rundir import LEASE

# exits 3 on the first SIGINT, as a rank that checkpoints and stops would
PROCESS = """
import signal, sys, time
signal.signal(signal.SIGINT, lambda *_: sys.exit(3))
print("ready", flush=True)
time.sleep(60)
sys.exit(0)
"""


def _start() -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-c", PROCESS], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "ready"
    return proc


def test_cancel_signals_every_process_of_a_local_run(tmp_path: Path, capsys) -> None:
    run = tmp_path / "run"
    procs = [_start() for _ in range(3)]  # launcher, rank 0, rank 1
    try:
        lease = acquire_lease(run, pid=procs[0].pid)
        lease.set_processes(LeaseProcess.of(p.pid) for p in procs[1:])
        lease._stop.set()
        t0 = time.monotonic()
        assert main(["cancel", str(run)]) == 0
        out = capsys.readouterr().out
        assert f"sent SIGINT to the run holding {run.resolve()} (pids {', '.join(str(p.pid) for p in procs)}" in out
        assert "ends as stopped" in out
        assert [p.wait(timeout=30) for p in procs] == [3, 3, 3]
        assert time.monotonic() - t0 < 10
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()


def test_cancel_never_signals_a_pid_that_now_belongs_to_another_process(tmp_path: Path, capsys) -> None:
    run = tmp_path / "run"
    holder, stranger = _start(), _start()
    try:
        acquire_lease(run, pid=holder.pid)._stop.set()
        data = json.loads((run / LEASE).read_text())
        impostor = {**data["processes"][0], "pid": stranger.pid}  # the run's rank died; its pid went to `stranger`
        (run / LEASE).write_text(json.dumps({**data, "processes": [*data["processes"], impostor]}))
        assert main(["cancel", str(run)]) == 0
        assert holder.wait(timeout=30) == 3
        time.sleep(0.5)
        assert stranger.poll() is None
        assert f"(pids {holder.pid} on " in capsys.readouterr().out
    finally:
        for p in (holder, stranger):
            if p.poll() is None:
                p.kill()
                p.wait()


def test_cancel_without_a_live_run_changes_nothing(tmp_path: Path, capsys) -> None:
    run = tmp_path / "run"
    run.mkdir()
    assert main(["cancel", str(run)]) == 2
    assert "no live run holds" in capsys.readouterr().err
    proc = _start()
    acquire_lease(run, pid=proc.pid)._stop.set()
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    before = (run / LEASE).read_text()
    assert main(["cancel", str(run)]) == 2  # its holder is dead: nothing to cancel
    assert (run / LEASE).read_text() == before
