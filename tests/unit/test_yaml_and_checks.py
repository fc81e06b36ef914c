"""Config checks through the real CLI: a YAML key given twice (run, model/data base, cluster profile and sweep files),
a manifest whose labels name no class, and the EMA/ZeRO/offload rules applied to ``deepspeed.overrides`` as well."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from data_fixtures import make_dataset

from data_pipeline.config import ConfigError
from launch.cli import main
from pretrain.config import load_config
from pretrain.engine import build_ds_config
from pretrain.yaml_io import read_yaml_mapping

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


# ---------------------------------------------------------------------------------------------- numeric ranges


def _numeric_fields(cls: type, prefix: str) -> list[str]:
    import dataclasses
    import typing

    out = []
    for f in dataclasses.fields(cls):
        tp = typing.get_type_hints(cls)[f.name]
        if dataclasses.is_dataclass(tp):
            out += _numeric_fields(tp, f"{prefix}{f.name}.")
        elif tp in (int, float) or typing.get_args(tp) in ((int,), (float,)):
            out.append(f"{prefix}{f.name}")
    return out


def test_every_numeric_field_has_a_range_and_the_defaults_fit() -> None:
    from pretrain.config import Config
    from pretrain.config_ranges import NUMERIC_RULES

    fields = _numeric_fields(Config, "")
    assert len(fields) >= 50 and "optim.betas" in fields and "augment.mean" in fields
    assert sorted(set(fields) - set(NUMERIC_RULES)) == [], "a numeric config field without a rule"
    assert sorted(set(NUMERIC_RULES) - set(fields)) == [], "a rule for a field that does not exist"
    load_config(RUN_CONFIG)  # every shipped config fits the ranges
    for path in sorted((REPO / "configs" / "run").glob("*.yaml")):
        load_config(path)


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("optim.lr=inf", "optim.lr=inf must be positive and finite, in (0, 100]"),
        ("optim.lr=.nan", "optim.lr=nan must be positive and finite, in (0, 100]"),
        ("optim.weight_decay=-0.1", "optim.weight_decay=-0.1 must be a finite number in [0, 10]"),
        ("optim.betas=[0.9,1.0]", "optim.betas[1]=1.0 must be a finite number in [0, 1)"),
        ("optim.eps=0", "optim.eps=0.0 must be positive and finite, in (0, 1]"),
        ("optim.momentum=1.5", "optim.momentum=1.5 must be a finite number in [0, 1)"),
        ("optim.grad_clip=.inf", "optim.grad_clip=inf must be a finite number >= 0 (0 disables)"),
        ("schedule.warmup_lr=-1", "schedule.warmup_lr=-1.0 must be a finite number in [0, 100]"),
        (
            "trainer.seed=99999999999999999999999",
            "trainer.seed=99999999999999999999999 must be an integer in [0, 4294967295]",
        ),
        ("data.seed=-1", "data.seed=-1 must be an integer in [0, 4294967295]"),
        ("trainer.max_steps=10000000000000000", "trainer.max_steps=10000000000000000 must be an integer in [1, "),
        ("trainer.log_every_steps=0", "trainer.log_every_steps=0 must be an integer in [1, "),
        ("trainer.max_nonfinite_steps=0", "trainer.max_nonfinite_steps=0 must be an integer in [1, "),
        ("trainer.ema_decay=1", "trainer.ema_decay=1.0 must be a finite number in [0, 1) (0 disables)"),
        ("checkpoint.every_minutes=.inf", "checkpoint.every_minutes=inf must be a finite number in [0, 10000000]"),
        ("model.drop_rate=1", "model.drop_rate=1.0 must be a finite number in [0, 1)"),
        ("model.img_size=1000000000", "model.img_size=1000000000 must be an integer in [1, 8192]"),
        ("augment.label_smoothing=1", "augment.label_smoothing=1.0 must be in [0, 1)"),  # data_pipeline's own rule
        ("augment.mixup_alpha=.inf", "augment.mixup_alpha=inf must be a finite number in [0, 100] (0 disables)"),
        ("augment.cutmix_alpha=-1", "augment.cutmix_alpha=-1.0 must be a finite number in [0, 100]"),
        (
            "augment.mean=[123.7,116.3,103.5]",
            "augment.mean[0]=123.7 must be a finite number in [0, 1] (0..1 scale: divide 0..255",
        ),
        ("augment.std=[0.2,0,0.2]", "augment.std[1]=0.0 must be positive and finite, in (0, 1]"),
        ("augment.randaug_m=30", "augment.randaug_m=30.0 must be a finite number in [0, 10]"),
        ("augment.ratio_min=2", "augment.ratio_min=2.0 exceeds augment.ratio_max=1.18"),
        ("data.batch_size=2000000", "data.batch_size=2000000 must be an integer in [1, 1048576]"),
        ("data.val_batch_size=-1", "data.val_batch_size=-1 must be an integer in [0, 1048576]"),
        ("data.cache_max_gb=.nan", "data.cache_max_gb=nan must be positive and finite, in (0, 1000000000]"),
        ("logging.corrupt_log_every=0", "logging.corrupt_log_every=0 must be an integer in [1, "),
    ],
)
def test_non_finite_or_absurd_hyperparameters_exit_2_naming_field_and_range(
    override: str, message: str, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    data = make_dataset(tmp_path / "data", {"train": [8], "val": [4]})
    out = tmp_path / "runs"
    assert main(["train", str(RUN_CONFIG), f"data.path={data}", f"run.output_dir={out}", override]) == 2
    err = capsys.readouterr().err
    assert f"pretrain train: config error: {message}" in err and "Traceback" not in err
    assert not out.exists(), "nothing may be written on a config error"


def test_other_schemas_refuse_non_finite_numbers(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    profile = _write(tmp_path / "site.yaml", "cluster: slurm\nmem_gb: .inf\n")
    assert main(["submit", str(RUN_CONFIG), "--profile", str(profile), "--dry-run"]) == 2
    assert "mem_gb=inf must be a finite number" in capsys.readouterr().err


# ------------------------------------------------------------------------------------- run.output_dir, init_from


def test_an_output_dir_that_is_a_file_exits_2_and_leaves_it_alone(tmp_path: Path, capsys) -> None:
    data = make_dataset(tmp_path / "data", {"train": [8], "val": [4]})
    afile = _write(tmp_path / "runs", "my notes\n")
    for out in (afile, afile / "deeper"):
        assert main(["train", str(RUN_CONFIG), f"data.path={data}", f"run.output_dir={out}"]) == 2
        err = capsys.readouterr().err
        assert f"run.output_dir={out}: {afile} is a file, not a folder" in err and "Traceback" not in err
    assert afile.read_text() == "my notes\n"


def _export(path: Path, state_edit=None, **config_edit) -> Path:
    """An export of a fresh sepvit_lite at 32x32 (10 classes) as `pretrain export` writes it, then edited."""
    import dataclasses

    from safetensors.torch import save_file

    from pretrain.config import ModelConfig
    from pretrain.models import create_model
    from pretrain.models.registry import EXPORT_FORMAT

    kwargs = {"window_sizes": [[4], [2, 4], [2, 2, 2, 2, 2, 2], [1, 1]]}
    cfg = dataclasses.asdict(ModelConfig(name="sepvit_lite", num_classes=10, img_size=32, kwargs=kwargs))
    state = create_model("sepvit_lite", num_classes=10, img_size=32, **kwargs).state_dict()
    if state_edit is not None:
        state_edit(state)
    meta = {"format": EXPORT_FORMAT, "model_name": "sepvit_lite", "model_config": json.dumps({**cfg, **config_edit})}
    save_file(state, str(path), metadata=meta)
    return path


def _wrong_shape(state: dict) -> None:
    import torch

    state["stages.0.blocks.0.attn.qkv.weight"] = torch.zeros(96, 31)


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (
            {"state_edit": _wrong_shape},
            "its weights do not fit the sepvit_lite model its config describes (size mismatch for "
            "stages.0.blocks.0.attn.qkv.weight",
        ),
        (
            {"img_size": 10**9},
            "its model config is unusable (model.img_size=1000000000 must be an integer in [1, 8192])",
        ),
        ({"num_classes": "ten"}, "its model config is unusable (num_classes expects an integer, got str 'ten')"),
        ({"name": "sepvit_huge"}, "the weights are of a sepvit_huge model, not sepvit_lite"),
    ],
    ids=["wrong-shape", "absurd-img-size", "wrong-type", "unknown-model"],
)
def test_init_from_an_export_that_does_not_fit_exits_2_before_anything_starts(
    edit: dict, message: str, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    data = make_dataset(tmp_path / "data", {"train": [8], "val": [4]})
    good = _export(tmp_path / "good.safetensors")
    bad = _export(tmp_path / "bad.safetensors", **edit)
    out = tmp_path / "runs"
    argv = ["train", str(RUN_CONFIG), f"data.path={data}", f"run.output_dir={out}", "--no-resume"]
    assert main([*argv, f"model.init_from={bad}"]) == 2
    err = capsys.readouterr().err
    assert f"pretrain train: config error: model.init_from={bad}: {bad}: " in err and message in err
    assert "Traceback" not in err and not out.exists()
    from pretrain.plan import validate_launch

    plan = validate_launch(str(RUN_CONFIG), [f"data.path={data}", f"run.output_dir={out}", f"model.init_from={good}"],
                           1, None, False)  # fmt: skip
    assert plan.cfg.model.num_classes == 3 and not out.exists()  # a new head for 3 classes fits
