"""The run directory promise against hostile and unlucky inputs, with real 2-rank DeepSpeed runs on CPU:

- crafted pickles (``rank_00000.pt``, ``mp_rank_00_model_states.pt``) with COMPLETE recomputed and signed with
  another user's key run no code: passed with ``--resume`` or planted in the run's own newest checkpoint they are
  refused (exit 2, ``--trust-checkpoint`` named, nothing changed); with ``--trust-checkpoint`` every file, DeepSpeed's
  included, loads as plain data, fails, and the checkpoint is set aside; a checkpoint signed by the user resumes
  wherever it lies;
- a job submitted with ``pretrain submit --cluster local`` starts through launch.submitit_entry and trains; on the
  local Slurm, a job pickle replaced while the job waits in the queue runs nothing (the task refuses it);
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
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import REPO, tiny_run_overrides, train_env
from scratch_disks import tmpfs_mounts

from pretrain import trust
from pretrain.checkpoint import checkpoint_dir_bytes, verify_checkpoint, write_complete_marker
from pretrain.fsutil import read_jsonl

pytestmark = [pytest.mark.slow, pytest.mark.world_size(2)]

CONFIG = "configs/run/digits_sepvit_lite.yaml"


class _RunsCode:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def craft(path: Path, marker: Path) -> None:
    """Replace ``path`` by a torch file whose unrestricted loading (DeepSpeed's ``torch.load``) creates ``marker``."""
    torch.save({"module": _RunsCode(marker)}, path)


def forge_marker(tag_dir: Path, attacker_key: Path) -> None:
    """COMPLETE with every sha256 recomputed, signed with a key the attacker has (their own)."""
    own = os.environ.get(trust.KEY_ENV)
    os.environ[trust.KEY_ENV] = str(attacker_key)
    try:
        write_complete_marker(tag_dir)
    finally:
        del os.environ[trust.KEY_ENV]
        if own is not None:
            os.environ[trust.KEY_ENV] = own


def snapshot(root: Path) -> dict[str, tuple[int, int]]:
    """Every path under ``root``, files with their size and mtime: to show that nothing changed (a folder's own mtime
    is left out: a probe for writability may create and remove a file in it)."""
    return {str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns) if p.is_file() else None
            for p in root.rglob("*")}  # fmt: skip


def train_series(run_dir: Path) -> list[tuple[int, float]]:
    return [(e["step"], e["loss"]) for e in read_jsonl(run_dir / "metrics.jsonl") if e.get("event") == "train"]


def flip(path: Path, offset: int, n: int = 64) -> None:
    data = bytearray(path.read_bytes())
    data[offset : offset + n] = bytes(b ^ 0x5A for b in data[offset : offset + n])
    path.write_bytes(bytes(data))


@pytest.fixture(scope="module")
def finished(tiny_reference: Path) -> Path:
    """An uninterrupted 20-step 2-rank run (checkpoints every 4 steps, the last 3 kept): the session's, copied by
    every test that changes it."""
    return tiny_reference


def test_crafted_checkpoint_passed_with_resume_is_refused_and_a_signed_one_resumes_anywhere(
    finished: Path, digits_dir: Path, run_root: Path, start_train
) -> None:
    marker = run_root / "MARKER"
    evil = run_root / "downloaded" / "step_000016"
    shutil.copytree(finished / "checkpoints" / "step_000016", evil)
    craft(evil / "rank_00000.pt", marker)
    craft(evil / "mp_rank_00_model_states.pt", marker)
    forge_marker(evil, run_root / "attacker_key")  # digests and marker recomputed: they must not be what protects
    run = start_train(CONFIG, tiny_run_overrides(digits_dir, run_root, "victim"), "--nproc", "2", "--resume", str(evil))
    assert run.wait() == 2, run.output[-3000:]
    assert f"checkpoint {evil} is not signed by your key (it was signed with another key" in run.output
    assert "--trust-checkpoint" in run.output and "Traceback" not in run.output
    assert not marker.exists()
    assert not (run_root / "victim").exists()  # refused before anything was written

    # the user's own checkpoint, copied out of its run: trusted by its signature, not by where it lies
    mine = run_root / "copied" / "step_000016"
    shutil.copytree(finished / "checkpoints" / "step_000016", mine)
    run = start_train(CONFIG, tiny_run_overrides(digits_dir, run_root, "mine"), "--nproc", "2", "--resume", str(mine))
    assert run.wait() == 0, run.output[-4000:]
    assert train_series(run_root / "mine") == [(s, loss) for s, loss in train_series(finished) if s > 16]


