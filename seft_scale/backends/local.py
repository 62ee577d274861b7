"""One process, the whole model on one device: every shard is the whole matrix."""
from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import nn

from seft_scale.backends.base import TargetShard
from seft_scale.backends.comm import Comm
from seft_scale.model import load_model, save_model


class LocalBackend:
    name, sharded, rank, world = "local", False, 0, 1
    grad_dtype = torch.float32

    def __init__(self, device: Optional[torch.device] = None):
        self.device = device or torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self.comm = Comm()

    def load_model(self, cfg, path: Optional[str] = None, train_text: Optional[str] = None,
                   for_edit: bool = False):
        return load_model(cfg, self.device, train_text=train_text, path=path)

    def wrap(self, model: nn.Module) -> nn.Module:
        return model

    def shards(self, model: nn.Module, targets: Sequence[tuple[str, nn.Linear]]) -> list[TargetShard]:
        return [TargetShard(name, tuple(lin.weight.shape), 0, lin.weight.data.view(-1),
                            [(0, lin.weight.numel())], lin) for name, lin in targets]

    def refresh(self, names: Sequence[str]) -> None:
        pass  # the shard is a view of the weight itself

    def save_pretrained(self, model: nn.Module, tokenizer, out) -> None:
        save_model(model, tokenizer, out)
