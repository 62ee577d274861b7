"""N:M semi-structured sparsity: at most N nonzeros in every group of M consecutive inputs."""
from __future__ import annotations

import torch


def parse_pattern(pattern: str) -> tuple[int, int] | None:
    """'unstructured' -> None; 'N:M' -> (N, M) with 0 < N < M."""
    if pattern == "unstructured":
        return None
    try:
        n, m = (int(v) for v in pattern.split(":"))
    except ValueError:
        raise ValueError(f"sparsity pattern must be 'unstructured' or 'N:M' (e.g. '2:4'), got {pattern!r}")
    if not 0 < n < m:
        raise ValueError(f"sparsity pattern {pattern!r}: need 0 < N < M")
    return n, m


def nm_for(pattern: str, d_in: int) -> tuple[int, int] | None:
    """parse_pattern, plus the check that d_in splits into groups of M."""
    nm = parse_pattern(pattern)
    if nm is not None and d_in % nm[1]:
        raise ValueError(f"N:M pattern {pattern} needs d_in ({d_in}) divisible by {nm[1]}")
    return nm


def nm_group_counts(matrix: torch.Tensor, m: int) -> torch.Tensor:
    """Nonzeros per group of m consecutive columns of a [d_out, d_in] matrix (or bool mask)."""
    d_out, d_in = matrix.shape
    if d_in % m:
        raise ValueError(f"N:M needs the input dimension ({d_in}) to be a multiple of M={m}")
    return (matrix != 0).reshape(d_out, d_in // m, m).sum(-1)


def nm_valid(matrix: torch.Tensor, n: int, m: int) -> bool:
    return bool((nm_group_counts(matrix, m) <= n).all())
