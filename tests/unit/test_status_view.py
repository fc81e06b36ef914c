"""`pretrain status`: never unpickles, shows dead runs as dead (and `--watch` ends on them), names unusable files, and
imports no torch. Real run directories, real pickles, real processes (SIGKILLed), real subprocesses."""

from __future__ import annotations

import datetime
import json
import os
import pickle
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from launch.cli import main
from launch.slurm_jobs import JOBS_FILE, SLURM_SUBDIR, read_job_events
from launch.status import WATCH_EXIT_CODES
from pretrain.lease import acquire_lease
from pretrain.rundir import METRICS, STATUS

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
        assert watch.returncode == WATCH_EXIT_CODES["dead"] == 1  # dead: the run failed without saying so
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


# --------------------------------------------------------------------------------------------------------- any bytes

_HOSTILE = {
    "not-utf8": b'{"state": "running", "message": "\xff\xfe\xfd"}',
    "nested-without-end": b"[" * 100_000,
    "json-array": b"[1, 2, 3]",
    "truncated": b'{"state": "runn',
    "huge": b'{"message": "' + b"x" * (2 << 20) + b'"}',
    "non-finite": b'{"state": "running", "step": 3, "img_per_s": NaN, "last_eval": {"val_top1": Infinity, "step": 3}}',
    "terminal-escapes": b'{"state": "\\u001b[2J", "message": "\\u001b[31mred", "host": "\\u0007"}',
}


def _no_constants(name: str) -> None:
    raise AssertionError(f"--json printed {name}, which is not JSON")


