"""`pretrain status`: never unpickles, shows dead runs as dead (and `--watch` ends on them), names unusable files, and
imports no torch. Real run directories, real pickles, real processes (SIGKILLed), real subprocesses."""

from __future__ import annotations

import datetime
import json
import os
import pickle
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from launch.cli import main
from launch.slurm_jobs import JOBS_FILE, SLURM_SUBDIR, read_job_events
from pretrain.rundir import METRICS, STATUS, acquire_lease

REPO = Path(__file__).resolve().parents[2]
UNKNOWN_SLURM_JOB = "99999999"  # above Slurm's default MaxJobId (67043328): never a real job of the local Slurm


class _RunsACommand:
    """Unpickling this runs a shell command (what a crafted result pickle in a run directory could do)."""

    def __init__(self, command: str):
        self.command = command

    def __reduce__(self):
        return (os.system, (self.command,))


def _now_iso(offset_s: float = 0.0) -> str:
    return datetime.datetime.fromtimestamp(time.time() + offset_s, datetime.timezone.utc).isoformat(timespec="seconds")


def _write_status(run_dir: Path, **fields: object) -> None:
    run_dir.mkdir(parents=True, exist_ok=True)
    base = {"state": "running", "step": 30, "max_steps": 100, "epoch": 0, "img_per_s": 250.0,
            "host": socket.gethostname(), "started": _now_iso(-1), "updated": _now_iso()}  # fmt: skip
    (run_dir / STATUS).write_text(json.dumps({**base, **fields}))
    (run_dir / METRICS).write_text(json.dumps({"event": "train", "step": 30, "step_time_s": 0.5}) + "\n")


def _sleeper() -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])


def _kill(proc: subprocess.Popen) -> None:
    proc.send_signal(signal.SIGKILL)
    proc.wait()


# ------------------------------------------------------------------------------------------------------- no unpickling


