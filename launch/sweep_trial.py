"""Ray Tune trials of ``pretrain sweep``: one training run per trial, launched as a subprocess or a Slurm job.

A trial is a Ray Tune *function trainable* (:func:`run_trial`) that does not train by itself. It starts
``pretrain train BASE overrides... --nproc N`` with the trial's sampled values as ``section.field=value`` overrides and
its own run directory ``<sweep>/trials/<trial_id>/`` (so DeepSpeed and ``torch.distributed`` state stay isolated per
trial), then tails the run's ``metrics.jsonl``. Every eval event becomes one ``tune.report`` (one Ray Tune iteration,
the time unit of the ASHA and PBT knobs) carrying the newest complete checkpoint of the run, so Ray Tune keeps the best
``keep_checkpoints`` of them and deletes the rest.

Processes. The run is started through a guard that stops it when the trial stops (:mod:`launch.trial_guard`); with the
Slurm backend the guard ``scancel``-s the job. At each eval the run waits for Ray Tune's decision, on both backends
(:mod:`pretrain.sweep_hook`): the trial reports the eval, then tells the run to continue, or to stop when Ray Tune
stopped the trial, so a trial stopped at a rung trains no further than that rung.

Resume. A restarted trial (sweep ``--resume``, a retry after a failure) relaunches the same command: ``pretrain train``
auto-resumes from the newest complete checkpoint of the trial's run dir. A PBT exploit (the checkpoint Ray Tune hands
over belongs to another trial) restarts from that checkpoint with ``--resume`` and the mutated config.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from launch.trial_guard import SWEEP_SUBDIR, LocalRun, note, proc_start_time, stop_previous_run
from pretrain.rundir import CHECKPOINTS, LATEST, METRICS, STATUS, run_history, set_aside_history, write_atomic
from pretrain.sweep_hook import CONTINUE, STOP, Heartbeat, decide, install_hook, waiting_step

__all__ = [
    "CHECKPOINT_META",
    "CheckpointRef",
    "MetricsTail",
    "TrialSpec",
    "format_override",
    "newest_checkpoint",
    "run_trial",
    "slurm_cluster_params",
    "stage_checkpoint",
    "submit_slurm_trial",
    "trial_overrides",
]

logger = logging.getLogger(__name__)

CHECKPOINT_META = ".sweep_checkpoint.json"
"""Written into every checkpoint handed to Ray Tune: which trial, run dir, tag and step it came from."""


# A `pretrain train` exit code of 2 is a config error: retrying cannot help, so the trial fails at once.
_EXIT_CONFIG_ERROR = 2


@dataclass
class TrialSpec:
    """What every trial of a sweep shares (pickled into the Ray Tune trainable; paths are absolute)."""

    base: str
    """Run config of every trial."""
    overrides: list[str]
    """``section.field=value`` applied to every trial before its sampled values."""
    trials_dir: str
    """Parent folder of the trials' run dirs (``<sweep>/trials``)."""
    metric: str
    """Eval metric reported to Ray Tune (an eval event is a metrics event that has it)."""
    max_steps: int = 0
    """Last optimizer step of a trial, if known; its final eval is reported once the run has exited."""
    nproc: int = 1
    """Ranks per trial (``pretrain train --nproc``; tasks of the Slurm job)."""
    backend: str = "local"
    """``local`` (subprocess) or ``slurm`` (submitit job)."""
    slurm: dict[str, Any] = field(default_factory=dict)
    """Options of the Slurm submission (cluster config name and its overrides)."""
    always_checkpoint: bool = False
    """Attach a checkpoint to every report even if it is the one reported before (PBT needs one per report)."""
    stop_grace_s: float = 20.0
    """Seconds between SIGTERM and SIGKILL when a trial is stopped."""
    poll_s: float = 0.5
    """Seconds between reads of ``metrics.jsonl``."""
    workdir: str = ""
    """Directory a local trial's run starts in (where ``pretrain sweep`` ran; its relative paths mean the same)."""
    cpus: int = 1
    """CPUs of a local trial (Ray's ``resources.cpu``): its ranks share them (``OMP_NUM_THREADS``)."""
    train_command: list[str] = field(default_factory=lambda: [sys.executable, "-m", "launch.cli", "train"])
    """Command that starts a training run (``pretrain train``)."""


# ------------------------------------------------------------------------------------------------------ overrides


