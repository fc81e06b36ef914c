"""The README's "Shards in an object store" section, run as a user runs it, against an S3-compatible store here.

The store is moto's S3 server (a real HTTP S3 API on 127.0.0.1) behind a proxy that answers every 10th request with
503 and drops every 17th connection without an answer: a flaky store. As the README tells the user,
``AWS_ENDPOINT_URL`` points at it (the one line of the section that names the user's own store) and the section's
commands run as written, in a fresh copy of the repository, with only the length of the training run cut
(``section.field=value`` arguments). The 2-rank run from the bucket is SIGKILLed after its step-8 checkpoint and the
same command started again; it must log the same losses and end with the same weights as the same run from the same
shards on local disk, with the retried requests counted in its metrics. Then ``pretrain eval`` scores it from the
bucket.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest
import s3fs
import torch
from conftest import REPO, dump_stacks, train_env
from remote_servers import FaultProxy, moto_s3, s3_env

from pretrain.fsutil import read_jsonl
from pretrain.rundir import COMPLETE_MARKER

pytestmark = [pytest.mark.slow, pytest.mark.world_size(2)]

STEPS = 20
SHORT = [  # the length of the runs, cut as tests/integration/test_readme.py cuts it
    f"trainer.max_steps={STEPS}",
    "trainer.eval_every_steps=10",
    "trainer.log_every_steps=1",
    "trainer.progress_bar=false",
    "checkpoint.every_steps=4",
    "checkpoint.every_minutes=0",
    "schedule.warmup_steps=5",
]


def section_commands() -> list[str]:
    """The ``pretrain ...`` lines of the section's first bash block, as written."""
    text = (REPO / "README.md").read_text()
    section = text.split("## Shards in an object store", 1)[1].split("\n## ", 1)[0]
    block = section.split("```bash\n", 1)[1].split("```", 1)[0]
    assert "export AWS_ENDPOINT_URL=" in block
    return [line for line in block.splitlines() if line.startswith("pretrain ")]


def run(cwd: Path, env: dict[str, str], line: str, *extra: str, timeout: float = 600) -> subprocess.CompletedProcess:
    """A README line in bash (its comment included), the venv's commands first on PATH. A command still running after
    ``timeout`` fails the test with every process's Python stack (see ``dump_stacks``)."""
    cmd = line.split("  #", 1)[0].strip() + "".join(f" {e}" for e in extra)
    with subprocess.Popen(["bash", "-c", cmd], cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          text=True, start_new_session=True) as proc:  # fmt: skip
        try:
            stdout, stderr = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            dump_stacks(proc.pid)
            os.killpg(proc.pid, signal.SIGKILL)
            stdout, stderr = proc.communicate()
            stacks = f"{stdout[-3000:]}\n{stderr[-100_000:]}"
            raise AssertionError(f"{cmd}: still running after {timeout:.0f} s\n{stacks}") from None
    return subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr)


def explain(out: subprocess.CompletedProcess) -> str:
    return f"exit {out.returncode}\n--- stdout\n{out.stdout[-3000:]}\n--- stderr\n{out.stderr[-6000:]}"


def losses(run_dir: Path) -> dict[int, float]:
    return {e["step"]: e["loss"] for e in read_jsonl(run_dir / "metrics.jsonl") if e.get("event") == "train"}


def weights(run_dir: Path) -> dict[str, torch.Tensor]:
    path = run_dir / "checkpoints" / f"step_{STEPS:06d}" / "mp_rank_00_model_states.pt"
    return torch.load(path, map_location="cpu", weights_only=False)["module"]


@pytest.fixture(scope="module")
def clone(tmp_path_factory: pytest.TempPathFactory, deepspeed_cpu_ops: None) -> Path:
    """A fresh copy of the repository (tracked and untracked-but-not-ignored files), the installed venv linked."""
    root = tmp_path_factory.mktemp("objstore") / "vitpretrain"
    files = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=REPO,
        capture_output=True,
        check=True,
    ).stdout.split(b"\0")
    for name in filter(None, (f.decode() for f in files)):
        if (REPO / name).is_file():
            (root / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / name, root / name)
    (root / ".venv").symlink_to(REPO / ".venv", target_is_directory=True)
    return root