@pytest.mark.parametrize("cluster", ["local", "slurm"])
def test_status_never_unpickles_the_result_pickle(cluster: str, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    run = tmp_path / "run"
    marker = tmp_path / "MARKER"
    folder = run / SLURM_SUBDIR
    folder.mkdir(parents=True)
    (folder / JOBS_FILE).write_text(json.dumps({"event": "submit", "job_id": UNKNOWN_SLURM_JOB, "cluster": cluster}))
    crafted = folder / f"{UNKNOWN_SLURM_JOB}_0_result.pkl"
    crafted.write_bytes(pickle.dumps(_RunsACommand(f"touch {marker}")))
    # what submitit logs when the job's function raises (submitit/core/submission.py)
    (folder / f"{UNKNOWN_SLURM_JOB}_0_log.err").write_text(
        "Traceback (most recent call last):\n  File 'x.py', line 1\nRuntimeError: boom\n"
        "submitit ERROR (2026-01-01 00:00:00,000) - Submitted job triggered an exception\n"
    )

    assert main(["status", str(run)]) == 0
    out = capsys.readouterr().out
    assert "state:      failed" in out and "RuntimeError: boom" in out
    assert main(["status", str(run), "--json"]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert shown["state"] == "failed" and shown["job_id"] == UNKNOWN_SLURM_JOB
    assert not marker.exists(), "pretrain status ran code from a pickle"

    # the pickle is a real exploit: loading it (in another process) does create the marker
    subprocess.run([sys.executable, "-c", f"import pickle; pickle.load(open({str(crafted)!r}, 'rb'))"], check=True)
    assert marker.exists()


def test_submitit_success_line_settles_a_local_job_without_the_pickle(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    run = tmp_path / "run"
    _write_status(run, state="running", host="another-node")
    folder = run / SLURM_SUBDIR
    (folder).mkdir()
    (folder / JOBS_FILE).write_text(json.dumps({"event": "submit", "job_id": UNKNOWN_SLURM_JOB, "cluster": "local"}))
    assert main(["status", str(run), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["state"] == "failed"  # the controller is gone and nothing succeeded
    (folder / f"{UNKNOWN_SLURM_JOB}_0_log.out").write_text(
        "submitit INFO (...) - Exiting after successful completion\n"
    )
    assert main(["status", str(run), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["state"] == "running"  # as before: the trainer's own word


# ---------------------------------------------------------------------------------------------------------- dead runs


def test_watch_ends_when_the_lease_holder_is_sigkilled(tmp_path: Path) -> None:
    run = tmp_path / "run"
    holder = _sleeper()
    try:
        _write_status(run, pid=holder.pid)
        lease = acquire_lease(run, pid=holder.pid)
        lease._stop.set()  # no heartbeat from this test process: only the pid tells whether the holder lives
        watch = subprocess.Popen(
            [sys.executable, "-m", "launch.cli", "status", str(run), "--watch", "--interval-s", "0.5"],
            cwd=REPO,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        before = []
        while not any(line.startswith("throughput:") for line in before):
            line = watch.stdout.readline()
            assert line, f"--watch ended while the holder lived:\n{''.join(before)}"
            before.append(line)
        assert "state:      running\n" in before and any("ETA" in line for line in before)
        _kill(holder)
        t0 = time.monotonic()
        rest, _ = watch.communicate(timeout=30)
        assert watch.returncode == 0
        assert time.monotonic() - t0 < 10
    finally:
        if holder.poll() is None:
            _kill(holder)
    last = rest.split("-" * 60)[-1]
    assert f"state:      dead (its lease holder (pid {holder.pid} on {socket.gethostname()}" in last
    assert f"process {holder.pid} on this host is gone" in last
    assert "ETA" not in last


def test_without_a_lease_a_gone_or_reused_pid_on_this_host_is_dead(tmp_path: Path, capsys) -> None:
    run = tmp_path / "run"
    proc = _sleeper()
    try:
        _write_status(run, pid=proc.pid)
        assert main(["status", str(run), "--json"]) == 0
        assert json.loads(capsys.readouterr().out)["state"] == "running"  # alive, and started before the run

        _write_status(run, pid=proc.pid, started="2001-01-01T00:00:00+00:00")  # the pid is younger than the run
        assert main(["status", str(run), "--json"]) == 0
        shown = json.loads(capsys.readouterr().out)
        assert shown["state"] == "dead" and "the pid now belongs to a newer one" in shown["state_reason"]

        _write_status(run, pid=proc.pid, host="another-node")  # nothing tells for another host's process
        assert main(["status", str(run), "--json"]) == 0
        assert json.loads(capsys.readouterr().out)["state"] == "running"
    finally:
        _kill(proc)
    _write_status(run, pid=proc.pid)
    assert main(["status", str(run)]) == 0
    out = capsys.readouterr().out
    assert f"state:      dead (no lease, and its process {proc.pid} on this host is gone)" in out
    assert "ETA" not in out


# ----------------------------------------------------------------------------------------------------- unusable files


def test_a_truncated_status_file_is_named(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    run = tmp_path / "run"
    _write_status(run)
    text = (run / STATUS).read_text()
    (run / STATUS).write_text(text[: len(text) // 2])
    assert main(["status", str(run)]) == 0
    out = capsys.readouterr().out
    assert f"problem:    {run / STATUS} is not valid JSON (truncated" in out
    assert main(["status", str(run), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["problems"] == [
        f"{run / STATUS} is not valid JSON (truncated or overwritten?)"
    ]


def test_wrongly_typed_fields_are_named_not_a_traceback(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    run = tmp_path / "run"
    _write_status(run, step="thirty", max_steps=None, epoch=[1], img_per_s="fast", last_eval="good", pid="12")
    (run / METRICS).write_text(json.dumps({"event": "train", "step": 30, "step_time_s": "slow"}) + "\n")
    (run / SLURM_SUBDIR).mkdir()
    (run / SLURM_SUBDIR / JOBS_FILE).write_text('5\n["submit"]\n{"event": "submit", "job_id": 7, "clus')
    assert main(["status", str(run)]) == 0
    out = capsys.readouterr().out
    assert "state:      running" in out
    assert f"problem:    {run / STATUS}: step='thirty' is not an integer; ignored" in out
    assert "img_per_s='fast' is not a number" in out and "last_eval='good' is not an object" in out
    assert "step:" not in out and "throughput:" not in out
    assert read_job_events(run) == []  # a number, a list and a torn line are no events
    assert main(["status", str(run), "--json"]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert shown["step"] is None and len(shown["problems"]) == 5


# ------------------------------------------------------------------------------------------------------------ imports


def test_status_imports_no_torch_and_help_lists_every_command(tmp_path: Path) -> None:
    run = tmp_path / "run"
    _write_status(run, host="another-node")
    code = f"import sys; from launch.cli import main; main(['status', {str(run)!r}]); print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True).stdout
    assert out.splitlines()[-1] == "False" and "state:      running" in out

    helped = subprocess.run([sys.executable, "-m", "launch.cli", "--help"], cwd=REPO, capture_output=True, text=True)
    assert helped.returncode == 0
    for command in ("models", "data", "train", "submit", "status", "cancel", "sweep"):
        assert f"\n    {command} " in helped.stdout, command
    wrong = subprocess.run([sys.executable, "-m", "launch.cli", "stauts"], cwd=REPO, capture_output=True, text=True)
    assert wrong.returncode == 2 and "'sweep'" in wrong.stderr and "'status'" in wrong.stderr
