"""A sweep trial: a Ray Tune function trainable around one ``pretrain train`` run (a local process or a Slurm job).

:func:`run_trial` starts ``pretrain train BASE overrides... --nproc N`` with the trial's sampled values and its own run
dir ``<sweep>/trials/<trial_id>/``. The run waits at each eval (:mod:`pretrain.sweep_hook`); the trial blocks in
``tune.report`` with that eval (from the run's ``status.json``) and ``tune.Checkpoint.from_directory`` on the run's
checkpoint of that step, then tells the run to continue. When Ray Tune stops or pauses the trial inside
``tune.report``, the run is told to stop where it waits: a trial stopped at a rung trains no further, on both backends.

A restarted trial (``--resume``, a retry, a PBT exploit) waits for its earlier run to let go of the run dir, then
starts the same command: ``pretrain train`` resumes from the run dir's newest checkpoint. A checkpoint Ray Tune hands
over from another trial (PBT exploit), or any when the run dir has none, becomes the newest first; the checkpoints it
replaces move to ``previous/<time>/checkpoints/``, as ``pretrain.rundir`` sets history aside (nothing is deleted).
"""

from __future__ import annotations

import json
import logging
import os
import shlex
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
    PREVIOUS,
    SWEEP,
    lease_holder,
    read_latest,
    read_status,
    run_history,
    set_aside_history,
    write_latest,
)
from pretrain.sweep_hook import CONTINUE, STOP, decide, install_hook, start_heartbeat, waiting_step

__all__ = ["HEARTBEAT_TIMEOUT_S", "newest_checkpoint", "run_trial", "slurm_params"]

logger = logging.getLogger(__name__)

HEARTBEAT_TIMEOUT_S = {"local": 15.0, "slurm": 120.0}
"""Seconds without its trial's heartbeat after which a run stops by itself. A Slurm run reads the heartbeat's mtime
over a shared file system, whose attribute cache (NFS ``actimeo``: up to 60 s) can show an older one."""


def note(run_dir: Path, msg: str, *args: Any) -> None:
    """Log ``msg`` and append it to the trial's ``sweep/trial.log`` (what the sweep did to this run, and when)."""
    logger.info(msg, *args)
    with open(run_dir / SWEEP / "trial.log", "a") as f:
        f.write(f"{time.strftime('%Y-%m-%d %H:%M:%S')} {msg % args}\n")


def newest_checkpoint(run_dir: str | Path) -> Path | None:
    """The complete checkpoint ``checkpoints/latest`` names, or None."""
    root = Path(run_dir) / CHECKPOINTS
    tag = read_latest(root)
    return root / tag if tag and (root / tag / COMPLETE_MARKER).is_file() else None


def slurm_params(options: dict[str, Any], nproc: int) -> Any:
    """``ClusterParams`` of a trial job from the sweep's ``slurm:`` (``profile`` plus ClusterParams keys), one task (or
    GPU) per rank. Raises ConfigError naming an unknown profile or key (with close matches) or a bad value."""
    from launch.cluster_params import load_cluster_params  # noqa: PLC0415 - only the Slurm backend needs it

    opts = {"cluster": "slurm", **options}
    profile = opts.pop("profile", None)
    if profile is not None and "cluster" not in options:
        opts.pop("cluster")
    opts["gpus_per_node" if opts.get("gpus_per_node") else "tasks_per_node"] = nproc
    return load_cluster_params(profile, **opts)


