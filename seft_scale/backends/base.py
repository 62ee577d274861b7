"""What a backend is: where the model's shards live. It answers three questions and knows
nothing of drop or grow:

1. how to load and wrap the model (`load_model`, `wrap`, `save_pretrained`): every rank holds it
   (local), rank 0 builds it and broadcasts the shards (FSDP2), or ZeRO-3 partitions it;
2. where each shard of each target lies (`shards`: name, shape, global flat offset, a writable
   1-D view of this rank's part of θ, every rank's range) and how to keep other copies of θ
   in step after the method edits a shard in place (`refresh`);
3. how ranks talk (`comm`, seft_scale/backends/comm.py: every collective is there).

The method (seft_scale/seft/method.py) builds its state over the shards and routes the delta into
the forward itself, the same way for every backend.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Protocol, Sequence

import torch
from torch import nn

from seft_scale.backends.comm import Comm


@dataclass
class TargetShard:
    """This rank's part of one target matrix."""

    name: str
    """Module name of the target Linear."""
    shape: tuple[int, int]
    """(d_out, d_in) of the whole matrix."""
    offset: int
    """Global flat position of the first element of `view`."""
    view: torch.Tensor
    """Writable 1-D view of this rank's elements of θ: writing it is writing the model's weight."""
    bounds: list[tuple[int, int]]
    """Every rank's [start, end) flat range, in rank order (contiguous, increasing)."""
    module: nn.Linear
    """The Linear whose forward the method extends."""


class Backend(Protocol):
    name: str
    """local, zero3 or fsdp."""
    sharded: bool
    """Whether the model is split over ranks (even at world size 1): baselines need it whole."""
    rank: int
    world: int
    device: torch.device
    """Where this rank computes."""
    comm: Comm
    grad_dtype: torch.dtype
    """dtype in which selection-window gradients are summed over ranks."""

    def load_model(self, cfg, path: Optional[str] = None, train_text: Optional[str] = None,
                   for_edit: bool = False):
        """(model, tokenizer) from an HF folder (`path`) or built (model.tiny, from train_text).
        for_edit: the caller prunes or saves the model before training, so rank 0 needs its whole
        weights; other ranks may get a meta skeleton (seft_scale.model.has_weights tells)."""

    def wrap(self, model: nn.Module) -> nn.Module:
        """Shard the loaded (and pruned) model; returns the module the trainer runs."""

    def shards(self, model: nn.Module, targets: Sequence[tuple[str, nn.Linear]]) -> list[TargetShard]:
        """Where this rank's part of each target lies."""

    def refresh(self, names: Sequence[str]) -> None:
        """The shards of these targets were edited in place: update any other copy of them."""

    def save_pretrained(self, model: nn.Module, tokenizer, out) -> None:
        """Write the whole model as a plain HF safetensors folder; every rank calls, rank 0 writes."""
