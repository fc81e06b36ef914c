"""Ray Tune's state in a sweep directory runs no code: crafted pickles with their signatures recomputed under another
user's key (what someone who can write the directory can do) are refused before Ray Tune reads them, by
``pretrain sweep --resume`` (exit 2, naming --trust-sweep, nothing changed) and by the file system Ray Tune reads
through (the bytes it would unpickle are the bytes checked). No Ray cluster is started; the resume of a real sweep is
tests/integration/test_sweep.py::test_killed_sweep_resumes_without_rerunning_finished_trials.
"""

from __future__ import annotations

import dataclasses
import json
import os
import pickle
import subprocess
import sys
from pathlib import Path

import pyarrow.fs
import pytest
import yaml

from data_pipeline.config import ConfigError
from launch.cli import main as cli_main
from launch.sweep import check_sweep_trusted
from launch.sweep.spec import load_sweep
from launch.sweep.storage import UntrustedSweepFile, signed_filesystem, unverified_files
from pretrain import trust
from pretrain.checkpoint import check_signature, write_complete_marker
from pretrain.config import CONFIGS_DIR

BASE = str(CONFIGS_DIR / "run" / "digits_sepvit_lite.yaml")


@pytest.fixture(autouse=True)
def own_key(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    key = tmp_path / "home" / "key"
    monkeypatch.setenv(trust.KEY_ENV, str(key))
    return key


class _RunsCode:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def forge(path: Path, data: bytes, other_key: Path) -> None:
    """Write ``data`` to ``path`` with a signature made under ``other_key`` (the attacker's)."""
    own = os.environ[trust.KEY_ENV]
    os.environ[trust.KEY_ENV] = str(other_key)
    try:
        trust.write_signed(path, data)
    finally:
        os.environ[trust.KEY_ENV] = own


def snapshot(root: Path) -> dict[str, tuple[int, int]]:
    """Every path under ``root``, files with their size and mtime: to show that nothing changed (a folder's own mtime
    is left out: a probe for writability may create and remove a file in it)."""
    return {str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns) if p.is_file() else None
            for p in root.rglob("*")}  # fmt: skip


def test_ray_reads_only_what_this_user_wrote_through_the_sweep_file_system(tmp_path: Path) -> None:
    fs, root = signed_filesystem(), tmp_path / "tune"
    root.mkdir()
    with fs.open_output_stream(str(root / "experiment_state-x.json")) as f:
        f.write(b'{"trial_data": []}')
    with fs.open_output_stream(str(root / "events.out")) as f:  # not a state file: passes through, unsigned
        f.write(b"log")
    assert sorted(p.name for p in root.iterdir()) == [
        ".experiment_state-x.json.hmac",
        "events.out",
        "experiment_state-x.json",
    ]
    listed = fs.get_file_info(pyarrow.fs.FileSelector(str(root)))
    assert sorted(i.base_name for i in listed) == ["events.out", "experiment_state-x.json"]  # signatures hidden
    with fs.open_input_stream(str(root / "experiment_state-x.json")) as f:
        assert f.readall() == b'{"trial_data": []}'

    marker = tmp_path / "MARKER"
    forge(root / "tuner.pkl", pickle.dumps(_RunsCode(marker)), tmp_path / "attacker")
    with pytest.raises(UntrustedSweepFile, match="tuner.pkl is not signed by your key"):
        fs.open_input_file(str(root / "tuner.pkl")).readall()
    from ray import tune  # Ray is imported lazily, as the sweep driver does

    with pytest.raises(UntrustedSweepFile):  # what Tuner.restore reads first, through the same file system
        tune.Tuner.restore(str(root), trainable=lambda config: None, storage_filesystem=fs)
    (root / "experiment_state-x.json").write_bytes(b'{"trial_data": [1]}')  # replaced after it was signed
    assert [rel for rel, _ in unverified_files(root)] == ["experiment_state-x.json", "tuner.pkl"]
    assert not marker.exists()


