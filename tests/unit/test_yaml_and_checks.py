"""Config checks through the real CLI: a YAML key given twice (run, model/data base, cluster profile and sweep files),
a manifest whose labels name no class, and the EMA/ZeRO/offload rules applied to ``deepspeed.overrides`` as well."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from data_fixtures import make_dataset

from launch.cli import main
from pretrain.config import ConfigError, load_config, read_yaml_mapping
from pretrain.engine import build_ds_config

REPO = Path(__file__).resolve().parents[2]
RUN_CONFIG = REPO / "configs" / "run" / "digits_sepvit_lite.yaml"


def _write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


# ------------------------------------------------------------------------------------------------ keys given twice


@pytest.mark.parametrize(
    ("text", "key", "lines"),
    [
        ("optim:\n  lr: 1.0e-3\ntrainer:\n  max_steps: 10\noptim:\n  weight_decay: 0.1\n", "optim", "2 and 6"),
        ("optim:\n  lr: 1.0e-3\n  weight_decay: 0.1\n  lr: 3.0e-3\n", "optim.lr", "3 and 5"),
    ],
)
def test_a_run_config_key_given_twice_exits_2_naming_file_and_key(
    text: str, key: str, lines: str, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    run = _write(tmp_path / "run.yaml", "base: {model: sepvit_lite_32, data: digits}\n" + text)
    assert main(["train", str(run), f"run.output_dir={tmp_path / 'runs'}"]) == 2
    err = capsys.readouterr().err
    assert f"{run}: key '{key}' is given twice (lines {lines}" in err
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize(
    ("kind", "text", "key"),
    [
        ("model", "name: sepvit_lite\nname: setformer_lite\n", "name"),
        ("data", "batch_size: 8\nnum_workers: 0\nbatch_size: 16\n", "batch_size"),
    ],
)
def test_a_base_file_key_given_twice_exits_2(
    kind: str, text: str, key: str, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    base = _write(tmp_path / f"my_{kind}.yaml", text)
    run = _write(tmp_path / "run.yaml", f"base: {{{kind}: my_{kind}.yaml}}\ntrainer:\n  max_steps: 10\n")
    assert main(["train", str(run)]) == 2
    assert f"{base}: key '{key}' is given twice" in capsys.readouterr().err


def test_a_cluster_profile_key_given_twice_exits_2(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    profile = _write(tmp_path / "site.yaml", "cluster: slurm\ntimeout_min: 60\nnodes: 1\ntimeout_min: 600\n")
    assert main(["submit", str(RUN_CONFIG), "--profile", str(profile), "--dry-run"]) == 2
    assert f"{profile}: key 'timeout_min' is given twice (lines 2 and 4)" in capsys.readouterr().err


def test_a_sweep_file_key_given_twice_exits_2(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    sweep = _write(
        tmp_path / "sweep.yaml",
        f"base: {RUN_CONFIG}\nspace:\n  optim.lr: {{choice: [0.001, 0.01]}}\n  optim.lr: {{choice: [0.1]}}\n"
        "metric: val_top1\nmode: max\n",
    )
    assert main(["sweep", str(sweep), "--dry-run"]) == 2
    assert f"{sweep}: key 'space.optim.lr' is given twice (lines 3 and 4)" in capsys.readouterr().err


def test_yaml_merge_keys_may_be_overridden_and_cli_values_are_checked_too(tmp_path: Path) -> None:
    path = _write(tmp_path / "x.yaml", "common: &c {lr: 1, wd: 2}\noptim:\n  <<: *c\n  lr: 3\nlist: [{a: 1}, {a: 2}]\n")
    assert read_yaml_mapping(path) == {
        "common": {"lr": 1, "wd": 2},
        "optim": {"lr": 3, "wd": 2},
        "list": [{"a": 1}, {"a": 2}],
    }
    _write(path, "list:\n  - {a: 1}\n  - {a: 1, b: 2, a: 3}\n")
    with pytest.raises(ConfigError, match=r"key 'list\[1\]\.a' is given twice"):
        read_yaml_mapping(path)
    with pytest.raises(ConfigError, match="override .*: key 'zero_optimization.stage' is given twice"):
        load_config(None, ["deepspeed.overrides={zero_optimization: {stage: 1, stage: 3}}"])


# ------------------------------------------------------------------------------------------------------- manifest


def test_inspect_refuses_a_labelled_split_without_classes(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    data = make_dataset(tmp_path / "data", {"train": [4, 3], "val": [2]})
    assert main(["data", "inspect", str(data)]) == 0
    capsys.readouterr()
    manifest = json.loads((data / "manifest.json").read_text())
    for split in manifest["splits"].values():
        split["class_counts"] = {}
    (data / "manifest.json").write_text(json.dumps({**manifest, "classes": []}))
    assert main(["data", "inspect", str(data)]) == 1
    err = capsys.readouterr().err
    assert f"{data / 'manifest.json'}: invalid manifest: 'classes' is empty but split(s) train, val hold samples" in err
    del manifest["classes"]
    (data / "manifest.json").write_text(json.dumps(manifest))
    assert main(["data", "inspect", str(data)]) == 1
    assert "'classes' is missing" in capsys.readouterr().err


# -------------------------------------------------------------------------------------------- deepspeed.overrides


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["trainer.ema_decay=0.99", "deepspeed.zero_stage=3"], "zero_stage <= 2 (deepspeed.zero_stage is 3)"),
        (
            ["trainer.ema_decay=0.99", "deepspeed.overrides={zero_optimization: {stage: 3}}"],
            "zero_stage <= 2 (deepspeed.overrides.zero_optimization.stage is 3)",
        ),
        (["deepspeed.overrides={zero_optimization: {stage: 5}}"], "deepspeed.overrides.zero_optimization.stage=5"),
        (
            ["deepspeed.zero_stage=0", "deepspeed.overrides={zero_optimization: {offload_optimizer: {device: cpu}}}"],
            "deepspeed.offload_optimizer needs deepspeed.zero_stage >= 1",
        ),
        (
            ["deepspeed.overrides={zero_optimization: {offload_param: {device: cpu}}}"],
            "deepspeed.offload_param needs deepspeed.zero_stage=3",
        ),
        (["deepspeed.overrides={gradient_clipping: -1}"], "deepspeed.overrides.gradient_clipping=-1 must be >= 0"),
        (["deepspeed.overrides={zero_optimization: {stage: 3}}"], "contradicts deepspeed.zero_stage"),
        (["deepspeed.overrides={train_micro_batch_size_per_gpu: 3}"], "contradicts data.batch_size"),
        (["deepspeed.overrides={bf16: {enabled: true}}"], "contradicts trainer.precision"),
    ],
)
def test_deepspeed_overrides_are_checked_like_the_typed_fields(
    extra: list[str], message: str, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    data = make_dataset(tmp_path / "data", {"train": [8], "val": [4]})
    out = tmp_path / "runs"
    assert main(["train", str(RUN_CONFIG), f"data.path={data}", f"run.output_dir={out}", *extra]) == 2
    assert message in capsys.readouterr().err
    assert not out.exists(), "nothing may be written on a config error"


def test_overrides_that_agree_or_add_keys_pass() -> None:
    cfg = load_config(
        None,
        [
            "deepspeed.zero_stage=3",
            "deepspeed.overrides={zero_optimization: {stage: 3, offload_param: {device: cpu}}, bf16: {enabled: false}}",
        ],
    )
    ds = build_ds_config(cfg, 1)
    assert ds["zero_optimization"] == {"stage": 3, "offload_param": {"device": "cpu"}} and ds["bf16"] == {
        "enabled": False
    }


def test_a_missing_init_from_exits_2_before_anything_starts(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    data = make_dataset(tmp_path / "data", {"train": [8], "val": [4]})
    out = tmp_path / "runs"
    argv = [f"data.path={data}", f"run.output_dir={out}", "model.init_from=nothing.safetensors"]
    assert main(["train", str(RUN_CONFIG), *argv]) == 2
    assert "model.init_from=nothing.safetensors: no such file or directory" in capsys.readouterr().err
    assert not out.exists()