class _LocalRun:
    """``pretrain train`` as a process of this machine; its output goes to ``sweep/train.log``.

    Ray SIGKILLs the direct children of a trial's worker when the worker ends, which could kill the run while torch
    builds an extension (its lock would stay behind). So the run starts one process further down (the shell returns at
    once) and ends by itself (:mod:`pretrain.sweep_hook`); the shell records its pid and exit code.
    """

    def __init__(self, spec: SweepSpec, overrides: list[str], run_dir: Path):
        self.spec, self.run_dir, self.folder, self.logs = spec, run_dir, run_dir / SWEEP, run_dir / SWEEP / "train.log"
        self.cmd = [sys.executable, "-m", "launch.cli", "train", spec.base, *overrides]
        self.cmd += ["--nproc", str(spec.resources.nproc)]
        life = f"{os.getpid()}.{time.monotonic_ns()}"  # a late exit code of an earlier life must not speak for this one
        self.pid_file, self.exit_file = self.folder / f"pid.{life}", self.folder / f"exit_code.{life}"

    def start(self) -> None:
        for old in [*self.folder.glob("pid.*"), *self.folder.glob("exit_code.*")]:
            old.unlink(missing_ok=True)
        log, now = self.logs, time.time()
        with open(log, "a") as f:
            f.write(f"\n===== {time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(now))}.{int(now % 1 * 1000):03d} "
                    f"{' '.join(self.cmd)}\n")  # fmt: skip
        q = shlex.quote
        script = (f"({shlex.join(self.cmd)} >>{q(str(log))} 2>&1 </dev/null & echo $! >{q(str(self.pid_file))}; "
                  f"wait $!; echo $? >{q(str(self.exit_file))}) &")  # fmt: skip
        # the ranks share the trial's CPUs: `pretrain train` divides OMP_NUM_THREADS among them
        env = {**os.environ, "OMP_NUM_THREADS": str(max(1, int(self.spec.resources.cpu)))}
        subprocess.run(["sh", "-c", script], cwd=self.spec.workdir or None, env=env, check=True,
                       stdin=subprocess.DEVNULL, start_new_session=True)  # fmt: skip
        note(self.run_dir, "started the run")

    def poll(self) -> int | None:
        """The run's exit code once it ended (-1: its shell died too), None while it starts or runs."""
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


class _SlurmRun:
    """``pretrain train`` as a Slurm job (``pretrain submit``'s ``TrainJob``), its run dir on a shared file system."""

    def __init__(self, spec: SweepSpec, overrides: list[str], run_dir: Path):
        self.spec, self.overrides, self.run_dir, self.logs, self.job = spec, overrides, run_dir, run_dir / "slurm", None

    def start(self) -> None:
        from launch import submit  # noqa: PLC0415

        params = slurm_params(self.spec.slurm, self.spec.resources.nproc)
        plan = submit.validate_run(self.spec.base, self.overrides, params)
        self.job = submit.submit_plan(plan, params, argv=["pretrain sweep (trial)"])
        note(self.run_dir, "submitted the run as Slurm job %s", self.job.job_id)

    def poll(self) -> int | None:
        """0 when the run finished or stopped, 1 when the job ended otherwise, None while queued, running or requeued
        (``status.json`` decides: without Slurm accounting submitit reports ended jobs as UNKNOWN)."""
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


def _end_previous_run(run_dir: Path, timeout_s: float) -> None:
    """An earlier life of this trial (PBT pause, retry, killed driver) may have left its run going: ask it to stop and
    wait until it let go of the run dir (its lease), so that this life's run can take it."""
    deadline = time.monotonic() + timeout_s
    while (holder := lease_holder(run_dir)[0]) is not None and holder.dead_because() is None:
        if time.monotonic() > deadline:
            logger.warning("the previous run in %s did not end within %.0f s", run_dir, timeout_s)
            return
        decide(run_dir, STOP)
        time.sleep(0.5)


def _set_aside_checkpoints(run_dir: Path) -> Path | None:
    """Move ``checkpoints/`` to ``previous/<time>/``, where :func:`pretrain.rundir.set_aside_history` puts history."""
    if not (run_dir / CHECKPOINTS).exists():
        return None
    stamp, n = time.strftime("%Y%m%d-%H%M%S"), 1
    aside = run_dir / PREVIOUS / stamp
    while aside.exists():
        n += 1
        aside = run_dir / PREVIOUS / f"{stamp}.{n}"
    aside.mkdir(parents=True)
    (run_dir / CHECKPOINTS).rename(aside / CHECKPOINTS)
    return aside


def _take_checkpoint(checkpoint: Any, run_dir: Path, trial_id: str) -> int:
    """Prepare the run dir from Ray Tune's ``checkpoint`` of this trial (None: a fresh start); returns the step it
    reported last (-1: none)."""
    if checkpoint is None:
        if newest_checkpoint(run_dir) is None and run_history(run_dir):
            # an earlier life failed before its first checkpoint: `pretrain train` refuses to start over a history
            note(run_dir, "no checkpoint to resume from: earlier attempt moved to %s", set_aside_history(run_dir))
        return -1
    meta = checkpoint.get_metadata()
    if meta.get("trial_id") != trial_id or newest_checkpoint(run_dir) is None:
        root, aside = run_dir / CHECKPOINTS, _set_aside_checkpoints(run_dir)
        checkpoint.to_directory(str(root / meta["tag"]))
        write_latest(root, meta["tag"])
        what = "PBT exploit" if meta.get("trial_id") != trial_id else "no checkpoint in the run dir"
        note(run_dir, "%s: continuing from trial %s's checkpoint (step %s); the run dir's checkpoints moved to %s",
             what, meta.get("trial_id"), meta.get("step"), aside)  # fmt: skip
    return int(meta.get("step", -1))


