"""Checkpoints verified by sha256 and by signature, bad ones set aside, and nothing loaded that runs code.

Real files: checkpoints written with torch.save, real crafted pickles whose loading would create a marker file (each
test shows the exploit is real by loading it without protection, in another process or after the check), markers
forged with every digest recomputed and signed with another user's key (what an attacker who can write the directory
can do), real CLI commands. The 2-rank DeepSpeed runs are in tests/integration/test_run_dir_trust.py.
"""

from __future__ import annotations

import json
import os
import pickle
import random
import stat
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from launch.cli import main as cli_main
from pretrain import trust
from pretrain.checkpoint import (
    UntrustedCheckpoint,
    apply_retention,
    capture_rng_state,
    check_signature,
    find_resume_checkpoint,
    load_plain,
    plain_loads,
    reject_checkpoint,
    restore_rng_state,
    tag_for_step,
    verify_checkpoint,
    write_complete_marker,
)
from pretrain.config import ModelConfig
from pretrain.rundir import COMPLETE_MARKER, read_latest, write_latest

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(autouse=True)
def own_key(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """This test's user key (subprocesses inherit it through the environment)."""
    key = tmp_path / "home" / ".config" / "vitpretrain" / "key"
    monkeypatch.setenv(trust.KEY_ENV, str(key))
    return key


def as_other_user(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, fn, *args):
    """Run ``fn`` with another user's key: what an attacker, or a colleague, signs with."""
    own = os.environ[trust.KEY_ENV]
    monkeypatch.setenv(trust.KEY_ENV, str(tmp_path / "other" / "key"))
    try:
        return fn(*args)
    finally:
        monkeypatch.setenv(trust.KEY_ENV, own)


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


def snapshot(root: Path) -> dict[str, tuple[int, int]]:
    """Every path under ``root``, files with their size and mtime: to show that nothing changed (a folder's own mtime
    is left out: a probe for writability may create and remove a file in it)."""
    return {str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns) if p.is_file() else None
            for p in root.rglob("*")}  # fmt: skip


# -------------------------------------------------------------------------------------------------------- digests


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


# ----------------------------------------------------------------------------------------------- plain loading


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


def test_deepspeed_loads_are_forced_plain_even_when_they_ask_for_pickles(tmp_path: Path) -> None:
    """DeepSpeed calls ``torch.load(..., weights_only=False)`` on its model and optimizer files; inside plain_loads
    that load still refuses code, while DeepSpeed's own records (loss scaler, stage enum) load."""
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum

    marker = tmp_path / "MARKER"
    crafted = tmp_path / "mp_rank_00_model_states.pt"
    torch.save({"module": _RunsCode(marker), "global_steps": 3}, crafted)
    plain = tmp_path / "zero_pp_rank_0_mp_rank_00_optim_states.pt"
    torch.save(
        {
            "optimizer_state_dict": {
                "loss_scaler": DynamicLossScaler(2.0**16, 1000, 1.0, 2, True),
                "zero_stage": ZeroStageEnum(2),
            }
        },
        plain,
    )
    with plain_loads():
        with pytest.raises(pickle.UnpicklingError):
            torch.load(crafted, map_location="cpu", weights_only=False)
        state = torch.load(plain, map_location="cpu", weights_only=False)["optimizer_state_dict"]
    assert not marker.exists()
    assert isinstance(state["loss_scaler"], DynamicLossScaler) and state["zero_stage"] == ZeroStageEnum(2)
    assert "TORCH_FORCE_WEIGHTS_ONLY_LOAD" not in os.environ  # only inside
    torch.load(crafted, map_location="cpu", weights_only=False)  # the exploit is real
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


# ------------------------------------------------------------------------------------------------- signatures


