"""A run interrupted inside a log window (SIGTERM, or SIGKILL after a mid-window checkpoint) logs, once resumed, the
same train series as the uninterrupted run: the event that spans the interruption averages the loss over the whole
window, from loss sums carried in the checkpoint's trainer state.

Real DeepSpeed ranks on CPU and real digits shards; 20 steps of 16 images per rank, logged every 8 steps (events at
steps 8, 16 and 20), so every interruption below falls inside the window of steps 9-16.
"""

from __future__ import annotations

import io
import json
import shutil
import signal
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from conftest import TINY_RUN_STEPS, tiny_run_overrides
from test_train_resume import tb_scalars, wait_for

from pretrain.checkpoint import write_complete_marker
from pretrain.fsutil import read_jsonl
from pretrain.rundir import COMPLETE_MARKER

pytestmark = [pytest.mark.slow, pytest.mark.world_size(2)]

CONFIG = "configs/run/digits_sepvit_lite.yaml"
MAX_STEPS = TINY_RUN_STEPS
LOG_EVERY = 8
LOGGED_STEPS = [8, 16, 20]
MID_WINDOW_CKPT = 12  # 4 steps into the window 9-16; the next checkpoint is the final one
SERIES_KEYS = ("step", "loss", "lr", "grad_norm", "epoch")  # everything but the timing fields
EXIT_PREEMPTED = 3


def overrides(data: Path, out: Path, name: str, *extra: str) -> list[str]:
    return tiny_run_overrides(
        data, out, name, f"trainer.log_every_steps={LOG_EVERY}", f"checkpoint.every_steps={MID_WINDOW_CKPT}", *extra
    )


def train_events(run_dir: Path) -> list[dict]:
    return [e for e in read_jsonl(run_dir / "metrics.jsonl") if e.get("event") == "train"]


def assert_same_series(run_dir: Path, ref_dir: Path, resumed_at: int) -> None:
    """The whole logged train series equals the reference's; only the event spanning ``resumed_at`` says resumed."""
    got = [{k: e[k] for k in SERIES_KEYS} for e in train_events(run_dir)]
    want = [{k: e[k] for k in SERIES_KEYS} for e in train_events(ref_dir)]
    assert [e["step"] for e in want] == LOGGED_STEPS
    assert got == want, [(g, w) for g, w in zip(got, want, strict=False) if g != w]
    spanning = min(s for s in LOGGED_STEPS if s > resumed_at)
    assert {e["step"]: e["resumed_in_window"] for e in train_events(run_dir)} == {
        s: s == spanning for s in LOGGED_STEPS
    }
    assert not any(e["resumed_in_window"] for e in train_events(ref_dir))


@pytest.fixture(scope="module")
def reference_of(digits_dir, scratch_root, start_train) -> Callable[[int], Path]:
    """``reference_of(nproc)``: the run dir of an uninterrupted run on ``nproc`` ranks (run once, when first asked)."""
    runs: dict[int, Path] = {}

    def reference(nproc: int) -> Path:
        if nproc not in runs:
            out = scratch_root / f"log_window_ref{nproc}"
            run = start_train(CONFIG, overrides(digits_dir, out, "ref"), "--nproc", str(nproc))
            assert run.wait() == 0, run.output[-5000:]
            runs[nproc] = out / "ref"
        return runs[nproc]

    return reference


