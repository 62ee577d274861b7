"""SQFT's SparsePEFT (Muñoz et al., "SQFT: Low-cost Model Adaptation in Low-precision Sparse
Foundation Models", EMNLP Findings 2024; code IntelLabs/Hardware-Aware-Automated-Machine-Learning,
SQFT/patches/peft-v0.10.0.patch): LoRA whose update is masked by the base weight's support,

    y = x·Wᵀ + dropout(x)·((s·B·A) ⊙ M)ᵀ,   M = 1[W ≠ 0],  s = alpha / r,

so merging W ← W + (s·B·A) ⊙ M adds nothing outside the support. As in SQFT's patch, M is
computed from the frozen base weight on every forward and at the merge and never stored (no
n-sized buffer beside the model). A and B are fp32 (SQFT casts its trainable parameters to fp32),
A Kaiming-uniform and B zero, as PEFT initialises them.

Paper defaults kept: α/r = 2 (r 32, alpha 64), dropout 0.1 on the adapter input, lr 3e-4. Not
kept, so every method of a comparison sees the same targets and schedule: SQFT adapts q, k, v,
up and down only (here seft.targets), trains 3 epochs with 100 warm-up steps, and its optional
NLS elastic rank is off (the fixed-rank "LoRA version" of its README).
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from seft_scale.baselines.common import (PaperDefaults, TorchOptimMethod, kaiming_uniform, lora_alpha,
                                         lora_dropout, lora_rank)


def masked_update(lin: nn.Linear) -> torch.Tensor:
    """(s·B·A) ⊙ 1[W ≠ 0] in fp32, the mask taken from the base weight now."""
    return (lin.lora_B @ lin.lora_A) * lin.lora_scale * (lin.weight.detach() != 0)


class MaskedLoraLinear(nn.Linear):
    """SQFT's SparsePEFT layer: the base output plus the masked LoRA update on dropout(x)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        update = masked_update(self).to(x.dtype)
        return F.linear(x, self.weight, self.bias) + F.linear(self.lora_dropout(x), update)


class SqftMethod(TorchOptimMethod):
    name = "sqft"
    paper = PaperDefaults("Muñoz et al., SQFT, EMNLP Findings 2024 (IntelLabs SQFT: run_sqft.py, "
                          "README SparsePEFT commands)", lr=3e-4, lora_dropout=0.1)

    def build(self):
        r = lora_rank(self.cfg)
        params = []
        g = torch.Generator().manual_seed(self.cfg.train.seed)
        for name, lin in self.targets:
            dev = lin.weight.device
            lin.__class__ = MaskedLoraLinear
            lin.lora_A = nn.Parameter(kaiming_uniform(r, lin.in_features, g).to(dev))
            lin.lora_B = nn.Parameter(torch.zeros(lin.out_features, r, device=dev))
            lin.lora_scale = lora_alpha(self.cfg) / r
            lin.lora_dropout = nn.Dropout(lora_dropout(self.cfg, self.paper))
            params += [(f"{name}.lora_A", lin.lora_A), (f"{name}.lora_B", lin.lora_B)]
        return params

    def merge(self, start_dir: Optional[Path]) -> dict:
        with torch.no_grad():
            for _, lin in self.targets:
                # summed in fp32, then rounded once: a bf16 sum can cancel a kept weight to exactly 0
                lin.weight.copy_((lin.weight.to(torch.float32) + masked_update(lin)).to(lin.weight.dtype))
                del lin.lora_A, lin.lora_B, lin.lora_scale, lin.lora_dropout
                lin.__class__ = nn.Linear
        return self.report(self.model, start_dir)