def test_the_key_is_private_made_on_first_use_and_refused_when_others_can_read_it(own_key: Path, monkeypatch) -> None:
    assert not own_key.exists()
    first = trust.load_key()
    assert own_key.read_bytes() == first and len(first) == 32
    assert stat.S_IMODE(own_key.stat().st_mode) == 0o600 and stat.S_IMODE(own_key.parent.stat().st_mode) == 0o700
    assert trust.load_key() == first
    shared = own_key.with_name("shared")
    shared.write_bytes(os.urandom(32))
    shared.chmod(0o644)
    monkeypatch.setenv(trust.KEY_ENV, str(shared))
    with pytest.raises(trust.TrustKeyError, match=f"chmod 600 {shared}"):
        trust.load_key()


def test_a_marker_forged_with_every_digest_recomputed_is_not_signed(tmp_path: Path, monkeypatch) -> None:
    tag_dir = fake_checkpoint(tmp_path / "run" / "checkpoints", 10)
    assert check_signature(tag_dir) == (True, "signed by you")
    elsewhere = tmp_path / "copied" / "step_000010"
    elsewhere.parent.mkdir()
    os.rename(tag_dir, elsewhere)  # a signed checkpoint stays trusted wherever it is moved: the key decides, not where
    assert check_signature(elsewhere) == (True, "signed by you")

    as_other_user(tmp_path, monkeypatch, write_complete_marker, elsewhere)  # the attacker's own key
    ok, why = check_signature(elsewhere)
    assert not ok and why.startswith("it was signed with another key")
    assert verify_checkpoint(elsewhere) == (True, "ok")  # every digest matches: that is not what protects

    record = json.loads((elsewhere / COMPLETE_MARKER).read_text())
    del record["hmac_sha256"]
    (elsewhere / COMPLETE_MARKER).write_text(json.dumps(record))
    assert check_signature(elsewhere) == (False, "it carries no signature")

    write_complete_marker(elsewhere)
    record = json.loads((elsewhere / COMPLETE_MARKER).read_text())
    record["sha256"]["meta.json"] = "0" * 64  # any edit of a signed marker
    (elsewhere / COMPLETE_MARKER).write_text(json.dumps(record))
    assert check_signature(elsewhere) == (False, "its signature does not match: it was changed after it was signed")


def test_an_unsigned_newest_checkpoint_is_refused_not_skipped_and_retention_leaves_it(
    tmp_path: Path, monkeypatch
) -> None:
    root = tmp_path / "checkpoints"
    old = fake_checkpoint(root, 10)
    planted = as_other_user(tmp_path, monkeypatch, fake_checkpoint, root, 20)
    with pytest.raises(UntrustedCheckpoint, match="--trust-checkpoint"):
        find_resume_checkpoint(root)  # never silently back to an older one: someone planted a newer one
    assert find_resume_checkpoint(root, trusted=True) == planted
    fake_checkpoint(root, 30)
    fake_checkpoint(root, 40)
    assert apply_retention(root, keep_last=1) == [old, root / "step_000030"]
    assert planted.is_dir()  # not ours: neither kept in place of ours nor deleted


def test_checkpoint_verify_command(tmp_path: Path, capsys, monkeypatch) -> None:
    run = tmp_path / "run"
    fake_checkpoint(run / "checkpoints", 10)
    bad = fake_checkpoint(run / "checkpoints", 20)
    assert cli_main(["checkpoint", "verify", str(run)]) == 0
    assert "signed by you" in capsys.readouterr().out
    assert cli_main(["checkpoint", "verify", str(bad)]) == 0
    flip_bytes(bad / "mp_rank_00_model_states.pt", 1000)
    capsys.readouterr()
    assert cli_main(["checkpoint", "verify", str(run)]) == 1
    out, err = capsys.readouterr()
    assert "step_000010" in out and "1 bad checkpoint(s): step_000020 (file mp_rank_00_model_states.pt does not" in err
    (bad / COMPLETE_MARKER).unlink()
    assert cli_main(["checkpoint", "verify", str(bad)]) == 1
    assert "no COMPLETE marker" in capsys.readouterr().out
    as_other_user(tmp_path, monkeypatch, write_complete_marker, bad)
    assert cli_main(["checkpoint", "verify", str(bad)]) == 1
    out, err = capsys.readouterr()
    assert "NOT SIGNED by your key" in out and "only with --trust-checkpoint" in err
    assert cli_main(["checkpoint", "verify", str(tmp_path / "nothing")]) == 2