@pytest.mark.parametrize("nproc", [1, 2])
def test_sigterm_inside_a_log_window_then_resume_logs_the_uninterrupted_series(
    nproc, reference_of, digits_dir, run_root, start_train
):
    args = (CONFIG, overrides(digits_dir, run_root, "term", "checkpoint.every_steps=9"), "--nproc", str(nproc))
    run_dir = run_root / "term"
    run = start_train(*args)
    # step 9's checkpoint is written after that step agreed on stop signals, so a SIGTERM sent once it is complete
    # stops the run at step 10 or later: inside the window 9-16 unless the signal took 7 steps to arrive
    wait_for((run_dir / "checkpoints" / "step_000009" / COMPLETE_MARKER).exists, 180, run, "checkpoint step_000009")
    if nproc == 1:  # to the whole process group, data workers included, as `timeout`, Slurm and a terminal do
        run.kill_all(signal.SIGTERM)
    else:  # to the launcher, which forwards it to the ranks
        run.proc.send_signal(signal.SIGTERM)
    assert run.wait() == EXIT_PREEMPTED, run.output[-5000:]
    stopped = json.loads((run_dir / "status.json").read_text())["step"]
    assert 9 < stopped < 16, f"stopped at step {stopped}: not inside the window 9-16 (the signal came late)"
    assert [e["step"] for e in train_events(run_dir)] == [8], "nothing is logged at the stop"

    again = start_train(*args)
    assert again.wait() == 0, again.output[-5000:]
    assert f"resumed from {run_dir / 'checkpoints' / f'step_{stopped:06d}'}" in again.output
    assert_same_series(run_dir, reference_of(nproc), resumed_at=stopped)


def test_sigkill_after_a_mid_window_checkpoint_then_resume_logs_the_uninterrupted_series(
    reference_of, digits_dir, run_root, start_train
):
    args = (CONFIG, overrides(digits_dir, run_root, "killed"), "--nproc", "1")
    run_dir = run_root / "killed"
    ckpt = run_dir / "checkpoints" / f"step_{MID_WINDOW_CKPT:06d}"
    run = start_train(*args)
    wait_for((ckpt / COMPLETE_MARKER).exists, 180, run, ckpt.name)
    run.kill_all(signal.SIGKILL)
    run.wait()
    # the 4 steps of the window 9-16 before the checkpoint are in its trainer state, as plain numbers only
    state = torch.load(ckpt / "mp_rank_00_model_states.pt", map_location="cpu", weights_only=False)["trainer"]
    assert state["log_window"]["steps"] == state["log_window"]["loss_count"] == 4
    buf = io.BytesIO()
    torch.save(state, buf)
    buf.seek(0)
    assert torch.load(buf, weights_only=True) == state

    again = start_train(*args)
    assert again.wait() == 0, again.output[-5000:]
    assert f"resumed from {ckpt}" in again.output
    ref_dir = reference_of(1)
    assert_same_series(run_dir, ref_dir, resumed_at=MID_WINDOW_CKPT)
    # TensorBoard: the reference's losses, and the resumed life's timing of the spanning window, as in metrics.jsonl
    # (an event the killed life logged after the checkpoint is purged)
    assert tb_scalars(run_dir, "train/loss") == tb_scalars(ref_dir, "train/loss")
    tb_img_per_s = tb_scalars(run_dir, "train/img_per_s")
    assert [s for s, _ in tb_img_per_s] == LOGGED_STEPS
    assert [v for _, v in tb_img_per_s] == pytest.approx([e["img_per_s"] for e in train_events(run_dir)], rel=1e-6)


def test_checkpoint_without_the_window_state_is_refused_naming_what_it_lacks(
    reference_of, digits_dir, run_root, start_train
):
    # a signed checkpoint whose trainer state lacks the window state (not one `pretrain train` writes): the run ends
    # failed, naming the key and the way to start from its weights, and the checkpoint stays as it was
    ref_dir = reference_of(1)
    ckpt = run_root / "old" / "checkpoints" / f"step_{MID_WINDOW_CKPT:06d}"
    shutil.copytree(ref_dir / "checkpoints" / ckpt.name, ckpt)
    states = ckpt / "mp_rank_00_model_states.pt"
    sd = torch.load(states, map_location="cpu", weights_only=False)
    del sd["trainer"]["log_window"]
    torch.save(sd, states)
    write_complete_marker(ckpt)
    before = sorted((p.name, p.stat().st_size) for p in ckpt.iterdir())

    run = start_train(CONFIG, overrides(digits_dir, run_root, "old"), "--nproc", "1")
    assert run.wait() == 1, run.output[-5000:]
    assert "the checkpoint's trainer state lacks ['log_window']" in run.output, run.output[-5000:]
    assert "model.init_from=<the checkpoint>" in run.output
    assert sorted((p.name, p.stat().st_size) for p in ckpt.iterdir()) == before
    assert json.loads((run_root / "old" / "status.json").read_text())["state"] == "failed"
