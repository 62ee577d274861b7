"""Slot-aware AdamW: torch's AdamW arithmetic with a per-slot step count (`age`).

Slots change place at every topology update, so one global step count would bias-correct a new
slot as if it had a long history. Each slot carries its own age instead. A new slot's moments are
seeded from the selection window, as SpIEL's SftAdamW does: as if it had seen the window's steps,
m from the mean gradient and v from the mean *squared* gradient, so m̂ = mean g and v̂ = mean g²
from the first step on. With the mean of squares (never below the squared mean) the first step of
a slot whose gradient changed sign over the window is smaller than lr; seeding v with the squared
mean would make every new slot's first step exactly ±lr. The window's gradients are on the clipped
scale of the δ-gradients (seft/window.py), so seeded and later steps agree.

Seeded or not, Adam's first steps are about ±lr per slot, and grown slots sit where the window's
gradient was largest: a quarter of the slots taking such steps at once raised the demo model's loss
one and two steps after each update (README's Results). So a grown slot's lr ramps linearly over
`slot_warmup` steps (its `since_grown` count); the initial slots follow the run's own warm-up.
"""
from __future__ import annotations

import math
from typing import Optional, Sequence

import torch

from seft_scale.seft.delta import SETTLED, SparseDelta
from seft_scale.seft.selection import Allreduce


# beyond this many steps the bias corrections are looked up from no table (beta ~ 1): pow per slot
_TABLE_MAX = 1 << 22


def _bias_tables(beta: float) -> Optional[tuple[torch.Tensor, torch.Tensor]]:
    """(1 - β^a, sqrt(1 - β^a)) in fp32 for ages a = 0 .. L-1, computed in fp64 as the per-slot
    formula would be; from age L on β^a < 2^-25, so both round to exactly 1.0 in fp32 and a clamped
    age gives the same bits. A gather of K instead of two fp64 pows of K per matrix and step
    (~10 ms each at K = 483K on one CPU thread). None if L would be huge (β within ~1e-6 of 1)."""
    L = 2 if beta == 0 else 1 + math.ceil(-25 * math.log(2) / math.log(beta))
    if L > _TABLE_MAX:
        return None
    c = 1 - beta ** torch.arange(L, dtype=torch.float64)
    return c.to(torch.float32), c.sqrt().to(torch.float32)


class SlotAdamW:
    def __init__(self, lr: float, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 0.0, slot_warmup: int = 0):
        self.lr, self.betas, self.eps, self.weight_decay = lr, betas, eps, weight_decay
        # a grown slot's lr ramp min(1, steps since grown / slot_warmup): see SeftConfig.slot_warmup
        self.slot_warmup = slot_warmup
        self._tables = (_bias_tables(betas[0]), _bias_tables(betas[1]))
        self._on: dict[torch.device, tuple] = {}  # the tables on each device the slots live on

    def _corrections(self, age: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(1 - β1^age, sqrt(1 - β2^age)) per slot, fp32."""
        t1, t2 = self._tables
        if t1 is None or t2 is None:
            b1, b2 = self.betas
            a = age.to(torch.float64)
            return (1 - b1 ** a).to(torch.float32), (1 - b2 ** a).sqrt().to(torch.float32)
        if age.device not in self._on:
            self._on[age.device] = (t1[0].to(age.device), t2[1].to(age.device))
        c1, c2 = self._on[age.device]
        return (c1.index_select(0, age.clamp(max=len(c1) - 1)),
                c2.index_select(0, age.clamp(max=len(c2) - 1)))

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
            p.mul_(1 - lr * self.weight_decay)
            d.exp_avg.lerp_(g, 1 - b1)
            d.exp_avg_sq.mul_(b2).addcmul_(g, g, value=1 - b2)
            bc1, bc2_sqrt = self._corrections(d.age)
            denom = (d.exp_avg_sq.sqrt() / bc2_sqrt).add_(self.eps)
            if self.slot_warmup > 0:  # a grown slot's lr ramp, folded into bc1
                d.since_grown.add_(d.since_grown < SETTLED)
                bc1.div_(d.since_grown.to(torch.float32).div_(self.slot_warmup).clamp_(max=1.0))
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
