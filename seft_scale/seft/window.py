"""Selection-window scores: what grow and adapt rank by, gathered over the A steps before an update.

Grow ranks positions by |Σ_t G_t| (G the dense weight gradient, summed over micro-batches and
ranks; SpIEL's accumulated gradient), adapt by the sensitivity |W·Σ_t G_t|; new slots' Adam
moments are seeded from the window's mean gradient and mean squared gradient. Each step's G
enters on the scale the δ-gradients are clipped to (the step's clip coefficient), so seeds and
later updates agree (`end_step`).

Two ways to keep them (`seft.window_scores`):

* ``candidates`` (default): at the window's first micro-batch, every target keeps bounded
  candidate sets chosen by an exact global top-k of that micro-batch's G — the K positions of
  largest |G| for grow (the approach of SpIEL's SftSelector, Ansell et al. 2024) and, when adapt
  ranks by sensitivity, the max(K, 2·n_grow) support positions of smallest |W·G| — and sums G
  (and G²) over the window at those positions only. Memory O(K) per matrix instead of O(n), and
  only that first micro-batch needs the dense G: later window steps sample G at the candidates
  by an SDDMM beside the slots' (seft/kernels.py). The sizes guarantee enough: at least n_grow candidates
  without a remaining slot, and at least the overshoot after excluding the positions just grown.
  The candidates come from the first micro-batch, so runs that split a global batch into
  different micro-batches (ranks x accumulation) choose from different first micro-batches.
* ``dense``: fp32 sums over the whole shard (Σ G, Σ G² and the current step's G: 12 B per weight
  of the shard while a window is open): the exact reference for the ablation.

Either way every choice is an exact global top-k (seft/selection.py), so the same inputs give the
same positions at any world size.
"""
from __future__ import annotations

from typing import Optional

import torch

from seft_scale.seft.delta import SparseDelta, member
from seft_scale.seft.selection import Allreduce, sample_stride, sampled_bound, select_topk

WINDOW_SCORES = ("candidates", "dense")
SCAN_BLOCK = 1 << 18  # positions per block of the candidate scan: its scores stay in cache


def _reaches(scores: torch.Tensor, bound: Optional[float], largest: bool) -> torch.Tensor:
    """Scores at least as good as `bound` (None: every score); never a NaN."""
    if bound is None:
        return scores == scores
    return scores >= bound if largest else scores <= bound


