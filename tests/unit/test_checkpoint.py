"""Checkpoint layout, COMPLETE marker, torn detection, resume choice, retention and compatibility (no DeepSpeed)."""

from __future__ import annotations

import json
import logging
import random

import numpy as np
import pytest
import torch

from pretrain.checkpoint import (
    META_FILE,
    CheckpointMismatchError,
    apply_retention,
    capture_rng_state,
    check_resume_compatible,
    find_resume_checkpoint,
    list_checkpoints,
    restore_rng_state,
    step_from_tag,
    tag_for_step,
    verify_checkpoint,
    write_complete_marker,
)
from pretrain.rundir import COMPLETE_MARKER, read_latest, write_latest


def make_ckpt(root, step, *, complete=True, top1=None, payload=b"x" * 1000):
    """A checkpoint directory with real files (a model file, a rank file, meta.json) and optionally COMPLETE."""
    d = root / tag_for_step(step)
    d.mkdir(parents=True)
    (d / "mp_rank_00_model_states.pt").write_bytes(payload)
    torch.save({"rank": 0}, d / "rank_00000.pt")
    metrics = {} if top1 is None else {"val_top1": top1}
    (d / META_FILE).write_text(json.dumps({"step": step, "metrics": metrics}))
    if complete:
        write_complete_marker(d)
        write_latest(root, d.name)
    return d


def test_tags_round_trip():
    assert tag_for_step(120) == "step_000120"
    assert step_from_tag("step_000120") == 120
    assert step_from_tag("latest") is None
    assert step_from_tag("step_abc") is None


def test_complete_marker_lists_every_file_with_size(tmp_path):
    d = make_ckpt(tmp_path, 10)
    files = json.loads((d / COMPLETE_MARKER).read_text())["files"]
    assert files["mp_rank_00_model_states.pt"] == 1000
    assert set(files) == {"mp_rank_00_model_states.pt", "rank_00000.pt", META_FILE}
    assert verify_checkpoint(d) == (True, "ok")


def test_missing_marker_is_torn(tmp_path):
    d = make_ckpt(tmp_path, 10, complete=False)
    ok, reason = verify_checkpoint(d)
    assert not ok and "COMPLETE" in reason


def test_truncated_file_is_detected(tmp_path):
    d = make_ckpt(tmp_path, 10)
    with open(d / "mp_rank_00_model_states.pt", "r+b") as f:
        f.truncate(500)
    ok, reason = verify_checkpoint(d)
    assert not ok
    assert "mp_rank_00_model_states.pt" in reason and "500" in reason


def test_missing_file_is_detected(tmp_path):
    d = make_ckpt(tmp_path, 10)
    (d / "rank_00000.pt").unlink()
    ok, reason = verify_checkpoint(d)
    assert not ok and "rank_00000.pt" in reason


def test_garbled_marker_is_not_complete(tmp_path):
    d = make_ckpt(tmp_path, 10)
    (d / COMPLETE_MARKER).write_text("{not json")
    assert not verify_checkpoint(d)[0]


def test_resume_skips_torn_newest(tmp_path, caplog):
    make_ckpt(tmp_path, 10)
    good = make_ckpt(tmp_path, 20)
    make_ckpt(tmp_path, 30, complete=False)
    truncated = make_ckpt(tmp_path, 40)
    (truncated / "rank_00000.pt").write_bytes(b"")
    with caplog.at_level(logging.WARNING):
        assert find_resume_checkpoint(tmp_path) == good
    assert "step_000040" in caplog.text and "step_000030" in caplog.text


def test_resume_without_checkpoints(tmp_path):
    assert find_resume_checkpoint(tmp_path / "nothing") is None
    make_ckpt(tmp_path, 5, complete=False)
    assert find_resume_checkpoint(tmp_path) is None


def test_retention_keeps_last_k_and_best(tmp_path):
    for step, top1 in [(10, 0.5), (20, 0.9), (30, 0.6), (40, 0.7), (50, 0.65)]:
        make_ckpt(tmp_path, step, top1=top1)
    removed = apply_retention(tmp_path, keep_last=2, keep_best=1, best_metric="val_top1", best_mode="max")
    kept = [c.step for c in list_checkpoints(tmp_path)]
    assert kept == [20, 40, 50]
    assert sorted(p.name for p in removed) == ["step_000010", "step_000030"]
    assert read_latest(tmp_path) == "step_000050"


