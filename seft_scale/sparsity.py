"""Sparsity patterns and reports: N:M groups, and per-matrix counts of what a run exported.

A report entry gives, per target matrix: its budget B (the starting model's nonzeros), the
support |M|, the nonzeros, the positions reactivated and pruned relative to the starting model,
and N:M validity. The counts are sums over flat ranges, so a sharded run counts on every rank
(`shard_counts`) and sums; `matrix_report` is the one-range case.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch

from seft_scale.config import parse_pattern

COUNTS = ("support", "nnz", "outside", "reactivated", "pruned_from_start")


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


def nm_shard_groups(nonzero: torch.Tensor, offset: int, n: int, m: int) -> tuple[int, list[int]]:
    """N:M groups of one flat range [offset, offset + len): the number of groups wholly inside it
    holding more than n nonzeros, and [first group, its count, last group, its count] of the
    groups it cuts at either end (-1 where it cuts none), so the owners of a cut group can sum it.
    Groups are m consecutive flat positions starting at multiples of m (rows split into groups)."""
    length = nonzero.numel()
    first = (-offset) % m  # positions before the first whole group
    whole = max(length - first, 0) // m
    nz = nonzero.reshape(-1).to(torch.int32)
    bad = int((nz[first:first + whole * m].view(whole, m).sum(1) > n).sum()) if whole else 0
    edges = [-1, 0, -1, 0]
    if first:
        edges[:2] = [offset // m, int(nz[: min(first, length)].sum())]
    tail = first + whole * m
    if tail < length:
        edges[2:] = [(offset + tail) // m, int(nz[tail:].sum())]
    return bad, edges


def nm_cut_groups_over(edges: Sequence[Sequence[int]], n: int) -> int:
    """Groups over n nonzeros among those cut by range boundaries, from every range's edges."""
    counts: dict[int, int] = {}
    for e in edges:
        for g, c in ((e[0], e[1]), (e[2], e[3])):
            if g >= 0:
                counts[g] = counts.get(g, 0) + c
    return sum(c > n for c in counts.values())


def shard_counts(weight: torch.Tensor, support: torch.Tensor, start: Optional[torch.Tensor]) -> list[int]:
    """COUNTS over one flat range: weight, support (bool) and the starting weights (or None)."""
    nz = weight.reshape(-1) != 0
    support = support.reshape(-1)
    out = [int(support.sum()), int(nz.sum()), int((nz & ~support).sum()), 0, 0]
    if start is not None:
        was = start.reshape(-1).to(weight.device) != 0
        out[3], out[4] = int((nz & ~was).sum()), int((~nz & was).sum())
    return out


def report_entry(shape: Sequence[int], budget: int, counts: Sequence[int], has_start: bool,
                 nm_ok: Optional[bool]) -> dict:
    """One matrix of report.json from its summed COUNTS; nonzeros outside the support are a bug."""
    c = dict(zip(COUNTS, (int(x) for x in counts)))
    if c["outside"]:
        raise AssertionError(f"merged weight has {c['outside']} nonzeros outside the support")
    numel = int(shape[0]) * int(shape[1])
    entry = {"shape": [int(shape[0]), int(shape[1])], "budget": int(budget), "support": c["support"],
             "nnz": c["nnz"], "density": c["nnz"] / numel}
    if has_start:
        entry["reactivated"], entry["pruned_from_start"] = c["reactivated"], c["pruned_from_start"]
    if nm_ok is not None:
        entry["nm_valid"] = nm_ok
    return entry


def matrix_report(merged: torch.Tensor, support: torch.Tensor, start: Optional[torch.Tensor],
                  budget: int, nm: Optional[tuple[int, int]]) -> dict:
    """The report entry of a whole [d_out, d_in] matrix held in one place."""
    return report_entry(merged.shape, budget, shard_counts(merged, support, start), start is not None,
                        nm_valid(merged, *nm) if nm is not None else None)


def summarize(per_matrix: dict) -> dict:
    budget = sum(m["budget"] for m in per_matrix.values())
    nnz = sum(m["nnz"] for m in per_matrix.values())
    numel = sum(m["shape"][0] * m["shape"][1] for m in per_matrix.values())
    out = {"matrices": len(per_matrix), "budget": budget, "nnz": nnz, "numel": numel,
           "sparsity": 1 - nnz / max(numel, 1),
           "exact_budget": all(m["support"] == m["budget"] and m["nnz"] <= m["budget"]
                               for m in per_matrix.values())}
    if any("reactivated" in m for m in per_matrix.values()):
        out["reactivated"] = sum(m.get("reactivated", 0) for m in per_matrix.values())
    if any("nm_valid" in m for m in per_matrix.values()):
        out["nm_valid"] = all(m["nm_valid"] for m in per_matrix.values())
    return out
