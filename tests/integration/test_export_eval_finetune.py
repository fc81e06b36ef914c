"""After pretraining, on real 2-rank digits runs: export (ZeRO 0, 2, 3; bf16), eval, fine-tune from the export.

The exported model must compute the training engine's logits: the engine is rebuilt on 2 ranks and loads the
checkpoint the way a resume does (``CheckpointManager.load``), then both see the same batch. ``pretrain eval`` of the
export must reproduce the run's own last eval, on 1 and on 2 ranks. A fine-tune with another head size must start
from the pretrained weights (lower loss than from scratch) and resume from its own checkpoints only.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import REPO, tiny_run_overrides, train_env

from launch.cli import main as cli_main
from pretrain.distributed import find_free_port
from pretrain.fsutil import read_jsonl
from pretrain.models import create_model, read_pretrained

pytestmark = [pytest.mark.slow, pytest.mark.world_size(2)]

CONFIG = "configs/run/digits_sepvit_lite.yaml"
PRETRAIN_STEPS = 12

# For each (run dir, checkpoint tag, output) triple of its arguments: rebuilds the engine of that finished run on 2
# ranks, loads the checkpoint as a resume does, and saves rank 0's logits (one pair of processes for every ZeRO stage).
_ENGINE_LOGITS = """
import sys
from pathlib import Path

import torch

from pretrain.checkpoint_manager import CheckpointManager
from pretrain.config import load_config
from pretrain.distributed import init_distributed
from pretrain.engine import build_engine
from pretrain.rank import build_model

dist = init_distributed(device="cpu")
args = [Path(a) for a in sys.argv[1:]]
x = torch.randn(8, 3, 32, 32, generator=torch.Generator().manual_seed(1234))  # the same input for every stage
for run_dir, tag, out in zip(args[0::3], args[1::3], args[2::3]):
    cfg = load_config(run_dir / "config.yaml")
    parts = build_engine(cfg, build_model(cfg), dist.world_size)
    CheckpointManager(run_dir / "checkpoints", dist.rank, dist.world_size).load(parts.engine, tag)
    parts.engine.eval()
    with torch.no_grad():
        logits = parts.engine(x)
    if dist.rank == 0:
        torch.save(logits, out)
"""
EXPORT_STAGES = (0, 2, 3)


def _ranks(argv: list[str], nproc: int = 2, timeout: float = 240.0) -> None:
    port = find_free_port()
    procs = [
        subprocess.Popen(
            argv,
            cwd=REPO,
            env=train_env(
                RANK=str(r),
                WORLD_SIZE=str(nproc),
                LOCAL_RANK=str(r),
                LOCAL_WORLD_SIZE=str(nproc),
                MASTER_ADDR="127.0.0.1",
                MASTER_PORT=str(port),
            ),  # fmt: skip
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for r in range(nproc)
    ]
    outputs = [p.communicate(timeout=timeout)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), "\n".join(o[-3000:] for o in outputs)


def _pretrain(start_train, digits_dir: Path, root: Path, stage: int) -> Path:
    overrides = tiny_run_overrides(
        digits_dir,
        root,
        f"zero{stage}",
        f"deepspeed.zero_stage={stage}",
        f"trainer.max_steps={PRETRAIN_STEPS}",
        "trainer.eval_every_steps=0",
        "data.num_workers=1",
    )
    run = start_train(CONFIG, overrides, "--nproc", "2")
    assert run.wait() == 0, run.output[-5000:]
    return root / f"zero{stage}"


@pytest.fixture(scope="module")
def pretrained(scratch_root, digits_dir, start_train, request):
    """``pretrained(stage) -> run dir``: a finished 2-rank digits run of that ZeRO stage, trained once per module.
    ZeRO-2 is the config's stage: that run is the session's ``tiny_reference`` (read only)."""
    root = scratch_root / "export_runs"
    runs: dict[int, Path] = {}

    def get(stage: int) -> Path:
        if stage not in runs:
            if stage == 2:
                runs[stage] = request.getfixturevalue("tiny_reference")
            else:
                runs[stage] = _pretrain(start_train, digits_dir, root, stage)
        return runs[stage]

    return get


def _last_step(run_dir: Path) -> int:
    return json.loads((run_dir / "status.json").read_text())["step"]


@pytest.fixture(scope="module")
def engine_logits(pretrained, tmp_path_factory) -> dict[int, torch.Tensor]:
    """``{stage: logits}`` of each stage's DeepSpeed engine, rebuilt from its last checkpoint on 2 ranks."""
    work = tmp_path_factory.mktemp("engine_logits")
    script = work / "engine_logits.py"
    script.write_text(_ENGINE_LOGITS)
    argv = [sys.executable, str(script)]
    for stage in EXPORT_STAGES:
        run_dir = pretrained(stage)
        argv += [
            str(run_dir),
            str(run_dir / "checkpoints" / f"step_{_last_step(run_dir):06d}"),
            str(work / f"{stage}.pt"),
        ]
    _ranks(argv)
    return {stage: torch.load(work / f"{stage}.pt") for stage in EXPORT_STAGES}


