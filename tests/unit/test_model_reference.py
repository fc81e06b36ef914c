"""Frozen math: every model variant's logits and gradients against a stored reference, and its parameter layout.

Speed work on the models (fused attention, other layouts, fewer copies) must not change what they compute. For each
case below (a variant at a small input size, fixed weights, fixed input), ``tests/unit/golden/model_reference.json``
keeps the logits, summaries of the input gradient and of the parameter gradients (L2 norm and dot product with a
fixed unit-norm probe: enough to catch any change beyond float32 reordering noise in a few KB per case; one summary
per parameter for the lite variants, one per block for the larger ones, whose blocks are the same code), and a
digest of the ``state_dict`` keys and shapes of the variant at its default size (224, 1000 classes): the names and
shapes are the checkpoint layout (SepViT's is the authors'), which must not move either.

Weights do not come from the models' own init (which may change without changing the math): each parameter is
filled from a generator seeded by its name, scaled by its fan-in. Drop-path and dropout are off.

Regenerate (only when the math is meant to change, and say so in the commit)::

    .venv/bin/python tests/unit/test_model_reference.py                     # every case
    .venv/bin/python tests/unit/test_model_reference.py setformer_tiny@64   # only the named cases
"""

from __future__ import annotations

import hashlib
import json
import re
import sys
import zlib
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:  # run as a script for regeneration
    sys.path.insert(0, str(ROOT))

import pretrain.models  # noqa: E402, F401  (registers the variants)
from pretrain.models import create_model  # noqa: E402

GOLDEN = Path(__file__).resolve().parent / "golden" / "model_reference.json"

# case name -> (variant, img_size, extra kwargs). SepViT at 112 keeps every block kind of the official plan (several
# windows with tokens and PWA, one global window, clamped windows); sepvit_lite at 224 adds the 14x14 windows with PWA.
# SeTformer at 64 clamps the reference of the later stages; at 32 the last stage has p = 1 (no Sinkhorn). The softmax
# cases hold the backbone alone, independent of the SeT layer.
CASES: dict[str, tuple[str, int, dict]] = {
    "sepvit_lite@112": ("sepvit_lite", 112, {}),
    "sepvit_lite@224": ("sepvit_lite", 224, {}),
    "sepvit_tiny@112": ("sepvit_tiny", 112, {}),
    "sepvit_small@112": ("sepvit_small", 112, {}),
    "sepvit_base@112": ("sepvit_base", 112, {}),
    "setformer_lite@32": ("setformer_lite", 32, {}),
    "setformer_lite@64": ("setformer_lite", 64, {}),
    "setformer_tiny@64": ("setformer_tiny", 64, {}),
    "setformer_small@64": ("setformer_small", 64, {}),
    "setformer_base@64": ("setformer_base", 64, {}),
    "setformer_lite_softmax@64": ("setformer_lite", 64, {"attention": "softmax"}),
    "setformer_tiny_softmax@64": ("setformer_tiny", 64, {"attention": "softmax"}),
}
BATCH = 2
NUM_CLASSES = 10
# float32 tolerances, relative to the scale of each stored quantity (max |logit|, gradient norm): reordered sums
# (fused kernels, other layouts, thread counts) moved them by <= 1e-6 here; a change of the math by far more.
RTOL = 3e-5