def test_crafted_deepspeed_file_planted_in_the_run_dir_runs_nothing(
    finished: Path, digits_dir: Path, run_root: Path, start_train
) -> None:
    run_dir = run_root / "crafted"
    shutil.copytree(finished, run_dir)
    shutil.rmtree(run_dir / "checkpoints" / "step_000020")  # resume from 16, where the attack is
    (run_dir / "checkpoints" / "latest").write_text("step_000016\n")
    marker = run_root / "MARKER"
    craft(run_dir / "checkpoints" / "step_000016" / "mp_rank_00_model_states.pt", marker)
    craft(run_dir / "checkpoints" / "step_000016" / "rank_00000.pt", marker)
    forge_marker(run_dir / "checkpoints" / "step_000016", run_root / "attacker_key")
    before = snapshot(run_dir)
    run = start_train(CONFIG, tiny_run_overrides(digits_dir, run_root, "crafted"), "--nproc", "2")
    assert run.wait() == 2, run.output[-4000:]
    assert "step_000016 is not signed by your key" in run.output and "--trust-checkpoint" in run.output
    assert snapshot(run_dir) == before and not marker.exists()  # nothing changed, nothing ran

    # trusted by the user, the checkpoint still loads as plain data only: DeepSpeed's file fails, is set aside
    run = start_train(CONFIG, tiny_run_overrides(digits_dir, run_root, "crafted"), "--nproc", "2", "--trust-checkpoint")
    assert run.wait() == 0, run.output[-4000:]
    assert not marker.exists()
    rejected = run_dir / "checkpoints" / "rejected" / "step_000016"
    assert "failed to load" in (rejected / "REJECTED.txt").read_text()
    assert "resumed from" in run.output and "step_000012" in run.output
    assert train_series(run_dir) == train_series(finished)  # resumed from 12: the same run


def test_a_job_submitted_to_the_local_executor_starts_through_the_plain_loader(
    finished: Path, digits_dir: Path, run_root: Path
) -> None:
    argv = [sys.executable, "-m", "launch.cli", "submit", CONFIG, *tiny_run_overrides(digits_dir, run_root, "sub")]
    argv += ["--cluster", "local", "--tasks-per-node", "2", "--wait"]
    done = subprocess.run(argv, capture_output=True, text=True, cwd=REPO, env=train_env(), timeout=600)
    assert done.returncode == 0, (done.stdout + done.stderr)[-4000:]
    assert "pretrain submit: run finished" in done.stdout
    assert train_series(run_root / "sub") == train_series(finished)


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


@pytest.mark.slurm
def test_a_job_pickle_replaced_in_the_queue_runs_nothing_on_slurm(run_root: Path) -> None:
    from submitit.core.utils import DelayedSubmission

    from launch.cluster_params import load_cluster_params
    from launch.submit import TrainJob, build_executor

    run_dir, marker = run_root / "queued", run_root / "MARKER"
    params = load_cluster_params("local", slurm_additional_parameters={"hold": True})  # it waits until released
    executor = build_executor(params, run_dir / "slurm", "queued")
    job = executor.submit(TrainJob(str(run_dir / "slurm" / "config.yaml"), str(run_dir), 30))
    try:
        pickled = run_dir / "slurm" / f"{job.job_id}_submitted.pkl"
        pickled.write_bytes(pickle.dumps(DelayedSubmission(_RunsCode(marker))))  # someone who can write the run dir
        subprocess.run(["scontrol", "release", str(job.job_id)], check=True, capture_output=True, timeout=30)
        deadline = time.monotonic() + 120
        while not list((run_dir / "slurm").glob(f"{job.job_id}_0_result.pkl")) and time.monotonic() < deadline:
            time.sleep(0.5)
        logs = "".join(p.read_text(errors="replace") for p in (run_dir / "slurm").glob(f"{job.job_id}_*_log.err"))
        assert "is not a job `pretrain submit` wrote (posix.system is not part of a training job)" in logs, logs[-3000:]
        assert not marker.exists()
    finally:
        subprocess.run(["scancel", str(job.job_id)], capture_output=True, timeout=30)


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
    yield from tmpfs_mounts(run_root)


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
