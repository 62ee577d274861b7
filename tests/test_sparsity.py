"""N:M checks and per-matrix reports over flat ranges (seft_scale/sparsity.py): summed over any
cut of a matrix into shards they equal the whole-matrix answer."""
import itertools

import pytest
import torch

from seft_scale.sparsity import (COUNTS, matrix_report, nm_cut_groups_over, nm_for, nm_group_counts,
                                 nm_shard_groups, nm_valid, report_entry, shard_counts, summarize)


def all_cuts(n: int, max_shards: int):
    """Every way to cut [0, n) into 1..max_shards contiguous ranges, empty ones included (ZeRO-3's
    last partitions can be empty)."""
    for k in range(max_shards):
        for points in itertools.combinations_with_replacement(range(n + 1), k):
            edges = (0, *points, n)
            yield list(zip(edges, edges[1:]))


def nm_matrices(n: int, m: int):
    """[2, 2m] matrices: valid, one group over n at each place in turn, all groups over n."""
    g = torch.Generator().manual_seed(0)
    ok = torch.randn(2, 2 * m, generator=g)
    groups = ok.view(-1, m)
    keep = torch.rand(groups.shape, generator=g).argsort(-1)[:, :n]
    groups.mul_(torch.zeros_like(groups).scatter_(1, keep, 1.0))
    yield ok
    for gi in range(4):
        bad = ok.clone()
        row = bad.view(-1, m)[gi]
        row[row == 0] = 1.0  # the whole group nonzero: m > n
        yield bad
    yield torch.ones(2, 2 * m)


@pytest.mark.parametrize("n, m", [(2, 4), (1, 3)])
def test_nm_over_shards_equals_the_whole_matrix(n, m):
    for w in nm_matrices(n, m):
        over = int((nm_group_counts(w, m) > n).sum())
        flat = w.reshape(-1) != 0
        ranges = {(lo, hi): nm_shard_groups(flat[lo:hi], lo, n, m)  # each range once, not per cut
                  for lo in range(flat.numel() + 1) for hi in range(lo, flat.numel() + 1)}
        for cut in all_cuts(flat.numel(), 5):
            bad = sum(ranges[r][0] for r in cut)
            edges = [ranges[r][1] for r in cut]
            assert bad + nm_cut_groups_over(edges, n) == over, cut
            assert (bad + nm_cut_groups_over(edges, n) == 0) == nm_valid(w, n, m)


def test_the_cut_enumeration_is_complete():
    cuts = list(all_cuts(4, 3))
    assert [(0, 4)] in cuts and [(0, 1), (1, 3), (3, 4)] in cuts and [(0, 0), (0, 4), (4, 4)] in cuts
    assert len(cuts) == 1 + 5 + 15


def test_nm_group_counts_and_nm_for():
    w = torch.tensor([[1., 0, 2, 0, 3, 4, 5, 0]])
    assert nm_group_counts(w, 4).tolist() == [[2, 3]]
    assert nm_valid(w, 3, 4) and not nm_valid(w, 2, 4)
    assert nm_for("2:4", 8) == (2, 4) and nm_for("unstructured", 7) is None
    with pytest.raises(ValueError, match=r"d_in \(6\) divisible by 4"):
        nm_for("2:4", 6)
    with pytest.raises(ValueError, match="multiple of M=4"):
        nm_group_counts(torch.ones(2, 6), 4)


def report_problem(seed=0):
    """merged (nonzero only inside the support), its support and a different starting model."""
    g = torch.Generator().manual_seed(seed)
    support = torch.rand(6, 8, generator=g) < 0.5
    merged = torch.randn(6, 8, generator=g) * support
    merged[0, support[0]] = 0.0  # zeros inside the support: pruned from the start
    start = torch.randn(6, 8, generator=g) * (torch.rand(6, 8, generator=g) < 0.5)
    return merged, support, start


@pytest.mark.parametrize("with_start", [True, False])
def test_shard_counts_summed_equal_matrix_report(with_start):
    merged, support, start = report_problem()
    start = start if with_start else None
    budget = int(support.sum())
    whole = matrix_report(merged, support, start, budget, None)
    flat = [t.reshape(-1) if t is not None else None for t in (merged, support, start)]
    n = merged.numel()
    ranges = {(lo, hi): shard_counts(flat[0][lo:hi], flat[1][lo:hi], flat[2][lo:hi] if with_start else None)
              for lo in range(n + 1) for hi in range(lo, n + 1)}
    for cut in all_cuts(n, 3):
        summed = [sum(c) for c in zip(*(ranges[r] for r in cut))]
        assert report_entry(merged.shape, budget, summed, with_start, None) == whole
    nz, was = merged != 0, (start != 0) if with_start else None
    assert whole["nnz"] == int(nz.sum()) and whole["support"] == budget
    assert whole["density"] == int(nz.sum()) / merged.numel()
    if with_start:
        assert whole["reactivated"] == int((nz & ~was).sum()) > 0
        assert whole["pruned_from_start"] == int((~nz & was).sum()) > 0
    else:
        assert "reactivated" not in whole


def test_matrix_report_checks_nm():
    w = torch.tensor([[1., 1, 0, 0, 1, 0, 1, 0]])
    assert matrix_report(w, w != 0, None, 4, (2, 4))["nm_valid"] is True
    w[0, 2] = 1.0
    assert matrix_report(w, w != 0, None, 5, (2, 4))["nm_valid"] is False


def test_nonzeros_outside_the_support_are_a_bug():
    merged, support, _ = report_problem()
    merged[~support] = 0.0
    merged.view(-1)[int(torch.nonzero(~support.view(-1))[0])] = 0.5
    counts = shard_counts(merged, support, None)
    assert counts[COUNTS.index("outside")] == 1
    with pytest.raises(AssertionError, match="1 nonzeros outside the support"):
        report_entry(merged.shape, int(support.sum()), counts, False, None)
    with pytest.raises(AssertionError, match="outside the support"):
        matrix_report(merged, support, None, int(support.sum()), None)


def test_summarize():
    a = {"shape": [2, 4], "budget": 4, "support": 4, "nnz": 4, "density": 0.5, "reactivated": 1,
         "pruned_from_start": 1, "nm_valid": True}
    b = {"shape": [4, 4], "budget": 8, "support": 8, "nnz": 6, "density": 6 / 16, "reactivated": 2,
         "pruned_from_start": 4, "nm_valid": True}
    s = summarize({"a": a, "b": b})
    assert s == {"matrices": 2, "budget": 12, "nnz": 10, "numel": 24, "sparsity": 1 - 10 / 24,
                 "exact_budget": True, "reactivated": 3, "nm_valid": True}
    assert not summarize({"a": a, "b": dict(b, support=9)})["exact_budget"]
    assert not summarize({"a": a, "b": dict(b, nm_valid=False)})["nm_valid"]
    assert "reactivated" not in summarize({"x": {k: v for k, v in a.items() if k != "reactivated"}})