def format_override(key: str, value: Any) -> str:
    """``key=value`` whose value ``pretrain.config.parse_overrides`` reads back as the same Python value.

    YAML 1.1 reads ``1e-05`` as a string, so floats always carry a dot in the mantissa (``1.0e-05``).
    """

    def fmt(v: Any) -> str:
        if isinstance(v, bool) or v is None:
            return json.dumps(v)
        if isinstance(v, float):
            if math.isnan(v) or math.isinf(v):
                return {True: ".nan"}.get(math.isnan(v), ".inf" if v > 0 else "-.inf")
            text = repr(v)
            mantissa, _, exponent = text.partition("e")
            if "." not in mantissa:
                mantissa += ".0"
            return mantissa + ("e" + exponent if exponent else "")
        if isinstance(v, int):
            return str(v)
        if isinstance(v, (list, tuple)):
            return "[" + ", ".join(fmt(x) for x in v) + "]"
        if isinstance(v, dict):
            return "{" + ", ".join(f"{json.dumps(str(k))}: {fmt(x)}" for k, x in v.items()) + "}"
        return json.dumps(str(v))

    return f"{key}={fmt(value)}"


def trial_overrides(spec: TrialSpec, params: dict[str, Any], trial_id: str) -> list[str]:
    """The full override list of one trial: sweep overrides, sampled values, then the trial's run directory."""
    sampled = [format_override(k, v) for k, v in sorted(params.items())]
    # Quoted: a trial id such as 1a2b3_00001 reads as a YAML 1.1 integer.
    run = [format_override("run.output_dir", spec.trials_dir), format_override("run.name", trial_id)]
    return [*spec.overrides, *sampled, *run]


# ---------------------------------------------------------------------------------------------- metrics and ckpts


class MetricsTail:
    """Reads the complete JSON lines appended to a ``metrics.jsonl`` since the last call (the file may not exist yet).

    A resumed training run first cuts its ``metrics.jsonl`` back to the resume step by replacing the file; a replaced
    or shrunk file is read again from its start (callers drop events they have seen by step).

    Args:
        path: The run's ``metrics.jsonl``.
        from_end: Start at the current end of the file (events of a run's earlier life were handled before).
    """

    def __init__(self, path: str | Path, from_end: bool = False):
        self.path = Path(path)
        self.offset = 0
        self.inode: int | None = None
        self._partial = b""
        if from_end and self.path.exists():
            st = self.path.stat()
            self.offset, self.inode = st.st_size, st.st_ino

    def read(self) -> list[dict[str, Any]]:
        """New events, oldest first; a torn or non-JSON line is skipped."""
        try:
            with open(self.path, "rb") as f:
                st = os.fstat(f.fileno())
                if st.st_ino != self.inode or st.st_size < self.offset:  # replaced or truncated: start over
                    self.inode, self.offset, self._partial = st.st_ino, 0, b""
                f.seek(self.offset)
                chunk = f.read()
        except FileNotFoundError:
            return []
        self.offset += len(chunk)
        lines = (self._partial + chunk).split(b"\n")
        self._partial = lines.pop()  # incomplete last line (no newline yet), kept for the next read
        events = []
        for line in lines:
            if not line.strip():
                continue
            try:
                event = json.loads(line)
            except ValueError:
                logger.debug("skipping a line of %s that is not JSON: %r", self.path, line[:200])
                continue
            if isinstance(event, dict):
                events.append(event)
        return events


@dataclass(frozen=True)
class CheckpointRef:
    """A complete checkpoint of a run: ``checkpoints/<tag>/`` with its COMPLETE marker."""

    tag: str
    path: Path
    step: int | None


def _checkpoint_step(path: Path) -> int | None:
    for name in ("meta.json", "COMPLETE"):
        try:
            data = json.loads((path / name).read_text())
            if isinstance(data, dict) and isinstance(data.get("step"), int):
                return data["step"]
        except (OSError, ValueError):
            pass
    digits = re.findall(r"\d+", path.name)
    return int(digits[-1]) if digits else None


def newest_checkpoint(run_dir: str | Path) -> CheckpointRef | None:
    """The checkpoint ``checkpoints/latest`` names if it is complete, else the newest complete one found."""
    ckpt_dir = Path(run_dir) / CHECKPOINTS
    try:
        tag = (ckpt_dir / LATEST).read_text().strip()
        if tag and (ckpt_dir / tag / "COMPLETE").exists():
            return CheckpointRef(tag, ckpt_dir / tag, _checkpoint_step(ckpt_dir / tag))
    except OSError:
        pass
    try:
        complete = [d for d in ckpt_dir.iterdir() if d.is_dir() and (d / "COMPLETE").exists()]
    except OSError:
        return None
    if not complete:
        return None
    best = max(complete, key=lambda d: (_checkpoint_step(d) or -1, d.stat().st_mtime))
    return CheckpointRef(best.name, best, _checkpoint_step(best))


