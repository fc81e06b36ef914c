"""``pretrain submit CONFIG [section.field=value ...] --cluster slurm|local ...``: a training run as a submitit job.

Flow: cluster parameters (:mod:`launch.cluster_params`: defaults < ``configs/cluster/<profile>.yaml`` < flags) and the
run config are validated first, without writing anything (bad values exit 2 naming the key and the fix). On Slurm the
partition and node count are checked against ``sinfo``. Then the resolved run config is frozen into
``RUN_DIR/slurm/config.yaml`` and one job with ``nodes x tasks_per_node`` tasks is submitted through submitit
(:func:`submit_plan`, which Slurm sweep trials use too). Each task is one rank: it exports the torch.distributed
variables and runs ``pretrain train`` in-process (:class:`TrainJob`). The command prints the job id and the run
directory. ``--dry-run`` prints the sbatch script submitit would write and submits nothing.

The task on the node does not unpickle on trust: it runs :mod:`launch.submitit_entry`, which loads submitit's job
pickle (in the run directory, which others may be able to write) as plain data, knowing only ``TrainJob``.

Preemption and time limits (USR2, ``slurm_signal_delay_s`` before the limit, or ``scancel --signal=USR2``): the
trainer's own handler makes every rank finish its step, agree, and write a checkpoint (COMPLETE marker last), then
exit as preempted. Rank 0 then hands over to submitit's requeue handler, which calls :meth:`TrainJob.checkpoint` and
runs ``scontrol requeue``; the requeued job resumes from the newest complete checkpoint. Timeouts are requeued up to
``max_timeout_requeues`` times, preemptions without limit; whether USR2 meant a timeout is read from Slurm's clock.
A job that Slurm itself is ending (``scancel``, Slurm's own preemption) is not requeued.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import functools
import logging
import os
import shlex
import shutil
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from data_pipeline.config import ConfigError
from launch.cluster_params import ClusterParams, load_cluster_params
from launch.status import (
    SLURM_SUBDIR,
    TERMINAL_SLURM_STATES,
    append_job_event,
    read_job_events,
    read_run_status,
    slurm_job_info,
    slurm_partitions,
)
from pretrain.config import Config, dump_config

__all__ = [
    "RunPlan",
    "TrainJob",
    "build_executor",
    "main",
    "register",
    "render_sbatch",
    "submit_plan",
    "validate_run",
]

logger = logging.getLogger(__name__)

FROZEN_CONFIG = "config.yaml"
"""The resolved run config the job trains with, in ``RUN_DIR/slurm/`` (requeued attempts read the same file)."""

_EXIT_OK, _EXIT_FAILED = 0, 1
# Slurm checks time limits periodically and may send the USR2 of --signal up to 60 s early (sbatch(1)); a signal
# this close to the limit (plus checkpoint time) is a timeout, anything earlier a preemption.
_TIMEOUT_SLACK_S = 90
_CHECKPOINT_WAIT_S = 120.0


# ----------------------------------------------------------------------------------------------------- run config


@dataclass
class RunPlan:
    """What :func:`validate_run` settled."""

    cfg: Config
    """The run config with absolute ``run.output_dir`` and ``data.path``."""
    warnings: list[str]
    finished: bool
    """The run's newest checkpoint already reached ``trainer.max_steps``."""


