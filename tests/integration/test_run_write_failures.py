"""A disk that fills up in the middle of a real 2-rank run (a tmpfs, filled by the test once the first checkpoint is
complete): the run ends on every rank with state failed, the reason and what to do in one message (no traceback),
status.json says so although the disk is full, the checkpoints and metrics written before are whole, and once space is
freed the same command resumes and finishes with every step logged once."""

from __future__ import annotations

import json
import re
import time
from pathlib import Path

import pytest
from conftest import tiny_run_overrides
from scratch_disks import fill, tmpfs_mounts

from pretrain.checkpoint import verify_checkpoint
from pretrain.fsutil import read_jsonl

pytestmark = [pytest.mark.slow, pytest.mark.world_size(2)]

CONFIG = "configs/run/digits_sepvit_lite.yaml"


@pytest.fixture
def tmpfs(run_root: Path):
    yield from tmpfs_mounts(run_root)


def _wait_for(path: Path, run, timeout: float = 180.0) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert run.proc.poll() is None, f"the run ended before {path} appeared:\n{run.output[-3000:]}"
        assert time.monotonic() < deadline, f"no {path} after {timeout:.0f} s"
        time.sleep(0.05)


def test_a_disk_that_fills_mid_run_ends_it_failed_and_it_resumes_once_freed(
    digits_dir: Path, tmpfs, start_train
) -> None:
    disk = tmpfs(256 << 20)  # room for keep_last=3 checkpoints and the one being written (~50 MB each)
    # one checkpoint at step 10, then ten steps of writes to metrics, TensorBoard and status.json only
    overrides = tiny_run_overrides(digits_dir, disk, "full", "trainer.eval_every_steps=0", "checkpoint.every_steps=10")
    run = start_train(CONFIG, overrides, "--nproc", "2")
    run_dir = disk / "full"
    _wait_for(run_dir / "checkpoints" / "step_000010" / "COMPLETE", run)
    filler = fill(disk)
    assert run.wait() == 1, run.output[-4000:]

    out = run.output
    assert "Traceback" not in out and "Exception in thread" not in out, out[-4000:]
    errors = [line for line in out.splitlines() if "ERROR pretrain.trainer:" in line]
    assert len(errors) == 1, out[-4000:]
    found = re.search(r"could not write (\S+) \(No space left on device\) at step (\d+); the run stopped", errors[0])
    assert found and found.group(1).startswith(str(run_dir)), errors[0]
    step = int(found.group(2))
    assert "To go on, free space on that file system, then run the same command again" in errors[0]

    status = json.loads((run_dir / "status.json").read_text())
    assert status["state"] == "failed" and status["exit_code"] == 1 and status["step"] == step
    assert status["message"] == errors[0].split("ERROR pretrain.trainer: ", 1)[1]
    ckpts = sorted(p for p in (run_dir / "checkpoints").glob("step_*"))
    assert [c.name for c in ckpts] == ["step_000010"] and verify_checkpoint(ckpts[0])[0]
    assert status["last_checkpoint"] == str(ckpts[0]) and "up to step_000010 are intact" in errors[0]
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    steps = [json.loads(line)["step"] for line in lines]  # every line whole
    assert steps == list(range(1, len(steps) + 1)) and len(steps) <= step

    filler.unlink()
    again = start_train(CONFIG, overrides, "--nproc", "2")
    assert again.wait() == 0, again.output[-4000:]
    assert f"resumed from {ckpts[-1]}" in again.output
    assert json.loads((run_dir / "status.json").read_text())["state"] == "finished"
    train = [e["step"] for e in read_jsonl(run_dir / "metrics.jsonl") if e.get("event") == "train"]
    assert train == list(range(1, 21))  # each step once, across the failure and the resume
