"""`pretrain train` with one rank runs in the calling process (``main(argv)``): ZeRO stage 0, no launcher."""

from __future__ import annotations

import json
import math

import pytest

from launch.cli import main
from pretrain.fsutil import read_jsonl

pytestmark = pytest.mark.slow


def test_single_rank_in_process_zero0(digits_dir, run_root, deepspeed_cpu_ops, monkeypatch, capsys):
    monkeypatch.setenv("DS_ACCELERATOR", "cpu")
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "SLURM_PROCID", "SLURM_NTASKS"):
        monkeypatch.delenv(var, raising=False)
    argv = [
        "train",
        "configs/run/digits_sepvit_lite.yaml",
        f"data.path={digits_dir}",
        f"run.output_dir={run_root}",
        "run.name=single",
        "deepspeed.zero_stage=0",
        "data.batch_size=16",
        "data.num_workers=0",
        "trainer.max_steps=3",
        "trainer.log_every_steps=1",
        "trainer.progress_bar=false",
        "schedule.warmup_steps=1",
    ]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "state=finished step=3/3" in out and "val_top1=" in out
    run_dir = run_root / "single"
    status = json.loads((run_dir / "status.json").read_text())
    assert status["world_size"] == 1 and status["state"] == "finished"
    train = [e for e in read_jsonl(run_dir / "metrics.jsonl") if e["event"] == "train"]
    assert [e["step"] for e in train] == [1, 2, 3]
    assert all(isinstance(e["grad_norm"], float) and math.isfinite(e["grad_norm"]) for e in train)  # stage 0 too
    assert (run_dir / "checkpoints" / "step_000003" / "COMPLETE").is_file()
    # the same call again finds the run finished and does not train
    assert main(argv) == 0
    assert "state=finished step=3/3" in capsys.readouterr().out
    assert len(read_jsonl(run_dir / "metrics.jsonl")) == len(train) + 1  # + the final eval event
