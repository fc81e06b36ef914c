"""What a piece of code would cost a GPU in launches and host syncs, counted on any device (the CPU included).

On a GPU a small model's step is bound by kernel launches (5-10 us of host time each) and by host reads of the
device (each waits for all queued work, and rules out CUDA graphs), not by arithmetic. CPU timings see neither, so
they are counted here at the dispatcher, where every aten op passes, whatever Python or C++ called it (DeepSpeed and
the optimizer included):

- **kernels**: aten ops that launch a device kernel. Views, metadata ops and bare allocations (``empty*``) launch
  none and are left out; a fill (``zeros``), a copy or a dtype cast is a kernel. Triton kernels are counted where they
  are launched (:func:`record_triton_launch`), so a fused path counts one kernel per launch under Triton's
  interpreter exactly as on a GPU. Collectives (``c10d`` ops) are counted apart: on NCCL each is a kernel too.
- **linalg**: factorisations and solves (``linalg_eigh``, ``linalg_inv`` ...): on CUDA each synchronises the host.
- **host reads**: ``_local_scalar_dense`` (``.item()``, ``float()``, ``bool()``, ``int()``), ops whose output shape
  depends on the data (``nonzero``, ``masked_select``, ``unique``...) and ``equal``, plus the reads that bypass the
  dispatcher (``.tolist()``, ``.numpy()``), each with the Python frame that asked for it.

No library does this: ``torch.profiler`` records CPU ops with their timings but has no notion of which ops launch a
device kernel, and counts Triton launches only on a GPU.
"""

from __future__ import annotations

import sys
import threading
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

__all__ = ["KernelCount", "KernelCounter", "count_kernels", "record_triton_launch"]

# ops that allocate or describe memory without running a kernel (views are found by ``OpOverload.is_view``)
_NO_KERNEL = frozenset(
    {
        "empty",
        "empty_like",
        "empty_strided",
        "new_empty",
        "new_empty_strided",
        "empty_permuted",
        "lift_fresh",
        "set_",
        "resize_",
        "_has_compatible_shallow_copy_type",
        "is_same_size",
        "sym_size",
        "sym_stride",
        "sym_numel",
        "sym_storage_offset",
        "record_stream",
        "_reshape_alias",
        "_unsafe_view",
        "_efficientzerotensor",
        "is_nonzero",  # its _local_scalar_dense is the read
        "item",
        "_record_function_enter_new",  # profiler ranges (torch.optim's step opens one): host-side markers
        "_record_function_exit",
    }
)
_HOST_READ = frozenset({"_local_scalar_dense", "equal"})
_DATA_DEPENDENT = frozenset({"nonzero", "masked_select", "unique", "_unique", "_unique2", "unique_consecutive"})
_UNDISPATCHED_READS = frozenset({"tolist", "numpy"})
_FACTORISATIONS = (
    "eig",
    "svd",
    "cholesky",
    "inv",
    "solve",
    "lstsq",
    "qr",
    "lu",
    "det",
    "pinv",
    "matrix_exp",
    "householder",
)
_SKIP_FRAMES = (f"{Path(torch.__file__).parent}{'/'}", __file__)

_active: list[KernelCounter] = []
_lock = threading.Lock()


@dataclass
class KernelCount:
    """What :class:`KernelCounter` saw."""

    by_op: Counter = field(default_factory=Counter)
    """Kernel launches per op name (``aten`` ops by overload packet name, Triton kernels as ``triton:<name>``)."""
    collectives: Counter = field(default_factory=Counter)
    """``c10d`` collectives per op name (kernels on NCCL, not counted in :attr:`kernels`)."""
    linalg: list[str] = field(default_factory=list)
    """Factorisation and solve ops, in order."""
    host_reads: list[str] = field(default_factory=list)
    """``op@file:function`` for every host read, in order (the frame is the first outside torch)."""

    @property
    def kernels(self) -> int:
        return sum(self.by_op.values())

    @property
    def triton(self) -> int:
        return sum(n for name, n in self.by_op.items() if name.startswith("triton:"))

    def top(self, k: int = 10) -> list[tuple[str, int]]:
        return self.by_op.most_common(k)


def _is_factorisation(name: str) -> bool:
    """``linalg_eigh``, ``_linalg_svd``, ``cholesky_solve``, ``inverse``...; not the norms (``linalg_vector_norm``)."""
    if "norm" in name:
        return False
    stem = name.removeprefix("_").removeprefix("linalg_")
    return stem == "inverse" or stem.startswith(_FACTORISATIONS) or name.startswith(("triangular_solve", "ormqr"))


def _caller() -> str:
    frame = sys._getframe(2)
    while frame is not None and frame.f_code.co_filename.startswith(_SKIP_FRAMES):
        frame = frame.f_back
    if frame is None:
        return "?"
    code = frame.f_code
    return f"{Path(code.co_filename).name}:{code.co_name}"


class _Reads(TorchFunctionMode):
    """The host reads that never reach the dispatcher (``tolist``, ``numpy``)."""

    def __init__(self, count: KernelCount):
        super().__init__()
        self.count = count

    def __torch_function__(self, func, types, args=(), kwargs=None):
        name = getattr(func, "__name__", "")
        if name in _UNDISPATCHED_READS:
            self.count.host_reads.append(f"{name}@{_caller()}")
        return func(*args, **(kwargs or {}))


class KernelCounter(TorchDispatchMode):
    """A context manager that counts kernels, linalg ops and host reads of the code run inside it (this thread).

    Example::

        with KernelCounter() as counter:
            loss = model(x).sum()
            loss.backward()
        print(counter.count.kernels, counter.count.host_reads)
    """

    def __init__(self):
        super().__init__()
        self.count = KernelCount()
        self._reads = _Reads(self.count)

    def __enter__(self) -> KernelCounter:
        self._reads.__enter__()
        super().__enter__()
        with _lock:
            _active.append(self)
        return self

    def __exit__(self, *exc: Any) -> None:
        with _lock:
            _active.remove(self)
        super().__exit__(*exc)
        self._reads.__exit__(*exc)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        namespace = func.namespace
        count = self.count
        if namespace == "c10d" or namespace == "_c10d_functional":
            count.collectives[name] += 1
        elif name in _HOST_READ:
            count.host_reads.append(f"{name}@{_caller()}")
        elif not func.is_view and name not in _NO_KERNEL:
            count.by_op[name] += 1
            if _is_factorisation(name):
                count.linalg.append(name)
            if name in _DATA_DEPENDENT:
                count.host_reads.append(f"{name}@{_caller()}")
        return func(*args, **(kwargs or {}))


def record_triton_launch(name: str) -> None:
    """Count one launch of the Triton kernel ``name`` in every active :class:`KernelCounter` (called by the wrappers
    that launch our Triton kernels, so a fused path is counted the same under the interpreter and on a GPU)."""
    with _lock:
        for counter in _active:
            counter.count.by_op[f"triton:{name}"] += 1


def count_kernels(fn: Callable[[], Any]) -> KernelCount:
    """Run ``fn()`` once under a :class:`KernelCounter` and return what it launched."""
    with KernelCounter() as counter:
        fn()
    return counter.count