def sweep_dir_with(tmp_path: Path, digits_dir: Path) -> tuple[Path, Path]:
    """A sweep YAML and its sweep dir as an earlier `pretrain sweep` left it (signed sweep.yaml, Ray Tune's files)."""
    sweep_yaml = tmp_path / "s.yaml"
    doc = {
        "base": BASE,
        "name": "s",
        "space": {"optim.lr": {"choice": [1.0e-3]}},
        "overrides": [f"data.path={digits_dir}"],
    }
    sweep_yaml.write_text(yaml.safe_dump(doc))
    sweep_dir = tmp_path / "sweeps" / "s"
    (sweep_dir / "tune").mkdir(parents=True)
    spec = load_sweep(sweep_yaml, output_dir=str(tmp_path / "sweeps"))
    trust.write_signed(sweep_dir / "sweep.yaml", yaml.safe_dump(dataclasses.asdict(spec), sort_keys=False).encode())
    trust.write_signed(sweep_dir / "tune" / "tuner.pkl", pickle.dumps({"_tuner_kwargs": {}}))
    state = {"trial_data": [], "runner_data": {}, "stats": {}}
    trust.write_signed(sweep_dir / "tune" / "experiment_state-2026-12-07_00-00-00.json", json.dumps(state).encode())
    return sweep_yaml, sweep_dir


def resume(sweep_yaml: Path, tmp_path: Path, *flags: str) -> subprocess.CompletedProcess:
    argv = [sys.executable, "-m", "launch.cli", "sweep", str(sweep_yaml), "--resume", "--output-dir"]
    return subprocess.run([*argv, str(tmp_path / "sweeps"), *flags], capture_output=True, text=True, cwd=tmp_path)


def test_resume_refuses_crafted_ray_state_with_recomputed_signatures(tmp_path: Path, digits_dir: Path) -> None:
    sweep_yaml, sweep_dir = sweep_dir_with(tmp_path, digits_dir)
    marker = tmp_path / "MARKER"
    crafted = {"_type": "CLOUDPICKLE_FALLBACK", "value": pickle.dumps(_RunsCode(marker)).hex()}
    state = {"trial_data": [[json.dumps({"trainable_name": "x", "config": crafted}), "{}"]], "runner_data": {}}
    forge(sweep_dir / "tune" / "experiment_state-2026-12-08_00-00-00.json", json.dumps(state).encode(), tmp_path / "a")
    forge(sweep_dir / "tune" / "tuner.pkl", pickle.dumps(_RunsCode(marker)), tmp_path / "a")
    before = snapshot(sweep_dir)
    done = resume(sweep_yaml, tmp_path)
    assert done.returncode == 2, done.stderr[-3000:]
    assert "holds files not signed by your key" in done.stderr and "--trust-sweep" in done.stderr
    assert "experiment_state-2026-12-08_00-00-00.json" in done.stderr and "tuner.pkl" in done.stderr
    assert "Traceback" not in done.stderr
    assert snapshot(sweep_dir) == before and not marker.exists()


def test_resume_refuses_a_changed_sweep_yaml(tmp_path: Path, digits_dir: Path, capsys) -> None:
    """sweep.yaml says where local trials run (``workdir``): a changed one could make them import planted code."""
    sweep_yaml, sweep_dir = sweep_dir_with(tmp_path, digits_dir)
    stored = yaml.safe_load((sweep_dir / "sweep.yaml").read_text())
    stored["workdir"] = str(tmp_path / "planted")
    (sweep_dir / "sweep.yaml").write_text(yaml.safe_dump(stored))
    argv = ["sweep", str(sweep_yaml), "--resume", "--dry-run", "--output-dir", str(tmp_path / "sweeps")]
    assert cli_main(argv) == 2
    err = capsys.readouterr().err
    assert f"{sweep_dir / 'sweep.yaml'} (its signature does not match" in err and "--trust-sweep" in err


def test_trust_sweep_signs_what_is_there_checkpoints_included(tmp_path: Path, digits_dir: Path) -> None:
    _, sweep_dir = sweep_dir_with(tmp_path, digits_dir)
    forge(sweep_dir / "tune" / "search_gen_state-x.json", b"{}", tmp_path / "colleague")
    tag = sweep_dir / "trials" / "t1" / "checkpoints" / "step_000005"
    tag.mkdir(parents=True)
    (tag / "meta.json").write_text('{"step": 5}')
    own = os.environ[trust.KEY_ENV]
    os.environ[trust.KEY_ENV] = str(tmp_path / "colleague")
    write_complete_marker(tag)
    os.environ[trust.KEY_ENV] = own
    with pytest.raises(ConfigError, match="search_gen_state-x.json"):
        check_sweep_trusted(sweep_dir, trusted=False)
    check_sweep_trusted(sweep_dir, trusted=True)
    assert unverified_files(sweep_dir / "tune") == [] and check_signature(tag)[0]
    check_sweep_trusted(sweep_dir, trusted=False)  # from now on, no flag needed
