"""Drop -> grow -> adapt on this rank's shards, with exact global choices (the cycle of the SEFT
paper, arXiv 2505.24037, Figure 2).

Every decision is a global top-k through `select_topk`, so the same G, θ and δ give the same
positions at any world size (ties go to the lower global flat position).

Decisions we took where the paper is silent, and why:
* Dropped values are merged into θ by default (`merge_dropped`): the drop picks the slots that
  moved least, not the ones that are useless, and merging keeps what they learned while freeing the
  slot to explore. Discarding (SpIEL's choice for dense models) returns a reactivated position to an
  exact zero that the next adapt step then prunes — churn with nothing learned kept.
* Grow candidates are the positions without a *remaining* slot, so a dropped position may be
  chosen again; a position both dropped and regrown simply keeps its slot (SpIEL's filter). This
  makes p = 1 a full reselection.
* Adapt prunes the overshoot |M| - B among support positions not grown in this update, by the
  smallest |W·G| (or |W|); a slot sitting on a pruned position is freed and refilled by the next
  update's grow, so the slot count never exceeds K and returns to K at the next update.
* N:M mode grows only inside the support, which is N:M-valid and never changes; adapt is a no-op.
* What grow and adapt rank by comes from the window scores of each matrix (seft/window.py).
"""
from __future__ import annotations

import zlib
from dataclasses import dataclass, field
from typing import Callable, Optional, Sequence

import torch

from seft_scale.seft.delta import SparseDelta, member
from seft_scale.seft.selection import Allreduce, select_topk
from seft_scale.sparsity import nm_shard_groups

# (mean gradient, mean squared gradient, steps seen) of new slots -> (exp_avg, exp_avg_sq, age)
SeedFn = Callable[[torch.Tensor, torch.Tensor, int], tuple[torch.Tensor, torch.Tensor, torch.Tensor]]


@dataclass
class UpdateStats:
    """What one topology update did, summed over ranks, per matrix name."""

    dropped: dict[str, int] = field(default_factory=dict)
    grown: dict[str, int] = field(default_factory=dict)
    reactivated: dict[str, int] = field(default_factory=dict)
    adapt_pruned: dict[str, int] = field(default_factory=dict)

    def totals(self) -> dict[str, int]:
        return {k: sum(getattr(self, k).values())
                for k in ("dropped", "grown", "reactivated", "adapt_pruned")}


def _global(values: Sequence[Sequence[int]], allreduce: Optional[Allreduce]) -> torch.Tensor:
    t = torch.tensor(values, dtype=torch.int64).reshape(len(values), -1)
    return allreduce(t) if allreduce is not None else t


def _mix32(x: torch.Tensor) -> torch.Tensor:
    """A 32-bit integer hash (lowbias32) on int64 lanes, exact on every platform."""
    def mul(a, c):  # (a * c) mod 2^32 without int64 overflow
        return (a * (c & 0xFFFF) + (((a * (c >> 16)) & 0xFFFF) << 16)) & 0xFFFFFFFF
    x = x & 0xFFFFFFFF
    x = x ^ (x >> 16)
    x = mul(x, 0x7FEB352D)
    x = x ^ (x >> 15)
    x = mul(x, 0x846CA68B)
    return x ^ (x >> 16)


def position_noise(name: str, seed: int, pos: torch.Tensor) -> torch.Tensor:
    """A uniform [0, 1) value per global position that depends on nothing but (name, seed, pos)."""
    salt = _mix32(torch.tensor([zlib.crc32(name.encode()) ^ (seed & 0xFFFFFFFF)], device=pos.device))
    h = _mix32(_mix32(pos & 0xFFFFFFFF) ^ salt ^ _mix32((pos >> 32) + 0x9E3779B9))
    return (h >> 8).to(torch.float32) / float(1 << 24)


def init_slots(deltas: Sequence[SparseDelta], seed: int, seed_fn: SeedFn,
               allreduce: Optional[Allreduce] = None) -> None:
    """Place each matrix's K slots at positions of its support, uniformly at random (hash-keyed,
    so the placement is the same at every world size)."""
    cand = [torch.nonzero(d.support()).reshape(-1) + d.offset for d in deltas]
    scores = [position_noise(d.name, seed, c) for d, c in zip(deltas, cand)]
    chosen = select_topk(scores, cand, [d.capacity for d in deltas], True, allreduce)
    for d, c, s in zip(deltas, cand, chosen):
        new = c[s]
        d.keep_slots(torch.zeros(len(d.pos), dtype=torch.bool, device=d.pos.device))
        zero = torch.zeros(len(new), device=new.device)
        d.add_slots(new, *seed_fn(zero, zero, 0))


