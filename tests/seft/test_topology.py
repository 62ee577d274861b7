"""Invariants of drop -> grow -> adapt:
* exact budget: |M| == B, θ and slots only inside M, slot count K after every update;
* same topology at any world size: 1, 2, 3 (uneven) shards give the same state bit for bit;
* reactivation happens when allowed, never when not; N:M masks stay valid."""
import pytest
import torch

from seft_scale.seft.delta import SparseDelta
from seft_scale.seft.optim import SlotAdamW
from seft_scale.sparsity import nm_valid
from seft_scale.seft.topology import check_budget, init_slots, topology_update
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
    for name, (theta, G) in probs.items():
        a, b = shard_bounds(len(theta), world, rank)
        base = theta.clone()[a:b]
        d = SparseDelta(name, SHAPES[name], a, base, budget=int((theta != 0).sum()),
                        capacity=capacity)
        d.grad_acc = G[a:b].clone()
        deltas.append(d)
    return deltas


def evolve(probs, world, updates=3, nm=None, **kw):
    """init slots, then `updates` rounds of (fake training, new G, topology update), sharded."""
    def work(rank, allreduce):
        deltas = build(probs, rank, world)
        init_slots(deltas, seed=3, seed_fn=lambda g: OPT.seed(g, 0), allreduce=allreduce)
        log = []
        for u in range(updates):
            for d in deltas:  # a deterministic stand-in for training: δ from position hashes
                d.values = (torch.sin(d.pos.double() * (u + 1.7)).float() * (u + 1)).requires_grad_()
                if d.grad_acc is None:
                    gpos = torch.arange(d.length) + d.offset
                    d.grad_acc = torch.cos(gpos.double() * (u + 0.3)).float()
                    d.grad_acc[gpos % 5 == 0] = 0.5  # ties
            stats = topology_update(deltas, 0.5 if u == 0 else 0.3, 5, lambda g: OPT.seed(g, 5),
                                    nm=nm is not None, allreduce=allreduce, **kw)
            check_budget(deltas, allreduce)
            log.append(stats.totals())
        return deltas, log

    results = ThreadGroup(world).run(work)
    state = {}
    for name in SHAPES:
        parts = [next(d for d in deltas if d.name == name) for deltas, _ in results]
        state[name] = {k: torch.cat([getattr(p, k).detach() for p in parts])
                       for k in ("base", "mask", "pos", "values", "exp_avg", "exp_avg_sq", "age")}
    return state, results[0][1]


@pytest.mark.parametrize("kw", [{}, {"merge_dropped": False}, {"criterion": "magnitude"}])
def test_same_topology_at_any_world_size(kw):
    probs = full_problem()
    ref, log1 = evolve(probs, 1, **kw)
    for world in (2, 3):
        got, log = evolve(probs, world, **kw)
        assert log == log1
        for name in SHAPES:
            for key, t in ref[name].items():
                assert torch.equal(got[name][key], t), (world, name, key)


def test_budget_reactivation_and_slot_count():
    probs = full_problem(seed=1)
    state, log = evolve(probs, 1)
    assert sum(s["reactivated"] for s in log) > 0
    assert all(s["reactivated"] == s["adapt_pruned"] for s in log)  # budget kept exactly
    moved = 0
    for name, (theta, _) in probs.items():
        st = state[name]
        assert int(st["mask"].sum()) == int((theta != 0).sum())
        assert len(st["pos"]) == 9 and len(torch.unique(st["pos"])) == 9
        moved += int((st["mask"] != (theta != 0)).sum())
    assert moved > 0  # the support really evolved


def test_no_reactivation_when_disabled():
    probs = full_problem(seed=2)
    state, log = evolve(probs, 2, reactivation=False)
    assert all(s["reactivated"] == 0 and s["adapt_pruned"] == 0 for s in log)
    for name, (theta, _) in probs.items():
        assert torch.equal(state[name]["mask"], theta != 0)


def test_nm_stays_valid_and_never_grows_outside():
    probs = full_problem(seed=4, nm=(2, 4))
    for name, (theta, _) in probs.items():
        assert nm_valid(theta.view(SHAPES[name]), 2, 4)
    state, log = evolve(probs, 3, nm=(2, 4))
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
        d.add_slots(torch.tensor([1]), *OPT.seed(torch.zeros(1), 0))
        d.values = torch.tensor([0.5], requires_grad=True)
        d.grad_acc = torch.tensor([0.0, 0.0, 0.0, 9.0])  # grow at position 3 (in the support)
        topology_update([d], 1.0, 5, lambda g: OPT.seed(g, 5), merge_dropped=merge)
        assert d.pos.tolist() == [3]
        assert d.base[1].item() == (2.5 if merge else 2.0)
        assert torch.nonzero(d.edited).reshape(-1).tolist() == ([1] if merge else [])


def test_adapt_uses_sensitivity_not_magnitude():
    # position 0: large weight, zero gradient (insensitive); position 1: small weight, big gradient
    theta = torch.tensor([5.0, 0.1, 0.0, 0.0])
    grad = torch.tensor([0.0, 1.0, 50.0, 0.0])  # grow into the pruned position 2
    results = {}
    for crit in ("sensitivity", "magnitude"):
        # support {0, 1, 3}: position 3 holds a slot whose value is still 0
        d = SparseDelta("m", (1, 4), 0, theta.clone(), budget=3, capacity=1,
                        mask=torch.tensor([True, True, False, True]))
        d.add_slots(torch.tensor([3]), *OPT.seed(torch.zeros(1), 0))
        d.grad_acc = grad.clone()
        topology_update([d], 1.0, 5, lambda g: OPT.seed(g, 5), criterion=crit)
        results[crit] = d.mask.tolist()
    assert results["sensitivity"][2] and results["magnitude"][2]  # grown position stays
    # sensitivity prunes |W·G| smallest: position 0 or 3 (both 0) -> 0 (lower position) goes
    assert results["sensitivity"] == [False, True, True, True]
    # magnitude prunes |W| smallest among non-grown: position 3 (W = 0 after the drop)
    assert results["magnitude"] == [True, True, True, False]
