"""Export and load without DeepSpeed: a stage-0 checkpoint (the engine's layout) -> safetensors -> create_model.

The checkpoints here are real files in the layout the trainer writes (``mp_rank_00_model_states.pt`` with the module,
``ema.pt``, ``meta.json``, the sha256 COMPLETE marker); the ZeRO 2/3 consolidation of real 2-rank runs is tested in
tests/integration/test_export_eval_finetune.py.
"""

from __future__ import annotations

import dataclasses
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from launch.cli import main as cli_main
from pretrain.checkpoint import verify_checkpoint, write_complete_marker
from pretrain.config import ModelConfig, absolute_paths, load_config, model_shape_digest
from pretrain.export import ExportError, export_weights
from pretrain.models import create_model, read_pretrained

REPO = Path(__file__).resolve().parents[2]
PLAN_32 = [[4], [2, 4], [2, 2, 2, 2, 2, 2], [1, 1]]  # configs/model/sepvit_lite_32.yaml
PLAN_64_SAME_COUNTS = [[8], [4, 8], [4, 4, 4, 4, 4, 4], [2, 2]]


def _model_cfg(name: str = "sepvit_lite", img_size: int = 32, **kwargs) -> dict:
    if name == "sepvit_lite" and not kwargs:
        kwargs = {"window_sizes": PLAN_32}
    return dataclasses.asdict(ModelConfig(name=name, num_classes=10, img_size=img_size, kwargs=kwargs))


def _build(cfg: dict, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return create_model(
        cfg["name"],
        num_classes=cfg["num_classes"],
        img_size=cfg["img_size"],
        drop_path_rate=cfg["drop_path_rate"],
        drop_rate=cfg["drop_rate"],
        **cfg["kwargs"],
    ).eval()


def _checkpoint(root: Path, model: torch.nn.Module, cfg: dict, ema: torch.nn.Module | None = None) -> Path:
    """A run directory with one stage-0 checkpoint at step 3, as the trainer lays it out."""
    tag = root / "run" / "checkpoints" / "step_000003"
    tag.mkdir(parents=True)
    torch.save({"module": model.state_dict(), "global_steps": 3}, tag / "mp_rank_00_model_states.pt")
    if ema is not None:
        torch.save({"decay": 0.9, "module": ema.state_dict()}, tag / "ema.pt")
    meta = {"step": 3, "zero_stage": 0, "world_size": 1, "model_config": cfg, "metrics": {"val_top1": 0.5}}
    (tag / "meta.json").write_text(json.dumps(meta))
    write_complete_marker(tag)
    augment = {"eval_crop_ratio": 1.0, "interpolation": "bilinear", "mean": [0.3] * 3, "std": [0.4] * 3}
    (root / "run" / "config.yaml").write_text(yaml.safe_dump({"model": cfg, "augment": augment}))
    return tag


def test_export_of_a_run_dir_loads_anywhere_with_the_same_logits(tmp_path):
    cfg = _model_cfg()
    model = _build(cfg)
    _checkpoint(tmp_path, model, cfg)
    out = tmp_path / "w.safetensors"
    assert cli_main(["export", str(tmp_path / "run"), "--out", str(out)]) == 0
    _, meta = read_pretrained(out, weights=False)
    assert meta["model_name"] == "sepvit_lite" and meta["step"] == "3" and meta["ema"] == "false"
    assert meta["model_config"] == cfg and json.loads(meta["augment"])["mean"] == [0.3] * 3
    loaded = create_model(str(out)).eval()
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))
    # bf16 halves the file and stays close
    half = tmp_path / "w16.safetensors"
    export_weights(tmp_path / "run", half, dtype="bf16")
    state, _ = read_pretrained(half)
    assert all(v.dtype == torch.bfloat16 for v in state.values())
    with torch.no_grad():
        torch.testing.assert_close(create_model(half).eval()(x), model(x), atol=0.05, rtol=0.05)