def update_sizes(deltas: Sequence[SparseDelta], drop_fraction: float,
                 counts: Sequence[int]) -> tuple[list[int], list[int]]:
    """(slots dropped, slots grown) per matrix in an update at `drop_fraction`, given each
    matrix's slot count over all ranks: p·K drops, and grow refills to K."""
    n_drop = [min(int(drop_fraction * d.capacity), int(c)) for d, c in zip(deltas, counts)]
    return n_drop, [nd + d.capacity - int(c) for nd, d, c in zip(n_drop, deltas, counts)]


def topology_update(deltas: Sequence[SparseDelta], drop_fraction: float, seed_fn: SeedFn, *,
                    merge_dropped: bool = True, restricted: bool = False,
                    criterion: str = "sensitivity",
                    allreduce: Optional[Allreduce] = None) -> UpdateStats:
    """One drop -> grow -> adapt cycle over each matrix's window scores (`d.window`).
    restricted: grow inside the support only (N:M, or reactivation off)."""
    stats = UpdateStats()
    for d in deltas:
        if d.window is None:
            raise RuntimeError(f"{d.name}: topology update without window scores")
    counts = _global([[len(d.pos)] for d in deltas], allreduce)[:, 0].tolist()
    n_drop, n_grow = update_sizes(deltas, drop_fraction, counts)

    # DROP: the smallest |δ|
    drop = select_topk([d.values.detach().abs() for d in deltas], [d.pos for d in deltas],
                       n_drop, largest=False, allreduce=allreduce)

    # The window's entries (`window.pos`) hold every slot and candidate; grow and adapt find
    # slots, candidates and sums by index into them (bool flags per entry), not by searching
    # positions: ~10 searches of ~K positions per matrix fewer (seft/window.py, the index API).
    # The per-matrix steps are functions so that their entry-sized flags die with each call.
    slot_at = [d.window.slot_index() for d in deltas]  # each slot's entry, before any edit

    # GROW: the largest |Σ G| among candidates without a remaining slot
    cands = [_grow_entries(d, dr, sa, restricted) for d, dr, sa in zip(deltas, drop, slot_at)]
    grow = select_topk([d.window.sum.index_select(0, ci).abs() for d, ci in zip(deltas, cands)],
                       [d.window.pos.index_select(0, ci) + d.offset for d, ci in zip(deltas, cands)],
                       n_grow, True, allreduce)
    grown_at, local_stats = [], []
    for d, dr, sa, ci, gr in zip(deltas, drop, slot_at, cands, grow):
        gi, row = _drop_and_grow(d, dr, sa, ci.masked_select(gr), seed_fn, merge_dropped)
        grown_at.append(gi)
        local_stats.append(row)
    del cands, grow, drop, slot_at  # freed before adapt builds its scores

    # ADAPT: prune the overshoot |M| - B by the smallest sensitivity |W·Σ G| (or magnitude |W|)
    support_counts = _global([[d.support_count()] for d in deltas], allreduce)[:, 0]
    excess = [int(sc) - d.budget for sc, d in zip(support_counts, deltas)]
    for e, d in zip(excess, deltas):
        if e < 0 or (restricted and e > 0):
            raise AssertionError(f"{d.name}: support {d.budget + e} vs budget {d.budget}")
    pruned_counts = [0] * len(deltas)
    if any(e > 0 for e in excess):
        cands, scores = zip(*[_adapt_scores(d, gi, criterion) for d, gi in zip(deltas, grown_at)])
        eligible = _global([[len(c)] for c in cands], allreduce)[:, 0]
        for d, e, n in zip(deltas, excess, eligible.tolist()):
            if n < e:  # the window's candidate sizes rule this out; a bug if it happens
                raise AssertionError(f"{d.name}: {n} adapt candidates for an overshoot of {e}")
        prune = select_topk(scores, [c + d.offset for c, d in zip(cands, deltas)], excess,
                            largest=False, allreduce=allreduce)
        for i, (d, c, pr) in enumerate(zip(deltas, cands, prune)):
            d.prune(c[pr])
            pruned_counts[i] = int(pr.sum())

    totals = _global([ls + [p] for ls, p in zip(local_stats, pruned_counts)], allreduce)
    for d, row in zip(deltas, totals.tolist()):
        stats.dropped[d.name], stats.grown[d.name], stats.reactivated[d.name] = row[0], row[1], row[2]
        stats.adapt_pruned[d.name] = row[3]
        d.window = None
    return stats


