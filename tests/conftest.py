"""Shared fixtures: the digits shards built once per session, a CPU-only environment for multi-process runs, skips.

``digits_dir`` builds the real scikit-learn digits shards (~1,500 train / ~300 val, 32x32 PNG) in a session tmp dir
with the project's own writer, so tests that train read real tar shards through the real loader.
"""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent

# Without a GPU, Triton kernels run under its interpreter, which must be on before any module defining a kernel is
# imported (pretrain.models.set_whitening imports the Triton whitening at import time): here, not in the test modules
# that run kernels, so that running any subset of the tests in any order works.
if shutil.which("nvidia-smi") is None:
    os.environ.setdefault("TRITON_INTERPRET", "1")

__all__ = ["REPO", "train_env"]


def train_env(**extra: str) -> dict[str, str]:
    """Environment for a `pretrain train` subprocess: CPU DeepSpeed, no stray launcher variables, quiet."""
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("SLURM_", "PMI_", "OMPI_"))
        and k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
    }
    env.update(DS_ACCELERATOR="cpu", PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    env.update(PYTHONFAULTHANDLER="1")  # a hung run killed by a test (SIGABRT) leaves every rank's stack in its log
    # PATH is left alone on purpose: torch JIT-builds DeepSpeed's CPU op with the first `ninja` on PATH, and the venv's
    # pip ninja and the system ninja disagree on the build log, so switching between them rebuilds the op (~1 min).
    env.update(extra)
    return env


# The tiny 2-rank digits run shared by the training and Slurm integration tests (the Slurm tests compare a submitted
# job against `pretrain train --nproc 2` with exactly these overrides).
TINY_RUN_STEPS = 20


def tiny_run_overrides(data: Path, out: Path, name: str, *extra: str) -> list[str]:
    return [
        f"data.path={data}",
        f"run.output_dir={out}",
        f"run.name={name}",
        f"trainer.max_steps={TINY_RUN_STEPS}",
        "trainer.eval_every_steps=10",
        "trainer.log_every_steps=1",
        "trainer.progress_bar=false",
        "data.batch_size=16",
        "data.val_batch_size=64",
        "schedule.warmup_steps=5",
        "checkpoint.every_steps=4",
        "checkpoint.every_minutes=0",
        "checkpoint.keep_last=3",
        "checkpoint.keep_best=0",
        *extra,
    ]


@pytest.fixture(scope="session")
def scratch_root() -> Path:
    """A private temp folder for the session, outside pytest's numbered ``tmp_path`` dirs.

    pytest keeps only the 3 newest ``pytest-N`` base dirs of a user and deletes older ones when a session starts, so a
    concurrent pytest session (another developer on a shared machine) can delete the data or run dir of a training
    that is still running here. Multi-minute training tests therefore work in this folder instead.
    """
    import tempfile

    root = Path(tempfile.mkdtemp(prefix="vitpretrain-tests-"))
    yield root
    shutil.rmtree(root, ignore_errors=True)


@pytest.fixture
def run_root(scratch_root: Path, request: pytest.FixtureRequest) -> Path:
    """A fresh folder per test under :func:`scratch_root` (use it for ``run.output_dir``)."""
    import tempfile

    return Path(tempfile.mkdtemp(prefix=f"{request.node.name[:40]}-", dir=scratch_root))


@pytest.fixture(scope="session")
def digits_dir() -> Path:
    """The digits data set as WebDataset shards (several shards per split), built once per test session and shared by
    its workers. Read only."""
    from data_pipeline.writer import build_shards

    def build(out: Path) -> None:
        build_shards("digits", out, max_samples_per_shard=200, workers=1, progress=False)
        assert (out / "manifest.json").is_file()

    return built_once("digits", build)


@pytest.fixture(scope="session")
def deepspeed_cpu_ops() -> None:
    """Build (or load from the cache) DeepSpeed's CPU communication op once, before any rank needs it.

    Every DeepSpeed process on CPU JIT-loads ``deepspeed_shm_comm`` (a ~1-2 min C++ build the first time on a fresh
    machine, cached in ~/.cache/torch_extensions afterwards). Building it here, in one process, keeps that minute out
    of the first training test's timeout and avoids two ranks racing for the build lock.
    """
    import subprocess

    def build(_: Path) -> None:
        code = "from deepspeed.comm.torch import build_shm_op; build_shm_op()"  # what DeepSpeed's comm backend calls
        try:
            subprocess.run([sys.executable, "-c", code], env=train_env(), timeout=900, capture_output=True, check=False)
        except subprocess.TimeoutExpired:  # the ranks will report it; don't fail here
            pass

    built_once("deepspeed_cpu_ops", build)  # once per session, not per worker


_SHARED_ENV = "VITPRETRAIN_TESTS_SHARED"
"""A folder the pytest-xdist workers of one session share (the controller makes it; workers inherit the variable)."""
_shared_owner = pytest.StashKey[str]()


def pytest_configure(config: pytest.Config) -> None:
    if _SHARED_ENV not in os.environ:  # the controller, or a run without workers: it owns the folder
        import tempfile

        os.environ[_SHARED_ENV] = tempfile.mkdtemp(prefix="vitpretrain-tests-shared-")
        config.stash[_shared_owner] = os.environ[_SHARED_ENV]


def pytest_unconfigure(config: pytest.Config) -> None:
    shared = config.stash.get(_shared_owner, None)
    if shared is not None:
        shutil.rmtree(shared, ignore_errors=True)
        os.environ.pop(_SHARED_ENV, None)


def built_once(name: str, build) -> Path:
    """``<shared folder>/<name>``, made by ``build(path)`` in the first worker of the session that asks for it; the
    other workers wait for it (a lock file) and then read it. A build that failed is started again from scratch."""
    import fcntl

    shared = Path(os.environ[_SHARED_ENV])
    path, done = shared / name, shared / f"{name}.done"
    with open(shared / f"{name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes
        if not done.exists():
            shutil.rmtree(path, ignore_errors=True)
            build(path)
            done.touch()
    return path


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """CI-aware skips: `gpu` tests need CUDA; `slurm` tests need `sbatch` (the local Slurm started by make test)."""
    have_slurm = shutil.which("sbatch") is not None
    in_ci = os.environ.get("CI", "").lower() in ("1", "true", "yes")  # under CI a missing Slurm fails, never skips
    try:
        import torch

        have_gpu = torch.cuda.is_available()
    except ImportError:  # pragma: no cover
        have_gpu = False
    for item in items:
        if "gpu" in item.keywords and not have_gpu:
            item.add_marker(pytest.mark.skip(reason="needs a CUDA device"))
        if "slurm" in item.keywords and not have_slurm and not in_ci:
            item.add_marker(pytest.mark.skip(reason="needs Slurm (make slurm-up)"))


def dump_stacks(group: int) -> None:
    """SIGABRT to each process of process group ``group``, newest first (data workers, then ranks, then the launcher,
    whose death would take its ranks along) and one at a time, so that their faulthandler stacks (PYTHONFAULTHANDLER=1
    in train_env) do not interleave in the log they share."""
    import signal
    import time

    members = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()  # after "pid (comm)": state, ppid, pgrp, ...
        except OSError:
            continue
        if int(fields[2]) == group:
            members.append(int(stat.parent.name))
    for pid in sorted(members, reverse=True):
        try:
            os.kill(pid, signal.SIGABRT)
        except ProcessLookupError:
            continue
        time.sleep(0.5)


class TrainRun:
    """`pretrain train` as a real subprocess (its own process group, so a test can SIGKILL the whole run)."""

    def __init__(self, argv: list[str], cwd: Path, log: Path, env: dict[str, str] | None = None):
        import subprocess

        self.argv = argv
        self.log_path = log
        self._log = open(log, "ab")
        self.proc = subprocess.Popen(
            argv, cwd=cwd, env=env or train_env(), stdout=self._log, stderr=subprocess.STDOUT, start_new_session=True
        )

    def wait(self, timeout: float = 240.0) -> int:
        """Exit code of the run; a run still alive after ``timeout`` is killed (whole group) and fails with its log."""
        import subprocess

        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            dump_stacks(self.proc.pid)
            self.kill_all()
            self.proc.wait(timeout=30)
            self._log.flush()
            tail = self.log_path.read_text(errors="replace")[-100_000:]  # every process's stack
            raise AssertionError(f"{' '.join(self.argv[-6:])}: still running after {timeout:.0f} s\n{tail}") from None
        finally:
            self._log.close()

    def kill_all(self, sig: int | None = None) -> None:
        """Signal the whole process group (launcher, ranks, data workers); SIGKILL by default."""
        import signal

        try:
            os.killpg(self.proc.pid, sig or signal.SIGKILL)
        except ProcessLookupError:
            pass

    @property
    def output(self) -> str:
        return self.log_path.read_text(errors="replace")


@pytest.fixture(scope="session")
def start_train(scratch_root: Path, deepspeed_cpu_ops: None):
    """``start_train(config, overrides, *flags, env=None) -> TrainRun``; every run still alive at session end is
    SIGKILLed."""
    runs: list[TrainRun] = []
    logs = scratch_root / "train_logs"
    logs.mkdir()

    def start(config: str | Path, overrides: list[str], *flags: str, env: dict[str, str] | None = None) -> TrainRun:
        argv = [sys.executable, "-m", "launch.cli", "train", str(config), *overrides, *flags]
        run = TrainRun(argv, REPO, logs / f"run{len(runs)}.log", env)
        runs.append(run)
        return run

    yield start
    for r in runs:
        if r.proc.poll() is None:
            r.kill_all()
            r.proc.wait(timeout=30)


@pytest.fixture(scope="session")
def tiny_reference(digits_dir: Path, start_train) -> Path:
    """The run dir of the uninterrupted tiny run (:func:`tiny_run_overrides`, ``--nproc 2``), trained once per session
    (shared by its workers) for the resume, trust, export and Slurm tests that compare their runs with it. Read only: a
    test that changes it works on a copy."""

    def build(out: Path) -> None:
        overrides = tiny_run_overrides(digits_dir, out, "ref")
        run = start_train("configs/run/digits_sepvit_lite.yaml", overrides, "--nproc", "2")
        assert run.wait() == 0, run.output[-5000:]
        assert "val_top1=" in run.output and "tensorboard --logdir" in run.output  # the summary the run ends with

    return built_once("tiny_reference", build) / "ref"
