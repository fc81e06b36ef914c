"""How a sweep trial's training run lives as processes: the guard, and a local run's process group under it.

A Ray worker SIGKILLs its direct children when it exits, but not their children, so a training run started directly
would outlive a stopped trial. The run is therefore started through a small *guard* (``python -m launch.trial_guard
guard ...``) that detaches from the Ray worker (double fork), leads the run's process group and watches the worker:
when the trial stops (ASHA, PBT pause, a killed sweep driver), the group gets SIGTERM and, after ``stop_grace_s``,
SIGKILL; neither while the run compiles a JIT extension (a killed build leaves torch's build lock behind and every
later run on the machine waits for it). With the Slurm backend the guard watches the worker the same way and
``scancel``-s the job (``launch.sweep_trial``'s Slurm runner).

:class:`LocalRun` is the trial's handle on such a run: start, poll, stop. While Ray Tune decides on a reported result
the run waits by itself (:mod:`pretrain.sweep_hook`); no signal pauses it. Linux only (``/proc``).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from pretrain.rundir import SWEEP, write_atomic

__all__ = ["SWEEP_SUBDIR", "LocalRun", "guard_main", "note", "proc_start_time", "stop_previous_run"]

logger = logging.getLogger(__name__)

SWEEP_SUBDIR = SWEEP
"""Folder inside a trial's run dir for the sweep's own files: ``train.log`` (output of every launch of the run, each
after a ``=====`` header), ``trial.log`` (what the sweep did: starts, stops, scancel, PBT exploits), ``trial.json``
(trial id and parameters), ``guard.json`` and ``exit_code.*`` (the running guard), ``staging/`` (checkpoints being
handed to Ray Tune) and ``resume_from/`` (the checkpoint a PBT exploit restarts from)."""


def proc_start_time(pid: int) -> str | None:
    """Start time of ``pid`` (field 22 of /proc/PID/stat), or None if it is gone or a zombie."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        if sys.platform.startswith("linux"):
            return None
        try:
            os.kill(pid, 0)
            return "?"
        except OSError:
            return None
    fields = stat.rsplit(")", 1)[1].split()
    if fields[0] in ("Z", "X"):
        return None
    return fields[19]


# Compilers and build drivers: while one runs in a training run's process group, the run holds the build lock of
# torch's JIT extensions (DeepSpeed ops, ~/.cache/torch_extensions/.../lock). A SIGKILL then leaves the lock behind
# and every later `pretrain train` on the machine waits for it forever, so the guard waits for the build instead.
_BUILD_COMMANDS = frozenset({"ninja", "cc1plus", "cc1", "c++", "g++", "gcc", "cc", "ld", "nvcc", "cicc", "ptxas"})
_MAX_BUILD_WAIT_S = 900.0


def _group_members(pgid: int) -> list[tuple[int, str]]:
    """(pid, command name) of the live processes in process group ``pgid`` (Linux /proc; empty elsewhere)."""
    try:
        entries = [p for p in os.listdir("/proc") if p.isdigit()]
    except OSError:
        return []
    members = []
    for pid in entries:
        try:
            stat = Path(f"/proc/{pid}/stat").read_text()
        except OSError:
            continue
        comm, rest = stat[stat.index("(") + 1 : stat.rindex(")")], stat.rsplit(")", 1)[1].split()
        if int(rest[2]) == pgid and rest[0] not in ("Z", "X"):  # rest: state, ppid, pgrp, ...
            members.append((int(pid), comm))
    return members


def _group_is_building(pgid: int) -> bool:
    """Whether a compiler or ninja runs in process group ``pgid``."""
    return any(comm in _BUILD_COMMANDS for _, comm in _group_members(pgid))


def _alive(pid: int, start_time: str | None) -> bool:
    now = proc_start_time(pid)
    return now is not None and (start_time in (None, "?") or now == start_time)


def note(run_dir: Path, msg: str, *args: Any) -> None:
    """Log ``msg`` and append it to the trial's ``sweep/trial.log`` (what the sweep did to this run, and when)."""
    logger.info(msg, *args)
    try:
        with open(run_dir / SWEEP_SUBDIR / "trial.log", "a") as f:
            f.write(f"{time.strftime('%Y-%m-%d %H:%M:%S')} {msg % args if args else msg}\n")
    except OSError:
        pass


