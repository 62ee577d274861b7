"""Invariant: the sparse-delta linear equals a dense reference (values and grads) with both
kernels, and the dense gradient handed to the selection hook is the true dW."""
import pytest
import torch
import torch.nn.functional as F

from seft_scale.seft.kernels import SparseDeltaLinear, choose_kernel, linear_sparse_delta


def setup(seed=0, bias=True, k=37):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(24, 40, generator=g, dtype=torch.float64)
    w[torch.rand(24, 40, generator=g) < 0.5] = 0
    b = torch.randn(24, generator=g, dtype=torch.float64) if bias else None
    pos = torch.randperm(24 * 40, generator=g)[:k].sort().values
    vals = torch.randn(k, generator=g, dtype=torch.float64)
    x = torch.randn(3, 5, 40, generator=g, dtype=torch.float64)
    return x, w, b, pos, vals


@pytest.mark.parametrize("kernel", ["dense", "gather"])
@pytest.mark.parametrize("bias", [True, False])
def test_matches_dense_reference(kernel, bias):
    x, w, b, pos, vals = setup(bias=bias)
    # reference: a dense trainable delta, only the slot entries read out
    dense = torch.zeros(24 * 40, dtype=torch.float64)
    dense[pos] = vals
    dense.requires_grad_(True)
    xr = x.clone().requires_grad_(True)
    br = b.clone().requires_grad_(True) if bias else None
    y_ref = F.linear(xr, w + dense.view(24, 40), br)
    g_out = torch.randn_like(y_ref)
    y_ref.backward(g_out)

    xs, vs = x.clone().requires_grad_(True), vals.clone().requires_grad_(True)
    bs = b.clone().requires_grad_(True) if bias else None
    y = linear_sparse_delta(xs, w, bs, pos, vs, kernel)
    y.backward(g_out)
    torch.testing.assert_close(y, y_ref, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(xs.grad, xr.grad, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(vs.grad, dense.grad[pos], rtol=1e-12, atol=1e-12)
    if bias:
        torch.testing.assert_close(bs.grad, br.grad)


def test_hook_receives_dense_weight_gradient():
    x, w, b, pos, vals = setup()
    seen = []
    wr = w.clone().requires_grad_(True)
    y_ref = F.linear(x, wr + torch.zeros(24 * 40, dtype=torch.float64).index_add(0, pos, vals).view(24, 40), b)
    g_out = torch.randn_like(y_ref)
    y_ref.backward(g_out)
    vs = vals.clone().requires_grad_(True)
    # the hook forces the dense path even when the gather kernel was chosen
    linear_sparse_delta(x, w, b, pos, vs, "gather", seen.append).backward(g_out)
    assert len(seen) == 1
    torch.testing.assert_close(seen[0], wr.grad)
    torch.testing.assert_close(vs.grad, wr.grad.reshape(-1)[pos])


def test_module_swap_keeps_names_and_weights_frozen():
    lin = torch.nn.Linear(8, 6, bias=False)
    w0 = lin.weight.detach().clone()
    lin.weight.requires_grad_(False)
    vals = torch.zeros(3, requires_grad=True)
    pos = torch.tensor([0, 9, 47])
    SparseDeltaLinear.attach(lin, lambda: (pos, vals), "gather")
    assert isinstance(lin, torch.nn.Linear) and list(dict(lin.named_parameters())) == ["weight"]
    out = lin(torch.randn(2, 8))
    out.sum().backward()
    assert vals.grad is not None and lin.weight.grad is None
    lin.detach_delta()
    assert type(lin) is torch.nn.Linear and torch.equal(lin.weight, w0)


def test_cost_rule():
    assert choose_kernel(num_slots=100, numel=100_000, gather_cost_ratio=16) == "gather"
    assert choose_kernel(num_slots=10_000, numel=100_000, gather_cost_ratio=16) == "dense"
