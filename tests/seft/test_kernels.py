"""Invariant: the sparse-delta linear equals a dense reference (output, input and δ gradients)
with both kernels, in fp64 to 1e-12 and in bf16 within bf16 rounding; θ is restored bit for bit
after every forward and backward; the selection hook receives the true dense dW."""
import pytest
import torch
import torch.nn.functional as F

from seft_scale.seft.kernels import SparseDeltaLinear, choose_kernel, linear_sparse_delta, sddmm


class LocalSlots:
    """A slot source holding the whole matrix's slots (one process)."""

    def __init__(self, pos, values):
        self.pos, self.values = pos, values

    def full(self):
        return self.pos, self.values.detach()

    def reduce(self, grad_full):
        return grad_full


def setup(seed=0, bias=True, k=37, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(24, 40, generator=g, dtype=torch.float64)
    w[torch.rand(24, 40, generator=g) < 0.5] = 0
    b = torch.randn(24, generator=g, dtype=torch.float64) if bias else None
    pos = torch.randperm(24 * 40, generator=g)[:k].sort().values
    vals = torch.randn(k, generator=g, dtype=torch.float64)
    x = torch.randn(3, 5, 40, generator=g, dtype=torch.float64)
    cast = (lambda t: None if t is None else t.to(dtype))
    return cast(x), cast(w), cast(b), pos, vals if dtype == torch.float64 else vals.float()


def reference(x, w, b, pos, vals, g_out):
    dense = torch.zeros(w.numel(), dtype=torch.float64)
    dense[pos] = vals.double()
    dense.requires_grad_(True)
    xr = x.double().clone().requires_grad_(True)
    br = b.double().clone().requires_grad_(True) if b is not None else None
    y = F.linear(xr, w.double() + dense.view(w.shape), br)
    y.backward(g_out.double())
    return y, xr.grad, dense.grad[pos], br.grad if b is not None else None


@pytest.mark.parametrize("kernel", ["dense", "sddmm"])
@pytest.mark.parametrize("bias", [True, False])
def test_matches_dense_reference(kernel, bias):
    x, w, b, pos, vals = setup(bias=bias)
    w0 = w.clone()
    g_out = torch.randn(3, 5, 24, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    y_ref, gx_ref, gv_ref, gb_ref = reference(x, w, b, pos, vals, g_out)
    xs, vs = x.clone().requires_grad_(True), vals.clone().requires_grad_(True)
    bs = b.clone().requires_grad_(True) if bias else None
    y = linear_sparse_delta(xs, w, bs, vs, LocalSlots(pos, vs), kernel)
    assert torch.equal(w, w0)  # θ restored after the forward ...
    y.backward(g_out)
    assert torch.equal(w, w0)  # ... and after the backward
    torch.testing.assert_close(y, y_ref, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(xs.grad, gx_ref, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(vs.grad, gv_ref, rtol=1e-12, atol=1e-12)
    if bias:
        torch.testing.assert_close(bs.grad, gb_ref)


@pytest.mark.parametrize("kernel", ["dense", "sddmm"])
def test_bf16_within_rounding_and_delta_grads_summed_in_fp32(kernel):
    x, w, b, pos, vals = setup(dtype=torch.bfloat16)
    w0 = w.clone()
    g_out = torch.randn(3, 5, 24, generator=torch.Generator().manual_seed(1)).to(torch.bfloat16)
    y_ref, gx_ref, gv_ref, _ = reference(x, w, b, pos, vals, g_out)
    xs, vs = x.clone().requires_grad_(True), vals.clone().requires_grad_(True)
    y = linear_sparse_delta(xs, w, b, vs, LocalSlots(pos, vs), kernel)
    y.backward(g_out)
    assert torch.equal(w, w0) and vs.grad.dtype == torch.float32
    torch.testing.assert_close(y.double(), y_ref, rtol=2e-2, atol=5e-2)
    torch.testing.assert_close(xs.grad.double(), gx_ref, rtol=2e-2, atol=5e-2)
    # the δ-gradients are exact sums of bf16 products: only the dense kernel's bf16 G rounds
    tol = dict(rtol=1e-5, atol=1e-5) if kernel == "sddmm" else dict(rtol=2e-2, atol=5e-2)
    torch.testing.assert_close(vs.grad.double(), gv_ref, **tol)


def test_sddmm_over_token_blocks_equals_dense():
    g = torch.Generator().manual_seed(3)
    x2, g2 = torch.randn(700, 64, generator=g), torch.randn(700, 48, generator=g)
    pos = torch.randperm(48 * 64, generator=g)[:300].sort().values
    import seft_scale.seft.kernels as kernels
    old, kernels.SDDMM_BLOCK_BYTES = kernels.SDDMM_BLOCK_BYTES, 64 * 4 * 64  # 64-token blocks
    try:
        got = sddmm(g2, x2, pos, (48, 64))
    finally:
        kernels.SDDMM_BLOCK_BYTES = old
    torch.testing.assert_close(got, (g2.t() @ x2).reshape(-1)[pos], rtol=1e-5, atol=1e-4)


class RecordingTap:
    """A window tap that asks for the dense G or samples it at fixed positions, after choosing
    from the G of every `screen`-th token once if screen > 0."""

    def __init__(self, dense, sample=None, screen=0):
        self.dense, self.sample, self.screen, self.seen = dense, sample, screen, []

    def wants_dense(self):
        return self.dense

    def add_dense(self, G):
        self.seen.append(G)

    def screen_stride(self):
        return self.screen

    def choose(self, G):
        self.seen.append(G)
        self.screen = 0

    def positions(self):
        return self.sample

    def add_sampled(self, values):
        self.seen.append(values)


@pytest.mark.parametrize("dense", [True, False])
def test_window_tap_gets_the_dense_or_the_sampled_weight_gradient(dense):
    x, w, b, pos, vals = setup()
    wr = w.clone().requires_grad_(True)
    y_ref = F.linear(x, wr + torch.zeros(24 * 40, dtype=torch.float64).index_add(0, pos, vals).view(24, 40), b)
    g_out = torch.randn_like(y_ref)
    y_ref.backward(g_out)
    vs = vals.clone().requires_grad_(True)
    sample = torch.cat([pos[:5], torch.tensor([1, 2, 3])]).unique()  # overlaps the slots
    tap = RecordingTap(dense, sample)
    # a tap asking for the dense G forces the dense path even when the sddmm kernel was chosen
    for seen in (1, 2):
        vs.grad = None
        linear_sparse_delta(x, w, b, vs, LocalSlots(pos, vs), "sddmm", tap).backward(g_out)
        assert len(tap.seen) == seen
        want = wr.grad if dense else wr.grad.reshape(-1)[sample]
        torch.testing.assert_close(tap.seen[-1], want, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(vs.grad, wr.grad.reshape(-1)[pos], rtol=1e-12, atol=1e-12)


def test_a_screening_tap_chooses_from_every_sth_token_then_gets_the_full_g_sampled():
    x, w, b, pos, vals = setup()  # 15 tokens
    wr = w.clone().requires_grad_(True)
    y_ref = F.linear(x, wr + torch.zeros(24 * 40, dtype=torch.float64).index_add(0, pos, vals).view(24, 40), b)
    g_out = torch.randn_like(y_ref)
    y_ref.backward(g_out)
    vs = vals.clone().requires_grad_(True)
    sample = torch.tensor([1, 2, 3, 500])
    tap = RecordingTap(False, sample, screen=2)
    linear_sparse_delta(x, w, b, vs, LocalSlots(pos, vs), "sddmm", tap).backward(g_out)
    g2, x2 = g_out.reshape(-1, 24), x.reshape(-1, 40)
    assert len(tap.seen) == 2 and tap.screen == 0
    torch.testing.assert_close(tap.seen[0], g2[::2].t() @ x2[::2], rtol=1e-12, atol=1e-12)
    assert not torch.allclose(tap.seen[0], wr.grad)  # not the full G: half the tokens
    torch.testing.assert_close(tap.seen[1], wr.grad.reshape(-1)[sample], rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(vs.grad, wr.grad.reshape(-1)[pos], rtol=1e-12, atol=1e-12)


def test_plain_step_runs_no_weight_gradient_matmul():
    """Outside windows the sddmm kernel never forms G = gᵀx: the profiler sees the frozen
    layer's two matmuls (forward, input gradient) and the sampled matmul, nothing [d_out, d_in]."""
    x, w, b, pos, vals = setup(dtype=torch.float32)
    vs = vals.clone().requires_grad_(True)
    with torch.profiler.profile(record_shapes=True) as prof:
        linear_sparse_delta(x, w, b, vs, LocalSlots(pos, vs), "sddmm").sum().backward()
    mm = [e for e in prof.events() if e.name in ("aten::mm", "aten::addmm", "aten::matmul", "aten::bmm")]
    shapes = [tuple(tuple(s) for s in e.input_shapes if s) for e in mm]
    assert not any((24, 15) in s and (15, 40) in s for s in shapes), shapes  # gᵀ [24, T] @ x [T, 40]
    assert any(e.name == "aten::sparse_sampled_addmm" for e in prof.events())


def test_module_swap_keeps_names_and_weights_frozen():
    lin = torch.nn.Linear(8, 6, bias=False)
    w0 = lin.weight.detach().clone()
    lin.weight.requires_grad_(False)
    vals = torch.zeros(3, requires_grad=True)
    pos = torch.tensor([0, 9, 47])
    SparseDeltaLinear.attach(lin, lambda: vals, LocalSlots(pos, vals), "sddmm")
    assert isinstance(lin, torch.nn.Linear) and list(dict(lin.named_parameters())) == ["weight"]
    out = lin(torch.randn(2, 8))
    out.sum().backward()
    assert vals.grad is not None and lin.weight.grad is None
    lin.detach_delta()
    assert type(lin) is torch.nn.Linear and torch.equal(lin.weight, w0)


def test_cost_rule():
    assert choose_kernel(num_slots=100, numel=100_000, gather_cost_ratio=16) == "sddmm"
    assert choose_kernel(num_slots=10_000, numel=100_000, gather_cost_ratio=16) == "dense"
