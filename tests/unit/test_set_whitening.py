"""SeT without host syncs (issue 21): the matmul-only whitening against ``eigh``, its cache, the positional buffer,
the kernel trace of every SeTformer variant, and a compiled block without graph breaks."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from set_reference import EighSetAttention, inverse_sqrt_eigh
from test_setformer import _one_thread, _tokens  # noqa: F401  (_one_thread: the autouse 1-thread fixture)

from pretrain.kernel_count import count_kernels
from pretrain.models import create_model
from pretrain.models.set_attention import SetAttention
from pretrain.models.set_whitening import clear_whitening_cache, whitening
from pretrain.models.setformer import SetformerBlock


def _anchors(h: int, k: int, d: int, duplicates: bool, dtype=torch.float64) -> torch.Tensor:
    a = torch.randn(h, k, d, generator=torch.Generator().manual_seed(0), dtype=dtype)
    if duplicates:  # half the anchors one direction: the ridge is the smallest eigenvalue (condition ~2.7e4)
        a[:, : k // 2] = a[:, :1]
    return a


def _eigh_whitening(a: torch.Tensor, alpha: float, ridge: float) -> torch.Tensor:
    z = F.normalize(a, dim=-1)
    return inverse_sqrt_eigh(torch.exp(alpha * (z @ z.mT - 1)), ridge)


@pytest.mark.parametrize("duplicates", [False, True])
def test_newton_schulz_whitening_matches_eigh(duplicates):
    clear_whitening_cache()
    a = _anchors(4, 32, 32, duplicates).requires_grad_()
    weights = torch.randn(4, 32, 32, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    ref = _eigh_whitening(a, 0.25, 1e-3)
    ref_grad = torch.autograd.grad((ref * weights).sum(), a)[0]
    ours = whitening(a, 0.25, 1e-3)[..., 32:64]
    torch.testing.assert_close(ours, ref, rtol=1e-10, atol=1e-10)  # float64: the iteration has converged
    torch.testing.assert_close(torch.autograd.grad((ours * weights).sum(), a)[0], ref_grad, rtol=1e-9, atol=1e-9)
    # float32 (what the layer uses) is at float32's floor for this condition number, as float32 eigh would be
    a32 = a.detach().float().requires_grad_()
    ours32 = whitening(a32, 0.25, 1e-3)[..., 32:64]
    grad32 = torch.autograd.grad((ours32 * weights.float()).sum(), a32)[0]
    rel = lambda x, y: ((x.double() - y).norm() / y.norm()).item()
    bound = 3e-4 if duplicates else 2e-5  # measured 7e-5 / 4e-6 (value), 1.9e-4 / 1e-5 (gradient)
    assert rel(ours32, ref) < bound and rel(grad32, ref_grad) < 3 * bound, (rel(ours32, ref), rel(grad32, ref_grad))


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(num_ref=16),
        dict(num_ref=16, kernel_sigma=2.0, pos_sigma=0.5, learn_pos_scale=True, exact_rows=True),
        dict(num_ref=16, exact_rows=False, pos_sigma=None),
        dict(num_ref=16, grid=(4, 4), direct_output=True),
    ],
    ids=["p<n", "p<n_wide_learned_pos_exact_rows", "n_T_A_no_pos", "p=n_direct"],
)
def test_layer_matches_the_eigh_layer(kwargs):
    """Outputs and every gradient of the layer within 1e-4 of today's eigh layer (float32, same weights)."""
    grid = kwargs.pop("grid", (8, 8))
    n = grid[0] * grid[1]
    torch.manual_seed(0)
    ours = SetAttention(64, 2, set_impl="torch", **kwargs)
    ref = EighSetAttention(64, 2, set_impl="torch", **kwargs)
    ref.load_state_dict(ours.state_dict())
    x = _tokens(2, n, 64)
    results = []
    for layer in (ours, ref):
        clear_whitening_cache()
        xx = x.clone().requires_grad_()
        out = layer(xx, grid)
        out.square().sum().backward()
        results.append([out, xx.grad] + [p.grad for p in layer.parameters()])
    names = ["out", "x.grad"] + [name for name, _ in ours.named_parameters()]
    for name, a, b in zip(names, *results):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4 * b.abs().max().item(), msg=name)


