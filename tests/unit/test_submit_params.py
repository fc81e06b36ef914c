"""`pretrain submit` parameters: cluster profiles, flags, validation errors, and the sbatch script (golden files).

The dry-run tests render the script with submitit's own SlurmExecutor, which needs the Slurm client (``srun``) on
PATH: they skip without it, except under CI=true where they fail. Nothing here submits a job or starts a process.
Regenerate the golden files with ``UPDATE_GOLDEN=1 pytest tests/unit/test_submit_params.py``.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import sys
from pathlib import Path

import pytest

from data_pipeline.config import ConfigError
from launch.cli import main as cli_main
from launch.cluster_params import CLUSTER_PROFILES_DIR, ClusterParams, load_cluster_params
from launch.status import parse_slurm_duration
from pretrain.config import dump_config, load_config

CONFIG = "configs/run/digits_sepvit_lite.yaml"
GOLDEN = Path(__file__).parent / "golden"
REPO = Path(__file__).resolve().parents[2]


def need_srun() -> None:
    if shutil.which("srun") is None:
        reason = "needs the Slurm client (srun) on PATH: make slurm-up"
        if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
            pytest.fail(f"CI=true: {reason}")
        pytest.skip(reason)


def submit(capsys, *argv: str) -> tuple[int, str, str]:
    code = cli_main(["submit", *argv])
    out, err = capsys.readouterr()
    return code, out, err


def run_args(out_dir: Path, *extra: str) -> list[str]:
    # data.path that does not exist here: data checks are skipped (with a warning), everything else is validated
    return [CONFIG, f"data.path={out_dir}/no_data", f"run.output_dir={out_dir}", "run.name=golden", *extra]


# ---------------------------------------------------------------------------------------------------- golden files

CASES = {
    "local_2cpu": ["--profile", "local"],
    "gpu_1x8": ["--profile", "example", "trainer.device=cuda", "trainer.precision=bf16"],
    "gpu_4x8": ["--profile", "example", "--nodes", "4", "trainer.device=cuda", "trainer.precision=bf16"],
}


def normalise(script: str, out_dir: Path) -> str:
    return script.replace(str(out_dir), "<OUT>").replace(sys.executable, "<PYTHON>")


@pytest.mark.parametrize("case", sorted(CASES))
def test_dry_run_script_matches_golden(case, tmp_path, capsys):
    need_srun()
    code, out, err = submit(capsys, *run_args(tmp_path, *CASES[case]), "--dry-run")
    assert code == 0, err
    got = normalise(out, tmp_path)
    golden = GOLDEN / f"sbatch_{case}.txt"
    if os.environ.get("UPDATE_GOLDEN"):
        golden.write_text(got)
    assert got == golden.read_text(), f"sbatch script changed; if intended, rerun with UPDATE_GOLDEN=1\n{got}"
    assert not (tmp_path / "golden").exists(), "--dry-run must not create the run directory"


def test_dry_run_shows_the_requested_resources(tmp_path, capsys):
    need_srun()
    flags = ["--nodes", "2", "--gpus-per-node", "4", "--cpus-per-task", "6", "--mem-gb", "64", "--time-min", "90"]
    flags += ["--account", "proj", "--qos", "high", "--constraint", "a100", "--signal-delay-s", "120"]
    code, out, err = submit(capsys, *run_args(tmp_path, "trainer.device=cuda", *flags), "--dry-run")
    assert code == 0, err
    for line in [
        "#SBATCH --nodes=2",
        "#SBATCH --gpus-per-node=4",
        "#SBATCH --ntasks-per-node=4",  # one task per GPU
        "#SBATCH --cpus-per-task=6",
        "#SBATCH --mem=64GB",
        "#SBATCH --time=90",
        "#SBATCH --account=proj",
        "#SBATCH --qos=high",
        "#SBATCH --constraint=a100",
        "#SBATCH --signal=USR2@120",
        "#SBATCH --requeue",
    ]:
        assert line in out.splitlines(), f"missing {line!r} in\n{out}"
    assert "--partition" not in out  # not given: the cluster's default partition
    assert "-m submitit.core._submit" in out


# ------------------------------------------------------------------------------------------ profiles and flags


def test_every_cluster_profile_loads():
    names = sorted(p.stem for p in CLUSTER_PROFILES_DIR.glob("*.yaml"))
    assert {"local", "example"} <= set(names)
    for name in names:
        assert isinstance(load_cluster_params(name), ClusterParams)


def test_flags_override_the_profile():
    p = load_cluster_params("local", timeout_min=5, max_timeout_requeues=None, nodes=None)
    assert (p.timeout_min, p.max_timeout_requeues, p.slurm_partition, p.ntasks_per_node) == (5, 3, "debug", 2)
    gpu = load_cluster_params("example", nodes=4)
    assert (gpu.nodes, gpu.ntasks_per_node, gpu.world_size) == (4, 8, 32)


def test_executor_parameters_are_names_submitit_accepts(tmp_path):
    import submitit

    for name in ("local", "example"):
        params = load_cluster_params(name)
        executor = submitit.AutoExecutor(folder=tmp_path / name, cluster="local")  # checks slurm_* names too
        executor.update_parameters(**params.executor_parameters("job"))


def test_unknown_profile_key_suggests_the_valid_one(tmp_path):
    profile = tmp_path / "site.yaml"
    profile.write_text("partition: gpu\nnodes: 2\n")
    with pytest.raises(ConfigError, match=r"yaml: unknown cluster key 'partition'; did you mean slurm_partition\?"):
        load_cluster_params(str(profile))
    profile.write_text("timeout_mins: 10\n")
    with pytest.raises(ConfigError, match="did you mean timeout_min"):
        load_cluster_params(str(profile))


def test_unknown_profile_name_lists_the_known_ones():
    with pytest.raises(ConfigError, match=r"cluster profile 'locl' not found .*did you mean local.*Known: .*example"):
        load_cluster_params("locl")


@pytest.mark.parametrize(
    "values, message",
    [
        ({"nodes": 0}, "nodes=0 must be >= 1"),
        ({"timeout_min": 0}, "timeout_min=0 must be >= 1"),
        ({"gpus_per_node": 8, "tasks_per_node": 2}, "one task per GPU"),
        ({"mem_gb": 0.0}, "mem_gb=0.0 must be positive"),
        ({"timeout_min": 1, "slurm_signal_delay_s": 60}, "slurm_signal_delay_s=60 must be >= 0 and below"),
        ({"cluster": "local", "nodes": 2}, "local executor runs on this machine only"),
        ({"cluster": "pbs"}, r"cluster='pbs' is not one of \['slurm', 'local'\]"),
        ({"nodes": "two"}, "nodes expects an integer, got str"),
        ({"gpus_per_nod": 2}, "unknown cluster key 'gpus_per_nod'; did you mean gpus_per_node"),
        ({"slurm_partition": ""}, "slurm_partition is empty"),
    ],
)
def test_invalid_values_name_the_key_and_the_fix(values, message):
    with pytest.raises(ConfigError, match=message):
        load_cluster_params(None, **values)


def test_cpu_and_gpu_task_layout():
    assert ClusterParams(tasks_per_node=4).ntasks_per_node == 4
    assert ClusterParams(gpus_per_node=8).ntasks_per_node == 8
    assert ClusterParams(gpus_per_node=8, tasks_per_node=8, nodes=4).world_size == 32
    assert "gpus_per_node" not in ClusterParams().executor_parameters("x")  # no --gpus-per-node=0 on CPU clusters


# -------------------------------------------------------------------------------------- CLI errors exit 2, no job


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--nodes", "0"], "nodes=0 must be >= 1"),
        (["--profile", "nope"], "cluster profile 'nope' not found"),
        (["trainer.max_step=5"], "unknown config key 'trainer.max_step'"),
        (["trainer.device=cuda"], "need GPUs: pass --gpus-per-node"),
        (["--gpus-per-node", "8", "--tasks-per-node", "2"], "one task per GPU"),
    ],
)
def test_bad_submit_exits_2_and_writes_nothing(argv, message, tmp_path, capsys):
    code, out, err = submit(capsys, *run_args(tmp_path), *argv, "--cluster", "local")
    assert code == 2, (out, err)
    assert message in err
    assert not (tmp_path / "golden").exists()


def test_missing_config_file_exits_2(tmp_path, capsys):
    code, _, err = submit(capsys, str(tmp_path / "missing.yaml"), f"run.output_dir={tmp_path}", "--cluster", "local")
    assert code == 2
    assert "does not exist" in err
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("command", ["status", "cancel"])
def test_status_and_cancel_of_a_missing_run_dir_exit_2(command, tmp_path, capsys):
    assert cli_main([command, str(tmp_path / "no_run")]) == 2
    assert "no run directory" in capsys.readouterr().err


# --------------------------------------------------------------------------------------------------------- helpers


def test_frozen_run_config_round_trips(tmp_path):
    """The job trains from the resolved config written at submit time: it must load back to the same config."""
    cfg = load_config(REPO / CONFIG, ["trainer.max_steps=700", f"run.output_dir={tmp_path}"])
    dump_config(cfg, tmp_path / "frozen.yaml")
    assert dataclasses.asdict(load_config(tmp_path / "frozen.yaml")) == dataclasses.asdict(cfg)


@pytest.mark.parametrize(
    "text, seconds",
    [("0:45", 45), ("01:00", 60), ("1:02:03", 3723), ("2-00:00:10", 172810), ("5", 300), ("UNLIMITED", None)],
)
def test_parse_slurm_duration(text, seconds):
    assert parse_slurm_duration(text) == seconds
