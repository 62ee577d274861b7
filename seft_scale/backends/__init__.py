"""Where the shards of θ live and how ranks talk. Backends know nothing of drop or grow.

A backend hands the algorithm, for each target matrix, this rank's contiguous flat range of θ as
a writable 1-D view (wrapped in a SparseDelta), an `allreduce` for the selector, and the hooks that
put the sparse delta into forward/backward. The trainer drives everything else.
"""
from __future__ import annotations

from typing import Callable, Optional, Protocol, Sequence

import torch
from torch import nn

from seft_scale.delta import SparseDelta


class Backend(Protocol):
    rank: int
    world: int
    device: torch.device
    allreduce: Optional[Callable[[torch.Tensor], torch.Tensor]]
    model: nn.Module  # the model as the trainer calls it (after attach)

    def barrier(self) -> None:
        """Wait for every rank (no-op on one process)."""

    def load_model(self, cfg, train_text: Optional[str] = None, path: Optional[str] = None):
        """(model, tokenizer) as seft_scale.model.load_model gives them, except that a sharding
        backend may build the full model on some ranks only and a meta-device skeleton on the
        others (filled in by `attach`); the trainer prunes only where the weights exist."""

    def attach(self, model: nn.Module, targets: Sequence[tuple[str, nn.Linear]],
               kernel_for: Callable[[tuple[int, int]], str]) -> list[SparseDelta]:
        """Make the SparseDelta of each target's local shard (mask = θ != 0, no slots yet,
        budget/capacity filled in by the trainer) and route the delta into the forward. The slot
        source's backward must leave each slot's δ-gradient, summed over ranks, on its owner
        (dist.gather_slots does), so the optimizer needs no separate reduction."""

    def set_dense_grad_capture(self, deltas: Sequence[SparseDelta], on: bool) -> None:
        """While on, every backward adds the dense weight gradient of each target into
        `delta.grad_acc` over this rank's shard (summed over ranks)."""

    def forward_backward(self, batch: dict[str, torch.Tensor], scale: float) -> torch.Tensor:
        """Run the model on a micro-batch, backpropagate loss·scale; return the unscaled loss."""

    def base_changed(self, deltas: Sequence[SparseDelta]) -> None:
        """θ shards were edited in place (merge, adapt, resume): propagate to any other copy."""

    def save_pretrained(self, model: nn.Module, tokenizer, out) -> None:
        """Write the whole (merged) model as a plain HF safetensors folder; rank 0 writes, every
        rank calls (sharded backends gather non-target parameters here)."""

    def full_matrices(self, deltas: Sequence[SparseDelta]):
        """Yield (delta, full fp32 W = θ + S, full support mask) one matrix at a time; W and the
        mask are None on ranks other than 0."""

    def export_model(self, model: nn.Module, start_dir) -> nn.Module:
        """The model merge_deltas writes the merged targets into and rank 0 saves: `model` itself
        where it is a plain model; on rank 0 of a sharding backend, a plain copy of the starting
        model in `start_dir` (non-target weights never change)."""


def set_grad_capture(modules: dict, deltas: Sequence[SparseDelta], on: bool,
                     to_shard: Callable[[SparseDelta, torch.Tensor], torch.Tensor]) -> None:
    """The selection-window hook every backend installs: while on, each backward of a target adds
    `to_shard(d, G)` — its dense weight gradient, summed over ranks, over this rank's shard — into
    d.grad_acc (fp32, allocated at the window's first step)."""
    for d in deltas:
        mod = modules[d.name]
        if not on:
            mod.seft_dense_grad_hook = None
            continue
        if d.grad_acc is None:
            d.grad_acc = torch.zeros(d.length, dtype=torch.float32, device=d.base.device)

        def hook(G: torch.Tensor, d: SparseDelta = d) -> None:
            d.grad_acc.add_(to_shard(d, G).to(d.grad_acc.device, torch.float32))
        mod.seft_dense_grad_hook = hook


def make_backend(name: str, cfg=None, ds_config: Optional[str] = None) -> Backend:
    """The backend for launch/train.py --backend NAME (cfg: the RunConfig)."""
    if name == "local":
        from seft_scale.backends.local import LocalBackend
        return LocalBackend()
    if name == "fsdp":
        from seft_scale.backends.fsdp import FSDPBackend
        return FSDPBackend(cfg.fsdp if cfg is not None else None)
    if name == "zero3":
        from seft_scale.backends.zero3 import Zero3Backend
        return Zero3Backend(cfg, ds_config)
    raise ValueError(f"unknown backend {name!r}")
