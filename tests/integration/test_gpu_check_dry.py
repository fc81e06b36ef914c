"""``benchmarks/gpu_check.sh --dry-run``: every stage of the GPU check at tiny size on CPU, its table in a temp file.

The GPU check runs on a lent GPU machine with a fixed budget of device time, so it has to work the first time there:
the dry run goes through the same code (the shards, the three augmentations, the trainer's step for every model with
a profile and the kernel count, the timm-style loop, the per-block compile calls, inference latency, the loader, the
target ratios) with the 32x32 lite models on CPU, and models of our registry where the GPU run creates timm's. It
asks for every stage but ``data``, as a rerun on a bare machine would: the shards are made first all the same.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from conftest import REPO, train_env

pytestmark = pytest.mark.slow

RESULTS = REPO / "benchmarks" / "RESULTS.md"
LABELS = ["sepvit_lite_32", "setformer_lite_32", "timm swin_tiny_patch4_window7_224", "timm vit_small_patch16_224"]
LOOP = "timm vit_small_patch16_224 (dry run: stand-in setformer_lite_32, timm does not import here): timm-style loop"


def _check(args: list[str], tmp_path: Path, table: Path) -> subprocess.CompletedProcess:
    env = train_env(GPU_CHECK_PYTHON=sys.executable)
    cmd = ["bash", "benchmarks/gpu_check.sh", "--dry-run", "--table", str(table), "--work", str(tmp_path / "work")]
    return subprocess.run([*cmd, *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=240)


def _rows(table: Path) -> list[list[str]]:
    lines = [ln for ln in table.read_text().splitlines() if ln.startswith("| ") and not ln.startswith("| stage |")]
    return [ln.strip("| ").split(" | ") for ln in lines]


def test_gpu_check_dry_run_fills_every_stage(tmp_path: Path, deepspeed_cpu_ops):
    table = tmp_path / "table.md"
    before = RESULTS.read_bytes() if RESULTS.exists() else b""
    # every stage but data: on a bare machine (no shards in the work folder) the data stage runs first anyway
    proc = _check(["--stages", "augment,train", "infer", "loader", "compile"], tmp_path, table)
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output[-5000:]
    rows = _rows(table)
    for stage, check, _, result in rows:
        assert not result.startswith(("FAILED", "INCOMPLETE")), (stage, check, result)
        # n/a only where the dry run leaves a model out or a CPU has no MFU
        assert not result.startswith("n/a") or "not run in this dry run" in result or "MFU" in check, result
    by = {(stage, check): result for stage, check, _, result in rows}
    assert [stage for stage, *_ in rows][:1] == ["data"] and "train JPEGs" in by["data", "shards"]
    for impl, kernels in (("masked", "453 / 452"), ("torch", ""), ("triton", "28 / 27")):
        result = next(r for (stage, check), r in by.items() if stage == "augment" and check.startswith(impl))
        assert f"{kernels} kernels per mixup / cutmix batch, 0 host reads" in result, result
    assert "max /triton - torch/" in by["augment", "triton on this device vs torch on CPU, same draws"]
    trained = [check for stage, check, *_ in rows if stage == "train" and check.endswith(": train")]
    assert [c.split(" (dry run")[0].removesuffix(": train") for c in trained] == [*LABELS, LABELS[-1]]
    assert trained[-1] == f"{LOOP}: train" and all("stand-in" in c for c in trained[2:])
    for check in trained:
        assert " img/s (" in by["train", check] and "peak " in by["train", check]
        profile = by["train", check.replace(": train", ": profile")]
        assert "dispatched kernels/step (kernel_count), 0 host reads" in profile and "top: " in profile, profile
    compiled = [
        (check, setting) for stage, check, setting, _ in rows if stage == "compile" and check.endswith(": train")
    ]
    assert [c for c, _ in compiled] == [f"{LABELS[0]}: train", trained[3], trained[4]]  # one per compile path
    assert "trainer.compile (per block)" in compiled[0][1]
    assert (
        "blocks compiled per block as the engine compiles ours" in compiled[1][1]
        and "blocks compiled" in compiled[2][1]
    )
    infer = [(c, r) for st, c, _, r in rows if st == "infer"]
    assert [c.split(" (dry run")[0].removesuffix(": latency") for c, _ in infer] == LABELS
    assert all("batch 1: " in r and "batch 4: " in r for _, r in infer)
    assert " img/s (" in by["loader", "one epoch"] and "the appetite of the fastest model" in by["loader", "one epoch"]
    targets = {c: r for st, c, _, r in rows if st == "targets"}
    assert len(targets) == 4 + 5
    assert all("x (" in r and "dry run: stand-ins" in r for c, r in targets.items() if c.startswith("train: "))
    assert "dry run: stand-ins" in targets["compile: kernels/step, our trainer / timm loop (ViT-S)"]
    text = table.read_text()
    assert "(dry run on CPU)" in text and "; stages augment, train, infer, loader, compile;" in text
    # the dry run leaves benchmarks/RESULTS.md alone
    assert (RESULTS.read_bytes() if RESULTS.exists() else b"") == before

    # a wrong stage name is refused before anything runs
    proc = _check(["--stages", "trian"], tmp_path, tmp_path / "bad.md")
    assert proc.returncode == 2 and "unknown stage trian: choose from data, augment" in proc.stderr