def _grow_entries(d: SparseDelta, dropped: torch.Tensor, slot_at: torch.Tensor,
                  restricted: bool) -> torch.Tensor:
    """The grow set's entries without a remaining slot (inside the support if `restricted`)."""
    w = d.window
    free = torch.ones(len(w.sum), dtype=torch.bool, device=slot_at.device)
    free[slot_at.masked_select(~dropped)] = False
    ci = w.grow_index()
    ci = ci.masked_select(free.index_select(0, ci))
    if restricted:
        ci = ci.masked_select(d.in_support(w.pos.index_select(0, ci)))
    return ci


def _drop_and_grow(d: SparseDelta, dropped: torch.Tensor, slot_at: torch.Tensor, gi: torch.Tensor,
                   seed_fn: SeedFn, merge_dropped: bool) -> tuple[torch.Tensor, list[int]]:
    """Free the dropped slots and fill the grown entries `gi` (increasing); a slot both dropped and
    regrown just stays. Returns the entries grown anew and [dropped, grown, reactivated]."""
    w = d.window
    was_slot = torch.zeros(len(w.sum), dtype=torch.bool, device=slot_at.device)
    was_slot[slot_at] = True
    again = was_slot.index_select(0, gi)
    dropped = dropped.clone()
    dropped[torch.searchsorted(slot_at, gi.masked_select(again))] = False
    gi = gi.masked_select(~again)
    gidx = w.pos.index_select(0, gi)
    reactivated = int((~d.in_support(gidx, slots=False)).sum())
    d.remove_slots(dropped, merge_dropped)
    mean, mean_sq = w.seed_at(gi)
    d.add_slots(gidx + d.offset, *seed_fn(mean, mean_sq, w.steps), entering=reactivated)
    return gi, [int(dropped.sum()), len(gi), reactivated]


def _adapt_scores(d: SparseDelta, grown_at: torch.Tensor, criterion: str
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """(local positions, scores) adapt may prune: support positions not grown just now, scored by
    |W·Σ G| over the window's adapt set, or by |W| over the whole support (magnitude)."""
    w = d.window
    if criterion != "sensitivity":
        cand = torch.nonzero(d.support()).reshape(-1)
        cand = cand[~member(w.pos[grown_at], cand)]
        return cand, d.weights_at(cand).abs()
    grown = torch.zeros(len(w.sum), dtype=torch.bool, device=grown_at.device)
    grown[grown_at] = True
    ai = w.adapt_index()
    ai = ai.masked_select(~grown.index_select(0, ai))
    cand = w.pos.index_select(0, ai)
    return cand, (d.weights_at(cand) * w.sum.index_select(0, ai)).abs()


def check_budget(deltas: Sequence[SparseDelta], allreduce: Optional[Allreduce] = None,
                 nm: Optional[tuple[int, int]] = None) -> None:
    """The exact-budget invariant: |M| == B (recounted, and equal to the count each shard keeps)
    and at most K slots; with N:M, no group of M
    consecutive inputs holds more than N support positions (groups lying wholly inside this
    shard; the N:M support never changes, and is checked whole at start). θ and the slots lie
    inside M by construction (M is derived from them, seft/delta.py)."""
    rows = []
    for d in deltas:
        support = d.support()
        bad_groups = nm_shard_groups(support, d.offset, *nm)[0] if nm is not None else 0
        counted = int(support.sum())
        rows.append([counted, len(d.pos), bad_groups, int(counted != d.support_count())])
    g = _global(rows, allreduce)
    for d, (m, k, bg, stale) in zip(deltas, g.tolist()):
        if m != d.budget or k > d.capacity or bg or stale:
            raise AssertionError(f"{d.name}: support {m} (budget {d.budget}), {k} slots "
                                 f"(K={d.capacity}), {bg} N:M groups over N, {stale} ranks whose "
                                 "kept support count differs from a recount")
