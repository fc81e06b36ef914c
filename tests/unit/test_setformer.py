"""SeT attention invariants (stated in the docstring of pretrain/models/set_attention.py) and the backbone."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import yaml
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from pretrain.config import ModelConfig
from pretrain.models import create_model
from pretrain.models.set_attention import (
    SetAttention,
    SoftmaxAttention,
    log_sinkhorn,
    log_sinkhorn_unrolled,
    reference_grid_shape,
)
from pretrain.models.set_whitening import inverse_sqrt_newton_schulz, newton_schulz_iters
from pretrain.models.setformer import SeTformer

CONFIGS = Path(__file__).resolve().parents[2] / "configs" / "model"


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the machine is shared; small inputs do not need more
    yield
    torch.set_num_threads(threads)


def _layer(dim: int = 64, heads: int = 2, seed: int = 0, **kwargs) -> SetAttention:
    torch.manual_seed(seed)
    layer = SetAttention(dim, heads, **kwargs)
    for lin in (layer.in_proj, layer.proj):  # the backbone's init (in_proj is Identity with input_proj=False)
        if not isinstance(lin, torch.nn.Linear):
            continue
        torch.nn.init.trunc_normal_(lin.weight, std=0.02)
        torch.nn.init.zeros_(lin.bias)
    return layer


def _tokens(b: int, n: int, dim: int, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return F.layer_norm(torch.randn(b, n, dim, generator=g), (dim,))  # what a pre-norm block feeds the layer


# --------------------------------------------------------------------------------------------- transport plan


@pytest.mark.parametrize("pos_sigma", [0.25, None])
def test_plan_invariants(pos_sigma):
    n, p = 196, 49
    layer = _layer(num_ref=p, pos_sigma=pos_sigma, sinkhorn_iters=3, sinkhorn_eps=0.5)
    out, plan = layer(_tokens(2, n, 64), (14, 14), return_plan=True)
    assert plan.shape == (2, 2, n, p) and plan.dtype == torch.float32
    t = plan.double()
    assert (plan >= 0).all()
    # the last update is the column update: column marginals hold to float32 precision
    torch.testing.assert_close(t.sum(-2), torch.full_like(t.sum(-2), 1 / p), rtol=2e-6, atol=0)
    torch.testing.assert_close(t.sum((-2, -1)), torch.ones(2, 2, dtype=torch.float64), rtol=2e-6, atol=0)
    # p T^T is row-stochastic: every reference slot is a convex combination of tokens
    torch.testing.assert_close((p * t.mT).sum(-1), torch.ones(2, 2, p, dtype=torch.float64), rtol=2e-6, atol=0)
    # row marginals are approximate after L=3 (the way back renormalises them: test_set_attention.py)
    row_err = (t.sum(-1) * n - 1).abs().max()
    assert row_err < 0.15, row_err
    assert out.shape == (2, n, 64)


def test_row_marginals_improve_with_iterations():
    n, p = 196, 49
    layer = _layer(num_ref=p)
    x = _tokens(1, n, 64)
    errors = []
    for iters in (1, 2, 3, 5, 8):
        layer.sinkhorn_iters = iters
        _, plan = layer(x, (14, 14), return_plan=True)
        errors.append((plan.double().sum(-1) * n - 1).abs().max().item())
    assert all(a > b for a, b in zip(errors, errors[1:])), errors
    assert errors[0] > 0.05 and errors[-1] < 1e-3, errors  # the problem is not trivial, and it converges


def test_sinkhorn_backward_matches_autograd_through_iterations():
    torch.manual_seed(0)
    log_kernel = (3 * torch.randn(2, 3, 9, 4, dtype=torch.float64)).requires_grad_()
    assert torch.autograd.gradcheck(lambda k: log_sinkhorn(k, 3), (log_kernel,))
    weights = torch.randn(2, 3, 9, 4, dtype=torch.float64)
    for iters in (1, 4):
        mine = torch.autograd.grad((log_sinkhorn(log_kernel, iters) * weights).sum(), log_kernel)[0]
        ref = torch.autograd.grad((log_sinkhorn_unrolled(log_kernel, iters) * weights).sum(), log_kernel)[0]
        torch.testing.assert_close(mine, ref, rtol=1e-10, atol=1e-12)
    with pytest.raises(ValueError, match="num_iters"):
        log_sinkhorn(log_kernel, 0)


def test_inverse_sqrt_newton_schulz_value():
    torch.manual_seed(0)
    a = torch.randn(3, 6, 6, dtype=torch.float64)
    m = a @ a.mT + 1e-3 * torch.eye(6, dtype=torch.float64)
    w, r = inverse_sqrt_newton_schulz(m, newton_schulz_iters(6, 1e-3))
    eye = torch.eye(6, dtype=torch.float64).expand(3, 6, 6)
    torch.testing.assert_close(w @ m @ w, eye, rtol=0, atol=1e-8)
    torch.testing.assert_close(r @ r, m, rtol=1e-8, atol=1e-8)


@pytest.mark.parametrize("kernel_sigma", [0.5, 2.0])  # the default, and the wide kernel
def test_kernel_map_is_exact_on_the_anchors(kernel_sigma):
    """Nystrom: on the anchors themselves psi(z_i)^T psi(z_j) = kappa(z_i^T z_j), up to the ridge."""
    layer = _layer(kernel_sigma=kernel_sigma)
    z = F.normalize(layer.anchors.detach(), dim=-1)  # (h, k, d)
    psi = layer.kernel_map(z.unsqueeze(0))[0]  # (h, k, k)
    kappa = torch.exp(layer.alpha * (z @ z.mT - 1))
    torch.testing.assert_close(psi @ psi.mT, kappa, rtol=0, atol=3e-3)


# ------------------------------------------------------------------------------------------------------ layer


@pytest.mark.parametrize(("grid", "num_ref"), [((14, 14), 49), ((4, 8), 6), ((2, 2), 16), ((1, 1), 4), ((3, 5), 1)])
def test_output_shape(grid, num_ref):
    n = grid[0] * grid[1]
    layer = _layer(dim=48, heads=3, num_ref=num_ref)
    out, plan = layer(_tokens(2, n, 48), grid, return_plan=True)
    assert out.shape == (2, n, 48) and torch.isfinite(out).all()
    assert plan.shape == (2, 3, n, num_ref)
    assert (layer.reference is None) == (num_ref == 1)  # one slot: a uniform plan, nothing to learn
    assert reference_grid_shape(num_ref)[0] * reference_grid_shape(num_ref)[1] == num_ref


def test_needs_grid_for_non_square_token_counts():
    layer = _layer(num_ref=4)
    with pytest.raises(ValueError, match="grid_size"):
        layer(_tokens(1, 12, 64))
    with pytest.raises(ValueError, match="does not match"):
        layer(_tokens(1, 12, 64), (3, 3))


def test_permutation_equivariance_without_positional_terms():
    n = 64
    x = _tokens(2, n, 64)
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(3))
    layer = _layer(num_ref=16, pos_sigma=None, lepe=False)
    out, out_perm = layer(x), layer(x[:, perm])
    torch.testing.assert_close(out_perm, out[:, perm], rtol=1e-4, atol=1e-6)
    # the positional penalty is what breaks it
    pos = _layer(num_ref=16, pos_sigma=0.25, lepe=False)
    assert (pos(x[:, perm]) - pos(x)[:, perm]).abs().max() > 1e-3


def _forward_flops(module: torch.nn.Module, n_side: int, dim: int) -> int:
    counter = FlopCounterMode(display=False)
    with torch.no_grad(), sdpa_kernel(SDPBackend.MATH), counter:  # math SDPA: counted as matmuls
        module(torch.zeros(1, n_side * n_side, dim), (n_side, n_side))
    return counter.get_total_flops()


def test_set_flops_linear_in_tokens_at_fixed_reference():
    layer = _layer(num_ref=64)
    ratio = _forward_flops(layer, 32, 64) / _forward_flops(layer, 16, 64)  # 4x the tokens
    assert 4 * 0.85 <= ratio <= 4 * 1.15, ratio
    torch.manual_seed(0)
    softmax = SoftmaxAttention(64, 2)
    ratio_softmax = _forward_flops(softmax, 32, 64) / _forward_flops(softmax, 16, 64)
    assert ratio_softmax > 6, ratio_softmax  # quadratic attention, for contrast


def test_gradient_reaches_anchors_reference_and_projections():
    layer = _layer(num_ref=16)
    layer(_tokens(2, 64, 64)).square().sum().backward()
    for name in ("anchors", "reference", "in_proj.weight", "proj.weight", "lepe.weight"):
        grad = layer.get_parameter(name).grad
        assert grad is not None and torch.isfinite(grad).all() and grad.abs().sum() > 0, name


def test_autocast_keeps_the_plan_in_float32():
    layer = _layer(num_ref=16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out, plan = layer(_tokens(1, 64, 64), return_plan=True)
    assert plan.dtype == torch.float32 and torch.isfinite(out).all()
    torch.testing.assert_close(plan.sum(-2), torch.full_like(plan.sum(-2), 1 / 16), rtol=2e-6, atol=0)


# --------------------------------------------------------------------------------------------------- backbone


def _grads(model: torch.nn.Module, x: torch.Tensor) -> dict[str, torch.Tensor]:
    model.zero_grad(set_to_none=True)
    model(x).square().mean().backward()
    return {n: p.grad for n, p in model.named_parameters()}


@pytest.mark.parametrize("img_size", [32, 64])
def test_lite_small_inputs_stage_resolutions_and_gradients(img_size):
    torch.manual_seed(0)
    model = create_model("setformer_lite", img_size=img_size, num_classes=10, drop_path_rate=0.0)
    x = torch.randn(2, 3, img_size, img_size)
    maps = model.forward_intermediates(x)
    assert [tuple(m.shape[1:]) for m in maps] == [(32 * 2**i, img_size // 2**(i + 2), img_size // 2**(i + 2))
                                                  for i in range(4)]  # fmt: skip
    feats = model.forward_features(x)
    assert feats.shape == (2, (img_size // 32) ** 2, 256)
    assert model.forward_head(feats, pre_logits=True).shape == (2, 256)
    grads = _grads(model, x)
    assert model(x).shape == (2, 10)
    for name, grad in grads.items():
        assert grad is not None and torch.isfinite(grad).all() and grad.abs().sum() > 0, name


def test_softmax_switch_builds_the_same_backbone():
    torch.manual_seed(0)
    set_model = create_model("setformer_lite", img_size=32, num_classes=10)
    softmax_model = create_model("setformer_lite", img_size=32, num_classes=10, attention="softmax")
    attn = [m for m in softmax_model.modules() if isinstance(m, (SetAttention, SoftmaxAttention))]
    assert len(attn) == 5 and all(isinstance(m, SoftmaxAttention) for m in attn)
    assert not softmax_model.no_weight_decay()
    x = torch.randn(2, 3, 32, 32)
    assert softmax_model(x).shape == (2, 10) == set_model(x).shape
    assert [m.shape for m in softmax_model.forward_intermediates(x)] == [
        m.shape for m in set_model.forward_intermediates(x)
    ]
    with pytest.raises(ValueError, match="attention"):
        create_model("setformer_lite", attention="linear")


def test_bad_input_size_is_a_clear_error():
    model = create_model("setformer_lite", img_size=64, num_classes=10)
    with pytest.raises(ValueError, match=r"divisible by 32.*48x64.*64x64"):
        model(torch.randn(1, 3, 48, 64))
    with pytest.raises(ValueError, match="img_size=100"):
        create_model("setformer_lite", img_size=100)
    assert model(torch.randn(1, 3, 96, 64)).shape == (1, 10)  # other sizes divisible by 32 work, non-square too


def test_unknown_kwargs_list_the_accepted_ones():
    with pytest.raises(ValueError, match=r"\['num_refs'\].*accepted:.*num_ref.*sinkhorn_eps"):
        create_model("setformer_tiny", num_refs=32)
    model = create_model("setformer_lite", img_size=64, num_ref=9, sinkhorn_iters=2, sinkhorn_eps=0.3, pos_sigma=None)
    attn = [m for m in model.modules() if isinstance(m, SetAttention)]
    assert [a.num_ref for a in attn] == [9, 9, 9, 9, 4]  # stages 8x8, 4x4, 4x4 (2 blocks), then 2x2: clamped to 4
    assert {(a.sinkhorn_iters, a.sinkhorn_eps, a.pos_sigma) for a in attn} == {(2, 0.3, None)}


def test_no_weight_decay_names_anchors_and_references():
    model = create_model("setformer_lite", img_size=64)
    names = dict(model.named_parameters())
    nwd = model.no_weight_decay()
    assert nwd <= set(names)
    assert {n for n in names if n.endswith((".anchors", ".reference"))} == nwd and len(nwd) == 10


def test_grad_checkpointing_gives_the_same_gradients():
    torch.manual_seed(0)
    model = create_model("setformer_lite", img_size=32, num_classes=10, drop_path_rate=0.0)
    x = torch.randn(2, 3, 32, 32)
    plain = _grads(model, x)
    model.set_grad_checkpointing(True)
    ckpt = _grads(model, x)
    for name in plain:
        torch.testing.assert_close(ckpt[name], plain[name], rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize("config", sorted(p.name for p in CONFIGS.glob("setformer_*.yaml")))
def test_model_configs_build(config):
    data = yaml.safe_load((CONFIGS / config).read_text())
    cfg = ModelConfig(**data, num_classes=10)
    with torch.device("meta"):  # shapes only: the big variants cost nothing to build here
        model = create_model(cfg.name, num_classes=10, img_size=cfg.img_size, drop_path_rate=cfg.drop_path_rate,
                             drop_rate=cfg.drop_rate, **cfg.kwargs)  # fmt: skip
    assert isinstance(model, SeTformer) and model.img_size == cfg.img_size
    if cfg.img_size == 32:
        torch.manual_seed(0)
        model = create_model(cfg.name, num_classes=10, img_size=32, drop_path_rate=0.0, **cfg.kwargs)
        for name, grad in _grads(model, torch.randn(2, 3, 32, 32)).items():
            assert grad is not None and grad.abs().sum() > 0, name