def validate_run(config: str, overrides: list[str], params: ClusterParams, trust_checkpoint: bool = False) -> RunPlan:
    """Check the run config for ``params.world_size`` ranks the way ``pretrain train`` does, writing nothing.

    Paths become absolute (the job may start elsewhere and a requeued job must find the same run). Without a data
    manifest on this machine (data only mounted on the compute nodes) the data checks are skipped with a warning.
    ``trust_checkpoint``: the run may resume from (or start from) a checkpoint not signed by this user.

    Raises:
        ConfigError: Naming the key or file and the fix.
    """
    from pretrain.config import absolute_paths, load_config
    from pretrain.engine import build_ds_config
    from pretrain.plan import validate_launch

    cfg = load_config(config, overrides)
    overrides = [*overrides, *absolute_paths(cfg)]
    cfg = load_config(config, overrides)
    warnings: list[str] = []
    if cfg.trainer.needs_gpu and not params.gpus_per_node:
        raise ConfigError(
            f"trainer.device={cfg.trainer.device} trainer.precision={cfg.trainer.precision} need GPUs: pass "
            "--gpus-per-node, or train on CPU: trainer.device=auto with trainer.precision=bf16 or fp32 (fp16 is "
            "GPU-only)"
        )
    if params.gpus_per_node and cfg.trainer.device == "cpu":
        warnings.append(f"--gpus-per-node={params.gpus_per_node} but trainer.device=cpu: the GPUs would sit idle")
    if not (Path(cfg.data.path) / "manifest.json").is_file():
        build_ds_config(cfg, params.world_size)  # batch arithmetic for this world size
        warnings.append(
            f"data.path={cfg.data.path} has no manifest.json on this machine: data checks skipped; the job fails "
            "at start unless its nodes see the data there"
        )
        return RunPlan(cfg, warnings, finished=False)
    checks = list(overrides)
    if cfg.trainer.needs_gpu and not _local_cuda():
        # the submitting host (a login node) need not have the job's GPUs: check everything else
        checks += ["trainer.device=cpu", "trainer.precision=fp32"]
    import submitit

    with submitit.helpers.clean_env():  # this process's own launcher variables are not the job's world
        plan = validate_launch(config, checks, params.world_size, None, False, trust_checkpoint=trust_checkpoint)
    return RunPlan(cfg, warnings, finished=plan.finished)


def _local_cuda() -> bool:
    import torch

    return torch.cuda.is_available()


# ------------------------------------------------------------------------------------------------------- executor


def build_executor(params: ClusterParams, folder: Path, job_name: str) -> Any:
    """A submitit ``AutoExecutor`` for ``params``, logging to ``folder`` (``RUN_DIR/slurm``).

    Raises:
        ConfigError: Slurm was asked for where its client (``srun``) is not installed.
    """
    import submitit

    if params.cluster == "slurm" and shutil.which("srun") is None:
        raise ConfigError(
            "--cluster slurm needs the Slurm client (srun, sbatch) on PATH; on a workstation start the local "
            "cluster with `make slurm-up`, or debug with --cluster local"
        )
    # the tasks start through launch.submitit_entry, which loads the job's pickle as plain data (see there)
    python = f"{shlex.quote(sys.executable)} -u -m launch.submitit_entry"
    executor = submitit.AutoExecutor(
        folder=folder,
        cluster=params.cluster,
        slurm_max_num_timeout=params.max_timeout_requeues,
        local_max_num_timeout=params.max_timeout_requeues,
        slurm_python=python,
        local_python=python,
    )
    executor.update_parameters(**params.executor_parameters(job_name))
    return executor


def submit_plan(plan: RunPlan, params: ClusterParams, *, argv: list[str], trust_checkpoint: bool = False) -> Any:
    """Submit the run :func:`validate_run` planned as one :class:`TrainJob`: ``pretrain submit`` and Slurm sweep trials.

    The resolved config is frozen into ``RUN_DIR/slurm/config.yaml`` (every requeued attempt trains with that file) and
    the submission is recorded in ``RUN_DIR/slurm/jobs.jsonl``. Whether the run already finished or has an active job
    is the caller's to check.

    Args:
        plan: What :func:`validate_run` returned for ``params``.
        params: Where and how to submit.
        argv: The command recorded with the submission.
        trust_checkpoint: Every attempt of the job passes ``--trust-checkpoint`` to ``pretrain train``.

    Returns:
        The submitit job.

    Raises:
        ConfigError: Slurm was asked for where its client (``srun``) is not installed.
    """
    import submitit

    run_dir = plan.cfg.run_dir
    folder = run_dir / SLURM_SUBDIR
    executor = build_executor(params, folder, plan.cfg.run.name)
    frozen = folder / FROZEN_CONFIG
    dump_config(plan.cfg, frozen)
    # a job submitted from inside a job (or a Ray worker) must not inherit its Slurm variables
    with submitit.helpers.clean_env():
        job = executor.submit(TrainJob(str(frozen), str(run_dir), params.slurm_signal_delay_s, trust_checkpoint))
    append_job_event(
        run_dir,
        "submit",
        job_id=str(job.job_id),
        cluster=params.cluster,
        params=dataclasses.asdict(params),
        world_size=params.world_size,
        config=str(frozen),
        argv=list(argv),
    )
    return job


