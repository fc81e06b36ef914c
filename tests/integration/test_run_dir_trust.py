"""The run directory promise against hostile and unlucky inputs, with real 2-rank DeepSpeed runs on CPU:

- crafted pickles (``rank_00000.pt``, ``mp_rank_00_model_states.pt``) run no code: outside the run dir they are
  refused without ``--trust-checkpoint``; inside it our own file loads as plain data, fails, and is set aside;
- 64 bytes flipped in the newest checkpoint (size unchanged): caught by sha256, set aside, the older one resumes and
  the run ends exactly as an uninterrupted one;
- a run dir with history but no usable checkpoint refuses to start (exit 2, nothing touched) unless ``--restart``,
  which keeps the old history in ``previous/``;
- a full disk at save time ends the run as failed with the reason, its torn files removed, earlier checkpoints intact;
  a disk too small or read-only is refused before anything starts (real tmpfs mounts; root only).
"""

from __future__ import annotations

import json
import os
import pickle
import shutil
import subprocess
from pathlib import Path

import pytest
from conftest import tiny_run_overrides

from pretrain.checkpoint import checkpoint_dir_bytes, verify_checkpoint, write_complete_marker
from pretrain.metrics import read_jsonl

pytestmark = [pytest.mark.slow, pytest.mark.world_size(2)]

CONFIG = "configs/run/digits_sepvit_lite.yaml"


class _RunsCode:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def craft(path: Path, marker: Path) -> None:
    """Replace ``path`` by a pickle whose unrestricted loading creates ``marker``."""
    with open(path, "wb") as f:
        pickle.dump({"module": _RunsCode(marker)}, f)


def train_series(run_dir: Path) -> list[tuple[int, float]]:
    return [(e["step"], e["loss"]) for e in read_jsonl(run_dir / "metrics.jsonl") if e.get("event") == "train"]


def flip(path: Path, offset: int, n: int = 64) -> None:
    data = bytearray(path.read_bytes())
    data[offset : offset + n] = bytes(b ^ 0x5A for b in data[offset : offset + n])
    path.write_bytes(bytes(data))


@pytest.fixture(scope="module")
def finished(digits_dir, scratch_root, start_train) -> Path:
    """An uninterrupted 20-step 2-rank run (checkpoints every 4 steps, the last 3 kept)."""
    run = start_train(CONFIG, tiny_run_overrides(digits_dir, scratch_root / "trust-ref", "ref"), "--nproc", "2")
    assert run.wait() == 0, run.output[-5000:]
    return scratch_root / "trust-ref" / "ref"


def test_crafted_checkpoint_outside_the_run_dir_is_refused_and_runs_nothing(
    finished: Path, digits_dir: Path, run_root: Path, start_train
) -> None:
    marker = run_root / "MARKER"
    evil = run_root / "downloaded" / "step_000016"
    shutil.copytree(finished / "checkpoints" / "step_000016", evil)
    craft(evil / "rank_00000.pt", marker)
    craft(evil / "mp_rank_00_model_states.pt", marker)
    write_complete_marker(evil)  # a forged marker is easy: it must not be what protects
    run = start_train(CONFIG, tiny_run_overrides(digits_dir, run_root, "victim"), "--nproc", "2", "--resume", str(evil))
    assert run.wait() == 2, run.output[-3000:]
    assert "lies outside this run's directory" in run.output and "--trust-checkpoint" in run.output
    assert not marker.exists()
    assert not (run_root / "victim").exists()  # refused before anything was written


def test_crafted_rank_file_inside_the_run_dir_is_set_aside_and_the_run_continues(
    finished: Path, digits_dir: Path, run_root: Path, start_train
) -> None:
    run_dir = run_root / "crafted"
    shutil.copytree(finished, run_dir)
    shutil.rmtree(run_dir / "checkpoints" / "step_000020")  # resume from 16, where the attack is
    (run_dir / "checkpoints" / "latest").write_text("step_000016\n")
    marker = run_root / "MARKER"
    craft(run_dir / "checkpoints" / "step_000016" / "rank_00000.pt", marker)
    write_complete_marker(run_dir / "checkpoints" / "step_000016")  # digests match the crafted file
    run = start_train(CONFIG, tiny_run_overrides(digits_dir, run_root, "crafted"), "--nproc", "2")
    assert run.wait() == 0, run.output[-4000:]
    assert not marker.exists()
    rejected = run_dir / "checkpoints" / "rejected" / "step_000016"
    assert "failed to load" in (rejected / "REJECTED.txt").read_text()
    assert "resumed from" in run.output and "step_000012" in run.output
    assert train_series(run_dir) == train_series(finished)  # resumed from 12: the same run