def test_whitening_is_cached_until_the_anchors_change():
    clear_whitening_cache()
    layer = SetAttention(64, 2, num_ref=16, set_impl="torch")
    x = _tokens(2, 64, 64)
    first = layer.whitening()
    assert layer.whitening().data_ptr() == first.data_ptr()  # no recompute between two forwards without a step
    with torch.no_grad():
        layer.eval()(x, (8, 8))  # eval forwards reuse it too
    assert layer.whitening().data_ptr() == first.data_ptr()
    count = count_kernels(lambda: layer.whitening())
    assert count.kernels == 0, count.by_op  # a hit reads metadata only
    opt = torch.optim.SGD(layer.parameters(), lr=0.1)
    layer.train()(x, (8, 8)).square().sum().backward()
    opt.step()  # an in-place update: the next forward whitens the new anchors
    after = layer.whitening()
    assert after.data_ptr() != first.data_ptr()
    clear_whitening_cache()
    torch.testing.assert_close(after, layer.whitening(), rtol=0, atol=0)

    class DataOptimizer(torch.optim.Optimizer):  # writes through .data, as DeepSpeed ZeRO does: no version bump
        def __init__(self, params):
            super().__init__(params, {})

        def step(self, closure=None):
            for group in self.param_groups:
                for p in group["params"]:
                    p.data.add_(torch.ones_like(p.data), alpha=0.3)

    version = layer.anchors._version
    DataOptimizer([layer.anchors]).step()
    assert layer.anchors._version == version
    stale_free = layer.whitening()
    clear_whitening_cache()
    torch.testing.assert_close(stale_free, layer.whitening(), rtol=0, atol=0)


def test_micro_batch_gradients_equal_the_summed_loss():
    clear_whitening_cache()
    layer = SetAttention(64, 2, num_ref=16, set_impl="torch")
    a, b = _tokens(2, 64, 64, seed=1), _tokens(2, 64, 64, seed=2)
    layer(a, (8, 8)).square().sum().backward()  # two micro-batches share one cached whitening ...
    layer(b, (8, 8)).square().sum().backward()
    accumulated = {n: p.grad.clone() for n, p in layer.named_parameters()}
    layer.zero_grad(set_to_none=True)
    clear_whitening_cache()
    (layer(a, (8, 8)).square().sum() + layer(b, (8, 8)).square().sum()).backward()  # ... as one summed loss
    for name, p in layer.named_parameters():
        torch.testing.assert_close(accumulated[name], p.grad, rtol=1e-5, atol=1e-6, msg=name)


def test_positional_log_weight_is_a_float32_buffer_built_once():
    layer = SetAttention(64, 2, num_ref=16, grid_size=(8, 8), set_impl="torch").to(torch.bfloat16)
    assert layer.log_w.dtype == torch.float32 and layer.log_w.shape == (64, 16)
    assert "log_w" not in layer.state_dict()
    x = _tokens(2, 64, 64).bfloat16()
    count = count_kernels(lambda: layer(x, (8, 8)).float().sum().backward())
    assert count.by_op["arange"] == 0, count.by_op
    layer(_tokens(1, 16, 64).bfloat16(), (4, 4))  # another grid: rebuilt for it
    assert layer.log_w.shape == (16, 16)


@pytest.mark.parametrize("name", ["setformer_lite", "setformer_tiny", "setformer_small", "setformer_base"])
def test_every_variant_traces_without_factorisations_or_host_reads(name):
    torch.manual_seed(0)
    model = create_model(name, num_classes=10, img_size=64, set_impl="torch")
    x = torch.randn(1, 3, 64, 64)
    count = count_kernels(lambda: F.cross_entropy(model(x), torch.tensor([3])).backward())
    assert count.linalg == [] and count.host_reads == [], (count.linalg, count.host_reads)
    assert count.kernels > 100  # the trace did run the model


def test_compiled_block_has_no_graph_breaks():
    torch.manual_seed(0)
    block = SetformerBlock(64, 2, num_ref=16, grid_size=(8, 8), set_impl="torch")
    explanation = torch._dynamo.explain(block)(_tokens(2, 64, 64), (8, 8))
    assert explanation.graph_break_count == 0, explanation.break_reasons
    compiled = torch.compile(block, backend="aot_eager")
    x = _tokens(2, 64, 64)
    torch.testing.assert_close(compiled(x, (8, 8)), block(x, (8, 8)), rtol=1e-5, atol=1e-6)