@pytest.mark.parametrize("stage", EXPORT_STAGES)
def test_export_computes_the_engines_logits(stage, pretrained, engine_logits, tmp_path):
    run_dir = pretrained(stage)
    steps = _last_step(run_dir)
    tag = run_dir / "checkpoints" / f"step_{steps:06d}"
    files = {p.name for p in tag.iterdir()}
    assert ("zero_pp_rank_1_mp_rank_00_optim_states.pt" in files) == (stage > 0)
    out = tmp_path / "w.safetensors"
    assert cli_main(["export", str(run_dir), "--out", str(out)]) == 0
    _, meta = read_pretrained(out, weights=False)
    assert meta["step"] == str(steps) and meta["zero_stage"] == str(stage) and meta["world_size"] == "2"
    assert meta["model_config"]["num_classes"] == 10 and meta["model_config"]["img_size"] == 32

    x = torch.randn(8, 3, 32, 32, generator=torch.Generator().manual_seed(1234))
    with torch.no_grad():
        logits = create_model(out).eval()(x)
    assert logits.abs().max() > 0.1  # a trained head, not zeros
    torch.testing.assert_close(logits, engine_logits[stage], atol=1e-6, rtol=1e-6)


def test_eval_of_an_export_reproduces_the_runs_last_eval_on_any_rank_count(pretrained, digits_dir, tmp_path):
    run_dir = pretrained(2)
    steps = _last_step(run_dir)
    last = [e for e in read_jsonl(run_dir / "metrics.jsonl") if e["event"] == "eval"][-1]
    assert last["step"] == steps
    out = tmp_path / "w.safetensors"
    assert cli_main(["export", str(run_dir), "--out", str(out)]) == 0
    results = []
    for nproc, target in ((2, out), (1, run_dir)):
        argv = [
            sys.executable,
            "-m",
            "launch.cli",
            "eval",
            str(target),
            "--data",
            str(digits_dir),
            "--nproc",
            str(nproc),
        ]
        argv += ["--batch-size", "48", "--out", str(tmp_path / f"eval{nproc}.json")]
        done = subprocess.run(argv, cwd=REPO, env=train_env(), capture_output=True, text=True, timeout=240)
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
        assert "top1" in done.stdout
        results.append(json.loads((tmp_path / f"eval{nproc}.json").read_text()))
    for r in results:
        assert r["samples"] == last["val_samples"] and r["step"] == steps
        assert r["top1"] == last["val_top1"] and r["top5"] == last["val_top5"]
        assert abs(r["loss"] - last["val_loss"]) < 1e-5
    # a head that does not match the data set is refused before anything is scored
    wrong = tmp_path / "w12.safetensors"
    from safetensors.torch import save_file

    state, meta = read_pretrained(out)
    cfg = dict(meta["model_config"], num_classes=12)
    state = {k: v for k, v in state.items() if not k.startswith("head.")}
    state |= {"head.weight": torch.zeros(12, 256), "head.bias": torch.zeros(12)}
    save_file(state, str(wrong), metadata={**{k: v for k, v in meta.items() if isinstance(v, str)},
                                           "model_config": json.dumps(cfg)})  # fmt: skip
    argv = [sys.executable, "-m", "launch.cli", "eval", str(wrong), "--data", str(digits_dir)]
    done = subprocess.run(argv, cwd=REPO, env=train_env(), capture_output=True, text=True, timeout=240)
    assert done.returncode == 2 and "12 outputs" in done.stderr and "10 classes" in done.stderr