def _link_or_copy(src: str, dst: str) -> None:
    try:
        os.link(src, dst)  # same file system: no bytes copied; survives the trainer deleting its checkpoint
    except OSError:
        shutil.copy2(src, dst)


def stage_checkpoint(ckpt: CheckpointRef, dest: Path, meta: dict[str, Any]) -> Path | None:
    """Hard-link ``ckpt`` into ``dest`` (copy across file systems) and add :data:`CHECKPOINT_META`.

    The staged copy is what Ray Tune copies into its storage: the trainer's retention may delete the original at any
    moment. Returns None if the checkpoint vanished while it was being staged.
    """
    shutil.rmtree(dest, ignore_errors=True)
    try:
        shutil.copytree(ckpt.path, dest, copy_function=_link_or_copy)
        if not (dest / "COMPLETE").exists():
            raise FileNotFoundError(dest / "COMPLETE")
    except (OSError, shutil.Error) as e:
        logger.warning("checkpoint %s vanished while staging it (%s); reporting without it", ckpt.path, e)
        shutil.rmtree(dest, ignore_errors=True)
        return None
    (dest / CHECKPOINT_META).write_text(json.dumps({**meta, "tag": ckpt.tag, "step": ckpt.step}))
    return dest


def _report_metrics(event: dict[str, Any], last_train: dict[str, Any] | None) -> dict[str, Any]:
    """Numeric fields of the eval event plus the newest train event's (loss, lr, img_per_s...) as ``train_*``."""
    reserved = {"done", "training_iteration", "trial_id", "time_this_iter_s", "timestamp", "config"}
    out: dict[str, Any] = {}
    for k, v in (last_train or {}).items():
        if isinstance(v, (int, float)) and not isinstance(v, bool) and k not in ("step", "epoch"):
            out[f"train_{k}"] = v
    for k, v in event.items():
        if isinstance(v, (int, float)) and not isinstance(v, bool) and k not in reserved:
            out[k] = v
    return out


# --------------------------------------------------------------------------------------------------- Slurm runs


def slurm_cluster_params(options: dict[str, Any], nproc: int) -> Any:
    """``launch.cluster_params.ClusterParams`` of a trial job: ``options`` (``profile`` plus ClusterParams keys) with
    one task per rank (one GPU per rank when ``gpus_per_node`` is set).

    Raises:
        ConfigError: an unknown profile or key (with close matches), or a bad value.
    """
    from launch.cluster_params import load_cluster_params  # noqa: PLC0415 - needed only by the Slurm backend

    opts = dict(options)
    profile = opts.pop("profile", None)
    if profile is None:
        opts.setdefault("cluster", "slurm")
    if opts.get("gpus_per_node"):
        opts["gpus_per_node"] = nproc
    else:
        opts.setdefault("tasks_per_node", nproc)
    return load_cluster_params(profile, **opts)


def submit_slurm_trial(base: str, overrides: list[str], params: Any) -> Any:
    """Submit one trial's training run the way ``pretrain submit`` does (:func:`launch.submit.submit_plan`): a
    ``launch.submit.TrainJob``, Checkpointable and requeued on preemption.

    Returns:
        The submitit job.
    """
    from launch import submit  # noqa: PLC0415

    plan = submit.validate_run(base, overrides, params)
    return submit.submit_plan(plan, params, argv=["pretrain sweep (trial)"])


def _plant_checkpoint(src: str, run_dir: Path) -> None:
    """Make ``src`` the newest checkpoint of ``run_dir`` (a Slurm trial job has no ``--resume``: it auto-resumes)."""
    ckpt_root = run_dir / CHECKPOINTS
    shutil.rmtree(ckpt_root, ignore_errors=True)
    ckpt_root.mkdir(parents=True)
    shutil.copytree(src, ckpt_root / Path(src).name, copy_function=_link_or_copy)
    write_atomic(ckpt_root / LATEST, Path(src).name + "\n")


