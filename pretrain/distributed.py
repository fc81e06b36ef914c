"""Distributed environment detection and process-group setup (Slurm, torchrun, the DeepSpeed launcher, or one process).

``detect_environment()`` reads the environment without touching ``torch.distributed`` (the ``pretrain train`` launcher
uses it to validate the world size before anything starts); ``init_distributed()`` then joins the process group:
gloo on CPU, NCCL on GPU.

Precedence when several launchers left variables behind: ``RANK``/``WORLD_SIZE`` (torchrun, the DeepSpeed launcher,
``pretrain train --nproc``, submitit's ``TorchDistributedEnvironment.export()``) win over Slurm's ``SLURM_PROCID``/
``SLURM_NTASKS``; with neither, the process is a world of one.

Host-side agreement (:func:`all_reduce_max`, :func:`broadcast_object`: stop flags, decisions, small objects) goes over
a gloo group of the same ranks when the main backend is NCCL, so it reads nothing back from the GPU and never waits for
the queued device work of a step (an NCCL collective on a CPU tensor is an error anyway).

A Slurm step read directly (``srun pretrain train``, one task per rank, on one node or many): the global rank is
``SLURM_PROCID`` and the world ``SLURM_NTASKS``; the local rank ``SLURM_LOCALID`` and the ranks on this node come from
the step's per-node task counts (``SLURM_STEP_TASKS_PER_NODE``, e.g. ``2(x3),1``) at this node's index
(``SLURM_NODEID``), so an uneven layout gives every node its own count; the rendezvous host is the first node of the
step (``SLURM_STEP_NODELIST``, where task 0 runs), else of the job, and its port is derived from the job id, so every
task of every node computes the same address without talking to the others.

CPU threads (:func:`cpu_threads_per_rank`): a rank uses the CPUs it was given, never the whole machine. Its share is
an explicit ``OMP_NUM_THREADS`` (the ``--nproc`` launcher and a sweep trial set it to their allotment divided among
their ranks), else ``SLURM_CPUS_PER_TASK`` (each Slurm task is allotted its own), else the affinity mask divided among
the ranks of the node; DataLoader workers of the rank count against the same share. Two ranks that each spin as
many OpenMP threads as the machine has cores run many times slower than with their share.

Importing this module does not import torch (the functions that need it do): ``pretrain train`` reads its environment
and takes the run's lease before the slow imports.
"""

from __future__ import annotations

import datetime
import logging
import os
import re
import shutil
import socket
import subprocess
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

_control_group = None
"""A gloo group of all ranks for host-side agreement when the default group is NCCL (None: the default group)."""

__all__ = [
    "DistEnv",
    "DistInfo",
    "all_gather_object",
    "all_reduce_max",
    "barrier",
    "broadcast_object",
    "cpu_allotment",
    "cpu_threads_per_rank",
    "destroy_distributed",
    "detect_environment",
    "expand_slurm_nodelist",
    "find_free_port",
    "sum_counts",
    "init_distributed",
    "slurm_master_addr",
    "slurm_tasks_on_node",
]

logger = logging.getLogger(__name__)

# Slurm jobs without an exported MASTER_PORT derive one from the job id, so every task of a job agrees on it.
_SLURM_PORT_BASE = 20000
_SLURM_PORT_SPAN = 20000


@dataclass(frozen=True)
class DistEnv:
    """What the environment says about this process's place in the job (nothing initialised yet)."""

    rank: int
    """Global rank."""
    world_size: int
    """Number of ranks in the job."""
    local_rank: int
    """Rank on this node (selects the GPU)."""
    local_world_size: int
    """Ranks on this node."""
    master_addr: str
    """Address of rank 0's rendezvous."""
    master_port: int
    """Port of rank 0's rendezvous (0: pick a free one, world of one only)."""
    source: str
    """Which environment was found: ``env`` (torchrun / DeepSpeed / --nproc), ``slurm`` or ``single``."""
    slurm_job_id: str | None = None
    """Slurm job id when running under Slurm."""


