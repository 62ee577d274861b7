"""Selection-window scores: what grow and adapt rank by, gathered over the A steps before an update.

Grow ranks positions by |Σ_t G_t| (G the dense weight gradient, summed over micro-batches and
ranks; SpIEL's accumulated gradient), adapt by the sensitivity |W·Σ_t G_t|; new slots' Adam
moments are seeded from the window's mean gradient and mean squared gradient. Each step's G
enters on the scale the δ-gradients are clipped to (the step's clip coefficient), so seeds and
later updates agree (`end_step`).

Two ways to keep them (`seft.window_scores`):

* ``candidates`` (default): every slot is a candidate (its G is its δ-gradient, which the
  kernel computes anyway), and at the window's first micro-batch every target adds bounded
  non-slot sets chosen by an exact global top-k of that micro-batch's G (by default of the G of
  every 4th of its tokens, seft.window_screen_stride, which is then sampled in full at the
  chosen positions): the c·n_grow positions
  of largest |G| for grow (c = seft.window_candidates; the approach of SpIEL's SftSelector,
  Ansell et al. 2024) and, when adapt ranks by sensitivity, the max(c, 2)·n_grow support
  positions of smallest |θ·G|. G (and G²) is summed over the window at those positions only:
  memory O(K + c·n_grow) per matrix instead of O(n), only the first micro-batch needs the dense
  G, and later window steps sample G at the non-slot candidates by an SDDMM beside the slots'
  (seft/kernels.py): ~4·n_grow positions, n_grow ≈ p·K. The sizes guarantee enough: grow finds
  at least n_grow positions without a remaining slot (the non-slot ones and every dropped slot),
  adapt at least the overshoot after excluding the positions just grown (it needs ≤ n_grow of
  2·n_grow). The non-slot candidates come from the first micro-batch, so runs that split a
  global batch into different micro-batches (ranks x accumulation) choose from different ones.
* ``dense``: fp32 sums over the whole shard (Σ G, Σ G² and the current step's G: 12 B per weight
  of the shard while a window is open): the exact reference for the ablation.

Either way every choice is an exact global top-k (seft/selection.py), so the same inputs give the
same positions at any world size.
"""
from __future__ import annotations

import math
from typing import Optional

import torch

from seft_scale.seft.delta import SparseDelta, member
from seft_scale.seft.selection import Allreduce, sample_stride, sampled_bound, select_topk

WINDOW_SCORES = ("candidates", "dense")
SCAN_BLOCK = 1 << 18  # positions per block of the candidate scan: its scores stay in cache


def _reaches_(scores: torch.Tensor, bound: Optional[float], largest: bool) -> torch.Tensor:
    """Scores at least as good as `bound` (None: every score), never a NaN; `scores` is
    overwritten: an in-place compare into the float tensor, then a cast,
    is ~2x faster on CPU than a compare that writes bool (measured: 0.3 vs 1.0 ns per score)."""
    if bound is None:
        return scores.eq_(scores).bool()
    return (scores.ge_(bound) if largest else scores.le_(bound)).bool()


def nonzero_bytes(code: torch.Tensor) -> torch.Tensor:
    """Indices of the nonzero bytes of a contiguous uint8 tensor, sorted. Passing entries are
    rare (~1 % here): search the 8-byte words first, then only the words that hold one."""
    n = code.numel()
    if n % 8:
        return torch.nonzero(code).reshape(-1)
    words = torch.nonzero(code.view(torch.int64)).reshape(-1)
    at = torch.nonzero(code.view(-1, 8).index_select(0, words))
    return words[at[:, 0]] * 8 + at[:, 1]


