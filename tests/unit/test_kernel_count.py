"""The kernel and host-read counter that the kernel budgets of the SeT layer and the train step are measured with."""

from __future__ import annotations

import torch

from pretrain.kernel_count import KernelCounter, count_kernels, record_triton_launch


def test_kernels_are_counted_and_views_and_allocations_are_not():
    x = torch.randn(4, 5, requires_grad=True)

    def fwd_bwd():
        y = x.t().reshape(5, 4).contiguous()  # t and reshape of a non-contiguous: view, then one copy (clone)
        buf = torch.empty(3)  # an allocation, no kernel
        (y.exp() @ x).sum().backward()
        return buf

    count = count_kernels(fwd_bwd)
    assert count.by_op["exp"] == 1
    assert count.by_op["mm"] == 3  # forward and the two gradients of the product
    assert "t" not in count.by_op and "empty" not in count.by_op and "view" not in count.by_op
    assert count.host_reads == [] and count.linalg == []


def test_host_reads_name_their_caller_whatever_api_makes_them():
    x = torch.randn(8)

    def reads():
        float(x.sum())
        bool(x[0] > 0)
        x.tolist()
        torch.nonzero(x > 0)

    count = count_kernels(reads)
    assert [r.split("@")[0] for r in count.host_reads] == [
        "_local_scalar_dense",
        "_local_scalar_dense",
        "tolist",
        "nonzero",
    ]
    assert all(r.endswith("test_kernel_count.py:reads") for r in count.host_reads)


def test_factorisations_are_listed_and_norms_are_not():
    m = torch.randn(6, 6)
    count = count_kernels(lambda: (torch.linalg.eigh(m @ m.T), torch.linalg.vector_norm(m), torch.linalg.inv(m)))
    assert [n for n in count.linalg] == ["_linalg_eigh", "linalg_inv_ex"]


def test_triton_launches_count_as_kernels_in_the_active_counter_only():
    record_triton_launch("outside")  # no counter active: nothing to count
    with KernelCounter() as counter:
        record_triton_launch("sinkhorn_fwd")
        record_triton_launch("sinkhorn_fwd")
        torch.ones(2).add_(1)
    assert counter.count.triton == 2
    assert counter.count.kernels == 2 + 2  # ones (a fill) and add_
    assert counter.count.by_op["triton:sinkhorn_fwd"] == 2 and "triton:outside" not in counter.count.by_op
