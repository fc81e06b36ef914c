"""How the processes of a training run start and stop: stop signals kept from the first moment, and no rank that
outlives its launcher. Torch-free (it runs before the slow imports).

Stop signals. Every process of ``pretrain train`` (the ``--nproc`` launcher and each rank) installs
:class:`StopSignals` first thing (:func:`early_start`, called by ``launch.cli.entry`` before any slow import), so a
SIGINT, SIGTERM or SIGUSR2 that arrives while the process still loads torch, validates, joins the process group or
builds the DeepSpeed engine is kept instead of being lost or ending in a traceback. The trainer agrees on it across
ranks during set-up, before the first step and after every step; the run then checkpoints (if it trained), ends as
``stopped`` (SIGINT: Ctrl-C, ``pretrain cancel``) or ``preempted`` (SIGTERM, SIGUSR2: a scheduler), and exits 3; the
same command continues it. A second SIGINT raises KeyboardInterrupt, except in the ranks of a ``--nproc`` launcher:
a Ctrl-C on a terminal reaches them twice (from the terminal and forwarded by the launcher), and the launcher itself
kills them on a second Ctrl-C.

Parent death. A rank of the ``--nproc`` launcher asks the kernel for SIGKILL when its launcher dies
(``prctl(PR_SET_PDEATHSIG)``) and then checks that its parent is still the launcher: one that died before the request
was made would otherwise leave it running. The kernel sends that signal when the *thread* that forked the rank ends,
so the launcher starts its ranks from its main thread, which lives as long as the launcher. The launcher starts them
with their stop signals blocked (:func:`stop_signals_blocked`; a signal mask survives ``exec``): a signal forwarded
before a rank has installed its handlers waits for them instead of killing it, and :meth:`StopSignals.install`
unblocks it.

Garbage collection. A ``pretrain`` process collects no garbage while it imports torch and DeepSpeed
(:func:`pause_gc`, from :func:`early_start`), and freezes what they made before it turns the collector back on
(:func:`resume_gc`: a rank when it starts to build its trainer, the launcher once its ranks are started, any other
command before it runs).
"""

from __future__ import annotations

import atexit
import contextlib
import ctypes
import gc
import logging
import os
import signal
import sys
from collections.abc import Callable, Iterator
from typing import Any, ClassVar

__all__ = [
    "LAUNCHER_PID_ENV",
    "LEASE_TOKEN_ENV",
    "StopRequested",
    "StopSignals",
    "die_with_launcher",
    "early_start",
    "environ_set",
    "pause_gc",
    "resume_gc",
    "stop_outcome",
    "stop_signals_blocked",
]

logger = logging.getLogger(__name__)

LAUNCHER_PID_ENV = "PRETRAIN_LOCAL_LAUNCHER_PID"
"""Set in the environment of ranks started by a local launcher (``--nproc``): the launcher's pid."""
LEASE_TOKEN_ENV = "PRETRAIN_LEASE_TOKEN"
"""Set in the environment of ranks started by a local launcher: the token of the lease they run under."""

_PR_SET_PDEATHSIG = 1  # <linux/prctl.h>


class StopRequested(Exception):
    """A stop signal arrived before training started: the run stops without a training step."""

    def __init__(self, signum: int, where: str):
        super().__init__(f"stopped by {signal.Signals(signum).name} {where}")
        self.signum, self.where = signum, where


def stop_outcome(signum: int) -> str:
    """The state a run ends in when stopped by ``signum``: ``stopped`` for SIGINT (a person: Ctrl-C, ``pretrain
    cancel``), ``preempted`` for SIGTERM/SIGUSR2 (a scheduler). Both exit 3 and resume with the same command."""
    return "stopped" if signum == signal.SIGINT else "preempted"


