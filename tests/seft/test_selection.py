"""Invariant: the selector picks exactly the k best (ties -> lower global position), identically
for one shard and for the same data split into 2-4 shards."""
import pytest
import torch

from seft_scale.seft.selection import RadixSelect, score_keys, select_topk


def reference(scores: torch.Tensor, k: int, largest: bool) -> torch.Tensor:
    """Sort by (score, position) the slow way."""
    pos = torch.arange(len(scores))
    s = scores.double()
    order = sorted(range(len(s)), key=lambda i: ((-s[i] if largest else s[i]).item(), pos[i].item()))
    mask = torch.zeros(len(s), dtype=torch.bool)
    mask[order[:k]] = True
    return mask


def simulated(scores: torch.Tensor, k: int, largest: bool, world: int) -> torch.Tensor:
    """Split into `world` contiguous shards (uneven), run the radix rounds with summed histograms."""
    n = len(scores)
    cuts = [round(i * n / world) for i in range(world + 1)]
    cuts[1] = max(cuts[1] - 3, 0)  # make the shards uneven
    shards = [(torch.arange(cuts[r], cuts[r + 1]), scores[cuts[r]:cuts[r + 1]]) for r in range(world)]
    sels = [RadixSelect([score_keys(s, p, largest)], [k]) for p, s in shards]
    while not sels[0].finished:
        total = sum(s.histogram() for s in sels)
        for s in sels:
            s.advance(total)
    assert all(s.finished for s in sels)
    return torch.cat([s.selected(0) for s in sels])


def heavy_ties(n: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    vals = torch.tensor([0.0, 1e-30, 0.5, 0.5000001, 2.0, float("inf")])
    s = vals[torch.randint(len(vals), (n,), generator=g)]
    cont = torch.rand(n, generator=g) * 3
    return torch.where(torch.rand(n, generator=g) < 0.5, s, cont)


@pytest.mark.parametrize("largest", [True, False])
@pytest.mark.parametrize("seed", range(4))
def test_matches_sorted_reference_with_heavy_ties(largest, seed):
    scores = heavy_ties(777, seed)
    for k in [0, 1, 5, 100, 388, 776, 777, 1000]:
        ref = reference(scores, min(k, 777), largest)
        got = select_topk([scores], [torch.arange(777)], [k], largest)[0]
        assert torch.equal(got, ref), (k, largest)
        for world in (2, 3, 4):
            assert torch.equal(simulated(scores, k, largest, world), ref), (k, world)


def test_all_equal_scores_pick_lowest_positions():
    scores = torch.ones(300)
    got = select_topk([scores], [torch.arange(300)], [17], largest=True)[0]
    assert torch.equal(torch.nonzero(got).reshape(-1), torch.arange(17))
    got = select_topk([scores], [torch.arange(300)], [17], largest=False)[0]
    assert torch.equal(torch.nonzero(got).reshape(-1), torch.arange(17))


def test_batched_matrices_are_independent():
    g = torch.Generator().manual_seed(1)
    a, b = torch.rand(50, generator=g), heavy_ties(90, 2)
    pos_b = torch.arange(90) * 1000 + 7  # positions need not be dense
    got = select_topk([a, b], [torch.arange(50), pos_b], [10, 33], largest=True)
    assert torch.equal(got[0], reference(a, 10, True))
    assert torch.equal(got[1], reference(b, 33, True))  # pos order == index order here


def test_rejects_nan_and_negative_scores():
    for bad in (torch.tensor([1.0, float("nan")]), torch.tensor([1.0, -2.0])):
        with pytest.raises(ValueError, match=">= 0"):
            select_topk([bad], [torch.arange(2)], [1])


def test_empty_shard_and_k_zero():
    got = select_topk([torch.empty(0), torch.rand(5)], [torch.empty(0, dtype=torch.long),
                      torch.arange(5)], [3, 0])
    assert got[0].numel() == 0 and not got[1].any()
