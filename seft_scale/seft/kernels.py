"""The linear layer with a sparse delta: y = x·(θ + S)ᵀ with θ frozen and S the K slots (positions
η, fp32 values δ); gradients for x and δ only.

Forward and input gradient run at matmul speed on the weight itself: S is written into the weight
in place (θ_η + δ, rounded once to the weight's dtype), one matmul runs, and the K overwritten
values are put back bit for bit. Under ZeRO-3 / FSDP2 that weight is the full copy the backend has
just gathered for this layer, so no second n-sized copy exists; on one process it is θ itself.

The δ-gradients, ∂L/∂δ_j = Σ_t g[t, row_j]·x[t, col_j], come from one of two kernels:

* ``sddmm``: a sampled dense-dense matmul at the K slot positions only (torch.sparse.sampled_addmm
  on a CSR pattern of the slots: MKL on CPU, cuSPARSE on CUDA; fp32 sums, tokens in blocks that
  keep the operands in cache). About T·K multiply-adds at gather speed; nothing of size n.
* ``dense``: the full weight gradient G = gᵀx (2·T·n flops at matmul speed), read at the slots.

Cost rule (`choose_kernel`): sddmm iff K · gather_cost_ratio < n, where the ratio is the cost of one
sampled multiply-add in matmul multiply-adds, measured by launch/bench/bench_step.py (12-17 at
Llama-2-7B's matrices on two AVX2 cores, 9-16 on one thread; README's benchmark section has the figures).

In selection windows a `WindowTap` takes the gradient the window scores need: the dense G when it
asks for it (dense window scores; candidates at the window's first micro-batch), else G sampled at
the window's candidate positions by a second SDDMM beside the slots' one. A window that screens
(seft.window_screen_stride = s > 1) first chooses its candidates from the G of every s-th token
(a matmul 1/s of the full one) and then samples the micro-batch's G at them like a later step.
"""
from __future__ import annotations

import contextlib
import warnings
from typing import Callable, Iterator, Optional, Protocol

import torch
import torch.nn.functional as F
from torch import nn

KERNELS = ("sddmm", "dense")

# bytes of one [max(d_in, d_out), tokens] fp32 operand block of the SDDMM: it must stay in cache,
# else every gathered row comes from DRAM (2-4x slower measured for d = 11008, 1024 tokens)
SDDMM_BLOCK_BYTES = 6 << 20