# ------------------------------------------------------------------------------- commands that load checkpoints


def stage0_run(root: Path) -> Path:
    """A run directory with one stage-0 sepvit_lite checkpoint, laid out as the trainer writes it (signed by whoever
    runs this)."""
    from pretrain.models import create_model

    cfg = ModelConfig(
        name="sepvit_lite", num_classes=10, img_size=32, kwargs={"window_sizes": [[4], [2, 4], [2] * 6, [1, 1]]}
    )
    model = create_model(cfg.name, num_classes=10, img_size=32, **cfg.kwargs)
    tag = root / "checkpoints" / "step_000003"
    tag.mkdir(parents=True)
    torch.save({"module": model.state_dict(), "global_steps": 3}, tag / "mp_rank_00_model_states.pt")
    meta = {"step": 3, "zero_stage": 0, "world_size": 1, "model_config": vars(cfg)}
    (tag / "meta.json").write_text(json.dumps(meta))
    (root / "config.yaml").write_text(yaml.safe_dump({"model": vars(cfg)}))
    write_complete_marker(tag)
    return tag


def test_export_of_another_users_checkpoint_needs_trust_checkpoint(tmp_path: Path, capsys, monkeypatch) -> None:
    run = tmp_path / "colleague"
    tag = as_other_user(tmp_path, monkeypatch, stage0_run, run)
    out = tmp_path / "w.safetensors"
    before = snapshot(run)
    assert cli_main(["export", str(run), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert f"checkpoint {tag} is not signed by your key (it was signed with another key" in err
    assert "--trust-checkpoint" in err and not out.exists() and snapshot(run) == before
    assert cli_main(["export", str(tag), "--out", str(out), "--trust-checkpoint"]) == 0
    assert out.is_file()  # a safetensors export is plain data: it needs nothing to be loaded

    marker = tmp_path / "MARKER"
    torch.save({"module": _RunsCode(marker)}, tag / "mp_rank_00_model_states.pt")
    as_other_user(tmp_path, monkeypatch, write_complete_marker, tag)  # digests recomputed, signed with their key
    assert cli_main(["export", str(tag), "--out", str(tmp_path / "x.safetensors")]) == 2
    assert cli_main(["export", str(tag), "--out", str(tmp_path / "x.safetensors"), "--trust-checkpoint"]) == 1
    assert "could not read the model" in capsys.readouterr().err  # trusted, yet loaded as plain data
    assert not marker.exists()


def test_eval_and_init_from_of_an_unsigned_checkpoint_exit_2_naming_the_flag(
    tmp_path: Path, digits_dir: Path, monkeypatch
) -> None:
    run = tmp_path / "colleague"
    tag = as_other_user(tmp_path, monkeypatch, stage0_run, run)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "launch.cli"]
    done = subprocess.run([*cmd, "eval", str(tag), "--data", str(digits_dir)], capture_output=True, text=True, env=env)
    assert done.returncode == 2 and "is not signed by your key" in done.stderr and "--trust-checkpoint" in done.stderr
    assert "Traceback" not in done.stderr and not (run / "eval").exists()
    out = tmp_path / "eval.json"
    argv = [*cmd, "eval", str(tag), "--data", str(digits_dir), "--trust-checkpoint", "--out", str(out)]
    done = subprocess.run(argv, capture_output=True, text=True, env=env)
    assert done.returncode == 0, done.stderr[-2000:]
    assert json.loads(out.read_text())["samples"] == 300  # every val image of digits scored

    train = [*cmd, "train", "configs/run/digits_sepvit_lite.yaml", f"data.path={digits_dir}"]
    train += [f"run.output_dir={tmp_path / 'runs'}", "run.name=finetune", f"model.init_from={run}"]
    done = subprocess.run(train, capture_output=True, text=True, env=env, cwd=REPO)
    assert done.returncode == 2, done.stderr[-2000:]
    assert "model.init_from=" in done.stderr and "--trust-checkpoint" in done.stderr
    assert not (tmp_path / "runs" / "finetune").exists()  # refused before anything was written


def test_auto_resume_from_a_planted_checkpoint_exits_2_and_changes_nothing(
    tmp_path: Path, digits_dir: Path, monkeypatch
) -> None:
    """A crafted DeepSpeed file in the run's own checkpoints/, COMPLETE recomputed, signed with the attacker's key."""
    run = tmp_path / "runs" / "victim"
    tag = fake_checkpoint(run / "checkpoints", 4)
    marker = tmp_path / "MARKER"
    torch.save({"module": _RunsCode(marker)}, tag / "mp_rank_00_model_states.pt")
    as_other_user(tmp_path, monkeypatch, write_complete_marker, tag)
    before = snapshot(run)
    argv = [
        sys.executable,
        "-m",
        "launch.cli",
        "train",
        "configs/run/digits_sepvit_lite.yaml",
        f"data.path={digits_dir}",
    ]
    argv += [f"run.output_dir={tmp_path / 'runs'}", "run.name=victim"]
    done = subprocess.run(argv, capture_output=True, text=True, cwd=REPO, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 2, done.stderr[-2000:]
    assert f"checkpoint {tag} is not signed by your key" in done.stderr and "--trust-checkpoint" in done.stderr
    assert "Traceback" not in done.stderr
    assert snapshot(run) == before and not marker.exists()


# ---------------------------------------------------------------------------------------------------- submitit


def test_a_crafted_job_pickle_is_not_run_by_the_task(tmp_path: Path) -> None:
    """What a task on the node starts (``build_executor``'s python), on a job folder whose pickle was replaced."""
    from submitit.core.utils import DelayedSubmission

    from launch.cluster_params import load_cluster_params
    from launch.submit import TrainJob, build_executor
    from launch.submitit_entry import load_submission

    executor = build_executor(load_cluster_params(None, cluster="local"), tmp_path / "slurm", "job")
    assert executor._executor._submitit_command_str.split()[1:4] == ["-u", "-m", "launch.submitit_entry"]

    job = DelayedSubmission(TrainJob("/runs/a/slurm/config.yaml", "/runs/a", 120, True))
    job.set_timeout(60, 3)
    job.dump(tmp_path / "ok.pkl")
    loaded = load_submission(tmp_path / "ok.pkl")
    assert vars(loaded.function) == vars(job.function) and loaded._timeout_countdown == 3

    marker = tmp_path / "MARKER"
    folder = tmp_path / "slurm"
    folder.mkdir(exist_ok=True)
    (folder / "4242_submitted.pkl").write_bytes(pickle.dumps(DelayedSubmission(_RunsCode(marker))))
    env = {**os.environ, "SUBMITIT_EXECUTOR": "local", "SUBMITIT_LOCAL_JOB_ID": "4242", "SUBMITIT_LOCAL_NTASKS": "1"}
    argv = [sys.executable, "-u", "-m", "launch.submitit_entry", "-u", "-m", "submitit.core._submit", str(folder)]
    done = subprocess.run(argv, capture_output=True, text=True, env=env, cwd=REPO, timeout=120)
    assert done.returncode != 0 and not marker.exists()
    assert "is not a job `pretrain submit` wrote (posix.system is not part of a training job)" in done.stderr
    with pytest.raises(pickle.UnpicklingError, match="fields are not those of a training job"):
        (tmp_path / "odd.pkl").write_bytes(pickle.dumps(DelayedSubmission(TrainJob(["x"], "/r", 1))))
        load_submission(tmp_path / "odd.pkl")
    code = f"import pickle; pickle.load(open({str(folder / '4242_submitted.pkl')!r}, 'rb'))"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=REPO)
    assert marker.exists()  # the pickle is a real exploit
