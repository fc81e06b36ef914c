"""The README's commands, run as a new user runs them: in a fresh copy of the repository, from its root, with the
README's relative paths and default configs, and without the test suite's thread pinning (OMP_NUM_THREADS unset).

Only the length of the runs is cut, through ``section.field=value`` arguments on the same command line (``ARGS=`` for
``make pretrain``). The copy holds the tracked and untracked-but-not-ignored files (what a clone of this work tree
holds) and links the installed ``.venv``; ``make`` is told the install is done (``-o .venv/.installed``), since
``make install`` is the one step that is not repeated here.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest
import yaml
from conftest import REPO

from pretrain.config import load_config

pytestmark = [pytest.mark.slow]

SHORT_SWEEP = [  # the digits ASHA sweep with 20-step trials evaluated every 10 steps, 3 of them
    "trainer.max_steps=20",
    "trainer.eval_every_steps=10",
    "checkpoint.every_steps=10",
    "schedule.warmup_steps=5",
    "--num-samples",
    "3",
]


def user_env() -> dict[str, str]:
    """The user's shell: no launcher or Slurm variables, no thread pinning, the venv's commands first on PATH."""
    drop = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "OMP_NUM_THREADS")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "RAY_")) and k not in drop}
    env["PYTHONUNBUFFERED"] = "1"
    return env


def run(cwd: Path, *argv: str, timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run(list(argv), cwd=cwd, env=user_env(), capture_output=True, text=True, timeout=timeout)


def explain(out: subprocess.CompletedProcess) -> str:
    return f"exit {out.returncode}\n--- stdout\n{out.stdout[-4000:]}\n--- stderr\n{out.stderr[-6000:]}"


@pytest.fixture(scope="module")
def clone(tmp_path_factory: pytest.TempPathFactory, deepspeed_cpu_ops: None) -> Path:
    """A fresh copy of the repository with the README's data set built by the README's command."""
    root = tmp_path_factory.mktemp("readme") / "vitpretrain"
    files = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=REPO,
        capture_output=True,
        check=True,
    ).stdout.split(b"\0")
    for name in filter(None, (f.decode() for f in files)):
        src = REPO / name
        if src.is_file():
            (root / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, root / name)  # mtimes kept: make sees the install stamp as up to date
    (root / ".venv").symlink_to(REPO / ".venv", target_is_directory=True)
    out = run(root, ".venv/bin/pretrain", "data", "build", "digits", "--out", "data/digits")
    assert out.returncode == 0, explain(out)
    return root


def test_make_pretrain_interrupted_then_rerun_resumes_and_prints_the_result(clone: Path) -> None:
    args = "ARGS=trainer.max_steps=60 trainer.eval_every_steps=30 checkpoint.every_steps=20 checkpoint.every_minutes=0 "
    args += "schedule.warmup_steps=5"
    argv = ["make", "-o", ".venv/.installed", "pretrain", args]
    run_dir = clone / "runs" / "digits_sepvit_lite"
    # Ctrl-C once a checkpoint exists: the ranks checkpoint where they are and exit 3 (make reports the failure)
    proc = subprocess.Popen(
        argv, cwd=clone, env=user_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True
    )
    deadline = time.monotonic() + 300
    while not (run_dir / "checkpoints" / "step_000020" / "COMPLETE").exists() and proc.poll() is None:
        assert time.monotonic() < deadline, "no checkpoint after 300 s"
        time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGINT)
    first, _ = proc.communicate(timeout=300)
    status = json.loads((run_dir / "status.json").read_text())
    assert status["state"] == "stopped" and 20 <= status["step"] < 60, (status, first.decode()[-3000:])  # Ctrl-C
    assert "run the same command again to resume" in first.decode()

    # the same command resumes where it stopped and prints the final result
    out = run(clone, *argv)
    assert out.returncode == 0, explain(out)
    assert "state=finished step=60/60 val_top1=" in out.stdout, explain(out)
    assert "resumed from runs/digits_sepvit_lite/checkpoints/step_0000" in out.stderr, explain(out)
    steps = [e["step"] for e in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines())]
    assert steps == sorted(steps) and steps[-1] == 60  # one history, cut back to the checkpoint it resumed from

    # and once more: nothing left to train, the result again
    out = run(clone, *argv)
    assert out.returncode == 0 and "state=finished step=60/60 val_top1=" in out.stdout, explain(out)


def test_readme_export_eval_and_fine_tune_commands(clone: Path) -> None:
    """The "Use the pretrained model" commands after `make pretrain` (the test above; a short run here if it did not
    run): export, the Python load, eval on 2 ranks, the fine-tune config and a fine-tune from the export."""
    if not (clone / "runs" / "digits_sepvit_lite" / "checkpoints" / "latest").exists():
        args = (
            "ARGS=trainer.max_steps=20 trainer.eval_every_steps=20 checkpoint.every_minutes=0 schedule.warmup_steps=5"
        )
        assert (out := run(clone, "make", "-o", ".venv/.installed", "pretrain", args)).returncode == 0, explain(out)
    out = run(
        clone, ".venv/bin/pretrain", "export", "runs/digits_sepvit_lite", "--out", "sepvit_lite_digits.safetensors"
    )
    assert out.returncode == 0 and (clone / "sepvit_lite_digits.safetensors").is_file(), explain(out)
    load = "from pretrain.models import create_model; m = create_model('sepvit_lite_digits.safetensors', num_classes=5)"
    out = run(clone, ".venv/bin/python", "-c", load + "; print(m.head.out_features)")
    assert out.returncode == 0 and out.stdout.split() == ["5"], explain(out)
    out = run(clone, ".venv/bin/pretrain", "eval", "sepvit_lite_digits.safetensors", "--data", "data/digits", "--split",
              "val", "--nproc", "2")  # fmt: skip
    assert out.returncode == 0 and "top1" in out.stdout, explain(out)
    assert json.loads((clone / "sepvit_lite_digits.eval-val.json").read_text())["samples"] > 0
    short = [
        "trainer.max_steps=10",
        "trainer.eval_every_steps=10",
        "checkpoint.every_steps=10",
        "schedule.warmup_steps=2",
    ]
    config = "configs/run/digits_sepvit_lite_finetune.yaml"
    out = run(clone, ".venv/bin/pretrain", "train", config, "--nproc", "2", *short)
    assert out.returncode == 0 and "state=finished step=10/10 val_top1=" in out.stdout, explain(out)
    assert "initialised the weights from runs/digits_sepvit_lite" in out.stderr, explain(out)
    out = run(clone, ".venv/bin/pretrain", "train", config, "model.init_from=sepvit_lite_digits.safetensors",
              "run.name=digits_from_export", "--nproc", "2", *short)  # fmt: skip
    assert out.returncode == 0 and "state=finished step=10/10 val_top1=" in out.stdout, explain(out)
    assert load_config(clone / "runs" / "digits_from_export" / "config.yaml").optim.layer_decay == 0.75


def test_readme_setformer_command_trains_on_two_ranks(clone: Path) -> None:
    out = run(
        clone,
        ".venv/bin/pretrain", "train", "configs/run/digits_setformer_lite.yaml", "data.path=data/digits",
        "--nproc", "2", "trainer.max_steps=20", "trainer.eval_every_steps=20", "checkpoint.every_minutes=0",
        "schedule.warmup_steps=5",
    )  # fmt: skip
    assert out.returncode == 0, explain(out)
    assert "state=finished step=20/20 val_top1=" in out.stdout, explain(out)
    run_dir = clone / "runs" / "digits_setformer_lite"
    assert load_config(run_dir / "config.yaml").model.name.startswith("setformer")
    # 2 ranks on the machine's CPUs: each rank takes its half (the launcher's OMP_NUM_THREADS), not every core
    assert f"cpu: {max(1, len(os.sched_getaffinity(0)) // 2)} intra-op threads" in out.stderr, explain(out)


def test_readme_sweep_commands_with_relative_paths(clone: Path, tmp_path: Path) -> None:
    pretrain = str(clone / ".venv" / "bin" / "pretrain")
    sweep_yaml = "configs/sweep/digits_asha.yaml"

    # --dry-run checks the data set where the trials will look for it
    out = run(clone, pretrain, "sweep", sweep_yaml, "data.path=data/missing", "--dry-run")
    assert out.returncode == 2 and "data/missing: no such folder" in out.stderr, explain(out)
    out = run(clone, pretrain, "sweep", sweep_yaml, "--dry-run")
    assert out.returncode == 0, explain(out)
    assert f'data.path="{clone / "data" / "digits"}"' in out.stdout  # absolute in the plan, as in sweep.yaml

    out = run(clone, pretrain, "sweep", sweep_yaml, *SHORT_SWEEP, timeout=900)
    assert out.returncode == 0, explain(out)
    sweep_dir = clone / "runs" / "sweeps" / "digits_asha"
    summary = json.loads((sweep_dir / "summary.json").read_text())
    assert len(summary) == 3
    assert {r["status"] for r in summary} <= {"finished", "stopped"}, summary
    assert any(r["status"] == "finished" and r["step"] == 20 for r in summary), summary
    assert (sweep_dir / "metric_vs_step.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert load_config(sweep_dir / "best_config.yaml").data.path == str(clone / "data" / "digits")
    stored = yaml.safe_load((sweep_dir / "sweep.yaml").read_text())
    assert stored["output_dir"] == str(clone / "runs" / "sweeps") and Path(stored["base"]).is_absolute()
    for r in summary:
        trial_log = (Path(r["run_dir"]) / "sweep" / "train.log").read_text()
        assert "cpu: 1 intra-op threads" in trial_log  # resources.cpu=1: one thread per trial, not one per core

    # --resume from another directory, through the recorded sweep.yaml: every trial already ended, none runs again
    def starts() -> dict[str, int]:  # each start of a trial's run writes one "=====" header into its train.log
        logs = {r["trial_id"]: Path(r["run_dir"]) / "sweep" / "train.log" for r in summary}
        return {trial: log.read_text().count("\n===== ") for trial, log in logs.items()}

    before = starts()
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    out = run(elsewhere, pretrain, "sweep", str(sweep_dir / "sweep.yaml"), "--resume", timeout=600)
    assert out.returncode == 0, explain(out)
    assert starts() == before
    resumed = json.loads((sweep_dir / "summary.json").read_text())
    assert {r["trial_id"]: r["step"] for r in resumed} == {r["trial_id"]: r["step"] for r in summary}
    assert not (elsewhere / "runs").exists()  # nothing was written where the command ran