def test_retention_min_mode_and_no_best(tmp_path):
    for step, loss in [(10, 0.1), (20, 0.5), (30, 0.4)]:
        make_ckpt(tmp_path, step, top1=loss)
    apply_retention(tmp_path, keep_last=1, keep_best=1, best_metric="val_top1", best_mode="min")
    assert [c.step for c in list_checkpoints(tmp_path)] == [10, 30]
    apply_retention(tmp_path, keep_last=1, keep_best=0)
    assert [c.step for c in list_checkpoints(tmp_path)] == [30]


def test_retention_removes_old_torn_keeps_newer_torn(tmp_path):
    make_ckpt(tmp_path, 10, complete=False)
    make_ckpt(tmp_path, 20)
    make_ckpt(tmp_path, 30, complete=False)  # may be a save in progress
    apply_retention(tmp_path, keep_last=5)
    assert [(c.step, c.complete) for c in list_checkpoints(tmp_path)] == [(20, True), (30, False)]


def test_retention_repairs_latest(tmp_path):
    make_ckpt(tmp_path, 10)
    make_ckpt(tmp_path, 20)
    write_latest(tmp_path, "step_000999")
    apply_retention(tmp_path, keep_last=2)
    assert read_latest(tmp_path) == "step_000020"


def test_model_shape_change_names_fields():
    meta = {"model_shape_digest": "aaa", "model_config": {"name": "sepvit_lite", "img_size": 32, "num_classes": 10}}
    new = {"name": "sepvit_lite", "img_size": 64, "num_classes": 10, "drop_path_rate": 0.3}
    with pytest.raises(CheckpointMismatchError, match=r"model\.img_size: 32 -> 64") as e:
        check_resume_compatible(meta, new, "bbb", world_size=2)
    assert "num_classes" not in str(e.value) and "drop_path_rate" not in str(e.value)


def test_world_size_change_passes_with_the_same_global_batch_and_names_a_batch_size_otherwise():
    meta = {"model_shape_digest": "aaa", "world_size": 2, "batch_size": 16, "zero_stage": 2, "model_config": {},
            "layer_decay": 1.0}  # fmt: skip
    check_resume_compatible(meta, {}, "aaa", world_size=2, batch_size=16)
    check_resume_compatible(meta, {}, "aaa", world_size=4, batch_size=8)  # 4 x 8 == 2 x 16: resharded on load
    check_resume_compatible(meta, {}, "aaa", world_size=1, batch_size=32)
    with pytest.raises(CheckpointMismatchError, match=r"set data\.batch_size=8, or relaunch with 2 ranks"):
        check_resume_compatible(meta, {}, "aaa", world_size=4, batch_size=16)
    with pytest.raises(CheckpointMismatchError, match="use a number of ranks that divides 32"):
        check_resume_compatible(meta, {}, "aaa", world_size=3, batch_size=16)
    with pytest.raises(CheckpointMismatchError, match="ZeRO-3 checkpoint of 2 ranks on 4"):
        check_resume_compatible({**meta, "zero_stage": 3}, {}, "aaa", world_size=4, batch_size=8)


def test_rng_state_round_trip():
    state = capture_rng_state()
    a = (random.random(), np.random.rand(), torch.rand(3))
    random.random(), np.random.rand(), torch.rand(5)
    restore_rng_state(state)
    b = (random.random(), np.random.rand(), torch.rand(3))
    assert a[0] == b[0] and a[1] == b[1] and torch.equal(a[2], b[2])


def test_layer_decay_change_is_refused_naming_both_values_and_the_fine_tune_route():
    meta = {"model_shape_digest": "aaa", "world_size": 2, "batch_size": 16, "model_config": {}, "layer_decay": 1.0}
    check_resume_compatible(meta, {}, "aaa", world_size=2, layer_decay=1.0)
    with pytest.raises(CheckpointMismatchError, match="records no optim.layer_decay"):
        check_resume_compatible({**meta, "layer_decay": None}, {}, "aaa", world_size=2, layer_decay=1.0)
    with pytest.raises(
        CheckpointMismatchError, match=r"optim\.layer_decay=0\.75: the checkpoint was trained with 1"
    ) as e:
        check_resume_compatible(meta, {}, "aaa", world_size=2, layer_decay=0.75)
    assert "model.init_from" in str(e.value)
    check_resume_compatible({**meta, "layer_decay": 0.75}, {}, "aaa", world_size=2, layer_decay=0.75)