def _cancel_previous_job(run_dir: Path, timeout_s: float = 120.0) -> None:
    """Cancel the job an earlier life of this trial submitted if Slurm still runs or queues it, and wait for its end."""
    from launch.status import TERMINAL_SLURM_STATES, read_job_events, slurm_job_info  # noqa: PLC0415

    submits = [e for e in read_job_events(run_dir) if e.get("event") == "submit"]
    if not submits:
        return
    job_id = str(submits[-1]["job_id"])
    info = slurm_job_info(job_id)
    if info is None or info.state.split()[0] in TERMINAL_SLURM_STATES:
        return
    note(run_dir, "cancelling job %s of this trial's previous life", job_id)
    subprocess.run(["scancel", job_id], check=False, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        info = slurm_job_info(job_id)
        if info is None or info.state.split()[0] in TERMINAL_SLURM_STATES:
            return
        time.sleep(1.0)
    logger.warning("job %s did not end within %.0f s of scancel", job_id, timeout_s)


class _SlurmRun:
    """A ``pretrain train`` Slurm job (``launch.submit.TrainJob``); cancelled when the trial stops."""

    def __init__(self, spec: TrialSpec, overrides: list[str], resume_from: str | None, run_dir: Path):
        self.spec = spec
        self.overrides = overrides
        self.resume_from = resume_from  # (not `resume`: that is the method the trial calls after each report)
        self.run_dir = run_dir
        self.job: Any = None
        self.guard_pid: int | None = None

    def start(self) -> None:
        if self.resume_from:
            _plant_checkpoint(self.resume_from, self.run_dir)
        params = slurm_cluster_params(self.spec.slurm, self.spec.nproc)
        self.job = submit_slurm_trial(self.spec.base, self.overrides, params)
        me = os.getpid()
        guard = [
            sys.executable, "-m", "launch.trial_guard", "guard",
            "--watch-pid", str(me), "--watch-start", str(proc_start_time(me)), "--scancel", str(self.job.job_id),
            "--log", str(self.run_dir / SWEEP_SUBDIR / "trial.log"),
        ]  # fmt: skip
        leader = subprocess.Popen(guard, stdout=subprocess.PIPE, stdin=subprocess.DEVNULL, start_new_session=True)
        line = leader.stdout.readline() if leader.stdout else b""
        leader.wait()
        self.guard_pid = int(line) if line.strip() else None
        note(self.run_dir, "submitted the run as Slurm job %s", self.job.job_id)

    def poll(self) -> int | None:
        """0 when the run finished, 1 when the job ended otherwise, None while it is queued, running or requeued.

        The run's ``status.json`` decides, not submitit's job state: without Slurm accounting (``sacct``) submitit
        reports ended jobs as UNKNOWN.
        """
        if not self.job.done():
            return None
        from launch.status import TERMINAL_SLURM_STATES, slurm_job_info  # noqa: PLC0415

        if _run_state(self.run_dir) == "finished":
            return 0
        info = slurm_job_info(str(self.job.job_id))
        if info is not None and info.state.split()[0] not in TERMINAL_SLURM_STATES:
            return None  # preempted or timed out and requeued: the same job id runs again
        return 1

    def stop(self) -> None:
        if self.job is not None and _run_state(self.run_dir) != "finished":
            # scancel right away (a no-op for an ended job): the Ray actor may be torn down any moment now, and
            # submitit's job.done() can be slow without Slurm accounting
            note(self.run_dir, "cancelling Slurm job %s", self.job.job_id)
            subprocess.run(
                ["scancel", str(self.job.job_id)], check=False, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
            )
        if self.guard_pid is not None:  # disarm the guard: the job is done or cancelled
            try:
                os.kill(self.guard_pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            self.guard_pid = None

    def describe_failure(self, rc: int) -> str:
        job_id = getattr(self.job, "job_id", "?")
        return f"Slurm job {job_id} ended in state {getattr(self.job, 'state', '?')}; see {self.run_dir / 'slurm'}"


# ------------------------------------------------------------------------------------------------------ the trial


def _run_state(run_dir: Path) -> str | None:
    """``state`` of the run's ``status.json`` (running, finished, failed, preempted), None if unreadable."""
    try:
        return json.loads((run_dir / STATUS).read_text()).get("state")
    except (OSError, ValueError, AttributeError):
        return None


def _read_events(path: Path) -> list[dict[str, Any]]:
    tail = MetricsTail(path)
    return tail.read()


def _prepare_resume(run_dir: Path, trial_id: str, checkpoint: Any) -> tuple[str | None, int, int]:
    """Decide how a (re)started trial resumes.

    Returns:
        ``(resume, reported_step, resume_step)``: the ``--resume`` path (None: the run dir's own auto-resume), the step
        of the checkpoint Ray Tune restored the trial to (its evals up to there are known to Ray Tune; -1 if none),
        and the step the training run will restart from (0: from scratch).
    """
    own = newest_checkpoint(run_dir)
    if checkpoint is None:
        return None, -1, (own.step or 0) if own else 0
    src = Path(checkpoint.path)
    try:
        meta = json.loads((src / CHECKPOINT_META).read_text())
    except (OSError, ValueError):
        meta = {}
    step = meta.get("step") if isinstance(meta.get("step"), int) else -1
    is_own = meta.get("trial_id") == trial_id
    if is_own and own is not None:
        return None, step, own.step or 0  # auto-resume from the run dir's newest complete checkpoint (>= this one)
    # PBT exploit (another trial's checkpoint), or the run dir lost its checkpoints: copy it next to the run first,
    # because the donor's Ray Tune retention may delete the original while the run is loading it.
    dest_root = run_dir / SWEEP_SUBDIR / "resume_from"
    shutil.rmtree(dest_root, ignore_errors=True)
    dest = dest_root / (meta.get("tag") or src.name)
    dest_root.mkdir(parents=True, exist_ok=True)
    shutil.copytree(src, dest, copy_function=_link_or_copy)
    if not is_own:
        # The trial's own lineage is abandoned: its checkpoints must not be auto-resumed later instead of the clone.
        shutil.rmtree(run_dir / CHECKPOINTS, ignore_errors=True)
        note(run_dir, "PBT exploit: continuing from trial %s's checkpoint (step %s)", meta.get("trial_id"), step)
    return str(dest), step, max(step, 0)


def run_trial(config: dict[str, Any], spec: TrialSpec) -> None:
    """Ray Tune function trainable: one training run, reported per eval event.

    Args:
        config: Sampled values keyed by dotted config path (``{"optim.lr": 3e-4}``).
        spec: What all trials share.
    """
    from ray import tune  # noqa: PLC0415 - Ray is imported lazily (STYLE rule 12)

    trial_id = tune.get_context().get_trial_id()
    run_dir = Path(spec.trials_dir) / trial_id
    (run_dir / SWEEP_SUBDIR).mkdir(parents=True, exist_ok=True)
    write_atomic(run_dir / SWEEP_SUBDIR / "trial.json", json.dumps({"trial_id": trial_id, "params": config}))
    staging = run_dir / SWEEP_SUBDIR / "staging"
    shutil.rmtree(staging, ignore_errors=True)
    max_steps = int(config.get("trainer.max_steps", spec.max_steps))
    metrics_path = run_dir / METRICS

    # An earlier life of this trial (PBT pause, retry, killed driver) may still be ending: its run must be gone before
    # this one reads the run dir or starts in it.
    if spec.backend == "slurm":
        _cancel_previous_job(run_dir)
    else:
        stop_previous_run(run_dir, spec.stop_grace_s)
    resume, reported_step, resume_step = _prepare_resume(run_dir, trial_id, tune.get_checkpoint())
    if resume is None and newest_checkpoint(run_dir) is None and run_history(run_dir):
        # an earlier life failed before its first checkpoint: `pretrain train` refuses to start over a history
        # silently, and this trial starts from step 0 again, so its history is set aside (kept) first
        note(run_dir, "no checkpoint to resume from: earlier attempt moved to %s", set_aside_history(run_dir))
    overrides = trial_overrides(spec, config, trial_id)
    if spec.backend == "slurm":
        run: LocalRun | _SlurmRun = _SlurmRun(spec, overrides, resume, run_dir)
    else:
        cmd = [*spec.train_command, spec.base, *overrides, "--nproc", str(spec.nproc)]
        if resume:
            cmd += ["--resume", resume]
        # the run's ranks share the trial's CPUs, not the machine's: `pretrain train` divides OMP_NUM_THREADS among them
        env = {**os.environ, "OMP_NUM_THREADS": str(spec.cpus)}
        run = LocalRun(cmd, run_dir, spec.stop_grace_s, cwd=spec.workdir or None, env=env)

    reported_tag: str | None = None
    last_train: dict[str, Any] | None = None

    def report(event: dict[str, Any], with_checkpoint: bool = True) -> None:
        nonlocal reported_tag, reported_step
        reported_step = int(event.get("step", -1))
        metrics = _report_metrics(event, last_train)
        if max_steps and reported_step >= max_steps:
            # The last eval ends the trial without a scheduler decision: PBT would otherwise pause it to exploit a
            # donor and mutate its config once more, for a run with no step left to train with them.
            metrics["done"] = True
        ckpt = newest_checkpoint(run_dir) if with_checkpoint else None
        staged = None
        if ckpt is not None and (spec.always_checkpoint or ckpt.tag != reported_tag):
            staged = stage_checkpoint(ckpt, staging / ckpt.tag, {"trial_id": trial_id, "run_dir": str(run_dir)})
        if staged is not None and ckpt is not None:
            reported_tag = ckpt.tag
            tune.report(metrics, checkpoint=tune.Checkpoint.from_directory(str(staged)))
            shutil.rmtree(staged, ignore_errors=True)  # Ray Tune has copied it into its storage
        else:
            tune.report(metrics)

    def report_held(event: dict[str, Any]) -> None:
        """``report`` while the run waits at the event's step (:mod:`pretrain.sweep_hook`), then let it go on; when
        Ray Tune stops the trial inside ``tune.report``, the ``finally`` below tells the run to stop instead."""
        report(event)
        decide(run_dir, int(event["step"]), CONTINUE)

    # Evals an earlier life of this run logged up to its resume step that Ray Tune does not know (the sweep driver
    # died after they were logged): report them first, so iterations keep matching steps. The run will cut its
    # metrics.jsonl back to the resume step and log everything after it again.
    replay = [e for e in _read_events(metrics_path) if reported_step < int(e.get("step", -1)) <= resume_step]
    for event in replay:
        if spec.metric in event:
            report(event, with_checkpoint=int(event.get("step", -1)) == resume_step)
        else:
            last_train = event
    reported_step = max(reported_step, resume_step)
    if resume is None and max_steps and resume_step >= max_steps and _run_state(run_dir) == "finished":
        # The run finished but the sweep driver died before Ray Tune recorded it: nothing to train again.
        note(run_dir, "the run already finished at step %d: nothing to train", resume_step)
        return
    tail = MetricsTail(metrics_path, from_end=True)
    pending: dict[str, Any] | None = None

    install_hook(run_dir, timeout_s=max(120.0, 4 * spec.stop_grace_s))  # the run waits for Tune at each eval
    heartbeat = Heartbeat(run_dir)
    try:
        run.start()
        rc = None
        while rc is None:
            rc = run.poll()
            for event in tail.read():
                step = int(event.get("step", -1))
                # An eval is reported once the run moved past its step (the checkpoint of that step, if any, is then
                # complete), or once a checkpoint of its step is complete; the final one once the run has exited.
                if pending is not None and step > int(pending["step"]):
                    report_held(pending)
                    pending = None
                if spec.metric in event:
                    if step > reported_step:
                        pending = event
                elif step > reported_step:
                    last_train = event
            if pending is not None and not (max_steps and int(pending["step"]) >= max_steps):
                ckpt = newest_checkpoint(run_dir)
                at_step = ckpt is not None and ckpt.step is not None and ckpt.step >= int(pending["step"])
                if at_step or waiting_step(run_dir) == int(pending["step"]):
                    report_held(pending)
                    pending = None
            if rc is None:
                time.sleep(spec.poll_s)
        if pending is not None:
            report(pending)
        if rc != 0:
            if rc == _EXIT_CONFIG_ERROR:
                raise RuntimeError(f"trial {trial_id}: config error (exit 2); {run.describe_failure(rc)}")
            raise RuntimeError(f"trial {trial_id}: {run.describe_failure(rc)}")
    except BaseException as e:  # SystemExit: Ray Tune stopped the trial inside tune.report
        note(run_dir, "trial stopped (%s)", type(e).__name__)
        raise
    finally:
        # First drop the staged hard links (they would keep checkpoint files alive after the trainer's retention).
        # A run waiting at its last report (Ray Tune stopped the trial there) is told to stop: it keeps that step's
        # checkpoint and exits by itself. Then stop the run: a no-op when it ended, SIGTERM/scancel otherwise.
        heartbeat.stop()
        shutil.rmtree(staging, ignore_errors=True)
        if run.poll() is None:
            waiting = waiting_step(run_dir) == reported_step
            decide(run_dir, reported_step, STOP)
            deadline = time.monotonic() + spec.stop_grace_s
            while waiting and run.poll() is None and time.monotonic() < deadline:
                time.sleep(0.2)
        run.stop()
