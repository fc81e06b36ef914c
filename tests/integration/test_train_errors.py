"""Failures of `pretrain train`: config errors (exit 2, nothing written), shape change on resume, the NaN guard."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from conftest import train_env

from launch.cli import main
from pretrain.checkpoint import list_checkpoints, verify_checkpoint
from pretrain.fsutil import read_jsonl

CONFIG = "configs/run/digits_sepvit_lite.yaml"


def base(data: Path, out: Path, name: str = "err") -> list[str]:
    return [f"data.path={data}", f"run.output_dir={out}", f"run.name={name}"]


@pytest.mark.parametrize(
    ("extra", "flags", "message"),
    [
        (["trainer.max_step=5"], [], "did you mean trainer.max_steps"),
        (["optim.lr=fast"], [], "optim.lr expects a number"),
        (["trainer.global_batch_size=100"], ["--nproc", "2"], "trainer.global_batch_size=100"),
        (["model.name=sepvit_huge"], [], "unknown model 'sepvit_huge'"),
        (["deepspeed.zero_stage=5"], [], "deepspeed.zero_stage=5"),
        (["trainer.ema_decay=0.99", "deepspeed.zero_stage=3"], [], "zero_stage <= 2"),
        ([], ["--nproc", "0"], "--nproc=0"),
        ([], ["--resume", "/nonexistent/step_000001"], "not a usable checkpoint"),
    ],
)
def test_config_errors_exit_2_and_write_nothing(extra, flags, message, digits_dir, run_root, capsys):
    code = main(["train", CONFIG, *base(digits_dir, run_root), *extra, *flags])
    assert code == 2
    assert message in capsys.readouterr().err
    assert list(run_root.iterdir()) == [], "nothing may be written on a config error"


def test_missing_data_exits_2_with_advice(run_root, capsys):
    code = main(["train", CONFIG, *base(run_root / "no_data", run_root / "runs")])
    assert code == 2
    err = capsys.readouterr().err
    assert "no such folder" in err and "pretrain data build SOURCE --out" in err
    assert not (run_root / "runs").exists()


def test_a_folder_without_a_manifest_points_to_data_index(run_root, capsys):
    (run_root / "shards").mkdir(parents=True)
    code = main(["train", CONFIG, *base(run_root / "shards", run_root / "runs")])
    assert code == 2
    assert f"pretrain data index {run_root / 'shards'}" in capsys.readouterr().err
    assert not (run_root / "runs").exists()


@pytest.mark.slow
@pytest.mark.world_size(2)
@pytest.mark.parametrize(
    "engine",
    [
        ["deepspeed.zero_stage=2"],  # DeepSpeed's ZeRO optimizer skips on the poisoned gradient norm
        ["deepspeed.zero_stage=0", "trainer.grad_accum_steps=2", "data.batch_size=8"],  # the trainer's own check
        ["deepspeed.zero_stage=1", "trainer.precision=bf16", "model.drop_path_rate=0"],  # bf16's overflow check
    ],
    ids=["zero2", "zero0-accum2", "zero1-bf16"],
)
def test_nan_guard_skips_steps_and_stops_after_the_limit(engine, digits_dir, run_root, start_train):
    """Rank 0's loss is NaN at steps 2, 4, 5, 6 (injected by tests/faults/sitecustomize.py): both ranks skip those
    steps (no update), with or without ZeRO and gradient accumulation, in fp32 and bf16; the third in a row stops the
    run with status failed and a checkpoint whose weights equal step 3's."""
    overrides = [
        *base(digits_dir, run_root, "nan"),
        "trainer.max_steps=10",
        "trainer.max_nonfinite_steps=3",
        "trainer.log_every_steps=1",
        "trainer.eval_every_steps=0",
        "trainer.progress_bar=false",
        "data.batch_size=16",
        "data.val_batch_size=64",
        "schedule.warmup_steps=2",
        "checkpoint.every_steps=3",
        "checkpoint.every_minutes=0",
        "checkpoint.keep_last=5",
        *engine,
    ]
    faults = str(Path(__file__).resolve().parent.parent / "faults")
    env = train_env(PRETRAIN_FAULT_NONFINITE_STEPS="2,4,5,6", PYTHONPATH=faults)
    run = start_train(CONFIG, overrides, "--nproc", "2", env=env)
    assert run.wait() == 1, run.output[-5000:]
    assert "3 non-finite losses in a row" in run.output
    run_dir = run_root / "nan"
    status = json.loads((run_dir / "status.json").read_text())
    assert status["state"] == "failed" and status["step"] == 6 and status["nonfinite_steps"] == 4
    assert "non-finite" in status["message"]
    train = {e["step"]: e for e in read_jsonl(run_dir / "metrics.jsonl") if e["event"] == "train"}
    assert sorted(train) == [1, 2, 3, 4, 5, 6]
    assert [s for s, e in train.items() if e["skipped"]] == [2, 4, 5, 6]
    assert isinstance(train[3]["loss"], float) and train[2]["loss"] == "nan"  # JSON has no NaN: logged as text
    ckpts = {c.step: c for c in list_checkpoints(run_dir / "checkpoints")}
    assert sorted(ckpts) == [3, 6] and verify_checkpoint(ckpts[6].path)[0]

    def weights(step):
        f = ckpts[step].path / "mp_rank_00_model_states.pt"
        return torch.load(f, map_location="cpu", weights_only=False)["module"]

    w3, w6 = weights(3), weights(6)
    assert all(torch.equal(w3[k], w6[k]) for k in w3), "skipped steps must not update the weights"


def test_model_shape_change_on_resume_is_refused(digits_dir, run_root, capsys):
    """A checkpoint of a 32x32 model cannot be resumed as a 64x64 one (checked before anything starts)."""
    # a checkpoint's meta.json + COMPLETE marker is all the pre-launch check reads
    tag = run_root / "runs" / "shape" / "checkpoints" / "step_000004"
    tag.mkdir(parents=True)
    from pretrain.checkpoint import write_complete_marker
    from pretrain.config import load_config, model_shape_digest
    from pretrain.rank import resolve_num_classes

    cfg = resolve_num_classes(load_config(CONFIG, base(digits_dir, run_root / "runs", "shape")))
    import dataclasses

    meta = {
        "step": 4,
        "world_size": 1,
        "model_shape_digest": model_shape_digest(cfg),
        "model_config": dataclasses.asdict(cfg.model),
        "layer_decay": 1.0,
    }
    (tag / "meta.json").write_text(json.dumps(meta))
    write_complete_marker(tag)
    code = main(["train", CONFIG, *base(digits_dir, run_root / "runs", "shape"), "model.img_size=64"])
    err = capsys.readouterr().err
    assert code == 2
    assert "model.img_size: 32 -> 64" in err and "step_000004" in err
    # a harmless change (lr, max_steps, intervals) passes the check: the run goes on to train (not started here)
    from pretrain.plan import validate_launch

    plan = validate_launch(
        CONFIG,
        [*base(digits_dir, run_root / "runs", "shape"), "optim.lr=1e-4", "trainer.max_steps=900"],
        1,
        None,
        False,
    )
    assert plan.resume_from == tag and not plan.finished
    # --no-resume refuses to start over on top of existing checkpoints, and says what to do
    code = main(["train", CONFIG, *base(digits_dir, run_root / "runs", "shape"), "--no-resume"])
    assert code == 2 and "run.name" in capsys.readouterr().err
    shutil.rmtree(run_root / "runs")