def guard_main(argv: list[str] | None = None) -> int:
    """``python -m launch.trial_guard guard``: run a command in its own process group for as long as a watched process
    (the Ray worker of the trial) lives, or cancel a Slurm job when it dies.

    Prints the guard's pid and detaches (double fork), so a Ray worker that SIGKILLs its children on exit does not
    take the guard with it.
    """
    p = argparse.ArgumentParser(prog="python -m launch.trial_guard guard")
    p.add_argument("--watch-pid", type=int, required=True)
    p.add_argument("--watch-start", default=None)
    p.add_argument("--exit-file", help="written with the command's exit code when it ends")
    p.add_argument("--log", help="the command's stdout and stderr (appended)")
    p.add_argument("--grace-s", type=float, default=20.0)
    p.add_argument("--scancel", help="Slurm job id to cancel when the watched process dies (no command)")
    p.add_argument("command", nargs=argparse.REMAINDER)
    args = p.parse_args(argv)
    cmd = args.command[1:] if args.command[:1] == ["--"] else args.command
    if bool(cmd) == bool(args.scancel):
        p.error("give either a command after '--' or --scancel JOB_ID")

    pid = os.fork()
    if pid:  # first child (the session leader Popen started): report the guard's pid and leave
        print(pid, flush=True)
        os._exit(0)
    sys.stdout = open(os.devnull, "w")  # noqa: SIM115 - the parent stopped reading our stdout

    if args.scancel:
        while _alive(args.watch_pid, args.watch_start):
            time.sleep(0.5)
        if args.log:
            with open(args.log, "a") as f:
                stamp = time.strftime("%Y-%m-%d %H:%M:%S")
                f.write(f"{stamp} guard: the trial's Ray worker ended; scancel {args.scancel}\n")
        subprocess.run(["scancel", args.scancel], check=False, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        os._exit(0)

    # Stop protocol: SIGTERM (or SIGINT) to the guard, or the watched process dying, asks for a stop. The guard then
    # SIGTERMs the run's process group (ranks and loader workers included) once no extension build runs in it (a
    # build must not be interrupted: see _BUILD_COMMANDS), and SIGKILLs it ``grace_s`` later.
    asked = {"stop": False}

    def on_term(signum, frame):
        asked["stop"] = True

    signal.signal(signal.SIGTERM, on_term)
    signal.signal(signal.SIGINT, on_term)
    log = open(args.log, "ab") if args.log else subprocess.DEVNULL  # noqa: SIM115 - lives as long as the guard
    proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT)
    group = os.getpgrp()
    asked_at = deadline = None
    while True:
        try:
            rc = proc.wait(timeout=0.5)
            break
        except subprocess.TimeoutExpired:
            pass
        now = time.monotonic()
        if not asked["stop"] and not _alive(args.watch_pid, args.watch_start):
            asked["stop"] = True  # the trial is gone
        if asked["stop"] and asked_at is None:
            asked_at = now
        building = asked_at is not None and _group_is_building(group)
        if asked_at is not None and deadline is None and (not building or now > asked_at + _MAX_BUILD_WAIT_S):
            deadline = now + args.grace_s
            os.killpg(group, signal.SIGTERM)  # the guard ignores its own copy (on_term)
        if deadline is not None and now > deadline and not (building and now < deadline + _MAX_BUILD_WAIT_S):
            rc = -signal.SIGKILL
            break
    if args.exit_file:
        write_atomic(Path(args.exit_file), str(rc))
    os.killpg(group, signal.SIGKILL)  # leftovers of the run (rank or loader processes), and the guard itself
    return rc  # not reached


def stop_previous_run(run_dir: Path, grace_s: float) -> None:
    """Wait for (and if needed stop) the training run an earlier life of this trial left behind.

    A restarted trial (PBT exploit, retry, resumed sweep) must not train in the same run dir while the run of its
    previous life is still writing its final checkpoint: that one gets SIGTERM from its guard when its Ray worker
    dies, and ends within the grace period.
    """
    try:
        prev = json.loads((run_dir / SWEEP_SUBDIR / "guard.json").read_text())
    except (OSError, ValueError):
        return
    if not _alive(prev["guard_pid"], prev.get("guard_start")):
        return
    note(run_dir, "waiting for the previous run (process group %d) to end", prev["pgid"])
    try:
        os.kill(prev["guard_pid"], signal.SIGTERM)  # its guard stops it (it may already be doing so)
    except ProcessLookupError:
        return
    _wait_group(prev["pgid"], lambda: not _alive(prev["guard_pid"], prev.get("guard_start")), grace_s + 10)


