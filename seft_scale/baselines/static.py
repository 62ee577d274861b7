"""Static-mask sparse fine-tuning: every nonzero of the targets trainable, the starting mask
re-applied to gradients (before the step) and to weights and Adam moments (after it), so nothing
outside the support ever moves."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import torch

from seft_scale.baselines.common import TorchOptimMethod


class StaticMethod(TorchOptimMethod):
    name = "static"

    def build(self):
        for _, lin in self.targets:
            lin.weight.requires_grad_(True)
        return [(f"{name}.weight", lin.weight) for name, lin in self.targets]

    def after_backward(self, step: int, lr: float) -> dict:
        for name, lin in self.targets:
            if lin.weight.grad is not None:
                lin.weight.grad.mul_(self.masks[name])
        rec = super().after_backward(step, lr)
        with torch.no_grad():
            for name, lin in self.targets:
                lin.weight.mul_(self.masks[name])
                for v in self.opt.state.get(lin.weight, {}).values():
                    if v.shape == lin.weight.shape:
                        v.mul_(self.masks[name])
        return rec

    def merge(self, start_dir: Optional[Path]) -> dict:
        for _, lin in self.targets:
            lin.weight.requires_grad_(False)
        return self.report(self.model, start_dir)

    def local_counts(self) -> tuple[int, int]:
        """Only the support trains (the mask zeroes every other gradient): B values, not d_out·d_in."""
        budget = sum(self.budgets.values())
        return budget, budget