@pytest.mark.parametrize("kind", list(_HOSTILE))
@pytest.mark.parametrize("name", [STATUS, METRICS, "lease.json", f"{SLURM_SUBDIR}/{JOBS_FILE}"])
def test_status_reads_any_bytes(name: str, kind: str, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    run = tmp_path / "run"
    _write_status(run, host="another-node")
    (run / SLURM_SUBDIR).mkdir()
    (run / name).write_bytes(_HOSTILE[kind])
    assert main(["status", str(run)]) == 0
    captured = capsys.readouterr()
    assert captured.out.startswith(f"run:        {run}\nstate:      ") and captured.err == ""
    assert "\x1b" not in captured.out and "\x07" not in captured.out, "a file's bytes reached the terminal"
    if name == STATUS and kind != "terminal-escapes":
        assert f"problem:    {run / STATUS}" in captured.out
    assert main(["status", str(run), "--json"]) == 0
    shown = json.loads(capsys.readouterr().out, parse_constant=_no_constants)
    assert shown["run_dir"] == str(run) and isinstance(shown["problems"], list)


def test_what_a_status_file_says_is_checked(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    run = tmp_path / "run"
    (run).mkdir()
    (run / STATUS).write_bytes(_HOSTILE["non-finite"])
    assert main(["status", str(run), "--json"]) == 0
    shown = json.loads(capsys.readouterr().out, parse_constant=_no_constants)
    assert shown["img_per_s"] is None and shown["last_eval"] == {"step": 3} and shown["step"] == 3
    assert shown["problems"] == [f"{run / STATUS}: img_per_s=nan is not a finite number; ignored"]
    (run / STATUS).write_bytes(_HOSTILE["terminal-escapes"])
    assert main(["status", str(run)]) == 0
    out = capsys.readouterr().out
    assert "state='\\x1b[2J' is not a run state; ignored" in out and "message:    \\x1b[31mred" in out
    (run / STATUS).write_bytes(_HOSTILE["huge"])
    assert main(["status", str(run)]) == 0
    assert f"{run / STATUS} is larger than 1 MiB" in capsys.readouterr().out


# ---------------------------------------------------------------------------------------------------- --watch ends


@pytest.mark.parametrize(("state", "code"), [("finished", 0), ("failed", 1), ("preempted", 3), ("stopped", 4)], ids=str)
def test_watch_ends_on_every_final_state_with_its_code(state: str, code: int, tmp_path: Path, capsys) -> None:
    """No job, no lease: nothing will change these states (a preempted `pretrain train` waits for the user)."""
    run = tmp_path / "run"
    _write_status(run, state=state, host="another-node")
    t0 = time.monotonic()
    assert main(["status", str(run), "--watch", "--interval-s", "0.5"]) == code == WATCH_EXIT_CODES[state]
    assert time.monotonic() - t0 < 5 and capsys.readouterr().out.count("state:") == 1


def test_watch_ends_on_a_cancelled_job_and_refuses_a_bad_interval(tmp_path: Path, capsys) -> None:
    run = tmp_path / "run"
    _write_status(run, state="running", host="another-node")
    (run / SLURM_SUBDIR).mkdir()
    events = [{"event": "submit", "job_id": UNKNOWN_SLURM_JOB, "cluster": "local"}]
    events.append({"event": "cancel", "job_id": UNKNOWN_SLURM_JOB, "cluster": "local"})
    (run / SLURM_SUBDIR / JOBS_FILE).write_text("".join(json.dumps(e) + "\n" for e in events))
    assert main(["status", str(run), "--watch", "--interval-s", "0.5"]) == 4
    assert "state:      cancelled" in capsys.readouterr().out
    for bad in ("nan", "inf", "0", "-1"):
        assert main(["status", str(run), "--watch", "--interval-s", bad]) == 2
        assert "--interval-s" in capsys.readouterr().err


def test_a_preempted_run_is_final_only_when_nothing_will_resume_it(tmp_path: Path) -> None:
    from launch.status import read_run_status

    run = tmp_path / "run"
    holder = _sleeper()
    try:
        _write_status(run, state="preempted", pid=holder.pid)
        lease = acquire_lease(run, pid=holder.pid)
        lease._stop.set()
        shown = read_run_status(run)
        assert (shown.state, shown.final) == ("preempted", False)  # its process is still checkpointing and leaving
    finally:
        _kill(holder)
    shown = read_run_status(run)
    assert (shown.state, shown.final) == ("preempted", True)


def _stand_in(folder: Path, name: str, stderr: str) -> None:
    """A Slurm client command that fails as the real one does (for machines without Slurm)."""
    folder.mkdir(exist_ok=True)
    script = folder / name
    script.write_text(f"#!/bin/sh\necho '{stderr}' >&2\nexit 1\n")
    script.chmod(0o755)


def _slurm_answers() -> bool:
    """Whether a Slurm controller answers here (Slurm may be installed with no controller running)."""
    if shutil.which("scontrol") is None:
        return False
    ping = subprocess.run(["scontrol", "ping"], capture_output=True, text=True, timeout=30, check=False)
    return ping.returncode == 0 and "UP" in ping.stdout


def test_watch_ends_on_a_slurm_job_slurm_no_longer_knows(tmp_path: Path, monkeypatch, capsys) -> None:
    """`unknown` ends --watch (exit 5) once Slurm answers that it does not know the job; while Slurm cannot be asked,
    the job may still run and --watch goes on. The real scontrol answers where a Slurm controller runs; elsewhere a
    stand-in with Slurm's own error lines."""
    from launch.status import read_run_status

    run = tmp_path / "run"
    _write_status(run, state="running", host="another-node")
    (run / SLURM_SUBDIR).mkdir()
    submit = {"event": "submit", "job_id": UNKNOWN_SLURM_JOB, "cluster": "slurm"}
    (run / SLURM_SUBDIR / JOBS_FILE).write_text(json.dumps(submit) + "\n")
    path = os.environ["PATH"]
    if not _slurm_answers():
        _stand_in(tmp_path / "bin", "scontrol", "slurm_load_jobs error: Invalid job id specified")
        monkeypatch.setenv("PATH", f"{tmp_path / 'bin'}:{path}")
    assert main(["status", str(run), "--watch", "--interval-s", "0.5"]) == 5
    out = capsys.readouterr().out
    assert f"state:      unknown (Slurm no longer knows job {UNKNOWN_SLURM_JOB}" in out
    (run / STATUS).unlink()  # a job that never started (cancelled while queued, before `pretrain cancel` existed)
    assert read_run_status(run).final

    _write_status(run, state="running", host="another-node")
    _stand_in(
        tmp_path / "down", "scontrol", "slurm_load_jobs error: Unable to contact slurm controller (connect failure)"
    )
    monkeypatch.setenv("PATH", f"{tmp_path / 'down'}:{path}")
    shown = read_run_status(run)
    assert (shown.state, shown.final) == ("unknown", False) and "could not be asked" in shown.state_reason
