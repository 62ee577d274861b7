"""The linear layer with a sparse delta: y = x·θᵀ + x·S(η,δ)ᵀ, θ frozen, gradients for x and δ.

Two kernels give the same numbers:

* ``dense``  composes W = θ + S transiently, runs one matmul, and in backward recomposes W for the
  input gradient and forms G = gᵀx (size n) once to read the δ-gradients off it. Extra work over a
  frozen plain Linear: one weight-gradient matmul (2·T·n flops, at matmul speed).
* ``gather`` never forms anything of size n: the delta term and δ-gradients are gathers and
  index_adds over the K slots (about 3·T·K multiply-adds at gather speed), in chunks.

Cost rule (``choose_kernel``): gather iff K · gather_cost_ratio < n, where gather_cost_ratio is how
many matmul multiply-adds one gathered multiply-add costs on the device (measured by
launch/bench/bench_step.py; the defaults are recorded there). In selection windows the dense G is
needed anyway, so the dense kernel runs there and hands G to a hook.
"""
from __future__ import annotations

from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import nn

DenseGradHook = Callable[[torch.Tensor], None]

# Elements of the [tokens, slots] intermediates the gather kernel materialises at once.
GATHER_CHUNK_ELEMS = 1 << 24


def choose_kernel(num_slots: int, numel: int, gather_cost_ratio: float) -> str:
    """The cost rule of the module docstring."""
    return "gather" if num_slots * gather_cost_ratio < numel else "dense"


def _compose(weight: torch.Tensor, pos: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    w = weight.detach().reshape(-1).clone()
    w.index_add_(0, pos, values.detach().to(w.dtype))
    return w.view_as(weight)


def _chunks(num_slots: int, tokens: int):
    step = max(1, GATHER_CHUNK_ELEMS // max(tokens, 1))
    for start in range(0, num_slots, step):
        yield slice(start, min(start + step, num_slots))


class _LinearSparseDelta(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, pos, values, kernel: str, dense_grad_hook):
        d_out, d_in = weight.shape
        ctx.kernel, ctx.hook = kernel, dense_grad_hook
        ctx.has_bias = bias is not None
        ctx.save_for_backward(x, weight, pos, values)
        if kernel == "dense":
            return F.linear(x, _compose(weight, pos, values), bias)
        y = F.linear(x, weight, bias)
        x2, y2 = x.reshape(-1, d_in), y.view(-1, d_out)
        rows, cols = pos // d_in, pos % d_in
        vals = values.detach().to(x.dtype)
        for c in _chunks(len(pos), x2.shape[0]):
            y2.index_add_(1, rows[c], x2[:, cols[c]] * vals[c])
        return y

    @staticmethod
    def backward(ctx, grad_out):
        x, weight, pos, values = ctx.saved_tensors
        d_out, d_in = weight.shape
        g2, x2 = grad_out.reshape(-1, d_out), x.reshape(-1, d_in)
        grad_x = grad_values = grad_bias = None
        dense = ctx.kernel == "dense" or ctx.hook is not None
        if dense:
            if ctx.needs_input_grad[0]:
                grad_x = grad_out @ _compose(weight, pos, values)
            if ctx.needs_input_grad[4] or ctx.hook is not None:
                G = g2.t() @ x2  # the dense weight gradient, [d_out, d_in]
                grad_values = G.reshape(-1)[pos].to(values.dtype)
                if ctx.hook is not None:
                    ctx.hook(G)
        else:
            rows, cols = pos // d_in, pos % d_in
            vals = values.detach().to(grad_out.dtype)
            if ctx.needs_input_grad[0]:
                grad_x = grad_out @ weight
                gx2 = grad_x.view(-1, d_in)
                for c in _chunks(len(pos), g2.shape[0]):
                    gx2.index_add_(1, cols[c], g2[:, rows[c]] * vals[c])
            if ctx.needs_input_grad[4]:
                grad_values = torch.empty_like(values)
                acc = torch.promote_types(grad_out.dtype, torch.float32)  # bf16 sums in fp32
                for c in _chunks(len(pos), g2.shape[0]):
                    grad_values[c] = (g2[:, rows[c]].to(acc) * x2[:, cols[c]].to(acc)).sum(0)
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_bias = g2.sum(0)
        return grad_x, None, grad_bias, None, grad_values, None, None


def linear_sparse_delta(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                        pos: torch.Tensor, values: torch.Tensor, kernel: str = "dense",
                        dense_grad_hook: Optional[DenseGradHook] = None) -> torch.Tensor:
    """y = x·(θ + S(pos, values))ᵀ + bias, with gradients for x, values (and bias), not θ."""
    if kernel not in ("dense", "gather"):
        raise ValueError(f"kernel must be 'dense' or 'gather', got {kernel!r}")
    return _LinearSparseDelta.apply(x, weight, bias, pos, values, kernel, dense_grad_hook)


SlotSource = Callable[[], tuple[torch.Tensor, torch.Tensor]]


class SparseDeltaLinear(nn.Linear):
    """An nn.Linear whose forward adds the sparse delta. Installed by swapping the class of an
    existing Linear (`attach`), so parameter names, HF save/load and ZeRO/FSDP hooks are untouched.

    `slots()` returns the full (pos, values) of the matrix: the SparseDelta itself on one process,
    slots gathered from their owners under a sharding backend.
    """

    seft_slots: SlotSource
    seft_kernel: str
    seft_dense_grad_hook: Optional[DenseGradHook]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pos, values = self.seft_slots()
        hook = self.seft_dense_grad_hook
        kernel = "dense" if hook is not None else self.seft_kernel
        return linear_sparse_delta(x, self.weight, self.bias, pos, values, kernel, hook)

    @staticmethod
    def attach(linear: nn.Linear, slots: SlotSource, kernel: str) -> "SparseDeltaLinear":
        linear.__class__ = SparseDeltaLinear
        linear.seft_slots, linear.seft_kernel, linear.seft_dense_grad_hook = slots, kernel, None
        return linear  # type: ignore[return-value]

    def detach_delta(self) -> nn.Linear:
        """Back to a plain nn.Linear (for export)."""
        for attr in ("seft_slots", "seft_kernel", "seft_dense_grad_hook"):
            self.__dict__.pop(attr, None)
        self.__class__ = nn.Linear
        return self