def render_sbatch(params: ClusterParams, folder: Path, job_name: str) -> str:
    """The sbatch script submitit writes for this job (its own generator; nothing is written or submitted)."""
    if params.cluster != "slurm":  # (building a LocalExecutor would create its folder)
        shown = {k: v for k, v in params.executor_parameters(job_name).items() if not k.startswith("slurm_")}
        header = f"# --cluster {params.cluster}: no sbatch script; submitit's LocalExecutor runs the tasks here with"
        return "\n".join([header, *(f"#   {k}={v!r}" for k, v in sorted(shown.items()))])
    executor = build_executor(params, folder, job_name)
    inner = executor._executor  # SlurmExecutor: the same call submit() makes for <job>_submission.sh
    return inner._make_submission_file_text(inner._submitit_command_str, "dry-run")


def _check_slurm_resources(params: ClusterParams) -> list[str]:
    """Problems of ``params`` on this Slurm cluster (unknown partition, too few nodes), from ``sinfo``."""
    partitions = slurm_partitions()
    if partitions is None:
        return ["could not ask sinfo for the cluster's partitions (is slurmctld reachable?)"]
    problems = []
    name = params.slurm_partition
    if name is not None and name not in partitions:
        close = difflib.get_close_matches(name, list(partitions), n=2, cutoff=0.5)
        hint = f" (did you mean {', '.join(close)}?)" if close else ""
        problems.append(f"unknown partition '{name}'{hint}. Partitions here: {', '.join(sorted(partitions))}")
    elif name is not None and partitions[name] < params.nodes:
        problems.append(f"--nodes={params.nodes} but partition '{name}' has {partitions[name]} node(s)")
    elif name is None and partitions and max(partitions.values()) < params.nodes:
        problems.append(f"--nodes={params.nodes} but no partition has that many nodes ({partitions})")
    return problems


def _active_job(run_dir: Path) -> str | None:
    """The id of a job of this run that is still pending or running, if any."""
    submits = [e for e in read_job_events(run_dir) if e.get("event") == "submit"]
    if not submits:
        return None
    last = submits[-1]
    if last.get("cluster") != "slurm":
        return None
    info = slurm_job_info(str(last["job_id"]))
    if info is not None and info.state.split()[0] not in TERMINAL_SLURM_STATES:
        return f"{last['job_id']} ({info.state})"
    return None


# ------------------------------------------------------------------------------------------------------------- job