def test_fine_tune_from_an_export_with_another_head_then_resume(pretrained, digits_dir, run_root, start_train):
    export = run_root / "pretrained.safetensors"
    assert cli_main(["export", str(pretrained(2)), "--out", str(export)]) == 0
    common = ["model.num_classes=12", "data.classes_from_manifest=false", "trainer.eval_every_steps=0"]
    common += ["data.num_workers=1", "checkpoint.every_steps=3"]

    def train(name: str, steps: int, *extra: str):
        overrides = tiny_run_overrides(digits_dir, run_root, name, *common, f"trainer.max_steps={steps}", *extra)
        run = start_train(CONFIG, overrides, "--nproc", "2")
        assert run.wait() == 0, run.output[-5000:]
        return run, [e for e in read_jsonl(run_root / name / "metrics.jsonl") if e["event"] == "train"]

    tuned, tuned_log = train("tuned", 6, f"model.init_from={export}", "optim.layer_decay=0.75")
    assert "initialised the weights from" in tuned.output and "optimizer state is not carried over" in tuned.output
    _, scratch_log = train("scratch", 6)
    assert [e["step"] for e in tuned_log] == [e["step"] for e in scratch_log] == list(range(1, 7))
    # same data, same seed, the same fresh 12-way head: only the backbone differs (20 pretraining steps here)
    tuned_loss, scratch_loss = [e["loss"] for e in tuned_log], [e["loss"] for e in scratch_log]
    assert tuned_loss[-1] < scratch_loss[-1] and sum(tuned_loss[3:]) < sum(scratch_loss[3:]), (tuned_loss, scratch_loss)

    export.unlink()  # a resume reads the run's own checkpoint, never init_from again
    overrides = tiny_run_overrides(digits_dir, run_root, "tuned", *common, "trainer.max_steps=8")
    refused = start_train(CONFIG, overrides, "--nproc", "2")  # without the run's layer decay: its groups differ
    assert refused.wait() == 2 and "optim.layer_decay=1" in refused.output and "trained with 0.75" in refused.output
    resumed, resumed_log = train("tuned", 8, f"model.init_from={export}", "optim.layer_decay=0.75")
    assert "resumed from" in resumed.output and "step_000006" in resumed.output
    assert "initialised the weights from" not in resumed.output
    assert [e["step"] for e in resumed_log] == list(range(1, 9))


@pytest.mark.skipif(torch.cuda.is_available(), reason="a CPU bf16 run; trainer.device=auto would pick the GPU")
def test_export_of_a_bf16_run_holds_the_fp32_master_weights(digits_dir, run_root, start_train, tmp_path):
    extra = ["trainer.precision=bf16", "trainer.device=auto", "trainer.max_steps=4", "trainer.eval_every_steps=0"]
    extra += ["schedule.warmup_steps=2", "data.num_workers=1"]
    overrides = tiny_run_overrides(digits_dir, run_root, "bf16", *extra)
    run = start_train(CONFIG, overrides, "--nproc", "2")
    assert run.wait() == 0, run.output[-5000:]
    tag = run_root / "bf16" / "checkpoints" / "step_000004"
    assert (tag / "bf16_zero_pp_rank_1_mp_rank_00_optim_states.pt").is_file()
    for dtype in ("fp32", "bf16"):
        assert cli_main(["export", str(tag), "--out", str(tmp_path / f"{dtype}.safetensors"), "--dtype", dtype]) == 0
    fp32, _ = read_pretrained(tmp_path / "fp32.safetensors")
    bf16, _ = read_pretrained(tmp_path / "bf16.safetensors")
    module = torch.load(tag / "mp_rank_00_model_states.pt", weights_only=False)["module"]  # the engine's bf16 copy
    assert set(fp32) == set(bf16) == set(module) and all(v.dtype == torch.float32 for v in fp32.values())
    assert all(torch.equal(bf16[k], v) and torch.equal(fp32[k].to(torch.bfloat16), v) for k, v in module.items())
    assert any(not torch.equal(fp32[k], v.float()) for k, v in module.items()), "fp32 master, not the bf16 copy"
