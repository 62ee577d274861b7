"""Slot-aware AdamW: torch's AdamW arithmetic with a per-slot step count (`age`).

Slots change place at every topology update, so one global step count would bias-correct a new
slot as if it had a long history. Each slot carries its own age instead. A new slot's moments are
seeded from the selection window, as SpIEL's SftAdamW does: as if it had seen the window's steps,
m from the mean gradient and v from the mean *squared* gradient, so m̂ = mean g and v̂ = mean g²
from the first step on. With the mean of squares (never below the squared mean) the first step of
a slot whose gradient changed sign over the window is smaller than lr; seeding v with the squared
mean would make every new slot's first step exactly ±lr. The window's gradients are on the clipped
scale of the δ-gradients (seft/window.py), so seeded and later steps agree.
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

    def seed(self, mean_grad: torch.Tensor, mean_sq: torch.Tensor, steps: int):
        """(exp_avg, exp_avg_sq, age) for new slots that saw `steps` window steps with these mean
        gradients and mean squared gradients (steps 0: fresh state)."""
        b1, b2 = self.betas
        if steps <= 0:
            z = torch.zeros_like(mean_grad, dtype=torch.float32)
            return z, z.clone(), torch.zeros(len(mean_grad), dtype=torch.int32, device=z.device)
        g, g2 = mean_grad.to(torch.float32), mean_sq.to(torch.float32)
        return (g * (1 - b1 ** steps), g2 * (1 - b2 ** steps),
                torch.full((len(g),), steps, dtype=torch.int32, device=g.device))

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
                    allreduce: Optional[Allreduce] = None) -> tuple[float, float]:
    """Clip the global L2 norm of all δ-gradients (each slot's gradient lives on one rank).
    Returns (the norm before clipping, the factor the gradients were scaled by). One host sync
    per step (the norm), not one per matrix."""
    grads = [d.values.grad for d in deltas if d.values.grad is not None and len(d.values.grad)]
    if grads:
        sq = torch.stack([g.to(torch.float64).pow(2).sum() for g in grads]).sum().reshape(1)
    else:
        sq = torch.zeros(1, dtype=torch.float64, device=deltas[0].base.device if deltas else "cpu")
    if allreduce is not None:
        sq = allreduce(sq)
    norm = math.sqrt(float(sq))
    scale = max_norm / (norm + 1e-6) if max_norm > 0 and norm > max_norm else 1.0
    if scale != 1.0:
        torch._foreach_mul_(grads, scale)
    return norm, scale
