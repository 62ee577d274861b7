"""The candidate window (seft/window.py): the block scan with a bound from a strided sample picks
exactly what the exact top-k over the whole matrix picks (ties -> lower position), at 1-3 ranks,
with slots on θ == 0 positions, listed zeros, NaN in G, heavy ties, and samples that mislead
(then it scans again without the bound); its sums take the slots' G from their δ-gradients."""
import pytest
import torch

from seft_scale.seft import selection, window
from seft_scale.seft.delta import SparseDelta, member
from seft_scale.seft.selection import select_topk
from seft_scale.seft.window import open_window
from tests.helpers import ThreadGroup, shard_bounds

SHAPE = (120, 200)
N = SHAPE[0] * SHAPE[1]
K = 300


def problem(case: str, seed: int = 0):
    """θ (half pruned), G, slot positions (some on θ == 0: reactivated) and listed zeros."""
    g = torch.Generator().manual_seed(seed)
    theta = torch.randn(N, generator=g)
    theta[torch.rand(N, generator=g) < 0.5] = 0
    G = torch.randn(N, generator=g)
    if case == "ties":  # few distinct values: the bounds pass many tied entries
        G = torch.randint(-3, 4, (N,), generator=g).float()
        theta[theta != 0] = torch.randint(1, 3, (int((theta != 0).sum()),), generator=g).float()
    elif case == "misleading":  # every sampled position holds the best grow and adapt scores
        at = torch.arange(0, N, selection.SAMPLE_STRIDE)
        G[at] = 100.0 + torch.rand(len(at), generator=g)
        theta[at] = 1e-6 * torch.rand(len(at), generator=g)
    G[torch.randperm(N, generator=g)[:5]] = float("nan")
    zero_pos = torch.nonzero(theta == 0).reshape(-1)
    picks = zero_pos[torch.randperm(len(zero_pos), generator=g)[:40]]
    reactivated, zeros = picks[:30], picks[30:]
    on_support = torch.nonzero(theta).reshape(-1)
    slots = torch.cat([on_support[torch.randperm(len(on_support), generator=g)[:K - 30]], reactivated])
    values = torch.randn(K, generator=g)
    return theta, G, torch.sort(slots).values, values, torch.sort(zeros).values


def delta(theta, slots, values, zeros, a, b):
    d = SparseDelta("w", SHAPE, a, theta[a:b].clone(), budget=int((theta != 0).sum()) + 40, capacity=K)
    mine = (slots >= a) & (slots < b)
    n = int(mine.sum())
    d.add_slots(slots[mine], torch.zeros(n), torch.zeros(n), torch.zeros(n, dtype=torch.int32))
    d.values = values[mine].clone().requires_grad_(True)  # slots are sorted
    d.zeros = zeros[(zeros >= a) & (zeros < b)]
    return d


def reference(theta, G, slots, values, zeros, n_grow, restricted):
    """Local = global positions of the candidate sets, by the exact top-k over every position
    (one process): the slots, plus 2·n_grow non-slot positions of largest |G| (in the support if
    restricted) and, unless restricted, 2·n_grow non-slot support positions of smallest |θ·G|.
    A NaN in G makes no candidate."""
    d = delta(theta, slots, values, zeros, 0, N)
    g = torch.nan_to_num(G, nan=0.0)
    support = d.support()
    free = ~torch.isnan(G)
    free[slots] = False
    pool = torch.nonzero(free & support if restricted else free).reshape(-1)
    grow = pool[select_topk([g[pool].abs()], [pool], [2 * n_grow], True)[0]]
    if restricted:
        return torch.sort(torch.cat([slots, grow])).values, slots
    pool = torch.nonzero(free & support).reshape(-1)
    adapt = pool[select_topk([(theta[pool] * g[pool]).abs()], [pool], [2 * n_grow], False)[0]]
    return torch.sort(torch.cat([slots, grow])).values, torch.sort(torch.cat([slots, adapt])).values


def chosen(theta, G, slots, values, zeros, world, n_grow, restricted):
    def work(rank, allreduce):
        a, b = shard_bounds(N, world, rank)
        d = delta(theta, slots, values, zeros, a, b)
        d.window = open_window(d, "candidates", n_grow, restricted, True, allreduce)
        d.window.add(G[a:b].clone())
        assert torch.equal(d.base, theta[a:b])  # choosing reads θ, never writes it
        return d.window.grow_candidates() + a, d.window.adapt_candidates() + a
    parts = ThreadGroup(world).run(work)
    return torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])