class TrainJob:
    """What every task of a submitted job runs: one rank of ``pretrain train``, in-process.

    It follows submitit's ``helpers.Checkpointable`` protocol (``__call__`` plus ``checkpoint`` returning a
    ``DelayedSubmission``), duck-typed rather than subclassed so that importing this module does not import
    submitit; submitit itself only looks for the ``checkpoint`` method. Only paths, numbers and a flag are pickled (the
    task loads them as plain data: :mod:`launch.submitit_entry`): the requeued job finds its checkpoint by looking,
    never through a path baked into the pickle.
    """

    def __init__(self, config_path: str, run_dir: str, signal_delay_s: int, trust_checkpoint: bool = False):
        self.config_path = config_path
        self.run_dir = run_dir
        self.signal_delay_s = signal_delay_s
        self.trust_checkpoint = trust_checkpoint

    def __call__(self) -> dict[str, Any]:
        import submitit

        from launch.cmd_train import EXIT_OK, EXIT_PREEMPTED
        from launch.cmd_train import main as train_main
        from pretrain.plan import validate_launch

        env = submitit.JobEnvironment()
        # submitit installed its USR2 handler (rank 0: checkpoint() + requeue) before calling us; the trainer replaces
        # it while it trains and puts it back when it returns.
        handler = _submitit_signal_handler()
        if handler is not None:
            # Whether USR2 meant "time limit" comes from Slurm's clock, not from submitit's guess based on the
            # requested time (which calls every signal of a job under 10 minutes a timeout).
            handler.has_timed_out = functools.partial(_timed_out, env, self.signal_delay_s, handler.has_timed_out)
        submitit.helpers.TorchDistributedEnvironment().export(set_cuda_visible_devices=False, overwrite=True)
        rank0 = env.global_rank == 0
        if rank0:
            append_job_event(
                self.run_dir,
                "start",
                job_id=env.job_id,
                cluster=env.cluster,
                slurm_restart_count=int(os.environ.get("SLURM_RESTART_COUNT", "0") or 0),
                hosts=list(env.hostnames),
                world_size=env.num_tasks,
            )
        try:
            try:  # what `pretrain train` checks first, here so that its message ends up in the job's record
                validate_launch(self.config_path, [], None, None, False, trust_checkpoint=self.trust_checkpoint)
            except ConfigError as e:
                raise RuntimeError(f"config error at start on {env.hostname}: {e}") from e
            code = train_main([self.config_path, *(["--trust-checkpoint"] if self.trust_checkpoint else [])])
            if code == EXIT_PREEMPTED and rank0:
                # every rank finished its step and the collective save wrote COMPLETE: requeue the whole job
                self._requeue(env, handler)
        except Exception as e:
            if rank0:
                refused = type(e).__name__ == "UncompletedJobError"  # submitit: timeout budget spent
                append_job_event(
                    self.run_dir, "end", job_id=env.job_id, state="failed", message=str(e), requeue_refused=refused
                )
            raise
        if code == EXIT_OK:
            signal.signal(signal.SIGUSR2, signal.SIG_IGN)  # finished: a late USR2 must not requeue the run
            if rank0:
                append_job_event(self.run_dir, "end", job_id=env.job_id, state="finished")
            return {"state": "finished", "run_dir": self.run_dir}
        if code != EXIT_PREEMPTED:
            message = f"rank {env.global_rank}: `pretrain train` exited with code {code}"
            if rank0:
                append_job_event(self.run_dir, "end", job_id=env.job_id, state="failed", message=message)
            raise RuntimeError(message)
        return {"state": "preempted", "run_dir": self.run_dir}  # rank 0 exits inside a requeue

    def checkpoint(self, *args: Any, **kwargs: Any) -> Any:
        """Called by submitit on rank 0 right before ``scontrol requeue``: the next attempt runs this same callable.

        The training checkpoint itself is written by the trainer on every rank when the signal arrives; this waits
        until it is complete (COMPLETE marker), records the requeue in ``RUN_DIR/slurm/jobs.jsonl`` and returns the
        resubmission. A signal that arrives before training started finds the previous checkpoint (or none).
        """
        import submitit
        from submitit.helpers import DelayedSubmission

        env = submitit.JobEnvironment()
        rs = read_run_status(self.run_dir, query_slurm=False)
        tag = self._complete_checkpoint(rs)
        timed_out = _timed_out(env, self.signal_delay_s, lambda: None)
        append_job_event(
            self.run_dir,
            "requeue",
            job_id=env.job_id,
            reason={True: "timeout", False: "preemption", None: "signal"}[timed_out],
            step=rs.step if rs.trainer_state == "preempted" else None,
            checkpoint=tag,
        )
        logger.info("requeueing: the next attempt resumes from %s", tag or "the start (no checkpoint yet)")
        return DelayedSubmission(self, *args, **kwargs)

    def _complete_checkpoint(self, rs: Any) -> str | None:
        from pretrain.checkpoint import find_resume_checkpoint, verify_checkpoint

        if rs.trainer_state == "preempted" and rs.last_checkpoint:
            deadline = time.monotonic() + _CHECKPOINT_WAIT_S
            while True:
                ok, reason = verify_checkpoint(rs.last_checkpoint)
                if ok:
                    return rs.last_checkpoint
                if time.monotonic() > deadline:
                    logger.error("checkpoint %s is incomplete (%s); the next attempt resumes from an older one",
                                 rs.last_checkpoint, reason)  # fmt: skip
                    break
                time.sleep(1.0)
        # only named in the record: the next attempt checks the signature itself (and refuses, naming the flag)
        found = find_resume_checkpoint(Path(self.run_dir) / "checkpoints", trusted=True)
        return str(found) if found else None

    def _requeue(self, env: Any, handler: Any) -> None:
        """Rank 0 after the trainer stopped on a signal: requeue through submitit, unless Slurm is ending the job."""
        if handler is None:
            raise RuntimeError("preempted outside a submitit job: cannot requeue; run the same command to resume")
        info = slurm_job_info(env.job_id) if env.cluster == "slurm" else None
        if info is not None and info.state.split()[0] != "RUNNING":
            # scancel (SIGTERM), or Slurm preempting/requeueing the job itself: it is not ours to requeue
            logger.warning("job %s is %s: not requeueing it; resubmit to resume", env.job_id, info.state)
            append_job_event(self.run_dir, "end", job_id=env.job_id, state="preempted")
            return
        # checkpoint(), pickle, `scontrol requeue`, exit; raises UncompletedJobError when the timeout budget is spent
        handler.checkpoint_and_try_requeue(signal.SIGUSR2)


