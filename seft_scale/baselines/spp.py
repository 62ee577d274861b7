"""SPP (Lu et al., "SPP: Sparsity-Preserved Parameter-Efficient Fine-Tuning for Large Language
Models", ICML 2024, arXiv 2405.16057; code Lucky-Lance/SPP, peft/src/peft/tuners/lora.py
`DiagonalLinear` and `Linear.forward`): the frozen sparse W is rescaled element-wise,

    ΔW = s·(R(W_α) ⊙ W_β·1ᵀ) ⊙ W,   y = x·Wᵀ + dropout(x)·ΔWᵀ,   merged W ← W + ΔW,

with W_α ∈ ℝ^{r_g × d_in} (Kaiming-uniform), W_β ∈ ℝ^{d_out} (zeros, so ΔW = 0 at the start) and
R repeating each row of W_α over a contiguous block of d_out / r_g output rows
(repeat_interleave). The ⊙W factor keeps every zero of W, unstructured or N:M, so the merged model
has exactly the start's support with no mask and no re-pruning. As in SPP's code the dense ΔW is
built inside activation checkpointing (recomputed in backward, not stored), and W_α, W_β are fp32
over a possibly 16-bit W.

Trainable count per matrix: r_g·d_in + d_out. SPP's code fixes r_g = 16 (baseline.spp_groups:
16); by default r_g is chosen per matrix as the divisor of d_out that brings the count closest to
the LoRA-rank budget r·(d_in + d_out) of the other methods — a deviation from the released code,
made so the comparison is at (about) equal budget; `trainable_count` reports the real count.

Paper defaults kept: s = alpha / r = 2 (its lora_alpha 16, lora_r 8), dropout 0.05 on x, lr 4e-3.
Not kept: weight decay 0.001 (train.weight_decay applies to every method alike), 3 epochs with
3% warm-up, and no lora_B / unmerge path (dead code in the release).
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from seft_scale.baselines.common import (PaperDefaults, TorchOptimMethod, kaiming_uniform, lora_alpha,
                                         lora_dropout, lora_rank)
from seft_scale.errors import ConfigError


def spp_groups(d_out: int, d_in: int, r: int, fixed: Optional[int] = None) -> int:
    """r_g for a [d_out, d_in] matrix: `fixed` (it must divide d_out), else the divisor of d_out
    whose r_g·d_in + d_out is closest to r·(d_in + d_out) (ties: the smaller)."""
    if fixed is not None:
        return fixed
    target = r * (d_in + d_out)
    divisors = [g for g in range(1, d_out + 1) if d_out % g == 0]
    return min(divisors, key=lambda g: (abs(g * d_in + d_out - target), g))


def spp_delta(weight: torch.Tensor, alpha: torch.Tensor, beta: torch.Tensor, scale: float) -> torch.Tensor:
    """s·(R(W_α) ⊙ W_β 1ᵀ) ⊙ W in fp32."""
    rows = weight.shape[0] // alpha.shape[0]
    return scale * torch.repeat_interleave(alpha, rows, dim=0) * beta[:, None] * weight.to(torch.float32)


def _branch(x: torch.Tensor, weight: torch.Tensor, alpha: torch.Tensor, beta: torch.Tensor,
            scale: float) -> torch.Tensor:
    return F.linear(x, spp_delta(weight, alpha, beta, scale).to(x.dtype))


class SppLinear(nn.Linear):
    """The base output plus SPP's branch on dropout(x), ΔW recomputed in backward."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        base = F.linear(x, self.weight, self.bias)
        branch = checkpoint(_branch, self.spp_dropout(x), self.weight, self.spp_alpha, self.spp_beta,
                            self.spp_scale, use_reentrant=False)
        return base + branch


class SppMethod(TorchOptimMethod):
    name = "spp"
    paper = PaperDefaults("Lu et al., SPP, ICML 2024, arXiv 2405.16057 (Lucky-Lance/SPP: finetune.py, "
                          "peft/src/peft/tuners/lora.py)", lr=4e-3, lora_dropout=0.05)

    def build(self):
        r, fixed = lora_rank(self.cfg), self.cfg.baseline.spp_groups
        bad = [f"{name} (d_out {lin.out_features})" for name, lin in self.targets
               if fixed is not None and lin.out_features % fixed]
        if bad:
            raise ConfigError(f"baseline.spp_groups: {fixed} must divide d_out of every target; not so "
                              f"for {', '.join(bad[:3])}{' ...' if len(bad) > 3 else ''}")
        g = torch.Generator().manual_seed(self.cfg.train.seed)
        params = []
        for name, lin in self.targets:
            dev = lin.weight.device
            groups = spp_groups(lin.out_features, lin.in_features, r, fixed)
            lin.__class__ = SppLinear
            lin.spp_alpha = nn.Parameter(kaiming_uniform(groups, lin.in_features, g).to(dev))
            lin.spp_beta = nn.Parameter(torch.zeros(lin.out_features, device=dev))
            lin.spp_scale = lora_alpha(self.cfg) / r
            lin.spp_dropout = nn.Dropout(lora_dropout(self.cfg, self.paper))
            params += [(f"{name}.spp_alpha", lin.spp_alpha), (f"{name}.spp_beta", lin.spp_beta)]
        return params

    def merge(self, start_dir: Optional[Path]) -> dict:
        with torch.no_grad():
            for _, lin in self.targets:
                delta = spp_delta(lin.weight, lin.spp_alpha, lin.spp_beta, lin.spp_scale)
                lin.weight.copy_((lin.weight.to(torch.float32) + delta).to(lin.weight.dtype))
                del lin.spp_alpha, lin.spp_beta, lin.spp_scale, lin.spp_dropout
                lin.__class__ = nn.Linear
        return self.report(self.model, start_dir)
