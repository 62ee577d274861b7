"""SEFT's slot budget: how many trainable values a matrix gets (pure arithmetic, no torch)."""
from __future__ import annotations


def slot_capacity(shape: tuple[int, int], seft_cfg) -> int:
    """K: a LoRA-rank match r·(d_in + d_out) (seft.lora_rank), or density·n (seft.density),
    never more than the matrix has."""
    d_out, d_in = shape
    if seft_cfg.lora_rank is not None:
        return min(seft_cfg.lora_rank * (d_in + d_out), d_in * d_out)
    return max(1, int(seft_cfg.density * d_in * d_out))
