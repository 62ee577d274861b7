"""SparseGPT (Frantar & Alistarh 2023): OBS pruning with lazy column-block updates.

For each Linear, H = mean_t x_t x_tᵀ over the calibration tokens (+ λI, λ = damp·mean diag H).
Columns are visited left to right in blocks of `block_size`. At the start of a block its mask
is chosen from the OBS scores w²/[H⁻¹]_jj² of the weights as updated so far (adaptive mask
selection); then each column's pruned weights are zeroed and the error is spread over the
not-yet-visited columns through the Cholesky factor of H⁻¹, which keeps the layer's outputs on
the calibration inputs close to the dense ones.

Exact counts: row granularity prunes round(s·c₂) − round(s·c₁) weights of every row in the
block of columns [c₁, c₂) and matrix granularity round(s·d_out·c₂) − round(s·d_out·c₁) of the
block, so the sums telescope to exactly the counts of `masks.keep_mask`. N:M picks the N kept
of each group of M when the block reaches the group (the block size is rounded down to a
multiple of M so no group straddles two blocks).
"""
from __future__ import annotations

import torch

from seft_scale.prune.masks import keep_top, pruned_count
from seft_scale.sparsity import nm_for


class Hessian:
    """Running mean of x xᵀ over the calibration tokens for one Linear ([d_in, d_in], fp32)."""

    def __init__(self, d_in: int, device: torch.device | str):
        self.hessian = torch.zeros(d_in, d_in, dtype=torch.float32, device=device)
        self.tokens = 0

    def add(self, x: torch.Tensor) -> None:
        """x: [tokens, d_in] inputs of the Linear."""
        t, x = x.shape[0], x.float()
        # a running mean keeps the entries O(x²) however many tokens are seen
        self.hessian.mul_(self.tokens / (self.tokens + t))
        self.hessian.addmm_(x.T, x, alpha=1.0 / (self.tokens + t))
        self.tokens += t

    def nbytes(self) -> int:
        return self.hessian.numel() * self.hessian.element_size()


def _inverse_cholesky(h: torch.Tensor, damp: float) -> torch.Tensor:
    """Upper Cholesky factor of (H + λI)⁻¹, the form OBS updates need. Overwrites `h`; at most
    two [d_in, d_in] matrices are alive at once (one per step of the chain)."""
    h.diagonal().add_(damp * h.diagonal().mean())
    h = torch.linalg.cholesky(h)
    h = torch.cholesky_inverse(h)
    return torch.linalg.cholesky(h, upper=True)


@torch.no_grad()
def sparsegpt_prune(weight: torch.Tensor, hessian: torch.Tensor, sparsity: float,
                    pattern: str = "unstructured", granularity: str = "row",
                    block_size: int = 128, damp: float = 0.01) -> tuple[torch.Tensor, torch.Tensor]:
    """(pruned weight in fp32, keep mask) for a [d_out, d_in] weight and its [d_in, d_in] Hessian."""
    if granularity not in ("row", "matrix"):
        raise ValueError(f"granularity must be 'row' or 'matrix', got {granularity!r}")
    w = weight.detach().float().clone()
    d_out, d_in = w.shape
    nm = nm_for(pattern, d_in)
    if nm is not None:
        n_keep, m = nm
        block_size = max(m, block_size - block_size % m)
    h = hessian.to(torch.float32, copy=True)
    dead = h.diagonal() == 0  # inputs that were always zero: their weights cannot matter
    h[dead, dead] = 1
    w[:, dead] = 0
    hinv = _inverse_cholesky(h, damp)
    del h
    keep = torch.zeros_like(w, dtype=torch.bool)

    for c1 in range(0, d_in, block_size):
        c2 = min(c1 + block_size, d_in)
        w1, hinv1 = w[:, c1:c2].clone(), hinv[c1:c2, c1:c2]
        diag1 = hinv1.diagonal()
        err1 = torch.zeros_like(w1)
        keep1 = keep[:, c1:c2]
        if nm is None:  # adaptive mask selection for the whole block
            scores = w1.pow(2) / diag1.pow(2)
            if granularity == "row":
                pruned = pruned_count(c2, sparsity) - pruned_count(c1, sparsity)
                keep1.copy_(keep_top(scores, (c2 - c1) - pruned))
            else:
                pruned = pruned_count(d_out * c2, sparsity) - pruned_count(d_out * c1, sparsity)
                keep1.copy_(keep_top(scores.reshape(-1), d_out * (c2 - c1) - pruned).view_as(scores))
        for i in range(c2 - c1):
            if nm is not None and i % m == 0:
                group = w1[:, i:i + m].pow(2) / diag1[i:i + m].pow(2)
                keep1[:, i:i + m] = keep_top(group, n_keep)
            col = w1[:, i]
            q = col * keep1[:, i]
            err = (col - q) / diag1[i]
            w1[:, i:] -= err[:, None] * hinv1[i, i:][None, :]
            w1[:, i] = q  # exact zeros (the update leaves rounding residue)
            err1[:, i] = err
        w[:, c1:c2] = w1
        w[:, c2:] -= err1 @ hinv[c1:c2, c2:]
    return w, keep