def _report(run_dir: Path, trial_id: str, step: int, done: bool = False) -> None:
    """``tune.report`` the eval of ``step`` from the run's ``status.json``, with the run's checkpoint of that step."""
    from ray import tune  # noqa: PLC0415

    status = read_status(run_dir)[0] or {}
    metrics = {k: v for k, v in (status.get("last_eval") or {}).items() if isinstance(v, (int, float))}
    ckpt, checkpoint = Path(status.get("last_checkpoint") or run_dir / CHECKPOINTS / "none"), None
    try:
        saved_at = json.loads((ckpt / "meta.json").read_text())["step"]
    except (OSError, ValueError, KeyError):
        saved_at = None
    if (ckpt / COMPLETE_MARKER).is_file() and saved_at == step:
        checkpoint = tune.Checkpoint.from_directory(str(ckpt))
        checkpoint.set_metadata({"trial_id": trial_id, "step": step, "tag": ckpt.name})
    # the last eval ends the trial without a decision: PBT would otherwise clone a donor into a run with no step left
    tune.report({**metrics, "step": step, "done": done}, checkpoint=checkpoint)


def run_trial(config: dict[str, Any], spec: SweepSpec) -> None:
    """Ray Tune function trainable: one training run, one ``tune.report`` per eval.

    Args:
        config: Sampled values keyed by config path (``{"optim.lr": 3e-4}``).
        spec: The sweep.
    """
    from ray import tune  # noqa: PLC0415 - Ray is imported lazily (STYLE rule 12)

    trial_id = tune.get_context().get_trial_id()
    run_dir = spec.sweep_dir / "trials" / trial_id
    (run_dir / SWEEP).mkdir(parents=True, exist_ok=True)
    _end_previous_run(run_dir, spec.stop_grace_s + 60)
    reported = _take_checkpoint(tune.get_checkpoint(), run_dir, trial_id)
    status = read_status(run_dir)[0] or {}
    if status.get("state") == "finished":  # the sweep driver died before Ray Tune recorded the end: report it
        note(run_dir, "the run already finished at step %s: nothing to train", status.get("step"))
        _report(run_dir, trial_id, int((status.get("last_eval") or {}).get("step", status.get("step", 0))), done=True)
        return

    sampled = [format_override(k, v) for k, v in sorted(config.items())]
    run_args = [format_override("run.output_dir", str(run_dir.parent)), format_override("run.name", trial_id)]
    run = (_SlurmRun if spec.trial_backend == "slurm" else _LocalRun)(
        spec, [*spec.trial_overrides(), *sampled, *run_args], run_dir
    )
    install_hook(run_dir, timeout_s=HEARTBEAT_TIMEOUT_S[spec.trial_backend])
    heartbeat = start_heartbeat(run_dir)
    try:
        run.start()
        while (rc := run.poll()) is None:
            step = waiting_step(run_dir)
            if step is not None and step > reported:
                reported = step
                _report(run_dir, trial_id, step)  # blocks while Ray Tune decides
                decide(run_dir, CONTINUE, step)
            time.sleep(0.5)
        if rc != 0:
            raise RuntimeError(f"trial {trial_id}: its run failed (exit code {rc}); see {run.logs}")
        last = ((read_status(run_dir)[0] or {}).get("last_eval") or {}).get("step", -1)
        if last > reported:  # the final eval: the run does not wait there
            _report(run_dir, trial_id, last, done=True)
    finally:
        # Ray Tune stopped or paused the trial inside tune.report (SystemExit), or it failed: the run stops by itself
        # with a checkpoint, where it waits or at the end of its step; signalled only if not within the grace period.
        heartbeat.set()
        if run.poll() is None:
            note(run_dir, "trial stopped at step %s: stopping its run", reported)
            decide(run_dir, STOP)
            deadline = time.monotonic() + spec.stop_grace_s
            while run.poll() is None and time.monotonic() < deadline:
                time.sleep(0.2)
            if run.poll() is None:
                run.signal_stop()
