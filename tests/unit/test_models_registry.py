"""Every registered variant has the same surface (STYLE rule 4), the registry's errors, and the import boundary."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import pretrain.models
from pretrain.models import create_model, list_models

ROOT = Path(__file__).resolve().parents[2]
NUM_CLASSES = 5

# Small-input recipe per family (name prefix): keeps each case to about a second on a shared 2-core CPU.
# SepViT: 32x32 with windows that divide its 8/4/2/1 token maps, PWA on in stages 1 and 2. Other families are
# expected to build at 64x64 with their defaults.
SMALL_INPUT: dict[str, dict] = {
    "sepvit_": dict(img_size=32, window_sizes=[4, [2, 4], 2, 1]),
    "setformer_": dict(img_size=64),
}
DEFAULT_SMALL_INPUT = dict(img_size=64)


def small_kwargs(name: str) -> dict:
    return next((kw for prefix, kw in SMALL_INPUT.items() if name.startswith(prefix)), DEFAULT_SMALL_INPUT)


@pytest.fixture(autouse=True)
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def test_registry_lists_the_sepvit_variants():
    names = list_models()
    assert names == sorted(names)
    assert {"sepvit_lite", "sepvit_tiny", "sepvit_small", "sepvit_base"} <= set(names)
    assert list_models("sepvit_") == ["sepvit_base", "sepvit_lite", "sepvit_small", "sepvit_tiny"]


@pytest.mark.parametrize("name", list_models())
def test_surface_shapes_and_a_gradient_on_every_parameter(name):
    kwargs = small_kwargs(name)
    size = kwargs["img_size"]
    torch.manual_seed(0)
    model = create_model(name, num_classes=NUM_CLASSES, drop_path_rate=0.0, **kwargs).train()
    x = torch.randn(2, 3, size, size)

    maps = model.forward_intermediates(x)
    assert len(maps) >= 1 and all(m.ndim == 4 and m.shape[0] == 2 for m in maps)
    feats = model.forward_features(x)
    assert torch.isfinite(feats).all()
    pooled = model.forward_head(feats, pre_logits=True)
    assert pooled.ndim == 2 and pooled.shape[0] == 2 and pooled.shape[1] == maps[-1].shape[1]
    logits = model(x)
    assert logits.shape == (2, NUM_CLASSES)
    assert not torch.isnan(logits).any()

    torch.nn.functional.cross_entropy(logits, torch.tensor([0, 3])).backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None]
    assert not missing, f"no gradient reaches {missing}"
    bad = [n for n, p in model.named_parameters() if not torch.isfinite(p.grad).all()]
    assert not bad, f"non-finite gradient in {bad}"
    zero = [n for n, p in model.named_parameters() if p.grad.abs().sum() == 0]
    assert not zero, f"all-zero gradient in {zero}"


@pytest.mark.parametrize("name", list_models())
def test_no_weight_decay_and_grad_checkpointing_hooks(name):
    with torch.device("meta"):
        model = create_model(name, **small_kwargs(name))
    nwd = model.no_weight_decay()
    params = {n for n, _ in model.named_parameters()}
    assert all(isinstance(n, str) for n in nwd)
    assert set(nwd) <= params, f"not parameters: {set(nwd) - params}"
    model.set_grad_checkpointing(True)
    model.set_grad_checkpointing(False)


@pytest.mark.parametrize("name", list_models())
def test_unknown_kwarg_lists_the_accepted_ones(name):
    with pytest.raises(ValueError, match=r"not_an_option.*accepted: .*img_size"):
        create_model(name, not_an_option=1)


def test_unknown_model_lists_the_known_ones():
    with pytest.raises(ValueError, match=r"unknown model 'sepvit_huge'; known models: .*sepvit_base.*sepvit_tiny"):
        create_model("sepvit_huge")


def _fresh_python(code: str, timeout: float = 120) -> str:
    """The last line ``code`` prints in a new interpreter (nothing imported yet) run from the repository root."""
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    assert out.returncode == 0, out.stderr
    return out.stdout.strip().splitlines()[-1]


def test_importing_the_models_loads_no_deepspeed_or_data_pipeline():
    code = (
        "import json, sys; import pretrain.models; "
        "print(json.dumps(sorted(m for m in sys.modules if m.split('.')[0] in "
        "('deepspeed', 'data_pipeline', 'launch', 'ray', 'submitit', 'webdataset'))))"
    )
    assert json.loads(_fresh_python(code)) == []


@pytest.mark.parametrize("name", ["sepvit_lite", "setformer_lite"])
def test_a_model_built_on_the_meta_device_has_the_shapes_of_the_real_one(name):
    from pretrain.models.registry import on_meta_device

    real = create_model(name, num_classes=7)
    with on_meta_device():
        shapes = create_model(name, num_classes=7)
    assert all(p.is_meta for p in shapes.parameters())
    want = {k: (v.shape, v.dtype) for k, v in real.state_dict().items()}
    assert {k: (v.shape, v.dtype) for k, v in shapes.state_dict().items()} == want


def test_the_pre_start_model_check_of_a_sepvit_does_not_import_torchs_compiler():
    """``normal_`` on a meta tensor imports torch._dynamo (~1 s of CPU for every `pretrain train`, submit and eval
    launcher): the meta-device build skips the draws."""
    code = (
        "import sys; from pretrain.models import create_model; from pretrain.models.registry import on_meta_device\n"
        "with on_meta_device(): model = create_model('sepvit_tiny')\n"
        "print('torch._dynamo' in sys.modules, sum(p.numel() for p in model.parameters()))"
    )
    imported, params = _fresh_python(code).split()
    assert imported == "False" and int(params) == sum(p.numel() for p in create_model("sepvit_tiny").parameters())


def _imported_modules(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module)
            names.update(f"{node.module}.{a.name}" for a in node.names)  # from torch import distributed
    return names


def test_model_code_does_not_import_distributed_deepspeed_or_data_pipeline():
    # `import torch` itself loads torch.distributed, so the boundary is checked on the source
    files = sorted((ROOT / "pretrain" / "models").rglob("*.py")) + sorted((ROOT / "pretrain" / "layers").rglob("*.py"))
    assert Path(pretrain.models.__file__) in files
    forbidden = ("deepspeed", "torch.distributed", "data_pipeline", "launch")
    offenders = {
        f"{f.relative_to(ROOT)}: {m}"
        for f in files
        for m in _imported_modules(f)
        if any(m == x or m.startswith(x + ".") for x in forbidden)
    }
    assert not offenders


def test_data_pipeline_imports_nothing_from_pretrain_or_launch():
    # imports go one way: launch -> pretrain -> data_pipeline; checked on the source (lazy imports included) and by
    # importing every data_pipeline module in a fresh interpreter
    files = sorted((ROOT / "data_pipeline").rglob("*.py"))
    assert len(files) > 10
    offenders = {
        f"{f.relative_to(ROOT)}: {m}"
        for f in files
        for m in _imported_modules(f)
        if m.split(".")[0] in ("pretrain", "launch")
    }
    assert not offenders
    modules = [f"data_pipeline.{f.stem}" for f in files if f.stem != "__init__"]
    code = (
        f"import importlib, json, sys; [importlib.import_module(m) for m in {modules!r}]; "
        "print(json.dumps(sorted(m for m in sys.modules if m.split('.')[0] in ('pretrain', 'launch'))))"
    )
    assert json.loads(_fresh_python(code, timeout=300)) == []


def test_pretrain_models_cli_lists_every_variant(capsys):
    from launch.cli import main

    assert main(["models"]) == 0
    out = capsys.readouterr().out
    lines = out.splitlines()
    assert lines[0].split()[:2] == ["model", "params"]
    listed = [line.split()[0] for line in lines[2:] if line and not line.startswith("note:")]
    assert listed == list_models()
    row = next(line.split() for line in lines if line.startswith("sepvit_tiny "))
    assert row[1:] == ["31.18", "4.52", "224"]

    assert main(["models", "--names", "sepvit_lite", "--img-size", "32"]) == 0
    out = capsys.readouterr().out
    assert "sepvit_lite" in out and "n/a" in out and "window_sizes[0][0]=7" in out
    assert main(["models", "--names", "sepvit_nope"]) == 2