class DenseWindow:
    """fp32 sums over the whole shard."""

    def __init__(self, d: SparseDelta):
        self.sum = torch.zeros(d.length, dtype=torch.float32, device=d.base.device)
        self.sumsq = torch.zeros_like(self.sum)
        self.step = torch.zeros_like(self.sum)
        self.steps = 0

    def wants_dense(self) -> bool:
        return True

    def add(self, g: torch.Tensor) -> None:
        """One micro-batch's G over the shard (fp32, summed over ranks)."""
        self.step.add_(g)

    def end_step(self, scale: float) -> None:
        self.step.mul_(scale)
        self.sum.add_(self.step)
        self.sumsq.addcmul_(self.step, self.step)
        self.step.zero_()
        self.steps += 1

    def grow_candidates(self) -> torch.Tensor:
        return torch.arange(len(self.sum), device=self.sum.device)

    def adapt_candidates(self) -> Optional[torch.Tensor]:
        return torch.arange(len(self.sum), device=self.sum.device)

    def grad_sum(self, idx: torch.Tensor, adapt: bool = False) -> torch.Tensor:
        return self.sum[idx]

    def seed_stats(self, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean gradient and mean squared gradient per step at local positions `idx`."""
        n = max(self.steps, 1)
        return self.sum[idx] / n, self.sumsq[idx] / n

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {"sum": self.sum, "sumsq": self.sumsq, "steps": torch.tensor([self.steps])}

    def load_state_dict(self, sd: dict[str, torch.Tensor]) -> None:
        """This shard's part of a saved window (already cut to its range)."""
        self.steps = int(sd["steps"][0])
        self.sum.copy_(sd["sum"])
        self.sumsq.copy_(sd["sumsq"])


class CandidateWindow:
    """Sums at bounded candidate sets, chosen at the window's first micro-batch."""

    def __init__(self, d: SparseDelta, grow_k: int, adapt_k: int, restricted: bool,
                 allreduce: Optional[Allreduce]):
        self.d, self.grow_k, self.adapt_k = d, grow_k, adapt_k
        self.restricted, self.allreduce = restricted, allreduce
        self.grow_idx: Optional[torch.Tensor] = None  # local positions, sorted
        self.adapt_idx: Optional[torch.Tensor] = None
        self.steps = 0

    def _choose(self, g: torch.Tensor) -> None:
        """The candidate sets from the first micro-batch's G (every rank calls it for the same
        matrix in the same backward, so the exact global top-k can all-reduce). Both come from
        one pass over the shard in cache-sized blocks that keeps only the scores reaching a bound
        taken from a strided sample (seft/selection.py): G and θ are read from memory once and
        nothing of the shard's size is allocated; the top-k over what passes is the top-k over
        the whole shard. A NaN in G (it comes with a non-finite loss or gradient norm, which
        stops the run after this backward, train.py) makes no candidate: no comparison passes it."""
        d = self.d
        stride = sample_stride(d.length)
        in_s, w_s = d.strided(stride)
        g_s = g[::stride]
        grow_s = (g_s if not self.restricted else g_s[in_s]).abs()
        grow_b = sampled_bound(grow_s[grow_s == grow_s], self.grow_k, stride, largest=True)
        adapt_b = None
        if self.adapt_k > 0:  # sensitivity |W·G| on the support, W = θ + S
            adapt_s = (w_s[in_s] * g_s[in_s]).abs_()
            adapt_b = sampled_bound(adapt_s[adapt_s == adapt_s], self.adapt_k, stride, largest=False)
        grow, adapt = self._scan(g, grow_b, adapt_b)
        grow_missed = len(grow) < self.grow_k and grow_b is not None
        adapt_missed = adapt is not None and len(adapt) < self.adapt_k and adapt_b is not None
        if grow_missed or adapt_missed:  # the sample misled: scan again without that bound
            grow, adapt = self._scan(g, None if grow_missed else grow_b, None if adapt_missed else adapt_b)
        sel = select_topk([g[grow].abs()], [grow + d.offset], [self.grow_k], True, self.allreduce)[0]
        self.grow_idx = grow[sel]
        if adapt is not None:
            score = (d.weights_at(adapt) * g[adapt]).abs_()
            sel = select_topk([score], [adapt + d.offset], [self.adapt_k], False, self.allreduce)[0]
            self.adapt_idx = adapt[sel]
        self.grow_sum = torch.zeros(len(self.grow_idx), dtype=torch.float32, device=g.device)
        self.grow_sumsq, self.grow_step = torch.zeros_like(self.grow_sum), torch.zeros_like(self.grow_sum)
        if self.adapt_idx is not None:
            self.adapt_sum = torch.zeros(len(self.adapt_idx), dtype=torch.float32, device=g.device)
            self.adapt_step = torch.zeros_like(self.adapt_sum)
        self._index_samples()

    def _scan(self, g: torch.Tensor, grow_b: Optional[float],
              adapt_b: Optional[float]) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        """(grow, adapt) candidates as sorted local positions: positions with |G| >= grow_b
        (support positions only if restricted) and support positions with |W·G| <= adapt_b
        (None: no bound; adapt only with adapt_k > 0). The blocks score W as θ and the support
        as θ ≠ 0; the exceptions, slot positions (W = θ + δ) and listed zeros, are scored apart."""
        d = self.d
        theta = d.base.detach()
        grows, adapts = [], []
        for lo in range(0, d.length, SCAN_BLOCK):
            gb, t = g[lo:lo + SCAN_BLOCK], theta[lo:lo + SCAN_BLOCK].to(torch.float32)
            a = gb.abs()
            m = _reaches(a, grow_b, True)
            if self.restricted:
                m &= t != 0
            grows.append(torch.nonzero(m).reshape(-1) + lo)
            if self.adapt_k > 0:
                m = _reaches(a.mul_(t.abs()), adapt_b, False) & (t != 0)  # |θ|·|G| == |θ·G|
                adapts.append(torch.nonzero(m).reshape(-1) + lo)
        apart = torch.unique(torch.cat([d.local_index(), d.zeros - d.offset]))
        grow = torch.cat(grows) if grows else apart[:0]
        if self.restricted:  # support positions with θ == 0
            grow = torch.unique(torch.cat([grow, apart[_reaches(g[apart].abs(), grow_b, True)]]))
        if self.adapt_k <= 0:
            return grow, None
        adapt = torch.cat(adapts) if adapts else apart[:0]
        adapt = adapt[~member(apart, adapt)]
        score = (d.weights_at(apart) * g[apart]).abs_()
        return grow, torch.sort(torch.cat([adapt, apart[_reaches(score, adapt_b, False)]])).values

    def wants_dense(self) -> bool:
        return self.grow_idx is None  # choosing the candidates needs every position's G once

    def add(self, g: torch.Tensor) -> None:
        """One micro-batch's G over the whole shard (fp32, summed over ranks)."""
        if self.grow_idx is None:
            self._choose(g)
        self.grow_step += g[self.grow_idx]
        if self.adapt_idx is not None:
            self.adapt_step += g[self.adapt_idx]

    def sample_positions(self) -> torch.Tensor:
        """This shard's candidates (grow ∪ adapt) as sorted local positions."""
        return self.sampled

    def add_sampled(self, v: torch.Tensor) -> None:
        """One micro-batch's G at `sample_positions()` (fp32, summed over ranks)."""
        self.grow_step += v[self.grow_at]
        if self.adapt_idx is not None:
            self.adapt_step += v[self.adapt_at]

    def _index_samples(self) -> None:
        """The sampled positions (grow ∪ adapt) and where each set sits in them."""
        both = self.grow_idx if self.adapt_idx is None else torch.cat([self.grow_idx, self.adapt_idx])
        self.sampled = torch.unique(both)
        self.grow_at = torch.searchsorted(self.sampled, self.grow_idx)
        if self.adapt_idx is not None:
            self.adapt_at = torch.searchsorted(self.sampled, self.adapt_idx)

    def end_step(self, scale: float) -> None:
        if self.grow_idx is None:  # a window step without a backward through this matrix
            return
        self.grow_step.mul_(scale)
        self.grow_sum += self.grow_step
        self.grow_sumsq.addcmul_(self.grow_step, self.grow_step)
        self.grow_step.zero_()
        if self.adapt_idx is not None:
            self.adapt_sum.add_(self.adapt_step, alpha=scale)
            self.adapt_step.zero_()
        self.steps += 1

    def grow_candidates(self) -> torch.Tensor:
        return self.grow_idx

    def adapt_candidates(self) -> Optional[torch.Tensor]:
        return self.adapt_idx

    def grad_sum(self, idx: torch.Tensor, adapt: bool = False) -> torch.Tensor:
        """Σ G at local positions `idx`, which must be candidates of the set asked for."""
        cand, total = (self.adapt_idx, self.adapt_sum) if adapt else (self.grow_idx, self.grow_sum)
        return total[torch.searchsorted(cand, idx)]

    def seed_stats(self, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        at = torch.searchsorted(self.grow_idx, idx)
        n = max(self.steps, 1)
        return self.grow_sum[at] / n, self.grow_sumsq[at] / n

    def state_dict(self) -> dict[str, torch.Tensor]:
        if self.grow_idx is None:
            return {"steps": torch.tensor([self.steps])}
        out = {"grow_pos": self.grow_idx + self.d.offset, "grow_sum": self.grow_sum,
               "grow_sumsq": self.grow_sumsq, "steps": torch.tensor([self.steps])}
        if self.adapt_idx is not None:
            out.update(adapt_pos=self.adapt_idx + self.d.offset, adapt_sum=self.adapt_sum)
        return out

    def load_state_dict(self, sd: dict[str, torch.Tensor]) -> None:
        """This shard's part of a saved window (positions already cut to its range)."""
        self.steps = int(sd["steps"][0])
        if "grow_pos" not in sd:
            return
        dev = self.d.base.device
        self.grow_idx = sd["grow_pos"].to(dev) - self.d.offset
        self.grow_sum, self.grow_sumsq = sd["grow_sum"].to(dev), sd["grow_sumsq"].to(dev)
        self.grow_step = torch.zeros_like(self.grow_sum)
        if "adapt_pos" in sd:
            self.adapt_idx = sd["adapt_pos"].to(dev) - self.d.offset
            self.adapt_sum = sd["adapt_sum"].to(dev)
            self.adapt_step = torch.zeros_like(self.adapt_sum)
        self._index_samples()


def open_window(d: SparseDelta, kind: str, n_grow: int, restricted: bool, sensitivity: bool,
                allreduce: Optional[Allreduce]):
    """The window scores of one matrix for an update that grows `n_grow` slots."""
    if kind == "dense":
        return DenseWindow(d)
    if kind != "candidates":
        raise ValueError(f"window scores must be one of {WINDOW_SCORES}, got {kind!r}")
    adapt_k = max(d.capacity, 2 * n_grow) if sensitivity and not restricted else 0
    return CandidateWindow(d, d.capacity, adapt_k, restricted, allreduce)
