"""Static-mask sparse fine-tuning: every nonzero of the targets trainable, nothing outside the
starting support ever moves (the gradient is masked before the step, the weights and Adam moments
after it).

Mixed precision as HF Transformers, PyTorch AMP and DeepSpeed's bf16 mode do it: when the model is
16-bit, the optimizer updates an fp32 master copy of each target weight with fp32 Adam moments,
and the 16-bit weight the forward uses is the master rounded after every step (what is exported).
Updating bf16 weights in place would lose most steps: bf16 keeps 8 significant bits, so a step
lr·m/√v of 5e-5 on a weight of 0.02 is below half an ulp (3.9e-5) and rounds away. Gradients are
accumulated over micro-batches in fp32 into the master (a post-accumulate hook hands each
micro-batch's 16-bit gradient over and frees it). An fp32 model trains its weights directly.
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import torch
from torch import nn

from seft_scale.baselines.common import PaperDefaults, TorchOptimMethod


class StaticMethod(TorchOptimMethod):
    name = "static"
    # No single paper: the static-mask baseline of sparse fine-tuning (e.g. the SEFT paper's),
    # trained like full fine-tuning of the kept weights; 5e-5 is our choice in the usual 2e-5..1e-4.
    paper = PaperDefaults("static-mask fine-tuning of the kept weights (the SEFT paper's baseline); "
                          "lr: full fine-tuning's usual range", lr=5e-5)

    def build(self):
        self.master: dict[str, nn.Parameter] = {}
        for name, lin in self.targets:
            w = lin.weight
            if w.dtype == torch.float32:
                w.requires_grad_(True)
                self.master[name] = w
                continue
            master = nn.Parameter(w.detach().to(torch.float32).clone())
            self.master[name] = master
            w.requires_grad_(True)
            w.register_post_accumulate_grad_hook(self._hand_over(master))
        return [(f"{name}.weight", self.master[name]) for name, _ in self.targets]

    @staticmethod
    def _hand_over(master: nn.Parameter):
        def hook(w: torch.Tensor) -> None:
            g = w.grad.to(torch.float32)
            master.grad = g if master.grad is None else master.grad.add_(g)
            w.grad = None
        return hook

    def after_backward(self, step: int, lr: float) -> dict:
        for name, _ in self.targets:
            g = self.master[name].grad
            if g is not None:
                g.mul_(self.masks[name])
        rec = super().after_backward(step, lr)
        with torch.no_grad():
            for name, lin in self.targets:
                master = self.master[name]
                master.mul_(self.masks[name])
                for v in self.opt.state.get(master, {}).values():
                    if v.shape == master.shape:
                        v.mul_(self.masks[name])
        self.after_load()
        return rec

    @torch.no_grad()
    def after_load(self) -> None:
        for name, lin in self.targets:
            if self.master[name] is not lin.weight:
                lin.weight.copy_(self.master[name])  # round to the model's dtype

    def merge(self, start_dir: Optional[Path]) -> dict:
        for name, lin in self.targets:
            lin.weight.requires_grad_(False)
            lin.weight.grad = None
        self.master.clear()
        return self.report(self.model, start_dir)

    def local_counts(self) -> tuple[int, int]:
        """Only the support trains (the mask zeroes every other gradient): B values, not d_out·d_in."""
        budget = sum(self.budgets.values())
        return budget, budget
