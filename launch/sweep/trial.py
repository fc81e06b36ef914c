"""A sweep trial: a Ray Tune function trainable around one ``pretrain train`` run (a local process or a Slurm job).

:func:`run_trial` starts ``pretrain train BASE overrides... --nproc N`` with the trial's sampled values as overrides and
its own run dir ``<sweep>/trials/<trial_id>/``. The run waits at each eval (:mod:`pretrain.sweep_hook`); the trial
reads that eval and its checkpoint from the run's ``status.json`` and blocks in ``tune.report`` with
``tune.Checkpoint.from_directory`` on the run's own checkpoint (Ray Tune copies it and keeps the best
``keep_checkpoints``), then tells the run to continue. When Ray Tune stops or pauses the trial inside ``tune.report``,
the run is told to stop where it waits: a trial stopped at a rung trains no further, on both backends. A run whose
trial vanished (a killed driver) stops by itself once the trial's heartbeat is stale.

Resume. A restarted trial (``--resume``, a retry, a PBT exploit) first waits for its earlier run to end (the run dir's
lease), then starts the same command: ``pretrain train`` resumes from the run dir's newest checkpoint. When Ray Tune
hands over a checkpoint of another trial (PBT exploit) or the run dir has none, that checkpoint is copied into the run
dir first and becomes its newest.
"""

from __future__ import annotations

import json
import logging
import os
import shlex
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from launch.sweep.spec import SweepSpec, format_override
from pretrain.rundir import (
    CHECKPOINTS,
    COMPLETE_MARKER,
    SWEEP,
    lease_holder,
    read_latest,
    read_status,
    run_history,
    set_aside_history,
    write_atomic,
    write_latest,
)
from pretrain.sweep_hook import CONTINUE, STOP, Heartbeat, decide, install_hook, request_stop, waiting_step

__all__ = ["HEARTBEAT_TIMEOUT_S", "newest_checkpoint", "note", "run_trial", "slurm_params", "submit_slurm_trial"]

logger = logging.getLogger(__name__)


HEARTBEAT_TIMEOUT_S = 15.0
"""A local run whose trial has not beaten (every second) for this long stops by itself."""
SLURM_HEARTBEAT_TIMEOUT_S = 120.0
"""The same for a Slurm trial: its run reads the heartbeat's mtime over a shared file system, whose attribute cache
(NFS ``actimeo``: up to 60 s) can show an older mtime than the trial wrote."""


def note(run_dir: Path, msg: str, *args: Any) -> None:
    """Log ``msg`` and append it to the trial's ``sweep/trial.log`` (what the sweep did to this run, and when)."""
    logger.info(msg, *args)
    with open(run_dir / SWEEP / "trial.log", "a") as f:
        f.write(f"{time.strftime('%Y-%m-%d %H:%M:%S')} {msg % args if args else msg}\n")


def newest_checkpoint(run_dir: str | Path) -> Path | None:
    """The complete checkpoint ``checkpoints/latest`` names, or None."""
    root = Path(run_dir) / CHECKPOINTS
    tag = read_latest(root)
    return root / tag if tag and (root / tag / COMPLETE_MARKER).is_file() else None


def slurm_params(options: dict[str, Any], nproc: int) -> Any:
    """``ClusterParams`` of a trial job: ``options`` (``profile`` plus ClusterParams keys), one task per rank (one GPU
    per rank when ``gpus_per_node`` is set).

    Raises:
        ConfigError: an unknown profile or key (with close matches), or a bad value.
    """
    from launch.cluster_params import load_cluster_params  # noqa: PLC0415 - only the Slurm backend needs it

    opts = {"cluster": "slurm", **options}
    profile = opts.pop("profile", None)
    if profile is not None and "cluster" not in options:
        opts.pop("cluster")
    opts["gpus_per_node" if opts.get("gpus_per_node") else "tasks_per_node"] = nproc
    return load_cluster_params(profile, **opts)


def submit_slurm_trial(base: str, overrides: list[str], params: Any) -> Any:
    """Submit one trial's run as ``pretrain submit`` does (a Checkpointable ``TrainJob``); returns the submitit job."""
    from launch import submit  # noqa: PLC0415

    return submit.submit_plan(submit.validate_run(base, overrides, params), params, argv=["pretrain sweep (trial)"])


