"""`pretrain submit`/`status`/`cancel` against the real local Slurm (``make slurm-up``), real submitit, real training.

The local cluster has 2 nodes by default (n1, n2: one slurmd each on this host, names in /etc/hosts); the single-node
tests run on either, the multi-node ones need 2 (``SLURM_NODES=1 make slurm-up`` skips them, except under CI=true).
Runs are tiny (20 steps of 16 images per rank, 2 CPU ranks). Covered:

- a 2-task Slurm job preempted with ``scancel --signal=USR2`` checkpoints, requeues itself, resumes and ends with the
  same per-step losses, val top-1 and weights as ``pretrain train --nproc 2`` (so the Slurm run matches the local one
  and the resume is exact); the preemption does not use up the timeout budget (``--max-timeout-requeues 0``);
- a 1-task job reaching its time limit (``--time-min 1``) checkpoints through the trainer's signal path, is requeued
  as a timeout, resumes from that checkpoint; then ``pretrain cancel`` ends it and ``pretrain status`` says cancelled;
- a job whose training cannot start on the node is shown as failed by ``pretrain status`` with its log tail;
- bad parameters (unknown partition, too many nodes, zero nodes, missing config) exit 2 and submit nothing;
- multi-node: a 3-task ``srun`` over 2 nodes finds its ranks, per-node local ranks and the first node as rendezvous
  from Slurm's variables alone, and joins one process group; a ``--nodes 2`` job (one rank per node) matches
  ``pretrain train --nproc 2`` loss for loss, and preempted with USR2 it checkpoints on both nodes, requeues and
  resumes exactly.

Requeued jobs wait ~2 min (Slurm's cred_expire) before they are eligible: the tests release them with
``scontrol update jobid=J StartTime=now``. Without a working Slurm the tests skip, except under CI=true where they fail.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import REPO, TINY_RUN_STEPS, tiny_run_overrides, train_env

from launch.cli import main as cli_main
from launch.status import read_job_events, read_run_status, slurm_job_info, slurm_partitions
from pretrain.checkpoint import step_from_tag, verify_checkpoint
from pretrain.fsutil import read_jsonl
from pretrain.rundir import COMPLETE_MARKER

pytestmark = [pytest.mark.slow, pytest.mark.world_size(2)]

CONFIG = "configs/run/digits_sepvit_lite.yaml"
MAX_STEPS = TINY_RUN_STEPS
LOCAL_SLURM = REPO / "launch" / "local_slurm"


# ---------------------------------------------------------------------------------------------------------- helpers


def _unavailable(reason: str) -> None:
    if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
        pytest.fail(f"CI=true and the local Slurm is needed: {reason}")
    pytest.skip(reason)


def _healthy() -> bool:
    try:
        return subprocess.run(["bash", str(LOCAL_SLURM / "health.sh")], timeout=150).returncode == 0
    except subprocess.TimeoutExpired:
        return False


@pytest.fixture(scope="module")
def slurm():
    """The local Slurm is up (started here when its packages are installed and we are root); jobs left are cancelled."""
    if shutil.which("sbatch") is None:
        _unavailable("Slurm is not installed: run `make slurm-up` (as root)")
    if not _healthy():
        if os.geteuid() != 0:
            _unavailable("the local Slurm is not running and starting it needs root: `sudo make slurm-up`")
        start = subprocess.run(["bash", str(LOCAL_SLURM / "start.sh")], capture_output=True, text=True, timeout=600)
        if start.returncode != 0 or not _healthy():
            _unavailable(f"the local Slurm cannot start:\n{start.stdout}\n{start.stderr}")
    jobs: list[str] = []
    yield jobs
    for job_id in jobs:  # a failed test must not leave a job holding the node
        subprocess.run(["scancel", job_id], capture_output=True, timeout=30)


def queued_job_ids() -> set[str]:
    out = subprocess.run(["squeue", "-h", "-o", "%i"], capture_output=True, text=True, timeout=30, check=True)
    return set(out.stdout.split())


def job_id_of(run_dir: Path, timeout: float = 120.0, proc: subprocess.Popen | None = None) -> str:
    def submitted():
        return [e for e in read_job_events(run_dir) if e.get("event") == "submit"]

    wait_for(lambda: submitted(), timeout, "the submit record", proc)
    return str(submitted()[-1]["job_id"])


def wait_for(predicate, timeout: float, what: str, proc: subprocess.Popen | None = None, job_id: str | None = None):
    """Poll ``predicate``; meanwhile release a requeued job waiting for its begin time (Slurm holds it ~2 min)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"`pretrain submit` exited ({proc.returncode}) before {what}")
        if job_id is not None:
            info = slurm_job_info(job_id)
            if info is not None and info.state == "PENDING" and info.reason == "BeginTime":
                subprocess.run(["scontrol", "update", f"jobid={job_id}", "StartTime=now"], check=True, timeout=30)
        time.sleep(0.2)
    raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}")


