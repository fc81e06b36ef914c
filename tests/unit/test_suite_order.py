"""The suite's own scheduling: test files are collected longest first (tests/durations.json), their tests together."""

from __future__ import annotations

import json
import subprocess
import sys
from types import SimpleNamespace

from conftest import DURATIONS, REPO, _order_longest_file_first

FILES = ["tests/unit/test_lease.py", "tests/integration/test_train_resume.py", "tests/unit/test_checkpoint.py"]


def test_pytest_collects_the_longest_file_first() -> None:
    seconds = json.loads(DURATIONS.read_text())
    assert all(path in seconds for path in FILES), "tests/durations.json lacks a file this test orders"
    out = subprocess.run(
        [sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider", *FILES],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    ).stdout
    files = [line.split("::")[0] for line in out.splitlines() if "::" in line]
    runs = [path for i, path in enumerate(files) if i == 0 or files[i - 1] != path]
    assert runs == sorted(FILES, key=lambda path: -seconds[path])  # each file once (its tests together), longest first


def test_files_go_by_their_seconds_unlisted_ones_first_and_tests_keep_their_order() -> None:
    seconds = json.loads(DURATIONS.read_text())
    short, long = min(seconds, key=seconds.get), max(seconds, key=seconds.get)
    nodeids = [f"{short}::a", f"{long}::b", f"{short}::c", "tests/unit/test_new_file.py::d", f"{long}::a"]
    items = [SimpleNamespace(nodeid=nodeid) for nodeid in nodeids]
    _order_longest_file_first(items)
    assert [item.nodeid for item in items] == [
        "tests/unit/test_new_file.py::d",  # not listed: counts as the longest
        f"{long}::b",
        f"{long}::a",
        f"{short}::a",
        f"{short}::c",
    ]
