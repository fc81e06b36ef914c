"""Checkpoint verification by sha256, setting bad checkpoints aside, and loading our own files without running code.

Real files: checkpoints written with torch.save, a real crafted pickle whose loading would run a shell command."""

from __future__ import annotations

import os
import pickle
import random
from pathlib import Path

import numpy as np
import pytest
import torch

from launch.cli import main as cli_main
from pretrain.checkpoint import (
    COMPLETE_MARKER,
    capture_rng_state,
    find_resume_checkpoint,
    is_trusted_checkpoint,
    load_plain,
    read_latest,
    reject_checkpoint,
    restore_rng_state,
    tag_for_step,
    verify_checkpoint,
    write_complete_marker,
    write_latest,
)


def fake_checkpoint(root: Path, step: int) -> Path:
    tag_dir = root / tag_for_step(step)
    tag_dir.mkdir(parents=True)
    torch.save({"module": {"w": torch.full((256, 64), float(step))}}, tag_dir / "mp_rank_00_model_states.pt")
    torch.save(
        {"rank": 0, "rng": capture_rng_state(), "data": {"epoch": 1, "batches_done": step}}, tag_dir / "rank_00000.pt"
    )
    (tag_dir / "meta.json").write_text(f'{{"step": {step}}}')
    write_complete_marker(tag_dir)
    write_latest(root, tag_dir.name)
    return tag_dir


def flip_bytes(path: Path, offset: int, n: int = 64) -> None:
    data = bytearray(path.read_bytes())
    data[offset : offset + n] = bytes(b ^ 0xFF for b in data[offset : offset + n])
    path.write_bytes(bytes(data))


class _RunsCode:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_flipped_bytes_of_the_same_size_fail_the_digest_not_the_size_check(tmp_path: Path) -> None:
    tag_dir = fake_checkpoint(tmp_path, 10)
    assert verify_checkpoint(tag_dir) == (True, "ok")
    flip_bytes(tag_dir / "mp_rank_00_model_states.pt", 2000)
    assert verify_checkpoint(tag_dir, digests=False) == (True, "ok")  # what retention checks at every save
    ok, reason = verify_checkpoint(tag_dir)
    assert (
        not ok
        and reason == "file mp_rank_00_model_states.pt does not match its sha256 in COMPLETE (corrupted or modified)"
    )


def test_resume_search_skips_a_corrupt_newer_checkpoint(tmp_path: Path) -> None:
    old, new = fake_checkpoint(tmp_path, 10), fake_checkpoint(tmp_path, 20)
    assert find_resume_checkpoint(tmp_path) == new
    flip_bytes(new / "rank_00000.pt", 100, 16)
    assert find_resume_checkpoint(tmp_path) == old
    assert new.is_dir()  # the search alone renames nothing


def test_a_rejected_checkpoint_is_set_aside_with_its_reason_never_deleted(tmp_path: Path) -> None:
    fake_checkpoint(tmp_path, 10)
    new = fake_checkpoint(tmp_path, 20)
    files = sorted(p.name for p in new.iterdir())
    dest = reject_checkpoint(new, "file x does not match its sha256")
    assert dest == tmp_path / "rejected" / "step_000020" and not new.exists()
    assert sorted(p.name for p in dest.iterdir()) == sorted([*files, "REJECTED.txt"])
    assert "does not match its sha256" in (dest / "REJECTED.txt").read_text()
    assert read_latest(tmp_path) is None  # latest no longer names a checkpoint that is gone
    assert find_resume_checkpoint(tmp_path) == tmp_path / "step_000010"
    again = fake_checkpoint(tmp_path, 20)
    assert reject_checkpoint(again, "again") == tmp_path / "rejected" / "step_000020.2"


def test_our_files_load_as_plain_data_and_a_crafted_one_runs_nothing(tmp_path: Path) -> None:
    marker = tmp_path / "MARKER"
    crafted = tmp_path / "rank_00000.pt"
    with open(crafted, "wb") as f:
        pickle.dump({"rng": _RunsCode(marker)}, f)
    with pytest.raises(pickle.UnpicklingError):
        load_plain(crafted)
    assert not marker.exists()
    with open(crafted, "rb") as f:  # the file is a real exploit: an unrestricted load runs it
        pickle.load(f)
    assert marker.exists()


def test_rng_states_round_trip_through_a_weights_only_load(tmp_path: Path) -> None:
    random.seed(3), np.random.seed(4), torch.manual_seed(5)
    torch.save({"rng": capture_rng_state()}, tmp_path / "r.pt")
    expected = (random.random(), np.random.rand(), torch.rand(1).item())
    random.seed(0), np.random.seed(0), torch.manual_seed(0)
    restore_rng_state(load_plain(tmp_path / "r.pt")["rng"])
    assert (random.random(), np.random.rand(), torch.rand(1).item()) == expected
    # a rank file of an earlier version (numpy's state as an array) still loads without unrestricted unpickling
    torch.save({"rng": {"numpy": np.random.get_state()}}, tmp_path / "legacy.pt")
    assert load_plain(tmp_path / "legacy.pt")["rng"]["numpy"][0] == "MT19937"


def test_trusted_means_under_the_run_directory(tmp_path: Path) -> None:
    run = tmp_path / "runs" / "a"
    (run / "checkpoints" / "step_000010").mkdir(parents=True)
    (tmp_path / "elsewhere").mkdir()
    (run / "link").symlink_to(tmp_path / "elsewhere")
    assert is_trusted_checkpoint(run / "checkpoints" / "step_000010", run)
    assert not is_trusted_checkpoint(tmp_path / "elsewhere", run)
    assert not is_trusted_checkpoint(run / "link", run)  # a symlink out of the run dir is outside it
    assert not is_trusted_checkpoint(tmp_path / "runs" / "ab", run)


def test_checkpoint_verify_command(tmp_path: Path, capsys) -> None:
    run = tmp_path / "run"
    fake_checkpoint(run / "checkpoints", 10)
    bad = fake_checkpoint(run / "checkpoints", 20)
    assert cli_main(["checkpoint", "verify", str(run)]) == 0
    assert cli_main(["checkpoint", "verify", str(bad)]) == 0
    flip_bytes(bad / "mp_rank_00_model_states.pt", 1000)
    capsys.readouterr()
    assert cli_main(["checkpoint", "verify", str(run)]) == 1
    out, err = capsys.readouterr()
    assert "step_000010" in out and "1 bad checkpoint(s): step_000020 (file mp_rank_00_model_states.pt does not" in err
    (bad / COMPLETE_MARKER).unlink()
    assert cli_main(["checkpoint", "verify", str(bad)]) == 1
    assert "no COMPLETE marker" in capsys.readouterr().out
    assert cli_main(["checkpoint", "verify", str(tmp_path / "nothing")]) == 2