@dataclass(frozen=True)
class DistInfo:
    """The joined process group: ranks, device and backend."""

    rank: int
    world_size: int
    local_rank: int
    local_world_size: int
    backend: str
    device: torch.device
    source: str
    slurm_job_id: str | None = None

    @property
    def is_main(self) -> bool:
        """True on global rank 0, the rank that writes files shared by the run."""
        return self.rank == 0


def _int(env: Mapping[str, str], name: str, default: int | None = None) -> int:
    raw = env.get(name)
    if raw is None or raw == "":
        if default is None:
            raise ValueError(f"environment variable {name} is missing")
        return default
    try:
        return int(raw)
    except ValueError:
        raise ValueError(f"environment variable {name}={raw!r} is not an integer") from None


def expand_slurm_nodelist(nodelist: str) -> list[str]:
    """Expand a Slurm node list such as ``gpu[01-03,07],login1`` into host names (pure-Python fallback)."""
    hosts: list[str] = []
    # split on commas that are not inside brackets
    for part in re.findall(r"[^,\[]+(?:\[[^\]]*\])?[^,]*", nodelist):
        m = re.fullmatch(r"([^\[]*)\[([^\]]*)\](.*)", part)
        if not m:
            hosts.append(part)
            continue
        prefix, ranges, suffix = m.groups()
        for r in ranges.split(","):
            if "-" in r:
                lo, hi = r.split("-", 1)
                width = len(lo)
                hosts.extend(f"{prefix}{i:0{width}d}{suffix}" for i in range(int(lo), int(hi) + 1))
            else:
                hosts.append(f"{prefix}{r}{suffix}")
    return hosts


def slurm_tasks_on_node(tasks_per_node: str, node_id: int) -> int | None:
    """Tasks on node ``node_id`` from a Slurm per-node count such as ``2(x3),1`` (None when it cannot be read)."""
    counts: list[int] = []
    for part in tasks_per_node.split(","):
        m = re.fullmatch(r"\s*(\d+)(?:\(x(\d+)\))?\s*", part)
        if not m:
            return None
        counts.extend([int(m.group(1))] * int(m.group(2) or 1))
    return counts[node_id] if 0 <= node_id < len(counts) else None


def slurm_master_addr(nodelist: str) -> str:
    """First host of a Slurm node list (the step's or the job's): ``scontrol show hostnames``, else a local parser."""
    if shutil.which("scontrol"):
        try:
            out = subprocess.run(
                ["scontrol", "show", "hostnames", nodelist], capture_output=True, text=True, timeout=30, check=True
            ).stdout.split()
            if out:
                return out[0]
        except (subprocess.SubprocessError, OSError) as e:
            logger.warning("scontrol show hostnames %s failed (%s); parsing the node list locally", nodelist, e)
    hosts = expand_slurm_nodelist(nodelist)
    if not hosts:
        raise ValueError(f"cannot read a host from SLURM_JOB_NODELIST={nodelist!r}")
    return hosts[0]


