"""SparseDelta: the SEFT state of one target matrix held by one rank.

The rank owns the contiguous flat range [offset, offset + length) of the matrix (the whole
matrix on one process, a ZeRO-3 partition, an FSDP2 row block); its slots, support and window
scores live in that range. Kernels that use the state are in seft/kernels.py.

Nothing here costs a byte per weight (70B shapes: a byte per weight of the shard is ~8 GiB):
* the support M is derived, not stored: M = {θ ≠ 0} ∪ {slot positions} ∪ `zeros`, where `zeros`
  lists the rare support positions whose θ became exactly 0 without a slot (a dropped slot whose
  merged value rounded to 0, or a discarded one on a reactivated position);
* the record of θ's edits (merged drops, adapt prunes, needed to checkpoint θ as edits of the
  starting model) is a bitmap, a bit per weight, kept in host memory (touched at updates only).
"""
from __future__ import annotations

from typing import Optional

import torch

SETTLED = torch.iinfo(torch.int16).max  # since_grown of a slot past any ramp (it saturates there)


def member(sorted_ref: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Whether each element of `x` is in the sorted 1-D `sorted_ref` (a binary search each:
    cheaper than torch.isin, which sorts both sides)."""
    if len(sorted_ref) == 0:
        return torch.zeros(x.shape, dtype=torch.bool, device=x.device)
    at = torch.searchsorted(sorted_ref, x).clamp_(max=len(sorted_ref) - 1)
    return sorted_ref[at] == x


class Bitmap:
    """One bit per position of a range, in host memory."""

    def __init__(self, length: int):
        self.length = length
        self.bits = torch.zeros((length + 7) // 8, dtype=torch.uint8)

    def set(self, idx: torch.Tensor) -> None:
        """Set the bits at local positions `idx` (any device, duplicates allowed)."""
        idx = torch.unique(idx.reshape(-1).to("cpu", torch.int64))
        if len(idx) == 0:
            return
        byte, bit = idx >> 3, (idx & 7).to(torch.uint8)
        uniq, inv = torch.unique(byte, return_inverse=True)
        add = torch.zeros(len(uniq), dtype=torch.int32).index_add_(0, inv, (1 << bit.int()))
        self.bits[uniq] |= add.to(torch.uint8)

    def positions(self) -> torch.Tensor:
        """The set local positions, sorted (int64, host)."""
        nz = torch.nonzero(self.bits).reshape(-1)
        vals = self.bits[nz].to(torch.int64)
        bits = (vals[:, None] >> torch.arange(8)) & 1
        return (nz[:, None] * 8 + torch.arange(8))[bits.bool()]

    def clear(self) -> None:
        self.bits.zero_()


class SparseDelta:
    """Slots live with the rank that owns their position; slot arrays are sorted by global
    flat position."""

    def __init__(self, name: str, shape: tuple[int, int], offset: int, base: torch.Tensor,
                 budget: int = -1, capacity: int = -1):
        self.name = name
        self.shape = (int(shape[0]), int(shape[1]))
        self.offset = int(offset)
        self.base = base  # 1-D writable view of this rank's part of θ
        self.budget = int(budget)  # B: |M| over all ranks, fixed for the whole run
        self.capacity = int(capacity)  # K: slots over all ranks
        dev = base.device
        self.pos = torch.empty(0, dtype=torch.int64, device=dev)  # global flat positions (sorted)
        self.values = torch.zeros(0, dtype=torch.float32, device=dev, requires_grad=True)  # δ
        self.exp_avg = torch.zeros(0, dtype=torch.float32, device=dev)
        self.exp_avg_sq = torch.zeros(0, dtype=torch.float32, device=dev)
        self.age = torch.zeros(0, dtype=torch.int32, device=dev)  # optimizer steps seen by each slot
        # optimizer steps since a topology update grew the slot (seft.slot_warmup's ramp); the
        # initial slots start at SETTLED: they follow train.warmup_steps instead
        self.since_grown = torch.zeros(0, dtype=torch.int16, device=dev)
        self.zeros = torch.empty(0, dtype=torch.int64, device=dev)  # global; see the module doc
        self.edited = Bitmap(base.numel())  # where θ differs from the starting model
        self.window = None  # selection-window scores (seft/window.py), in windows only
        self._support_count: Optional[int] = None  # |M| on this shard, kept by the edits below

    @property
    def numel(self) -> int:
        return self.shape[0] * self.shape[1]

    @property
    def length(self) -> int:
        return self.base.numel()

    def local_index(self, pos: Optional[torch.Tensor] = None) -> torch.Tensor:
        return (self.pos if pos is None else pos) - self.offset

    def support(self) -> torch.Tensor:
        """The support M over this shard (bool, a transient of the shard's length)."""
        m = self.base != 0
        m[self.local_index()] = True
        m[self.zeros - self.offset] = True
        return m

    def support_count(self) -> int:
        """|M| on this shard: counted once (init, resume), then kept up to date by add_slots,
        remove_slots and prune, so a topology update needs no pass over the shard for it
        (check_budget recounts and compares)."""
        if self._support_count is None:
            self._support_count = int(self.support().sum())
        return self._support_count

    def in_support(self, idx: torch.Tensor, slots: bool = True) -> torch.Tensor:
        """Whether each local position of `idx` is in the support (no shard-sized transient);
        slots=False: the caller knows that none of them holds a slot (no search of K)."""
        pos = idx + self.offset
        inside = (self.base[idx] != 0) | member(self.zeros, pos)
        return inside | member(self.pos, pos) if slots else inside

    def weights_at(self, idx: torch.Tensor) -> torch.Tensor:
        """W = θ + S at local positions `idx`, fp32."""
        w = self.base[idx].detach().to(torch.float32)
        if len(self.pos):
            pos = idx + self.offset
            at = torch.searchsorted(self.pos, pos).clamp_(max=len(self.pos) - 1)
            hit = self.pos[at] == pos
            w[hit] += self.values.detach()[at[hit]]
        return w

    def strided(self, stride: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(in support, W fp32, holds a slot) at local positions 0, stride, 2·stride, ...:
        O(K + n/stride), the slots and zeros on the sample found by their remainder, not by search."""
        w = self.base.detach()[::stride].to(torch.float32, copy=True)  # never a view of θ
        m = w != 0
        slot = torch.zeros_like(m)
        idx = self.local_index()
        on = idx % stride == 0
        w[idx[on] // stride] += self.values.detach()[on]
        m[idx[on] // stride] = True
        slot[idx[on] // stride] = True
        z = self.zeros - self.offset
        m[z[z % stride == 0] // stride] = True
        return m, w, slot

    def effective(self) -> torch.Tensor:
        """W = θ + S on this shard, fp32 (used for sensitivity scores and checks)."""
        w = self.base.detach().to(torch.float32).clone()
        w.index_add_(0, self.local_index(), self.values.detach())
        return w

    def _set_slots(self, pos, values, exp_avg, exp_avg_sq, age, since_grown) -> None:
        order = torch.argsort(pos)
        take = (lambda t: t.index_select(0, order))  # 4x faster than t[order] on CPU at K ~ 500K
        self.pos = take(pos)
        self.values = take(values.detach()).requires_grad_(True)
        self.exp_avg, self.exp_avg_sq, self.age = take(exp_avg), take(exp_avg_sq), take(age)
        self.since_grown = take(since_grown)

    def keep_slots(self, keep: torch.Tensor) -> None:
        """Remove every slot where `keep` is False (what is kept stays sorted). A freed slot on a
        θ == 0 position that is not listed in `zeros` leaves the support: counted again."""
        self._support_count = None
        idx = torch.nonzero(keep).reshape(-1)  # once for the six arrays, each an index_select
        take = (lambda t: t.index_select(0, idx))
        self.pos = take(self.pos)
        self.values = take(self.values.detach()).requires_grad_(True)
        self.exp_avg, self.exp_avg_sq, self.age = take(self.exp_avg), take(self.exp_avg_sq), take(self.age)
        self.since_grown = take(self.since_grown)

    def add_slots(self, pos: torch.Tensor, exp_avg: torch.Tensor, exp_avg_sq: torch.Tensor,
                  age: torch.Tensor, entering: Optional[int] = None) -> None:
        """New slots at `pos` (must be free), δ = 0, with the given optimizer state; `entering`:
        how many of them lie outside the support, if the caller has counted it. Slots whose moments
        were seeded from a window (age > 0) are grown: their since_grown count starts at 0."""
        if self._support_count is not None:
            if entering is None:
                entering = int((~self.in_support(pos - self.offset, slots=False)).sum())
            self._support_count += entering
        since = torch.where(age > 0, 0, SETTLED).to(torch.int16)
        self._set_slots(torch.cat([self.pos, pos]),
                        torch.cat([self.values.detach(), torch.zeros(len(pos), device=pos.device)]),
                        torch.cat([self.exp_avg, exp_avg]), torch.cat([self.exp_avg_sq, exp_avg_sq]),
                        torch.cat([self.age, age]), torch.cat([self.since_grown, since]))

    @torch.no_grad()
    def remove_slots(self, drop: torch.Tensor, merge: bool) -> None:
        """Free the slots where `drop` is True, their δ merged into θ (or discarded). A position
        they leave at θ == 0 stays in the support (it is listed in `zeros`)."""
        idx = self.local_index()[drop]
        if merge:
            self.base[idx] = (self.base[idx].to(torch.float32) + self.values.detach()[drop]) \
                .to(self.base.dtype)
            self.edited.set(idx)
        gone = idx[self.base[idx] == 0] + self.offset
        if len(gone):
            self.zeros = torch.unique(torch.cat([self.zeros, gone]))
        count = self._support_count  # every freed position stays in M (θ ≠ 0, or listed)
        self.keep_slots(~drop)
        self._support_count = count

    @torch.no_grad()
    def prune(self, idx: torch.Tensor) -> None:
        """Remove local positions `idx` (unique) from the support: θ = 0 there, slots there freed."""
        count = self._support_count
        if count is not None:
            count -= int(self.in_support(idx).sum())
        self.base[idx] = 0
        self.edited.set(idx)
        pos = torch.sort(idx + self.offset).values
        self.zeros = self.zeros[~member(pos, self.zeros)]
        self.keep_slots(~member(pos, self.pos))
        self._support_count = count

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Everything needed to resume: slots, optimizer state, support exceptions, θ's edits
        (positions and values) and the window scores (seft/window.py)."""
        edited = self.edited.positions().to(self.base.device)
        out = {"pos": self.pos, "values": self.values.detach(), "exp_avg": self.exp_avg,
               "exp_avg_sq": self.exp_avg_sq, "age": self.age, "since_grown": self.since_grown,
               "zeros": self.zeros,
               "edited": edited + self.offset, "edited_values": self.base[edited].detach().clone()}
        if self.window is not None:
            out.update({f"window.{k}": v for k, v in self.window.state_dict().items()})
        return out

    @torch.no_grad()
    def load_state_dict(self, sd: dict[str, torch.Tensor]) -> None:
        """Slots, exceptions and edits of this shard (already cut to its range)."""
        since = sd.get("since_grown")  # absent from checkpoints older than the field: settled
        if since is None:
            since = torch.full_like(sd["age"], SETTLED, dtype=torch.int16)
        self._set_slots(sd["pos"], sd["values"], sd["exp_avg"], sd["exp_avg_sq"], sd["age"], since)
        self.zeros = sd["zeros"]
        idx = sd["edited"] - self.offset
        self.edited.clear()
        self.edited.set(idx)
        self.base[idx] = sd["edited_values"].to(self.base.dtype)
        self._support_count = None