@pytest.fixture(scope="module")
def flaky_store() -> tuple[str, FaultProxy]:
    """moto's S3 server with the bucket ``my-bucket``, behind the fault-injecting proxy; yields both endpoints."""
    with moto_s3() as endpoint, FaultProxy(endpoint, fail_every=10, drop_every=17) as px:
        s3fs.S3FileSystem(client_kwargs={"endpoint_url": endpoint}, key="testing", secret="testing").mkdir("my-bucket")
        yield endpoint, px


def test_readme_object_store_section_trains_resumes_and_evaluates_from_a_flaky_bucket(
    clone: Path, flaky_store: tuple[str, FaultProxy]
) -> None:
    _, proxy = flaky_store
    env = train_env(**s3_env(proxy.url))
    env.pop("OMP_NUM_THREADS")  # the user's shell: each rank takes its share of the CPUs
    env["PATH"] = f"{clone / '.venv' / 'bin'}{os.pathsep}{env['PATH']}"
    build, inspect, train, evaluate = section_commands()

    out = run(clone, env, build)
    assert out.returncode == 0, explain(out)
    out = run(clone, env, inspect)
    assert out.returncode == 0 and "OK: 2 shards match the manifest" in out.stdout, explain(out)

    # The same run from the same shards on local disk (the build is reproducible: same bytes, same sha256).
    local = clone.parent / "local-digits"
    out = run(clone, env, f"pretrain data build digits --out {local} --no-progress")
    assert out.returncode == 0, explain(out)
    ref = run(clone, env, train.replace("s3://my-bucket/digits", str(local)), *SHORT, "run.name=local_ref")
    assert ref.returncode == 0, explain(ref)

    # From the bucket: SIGKILLed after the step-8 checkpoint, then the same command again.
    cmd = train.split("  #", 1)[0].strip() + "".join(f" {e}" for e in SHORT)
    log = open(clone / "killed.log", "wb")  # noqa: SIM115 - closed below
    first = subprocess.Popen(["bash", "-c", cmd], cwd=clone, env=env, stdout=log, stderr=subprocess.STDOUT,
                             start_new_session=True)  # fmt: skip
    run_dir = clone / "runs" / "digits_sepvit_lite"
    marker = run_dir / "checkpoints" / "step_000008" / COMPLETE_MARKER
    deadline = time.monotonic() + 300
    while not marker.exists():
        assert first.poll() is None, (clone / "killed.log").read_text()[-4000:]
        assert time.monotonic() < deadline, "no step-8 checkpoint"
        time.sleep(0.05)
    os.killpg(first.pid, signal.SIGKILL)
    first.wait()
    log.close()
    assert 8 <= max(losses(run_dir)) < STEPS, "killed mid-run"
    again = run(clone, env, train, *SHORT)
    assert again.returncode == 0, explain(again)
    assert "resumed from" in again.stdout + again.stderr

    got, want = losses(run_dir), losses(clone / "runs" / "local_ref")
    assert sorted(got) == sorted(want) == list(range(1, STEPS + 1)), "every step logged exactly once"
    assert [s for s in want if got[s] != want[s]] == [], "the run from the bucket logs the local run's losses"
    a, b = weights(run_dir), weights(clone / "runs" / "local_ref")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    retried = [e.get("corrupt_retried_requests", 0) for e in read_jsonl(run_dir / "metrics.jsonl")]
    assert max(retried) > 0 and proxy.counts["fail"] > 0 and proxy.counts["drop"] > 0
    assert not any(k.startswith("corrupt_") and k != "corrupt_retried_requests" and v
                   for e in read_jsonl(run_dir / "metrics.jsonl") for k, v in e.items())  # fmt: skip

    out = run(clone, env, evaluate)
    assert out.returncode == 0, explain(out)
    assert re.search(r"on val \(300 samples\): top1 \d\.\d{4}", out.stdout), explain(out)