def detect_environment(environ: Mapping[str, str] | None = None) -> DistEnv:
    """Read rank, world size and rendezvous from torchrun/DeepSpeed (``RANK``...) or Slurm (``SLURM_PROCID``...).

    Args:
        environ: Variables to read; ``os.environ`` by default.

    Returns:
        The process's place in the job. ``source="single"`` when no launcher variables are present.

    Raises:
        ValueError: A variable is malformed or a required companion variable is missing.
    """
    env = os.environ if environ is None else environ
    job_id = env.get("SLURM_JOB_ID") or None
    if "RANK" in env and "WORLD_SIZE" in env:
        world = _int(env, "WORLD_SIZE")
        rank = _int(env, "RANK")
        local_rank = _int(env, "LOCAL_RANK", 0)
        local_world = _int(env, "LOCAL_WORLD_SIZE", world)
        addr = env.get("MASTER_ADDR", "127.0.0.1")
        port = _int(env, "MASTER_PORT", 0 if world == 1 else None)
        source = "env"
    elif "SLURM_PROCID" in env and "SLURM_NTASKS" in env:
        rank = _int(env, "SLURM_PROCID")
        world = _int(env, "SLURM_NTASKS")
        local_rank = _int(env, "SLURM_LOCALID", 0)
        local_world = None
        for key in ("SLURM_STEP_TASKS_PER_NODE", "SLURM_TASKS_PER_NODE"):  # the step's own layout first
            if env.get(key):
                local_world = slurm_tasks_on_node(env[key], _int(env, "SLURM_NODEID", 0))
                break
        if local_world is None:
            local_world = _int(env, "SLURM_NTASKS_PER_NODE", world)
        nodelist = env.get("SLURM_STEP_NODELIST") or env.get("SLURM_JOB_NODELIST")  # task 0 runs on the step's first
        addr = env.get("MASTER_ADDR") or (slurm_master_addr(nodelist) if nodelist else "127.0.0.1")
        default_port = _SLURM_PORT_BASE + int(job_id or 0) % _SLURM_PORT_SPAN
        port = _int(env, "MASTER_PORT", default_port)
        source = "slurm"
    else:
        rank, world, local_rank, local_world, addr, port, source = 0, 1, 0, 1, "127.0.0.1", 0, "single"
    if not 0 <= rank < world:
        raise ValueError(f"rank {rank} is outside world size {world}")
    return DistEnv(rank, world, local_rank, local_world, addr, port, source, job_id)


def find_free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that was free a moment ago (for a local rendezvous)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def _positive_int(environ: Mapping[str, str], key: str) -> int | None:
    try:
        value = int(str(environ.get(key, "")).strip().split("(")[0])  # SLURM_CPUS_PER_TASK may read "2(x3)"
    except ValueError:
        return None
    return value if value > 0 else None


def cpu_allotment(environ: Mapping[str, str] | None = None) -> int:
    """CPUs this process may use, all its ranks and loader workers together.

    The smallest of: the affinity mask (cgroups and ``taskset`` shrink it), ``SLURM_CPUS_PER_TASK`` inside a Slurm
    task (with ``TaskPlugin=task/none`` the mask is the whole node), and an explicit ``OMP_NUM_THREADS``.
    """
    environ = os.environ if environ is None else environ
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cpus = os.cpu_count() or 1
    for key in ("SLURM_CPUS_PER_TASK", "OMP_NUM_THREADS"):
        given = _positive_int(environ, key)
        if given is not None:
            cpus = min(cpus, given)
    return max(1, cpus)


