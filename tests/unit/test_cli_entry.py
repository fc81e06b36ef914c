"""The installed ``pretrain`` executable (:func:`launch.cli.entry`): the command's exit code, every byte it wrote to a
pipe, the ``atexit`` handlers run, and the interpreter left without its teardown."""

from __future__ import annotations

import os
import subprocess
import sys

from conftest import REPO

ENV = {k: v for k, v in os.environ.items() if k != "PYTHONUNBUFFERED"}  # stdout to a pipe: block-buffered
PROLOGUE = "import atexit, sys; atexit.register(lambda: print('atexit ran')); "


def _pretrain(*argv: str) -> subprocess.CompletedProcess:
    code = PROLOGUE + f"sys.argv = ['pretrain', *{list(argv)!r}]; from launch.cli import entry; entry()"
    return subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120, env=ENV)


def test_entry_keeps_the_exit_code_the_output_and_the_atexit_handlers() -> None:
    # stdout is a pipe here, so block-buffered: the whole table must still arrive, then the handler's line
    done = _pretrain("models", "--names", "sepvit_lite", "setformer_lite", "--img-size", "32")
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert [line.split()[0] for line in lines if line.startswith(("sepvit_", "setformer_"))] == [
        "sepvit_lite",
        "setformer_lite",
    ], lines
    assert lines[-1] == "atexit ran"
    bad = _pretrain("train", "configs/run/digits_sepvit_lite.yaml", "optim.lrr=1")
    assert bad.returncode == 2 and "unknown config key 'optim.lrr'" in bad.stderr, bad.stderr
    assert bad.stdout.splitlines()[-1:] == ["atexit ran"]


def test_a_live_non_daemon_thread_gets_the_ordinary_exit() -> None:
    # os._exit would kill the thread mid-work; the ordinary exit joins it first
    code = (
        "import threading, time, sys\n"
        "def work():\n    time.sleep(1.0); print('thread finished', flush=True)\n"
        "threading.Thread(target=work).start()\n"
        "sys.argv = ['pretrain', 'status', 'no/such/run']\nfrom launch.cli import entry\nentry()\n"
    )
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120, env=ENV)
    assert done.returncode == 2 and "thread finished" in done.stdout, done.stdout[-2000:] + done.stderr[-2000:]
