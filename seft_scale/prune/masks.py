"""Scores -> keep-mask with an exact count: per output row, per matrix, or N:M groups.

Ties keep the lower flat position (stable sort), so masks are reproducible bit for bit."""
from __future__ import annotations

import torch

from seft_scale.sparsity import nm_for


def pruned_count(numel: int, sparsity: float) -> int:
    """How many of `numel` weights a comparison group at `sparsity` sets to zero."""
    return int(round(sparsity * numel))


def kept_count(shape: tuple[int, int], sparsity: float, pattern: str = "unstructured",
               granularity: str = "row") -> int:
    """How many weights of a [d_out, d_in] matrix `keep_mask` keeps (every pruner keeps these
    counts; SparseGPT's per-block counts telescope to them): known before any weight is read."""
    d_out, d_in = shape
    nm = nm_for(pattern, d_in)
    if nm is not None:
        return d_out * (d_in // nm[1]) * nm[0]
    if granularity == "row":
        return d_out * (d_in - pruned_count(d_in, sparsity))
    return d_out * d_in - pruned_count(d_out * d_in, sparsity)


def keep_top(scores: torch.Tensor, keep: int) -> torch.Tensor:
    """Boolean mask of the `keep` largest entries along the last dim (ties: lower index)."""
    order = torch.sort(scores, dim=-1, descending=True, stable=True).indices[..., :keep]
    mask = torch.zeros_like(scores, dtype=torch.bool)
    return mask.scatter_(-1, order, True)


def keep_mask(scores: torch.Tensor, sparsity: float, pattern: str = "unstructured",
              granularity: str = "row") -> torch.Tensor:
    """Mask of the weights to keep for a [d_out, d_in] score matrix (higher score = keep).

    Unstructured: exactly `pruned_count(d_in, sparsity)` zeros per row (granularity row) or
    `pruned_count(d_out·d_in, sparsity)` per matrix. N:M: exactly N kept in every group of M
    consecutive inputs (`sparsity` is then implied by the pattern and ignored)."""
    scores = scores.to(torch.float32)
    d_out, d_in = scores.shape
    nm = nm_for(pattern, d_in)
    if nm is not None:
        n, m = nm
        return keep_top(scores.reshape(d_out, d_in // m, m), n).reshape(d_out, d_in)
    if granularity == "row":
        return keep_top(scores, d_in - pruned_count(d_in, sparsity))
    if granularity == "matrix":
        numel = d_out * d_in
        return keep_top(scores.reshape(-1), numel - pruned_count(numel, sparsity)).reshape(d_out, d_in)
    raise ValueError(f"granularity must be 'row' or 'matrix', got {granularity!r}")
