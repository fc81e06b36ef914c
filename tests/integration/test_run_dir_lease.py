"""Two runs on one run directory: the second is refused (exit 2, naming the holder) and writes nothing; a killed
run's lease is taken over at once by the next start on the same host. Real `pretrain train` processes."""

from __future__ import annotations

import json
import signal
import time
from pathlib import Path

import pytest
from conftest import REPO, tiny_run_overrides

pytestmark = [pytest.mark.slow]

CONFIG = REPO / "configs" / "run" / "digits_sepvit_lite.yaml"


def train_series(run_dir: Path) -> list[tuple[int, float]]:
    events = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [(e["step"], e["loss"]) for e in events if e.get("event") == "train"]


def test_two_starts_together_one_wins_the_other_exits_2_and_writes_nothing(
    start_train, digits_dir: Path, run_root: Path
) -> None:
    solo = start_train(CONFIG, tiny_run_overrides(digits_dir, run_root, "solo"), "--nproc", "1")
    assert solo.wait() == 0, solo.output[-3000:]
    runs = [start_train(CONFIG, tiny_run_overrides(digits_dir, run_root, "shared"), "--nproc", "1") for _ in range(2)]
    codes = [r.wait() for r in runs]
    assert sorted(codes) == [0, 2], [r.output[-2000:] for r in runs]
    loser = runs[codes.index(2)]
    assert "run directory" in loser.output and "is in use by another run (pid " in loser.output
    assert "Traceback" not in loser.output
    # the winner's run is exactly a solo run: nothing of the loser's is in its history
    assert train_series(run_root / "shared") == train_series(run_root / "solo")
    assert not (run_root / "shared" / "lease.json").exists()  # released at the end


def test_a_second_start_on_a_held_run_dir_is_refused_at_once(start_train, digits_dir: Path, run_root: Path) -> None:
    first = start_train(CONFIG, tiny_run_overrides(digits_dir, run_root, "held"), "--nproc", "2")
    run_dir = run_root / "held"
    deadline = time.monotonic() + 120
    while not (run_dir / "lease.json").exists():
        assert time.monotonic() < deadline and first.proc.poll() is None, first.output[-3000:]
        time.sleep(0.1)
    second = start_train(CONFIG, tiny_run_overrides(digits_dir, run_root, "held"), "--nproc", "2")
    t0 = time.monotonic()
    assert second.wait(timeout=120) == 2, second.output[-3000:]
    assert time.monotonic() - t0 < 60
    holder = json.loads((run_dir / "lease.json").read_text())["pid"]
    assert f"is in use by another run (pid {holder} on " in second.output
    assert first.wait() == 0, first.output[-3000:]
    assert not list(run_dir.glob(".lease.json.*"))  # the refused start left no file behind
    assert [s for s, _ in train_series(run_dir)] == list(range(1, 21))  # one history, written by the first run only


def test_a_sigkilled_run_is_taken_over_at_once_and_resumes(start_train, digits_dir: Path, run_root: Path) -> None:
    run_dir = run_root / "killed"
    first = start_train(CONFIG, tiny_run_overrides(digits_dir, run_root, "killed"), "--nproc", "2")
    deadline = time.monotonic() + 180
    while not (run_dir / "checkpoints" / "step_000008" / "COMPLETE").exists():
        assert time.monotonic() < deadline and first.proc.poll() is None, first.output[-3000:]
        time.sleep(0.1)
    first.kill_all(signal.SIGKILL)
    first.proc.wait(timeout=30)
    assert (run_dir / "lease.json").exists()  # a SIGKILLed holder cannot release it
    second = start_train(CONFIG, tiny_run_overrides(digits_dir, run_root, "killed"), "--nproc", "2")
    assert second.wait() == 0, second.output[-3000:]
    assert "took over the lease" in second.output and "on this host are gone" in second.output  # launcher and ranks
    assert "resumed from" in second.output
