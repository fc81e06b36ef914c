"""Sweep YAML validation (no Ray started): search-space paths against the config schema, distributions, scheduler
knobs, every trial config resolved before a sweep starts, and the small file helpers trials rely on."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from data_pipeline.config import ConfigError
from launch.cli import main as cli_main
from launch.sweep.spec import format_override, load_sweep, validate_trial_configs
from launch.sweep.trial import newest_checkpoint
from pretrain.config import CONFIGS_DIR, parse_overrides

BASE = str(CONFIGS_DIR / "run" / "digits_sepvit_lite.yaml")


def write(tmp_path: Path, **fields) -> Path:
    doc = {"base": BASE, "space": {"optim.lr": {"loguniform": [1.0e-4, 1.0e-2]}}, **fields}
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump(doc))
    return path


def test_minimal_sweep_defaults(tmp_path: Path) -> None:
    spec = load_sweep(write(tmp_path))
    assert spec.name == "sweep" and spec.metric == "val_top1" and spec.mode == "max"
    assert spec.scheduler.name == "asha" and spec.scheduler.grace_period == 1
    assert (spec.resources.cpu, spec.resources.gpu, spec.resources.nproc) == (1, 0, 1)
    assert Path(spec.base).is_absolute()
    validate_trial_configs(spec)


def test_unknown_space_path_lists_close_matches(tmp_path: Path) -> None:
    # space keys are checked by resolving trial configs, as `pretrain train` resolves them
    spec = load_sweep(write(tmp_path, space={"optim.lrr": {"choice": [1.0e-3]}}))
    with pytest.raises(ConfigError, match=r"unknown config key 'optim\.lrr'.*did you mean optim\.lr"):
        validate_trial_configs(spec)
    # right field, wrong section
    with pytest.raises(ConfigError, match=r"'trainer\.lr'.*optim\.lr"):
        validate_trial_configs(load_sweep(write(tmp_path, space={"trainer.lr": {"choice": [1.0e-3]}})))


def test_space_path_must_be_a_field_not_a_section(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"'optim' names no config field; .* such as optim\.lr"):
        load_sweep(write(tmp_path, space={"optim": {"choice": [1]}}))


def test_open_mapping_paths_are_allowed_and_run_paths_are_not(tmp_path: Path) -> None:
    load_sweep(write(tmp_path, space={"deepspeed.overrides.steps_per_print": {"choice": [10, 100]}}))
    with pytest.raises(ConfigError, match="set by the sweep"):
        load_sweep(write(tmp_path, space={"run.name": {"choice": ["a", "b"]}}))
    with pytest.raises(ConfigError, match="set by the sweep"):
        load_sweep(write(tmp_path, overrides=["run.output_dir=/x"]))


@pytest.mark.parametrize(
    ("dist", "message"),
    [
        ({"loguniform": [0, 1]}, "low > 0"),
        ({"uniform": [1.0, 0.5]}, "low < high"),
        ({"randint": [1.5, 4]}, "integer bounds"),
        ({"choice": []}, "non-empty list"),
        ([1, 2], "bare list is ambiguous"),
        ({"logunifrom": [1, 2]}, "did you mean loguniform"),
        ({"choice": [1], "grid": [2]}, "expected one of"),
    ],
)
def test_bad_distributions(tmp_path: Path, dist, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        load_sweep(write(tmp_path, space={"optim.lr": dist}))


def test_numeric_strings_in_bounds(tmp_path: Path) -> None:
    path = tmp_path / "s.yaml"
    path.write_text(f"base: {BASE}\nspace:\n  optim.lr: {{loguniform: [1e-4, 1e-2]}}\n")  # YAML 1.1: strings
    spec = load_sweep(path)
    assert spec.space["optim.lr"] == {"loguniform": [1.0e-4, 1.0e-2]}


def test_unknown_top_level_and_scheduler_keys(tmp_path: Path) -> None:
    # the same checks, and messages, as run configs (pretrain.config.build_dataclass)
    with pytest.raises(ConfigError, match="unknown sweep key 'schedular'.*did you mean scheduler"):
        load_sweep(write(tmp_path, schedular={"name": "asha"}))
    with pytest.raises(ConfigError, match="unknown sweep key 'scheduler.grace'.*scheduler.grace_period"):
        load_sweep(write(tmp_path, scheduler={"name": "asha", "grace": 2}))
    with pytest.raises(ConfigError, match=r"scheduler.name='hyperband' is not one of \['asha', 'pbt', 'fifo'\]"):
        load_sweep(write(tmp_path, scheduler={"name": "hyperband"}))
    with pytest.raises(ConfigError, match="scheduler.grace_period expects an integer"):
        load_sweep(write(tmp_path, scheduler={"name": "asha", "grace_period": "two"}))
    with pytest.raises(ConfigError, match="reduction_factor must be > 1"):
        load_sweep(write(tmp_path, scheduler={"name": "asha", "reduction_factor": 1}))
    with pytest.raises(ConfigError, match="scheduler.synch is no setting of asha"):
        load_sweep(write(tmp_path, scheduler={"name": "asha", "synch": True}))


def test_metric_and_mode(tmp_path: Path) -> None:
    assert load_sweep(write(tmp_path, metric="val_loss")).mode == "min"
    with pytest.raises(ConfigError, match="did you mean .*val_top1"):
        load_sweep(write(tmp_path, metric="val_top"))
    with pytest.raises(ConfigError, match=r"mode='maximize' is not one of \['max', 'min'\]"):
        load_sweep(write(tmp_path, mode="maximize"))


def test_resources_and_counts(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="unknown sweep key 'resources.gpus'.*resources.gpu"):
        load_sweep(write(tmp_path, resources={"gpus": 1}))
    with pytest.raises(ConfigError, match="one GPU per rank"):
        load_sweep(write(tmp_path, resources={"gpu": 1, "nproc": 2}))
    with pytest.raises(ConfigError, match="num_samples must be >= 1"):
        load_sweep(write(tmp_path, num_samples=0))
    spec = load_sweep(write(tmp_path, num_samples=3), num_samples=5, max_concurrent=2, name="other")
    assert (spec.num_samples, spec.max_concurrent, spec.name) == (5, 2, "other")


def test_pbt_mutations_are_config_paths_and_need_checkpoints_at_evals(tmp_path: Path) -> None:
    pbt = {"name": "pbt", "hyperparam_mutations": {"optim.weight_decy": {"uniform": [0.0, 0.1]}}}
    with pytest.raises(ConfigError, match="optim.weight_decay"):
        validate_trial_configs(load_sweep(write(tmp_path, scheduler=pbt, overrides=["checkpoint.every_steps=100"])))
    pbt["hyperparam_mutations"] = {"optim.weight_decay": {"uniform": [0.0, 0.1]}}
    spec = load_sweep(write(tmp_path, scheduler=pbt, overrides=["checkpoint.every_steps=300"]))
    with pytest.raises(ConfigError, match="must divide trainer.eval_every_steps"):
        validate_trial_configs(spec)
    spec = load_sweep(write(tmp_path, scheduler=pbt, overrides=["checkpoint.every_steps=100"]))
    validate_trial_configs(spec)


def test_every_trial_config_is_validated_before_the_sweep(tmp_path: Path) -> None:
    # -0.1 is a valid number but not a valid learning rate (OptimConfig.__post_init__)
    spec = load_sweep(write(tmp_path, space={"optim.lr": {"choice": [1.0e-3, -0.1]}}))
    with pytest.raises(ConfigError, match=r"optim\.lr=-0\.1.*must be positive"):
        validate_trial_configs(spec)
    # a cross-field rule: warmup longer than the run, at the top end of a range only
    spec = load_sweep(write(tmp_path, space={"schedule.warmup_steps": {"randint": [0, 5000]}}))
    with pytest.raises(ConfigError, match="schedule.warmup_steps=4999"):
        validate_trial_configs(spec)
    spec = load_sweep(write(tmp_path, space={"augment.interpolation": {"choice": ["bilinear", "nearest"]}}))
    with pytest.raises(ConfigError, match="nearest"):
        validate_trial_configs(spec)


def test_bad_space_key_exits_2_via_cli(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = write(tmp_path, space={"optim.lrr": {"choice": [1.0e-3]}})
    assert cli_main(["sweep", str(path), "--output-dir", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "optim.lrr" in err and "did you mean optim.lr" in err
    assert not (tmp_path / "sweep").exists()


@pytest.mark.parametrize("name", sorted(p.name for p in (CONFIGS_DIR / "sweep").glob("*.yaml")))
def test_shipped_sweep_configs_validate(name: str, tmp_path: Path) -> None:
    spec = load_sweep(CONFIGS_DIR / "sweep" / name, output_dir=str(tmp_path))
    validate_trial_configs(spec)


def test_shipped_configs_cover_asha_pbt_and_imagenet() -> None:
    names = {p.stem for p in (CONFIGS_DIR / "sweep").glob("*.yaml")}
    assert {"digits_asha", "digits_pbt"} <= names and any("imagenet" in n for n in names)


@pytest.mark.parametrize(
    "value", [1.0e-5, 3.0e-4, 0.5, 2, True, None, "bicubic", "1a2b3_00001", [1, 2.0e-6], [[4], [2, 4]], 1e22]
)
def test_format_override_round_trips_through_parse_overrides(value) -> None:
    parsed = parse_overrides([format_override("model.kwargs.x", value)])["model"]["kwargs"]["x"]
    assert parsed == value and type(parsed) is type(value)


def test_newest_checkpoint_is_the_complete_one_latest_names(tmp_path: Path) -> None:
    run = tmp_path / "run"
    assert newest_checkpoint(run) is None
    for step in (10, 20):
        d = run / "checkpoints" / f"step_{step:06d}"
        d.mkdir(parents=True)
        (d / "COMPLETE").write_text("{}")
    (run / "checkpoints" / "step_000030").mkdir()  # torn: no COMPLETE
    (run / "checkpoints" / "latest").write_text("step_000020\n")
    assert newest_checkpoint(run) == run / "checkpoints" / "step_000020"
    (run / "checkpoints" / "latest").write_text("step_000030\n")
    assert newest_checkpoint(run) is None


def test_summary_curve_is_the_runs_evals_when_ray_lost_a_row(tmp_path: Path) -> None:
    # Ray Tune's progress.csv of a PBT-exploited trial lost its first eval in CI; the run's metrics.jsonl is the record
    import pandas as pd
    from ray.tune import Result

    from launch.sweep.summary import _trial_record

    spec = load_sweep(write(tmp_path, name="s", output_dir=str(tmp_path)))
    run_dir = spec.sweep_dir.resolve() / "trials" / "t0"
    run_dir.mkdir(parents=True)
    events = [
        {"event": "train", "step": 5, "loss": 1.0},
        {"event": "eval", "step": 5, "val_top1": 0.25},
        {"event": "eval", "step": 10, "val_top1": 0.5},
        {"event": "eval", "step": 10, "val_top1": 0.75},
    ]
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(e) + "\n" for e in events) + '{"event": "ev')
    ray_rows = pd.DataFrame({"step": [10], "val_top1": [0.75]})
    result = Result(metrics={"trial_id": "t0", "step": 10}, checkpoint=None, error=None, path=str(run_dir),
                    metrics_dataframe=ray_rows, best_checkpoints=[])  # fmt: skip
    record = _trial_record(spec, result)
    # both evals, the later of a step logged twice, the torn line skipped
    assert record.curve == [(5, 0.25), (10, 0.75)]
    assert (record.best, record.best_step, record.last, record.step) == (0.75, 10, 0.75, 10)
    # a run that never wrote metrics (it failed to start) falls back to what Ray Tune recorded
    (run_dir / "metrics.jsonl").unlink()
    assert _trial_record(spec, result).curve == [(10, 0.75)]
