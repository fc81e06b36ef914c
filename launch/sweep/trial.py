"""A sweep trial: a Ray Tune function trainable around one ``pretrain train`` run (a local process or a Slurm job).

:func:`run_trial` starts ``pretrain train BASE overrides... --nproc N`` with the trial's values and its own run dir
``<sweep>/trials/<trial_id>/``. The run waits at each eval (:mod:`pretrain.sweep_hook`) while the trial blocks in
``tune.report`` with that eval and ``tune.Checkpoint.from_directory`` on the run's checkpoint of that step, then tells
it to continue, or, when Ray Tune stopped or paused the trial there, to stop: a trial stopped at a rung trains no
further.

A restarted trial (``--resume``, a retry, PBT) waits for its earlier run to let go of the run dir and starts the same
command, which resumes from the run dir's newest checkpoint. A checkpoint of another trial (PBT exploit) becomes that
first; the checkpoints it replaces move to ``previous/<time>/checkpoints/`` (nothing is deleted).
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
from datetime import datetime
from pathlib import Path
from typing import Any

from launch.sweep.spec import SweepSpec, format_override
from pretrain.lease import lease_holder
from pretrain.rundir import (
    CHECKPOINTS,
    COMPLETE_MARKER,
    PREVIOUS,
    SWEEP,
    read_latest,
    read_status,
    run_history,
    set_aside_history,
    write_latest,
)
from pretrain.sweep_hook import CONTINUE, STOP, decide, install_hook, start_heartbeat, waiting_step

__all__ = ["HEARTBEAT_TIMEOUT_S", "newest_checkpoint", "run_trial"]

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


class _LocalRun:
    """``pretrain train`` as a process of this machine, logging to ``sweep/train.log``.

    Ray SIGKILLs the direct children of a trial's worker when the worker ends (a stopped trial, a killed driver), which
    could kill the run while torch builds an extension (its lock would stay behind). So a shell stands between them,
    reporting the run's exit code, and the run always ends by itself (:mod:`pretrain.sweep_hook`).
    """

    def __init__(self, spec: SweepSpec, overrides: list[str], run_dir: Path):
        self.spec, self.run_dir, self.shell = spec, run_dir, None
        self.logs, self.pid_file = run_dir / SWEEP / "train.log", run_dir / SWEEP / "pid"
        self.cmd = [sys.executable, "-m", "launch.cli", "train", spec.base, *overrides]
        self.cmd += ["--nproc", str(spec.resources.nproc)]

    def start(self) -> None:
        self.pid_file.unlink(missing_ok=True)  # an earlier life's pid may have been reused by now
        env = {**os.environ, "OMP_NUM_THREADS": str(max(1, int(self.spec.resources.cpu)))}  # its ranks share them
        with open(self.logs, "a") as log:
            log.write(f"\n===== {datetime.now().isoformat(' ', 'milliseconds')} {' '.join(self.cmd)}\n")
            log.flush()
            script = f'"$@" & echo $! >{shlex.quote(str(self.pid_file))}; wait $!'
            self.shell = subprocess.Popen(["sh", "-c", script, "sh", *self.cmd], cwd=self.spec.workdir or None, env=env,
                                          stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                          start_new_session=True)  # fmt: skip
        note(self.run_dir, "started the run")

    def poll(self) -> int | None:
        """The run's exit code once it ended (-1: it never started), None while it runs."""
        return -1 if self.shell is None else self.shell.poll()

    def signal_stop(self) -> None:
        """SIGTERM to the launcher only (it forwards it to the ranks): a compiler it runs is not interrupted."""
        try:
            os.kill(int(self.pid_file.read_text()), signal.SIGTERM)
        except (OSError, ValueError):
            pass


class _SlurmRun:
    """``pretrain train`` as a Slurm job (``pretrain submit``'s ``TrainJob``), its run dir on a shared file system."""

    def __init__(self, spec: SweepSpec, overrides: list[str], run_dir: Path):
        self.spec, self.overrides, self.run_dir, self.job = spec, overrides, run_dir, None
        self.logs = run_dir / "slurm"

    def start(self) -> None:
        from launch import submit  # noqa: PLC0415

        params = self.spec.cluster_params()
        plan = submit.validate_run(self.spec.base, self.overrides, params)
        self.job = submit.submit_plan(plan, params, argv=["pretrain sweep (trial)"])
        note(self.run_dir, "submitted the run as Slurm job %s", self.job.job_id)

    def poll(self) -> int | None:
        """0 when the run finished or stopped, 1 when the job ended otherwise, None while queued, running or requeued
        (``status.json`` decides: without Slurm accounting submitit reports ended jobs as UNKNOWN)."""
        if self.job is None:
            return 1
        if not self.job.done():
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
    """Ray Tune function trainable: one training run with the sampled ``config`` (``{"optim.lr": 3e-4}``), one
    ``tune.report`` per eval."""
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
