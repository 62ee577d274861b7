"""Invariant: the selector picks exactly the k best (ties -> lower global position), identically
for one shard and for the same data split into 2-4 shards."""
import threading

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


def fast_reference(scores: torch.Tensor, k: int, largest: bool) -> torch.Tensor:
    """The k best by (score, position) for big inputs: a stable sort of the scores."""
    order = torch.sort(scores.double(), descending=largest, stable=True).indices
    mask = torch.zeros(len(scores), dtype=torch.bool)
    mask[order[:k]] = True
    return mask


def on_two_threads(scores: torch.Tensor, k: int, largest: bool) -> torch.Tensor:
    """select_topk as two ranks run it (halves of `scores`, offsets as positions), the all-reduce
    played by two threads summing into a shared buffer."""
    half, buf, barrier, out = len(scores) // 2, {}, threading.Barrier(2), [None, None]
    parts = [(0, scores[:half]), (half, scores[half:])]

    def rank(r):
        def allreduce(t):
            buf[r] = t.clone()
            barrier.wait()
            total = buf[0] + buf[1]
            barrier.wait()
            return total
        out[r] = select_topk([parts[r][1]], [parts[r][0]], [k], largest, allreduce)[0]
    threads = [threading.Thread(target=rank, args=(r,)) for r in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return torch.cat(out)


@pytest.mark.parametrize("largest", [True, False])
@pytest.mark.parametrize("case", ["random", "ties", "sample_misleads"])
def test_big_shards_bounded_from_a_sample_choose_exactly(largest, case):
    """Above selection.SAMPLE_MIN the local bound comes from a strided sample; the choice stays
    exact, at one and two ranks, also when the sample is unrepresentative (then the exact k-th
    value bounds the shard)."""
    from seft_scale.seft import selection
    n, k = 2 * selection.SAMPLE_MIN + 12345, 3000
    g = torch.Generator().manual_seed(7)
    if case == "random":
        scores = torch.rand(n, generator=g)
    elif case == "ties":  # few distinct values: the bound passes many tied entries
        scores = torch.randint(0, 50, (n,), generator=g).float()
    else:  # only the sampled positions hold the best scores: a bound from them passes fewer than k
        scores = torch.rand(n, generator=g) * 0.5 + 0.25
        sampled = torch.arange(0, n, selection.SAMPLE_STRIDE)
        best = torch.rand(len(sampled), generator=g) * 1e-3
        scores[sampled] = 1.0 + best if largest else best
    want = fast_reference(scores, k, largest)
    assert torch.equal(select_topk([scores], [0], [k], largest)[0], want)
    assert torch.equal(on_two_threads(scores, k, largest), want)