class _LocalRun:
    """``pretrain train`` as a process of this machine; its output goes to ``sweep/train.log``.

    Ray SIGKILLs the direct children of a trial's worker when the worker ends (a stopped trial, a killed driver), which
    would kill the run anywhere, even while torch builds an extension (its lock would stay behind). So the run starts
    one process further down (the shell below returns at once) and ends by itself: at its trial's decision, or at a
    step boundary once its trial is gone (:mod:`pretrain.sweep_hook`). The shell records its pid and exit code.
    """

    def __init__(self, spec: SweepSpec, overrides: list[str], run_dir: Path):
        self.spec, self.run_dir, self.folder = spec, run_dir, run_dir / SWEEP
        self.cmd = [sys.executable, "-m", "launch.cli", "train", spec.base, *overrides]
        self.cmd += ["--nproc", str(spec.resources.nproc)]
        life = f"{os.getpid()}.{time.monotonic_ns()}"  # a late exit code of an earlier life must not speak for this one
        self.pid_file, self.exit_file = self.folder / f"pid.{life}", self.folder / f"exit_code.{life}"

    def start(self) -> None:
        for old in [*self.folder.glob("pid.*"), *self.folder.glob("exit_code.*")]:
            old.unlink(missing_ok=True)
        log = self.folder / "train.log"
        now = time.time()
        stamp = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(now)) + f".{int(now % 1 * 1000):03d}"
        with open(log, "a") as f:
            f.write(f"\n===== {stamp} {' '.join(self.cmd)}\n")
        q = shlex.quote
        script = (f"({shlex.join(self.cmd)} >>{q(str(log))} 2>&1 </dev/null & echo $! >{q(str(self.pid_file))}; "
                  f"wait $!; echo $? >{q(str(self.exit_file))}) &")  # fmt: skip
        # the ranks share the trial's CPUs: `pretrain train` divides OMP_NUM_THREADS among them
        env = {**os.environ, "OMP_NUM_THREADS": str(max(1, int(self.spec.resources.cpu)))}
        subprocess.run(["sh", "-c", script], cwd=self.spec.workdir or None, env=env, check=True,
                       stdin=subprocess.DEVNULL, start_new_session=True)  # fmt: skip
        note(self.run_dir, "started the run")

    def poll(self) -> int | None:
        for _ in range(2):
            try:
                return int(self.exit_file.read_text())
            except (OSError, ValueError):
                pass
            try:
                os.kill(int(self.pid_file.read_text()), 0)
                return None
            except (OSError, ValueError) as e:
                if not isinstance(e, ProcessLookupError):
                    return None  # not started yet
            time.sleep(0.5)  # ended: its exit code follows at once (unless its shell was killed too)
        return -1

    def signal_stop(self) -> None:
        """SIGTERM to the launcher only (it forwards it to the ranks): a compiler it runs is not interrupted."""
        try:
            os.kill(int(self.pid_file.read_text()), signal.SIGTERM)
        except (OSError, ValueError):
            pass

    def describe_failure(self, rc: int) -> str:
        return f"training exited with code {rc}; see {self.folder / 'train.log'}"


class _SlurmRun:
    """``pretrain train`` as a Slurm job (``launch.submit.TrainJob``); its run dir is on a shared file system."""

    def __init__(self, spec: SweepSpec, overrides: list[str], run_dir: Path):
        self.spec, self.overrides, self.run_dir, self.job = spec, overrides, run_dir, None

    def start(self) -> None:
        params = slurm_params(self.spec.slurm, self.spec.resources.nproc)
        self.job = submit_slurm_trial(self.spec.base, self.overrides, params)
        note(self.run_dir, "submitted the run as Slurm job %s", self.job.job_id)

    def poll(self) -> int | None:
        """0 when the run finished, 1 when the job ended otherwise, None while queued, running or requeued (the run's
        ``status.json`` decides: without Slurm accounting submitit reports ended jobs as UNKNOWN)."""
        if self.job is None or not self.job.done():
            return None
        from launch.status import TERMINAL_SLURM_STATES, slurm_job_info  # noqa: PLC0415

        if (read_status(self.run_dir)[0] or {}).get("state") in ("finished", "stopped"):
            return 0
        info = slurm_job_info(str(self.job.job_id))
        return None if info is not None and info.state.split()[0] not in TERMINAL_SLURM_STATES else 1

    def signal_stop(self) -> None:
        if self.job is not None:
            note(self.run_dir, "cancelling Slurm job %s", self.job.job_id)
            subprocess.run(["scancel", str(self.job.job_id)], check=False, capture_output=True)

    def describe_failure(self, rc: int) -> str:
        return f"Slurm job {getattr(self.job, 'job_id', '?')} failed; see {self.run_dir / 'slurm'}"


def _end_previous_run(run_dir: Path, timeout_s: float) -> None:
    """An earlier life of this trial (PBT pause, retry, killed driver) may have left its run going: ask it to stop and
    wait until it let go of the run dir (its lease), so that this life's run can take it."""
    deadline = time.monotonic() + timeout_s
    while (holder := lease_holder(run_dir)[0]) is not None and holder.dead_because() is None:
        if time.monotonic() > deadline:
            logger.warning("the previous run in %s did not end within %.0f s", run_dir, timeout_s)
            return
        request_stop(run_dir)
        time.sleep(0.5)


def _plant(checkpoint: Any, meta: dict[str, Any], run_dir: Path) -> None:
    """Make Ray Tune's ``checkpoint`` the newest (and only) one of ``run_dir``: ``pretrain train`` resumes from it."""
    root = run_dir / CHECKPOINTS
    shutil.rmtree(root, ignore_errors=True)
    checkpoint.to_directory(str(root / meta["tag"]))
    write_latest(root, meta["tag"])


