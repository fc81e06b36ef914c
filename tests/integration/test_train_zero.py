"""ZeRO stages 1 and 3 train and resume on 2 CPU ranks (stage 2 is covered in depth by test_train_resume.py).

Each stage also carries one more feature, to keep the number of (slow) runs down: stage 1 an EMA of the weights,
stage 3 gradient accumulation; both take time-based checkpoints (``checkpoint.every_minutes`` tiny).
"""

from __future__ import annotations

import json

import pytest

from pretrain.checkpoint import list_checkpoints
from pretrain.fsutil import read_jsonl

pytestmark = [pytest.mark.slow, pytest.mark.world_size(2)]

CONFIG = "configs/run/digits_sepvit_lite.yaml"


@pytest.mark.parametrize(
    ("stage", "extra"),
    [
        (1, ["trainer.ema_decay=0.9", "data.batch_size=16"]),
        (3, ["trainer.grad_accum_steps=2", "data.batch_size=8"]),
    ],
)
def test_zero_stage_trains_and_resumes(stage, extra, digits_dir, run_root, start_train):
    common = [
        f"data.path={digits_dir}",
        f"run.output_dir={run_root}",
        "run.name=zero",
        f"deepspeed.zero_stage={stage}",
        *extra,
        "data.val_batch_size=64",
        "trainer.log_every_steps=1",
        "trainer.eval_every_steps=0",
        "trainer.progress_bar=false",
        "schedule.warmup_steps=2",
        "checkpoint.every_steps=0",
        "checkpoint.every_minutes=0.0001",  # rank 0's clock says "save" after every step
        "checkpoint.keep_last=2",
    ]
    first = start_train(CONFIG, [*common, "trainer.max_steps=4"], "--nproc", "2")
    assert first.wait() == 0, first.output[-5000:]
    run_dir = run_root / "zero"
    tag = run_dir / "checkpoints" / "step_000004"
    files = {p.name for p in tag.iterdir()}
    if stage == 3:  # parameters are partitioned too: each rank writes its own model states
        assert {"zero_pp_rank_0_mp_rank_00_model_states.pt", "zero_pp_rank_1_mp_rank_00_model_states.pt"} <= files
    assert {"zero_pp_rank_0_mp_rank_00_optim_states.pt", "zero_pp_rank_1_mp_rank_00_optim_states.pt"} <= files
    assert (run_dir / "checkpoints" / "step_000003").is_dir(), "time-based checkpoint (every_steps=0)"
    assert ("ema.pt" in files) == (stage == 1)

    # a harmless change (max_steps) resumes from the final checkpoint and trains on
    second = start_train(CONFIG, [*common, "trainer.max_steps=7"], "--nproc", "2")
    assert second.wait() == 0, second.output[-5000:]
    assert "resumed from" in second.output and "step_000004" in second.output
    train = [e for e in read_jsonl(run_dir / "metrics.jsonl") if e["event"] == "train"]
    assert [e["step"] for e in train] == list(range(1, 8))
    assert all(isinstance(e["loss"], float) and e["loss"] == e["loss"] for e in train)
    assert train[-1]["loss"] < train[0]["loss"] + 0.5
    status = json.loads((run_dir / "status.json").read_text())
    assert status["state"] == "finished" and status["step"] == 7 and status["restarts"] == 1
    assert [c.step for c in list_checkpoints(run_dir / "checkpoints")][-1] == 7
    evals = [e for e in read_jsonl(run_dir / "metrics.jsonl") if e["event"] == "eval"]
    assert [e["step"] for e in evals] == [4, 7]  # eval at the end of each invocation
    if stage == 1:
        assert all(0.0 <= e["val_top1_ema"] <= 1.0 and e["val_loss_ema"] != e["val_loss"] for e in evals)