class SlotSource(Protocol):
    """Where a target's slots come from: the method hands every target one (seft/method.py)."""

    def full(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The matrix's (sorted global positions, fp32 values), from every rank's slots."""

    def reduce(self, grad_full: torch.Tensor) -> torch.Tensor:
        """This rank's slots' δ-gradients summed over ranks, from every rank's full gradients."""


class WindowTap(Protocol):
    """What a selection window takes from a target's backward (seft/method.py)."""

    def wants_dense(self) -> bool:
        """Whether this backward must hand over the dense G."""

    def add_dense(self, G: torch.Tensor) -> None:
        """This rank's dense weight gradient [d_out, d_in] of the micro-batch."""

    def screen_stride(self) -> int:
        """s > 0: this backward first hands `choose` the G of every s-th token; 0: no."""

    def choose(self, G: torch.Tensor) -> None:
        """This rank's screening G [d_out, d_in] (every s-th token): the candidates are chosen."""

    def positions(self) -> torch.Tensor:
        """Sorted global positions (of every rank's candidates) at which G is sampled."""

    def add_sampled(self, values: torch.Tensor) -> None:
        """This rank's G at `positions()`, fp32."""


def choose_kernel(num_slots: int, numel: int, gather_cost_ratio: float) -> str:
    """The cost rule of the module docstring."""
    return "sddmm" if num_slots * gather_cost_ratio < numel else "dense"


@contextlib.contextmanager
def composed(weight: torch.Tensor, pos: torch.Tensor, values: torch.Tensor) -> Iterator[torch.Tensor]:
    """`weight` holding θ + S while inside; θ restored exactly (the K values saved) on leaving."""
    w = weight.data.view(-1)
    # index_select / index_copy_, not w[pos]: 2-4x faster on CPU at K ~ 500K (advanced indexing
    # goes through the generic index kernel)
    kept = w.index_select(0, pos)
    acc = torch.promote_types(w.dtype, torch.float32)  # 16-bit weights: one rounding, from fp32
    w.index_copy_(0, pos, (kept.to(acc) + values.detach().to(acc)).to(w.dtype))
    try:
        yield weight.data
    finally:
        w.index_copy_(0, pos, kept)


def _csr_pattern(pos: torch.Tensor, shape: tuple[int, int]) -> torch.Tensor:
    d_out, d_in = shape
    rows, cols = pos // d_in, pos % d_in
    crow = torch.zeros(d_out + 1, dtype=torch.int64, device=pos.device)
    torch.cumsum(torch.bincount(rows, minlength=d_out), 0, out=crow[1:])
    with warnings.catch_warnings():  # "Sparse CSR tensor support is in beta"
        warnings.simplefilter("ignore")
        return torch.sparse_csr_tensor(crow, cols, torch.zeros(len(pos), device=pos.device),
                                       (d_out, d_in), check_invariants=False)


def sddmm(g2: torch.Tensor, x2: torch.Tensor, pos: torch.Tensor, shape: tuple[int, int]) -> torch.Tensor:
    """Σ_t g2[t, row_j]·x2[t, col_j] at sorted flat positions `pos`, summed in fp32 (fp64 inputs
    in fp64)."""
    acc = torch.promote_types(g2.dtype, torch.float32)
    if len(pos) == 0:
        return torch.zeros(0, dtype=acc, device=pos.device)
    pattern = _csr_pattern(pos, shape).to(acc)
    block = max(64, SDDMM_BLOCK_BYTES // (4 * max(shape)))
    out = torch.zeros(len(pos), dtype=acc, device=pos.device)
    for t0 in range(0, g2.shape[0], block):
        gt = g2[t0:t0 + block].t().to(acc).contiguous()  # [d_out, tokens]: contiguous token rows
        xt = x2[t0:t0 + block].t().to(acc).contiguous()  # [d_in, tokens]
        out += torch.sparse.sampled_addmm(pattern, gt, xt.t(), beta=0.0).values()
    return out


class _LinearSparseDelta(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, values, slots: SlotSource, kernel: str,
                tap: Optional[WindowTap]):
        ctx.slots, ctx.kernel, ctx.tap = slots, kernel, tap
        ctx.has_bias = bias is not None
        pos, full = slots.full()
        with composed(weight, pos, full) as w:
            y = F.linear(x, w, bias)
        ctx.save_for_backward(x, weight)
        return y

    @staticmethod
    def backward(ctx, grad_out):
        x, weight = ctx.saved_tensors
        d_out, d_in = weight.shape
        g2, x2 = grad_out.reshape(-1, d_out), x.reshape(-1, d_in)
        pos, full = ctx.slots.full()  # gathered again: no rank keeps every target's slots
        grad_x = grad_values = grad_bias = None
        if ctx.needs_input_grad[0]:
            with composed(weight, pos, full) as w:
                grad_x = grad_out @ w
        tap = ctx.tap
        if ctx.needs_input_grad[3] or tap is not None:
            if ctx.kernel == "dense" or (tap is not None and tap.wants_dense()):
                G = g2.t() @ x2  # the dense weight gradient, [d_out, d_in]
                grad_full = G.reshape(-1).index_select(0, pos).to(torch.promote_types(G.dtype, torch.float32))
                if tap is not None:
                    tap.add_dense(G)
                del G
            elif tap is not None:  # the window's candidates sampled beside the slots: two SDDMMs,
                # no per-backward union of the two position lists (a sort of ~3K positions)
                s = tap.screen_stride()
                if s:
                    tap.choose(g2[::s].t() @ x2[::s])
                grad_full = sddmm(g2, x2, pos, (d_out, d_in))
                tap.add_sampled(sddmm(g2, x2, tap.positions().to(pos.device), (d_out, d_in)))
            else:
                grad_full = sddmm(g2, x2, pos, (d_out, d_in))
            grad_values = ctx.slots.reduce(grad_full)
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_bias = g2.sum(0)
        return grad_x, None, grad_bias, grad_values, None, None, None


def linear_sparse_delta(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                        values: torch.Tensor, slots: SlotSource, kernel: str = "sddmm",
                        tap: Optional[WindowTap] = None) -> torch.Tensor:
    """y = x·(θ + S)ᵀ + bias, with gradients for x, bias and this rank's slot `values`; in a
    selection window `tap` takes the gradients the window scores need."""
    if kernel not in KERNELS:
        raise ValueError(f"kernel must be one of {KERNELS}, got {kernel!r}")
    return _LinearSparseDelta.apply(x, weight, bias, values, slots, kernel, tap)


class SparseDeltaLinear(nn.Linear):
    """An nn.Linear whose forward adds the sparse delta. Installed by swapping the class of an
    existing Linear (`attach`), so parameter names, HF save/load and ZeRO/FSDP hooks are untouched.
    `seft_values()` returns this rank's slot values (the autograd leaf), `seft_slots` their source,
    `seft_window` the selection window's tap while one is open."""

    seft_values: Callable[[], torch.Tensor]
    seft_slots: SlotSource
    seft_kernel: str
    seft_window: Optional[WindowTap]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear_sparse_delta(x, self.weight, self.bias, self.seft_values(), self.seft_slots,
                                   self.seft_kernel, self.seft_window)

    @staticmethod
    def attach(linear: nn.Linear, values: Callable[[], torch.Tensor], slots: SlotSource,
               kernel: str) -> "SparseDeltaLinear":
        linear.__class__ = SparseDeltaLinear
        linear.seft_values, linear.seft_slots = values, slots
        linear.seft_kernel, linear.seft_window = kernel, None
        return linear  # type: ignore[return-value]

    def detach_delta(self) -> nn.Linear:
        """Back to a plain nn.Linear (for export)."""
        for attr in ("seft_values", "seft_slots", "seft_kernel", "seft_window"):
            self.__dict__.pop(attr, None)
        self.__class__ = nn.Linear
        return self