class DenseWindow:
    """fp32 sums over the whole shard."""

    def __init__(self, d: SparseDelta):
        self.d = d
        self.sum = torch.zeros(d.length, dtype=torch.float32, device=d.base.device)
        self.sumsq = torch.zeros_like(self.sum)
        self.step = torch.zeros_like(self.sum)
        self.steps = 0

    def wants_dense(self) -> bool:
        return True

    def screen_stride(self) -> int:
        return 0

    def add(self, g: torch.Tensor) -> None:
        """One micro-batch's G over the shard (fp32, summed over ranks)."""
        self.step.add_(g)

    def end_step(self, scale: float, slot_grad: Optional[torch.Tensor] = None) -> None:
        """The step's G times `scale` (the dense G holds the slots' too: slot_grad unused)."""
        self.step.mul_(scale)
        self.sum.add_(self.step)
        self.sumsq.addcmul_(self.step, self.step)
        self.step.zero_()
        self.steps += 1

    # the index API topology updates use: entries are the shard's local positions themselves
    @property
    def pos(self) -> torch.Tensor:
        return torch.arange(len(self.sum), device=self.sum.device)

    def slot_index(self) -> torch.Tensor:
        return self.d.local_index()

    def grow_index(self) -> torch.Tensor:
        return self.pos

    def adapt_index(self) -> torch.Tensor:
        return torch.nonzero(self.d.support()).reshape(-1)

    def grow_candidates(self) -> torch.Tensor:
        return self.pos[self.grow_index()]

    def adapt_candidates(self) -> Optional[torch.Tensor]:
        return self.pos[self.adapt_index()]

    def seed_at(self, i: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean gradient and mean squared gradient per step at entries `i`."""
        n = max(self.steps, 1)
        return self.sum.index_select(0, i) / n, self.sumsq.index_select(0, i) / n

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {"sum": self.sum, "sumsq": self.sumsq, "steps": torch.tensor([self.steps])}

    def load_state_dict(self, sd: dict[str, torch.Tensor]) -> None:
        """This shard's part of a saved window (already cut to its range)."""
        self.steps = int(sd["steps"][0])
        self.sum.copy_(sd["sum"])
        self.sumsq.copy_(sd["sumsq"])


class CandidateWindow:
    """Sums at bounded candidate sets: every slot, plus non-slot positions chosen at the window's
    first micro-batch. Arrays over the candidates' union `pos` (sorted local positions)."""

    GROW, ADAPT = 1, 2  # bits of `sets`: which candidate sets a position belongs to

    def __init__(self, d: SparseDelta, grow_k: int, adapt_k: int, restricted: bool,
                 sensitivity: bool, allreduce: Optional[Allreduce], screen_stride: int = 1):
        self.d, self.grow_k, self.adapt_k = d, grow_k, adapt_k
        self.restricted, self.sensitivity, self.allreduce = restricted, sensitivity, allreduce
        self.stride = screen_stride
        self.pos: Optional[torch.Tensor] = None  # local positions, sorted; None until chosen
        self.steps = 0

    def choose(self, g: torch.Tensor) -> None:
        """The non-slot candidates from the first micro-batch's G, or from a screening G (not
        added: its scale does not change what is chosen). Every rank calls it for the
        same matrix in the same backward, so the exact global top-k can all-reduce. Chosen: the grow_k
        of largest |G| (inside the support if restricted) and the adapt_k support positions of
        smallest |θ·G|. Both come from one pass over the shard in cache-sized blocks that keeps
        only the scores reaching a bound taken from a strided sample (seft/selection.py): G and
        θ are read from memory once and nothing of the shard's size is allocated; the top-k over
        what passes is the top-k over the whole shard. A NaN in G (it comes with a non-finite
        loss or gradient norm, which stops the run after this backward, train.py) makes no
        candidate: no comparison passes it."""
        d = self.d
        stride = sample_stride(d.length)
        in_s, w_s, slot_s = d.strided(stride)
        g_s = g[::stride]
        free = ~slot_s & in_s if self.restricted else ~slot_s
        grow_s = g_s[free].abs()
        grow_b = sampled_bound(grow_s[grow_s == grow_s], self.grow_k, stride, largest=True) \
            if self.grow_k > 0 else math.inf  # nothing to grow: (almost) nothing passes
        adapt_b = None
        if self.adapt_k > 0:
            free = ~slot_s & in_s
            adapt_s = (w_s[free] * g_s[free]).abs_()
            adapt_b = sampled_bound(adapt_s[adapt_s == adapt_s], self.adapt_k, stride, largest=False)
        grow, adapt = self._scan(g, grow_b, adapt_b)
        grow_missed = len(grow) < self.grow_k and grow_b is not None
        adapt_missed = len(adapt) < self.adapt_k and adapt_b is not None
        if grow_missed or adapt_missed:  # the sample misled: scan again without that bound
            grow, adapt = self._scan(g, None if grow_missed else grow_b, None if adapt_missed else adapt_b)
        score = g.index_select(0, grow).abs_()
        grow = grow[select_topk([score], [grow + d.offset], [self.grow_k], True, self.allreduce)[0]]
        score = (d.base.detach().index_select(0, adapt).to(torch.float32) * g.index_select(0, adapt)).abs_()
        adapt = adapt[select_topk([score], [adapt + d.offset], [self.adapt_k], False, self.allreduce)[0]]
        slots = d.local_index()
        self.pos, inv = torch.unique(torch.cat([slots, grow, adapt]), return_inverse=True)
        self.sets = torch.zeros(len(self.pos), dtype=torch.uint8, device=g.device)
        ns, ng = len(slots), len(grow)
        self.sets[inv[:ns]] = self.GROW | self.ADAPT
        self.sets[inv[ns:ns + ng]] |= self.GROW
        self.sets[inv[ns + ng:]] |= self.ADAPT  # grow ∩ adapt: both bits (indices unique per set)
        self.sum = torch.zeros(len(self.pos), dtype=torch.float32, device=g.device)
        self.sumsq, self.step = torch.zeros_like(self.sum), torch.zeros_like(self.sum)
        self._index_samples(slot_at=inv[:ns].clone())  # not a view: inv is freed

    def _scan(self, g: torch.Tensor, grow_b: Optional[float],
              adapt_b: Optional[float]) -> tuple[torch.Tensor, torch.Tensor]:
        """Non-slot positions, sorted local: with |G| >= grow_b (in the support if restricted),
        and in the support with |θ·G| <= adapt_b (only if adapt_k > 0); None: no bound. The
        blocks take the support as θ ≠ 0; the listed zeros (θ == 0 in the support) are added
        apart, the slot positions taken out: K-sized."""
        d = self.d
        theta = d.base.detach()
        grows, adapts = [], []
        for lo in range(0, d.length, SCAN_BLOCK):
            # per block: |G|, |θ·G| = |θ|·|G|, both compared in place, the two masks packed in
            # one byte each so one search finds both (~0.7 instead of ~2.4 ms per 256K on CPU)
            t = theta[lo:lo + SCAN_BLOCK]
            a = g[lo:lo + SCAN_BLOCK].abs()
            on = t.bool()  # θ != 0
            adapt_m = None
            if self.adapt_k > 0:
                adapt_m = _reaches_(a * t.abs().to(torch.float32), adapt_b, False) & on  # never abs_ θ
            code = _reaches_(a, grow_b, True)
            if self.restricted:
                code &= on
            code = code.view(torch.uint8)
            if adapt_m is not None:
                code = code | (adapt_m.view(torch.uint8) << 1)
            at = nonzero_bytes(code)
            kind = code.index_select(0, at)
            grows.append(at[(kind & 1).bool()] + lo)
            if adapt_m is not None:
                adapts.append(at[(kind & 2).bool()] + lo)
        slots = d.local_index()
        zeros = d.zeros - d.offset
        zeros = zeros[~member(slots, zeros)]  # listed zeros without a slot: W = 0 there
        grow = torch.cat(grows) if grows else slots[:0]
        if self.restricted:
            grow = torch.unique(torch.cat([grow, zeros[_reaches_(g[zeros].abs(), grow_b, True)]]))
        grow = grow[~member(slots, grow)]
        adapt = torch.cat(adapts) if adapts else slots[:0]
        if self.adapt_k > 0:
            adapt = adapt[~member(slots, adapt)]
            zero_w = _reaches_((0.0 * g[zeros]).abs_(), adapt_b, False)  # W = 0: NaN G only fails
            adapt = torch.sort(torch.cat([adapt, zeros[zero_w]])).values
        return grow, adapt

    def wants_dense(self) -> bool:
        """Whether the next backward must hand over its full G (to choose from, and add)."""
        return self.pos is None and self.stride == 1

    def screen_stride(self) -> int:
        """s > 0: the next backward chooses the candidates from the G of every s-th token
        (`choose`), then samples its full G at them; 0: nothing to choose."""
        return self.stride if self.pos is None and self.stride > 1 else 0

    def _index_samples(self, slot_at: Optional[torch.Tensor] = None) -> None:
        """The positions the kernel samples (the non-slot candidates) and where they and the
        slots sit in `pos` (the slots do not move while a window is open)."""
        if slot_at is None:
            slot_at = torch.searchsorted(self.pos, self.d.local_index())
        self.slot_at = slot_at
        free = torch.ones(len(self.pos), dtype=torch.bool, device=self.pos.device)
        free[self.slot_at] = False
        self.sampled_at = torch.nonzero(free).reshape(-1)
        self.sampled = self.pos[self.sampled_at]

    def add(self, g: torch.Tensor) -> None:
        """One micro-batch's G over the whole shard (fp32, summed over ranks)."""
        if self.pos is None:
            self.choose(g)
        self.step.index_add_(0, self.sampled_at, g.index_select(0, self.sampled))

    def sample_positions(self) -> torch.Tensor:
        """This shard's non-slot candidates as sorted local positions (the slots' G is their
        δ-gradient, `end_step`)."""
        return self.sampled

    def add_sampled(self, v: torch.Tensor) -> None:
        """One micro-batch's G at `sample_positions()` (fp32, summed over ranks)."""
        self.step.index_add_(0, self.sampled_at, v)

    def end_step(self, scale: float, slot_grad: Optional[torch.Tensor] = None) -> None:
        """The step's G times `scale`; at the slots `slot_grad`, this shard's δ-gradients (the
        step's G there, already clipped by `scale`)."""
        if self.pos is None:  # a window step without a backward through this matrix
            return
        self.step.mul_(scale)
        if slot_grad is not None:
            self.step.index_add_(0, self.slot_at, slot_grad.to(torch.float32))
        self.sum += self.step
        self.sumsq.addcmul_(self.step, self.step)
        self.step.zero_()
        self.steps += 1

    # the index API topology updates use (seft/topology.py): an entry is an index into `pos`, so
    # the update finds slots, candidates and sums by indexing, not by searching positions
    def slot_index(self) -> torch.Tensor:
        """Where each slot (sorted) sits in `pos`: increasing."""
        return self.slot_at

    def grow_index(self) -> torch.Tensor:
        return torch.nonzero(self.sets & self.GROW).reshape(-1)

    def adapt_index(self) -> torch.Tensor:
        """The adapt set (sensitivity only), all in the support: chosen there, and drop and grow
        never take a position out of it."""
        return torch.nonzero(self.sets & self.ADAPT).reshape(-1)

    def grow_candidates(self) -> torch.Tensor:
        return self.pos[self.grow_index()]

    def adapt_candidates(self) -> Optional[torch.Tensor]:
        return self.pos[self.adapt_index()] if self.sensitivity else None

    def seed_at(self, i: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean gradient and mean squared gradient per step at entries `i`."""
        n = max(self.steps, 1)
        return self.sum.index_select(0, i) / n, self.sumsq.index_select(0, i) / n

    def state_dict(self) -> dict[str, torch.Tensor]:
        if self.pos is None:
            return {"steps": torch.tensor([self.steps])}
        return {"cand_pos": self.pos + self.d.offset, "cand_sum": self.sum, "cand_sumsq": self.sumsq,
                "cand_sets": self.sets, "steps": torch.tensor([self.steps])}

    def load_state_dict(self, sd: dict[str, torch.Tensor]) -> None:
        """This shard's part of a saved window (positions already cut to its range; the slots
        already loaded)."""
        self.steps = int(sd["steps"][0])
        if "cand_pos" not in sd:
            return
        dev = self.d.base.device
        self.pos = sd["cand_pos"].to(dev) - self.d.offset
        self.sum, self.sumsq = sd["cand_sum"].to(dev), sd["cand_sumsq"].to(dev)
        self.sets = sd["cand_sets"].to(dev)
        self.step = torch.zeros_like(self.sum)
        self._index_samples()


def open_window(d: SparseDelta, kind: str, n_grow: int, restricted: bool, sensitivity: bool,
                allreduce: Optional[Allreduce], per_grown: float = 2.0, screen_stride: int = 1):
    """The window scores of one matrix for an update that grows `n_grow` slots; `per_grown`
    non-slot candidates per grown slot (seft.window_candidates), chosen from the G of every
    `screen_stride`-th token (seft.window_screen_stride)."""
    if kind == "dense":
        return DenseWindow(d)
    if kind != "candidates":
        raise ValueError(f"window scores must be one of {WINDOW_SCORES}, got {kind!r}")
    grow_k = math.ceil(per_grown * n_grow)
    adapt_k = math.ceil(max(per_grown, 2.0) * n_grow) if sensitivity and not restricted else 0
    return CandidateWindow(d, grow_k, adapt_k, restricted, sensitivity, allreduce, screen_stride)