def cpu_threads_per_rank(
    local_world_size: int, loader_workers: int = 0, environ: Mapping[str, str] | None = None
) -> int:
    """Intra-op threads for one rank: its CPU share less one per DataLoader worker, at least 1.

    A rank's share is ``OMP_NUM_THREADS`` or ``SLURM_CPUS_PER_TASK`` when either is set (both are per process: a
    launcher that shares CPUs among ranks sets ``OMP_NUM_THREADS`` to each rank's share, and Slurm allots
    ``--cpus-per-task`` to every task), otherwise the affinity mask divided among the ``local_world_size`` ranks.
    """
    environ = os.environ if environ is None else environ
    share = cpu_allotment(environ)
    if _positive_int(environ, "OMP_NUM_THREADS") is None and _positive_int(environ, "SLURM_CPUS_PER_TASK") is None:
        share = max(1, share // max(1, local_world_size))
    return max(1, share - max(0, loader_workers))


def init_distributed(
    backend: str | None = None,
    device: str = "auto",
    timeout_min: float = 30.0,
    env: DistEnv | None = None,
    loader_workers: int = 0,
) -> DistInfo:
    """Join (or create) the default process group from the environment and pick this rank's device.

    Always initialises ``torch.distributed``, also for a world of one, because DeepSpeed needs a process group.

    Args:
        backend: ``gloo`` or ``nccl``; by default NCCL when the device is CUDA, gloo otherwise.
        device: ``auto`` (CUDA when available), ``cpu`` or ``cuda``.
        timeout_min: Collective timeout.
        env: Pre-detected environment; detected from ``os.environ`` when omitted.
        loader_workers: DataLoader workers of this rank (they share its CPUs; see :func:`cpu_threads_per_rank`).

    Returns:
        Rank, world size, backend and the ``torch.device`` this rank trains on.
    """
    import torch
    import torch.distributed as dist

    env = env or detect_environment()
    use_cuda = device == "cuda" or (device == "auto" and torch.cuda.is_available())
    if use_cuda:
        if not torch.cuda.is_available():
            raise RuntimeError("trainer.device=cuda but CUDA is not available")
        torch.cuda.set_device(env.local_rank % torch.cuda.device_count())
        dev = torch.device("cuda", torch.cuda.current_device())
    else:
        dev = torch.device("cpu")
        # ranks sharing a node share its cores: without this each rank starts one thread per core and they thrash
        threads = cpu_threads_per_rank(env.local_world_size, loader_workers)
        torch.set_num_threads(threads)
        logger.info("cpu: %d intra-op threads (allotment %d CPUs)", threads, cpu_allotment())
    backend = backend or ("nccl" if use_cuda else "gloo")
    port = env.master_port or find_free_port()
    # DeepSpeed and parts of torch read these even when the process group already exists
    os.environ.update(
        RANK=str(env.rank),
        WORLD_SIZE=str(env.world_size),
        LOCAL_RANK=str(env.local_rank),
        LOCAL_WORLD_SIZE=str(env.local_world_size),
        MASTER_ADDR=env.master_addr,
        MASTER_PORT=str(port),
    )
    if not dist.is_initialized():
        dist.init_process_group(
            backend=backend,
            init_method=f"tcp://{env.master_addr}:{port}",
            rank=env.rank,
            world_size=env.world_size,
            timeout=datetime.timedelta(minutes=timeout_min),
        )
    global _control_group
    if backend != "gloo" and env.world_size > 1:
        _control_group = dist.new_group(backend="gloo", timeout=datetime.timedelta(minutes=timeout_min))
    logger.info(
        "distributed: rank %d/%d (local %d/%d) on %s, rendezvous %s:%d, backend=%s device=%s from %s",
        env.rank,
        env.world_size,
        env.local_rank,
        env.local_world_size,
        os.environ.get("SLURMD_NODENAME") or socket.gethostname(),  # the Slurm node name where there is one
        env.master_addr,
        port,
        backend,
        dev,
        env.source,
    )
    return DistInfo(
        env.rank, env.world_size, env.local_rank, env.local_world_size, backend, dev, env.source, env.slurm_job_id
    )


def destroy_distributed() -> None:
    """Leave the process group (lets one Python process run several trainings, e.g. in tests)."""
    import torch.distributed as dist

    global _control_group
    _control_group = None
    if dist.is_initialized():
        dist.destroy_process_group()


def barrier() -> None:
    """Wait for every rank (no-op without a process group)."""
    import torch.distributed as dist

    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()


def all_reduce_max(values: list[float]) -> list[float]:
    """Element-wise maximum of ``values`` over all ranks (used for stop flags every rank must agree on), on the host."""
    import torch
    import torch.distributed as dist

    t = torch.tensor(values, dtype=torch.float64)
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(t, op=dist.ReduceOp.MAX, group=_control_group)
    return t.tolist()


def all_gather_object(obj: object) -> list[object]:
    """Every rank's ``obj``, in rank order (``[obj]`` without a process group)."""
    import torch.distributed as dist

    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return [obj]
    out: list[object] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def sum_counts(counts: dict[str, int]) -> dict[str, int]:
    """Every rank's ``counts`` summed key by key (this rank's alone without a process group)."""
    total: dict[str, int] = {}
    for rank_counts in all_gather_object(counts):
        for key, n in rank_counts.items():  # type: ignore[union-attr]
            total[key] = total.get(key, 0) + int(n)
    return total


def broadcast_object(obj: object, src: int = 0) -> object:
    """Rank ``src``'s ``obj`` on every rank (picklable objects only)."""
    import torch.distributed as dist

    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src, group=_control_group)
    return box[0]
