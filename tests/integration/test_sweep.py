"""`pretrain sweep` end to end: real Ray Tune (one local Ray cluster for the module, joined by each sweep driver through
RAY_ADDRESS), real `pretrain train` runs on the real digits shards, real files.

Runs are tiny (SepViT-Lite, 8 images per step, 10 steps, an eval and a checkpoint every 5 steps, one rank per trial):
most of a trial's time is the start of `pretrain train` (imports, DeepSpeed), so tests keep trial counts minimal.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from launch.slurm_jobs import read_job_events
from pretrain.config import load_config

pytestmark = [pytest.mark.slow]

REPO = Path(__file__).resolve().parents[2]
CONFIG = REPO / "configs" / "run" / "digits_sepvit_lite.yaml"
MAX_STEPS = 10
LONG_STEPS = 30
EVERY = 5  # eval and checkpoint interval in steps: at step 5, lr 2e-3 is clearly ahead of a hopeless lr
HEARTBEAT_TIMEOUT_S = 15  # launch.sweep.trial.HEARTBEAT_TIMEOUT_S['local']


def trial_overrides(data: Path) -> list[str]:
    return [
        f"data.path={data}",
        f"trainer.max_steps={MAX_STEPS}",
        f"trainer.eval_every_steps={EVERY}",
        f"trainer.log_every_steps={EVERY}",
        f"checkpoint.every_steps={EVERY}",
        "checkpoint.every_minutes=0",
        "schedule.name=constant",
        "schedule.warmup_steps=0",
        "data.batch_size=8",
        "data.val_batch_size=150",
        "data.num_workers=0",
    ]


def sweep_env(ray_address: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    env.update(RAY_ADDRESS=ray_address, PYTHONUNBUFFERED="1", DS_ACCELERATOR="cpu")
    env["PATH"] = f"{Path(sys.executable).parent}:{env.get('PATH', '')}"
    return env


def write_sweep(path: Path, data: Path, **fields) -> Path:
    doc = {
        "base": str(CONFIG),
        "overrides": trial_overrides(data),
        "metric": "val_top1",
        "max_concurrent": 1,
        "resources": {"cpu": 1, "gpu": 0, "nproc": 1},
        "stop_grace_s": 5,
        "max_failures": 0,
        **fields,
    }
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return path


class Driver:
    """A `pretrain sweep` driver process (own process group, so a test can SIGKILL it), logging to a file."""

    def __init__(self, sweep_yaml: Path, out: Path, ray_address: str, *flags: str):
        self.log_path = out / f"driver-{time.monotonic_ns()}.log"
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "launch.cli", "sweep", str(sweep_yaml), "--output-dir", str(out), *flags],
                cwd=out,
                env=sweep_env(ray_address),
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )

    def kill(self) -> None:
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.proc.wait()

    def wait(self, timeout: float) -> tuple[int, str]:
        try:
            self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.kill()
        return self.proc.returncode, self.log_path.read_text(errors="replace")


def eval_events(run_dir: Path) -> list[dict]:
    events = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return [e for e in events if e.get("event") == "eval"]


def eval_steps(run_dir: Path) -> list[int]:
    return [e["step"] for e in eval_events(run_dir)]


def trainer_pids(marker: str) -> list[tuple[int, str]]:
    """(pid, command line) of the live processes of training runs that mention ``marker`` (a sweep's unique folder)."""
    out = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            cmd = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            state = (proc / "stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if marker in cmd and "launch.cli train" in cmd and state != "Z":
            out.append((int(proc.name), cmd))
    return out


def trainer_processes(marker: str) -> list[str]:
    return [cmd for _, cmd in trainer_pids(marker)]


def wait_no_trainers(marker: str, timeout: float = 30.0) -> list[str]:
    deadline = time.monotonic() + timeout
    while (left := trainer_processes(marker)) and time.monotonic() < deadline:
        time.sleep(0.5)
    return left


@pytest.fixture(scope="module")
def ray_address(tmp_path_factory: pytest.TempPathFactory):
    """A local Ray cluster for the module (2 CPUs, no dashboard); sweep drivers join it, so it outlives a killed one."""
    ray = pytest.importorskip("ray")
    os.environ.setdefault("DS_ACCELERATOR", "cpu")  # inherited by the trials' Ray workers and their runs
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        yield ray.get_runtime_context().gcs_address
    finally:
        ray.shutdown()


def test_asha_sweep_stops_bad_trials_early(digits_dir: Path, ray_address: str, tmp_path: Path) -> None:
    # One good learning rate first, then three hopeless ones, two trials at a time. ASHA's only rung is the first
    # eval (grace_period 1; max_t 2 evals), where a trial continues only if it reaches the top quarter
    # (reduction_factor 4) of the results recorded there so far. Trials 2 and 3 start only after trial 0 or 1 ended,
    # by when the good trial 0 has passed the rung: its result lifts the 75th percentile above theirs (ties among
    # hopeless ones or not), so both are stopped at their first eval. Trial 1 races trial 0 to the rung.
    sweep = write_sweep(
        tmp_path / "asha.yaml",
        digits_dir,
        name="asha",
        space={"optim.lr": {"grid": [2.0e-3, 3.0e-7, 2.0e-7, 1.0e-7]}},
        scheduler={"name": "asha", "grace_period": 1, "reduction_factor": 4},
        max_concurrent=2,
        keep_checkpoints=1,
    )
    rc, log = Driver(sweep, tmp_path, ray_address).wait(timeout=420)
    assert rc == 0, log[-4000:]
    sweep_dir = tmp_path / "asha"
    summary = json.loads((sweep_dir / "summary.json").read_text())
    assert len(summary) == 4
    by_lr = {r["params"]["optim.lr"]: r for r in summary}
    assert by_lr[2.0e-3]["status"] == "finished" and by_lr[2.0e-3]["step"] == MAX_STEPS
    stopped = [r for r in summary if r["status"] == "stopped"]
    assert len(stopped) >= 2, summary
    assert {r["params"]["optim.lr"] for r in stopped} >= {2.0e-7, 1.0e-7}
    for r in stopped:
        assert r["step"] < MAX_STEPS and eval_steps(Path(r["run_dir"]))[0] == EVERY
    assert summary[0]["params"]["optim.lr"] == 2.0e-3  # ranked first
    # the best trial's checkpoint and how to export it, for the next user of the weights
    best_ckpt = next(line.split()[-1] for line in log.splitlines() if line.strip().startswith("checkpoint:"))
    assert f"pretrain export {best_ckpt} --out {tmp_path / 'asha' / 'best.safetensors'}" in log
    assert Path(best_ckpt).is_dir() and (Path(best_ckpt) / "COMPLETE").is_file()
    assert wait_no_trainers(str(sweep_dir)) == []  # stopped trials' runs were terminated, no orphans

    # outputs: table, plot, best config (a fresh run, loadable by `pretrain train`), TensorBoard links
    assert "rank" in (sweep_dir / "summary.txt").read_text() and "stopped" in log
    assert (sweep_dir / "metric_vs_step.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    best = load_config(sweep_dir / "best_config.yaml")
    assert best.optim.lr == 2.0e-3 and best.run.name == "asha-best" and best.trainer.max_steps == MAX_STEPS
    assert best.checkpoint.keep_last == 2  # the base config's retention, not the trials'
    for r in summary:
        link = sweep_dir / "tb" / Path(r["run_dir"]).name
        assert link.is_symlink() and any(link.resolve().iterdir())

    # checkpoints: Ray Tune keeps 1 per trial (+ the latest), and the trials' run dirs keep their newest only
    for trial_dir in (sweep_dir / "tune").glob("run_trial_*"):
        assert 1 <= len(list(trial_dir.glob("checkpoint_*"))) <= 2
    for r in summary:
        tags = [p for p in (Path(r["run_dir"]) / "checkpoints").glob("step_*")]
        assert len(tags) == 1, tags


def test_pbt_exploit_clones_the_better_trials_checkpoint_and_perturbs_its_lr(
    digits_dir: Path, ray_address: str, tmp_path: Path
) -> None:
    # Two trials, synchronous PBT at every eval, bottom half exploits top half, no resampling: at the first eval (step
    # EVERY) the hopeless lr clones the good trial's step-EVERY checkpoint and continues with the good lr x 1.2 or 0.8.
    sweep = write_sweep(
        tmp_path / "pbt.yaml",
        digits_dir,
        name="pbt",
        space={"optim.lr": {"grid": [2.0e-3, 1.0e-7]}},
        scheduler={
            "name": "pbt",
            "perturbation_interval": 1,
            "quantile_fraction": 0.5,
            "resample_probability": 0.0,
            "synch": True,
            "hyperparam_mutations": {"optim.lr": {"loguniform": [1.0e-4, 1.0e-2]}},
        },
        max_concurrent=2,
    )
    rc, log = Driver(sweep, tmp_path, ray_address).wait(timeout=420)
    assert rc == 0, log[-4000:]
    sweep_dir = tmp_path / "pbt"
    summary = json.loads((sweep_dir / "summary.json").read_text())
    assert len(summary) == 2 and [r["status"] for r in summary] == ["finished", "finished"], summary
    assert all(r["step"] == MAX_STEPS and eval_steps(Path(r["run_dir"])) == [EVERY, MAX_STEPS] for r in summary)

    def lives(r: dict) -> list[str]:
        """The command lines of a trial's runs, in order."""
        return [
            line for line in (Path(r["run_dir"]) / "sweep" / "train.log").read_text().splitlines() if "=====" in line
        ]

    bad = next(r for r in summary if "optim.lr=1.0e-07" in lives(r)[0])
    good = next(r for r in summary if r is not bad)
    assert good["params"]["optim.lr"] == 2.0e-3 and len(lives(good)) == 2  # paused at the first eval, then resumed
    trial_log = (Path(bad["run_dir"]) / "sweep" / "trial.log").read_text()
    assert f"PBT exploit: continuing from trial {good['trial_id']}'s checkpoint (step {EVERY})" in trial_log
    mutated = bad["params"]["optim.lr"]
    assert mutated in (pytest.approx(2.0e-3 * 1.2), pytest.approx(2.0e-3 * 0.8)), bad["params"]
    # the donor's checkpoint became the newest of the bad trial's run dir, which its second run resumed from
    assert f"optim.lr={mutated}" in lives(bad)[1]
    second_life = (Path(bad["run_dir"]) / "sweep" / "train.log").read_text().split("=====")[-1]
    assert f"resumed from {Path(bad['run_dir']) / 'checkpoints' / f'step_{EVERY:06d}'}" in second_life
    # the bad trial's own checkpoint, which the donor's replaced, was moved aside, not deleted
    aside = list((Path(bad["run_dir"]) / "previous").glob("*/checkpoints/step_*"))
    assert [p.name for p in aside] == [f"step_{EVERY:06d}"] and (aside[0] / "COMPLETE").is_file(), aside
    own_eval = json.loads((aside[0] / "meta.json").read_text())["metrics"]
    assert own_eval["val_loss"] == eval_events(Path(bad["run_dir"]))[0]["val_loss"]
    # it trained on from the donor's weights with its own lr: far ahead of where the hopeless lr stood, and not a copy
    # of the donor's second half (the checkpoint's lr would have given the donor's losses bit for bit)
    assert bad["curve"][-1][1] > bad["curve"][0][1] + 0.1, bad["curve"]
    assert eval_events(Path(bad["run_dir"]))[-1]["val_loss"] != eval_events(Path(good["run_dir"]))[-1]["val_loss"]
    assert wait_no_trainers(str(sweep_dir)) == []


def test_killed_sweep_resumes_without_rerunning_finished_trials(
    digits_dir: Path, ray_address: str, tmp_path: Path
) -> None:
    # 30 steps: the second run must still be training when the test freezes it after its first checkpoint (step 5)
    sweep = write_sweep(
        tmp_path / "resume.yaml",
        digits_dir,
        name="resume",
        space={"optim.lr": {"grid": [2.0e-3, 1.0e-3]}},
        scheduler="fifo",
        overrides=[*trial_overrides(digits_dir), f"trainer.max_steps={LONG_STEPS}"],
    )
    sweep_dir = tmp_path / "resume"
    driver = Driver(sweep, tmp_path, ray_address)
    # SIGKILL the driver once the first trial finished and the second one has a checkpoint
    deadline = time.monotonic() + 300
    first = second = None
    while time.monotonic() < deadline and driver.proc.poll() is None:
        runs = sorted((sweep_dir / "trials").glob("*")) if (sweep_dir / "trials").is_dir() else []
        if len(runs) == 2:
            first, second = runs
            status = json.loads((first / "status.json").read_text()) if (first / "status.json").exists() else {}
            if status.get("state") == "finished" and list((second / "checkpoints").glob("step_*")):
                break
        time.sleep(0.2)
    assert driver.proc.poll() is None, "the sweep ended before it could be killed:\n" + driver.wait(1)[1][-3000:]
    assert first is not None and second is not None
    # Freeze the second run where it is (a test's SIGSTOP): the driver's death reaches the run through its trial's
    # heartbeat only, seconds during which the run would otherwise train on to its last step. Thawed once the
    # heartbeat is stale, the run checkpoints and stops by itself at the end of its step.
    pgid = os.getpgid(json.loads((second / "lease.json").read_text())["pid"])
    os.killpg(pgid, signal.SIGSTOP)
    driver.kill()
    alive = second / "sweep" / "alive"
    deadline = time.monotonic() + 120
    while time.time() - alive.stat().st_mtime < HEARTBEAT_TIMEOUT_S + 3:  # the killed driver's trials end with it
        assert time.monotonic() < deadline, "the trial's heartbeat went on after its driver was killed"
        time.sleep(0.5)
    os.killpg(pgid, signal.SIGCONT)
    assert wait_no_trainers(str(sweep_dir), timeout=60) == []
    finished_metrics = (first / "metrics.jsonl").read_bytes()
    finished_mtime = (first / "metrics.jsonl").stat().st_mtime_ns
    assert json.loads((second / "status.json").read_text())["state"] != "finished"

    # Ray Tune saves its state every few seconds but deletes surplus checkpoints at once, so the state a killed driver
    # left may name deleted checkpoints: the worst case, every Tune checkpoint gone, must resume from the run dirs
    for tune_ckpt in (sweep_dir / "tune").glob("run_trial_*/checkpoint_*"):
        shutil.rmtree(tune_ckpt)
    rc, log = Driver(sweep, tmp_path, ray_address, "--resume").wait(timeout=300)
    assert rc == 0, log[-4000:]
    # the finished trial did not run again; the interrupted one continued from its checkpoint to the end
    assert (first / "metrics.jsonl").read_bytes() == finished_metrics
    assert (first / "metrics.jsonl").stat().st_mtime_ns == finished_mtime
    assert (first / "sweep" / "train.log").read_text().count("=====") == 1
    assert (second / "sweep" / "train.log").read_text().count("=====") == 2
    assert "resum" in (second / "sweep" / "train.log").read_text().split("=====")[-1].lower()
    assert eval_steps(second) == list(range(EVERY, LONG_STEPS + 1, EVERY))
    summary = json.loads((sweep_dir / "summary.json").read_text())
    assert sorted(r["status"] for r in summary) == ["finished", "finished"]

    # without --resume an existing sweep is refused (exit 2), nothing touched
    rc, log = Driver(sweep, tmp_path, ray_address).wait(timeout=120)
    assert rc == 2 and "--resume" in log, log[-3000:]


def test_bad_search_space_key_exits_2_with_suggestion(digits_dir: Path, tmp_path: Path) -> None:
    sweep = write_sweep(tmp_path / "bad.yaml", digits_dir, name="bad", space={"optim.lrr": {"choice": [1.0e-3]}})
    result = subprocess.run(
        [sys.executable, "-m", "launch.cli", "sweep", str(sweep), "--output-dir", str(tmp_path)],
        cwd=tmp_path,
        env=sweep_env("unused"),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 2, result.stderr
    assert "unknown config key 'optim.lrr'" in result.stderr and "did you mean optim.lr" in result.stderr
    assert not (tmp_path / "bad").exists()


def need_slurm() -> None:
    """Skip (under CI=true: fail) unless the local Slurm answers; started here when we may (root: `make slurm-up`)."""
    scripts = REPO / "launch" / "local_slurm"

    def healthy() -> bool:
        return subprocess.run(["bash", str(scripts / "health.sh")], capture_output=True, timeout=150).returncode == 0

    why = "Slurm is not installed here (make slurm-up)" if shutil.which("sbatch") is None else None
    if why is None and not healthy():
        if os.geteuid() == 0:
            subprocess.run(["bash", str(scripts / "start.sh")], capture_output=True, timeout=600)
        why = None if healthy() else "the local Slurm is not running and cannot start here (make slurm-up)"
    if why is not None:
        if os.environ.get("CI") == "true":
            pytest.fail(f"CI must run the Slurm sweep test: {why}")
        pytest.skip(why)


def test_slurm_trial_stopped_at_a_rung_trains_no_further(digits_dir: Path, ray_address: str, tmp_path: Path) -> None:
    # ASHA on the Slurm backend, one trial at a time: the good lr passes the only rung (the first eval) alone, then the
    # hopeless lr's val_loss there is worse than the good one's, so ASHA stops it at the rung. Its job must train no
    # further than that eval: the run waits there for the decision and ends by itself with that step's checkpoint.
    # Every trial is a 2-node job (one rank on each node of the local cluster), as our users' trials are.
    need_slurm()
    sweep = write_sweep(
        tmp_path / "slurm.yaml",
        digits_dir,
        name="slurm",
        space={"optim.lr": {"grid": [2.0e-3, 1.0e-7]}},
        metric="val_loss",
        scheduler={"name": "asha", "grace_period": 1, "reduction_factor": 2},
        stop_grace_s=60,
        trial_backend="slurm",
        slurm={"profile": "local", "nodes": 2, "cpus_per_task": 1, "mem_gb": 1, "timeout_min": 10},
    )
    rc, log = Driver(sweep, tmp_path, ray_address).wait(timeout=420)
    assert rc == 0, log[-4000:]
    by_lr = {r["params"]["optim.lr"]: r for r in json.loads((tmp_path / "slurm" / "summary.json").read_text())}
    good, bad = by_lr[2.0e-3], by_lr[1.0e-7]
    assert (good["status"], good["step"], bad["status"]) == ("finished", MAX_STEPS, "stopped"), by_lr
    assert eval_steps(Path(good["run_dir"])) == [EVERY, MAX_STEPS]
    run_dir = Path(bad["run_dir"])
    status = json.loads((run_dir / "status.json").read_text())
    assert status["state"] == "stopped" and status["step"] == EVERY and status["slurm_job_id"], status
    for trial in (good, bad):  # each trial's job ran one rank on each of the 2 nodes
        starts = [e for e in read_job_events(trial["run_dir"]) if e["event"] == "start"]
        assert [(len(e["hosts"]), e["world_size"]) for e in starts] == [(2, 2)], starts
    assert max(e["step"] for e in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines())) == EVERY
    assert (run_dir / "checkpoints" / "latest").read_text().strip() == f"step_{EVERY:06d}"