def train_events(run_dir: Path) -> list[dict]:
    return [e for e in read_jsonl(run_dir / "metrics.jsonl") if e.get("event") == "train"]


def losses(run_dir: Path) -> dict[int, float]:
    return {e["step"]: e["loss"] for e in train_events(run_dir)}


def val_top1(run_dir: Path) -> dict[int, float]:
    return {e["step"]: e["val_top1"] for e in read_jsonl(run_dir / "metrics.jsonl") if e.get("event") == "eval"}


def final_weights(run_dir: Path) -> dict[str, torch.Tensor]:
    tag_dir = run_dir / "checkpoints" / f"step_{MAX_STEPS:06d}"
    return torch.load(tag_dir / "mp_rank_00_model_states.pt", map_location="cpu", weights_only=False)["module"]


def slurm_logs(run_dir: Path, job_id: str) -> str:
    return "".join(p.read_text(errors="replace") for p in sorted((run_dir / "slurm").glob(f"{job_id}_*_log.*")))


def submit_in_process(capsys, *argv: str) -> tuple[int, str, str]:
    code = cli_main(["submit", *argv])
    out, err = capsys.readouterr()
    return code, out, err


# ------------------------------------------------------------------------------------------------------------ tests


def test_a_task_with_two_cpus_per_task_trains_with_two_threads(slurm) -> None:
    # The local Slurm runs TaskPlugin=task/none, so the task's affinity mask is the whole node: only
    # SLURM_CPUS_PER_TASK tells a rank its share. A rank must take exactly that, whatever the machine has.
    probe = (
        "from pretrain.distributed import destroy_distributed, init_distributed\n"
        "init_distributed(device='cpu')\n"
        "import torch; print('threads', torch.get_num_threads())\n"
        "destroy_distributed()\n"
    )
    env = train_env()
    env.pop("OMP_NUM_THREADS")
    for cpus in (1, 2):
        out = subprocess.run(
            ["srun", "-N1", "-n1", f"--cpus-per-task={cpus}", "--time=5", sys.executable, "-c", probe],
            env=env,
            capture_output=True,
            text=True,
            timeout=180,
        )
        assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
        assert f"threads {cpus}" in out.stdout.splitlines(), out.stdout


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--partition", "nosuch"], "unknown partition 'nosuch'"),
        (["--nodes", "99"], "--nodes=99 but partition 'debug' has {debug_nodes} node(s)"),
        (["--nodes", "0"], "nodes=0 must be >= 1"),
        (["--config-missing"], "does not exist"),
    ],
)
def test_bad_parameters_exit_2_and_submit_nothing(slurm, digits_dir, tmp_path, capsys, argv, message):
    before = queued_job_ids()
    config = CONFIG
    if argv == ["--config-missing"]:
        config, argv = str(tmp_path / "missing.yaml"), []
    code, out, err = submit_in_process(
        capsys, config, *tiny_run_overrides(digits_dir, tmp_path, "bad"), "--profile", "local", *argv
    )
    assert code == 2, (out, err)
    assert message.format(debug_nodes=slurm_partitions()["debug"]) in err
    assert queued_job_ids() <= before, "a job was submitted"
    assert not (tmp_path / "bad").exists(), "the run directory was created"


