"""Invariants of drop -> grow -> adapt, with both kinds of window scores:
* exact budget: |M| == B, θ and slots only inside M, slot count K after every update;
* same topology at any world size: 1, 2, 3 (uneven) shards give the same state bit for bit;
* reactivation happens when allowed, never when not; N:M masks stay valid."""
import pytest
import torch

from seft_scale.seft.delta import SparseDelta
from seft_scale.seft.optim import SlotAdamW
from seft_scale.seft.topology import check_budget, init_slots, topology_update, update_sizes
from seft_scale.seft.window import DenseWindow, open_window
from seft_scale.sparsity import nm_valid
from tests.helpers import ThreadGroup, shard_bounds

SHAPES = {"a": (12, 16), "b": (7, 12), "c": (16, 8)}
OPT = SlotAdamW(1e-2)


def full_problem(seed=0, nm=None):
    """Pruned θ, random G and random slot values for each matrix, as full flat tensors."""
    g = torch.Generator().manual_seed(seed)
    probs = {}
    for name, (r, c) in SHAPES.items():
        theta = torch.randn(r * c, generator=g)
        if nm is None:
            theta[torch.rand(r * c, generator=g) < 0.5] = 0
        else:
            n, m = nm
            groups = theta.view(-1, m)
            keep = torch.rand(groups.shape, generator=g).argsort(-1)[:, :n]
            groups.mul_(torch.zeros_like(groups).scatter_(1, keep, 1.0))
        G = torch.randn(r * c, generator=g)
        G[torch.rand(r * c, generator=g) < 0.2] = 0.25  # ties in the grow scores
        probs[name] = (theta, G)
    return probs


def build(probs, rank, world, capacity=9):
    deltas = []
    for name, (theta, _) in probs.items():
        a, b = shard_bounds(len(theta), world, rank)
        deltas.append(SparseDelta(name, SHAPES[name], a, theta.clone()[a:b],
                                  budget=int((theta != 0).sum()), capacity=capacity))
    return deltas


def window_of(d, G, kind="dense", n_grow=0, restricted=False, sensitivity=True, allreduce=None):
    """d.window fed with one step whose G over the whole matrix is `G`."""
    d.window = open_window(d, kind, n_grow, restricted, sensitivity, allreduce)
    d.window.add(G[d.offset:d.offset + d.length].clone())
    d.window.end_step(1.0, G[d.pos])  # the slots' δ-gradients: the step's G there


def evolve(probs, world, updates=3, nm=None, kind="dense", reactivation=True, **kw):
    """init slots, then `updates` rounds of (fake training, a window's G, topology update), sharded."""
    restricted = nm is not None or not reactivation

    def work(rank, allreduce):
        deltas = build(probs, rank, world)
        init_slots(deltas, seed=3, seed_fn=OPT.seed, allreduce=allreduce)
        log = []
        for u in range(updates):
            p = 0.5 if u == 0 else 0.3
            counts = allreduce(torch.tensor([len(d.pos) for d in deltas])).tolist()
            _, n_grow = update_sizes(deltas, p, counts)
            for d, ng in zip(deltas, n_grow):  # a deterministic stand-in for training: δ, G hashed
                d.values = (torch.sin(d.pos.double() * (u + 1.7)).float() * (u + 1)).requires_grad_()
                G = probs[d.name][1] if u == 0 else torch.cos(torch.arange(d.numel).double() * (u + 0.3)).float()
                if u:
                    G[torch.arange(d.numel) % 5 == 0] = 0.5  # ties
                window_of(d, G, kind, ng, restricted, kw.get("criterion", "sensitivity") == "sensitivity",
                          allreduce)
            stats = topology_update(deltas, p, OPT.seed, restricted=restricted, allreduce=allreduce, **kw)
            check_budget(deltas, allreduce, nm)
            log.append(stats.totals())
        return deltas, log

    results = ThreadGroup(world).run(work)
    state = {}
    for name in SHAPES:
        parts = [next(d for d in deltas if d.name == name) for deltas, _ in results]
        state[name] = {k: torch.cat([getattr(p, k).detach() for p in parts])
                       for k in ("base", "pos", "values", "exp_avg", "exp_avg_sq", "age")}
        state[name]["mask"] = torch.cat([p.support() for p in parts])
    return state, results[0][1]