def _submitit_signal_handler() -> Any:
    """submitit's ``SignalHandler`` behind the current USR2 handler, or None outside a submitit job."""
    owner = getattr(signal.getsignal(signal.SIGUSR2), "__self__", None)
    return owner if hasattr(owner, "checkpoint_and_try_requeue") and hasattr(owner, "has_timed_out") else None


def _timed_out(env: Any, signal_delay_s: int, fallback: Any) -> bool | None:
    """True if USR2 came for the time limit: Slurm says the attempt is within ``signal_delay_s`` (+slack) of it."""
    info = slurm_job_info(env.job_id) if env.cluster == "slurm" else None
    if info is None or info.time_left_s is None:
        return fallback()
    return info.time_left_s <= signal_delay_s + _TIMEOUT_SLACK_S


# ------------------------------------------------------------------------------------------------------------ CLI


def register(subparsers: Any) -> None:
    """Add the ``submit`` subcommand."""
    p = subparsers.add_parser(
        "submit",
        help="submit a training run to Slurm (or run it through submitit locally)",
        description=__doc__.split("\n\n")[0],
    )
    p.add_argument("config", help="run config YAML, e.g. configs/run/digits_sepvit_lite.yaml")
    p.add_argument("overrides", nargs="*", default=[], help="section.field=value overrides of the run config")
    p.add_argument(
        "--profile", default=None, metavar="NAME", help="cluster profile: configs/cluster/NAME.yaml (or a YAML path)"
    )
    p.add_argument("--cluster", choices=["slurm", "local"], default=None, help="default: the profile's, else slurm")
    p.add_argument("--nodes", type=int, default=None, metavar="N")
    p.add_argument("--gpus-per-node", type=int, default=None, metavar="G", help="GPUs per node (one task per GPU)")
    p.add_argument(
        "--tasks-per-node", type=int, default=None, metavar="N", help="CPU: ranks per node (GPU: one per GPU)"
    )
    p.add_argument("--cpus-per-task", type=int, default=None, metavar="N")
    p.add_argument("--mem-gb", type=float, default=None, metavar="GB", help="memory per node")
    p.add_argument(
        "--time-min", type=int, default=None, dest="timeout_min", metavar="MIN", help="time limit of an attempt"
    )
    p.add_argument("--partition", default=None, dest="slurm_partition", metavar="NAME")
    p.add_argument("--account", default=None, dest="slurm_account", metavar="NAME")
    p.add_argument("--qos", default=None, dest="slurm_qos", metavar="NAME")
    p.add_argument("--constraint", default=None, dest="slurm_constraint", metavar="FEATURES")
    p.add_argument("--signal-delay-s", type=int, default=None, dest="slurm_signal_delay_s", metavar="S",
                   help="USR2 this many seconds before the time limit")  # fmt: skip
    p.add_argument("--max-timeout-requeues", type=int, default=None, metavar="N", help="default: the profile's (3)")
    p.add_argument("--trust-checkpoint", action="store_true",
                   help="resume from (or model.init_from) a checkpoint not signed by your key")  # fmt: skip
    p.add_argument("--dry-run", action="store_true", help="print the sbatch script; submit nothing")
    p.add_argument("--wait", action="store_true", help="wait until the run finishes (through requeues)")
    p.set_defaults(func=_run, accepts_overrides=True)


