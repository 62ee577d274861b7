"""Slot-aware AdamW: torch's AdamW arithmetic with a per-slot step count (`age`).

Slots change place at every topology update, so one global step count would bias-correct a new
slot as if it had a long history. Each slot carries its own age instead. A new slot's moments are
seeded from the mean dense gradient of the selection window, as SpIEL's SftAdamW does: as if it had
seen that gradient for the `window` steps, so m̂ equals that mean from the first step on. We keep
this (rather than zeros) because the window gradient is already on hand and it avoids a first
update driven by a single noisy gradient.
"""
from __future__ import annotations

import math
from typing import Optional, Sequence

import torch

from seft_scale.seft.delta import SparseDelta
from seft_scale.seft.selection import Allreduce


class SlotAdamW:
    def __init__(self, lr: float, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 0.0):
        self.lr, self.betas, self.eps, self.weight_decay = lr, betas, eps, weight_decay

    def seed(self, mean_grad: torch.Tensor, window: int):
        """(exp_avg, exp_avg_sq, age) for new slots whose window gradient mean is `mean_grad`."""
        b1, b2 = self.betas
        if window <= 0:
            z = torch.zeros_like(mean_grad, dtype=torch.float32)
            return z, z.clone(), torch.zeros(len(mean_grad), dtype=torch.int32, device=z.device)
        g = mean_grad.to(torch.float32)
        return (g * (1 - b1 ** window), g * g * (1 - b2 ** window),
                torch.full((len(g),), window, dtype=torch.int32, device=g.device))

    @torch.no_grad()
    def step(self, deltas: Sequence[SparseDelta], lr: Optional[float] = None) -> None:
        lr = self.lr if lr is None else lr
        b1, b2 = self.betas
        for d in deltas:
            g = d.values.grad
            if g is None or len(d.pos) == 0:
                continue
            p = d.values
            d.age += 1
            age = d.age.to(torch.float64)
            p.mul_(1 - lr * self.weight_decay)
            d.exp_avg.lerp_(g, 1 - b1)
            d.exp_avg_sq.mul_(b2).addcmul_(g, g, value=1 - b2)
            bc1 = (1 - b1 ** age).to(torch.float32)
            bc2_sqrt = (1 - b2 ** age).sqrt().to(torch.float32)
            denom = (d.exp_avg_sq.sqrt() / bc2_sqrt).add_(self.eps)
            p.addcdiv_(d.exp_avg, denom * bc1, value=-lr)
            p.grad = None

    @staticmethod
    def zero_grad(deltas: Sequence[SparseDelta]) -> None:
        for d in deltas:
            d.values.grad = None


def clip_slot_grads(deltas: Sequence[SparseDelta], max_norm: float,
                    allreduce: Optional[Allreduce] = None) -> float:
    """Clip the global L2 norm of all δ-gradients (each slot's gradient lives on one rank).
    Returns the norm before clipping."""
    sq = torch.zeros(1, dtype=torch.float64)
    for d in deltas:
        if d.values.grad is not None:
            sq += d.values.grad.to(torch.float64).pow(2).sum().cpu()
    if allreduce is not None:
        sq = allreduce(sq)
    norm = math.sqrt(float(sq))
    if max_norm > 0 and norm > max_norm:
        scale = max_norm / (norm + 1e-6)
        for d in deltas:
            if d.values.grad is not None:
                d.values.grad.mul_(scale)
    return norm
