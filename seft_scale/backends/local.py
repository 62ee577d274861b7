"""One process, the whole model on one device: every shard is the whole matrix."""
from __future__ import annotations

from typing import Callable, Optional, Sequence

import torch
from torch import nn

from seft_scale.backends import set_grad_capture
from seft_scale.delta import SparseDelta, SparseDeltaLinear


class LocalBackend:
    rank, world = 0, 1
    allreduce = None

    def __init__(self, device: Optional[torch.device] = None):
        self.device = device or torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self.model: Optional[nn.Module] = None
        self._modules: dict[str, SparseDeltaLinear] = {}

    def attach(self, model: nn.Module, targets: Sequence[tuple[str, nn.Linear]],
               kernel_for: Callable[[tuple[int, int]], str]) -> list[SparseDelta]:
        self.model = model
        for p in model.parameters():
            p.requires_grad_(False)
        deltas = []
        for name, lin in targets:
            d = SparseDelta(name, tuple(lin.weight.shape), 0, lin.weight.data.view(-1),
                            budget=-1, capacity=-1)
            SparseDeltaLinear.attach(lin, lambda d=d: (d.pos, d.values), kernel_for(d.shape))
            self._modules[name] = lin  # type: ignore[assignment]
            deltas.append(d)
        return deltas

    def barrier(self) -> None:
        pass

    def load_model(self, cfg, train_text: Optional[str] = None, path: Optional[str] = None):
        from seft_scale.model import load_model
        return load_model(cfg, self.device, train_text=train_text, path=path)

    def export_model(self, model: nn.Module, start_dir) -> nn.Module:
        return model

    def set_dense_grad_capture(self, deltas: Sequence[SparseDelta], on: bool) -> None:
        set_grad_capture(self._modules, deltas, on, lambda d, G: G.reshape(-1))

    def forward_backward(self, batch: dict[str, torch.Tensor], scale: float) -> torch.Tensor:
        out = self.model(**batch)
        (out.loss * scale).backward()
        return out.loss.detach()

    def base_changed(self, deltas: Sequence[SparseDelta]) -> None:
        pass  # the shard is a view of the weight itself

    def save_pretrained(self, model: nn.Module, tokenizer, out) -> None:
        from seft_scale.model import save_model
        save_model(model, tokenizer, out)

    def full_matrices(self, deltas: Sequence[SparseDelta]):
        for d in deltas:
            yield d, d.effective().view(d.shape), d.mask.view(d.shape)
