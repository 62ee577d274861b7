"""Wanda (Sun et al. 2023): score |W_ij|·‖X_j‖₂, the weight times the norm of its input over the
calibration tokens, compared within each output row (or matrix, or N:M group)."""
from __future__ import annotations

import torch


class InputNorms:
    """Σ_t x_tj² over the calibration tokens for each input j of one Linear (‖X_j‖₂²)."""

    def __init__(self, d_in: int, device: torch.device | str):
        self.sq_norms = torch.zeros(d_in, dtype=torch.float64, device=device)

    def add(self, x: torch.Tensor) -> None:
        """x: [tokens, d_in] inputs of the Linear."""
        self.sq_norms += (x if x.dtype == torch.float64 else x.float()).pow(2).sum(0)

    def nbytes(self) -> int:
        return self.sq_norms.numel() * self.sq_norms.element_size()


def wanda_scores(weight: torch.Tensor, sq_norms: torch.Tensor) -> torch.Tensor:
    """|W_ij|·‖X_j‖₂ for a [d_out, d_in] weight, in fp32."""
    return weight.abs().float() * sq_norms.sqrt().to(torch.float32)
