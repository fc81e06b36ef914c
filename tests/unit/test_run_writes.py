"""Writes of a run that fail (a full disk, a read-only file system) on real tmpfs mounts: the metrics sink, TensorBoard
and status.json keep the failure instead of raising, leave no torn line, and status.json still records the end."""

from __future__ import annotations

import errno
import json
from pathlib import Path

import pytest
from scratch_disks import fill, tmpfs_mounts

from pretrain.metrics import JsonlSink, RunWriteError, StatusFile, TensorBoardSink, build_metrics_sink


@pytest.fixture
def tmpfs(tmp_path: Path):
    yield from tmpfs_mounts(tmp_path)


def _event(step: int) -> dict:
    return {"event": "train", "step": step, "loss": 1.0 / step, "lr": 1e-3, "note": "x" * 300}


def test_metrics_on_a_full_disk_keep_the_failure_and_no_torn_line(tmpfs) -> None:
    disk = tmpfs(1 << 20)
    sink = JsonlSink(disk / "metrics.jsonl")
    sink.log(_event(1))
    fill(disk)
    for step in range(2, 40):  # the file's last page fills up, then a line cannot be written whole
        sink.log(_event(step))
        if sink.failure is not None:
            break
    assert isinstance(sink.failure, RunWriteError) and sink.failure.errno == errno.ENOSPC
    assert str(sink.failure) == f"could not write {disk / 'metrics.jsonl'} (No space left on device)"
    assert sink.failure.advice == "free space on that file system"
    written = (disk / "metrics.jsonl").read_bytes()
    assert written.endswith(b"\n"), "a torn line was left"
    steps = [json.loads(line)["step"] for line in written.splitlines()]
    assert steps == list(range(1, step))  # every line whole, the failed one absent
    sink.log(_event(99))  # nothing more is written after a failure
    assert (disk / "metrics.jsonl").read_bytes() == written
    sink.close()


def test_status_on_a_full_disk_is_rewritten_in_place(tmpfs) -> None:
    disk = tmpfs(1 << 20)
    status = StatusFile(disk / "status.json", max_steps=10)
    assert status.update(step=3) and status.failure is None
    fill(disk)
    assert status.update(state="failed", step=4, message="the reason " * 5)  # true on disk, although full
    assert status.failure is not None and status.failure.errno == errno.ENOSPC
    shown = json.loads((disk / "status.json").read_text())
    assert shown["state"] == "failed" and shown["step"] == 4 and shown["message"].startswith("the reason")
    assert sorted(p.name for p in disk.iterdir()) == ["filler", "status.json"]  # no temporary file left


def test_status_on_a_read_only_disk_says_it_could_not_record(tmpfs, caplog) -> None:
    disk = tmpfs(1 << 20, ro=True)
    status = StatusFile(disk / "status.json")
    assert status.update(state="failed") is False
    assert status.failure is not None and status.failure.errno == errno.EROFS
    assert status.failure.advice == "the file system is read-only: make it writable"
    message = status.failure.run_ended(7, None)
    assert message == (
        f"could not write {disk / 'status.json'} (Read-only file system) at step 7; the run stopped and no checkpoint "
        "was saved yet. To go on, the file system is read-only: make it writable, then start it again with --restart"
    )
    with pytest.raises(RunWriteError, match="Read-only file system"):
        build_metrics_sink(disk, True, True, 0)


def test_tensorboard_on_a_full_disk_reports_once_without_a_thread_traceback(tmpfs, capfd) -> None:
    disk = tmpfs(1 << 20)
    sink = TensorBoardSink(disk / "tb")
    sink.log({"event": "train", "step": 1, "loss": 1.0})
    fill(disk)
    for step in range(2, 2000):
        sink.log({"event": "train", "step": step, "loss": 1.0, "lr": 0.1, "grad_norm": 2.0})
        if sink.failure is not None:
            break
    assert sink.failure is not None and sink.failure.errno == errno.ENOSPC
    assert str(sink.failure) == f"could not write {disk / 'tb'} (No space left on device)"
    sink.close()
    err = capfd.readouterr().err
    assert "Traceback" not in err and "Exception in thread" not in err