class StopSignals:
    """Turns SIGTERM, SIGUSR2 and a first SIGINT into a flag (``received``) the trainer checks; one per process.

    A signal sent to the whole process group or job (``timeout``, a terminal, Slurm) reaches the data workers too;
    they leave it to this process (``data_pipeline.loader``), which checkpoints and then shuts them down.
    """

    SIGNALS = (signal.SIGTERM, signal.SIGUSR2, signal.SIGINT)
    _installed: ClassVar[StopSignals | None] = None

    def __init__(self, repeat_interrupt_raises: bool | None = None):
        self.received: int | None = None
        # ranks of a local launcher: the launcher kills them on a second Ctrl-C (see the module docstring)
        self.repeat_interrupt_raises = (
            LAUNCHER_PID_ENV not in os.environ if repeat_interrupt_raises is None else repeat_interrupt_raises
        )
        self._previous: dict[int, Any] = {}
        self._listeners: list[Callable[[int], None]] = []

    @classmethod
    def current(cls) -> StopSignals | None:
        """The handlers installed in this process, if any (they remember a signal from before the trainer existed)."""
        return cls._installed

    def install(self) -> StopSignals:
        """Take over the stop signals (main thread only), then let through any that waited while they were blocked."""
        for sig in self.SIGNALS:
            self._previous[sig] = signal.signal(sig, self._handle)
        StopSignals._installed = self
        signal.pthread_sigmask(signal.SIG_UNBLOCK, self.SIGNALS)
        return self

    def add_listener(self, listener: Callable[[int], None]) -> None:
        """Call ``listener(signum)`` on every stop signal from now on (e.g. to forward it to local ranks)."""
        self._listeners.append(listener)

    def _handle(self, signum: int, frame: Any) -> None:
        if signum == signal.SIGINT and self.received is not None and self.repeat_interrupt_raises:
            raise KeyboardInterrupt
        if self.received is None:
            logger.warning("received %s: stopping at the end of this step (before the first if none began)",
                           signal.Signals(signum).name)  # fmt: skip
        self.received = signum
        for listener in list(self._listeners):
            listener(signum)

    @property
    def requested(self) -> bool:
        return self.received is not None

    def restore(self) -> None:
        """Put back the handlers found at :meth:`install`."""
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()
        self._listeners.clear()
        if StopSignals._installed is self:
            StopSignals._installed = None


@contextlib.contextmanager
def stop_signals_blocked() -> Iterator[None]:
    """Block the stop signals in this thread for the ``with`` body: processes started in it begin with them blocked
    (pending, not lost) until they install their handlers; here they are delivered when the body ends."""
    old = signal.pthread_sigmask(signal.SIG_BLOCK, StopSignals.SIGNALS)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)


def die_with_launcher(launcher_pid: int) -> None:
    """Ask for SIGKILL when the parent (the local launcher) dies; exit at once if it is already gone (Linux; elsewhere
    a no-op)."""
    if not sys.platform.startswith("linux"):
        return
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) != 0:
        logger.warning(
            "prctl(PR_SET_PDEATHSIG) failed (errno %d): this rank may outlive its launcher", ctypes.get_errno()
        )
    if os.getppid() != launcher_pid:  # the launcher died before the request above: nobody would send the signal
        os._exit(1)


def early_start(argv: list[str]) -> None:
    """First thing a ``pretrain`` process does: no garbage collection until it has started (:func:`pause_gc`); a rank
    of a local launcher ties its life to it; ``pretrain train`` keeps stop signals from now on (the trainer finds them
    through :meth:`StopSignals.current`)."""
    pause_gc()
    launcher = os.environ.get(LAUNCHER_PID_ENV, "")
    if launcher.isdigit():
        die_with_launcher(int(launcher))
    if argv[:1] == ["train"] and StopSignals.current() is None:
        StopSignals().install()
    signal.pthread_sigmask(signal.SIG_UNBLOCK, StopSignals.SIGNALS)  # blocked by a launcher: their handlers are set


_gc_paused = False


def pause_gc() -> None:
    """No cyclic garbage collection while this process imports its modules, until :func:`resume_gc`.

    torch, ``torch._dynamo`` (which a torch optimizer imports) and DeepSpeed make about a million objects as they load,
    and the collector's repeated full passes over them cost about a quarter of that import time: 4.2-4.6 s of CPU
    with the collector on, 3.0-3.5 s without, on this 2-core machine. Processes forked meanwhile (data loader
    workers) collect as usual. Does nothing where the collector is already off (someone else's choice).
    """
    global _gc_paused
    if gc.isenabled() and not _gc_paused:
        gc.disable()
        _gc_paused = True


def resume_gc() -> None:
    """The slow imports are done: what they made (modules, classes, functions, which live as long as the process) is
    frozen out of the collector's passes (``gc.freeze``), and it runs as usual from here on, over what the process
    makes next. (A full collection instead would cost 0.35-0.4 s of CPU per rank here.) They are unfrozen at exit, so
    that an interpreter that tears down frees them as it would have (Triton's bindings report each object still alive
    then). Does nothing unless :func:`pause_gc` paused it."""
    global _gc_paused
    if _gc_paused:
        _gc_paused = False
        gc.freeze()
        atexit.register(gc.unfreeze)
        gc.enable()


def _resume_gc_in_child() -> None:
    global _gc_paused
    if _gc_paused:
        _gc_paused = False
        gc.enable()


os.register_at_fork(after_in_child=_resume_gc_in_child)  # a no-op in a child forked while nothing is paused


@contextlib.contextmanager
def environ_set(name: str, value: str) -> Iterator[None]:
    """This process's environment variable ``name`` is ``value`` inside the block, and as before after it (unset if it
    was): for a library that reads a switch from the environment at the moment it acts."""
    before = os.environ.get(name)
    os.environ[name] = value
    try:
        yield
    finally:
        if before is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = before