def _fill(model: torch.nn.Module) -> None:
    """Deterministic weights from parameter names: N(0, 1/fan_in) matrices, norms near 1, small biases/tokens."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            gen = torch.Generator().manual_seed(zlib.crc32(name.encode()))
            noise = torch.randn(p.shape, generator=gen)
            if name.endswith("reference"):  # SeT slots: unit scale, so that the plan is not uniform
                value = noise
            elif p.ndim >= 2 and p.shape[0] > 1:
                value = noise * (p[0].numel() ** -0.5)  # fan-in of a linear/conv weight
            elif "norm" in name and name.endswith("weight"):
                value = 1.0 + 0.1 * noise
            else:  # biases, window tokens
                value = 0.1 * noise
            p.copy_(value.to(p.dtype))


def _summary(t: torch.Tensor, seed: int) -> list[float]:
    """L2 norm and the dot product with a unit-norm random probe seeded by ``seed``."""
    t = t.detach().double().flatten()
    probe = torch.randn(t.shape, generator=torch.Generator().manual_seed(seed)).double()
    return [t.norm().item(), (t @ probe).item() / probe.norm().item()]


def _group(name: str, per_parameter: bool) -> str:
    """Summary key of a parameter: itself, or its block (``stages.2.blocks.5``) for the larger variants."""
    block = re.match(r"stages\.\d+\.blocks\.\d+", name)
    return name if per_parameter or block is None else block.group(0)


def _layout_digest(model: torch.nn.Module) -> dict:
    lines = [f"{k}:{tuple(v.shape)}" for k, v in model.state_dict().items()]
    total = sum(v.numel() for v in model.state_dict().values())
    return dict(keys=len(lines), numel=total, sha256=hashlib.sha256("\n".join(lines).encode()).hexdigest())


def compute_case(case: str) -> dict:
    """Logits and gradient summaries of ``case`` (float32, one thread), and the default layout of its variant."""
    variant, img_size, kwargs = CASES[case]
    with torch.device("meta"):  # no init: _fill sets every parameter (the models have no buffers)
        model = create_model(variant, num_classes=NUM_CLASSES, img_size=img_size, drop_path_rate=0.0, **kwargs)
        default = create_model(variant, **kwargs)
    model.to_empty(device="cpu")
    _fill(model)
    model.train()
    gen = torch.Generator().manual_seed(1234)
    x = torch.randn(BATCH, 3, img_size, img_size, generator=gen).requires_grad_(True)
    logits = model(x)  # (B, NUM_CLASSES)
    target = torch.arange(BATCH) % NUM_CLASSES
    (torch.nn.functional.cross_entropy(logits, target) + 0.01 * logits.square().mean()).backward()
    groups: dict[str, list[torch.Tensor]] = {}
    for name, p in model.named_parameters():
        assert p.grad is not None, f"{case}: no gradient for {name}"
        groups.setdefault(_group(name, variant.endswith("_lite")), []).append(p.grad.flatten())
    grads = {k: _summary(torch.cat(g), zlib.crc32(k.encode())) for k, g in groups.items()}
    return dict(
        logits=logits.detach().double().flatten().tolist(),
        input_grad=_summary(x.grad, 7),
        grads=grads,
        layout=_layout_digest(default),
    )


def _load() -> dict:
    return json.loads(GOLDEN.read_text())


@pytest.fixture(autouse=True)
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)  # the machine is shared; the reference was made with one thread too
    yield
    torch.set_num_threads(n)


@pytest.mark.parametrize("case", list(CASES))
def test_outputs_gradients_and_layout_match_the_reference(case):
    ref = _load()[case]
    got = compute_case(case)
    assert got["layout"] == ref["layout"], "state_dict keys or shapes changed: checkpoints would no longer load"
    logits, ref_logits = (torch.tensor(v, dtype=torch.float64) for v in (got["logits"], ref["logits"]))
    torch.testing.assert_close(logits, ref_logits, rtol=0, atol=RTOL * ref_logits.abs().max().item())
    assert got["grads"].keys() == ref["grads"].keys()
    for name, (norm, dot) in [("input", ref["input_grad"]), *ref["grads"].items()]:
        got_norm, got_dot = got["input_grad"] if name == "input" else got["grads"][name]
        tol = RTOL * norm + 1e-12
        assert abs(got_norm - norm) <= tol and abs(got_dot - dot) <= tol, (
            f"{case}: gradient of {name} moved: norm {got_norm:.8g} vs {norm:.8g}, probe {got_dot:.8g} vs {dot:.8g}"
        )


def _round(obj):
    if isinstance(obj, float):
        return float(f"{obj:.9g}")
    if isinstance(obj, list):
        return [_round(v) for v in obj]
    if isinstance(obj, dict):
        return {k: _round(v) for k, v in obj.items()}
    return obj


def main(argv: list[str]) -> int:
    torch.set_num_threads(1)
    names = argv or list(CASES)
    unknown = [n for n in names if n not in CASES]
    if unknown:
        raise SystemExit(f"unknown case(s) {unknown}; known: {', '.join(CASES)}")
    data = _load() if GOLDEN.exists() else {}
    for name in names:
        data[name] = _round(compute_case(name))
        print(f"{name}: {len(data[name]['grads'])} gradient summaries", file=sys.stderr)
    data = {k: data[k] for k in CASES if k in data}
    GOLDEN.write_text(json.dumps(data, indent=None, separators=(",", ":")) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
