"""SQFT's SparsePEFT (Muñoz et al., EMNLP Findings 2024): LoRA whose update is masked by the
base model's support, y = x·(θ + s·(B·A)⊙M)ᵀ, so merging adds zero outside M."""
from __future__ import annotations

import math
from pathlib import Path
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from seft_scale.baselines.common import TorchOptimMethod, lora_alpha, lora_rank


class MaskedLoraLinear(nn.Linear):
    """SQFT's SparsePEFT layer: the LoRA update masked by the support."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        update = (self.lora_B @ self.lora_A) * self.lora_mask * self.lora_scale
        return F.linear(x, self.weight + update.to(self.weight.dtype), self.bias)


class SqftMethod(TorchOptimMethod):
    name = "sqft"

    def build(self):
        r = lora_rank(self.cfg)
        params = []
        g = torch.Generator().manual_seed(self.cfg.train.seed)
        for name, lin in self.targets:
            a = torch.empty(r, lin.in_features)
            bound = 1 / math.sqrt(lin.in_features)  # PEFT's kaiming_uniform(a=√5) bound
            a.uniform_(-bound, bound, generator=g)
            lin.__class__ = MaskedLoraLinear
            lin.lora_A = nn.Parameter(a.to(lin.weight.device))
            lin.lora_B = nn.Parameter(torch.zeros(lin.out_features, r, device=lin.weight.device))
            lin.register_buffer("lora_mask", self.masks[name].to(torch.float32), persistent=False)
            lin.lora_scale = lora_alpha(self.cfg) / r
            params += [(f"{name}.lora_A", lin.lora_A), (f"{name}.lora_B", lin.lora_B)]
        return params

    def merge(self, start_dir: Optional[Path]) -> dict:
        with torch.no_grad():
            for _, lin in self.targets:
                update = (lin.lora_B @ lin.lora_A) * lin.lora_mask * lin.lora_scale
                lin.weight.add_(update.to(lin.weight.dtype))
                del lin.lora_A, lin.lora_B, lin.lora_mask, lin.lora_scale
                lin.__class__ = nn.Linear
        return self.report(self.model, start_dir)