def test_job_that_fails_at_start_is_shown_failed_with_its_log(slurm, tmp_path, capsys):
    # data only "visible on the compute nodes" (here: nowhere): submit warns, the job fails when training starts
    data = tmp_path / "not_built"
    run_args = tiny_run_overrides(data, tmp_path, "crash")
    code, out, err = submit_in_process(capsys, CONFIG, *run_args, "--profile", "local")
    assert code == 0, err
    assert "has no manifest.json on this machine" in err
    run_dir = tmp_path / "crash"
    job_id = job_id_of(run_dir)
    slurm.append(job_id)
    assert f"job {job_id} submitted to slurm" in out and f"run dir: {run_dir}" in out

    wait_for(lambda: read_run_status(run_dir).state == "failed", 120, "the job to fail")
    assert cli_main(["status", str(run_dir)]) == 0
    shown = capsys.readouterr().out
    assert "state:      failed" in shown
    assert f"slurm job {job_id}: FAILED" in shown
    assert "not_built: no such folder" in shown  # the reason, from the job's own record
    assert "error log:" in shown and "RuntimeError: config error at start" in shown  # the log tail
    assert cli_main(["status", str(run_dir), "--json"]) == 0
    status = json.loads(capsys.readouterr().out)
    assert status["state"] == "failed" and status["slurm_state"] == "FAILED" and status["error_tail"]


@pytest.fixture(scope="module")
def reference(tiny_reference: Path) -> Path:
    """The uninterrupted run with `pretrain train --nproc 2` (the session's, shared with the resume tests)."""
    return tiny_reference


def run_preempted_job(
    slurm, digits_dir: Path, tmp_path: Path, name: str, *flags: str, overrides: tuple[str, ...] = ()
) -> tuple[Path, str]:
    """Submit the tiny run (``--wait``), USR2 the job at step 6, follow it through the requeue; (run dir, job id)."""
    run_dir = tmp_path / name
    argv = [sys.executable, "-m", "launch.cli", "submit", CONFIG, *tiny_run_overrides(digits_dir, tmp_path, name)]
    argv += list(overrides)
    argv += ["--profile", "local", "--max-timeout-requeues", "0", "--wait", *flags]
    log = tmp_path / f"{name}.submit.log"
    with open(log, "wb") as f:
        proc = subprocess.Popen(argv, cwd=REPO, env=train_env(), stdout=f, stderr=subprocess.STDOUT)
    try:
        job_id = job_id_of(run_dir, proc=proc)
        slurm.append(job_id)
        wait_for(lambda: any(e["step"] >= 6 for e in train_events(run_dir)), 240, "step 6", proc)
        subprocess.run(["scancel", "--signal=USR2", job_id], check=True, timeout=30)
        wait_for(lambda: proc.poll() is not None, 240, "the run to finish after the requeue", job_id=job_id)
    finally:
        if proc.poll() is None:
            proc.kill()
    output = log.read_text(errors="replace")
    assert proc.returncode == 0, output[-5000:]
    assert "run finished, val_top1=" in output
    return run_dir, job_id


def assert_same_run_as(run_dir: Path, reference: Path) -> None:
    """The whole logged train series (all but the timing fields), val top-1 and final weights are the reference's."""
    series_keys = ("step", "loss", "lr", "grad_norm", "epoch")
    got = [{k: e[k] for k in series_keys} for e in train_events(run_dir)]
    want = [{k: e[k] for k in series_keys} for e in train_events(reference)]
    assert [e["step"] for e in got] == list(range(1, MAX_STEPS + 1)), "every step logged exactly once"
    assert got == want, [(g, w) for g, w in zip(got, want, strict=False) if g != w][:5]
    assert val_top1(run_dir) == val_top1(reference)
    a, b = final_weights(run_dir), final_weights(reference)
    assert [k for k in a if not torch.equal(a[k], b[k])] == []


def test_preempted_job_requeues_resumes_and_matches_nproc2(slurm, reference, digits_dir, tmp_path):
    run_dir, job_id = run_preempted_job(slurm, digits_dir, tmp_path, "preempt")
    events = read_job_events(run_dir)
    requeues = [e for e in events if e["event"] == "requeue"]
    assert [r["reason"] for r in requeues] == ["preemption"], events
    ckpt = requeues[0]["checkpoint"]
    assert requeues[0]["step"] >= 6 and step_from_tag(Path(ckpt).name) == requeues[0]["step"]
    assert [e["slurm_restart_count"] for e in events if e["event"] == "start"] == [0, 1]
    logs = slurm_logs(run_dir, job_id)
    # budget 0 for timeouts, yet the preemption was requeued
    assert f"Requeued job {job_id} (0 remaining timeouts)" in logs
    assert f"resumed from {ckpt} at step {requeues[0]['step']}" in logs

    assert_same_run_as(run_dir, reference)  # the same run as `pretrain train --nproc 2`

    rs = read_run_status(run_dir)
    assert (rs.state, rs.job_id, rs.slurm_state, rs.restarts) == ("finished", job_id, "COMPLETED", 1)
    assert rs.requeues[0]["reason"] == "preemption"
    assert json.loads((run_dir / "status.json").read_text())["slurm_job_id"] == job_id


