"""SparseDelta: the SEFT state of one target matrix held by one rank.

The rank owns the contiguous flat range [offset, offset + length) of the matrix (the whole
matrix on one process, a ZeRO-3 partition, an FSDP2 row block); its slots, support and window
scores live in that range. Kernels that use the state are in seft/kernels.py.
"""
from __future__ import annotations

from typing import Optional

import torch


class SparseDelta:
    """Slots live with the rank that owns their position; slot arrays are sorted by global
    flat position."""

    def __init__(self, name: str, shape: tuple[int, int], offset: int, base: torch.Tensor,
                 budget: int, capacity: int, mask: Optional[torch.Tensor] = None):
        self.name = name
        self.shape = (int(shape[0]), int(shape[1]))
        self.offset = int(offset)
        self.base = base  # 1-D writable view of this rank's part of θ
        self.mask = (base != 0) if mask is None else mask  # the support M, same layout as base
        self.budget = int(budget)  # B: |M| over all ranks, fixed for the whole run
        self.capacity = int(capacity)  # K: slots over all ranks
        dev = base.device
        self.pos = torch.empty(0, dtype=torch.int64, device=dev)  # global flat positions (sorted)
        self.values = torch.zeros(0, dtype=torch.float32, device=dev, requires_grad=True)  # δ
        self.exp_avg = torch.zeros(0, dtype=torch.float32, device=dev)
        self.exp_avg_sq = torch.zeros(0, dtype=torch.float32, device=dev)
        self.age = torch.zeros(0, dtype=torch.int32, device=dev)  # optimizer steps seen by each slot
        self.grad_acc: Optional[torch.Tensor] = None  # dense G over this shard, windows only
        # where θ differs from the starting model (merged drops, adapt prunes): a checkpoint stores
        # θ there only. A bitmap, not a position list, so it never outgrows the shard.
        self.edited = torch.zeros(base.numel(), dtype=torch.bool, device=dev)

    @property
    def numel(self) -> int:
        return self.shape[0] * self.shape[1]

    @property
    def length(self) -> int:
        return self.base.numel()

    def local_index(self, pos: Optional[torch.Tensor] = None) -> torch.Tensor:
        return (self.pos if pos is None else pos) - self.offset

    def effective(self) -> torch.Tensor:
        """W = θ + S on this shard, fp32 (used for sensitivity scores and export)."""
        w = self.base.detach().to(torch.float32).clone()
        w.index_add_(0, self.local_index(), self.values.detach())
        return w

    def _set_slots(self, pos, values, exp_avg, exp_avg_sq, age) -> None:
        order = torch.argsort(pos)
        self.pos = pos[order].contiguous()
        self.values = values[order].detach().clone().requires_grad_(True)
        self.exp_avg, self.exp_avg_sq, self.age = exp_avg[order], exp_avg_sq[order], age[order]

    def keep_slots(self, keep: torch.Tensor) -> None:
        """Remove every slot where `keep` is False."""
        self._set_slots(self.pos[keep], self.values.detach()[keep], self.exp_avg[keep],
                        self.exp_avg_sq[keep], self.age[keep])

    def add_slots(self, pos: torch.Tensor, exp_avg: torch.Tensor, exp_avg_sq: torch.Tensor,
                  age: torch.Tensor) -> None:
        """New slots at `pos` (must be free), δ = 0, with the given optimizer state."""
        self._set_slots(torch.cat([self.pos, pos]),
                        torch.cat([self.values.detach(), torch.zeros(len(pos), device=pos.device)]),
                        torch.cat([self.exp_avg, exp_avg]), torch.cat([self.exp_avg_sq, exp_avg_sq]),
                        torch.cat([self.age, age]))

    def record_edits(self, pos: torch.Tensor) -> None:
        """θ was changed at these global positions."""
        self.edited[pos - self.offset] = True

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Everything needed to resume: slots, optimizer state, support, edits of θ, window G."""
        edited = torch.nonzero(self.edited).reshape(-1)
        out = {"pos": self.pos, "values": self.values.detach(), "exp_avg": self.exp_avg,
               "exp_avg_sq": self.exp_avg_sq, "age": self.age, "mask": self.mask,
               "edited": edited + self.offset, "edited_values": self.base[edited].detach().clone()}
        if self.grad_acc is not None:
            out["grad_acc"] = self.grad_acc
        return out

    def load_state_dict(self, sd: dict[str, torch.Tensor]) -> None:
        self._set_slots(sd["pos"], sd["values"], sd["exp_avg"], sd["exp_avg_sq"], sd["age"])
        self.mask.copy_(sd["mask"])
        idx = sd["edited"] - self.offset
        self.edited.zero_()
        self.edited[idx] = True
        with torch.no_grad():
            self.base[idx] = sd["edited_values"].to(self.base.dtype)
        self.grad_acc = sd["grad_acc"].clone() if "grad_acc" in sd else None