_FLAG_KEYS = (
    "cluster",
    "nodes",
    "gpus_per_node",
    "tasks_per_node",
    "cpus_per_task",
    "mem_gb",
    "timeout_min",
    "slurm_partition",
    "slurm_account",
    "slurm_qos",
    "slurm_constraint",
    "slurm_signal_delay_s",
    "max_timeout_requeues",
)


def _run(args: argparse.Namespace) -> int:
    params = load_cluster_params(args.profile, **{k: getattr(args, k) for k in _FLAG_KEYS})
    plan = validate_run(args.config, list(args.overrides), params, args.trust_checkpoint)
    run_dir = plan.cfg.run_dir
    folder = run_dir / SLURM_SUBDIR
    problems = _check_slurm_resources(params) if params.cluster == "slurm" else []
    for w in plan.warnings:
        print(f"pretrain submit: warning: {w}", file=sys.stderr)
    if args.dry_run:
        for p in problems:
            print(f"pretrain submit: warning: {p}", file=sys.stderr)
        print(render_sbatch(params, folder, plan.cfg.run.name))
        return _EXIT_OK
    if problems:
        raise ConfigError("; ".join(problems))
    if plan.finished:
        print(f"pretrain submit: {run_dir} already finished (trainer.max_steps={plan.cfg.trainer.max_steps}); "
              "nothing submitted")  # fmt: skip
        return _EXIT_OK
    active = _active_job(run_dir)
    if active:
        raise ConfigError(f"{run_dir} already has job {active}; `pretrain cancel {run_dir}` first, or set run.name")

    job = submit_plan(plan, params, argv=sys.argv, trust_checkpoint=args.trust_checkpoint)
    shape = f"{params.nodes} node(s) x {params.ntasks_per_node} task(s)"
    if params.gpus_per_node:
        shape += " x 1 GPU"
    where = f", partition {params.slurm_partition}" if params.slurm_partition else ""
    print(f"pretrain submit: job {job.job_id} submitted to {params.cluster} ({shape}{where}, {params.timeout_min} min)")
    print(f"  run dir: {run_dir}")
    print(f"  status:  pretrain status {run_dir}")
    print(f"  cancel:  pretrain cancel {run_dir}")
    print(f"  logs:    {folder}/{job.job_id}_<task>_log.{{out,err}}")
    sys.stdout.flush()
    if args.wait:
        return _wait(run_dir, job, params)
    return _EXIT_OK


def _wait(run_dir: Path, job: Any, params: ClusterParams, poll_s: float = 5.0) -> int:
    """Follow the job through requeues until the run ends; exit 0 only if it finished."""
    last = None
    while True:
        local_done = params.cluster == "local" and job.done()  # submitit knows its own local processes best
        rs = read_run_status(run_dir, query_slurm=not local_done)
        shown = (rs.state, rs.slurm_state, rs.restarts)
        if shown != last:
            step = f" step {rs.step}/{rs.max_steps}" if rs.step is not None else ""
            print(f"pretrain submit: {rs.state} (job {rs.job_id}: {rs.slurm_state or '-'}){step}", flush=True)
            last = shown
        if local_done or (params.cluster == "slurm" and rs.state in ("finished", "failed", "cancelled")):
            break
        time.sleep(poll_s)
    if params.cluster == "slurm":
        # the run is over; let Slurm finish the job too (epilogue, task exit) so its state is final when we return
        deadline = time.monotonic() + 120.0
        while rs.slurm_state in ("RUNNING", "COMPLETING", "CONFIGURING") and time.monotonic() < deadline:
            time.sleep(min(poll_s, 2.0))
            rs = read_run_status(run_dir, query_slurm=True)
    summary = f"pretrain submit: run {rs.state}"
    if rs.last_eval.get("val_top1") is not None:
        summary += f", val_top1={rs.last_eval['val_top1']:.4f} (step {rs.last_eval.get('step')})"
    print(summary)
    if rs.state != "finished":
        print(f"  see: pretrain status {run_dir}")
    return _EXIT_OK if rs.state == "finished" else _EXIT_FAILED


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``python -m launch.submit`` (same as ``pretrain submit``)."""
    from launch.cli import main as cli_main

    return cli_main(["submit", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    sys.exit(main())