def _wait_group(pgid: int, ended: Any, timeout_s: float) -> None:
    """Wait up to ``timeout_s`` for ``ended()``, then SIGKILL process group ``pgid`` (later while it compiles)."""
    deadline = time.monotonic() + timeout_s
    while not ended():
        now = time.monotonic()
        if now > deadline and not (_group_is_building(pgid) and now < deadline + _MAX_BUILD_WAIT_S):
            try:
                os.killpg(pgid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            return
        time.sleep(0.2)


class LocalRun:
    """A ``pretrain train`` subprocess group under a detached guard."""

    def __init__(
        self,
        cmd: list[str],
        run_dir: Path,
        grace_s: float,
        cwd: str | None = None,
        env: dict[str, str] | None = None,
    ):
        self.cmd = cmd
        self.cwd = cwd
        self.env = env
        self.run_dir = run_dir
        self.sweep_dir = run_dir / SWEEP_SUBDIR
        self.grace_s = grace_s
        self.pgid: int | None = None
        self.guard_pid: int | None = None
        # one exit file per launch: a guard of an earlier life finishing late must not speak for this one
        self.exit_file = self.sweep_dir / f"exit_code.{os.getpid()}.{time.monotonic_ns()}"

    def start(self) -> None:
        self.sweep_dir.mkdir(parents=True, exist_ok=True)
        for old in self.sweep_dir.glob("exit_code*"):
            old.unlink(missing_ok=True)
        log = self.sweep_dir / "train.log"
        with open(log, "ab") as f:
            now = time.time()
            stamp = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(now)) + f".{int(now % 1 * 1000):03d}"
            f.write(f"\n===== {stamp} {' '.join(self.cmd)}\n".encode())
        me = os.getpid()
        guard = [
            sys.executable, "-m", "launch.trial_guard", "guard",
            "--watch-pid", str(me), "--watch-start", str(proc_start_time(me)),
            "--exit-file", str(self.exit_file), "--log", str(log), "--grace-s", str(self.grace_s),
            "--", *self.cmd,
        ]  # fmt: skip
        leader = subprocess.Popen(
            guard,
            stdout=subprocess.PIPE,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
            cwd=self.cwd,
            env=self.env,
        )
        line = leader.stdout.readline() if leader.stdout else b""
        leader.wait()
        if not line.strip():
            raise RuntimeError(f"could not start the trial's training run: {' '.join(guard)}")
        self.pgid, self.guard_pid = leader.pid, int(line)
        self._guard_start = proc_start_time(self.guard_pid)
        write_atomic(
            self.sweep_dir / "guard.json",
            json.dumps({"pgid": self.pgid, "guard_pid": self.guard_pid, "guard_start": self._guard_start}),
        )
        note(self.run_dir, "started the run (process group %d)", self.pgid)

    def poll(self) -> int | None:
        try:
            return int(self.exit_file.read_text())
        except (OSError, ValueError):
            pass
        if self.guard_pid is not None and not _alive(self.guard_pid, self._guard_start):
            try:  # the guard writes the exit code just before it ends
                return int(self.exit_file.read_text())
            except (OSError, ValueError):
                return -1
        return None

    def stop(self) -> None:
        if self.pgid is None or self.poll() is not None:
            return
        try:
            os.kill(self.guard_pid, signal.SIGTERM)  # the guard stops the run: SIGTERM, then SIGKILL after the grace
        except (ProcessLookupError, TypeError):
            pass
        _wait_group(self.pgid, lambda: self.poll() is not None, self.grace_s + 5)

    def describe_failure(self, rc: int) -> str:
        return f"training exited with code {rc}; see {self.sweep_dir / 'train.log'}"


if __name__ == "__main__":
    if sys.argv[1:2] == ["guard"]:
        sys.exit(guard_main(sys.argv[2:]))
    sys.exit(f"usage: python -m {__spec__.name if __spec__ else 'launch.trial_guard'} guard ...")
