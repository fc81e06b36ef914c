"""Cluster parameters of a submitted job: ``ClusterParams`` defaults < ``configs/cluster/<profile>.yaml`` < flags.

Names follow submitit's AutoExecutor: generic parameters (``timeout_min``, ``mem_gb``, ``tasks_per_node``) and
``slurm_``-prefixed ones only where they mean nothing elsewhere (``slurm_partition``, ``slurm_signal_delay_s``). Unknown
profiles and keys, wrong types and invalid values raise ``ConfigError`` naming the key and the closest valid keys,
before anything is written or submitted (the checks of run configs: :func:`pretrain.config.build_dataclass`).
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from data_pipeline.config import ConfigError
from pretrain.config import CONFIGS_DIR, build_dataclass
from pretrain.yaml_io import read_yaml_mapping

__all__ = ["CLUSTER_PROFILES_DIR", "ClusterParams", "load_cluster_params"]

CLUSTER_PROFILES_DIR = CONFIGS_DIR / "cluster"
"""``--profile NAME`` reads ``configs/cluster/NAME.yaml``."""


@dataclass
class ClusterParams:
    """Where and how a run is submitted: the one list of valid profile keys and ``pretrain submit`` flags."""

    cluster: Literal["slurm", "local"] = "slurm"
    """``slurm``, or ``local``: submitit's LocalExecutor runs the tasks on this machine (for debugging)."""
    nodes: int = 1
    """Nodes of the job."""
    gpus_per_node: int = 0
    """GPUs per node; with GPUs there is one task (rank) per GPU."""
    tasks_per_node: int | None = None
    """Ranks per node. CPU: the number of processes; GPU: must equal gpus_per_node (the default)."""
    cpus_per_task: int | None = None
    """CPU cores per rank (loader workers + 1 is a good start); None keeps the cluster's default."""
    mem_gb: float | None = None
    """Memory per node in GB; None keeps the cluster's default."""
    timeout_min: int = 60
    """Time limit of one attempt in minutes; before it the job checkpoints and requeues itself."""
    max_timeout_requeues: int = 3
    """Requeues after reaching the time limit (a preemption requeues without limit)."""
    slurm_partition: str | None = None
    """Partition (checked with sinfo before submitting); None uses the cluster's default partition."""
    slurm_account: str | None = None
    """Account to charge."""
    slurm_qos: str | None = None
    """Quality of service."""
    slurm_constraint: str | None = None
    """Node features, e.g. ``h100`` or ``a100|h100``."""
    slurm_signal_delay_s: int = 90
    """USR2 arrives this many seconds before the time limit (enough to finish a step and checkpoint)."""
    slurm_setup: list[str] = field(default_factory=list)
    """Shell lines run in the batch script before the tasks start (module loads, exports)."""
    slurm_additional_parameters: dict[str, Any] = field(default_factory=dict)
    """Any other sbatch option, e.g. ``{exclusive: true, mail-type: END}``."""

    def __post_init__(self):
        for name in ("nodes", "timeout_min"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name}={getattr(self, name)} must be >= 1")
        if self.gpus_per_node < 0:
            raise ConfigError(f"gpus_per_node={self.gpus_per_node} must be >= 0")
        for name in ("tasks_per_node", "cpus_per_task"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ConfigError(f"{name}={value} must be >= 1 (or unset)")
        if self.gpus_per_node and self.tasks_per_node not in (None, self.gpus_per_node):
            raise ConfigError(
                f"tasks_per_node={self.tasks_per_node} with gpus_per_node={self.gpus_per_node}: GPU jobs run one task "
                "per GPU; drop tasks_per_node (--tasks-per-node) or set it to gpus_per_node"
            )
        if self.mem_gb is not None and self.mem_gb <= 0:
            raise ConfigError(f"mem_gb={self.mem_gb} must be positive (or unset)")
        if self.max_timeout_requeues < 0:
            raise ConfigError(f"max_timeout_requeues={self.max_timeout_requeues} must be >= 0")
        if not 0 <= self.slurm_signal_delay_s < self.timeout_min * 60:
            raise ConfigError(
                f"slurm_signal_delay_s={self.slurm_signal_delay_s} must be >= 0 and below timeout_min*60="
                f"{self.timeout_min * 60} (the signal would come before the job starts)"
            )
        for name in ("slurm_partition", "slurm_account", "slurm_qos", "slurm_constraint"):
            if getattr(self, name) == "":
                raise ConfigError(f"{name} is empty; leave it unset for the cluster's default")
        if self.cluster == "local" and self.nodes != 1:
            raise ConfigError(f"nodes={self.nodes} with cluster=local: the local executor runs on this machine only")

    @property
    def ntasks_per_node(self) -> int:
        """Ranks per node after defaults: one per GPU, else ``tasks_per_node`` or 1."""
        return self.gpus_per_node or self.tasks_per_node or 1

    @property
    def world_size(self) -> int:
        return self.nodes * self.ntasks_per_node

    def executor_parameters(self, job_name: str) -> dict[str, Any]:
        """Keyword arguments of ``AutoExecutor.update_parameters`` (unset values left out)."""
        params: dict[str, Any] = {
            "name": job_name,
            "timeout_min": self.timeout_min,
            "nodes": self.nodes,
            "tasks_per_node": self.ntasks_per_node,
            "cpus_per_task": self.cpus_per_task,
            "mem_gb": self.mem_gb,
            # an explicit --gpus-per-node=0 is rejected by clusters without GPU GRES: leave it out on CPU
            "gpus_per_node": self.gpus_per_node or None,
            "slurm_partition": self.slurm_partition,
            "slurm_account": self.slurm_account,
            "slurm_qos": self.slurm_qos,
            "slurm_constraint": self.slurm_constraint,
            "slurm_signal_delay_s": self.slurm_signal_delay_s,
            "slurm_setup": list(self.slurm_setup) or None,
            # --requeue: `scontrol requeue` must work also where the cluster's JobRequeue default is 0
            "slurm_additional_parameters": {"requeue": True, **self.slurm_additional_parameters},
        }
        return {k: v for k, v in params.items() if v is not None}


def _profile_path(profile: str) -> Path:
    p = Path(profile)
    if p.suffix in (".yaml", ".yml"):
        if p.is_file():
            return p
        raise ConfigError(f"cluster profile file '{profile}' does not exist")
    path = CLUSTER_PROFILES_DIR / f"{profile}.yaml"
    if path.is_file():
        return path
    known = sorted(x.stem for x in CLUSTER_PROFILES_DIR.glob("*.yaml"))
    close = difflib.get_close_matches(profile, known, n=2, cutoff=0.5)
    hint = f" (did you mean {', '.join(close)}?)" if close else ""
    raise ConfigError(
        f"cluster profile '{profile}' not found in {CLUSTER_PROFILES_DIR}{hint}. Known: {', '.join(known)}"
    )


def load_cluster_params(profile: str | None = None, **flags: Any) -> ClusterParams:
    """Cluster parameters: ``ClusterParams`` defaults < profile YAML < ``flags`` (None values are not set), checked by
    the code that checks run configs (:func:`pretrain.config.build_dataclass`).

    Raises:
        ConfigError: Unknown profile or key (with the closest valid keys), wrong type or invalid value.
    """
    path = _profile_path(profile) if profile else None
    values = read_yaml_mapping(path, " of cluster keys") if path else {}
    values.update({k: v for k, v in flags.items() if v is not None})
    try:
        return build_dataclass(ClusterParams, values, kind="cluster")
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}" if path else str(e)) from e
