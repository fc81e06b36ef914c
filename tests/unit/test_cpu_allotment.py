"""A rank uses the CPUs it was given (affinity mask, Slurm task, OMP_NUM_THREADS), never one thread per core of the
machine: two processes of 2 threads each on 2 cores run many times slower than with 1 each.

The real-process tests set the affinity of a child process (what cgroups, ``taskset`` and a cluster's task plugin
do) and read ``torch.get_num_threads()`` after the same ``init_distributed`` every rank runs.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from conftest import train_env

from pretrain.distributed import cpu_allotment, cpu_threads_per_rank

CORES = len(os.sched_getaffinity(0))


def test_allotment_is_the_smallest_of_affinity_slurm_task_and_omp() -> None:
    assert cpu_allotment({}) == CORES
    assert cpu_allotment({"SLURM_CPUS_PER_TASK": "1"}) == 1
    assert cpu_allotment({"OMP_NUM_THREADS": "1", "SLURM_CPUS_PER_TASK": "64"}) == 1
    assert cpu_allotment({"OMP_NUM_THREADS": str(CORES + 7)}) == CORES  # asking for more than the mask gives no more
    assert cpu_allotment({"OMP_NUM_THREADS": "", "SLURM_CPUS_PER_TASK": "junk"}) == CORES  # unreadable: ignored


def test_threads_per_rank_divide_the_mask_but_not_a_per_process_share() -> None:
    if CORES < 2:
        pytest.skip("needs 2 CPUs")
    # no explicit share: the ranks of the node split the mask
    assert cpu_threads_per_rank(2, environ={}) == CORES // 2
    assert cpu_threads_per_rank(CORES * 4, environ={}) == 1  # never 0
    # OMP_NUM_THREADS (set by our launcher to each rank's part) and SLURM_CPUS_PER_TASK (each task has its own) are
    # per process already
    assert cpu_threads_per_rank(2, environ={"OMP_NUM_THREADS": "2"}) == 2
    assert cpu_threads_per_rank(2, environ={"SLURM_CPUS_PER_TASK": "2"}) == 2
    # DataLoader workers come out of the same share
    assert cpu_threads_per_rank(1, loader_workers=1, environ={"OMP_NUM_THREADS": "2"}) == 1
    assert cpu_threads_per_rank(1, loader_workers=8, environ={"OMP_NUM_THREADS": "2"}) == 1


_PROBE = """
import json, os, sys
os.sched_setaffinity(0, {int(c) for c in sys.argv[1].split(",")})
from pretrain.distributed import destroy_distributed, init_distributed
init_distributed(device="cpu", loader_workers=int(sys.argv[2]))
import torch
print(json.dumps({"threads": torch.get_num_threads()}))
destroy_distributed()
"""


def _threads_of_a_rank(cpus: str, loader_workers: int = 0, **env: str) -> int:
    """torch's intra-op threads in a fresh world-of-one process pinned to ``cpus``, after ``init_distributed``."""
    environ = train_env(**env)
    environ.pop("OMP_NUM_THREADS")  # train_env pins 1 for the test suite; these tests set what they mean
    environ.update(env)
    out = subprocess.run(
        [sys.executable, "-c", _PROBE, cpus, str(loader_workers)],
        env=environ,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])["threads"]


def test_two_one_cpu_processes_on_two_cores_each_get_one_thread() -> None:
    if CORES < 2:
        pytest.skip("needs 2 CPUs")
    cores = sorted(os.sched_getaffinity(0))[:2]
    # the whole mask without a share: one rank takes both cores (what a direct `pretrain train` on 2 cores gets)
    assert _threads_of_a_rank(f"{cores[0]},{cores[1]}") == 2
    # two processes, each given one core (a Ray trial with resources.cpu=1, a cgroup of 1 CPU): 1 thread each,
    # not torch's default of one per core of the machine
    assert _threads_of_a_rank(str(cores[0])) == 1
    assert _threads_of_a_rank(str(cores[1])) == 1
    # the same through the environment a launcher sets, with the mask still holding both cores
    assert _threads_of_a_rank(f"{cores[0]},{cores[1]}", OMP_NUM_THREADS="1") == 1
    # a loader worker counts against the rank's 2 CPUs
    assert _threads_of_a_rank(f"{cores[0]},{cores[1]}", loader_workers=1) == 1