def test_time_limit_checkpoints_requeues_and_resumes_then_cancel(slurm, digits_dir, tmp_path, capsys):
    # a long run with no periodic checkpoints: the only checkpoint can come from the time-limit signal. One task: the
    # job trains flat out for up to a minute before Slurm's time-limit tick, and 2-task jobs (the preemption tests)
    # already show that every rank takes the signal and checkpoints together
    long_run = tiny_run_overrides(
        digits_dir, tmp_path, "timeout", "trainer.max_steps=2000", "trainer.eval_every_steps=0"
    )
    long_run += ["checkpoint.every_steps=1000"]
    flags = ["--profile", "local", "--tasks-per-node", "1", "--time-min", "1", "--signal-delay-s", "5"]
    flags += ["--max-timeout-requeues", "2"]
    code, out, err = submit_in_process(capsys, CONFIG, *long_run, *flags)
    assert code == 0, err
    run_dir = tmp_path / "timeout"
    job_id = job_id_of(run_dir)
    slurm.append(job_id)

    def resumed_after_checkpointed_timeout() -> bool:
        events = read_job_events(run_dir)
        timeouts = [i for i, e in enumerate(events) if e["event"] == "requeue" and e.get("step")]
        if not timeouts:
            return False
        starts_after = [e for e in events[timeouts[0] :] if e["event"] == "start"]
        status = read_run_status(run_dir, query_slurm=False)
        step = events[timeouts[0]]["step"]
        return (
            bool(starts_after)
            and status.trainer_state == "running"
            and (status.resumes or 0) >= 1
            and ((status.step or 0) > step)
        )

    # Slurm checks time limits every 30 s: USR2 comes 25-55 s into each 1-minute attempt
    wait_for(resumed_after_checkpointed_timeout, 240, "a checkpointed timeout and the resumed attempt", job_id=job_id)
    requeue = next(e for e in read_job_events(run_dir) if e["event"] == "requeue" and e.get("step"))
    assert requeue["reason"] == "timeout"
    assert verify_checkpoint(requeue["checkpoint"])[0]
    assert step_from_tag(Path(requeue["checkpoint"]).name) == requeue["step"] < 1000  # written by the signal path
    logs = slurm_logs(run_dir, job_id)
    assert f"Requeued job {job_id} (1 remaining timeouts)" in logs  # the timeout used one of the two
    assert f"resumed from {requeue['checkpoint']}" in logs

    assert cli_main(["cancel", str(run_dir)]) == 0
    assert f"cancelled slurm job {job_id}" in capsys.readouterr().out
    wait_for(lambda: read_run_status(run_dir).state == "cancelled", 90, "the job to be cancelled")
    assert cli_main(["status", str(run_dir)]) == 0
    shown = capsys.readouterr().out
    assert "state:      cancelled" in shown and "(timeout at step" in shown


# ------------------------------------------------------------------------------------------------------ multi-node


def slurm_nodes() -> list[str]:
    out = subprocess.run(["sinfo", "-h", "-N", "-p", "debug", "-o", "%N"], capture_output=True, text=True, timeout=30)
    return sorted(set(out.stdout.split()))


@pytest.fixture(scope="module")
def two_nodes(slurm) -> list[str]:
    """The names of two nodes of the local cluster (``make slurm-up`` starts n1 and n2)."""
    nodes = slurm_nodes()
    if len(nodes) < 2:
        _unavailable(f"the local Slurm has {len(nodes)} node(s) ({nodes}); these tests need 2: make slurm-up")
    return nodes[:2]


PROBE = """
import json, os
from pretrain.distributed import all_gather_object, destroy_distributed, detect_environment, init_distributed
env = detect_environment()
init_distributed(device="cpu", env=env)
nodes = all_gather_object(os.environ["SLURMD_NODENAME"])  # a real collective across the nodes
print("PROBE", json.dumps(dict(rank=env.rank, world=env.world_size, local_rank=env.local_rank,
    local_world=env.local_world_size, addr=env.master_addr, port=env.master_port, source=env.source,
    node=os.environ["SLURMD_NODENAME"], nodes=nodes)), flush=True)
destroy_distributed()
"""