@pytest.mark.parametrize("kind", ["dense", "candidates"])
@pytest.mark.parametrize("kw", [{}, {"merge_dropped": False}, {"criterion": "magnitude"}])
def test_same_topology_at_any_world_size(kw, kind):
    probs = full_problem()
    ref, log1 = evolve(probs, 1, kind=kind, **kw)
    for world in (2, 3):
        got, log = evolve(probs, world, kind=kind, **kw)
        assert log == log1
        for name in SHAPES:
            for key, t in ref[name].items():
                assert torch.equal(got[name][key], t), (world, name, key)


@pytest.mark.parametrize("kind", ["dense", "candidates"])
def test_budget_reactivation_and_slot_count(kind):
    probs = full_problem(seed=1)
    state, log = evolve(probs, 1, kind=kind)
    assert sum(s["reactivated"] for s in log) > 0
    assert all(s["reactivated"] == s["adapt_pruned"] for s in log)  # budget kept exactly
    moved = 0
    for name, (theta, _) in probs.items():
        st = state[name]
        assert int(st["mask"].sum()) == int((theta != 0).sum())
        assert len(st["pos"]) == 9 and len(torch.unique(st["pos"])) == 9
        moved += int((st["mask"] != (theta != 0)).sum())
    assert moved > 0  # the support really evolved


@pytest.mark.parametrize("kind", ["dense", "candidates"])
def test_no_reactivation_when_disabled(kind):
    probs = full_problem(seed=2)
    state, log = evolve(probs, 2, kind=kind, reactivation=False)
    assert all(s["reactivated"] == 0 and s["adapt_pruned"] == 0 for s in log)
    for name, (theta, _) in probs.items():
        assert torch.equal(state[name]["mask"], theta != 0)


@pytest.mark.parametrize("kind", ["dense", "candidates"])
def test_nm_stays_valid_and_never_grows_outside(kind):
    probs = full_problem(seed=4, nm=(2, 4))
    for name, (theta, _) in probs.items():
        assert nm_valid(theta.view(SHAPES[name]), 2, 4)
    state, log = evolve(probs, 3, nm=(2, 4), kind=kind)
    assert all(s["reactivated"] == 0 for s in log)
    for name, (theta, _) in probs.items():
        st = state[name]
        assert torch.equal(st["mask"], theta != 0)
        w = st["base"].clone().index_add_(0, st["pos"], st["values"])
        assert nm_valid(w.view(SHAPES[name]), 2, 4)


def test_merge_keeps_dropped_values_discard_loses_them():
    theta = torch.tensor([1.0, 2.0, 0.0, 4.0])
    for merge in (True, False):
        d = SparseDelta("m", (1, 4), 0, theta.clone(), budget=3, capacity=1)
        d.add_slots(torch.tensor([1]), *OPT.seed(torch.zeros(1), torch.zeros(1), 0))
        d.values = torch.tensor([0.5], requires_grad=True)
        window_of(d, torch.tensor([0.0, 0.0, 0.0, 9.0]))  # grow at position 3 (in the support)
        topology_update([d], 1.0, OPT.seed, merge_dropped=merge)
        assert d.pos.tolist() == [3]
        assert d.base[1].item() == (2.5 if merge else 2.0)
        assert d.edited.positions().tolist() == ([1] if merge else [])


def test_a_dropped_slot_left_at_zero_stays_in_the_support():
    # a slot on a reactivated position (θ = 0) is dropped with δ = 0: θ stays 0, the position is
    # still part of the support (listed in d.zeros), so the budget holds without adapt pruning
    theta = torch.tensor([1.0, 0.0, 3.0, 0.0])
    d = SparseDelta("m", (1, 4), 0, theta.clone(), budget=3, capacity=1)
    d.add_slots(torch.tensor([1]), *OPT.seed(torch.zeros(1), torch.zeros(1), 0))
    window_of(d, torch.tensor([0.0, 0.0, 5.0, 0.0]))  # regrow inside the support, at 2
    topology_update([d], 1.0, OPT.seed)
    assert d.pos.tolist() == [2] and d.zeros.tolist() == [1]
    assert d.support().tolist() == [True, True, True, False]
    check_budget([d])


