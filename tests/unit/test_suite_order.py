"""The suite's own scheduling: test files are collected longest first (tests/durations.json), their tests together."""

from __future__ import annotations

import json
import subprocess
import sys

from conftest import DURATIONS, REPO

FILES = ["tests/unit/test_lease.py", "tests/integration/test_train_resume.py", "tests/unit/test_checkpoint.py"]


def collected(*args: str) -> list[str]:
    out = subprocess.run(
        [sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider", *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    ).stdout
    return [line for line in out.splitlines() if "::" in line]


def test_files_are_collected_longest_first_with_their_tests_in_order() -> None:
    seconds = json.loads(DURATIONS.read_text())
    assert all(path in seconds for path in FILES), "tests/durations.json lacks a file this test orders"
    nodeids = collected(*FILES)
    files = [nodeid.split("::")[0] for nodeid in nodeids]
    runs = [path for i, path in enumerate(files) if i == 0 or files[i - 1] != path]
    assert runs == sorted(FILES, key=lambda path: -seconds[path])  # each file once (its tests together), longest first
    for path in FILES:  # within a file, the order pytest gives without the reordering
        alone = collected(path)
        assert [nodeid for nodeid in nodeids if nodeid.startswith(path + "::")] == alone