def test_srun_over_two_nodes_ranks_local_ranks_and_rendezvous_from_slurm(two_nodes):
    # 3 tasks on 2 nodes: an uneven layout (2 + 1), so each node must read its own task count, not the first node's
    nodelist = ",".join(two_nodes)
    out = subprocess.run(
        ["srun", "-N2", "-n3", "-w", nodelist, "--cpus-per-task=1", "--time=5", sys.executable, "-c", PROBE],
        cwd=REPO, env=train_env(), capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    tasks = sorted((json.loads(line.split(" ", 1)[1]) for line in out.stdout.splitlines() if line.startswith("PROBE")),
                   key=lambda t: t["rank"])  # fmt: skip
    assert [t["rank"] for t in tasks] == [0, 1, 2] and {t["world"] for t in tasks} == {3}
    assert {t["source"] for t in tasks} == {"slurm"}  # read from Slurm's variables, no launcher in between
    by_node = {n: [t for t in tasks if t["node"] == n] for n in two_nodes}
    assert sorted(len(ts) for ts in by_node.values()) == [1, 2], "ranks on both nodes"
    for ts in by_node.values():
        assert [t["local_rank"] for t in ts] == list(range(len(ts)))
        assert {t["local_world"] for t in ts} == {len(ts)}
    first = tasks[0]["node"]
    assert first == two_nodes[0]  # task 0 runs on the step's first node ...
    assert {(t["addr"], t["port"]) for t in tasks} == {(first, tasks[0]["port"])}  # ... the rendezvous of all
    assert all(t["nodes"] == [u["node"] for u in tasks] for t in tasks)


def task_log(run_dir: Path, job_id: str, task: int) -> str:
    return "".join(p.read_text(errors="replace") for p in sorted((run_dir / "slurm").glob(f"{job_id}_{task}_log.*")))


def test_two_node_job_matches_nproc2_and_resumes_exactly_after_usr2(slurm, two_nodes, reference, digits_dir, tmp_path):
    # one rank per node, the same global batch as `pretrain train --nproc 2`
    run_dir, job_id = run_preempted_job(
        slurm, digits_dir, tmp_path, "twonode", "--nodes", "2", "--tasks-per-node", "1",
        overrides=("checkpoint.keep_last=10",),  # keeps the checkpoint of the signal, to look at its files
    )  # fmt: skip
    events = read_job_events(run_dir)
    starts = [e for e in events if e["event"] == "start"]
    assert [(e["hosts"], e["world_size"], e["slurm_restart_count"]) for e in starts] == [
        (two_nodes, 2, 0),
        (two_nodes, 2, 1),
    ]
    for task in (0, 1):
        log = task_log(run_dir, job_id, task)
        # submitit's record of where the task ran: node <task> of 2, the only rank there, in both attempts
        assert log.count(f"local_rank=0(1), node={task}(2), global_rank={task}(2)") == 2, log[-3000:]
        assert "received SIGUSR2: stopping at the end of this step" in log  # the signal reached the rank on each node
    # rank 0 rendezvoused on the allocation's first node
    assert f"rank 0/2 (local 0/1) on {two_nodes[0]}, rendezvous {two_nodes[0]}:" in task_log(run_dir, job_id, 0)

    (requeue,) = [e for e in events if e["event"] == "requeue"]
    assert requeue["reason"] == "preemption" and requeue["step"] >= 6
    # the checkpoint written on the signal holds both ranks' shares (each rank hashed its own files)
    listed = json.loads((Path(requeue["checkpoint"]) / COMPLETE_MARKER).read_text())["files"]
    assert {"rank_00000.pt", "rank_00001.pt"} <= listed.keys()
    assert any(f.startswith("zero_pp_rank_0_") for f in listed) and any(f.startswith("zero_pp_rank_1_") for f in listed)
    assert f"resumed from {requeue['checkpoint']} at step {requeue['step']}" in slurm_logs(run_dir, job_id)

    assert_same_run_as(run_dir, reference)  # loss for loss, val top-1 and weights: `pretrain train --nproc 2`
    rs = read_run_status(run_dir)
    assert (rs.state, rs.slurm_state, rs.restarts) == ("finished", "COMPLETED", 1)
