"""Magnitude pruning: keep the largest |W| (no calibration data)."""
from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from seft_scale.prune.masks import keep_mask


@torch.no_grad()
def prune_magnitude(targets: Sequence[tuple[str, nn.Linear]], sparsity: float,
                    pattern: str = "unstructured", granularity: str = "row") -> None:
    for _, lin in targets:
        lin.weight.mul_(keep_mask(lin.weight.abs(), sparsity, pattern, granularity))