def _checkpoint_step(path: Path) -> int | None:
    try:
        return int(json.loads((path / "meta.json").read_text())["step"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _report(run_dir: Path, trial_id: str, step: int, done: bool = False) -> int:
    """``tune.report`` the eval of ``step`` from the run's ``status.json``, with the run's checkpoint of that step."""
    from ray import tune  # noqa: PLC0415

    status = read_status(run_dir)[0] or {}
    metrics = {k: v for k, v in (status.get("last_eval") or {}).items() if isinstance(v, (int, float))}
    ckpt, checkpoint = status.get("last_checkpoint"), None
    if ckpt and (Path(ckpt) / COMPLETE_MARKER).is_file() and _checkpoint_step(Path(ckpt)) == step:
        checkpoint = tune.Checkpoint.from_directory(ckpt)
        checkpoint.set_metadata({"trial_id": trial_id, "step": step, "tag": Path(ckpt).name})
    # the last eval ends the trial without a decision: PBT would otherwise clone a donor into a run with no step left
    tune.report({**metrics, "step": step, "done": done}, checkpoint=checkpoint)
    return step


def run_trial(config: dict[str, Any], spec: SweepSpec) -> None:
    """Ray Tune function trainable: one training run, one ``tune.report`` per eval.

    Args:
        config: Sampled values keyed by config path (``{"optim.lr": 3e-4}``).
        spec: The sweep.
    """
    from ray import tune  # noqa: PLC0415 - Ray is imported lazily (STYLE rule 12)

    trial_id = tune.get_context().get_trial_id()
    trials_dir = spec.sweep_dir / "trials"
    run_dir = trials_dir / trial_id
    (run_dir / SWEEP).mkdir(parents=True, exist_ok=True)
    _end_previous_run(run_dir, spec.stop_grace_s + 60)
    write_atomic(run_dir / SWEEP / "trial.json", json.dumps({"trial_id": trial_id, "params": config}))
    reported, checkpoint = -1, tune.get_checkpoint()
    if checkpoint is not None:
        meta = checkpoint.get_metadata()
        reported = int(meta.get("step", -1))
        if meta.get("trial_id") != trial_id or newest_checkpoint(run_dir) is None:
            _plant(checkpoint, meta, run_dir)
            donor = meta.get("trial_id")
            what = "PBT exploit" if donor != trial_id else "no checkpoint in the run dir"
            note(run_dir, "%s: continuing from trial %s's checkpoint (step %s)", what, donor, reported)
    elif newest_checkpoint(run_dir) is None and run_history(run_dir):
        # an earlier life failed before its first checkpoint: `pretrain train` refuses to start over a history silently
        note(run_dir, "no checkpoint to resume from: earlier attempt moved to %s", set_aside_history(run_dir))
    status = read_status(run_dir)[0] or {}
    if status.get("state") == "finished":  # the sweep driver died before Ray Tune recorded the end: report it
        note(run_dir, "the run already finished at step %s: nothing to train", status.get("step"))
        _report(run_dir, trial_id, int((status.get("last_eval") or {}).get("step", status.get("step", 0))), done=True)
        return

    sampled = [format_override(k, v) for k, v in sorted(config.items())]
    run_args = [format_override("run.output_dir", str(trials_dir)), format_override("run.name", trial_id)]
    overrides = [*spec.trial_overrides(), *sampled, *run_args]
    run = (_SlurmRun if spec.trial_backend == "slurm" else _LocalRun)(spec, overrides, run_dir)
    install_hook(run_dir, timeout_s=SLURM_HEARTBEAT_TIMEOUT_S if spec.trial_backend == "slurm" else HEARTBEAT_TIMEOUT_S)
    heartbeat = Heartbeat(run_dir)
    try:
        run.start()
        while (rc := run.poll()) is None:
            step = waiting_step(run_dir)
            if step is not None and step > reported:
                reported = _report(run_dir, trial_id, step)  # blocks while Ray Tune decides
                decide(run_dir, step, CONTINUE)
            time.sleep(0.5)
        last = ((read_status(run_dir)[0] or {}).get("last_eval") or {}).get("step", -1)
        if rc == 0 and last > reported:  # the final eval: the run does not wait there
            reported = _report(run_dir, trial_id, last, done=True)
        if rc != 0:
            raise RuntimeError(f"trial {trial_id}: {run.describe_failure(rc)}")
    except BaseException as e:  # SystemExit: Ray Tune stopped the trial inside tune.report
        note(run_dir, "trial stopped (%s)", type(e).__name__)
        raise
    finally:
        # The run waits at the step just reported (Ray Tune stopped the trial there), or trains on: either way it
        # stops by itself with a checkpoint. Signalled only when it does not within the grace period.
        heartbeat.stop()
        if run.poll() is None:
            decide(run_dir, reported, STOP)
            if waiting_step(run_dir) != reported:
                request_stop(run_dir)
            deadline = time.monotonic() + spec.stop_grace_s
            while run.poll() is None and time.monotonic() < deadline:
                time.sleep(0.2)
            if run.poll() is None:
                run.signal_stop()