def test_export_refuses_a_corrupted_checkpoint_naming_why(tmp_path, capsys):
    cfg = _model_cfg()
    tag = _checkpoint(tmp_path, _build(cfg), cfg)
    blob = tag / "mp_rank_00_model_states.pt"
    data = bytearray(blob.read_bytes())
    data[len(data) // 2] ^= 0xFF
    blob.write_bytes(bytes(data))
    out = tmp_path / "w.safetensors"
    assert cli_main(["export", str(tag), "--out", str(out)]) == 1
    assert "mp_rank_00_model_states.pt does not match its sha256" in capsys.readouterr().err
    with pytest.raises(ExportError, match="no usable checkpoint.*step_000003.*sha256"):
        export_weights(tmp_path / "run", out)
    assert not out.exists()
    assert cli_main(["export", str(tmp_path), "--out", str(out)]) == 2  # neither a run dir nor a checkpoint


def test_export_ema_weights(tmp_path):
    cfg = _model_cfg()
    model, ema = _build(cfg, seed=0), _build(cfg, seed=1)
    _checkpoint(tmp_path, model, cfg, ema=ema)
    out = tmp_path / "ema.safetensors"
    export_weights(tmp_path / "run", out, ema=True)
    loaded = create_model(out)
    assert all(torch.equal(a, b) for a, b in zip(loaded.state_dict().values(), ema.state_dict().values()))
    other = tmp_path / "other"
    _checkpoint(other, model, cfg)
    with pytest.raises(ExportError, match="no ema.pt.*ema_decay=0"):
        export_weights(other / "run", out, ema=True)


def test_another_class_count_reinitialises_only_the_head(tmp_path):
    cfg = _model_cfg()
    model = _build(cfg)
    _checkpoint(tmp_path, model, cfg)
    out = tmp_path / "w.safetensors"
    export_weights(tmp_path / "run", out)
    four = create_model("sepvit_lite", pretrained=out, num_classes=4).eval()
    assert four.head.weight.shape == (4, 256)
    body = {k: v for k, v in model.state_dict().items() if not k.startswith("head.")}
    assert all(torch.equal(four.state_dict()[k], v) for k, v in body.items())
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(four.forward_features(x), model.forward_features(x))
    with pytest.raises(ValueError, match="holds a sepvit_lite model, not setformer_lite"):
        create_model("setformer_lite", pretrained=out)


def test_sepvit_at_another_size_resamples_window_tokens_or_refuses_a_change_of_kind(tmp_path):
    cfg = _model_cfg()
    model = _build(cfg)
    tokens = model.stages[0].blocks[0].win_tokens  # (1, 4, 1, C): a 2x2 window grid
    with torch.no_grad():  # a ramp along x, the same on every row
        tokens.copy_(torch.tensor([0.0, 1.0, 0.0, 1.0]).view(1, 4, 1, 1).expand_as(tokens))
    _checkpoint(tmp_path, model, cfg)
    out = tmp_path / "w.safetensors"
    export_weights(tmp_path / "run", out)
    # the pretrained plan at 64: stage 2 block 1 goes from one window (global) to four (PWA): refused, with a plan
    with pytest.raises(ValueError, match=r"stages\.1\.blocks\.1 \(1 -> 4 windows\).*window_sizes=\[\[8\], \[4, 8\]"):
        create_model(out, img_size=64)
    same = create_model(out, img_size=64, window_sizes=PLAN_64_SAME_COUNTS)
    assert all(torch.equal(same.state_dict()[k], v) for k, v in model.state_dict().items())
    assert same(torch.randn(1, 3, 64, 64)).shape == (1, 10)
    # more windows of the same kind: stage 1 goes from 2x2 to 4x4 windows, its tokens resampled as a grid
    more = create_model(out, img_size=64, window_sizes=[[4], [4, 8], [4, 4, 4, 4, 4, 4], [2, 2]])
    grid = more.stages[0].blocks[0].win_tokens[0, :, 0, 0].reshape(4, 4)
    assert torch.allclose(grid, grid[:1].expand(4, 4), atol=1e-6), "rows differ: the window order was mixed up"
    assert bool((grid[0, 1:] >= grid[0, :-1]).all()) and grid[0, 0] < 0.2 and grid[0, -1] > 0.8


def test_setformer_at_another_size_keeps_its_reference_slots(tmp_path):
    cfg = _model_cfg("setformer_lite", 32, attention="set")  # default num_ref, clamped at 32 to 64, 16, 4, 1
    model = _build(cfg)
    _checkpoint(tmp_path, model, cfg)
    out = tmp_path / "w.safetensors"
    export_weights(tmp_path / "run", out)
    big = create_model(out, img_size=64).eval()
    assert big.num_ref == model.num_ref == [64, 16, 4, 1]
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():  # the source model runs at 64 too: the adapted one is the same function
        assert torch.equal(big(x), model(x))
    cfg224 = _model_cfg("setformer_lite", 224, attention="set")
    _checkpoint(tmp_path / "b", _build(cfg224), cfg224)
    out224 = tmp_path / "b.safetensors"
    export_weights(tmp_path / "b" / "run", out224)
    with pytest.raises(ValueError, match=r"stage 2 \(64 slots, 4x4=16 tokens\).*stage 4 .*img_size >= 224"):
        create_model(out224, img_size=32)


def test_loading_imports_no_deepspeed_and_refuses_foreign_files(tmp_path):
    cfg = _model_cfg()
    _checkpoint(tmp_path, _build(cfg), cfg)
    out = tmp_path / "w.safetensors"
    export_weights(tmp_path / "run", out)
    code = (
        "import sys, torch; from pretrain.models import create_model; "
        f"m = create_model({str(out)!r}, num_classes=3); m(torch.zeros(1, 3, 32, 32)); "
        "print(sorted(k for k in sys.modules if k.split('.')[0] == 'deepspeed'))"
    )
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "[]"
    from safetensors.torch import save_file

    foreign = tmp_path / "foreign.safetensors"
    save_file({"w": torch.zeros(2)}, str(foreign))
    with pytest.raises(ValueError, match="no export metadata"):
        create_model(foreign)


def test_init_from_is_a_path_and_not_part_of_the_model_shape(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    plain = load_config(REPO / "configs/run/digits_sepvit_lite.yaml")
    tuned = load_config(REPO / "configs/run/digits_sepvit_lite_finetune.yaml")
    assert tuned.model.init_from == "runs/digits_sepvit_lite"
    assert model_shape_digest(tuned) == model_shape_digest(plain)  # old checkpoints still resume
    assert f"model.init_from={json.dumps(str(tmp_path / 'runs/digits_sepvit_lite'))}" in absolute_paths(tuned)


# --------------------------------------------------------------------------------- destinations, results, bad exports


@pytest.fixture
def tmpfs(tmp_path: Path):
    from scratch_disks import tmpfs_mounts

    yield from tmpfs_mounts(tmp_path / "mounts")


def _three_class_run(tmp_path: Path) -> tuple[Path, Path]:
    """A run directory with one checkpoint of a 3-class model, and a data set of 3 classes to score it on."""
    from data_fixtures import make_dataset

    cfg = dataclasses.asdict(
        ModelConfig(name="sepvit_lite", num_classes=3, img_size=32, kwargs={"window_sizes": PLAN_32})
    )
    _checkpoint(tmp_path, _build(cfg), cfg)
    return tmp_path / "run", make_dataset(tmp_path / "data", {"train": [4], "val": [6]})


def test_eval_and_export_check_their_destination_before_the_work(tmp_path, tmpfs, capsys):
    run, data = _three_class_run(tmp_path)
    read_only = tmpfs(1 << 20, ro=True)
    a_file = tmp_path / "notes.txt"
    a_file.write_text("mine\n")
    (tmp_path / "a_dir").mkdir()
    for out, why in [
        (read_only / "r.json", f"{read_only} is not writable (Read-only file system)"),
        (tmp_path / "a_dir", f"{tmp_path / 'a_dir'} is a directory"),
        (a_file / "r.json", f"{a_file} is a file, not a folder"),
    ]:
        assert cli_main(["eval", str(run), "--data", str(data), "--num-workers", "0", "--out", str(out)]) == 2
        captured = capsys.readouterr()
        assert f"pretrain eval: cannot write the result to {out}: {why}; pass --out FILE.json" in captured.err
        assert "top1" not in captured.out  # refused before the model was loaded
        assert cli_main(["export", str(run), "--out", str(out)]) == 2
        assert f"pretrain export: cannot write {out}: {why}" in capsys.readouterr().err
    assert a_file.read_text() == "mine\n" and list((tmp_path / "a_dir").iterdir()) == []
    assert not (run / "eval").exists()


def test_eval_is_planned_like_a_training_run_before_a_weight_is_read(tmp_path, monkeypatch, capsys):
    """pretrain eval goes through pretrain.plan: the split's other name, the destination, the world (--nproc inside a
    launch is refused as `pretrain train` refuses it), and a head that does not fit the data set (exit 2)."""
    from data_pipeline.config import ConfigError
    from pretrain.plan import plan_eval

    run, data = _three_class_run(tmp_path)
    plan = plan_eval(str(run), str(data), "validation", 8, None, 0)
    assert plan.weights == run / "checkpoints" / "step_000003"
    assert plan.out == run / "eval" / "step_000003-validation.json"
    assert (plan.world_size, plan.spawn, plan.meta["model_config"]["num_classes"]) == (1, 0, 3)
    assert plan_eval(str(run), str(data), "val", 8, 2, 0).spawn == 2
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", "29999")
    with pytest.raises(ConfigError, match=re.escape("--nproc=2 inside a env launch (RANK/SLURM_PROCID set)")):
        plan_eval(str(run), str(data), "val", 8, 2, 0)
    assert plan_eval(str(run), str(data), "val", 8, None, 0).world_size == 2
    for name in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(name)
    ten = _model_cfg()
    _checkpoint(tmp_path / "ten", _build(ten), ten)
    assert cli_main(["eval", str(tmp_path / "ten" / "run"), "--data", str(data), "--num-workers", "0"]) == 2
    assert f"pretrain eval: the model has 10 outputs but {data} has 3 classes" in capsys.readouterr().err
    assert not (tmp_path / "ten" / "run" / "eval").exists()
    # a launcher checks the checkpoint's sizes, not its sha256: each rank it starts hashes the files before it loads
    tag = run / "checkpoints" / "step_000003"
    model_file = tag / "mp_rank_00_model_states.pt"
    blob = bytearray(model_file.read_bytes())
    blob[len(blob) // 2] ^= 0xFF
    model_file.write_bytes(bytes(blob))
    assert plan_eval(str(tag), str(data), "val", 8, 2, 0).spawn == 2
    with pytest.raises(ExportError, match="mp_rank_00_model_states.pt does not match its sha256"):
        plan_eval(str(tag), str(data), "val", 8, None, 0)


def test_eval_prints_its_numbers_before_it_saves_them(tmp_path, tmpfs, capsys):
    """A disk that is full when the result is saved loses the file, not the result: it is on the screen already."""
    from scratch_disks import fill

    run, data = _three_class_run(tmp_path)
    disk = tmpfs(1 << 20)
    fill(disk)
    out = disk / "result.json"
    assert cli_main(["eval", str(run), "--data", str(data), "--num-workers", "0", "--out", str(out)]) == 1
    captured = capsys.readouterr()
    assert re.search(
        r"pretrain eval: sepvit_lite step 3 on val \(6 samples\): top1 [\d.]+ top5 [\d.]+ loss", captured.out
    )
    assert f"could not save the result to {out} (No space left on device); the numbers above are the result" in (
        captured.err
    )
    assert not out.exists() and sorted(p.name for p in disk.iterdir()) == ["filler"]
    assert cli_main(["eval", str(run), "--data", str(data), "--num-workers", "0"]) == 0  # the default place works
    result = json.loads((run / "eval" / "step_000003-val.json").read_text())
    assert f"top1 {result['top1']:.4f}" in capsys.readouterr().out


def test_export_to_a_full_disk_leaves_no_partial_file(tmp_path, tmpfs, capsys):
    run, _ = _three_class_run(tmp_path)
    disk = tmpfs(1 << 20)  # the weights need ~11 MB
    out = disk / "w.safetensors"
    assert cli_main(["export", str(run), "--out", str(out)]) == 1
    assert f"pretrain export: could not write {out} (" in capsys.readouterr().err
    assert list(disk.iterdir()) == [] and verify_checkpoint(run / "checkpoints" / "step_000003")[0]


def _tampered(src: Path, dst: Path, edit_state=None, **edit_config) -> Path:
    from safetensors import safe_open
    from safetensors.torch import save_file

    with safe_open(str(src), framework="pt") as f:
        meta, state = dict(f.metadata()), {k: f.get_tensor(k) for k in f.keys()}
    meta["model_config"] = json.dumps({**json.loads(meta["model_config"]), **edit_config})
    if edit_state is not None:
        edit_state(state)
    save_file(state, str(dst), metadata=meta)
    return dst


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (
            {"edit_state": lambda s: s.update({"head.weight": torch.zeros(3, 7)})},
            "its weights do not fit the sepvit_lite model its config describes (size mismatch for head.weight",
        ),
        (
            {"img_size": 10**9},
            "its model config is unusable (model.img_size=1000000000 must be an integer in [1, 8192])",
        ),
        ({"drop_rate": float("nan")}, "model.drop_rate=nan must be a finite number in [0, 1)"),
    ],
    ids=["wrong-shape", "absurd-img-size", "nan-rate"],
)
def test_eval_and_loading_of_an_export_that_lies_name_what_is_wrong(edit, message, tmp_path, capsys):
    from pretrain.export import ExportError, load_pretrained

    run, data = _three_class_run(tmp_path)
    good = tmp_path / "w.safetensors"
    export_weights(run, good)
    bad = _tampered(good, tmp_path / "bad.safetensors", **edit)
    assert cli_main(["eval", str(bad), "--data", str(data), "--num-workers", "0"]) == 1
    err = capsys.readouterr().err
    assert f"pretrain eval: {bad}: " in err and message in err and "Traceback" not in err
    with pytest.raises(ExportError, match=re.escape(message)):
        load_pretrained(bad)
