"""``benchmarks/gpu_check.sh --dry-run``: every stage of the GPU check at tiny size on CPU, its table in a temp file.

The GPU check is run on a lent GPU machine with a fixed budget of device time, so it has to work the first time there;
the dry run goes through the same stages (shards, ``pretrain train`` runs read back from ``metrics.jsonl``, the loader,
SeT vs SDPA, the bf16 SIGKILL-and-resume) with the 32x32 lite models on CPU ranks.
"""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import REPO, train_env

pytestmark = pytest.mark.slow


def _row_checks() -> list[str]:
    """``ROW_CHECKS`` of benchmarks/gpu_check.py (imported by path: benchmarks/ on sys.path would shadow names)."""
    spec = importlib.util.spec_from_file_location("_gpu_check", REPO / "benchmarks" / "gpu_check.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.ROW_CHECKS


ROW_CHECKS = _row_checks()

RESULTS = REPO / "benchmarks" / "RESULTS.md"


def test_gpu_check_dry_run_fills_every_row(tmp_path: Path, deepspeed_cpu_ops):
    table = tmp_path / "table.md"
    before = RESULTS.read_bytes() if RESULTS.exists() else b""
    env = train_env(GPU_CHECK_PYTHON=sys.executable)
    proc = subprocess.run(
        ["bash", "benchmarks/gpu_check.sh", "--dry-run", "--table", str(table), "--work", str(tmp_path / "work")],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output[-5000:]
    text = table.read_text()
    rows = [line.split(" | ")[0].removeprefix("| ") for line in text.splitlines() if line.startswith("| ")]
    assert rows[1:] == ROW_CHECKS, rows  # the header, then every check in order
    results = {line.split(" | ")[0].removeprefix("| "): line for line in text.splitlines() if line.startswith("| ")}
    for check in ROW_CHECKS:
        assert "FAILED" not in results[check] and "missing" not in results[check], results[check]
    for family in ("sepvit", "setformer"):
        assert " img/s (" in results[f"train {family}"] and "peak " in results[f"train {family}"]
        assert "skipped in the dry run" in results[f"train {family} + compile"]
    assert "img/s over one epoch" in results["loader"]
    assert all("SeT " in results[c] and "SDPA " in results[c] for c in ROW_CHECKS if c.startswith("SeT vs SDPA"))
    assert "PASS: the same losses bit for bit" in results["bf16 kill+resume"], results["bf16 kill+resume"]
    assert "(dry run on CPU)" in text and text in proc.stdout
    # the dry run leaves benchmarks/RESULTS.md alone
    assert (RESULTS.read_bytes() if RESULTS.exists() else b"") == before