@pytest.mark.parametrize("case", ["random", "ties", "misleading"])
@pytest.mark.parametrize("restricted", [False, True])
def test_block_scan_chooses_like_the_exact_top_k_over_every_position(monkeypatch, case, restricted):
    monkeypatch.setattr(selection, "SAMPLE_MIN", 1024)  # sampled bounds at this size
    monkeypatch.setattr(window, "SCAN_BLOCK", 1000)  # and many blocks, the last one short
    theta, G, slots, values, zeros = problem(case)
    n_grow = 200
    want = reference(theta, G, slots, values, zeros, n_grow, restricted)
    for world in (1, 2, 3):
        got = chosen(theta, G, slots, values, zeros, world, n_grow, restricted)
        assert torch.equal(got[0], want[0]), (world, "grow")
        assert torch.equal(got[1], want[1]), (world, "adapt")


def test_a_misleading_sample_is_caught(monkeypatch):
    # the test above passes through the rescan: a bound from the sampled positions alone
    # (G = 100 there) lets fewer than grow_k non-slot candidates through
    monkeypatch.setattr(selection, "SAMPLE_MIN", 1024)
    theta, G, slots, values, zeros = problem("misleading")
    d = delta(theta, slots, values, zeros, 0, N)
    w = open_window(d, "candidates", 200, False, True, None)
    sample = G[::selection.SAMPLE_STRIDE].abs()
    bound = selection.sampled_bound(sample[~sample.isnan()], w.grow_k, selection.SAMPLE_STRIDE, True)
    assert len(w._scan(G, bound, None)[0]) < w.grow_k


def test_window_sums_take_the_slots_from_their_delta_gradients():
    # later steps sample G only off the slots; at the slots it is the δ-gradient end_step gets
    theta, G, slots, values, zeros = problem("random")
    G = torch.nan_to_num(G)
    d = delta(theta, slots, values, zeros, 0, N)
    w = open_window(d, "candidates", 50, False, True, None)
    w.add(G.clone())
    w.end_step(0.5, G[slots] * 0.5)  # the δ-gradients come clipped already
    assert not bool(member(slots, w.sample_positions()).any())
    w.add_sampled(2 * G[w.sample_positions()])
    w.end_step(1.0, 2 * G[slots])
    i = w.grow_index()
    cand = w.pos[i]
    torch.testing.assert_close(w.sum[i], 2.5 * G[cand])
    mean, mean_sq = w.seed_at(i)
    torch.testing.assert_close(mean_sq, (0.25 + 4) / 2 * G[cand] ** 2)


def test_a_screening_window_chooses_from_the_screen_and_sums_the_full_gradients():
    # seft.window_screen_stride: the candidates are those a full-G window would choose from the
    # screening G, and the first step's full G enters the sums at them like a later step's
    theta, G, slots, values, zeros = problem("random")
    G = torch.nan_to_num(G)
    screen = torch.randn(N, generator=torch.Generator().manual_seed(9))
    full = open_window(delta(theta, slots, values, zeros, 0, N), "candidates", 50, False, True, None)
    full.add(screen.clone())
    d = delta(theta, slots, values, zeros, 0, N)
    w = open_window(d, "candidates", 50, False, True, None, screen_stride=4)
    assert not w.wants_dense() and w.screen_stride() == 4
    w.choose(screen.clone())
    assert w.screen_stride() == 0 and not w.wants_dense()  # chosen once per window
    assert torch.equal(w.grow_candidates(), full.grow_candidates())
    assert torch.equal(w.adapt_candidates(), full.adapt_candidates())
    assert not w.step.any()  # the screen is not added
    for scale, mult in ((0.5, 1.0), (1.0, 3.0)):
        w.add_sampled(mult * G[w.sample_positions()])
        w.end_step(scale, scale * mult * G[d.local_index()])
    i = w.grow_index()
    torch.testing.assert_close(w.sum[i], 3.5 * G[w.pos[i]])
    assert w.steps == 2


@pytest.mark.parametrize("n", [0, 8, 1003, 4096])
@pytest.mark.parametrize("density", [0.0, 0.01, 0.5, 1.0])
def test_word_search_finds_every_nonzero_byte(n, density):
    g = torch.Generator().manual_seed(n)
    code = ((torch.rand(n, generator=g) < density).to(torch.uint8)
            | ((torch.rand(n, generator=g) < density).to(torch.uint8) << 1))
    assert torch.equal(window.nonzero_bytes(code), torch.nonzero(code).reshape(-1))
