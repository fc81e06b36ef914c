"""The fused Triton path of SeT (``set_impl="triton"``) against the torch path, under Triton's interpreter on CPU.

``TRITON_INTERPRET=1`` must be set before ``pretrain.models.set_triton`` is imported (the kernels are decorated at
import); nothing else in the unit tests imports it, so this module sets it first.
"""

from __future__ import annotations

import copy
import os

os.environ["TRITON_INTERPRET"] = "1"

import pytest  # noqa: E402
import torch  # noqa: E402

pytest.importorskip("triton")

from test_setformer import _one_thread, _tokens  # noqa: E402, F401  (_one_thread: the autouse 1-thread fixture)

from pretrain.kernel_count import count_kernels  # noqa: E402
from pretrain.models import set_triton, set_triton_whitening  # noqa: E402
from pretrain.models.set_attention import SetAttention  # noqa: E402
from pretrain.models.set_whitening import (  # noqa: E402
    _whiten_backward_torch,
    _whiten_torch,
    clear_whitening_cache,
    newton_schulz_iters,
    sign_iters,
)
from pretrain.models.setformer import SetformerBlock  # noqa: E402


def _run(layer: SetAttention, x: torch.Tensor, grid: tuple[int, int], impl: str) -> list[torch.Tensor]:
    """Output, input gradient and every parameter gradient (float32) of one forward+backward on path ``impl``."""
    layer.set_impl = impl
    layer.zero_grad(set_to_none=True)
    clear_whitening_cache()
    weights = torch.randn(x.shape, generator=torch.Generator().manual_seed(7))
    xx = x.detach().clone().requires_grad_()
    out = layer(xx, grid)
    (out.float() * weights).sum().backward()
    return [out.detach().float(), xx.grad.float()] + [p.grad.float() for p in layer.parameters()]


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


# The wide-kernel layer's settings (kernel sigma 2.0, learned positional scale, exact rows, direct output at p = n)
WIDE = dict(kernel_sigma=2.0, pos_sigma=0.5, learn_pos_scale=True, exact_rows=True, direct_output=True)

CASES = {  # name -> (layer kwargs, grid, batch); the defaults: n T A, positional scale fixed, plan twice at p = n
    "n_35_not_a_block_multiple": (dict(num_ref=6), (5, 7), 2),
    "p_1": (dict(num_ref=1), (3, 5), 2),
    "p_n_direct": (dict(num_ref=16, direct_output=True), (4, 4), 2),
    "p_n_plan_twice": (dict(num_ref=16, direct_output=False), (4, 4), 2),
    "batch_1_no_pos_n_T_A": (dict(num_ref=16, pos_sigma=None, exact_rows=False), (8, 8), 1),
    "wide_learned_pos_scale_exact_rows": (dict(num_ref=9, sinkhorn_iters=2, **WIDE), (6, 6), 2),
    "tiled_n_576": (dict(num_ref=16), (24, 24), 1),  # 3 tiles of 256 tokens, the last one partial
}


@pytest.mark.parametrize("case", list(CASES))
def test_fused_path_matches_torch_path_float32(case):
    kwargs, grid, batch = CASES[case]
    torch.manual_seed(0)
    layer = SetAttention(48, 3, **kwargs)
    x = _tokens(batch, grid[0] * grid[1], 48)
    ref = _run(layer, x, grid, "torch")
    fused = _run(layer, x, grid, "triton")
    names = ["out", "x.grad"] + [n for n, _ in layer.named_parameters()]
    errors = {n: _rel(a, b) for n, a, b in zip(names, fused, ref)}
    assert max(errors.values()) < 2e-4, errors  # measured <= 4e-5 (the two whitenings' float32 rounding)


@pytest.mark.parametrize("case", ["n_35_not_a_block_multiple", "p_n_direct", "p_n_plan_twice", "p_1"])
def test_fused_path_bfloat16_is_closer_to_float32_than_the_torch_path(case):
    """In bf16 the fused path computes in float32 from bf16 inputs; the torch path rounds psi and S to bf16."""
    kwargs, grid, batch = CASES[case]
    torch.manual_seed(0)
    layer = SetAttention(48, 3, **kwargs).to(torch.bfloat16)
    x = _tokens(batch, grid[0] * grid[1], 48).bfloat16()
    exact = _run(copy.deepcopy(layer).float(), x.float(), grid, "torch")
    torch_bf16 = _run(layer, x, grid, "torch")
    fused_bf16 = _run(layer, x, grid, "triton")
    for i, (f, t, e) in enumerate(zip(fused_bf16, torch_bf16, exact)):
        if e.norm() == 0:  # a bias without gradient path (lepe.bias at zero)
            continue
        assert _rel(f, e) < 2e-2 and _rel(f, e) <= max(_rel(t, e), 1e-2), (i, _rel(f, e), _rel(t, e))


def test_whitening_kernels_match_torch():
    a = torch.randn(3, 24, 20, generator=torch.Generator().manual_seed(0))
    packed = set_triton_whitening.whiten_forward(a, 0.25, 1e-3, newton_schulz_iters(24, 1e-3))
    ref = _whiten_torch(a, 0.25, 1e-3, newton_schulz_iters(24, 1e-3))
    assert _rel(packed, ref) < 1e-5
    grad = torch.randn(ref.shape, generator=torch.Generator().manual_seed(1))
    ours = set_triton_whitening.whiten_backward(a, packed, grad, 0.25, sign_iters(24, 1e-3))
    assert _rel(ours, _whiten_backward_torch(a, ref, grad, 0.25, sign_iters(24, 1e-3))) < 1e-4


def test_one_layer_budget_under_40_kernels_no_linalg_no_host_reads():
    torch.manual_seed(0)
    layer = SetAttention(256, 8, num_ref=49, grid_size=(14, 14), set_impl="triton").to(torch.bfloat16)
    x = torch.randn(2, 196, 256, dtype=torch.bfloat16, requires_grad=True)

    def step():
        layer.zero_grad(set_to_none=True)
        x.grad = None
        layer(x, (14, 14)).float().square().mean().backward()

    step()
    clear_whitening_cache()  # a step's first micro-batch: the whitening is computed
    count = count_kernels(step)
    assert count.kernels <= 40 and count.linalg == [] and count.host_reads == [], count.by_op
    assert count.triton == 4, count.by_op  # whitening and core, forward and backward


def test_triton_path_compiles_without_graph_breaks():
    torch.manual_seed(0)
    block = SetformerBlock(48, 3, num_ref=6, grid_size=(5, 7), set_impl="triton")
    x = _tokens(2, 35, 48)
    explanation = torch._dynamo.explain(block)(x, (5, 7))
    assert explanation.graph_break_count == 0, explanation.break_reasons
    compiled = torch.compile(block, backend="aot_eager")
    xx = x.clone().requires_grad_()
    compiled(xx, (5, 7)).square().sum().backward()
    ref = x.clone().requires_grad_()
    block(ref, (5, 7)).square().sum().backward()
    torch.testing.assert_close(xx.grad, ref.grad, rtol=1e-5, atol=1e-6)


def test_triton_on_cpu_without_the_interpreter_is_a_clear_error(monkeypatch):
    monkeypatch.setattr(set_triton, "_INTERPRET", False)
    layer = SetAttention(48, 3, num_ref=6, set_impl="triton")
    with pytest.raises(ValueError, match="TRITON_INTERPRET"):
        layer(_tokens(1, 35, 48), (5, 7))