def test_adapt_uses_sensitivity_not_magnitude():
    # position 0: large weight, zero gradient (insensitive); position 1: small weight, big gradient
    theta = torch.tensor([5.0, 0.1, 0.0, 0.0])
    grad = torch.tensor([0.0, 1.0, 50.0, 0.0])  # grow into the pruned position 2
    results = {}
    for crit in ("sensitivity", "magnitude"):
        # support {0, 1, 3}: position 3 holds a slot whose value is still 0
        d = SparseDelta("m", (1, 4), 0, theta.clone(), budget=3, capacity=1)
        d.add_slots(torch.tensor([3]), *OPT.seed(torch.zeros(1), torch.zeros(1), 0))
        window_of(d, grad)
        topology_update([d], 1.0, OPT.seed, criterion=crit)
        results[crit] = d.support().tolist()
    assert results["sensitivity"][2] and results["magnitude"][2]  # grown position stays
    # sensitivity prunes |W·G| smallest: position 0 or 3 (both 0) -> 0 (lower position) goes
    assert results["sensitivity"] == [False, True, True, True]
    # magnitude prunes |W| smallest among non-grown: position 3 (W = 0 after the drop)
    assert results["magnitude"] == [True, True, True, False]


def test_candidates_equal_dense_when_the_candidates_cover_the_winners():
    # one window step: the candidates chosen from that step's G are exactly the top of Σ G, so
    # both kinds of window scores make the same choice
    probs = full_problem(seed=5)
    dense, _ = evolve(probs, 1, updates=1, kind="dense")
    cand, _ = evolve(probs, 1, updates=1, kind="candidates")
    for name in SHAPES:
        for key in ("pos", "mask", "base"):
            assert torch.equal(dense[name][key], cand[name][key]), (name, key)


def test_window_seeds_use_the_mean_square_on_the_clipped_scale():
    d = SparseDelta("m", (1, 4), 0, torch.tensor([1.0, 0.0, 3.0, 2.0]), budget=3, capacity=1)
    d.add_slots(torch.tensor([0]), *OPT.seed(torch.zeros(1), torch.zeros(1), 0))
    d.window = DenseWindow(d)
    for g, scale in ((torch.tensor([0.0, 0.0, 4.0, 0.0]), 0.5), (torch.tensor([0.0, 0.0, -2.0, 0.0]), 1.0)):
        d.window.add(g)
        d.window.end_step(scale)
    mean, mean_sq = d.window.seed_at(torch.tensor([2]))  # dense: entries are positions
    assert mean.tolist() == [0.0] and mean_sq.tolist() == [4.0]  # (2 + -2)/2, (4 + 4)/2


def test_candidate_windows_sum_like_dense_ones_at_their_candidates():
    # the first micro-batch chooses (dense G); later ones arrive sampled at the candidates
    probs = full_problem(seed=6)
    name, (theta, _) = next(iter(probs.items()))
    g = torch.Generator().manual_seed(0)
    grads = [torch.randn(theta.numel(), generator=g) for _ in range(3)]
    dense = SparseDelta(name, SHAPES[name], 0, theta.clone(), int((theta != 0).sum()), 9)
    cand = SparseDelta(name, SHAPES[name], 0, theta.clone(), int((theta != 0).sum()), 9)
    dense.window = DenseWindow(dense)
    cand.window = open_window(cand, "candidates", 4, False, True, None)
    for i, G in enumerate(grads):
        dense.window.add(G)
        if i == 0:
            assert cand.window.wants_dense()
            cand.window.add(G)
        else:
            assert not cand.window.wants_dense()
            cand.window.add_sampled(G[cand.window.sample_positions()])
        dense.window.end_step(0.5)
        cand.window.end_step(0.5)
    w = cand.window
    for i in (w.grow_index(), w.adapt_index()):
        torch.testing.assert_close(w.sum[i], dense.window.sum[w.pos[i]])
    i = w.grow_index()
    assert torch.equal(w.pos[w.slot_index()], cand.local_index())
    for a, b in zip(w.seed_at(i), dense.window.seed_at(w.pos[i])):
        torch.testing.assert_close(a, b)