def test_flipped_bytes_in_the_newest_checkpoint_are_caught_and_the_older_one_resumes(
    finished: Path, digits_dir: Path, run_root: Path, start_train
) -> None:
    run_dir = run_root / "flipped"
    shutil.copytree(finished, run_dir)
    shutil.rmtree(run_dir / "checkpoints" / "step_000020")
    (run_dir / "checkpoints" / "latest").write_text("step_000016\n")
    model = run_dir / "checkpoints" / "step_000016" / "mp_rank_00_model_states.pt"
    size = model.stat().st_size
    flip(model, size // 2)
    assert model.stat().st_size == size and verify_checkpoint(model.parent, digests=False)[0]
    run = start_train(CONFIG, tiny_run_overrides(digits_dir, run_root, "flipped"), "--nproc", "2")
    assert run.wait() == 0, run.output[-4000:]
    reason = (run_dir / "checkpoints" / "rejected" / "step_000016" / "REJECTED.txt").read_text()
    assert "mp_rank_00_model_states.pt does not match its sha256" in reason
    assert "set checkpoint" in run.output and "resumed from" in run.output
    assert train_series(run_dir) == train_series(finished)


def test_history_without_a_usable_checkpoint_refuses_to_start_unless_restart(
    finished: Path, digits_dir: Path, run_root: Path, start_train
) -> None:
    run_dir = run_root / "markerless"
    shutil.copytree(finished, run_dir)
    for marker in (run_dir / "checkpoints").glob("step_*/COMPLETE"):
        marker.unlink()
    metrics_before = (run_dir / "metrics.jsonl").read_text()
    tb_before = sorted(p.name for p in (run_dir / "tb").iterdir())
    run = start_train(CONFIG, tiny_run_overrides(digits_dir, run_root, "markerless"), "--nproc", "2")
    assert run.wait() == 2, run.output[-3000:]
    assert "has the history of an earlier run" in run.output and "no COMPLETE marker" in run.output
    assert "--restart" in run.output
    assert (run_dir / "metrics.jsonl").read_text() == metrics_before  # nothing truncated
    assert sorted(p.name for p in (run_dir / "tb").iterdir()) == tb_before  # nothing deleted

    run = start_train(CONFIG, tiny_run_overrides(digits_dir, run_root, "markerless"), "--nproc", "2", "--restart")
    assert run.wait() == 0, run.output[-3000:]
    (previous,) = (run_dir / "previous").iterdir()
    assert (previous / "metrics.jsonl").read_text() == metrics_before
    assert sorted(p.name for p in (previous / "tb").iterdir()) == tb_before
    assert train_series(run_dir) == train_series(finished)  # a fresh start from step 0


@pytest.fixture
def tmpfs(run_root: Path):
    """``mount(size, ro=False) -> Path``: a real tmpfs of that size; unmounted at the end."""
    mounts: list[Path] = []

    def mount(size: int, ro: bool = False) -> Path:
        where = run_root / f"disk{len(mounts)}"
        where.mkdir()
        opts = f"size={size}" + (",ro" if ro else "")
        done = subprocess.run(["mount", "-t", "tmpfs", "-o", opts, "tmpfs", str(where)], capture_output=True)
        if done.returncode != 0:
            if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
                pytest.fail(f"CI=true and a tmpfs mount is needed: {done.stderr.decode()}")
            pytest.skip(f"cannot mount a tmpfs here (needs root): {done.stderr.decode().strip()}")
        mounts.append(where)
        return where

    yield mount
    for where in mounts:
        subprocess.run(["umount", "-l", str(where)], capture_output=True)


def test_full_disk_at_save_fails_cleanly_and_keeps_the_earlier_checkpoints(
    finished: Path, digits_dir: Path, tmpfs, start_train
) -> None:
    one = checkpoint_dir_bytes(finished / "checkpoints" / "step_000020")
    disk = tmpfs(int(2.5 * one) + (1 << 20))  # room for two checkpoints and the logs, not three
    run = start_train(CONFIG, tiny_run_overrides(digits_dir, disk, "full"), "--nproc", "2")
    assert run.wait() == 1, run.output[-4000:]
    assert "pretrain train: saving checkpoint step_000012 failed: no space left on device: need ~" in run.output
    assert "Traceback" not in run.output
    status = json.loads((disk / "full" / "status.json").read_text())
    assert status["state"] == "failed" and "no space left on device" in status["message"]
    ckpts = sorted(p.name for p in (disk / "full" / "checkpoints").glob("step_*"))
    assert ckpts == ["step_000004", "step_000008"]  # the torn one removed, the others intact
    assert all(verify_checkpoint(disk / "full" / "checkpoints" / c)[0] for c in ckpts)


def test_a_disk_too_small_or_read_only_is_refused_before_anything_starts(
    finished: Path, digits_dir: Path, tmpfs, start_train
) -> None:
    small = tmpfs(checkpoint_dir_bytes(finished / "checkpoints" / "step_000020") // 2)
    run = start_train(CONFIG, tiny_run_overrides(digits_dir, small, "small"), "--nproc", "2")
    assert run.wait() == 2, run.output[-3000:]
    assert "not enough space for a checkpoint in" in run.output
    assert not (small / "small").exists()
    ro = tmpfs(1 << 24, ro=True)
    run = start_train(CONFIG, tiny_run_overrides(digits_dir, ro, "ro"), "--nproc", "2")
    assert run.wait() == 2, run.output[-3000:]
    assert f"{ro} is not writable (Read-only file system)" in run.output
