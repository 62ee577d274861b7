"""PyTorch FSDP2: θ sharded by whole rows, each target's SEFT state on the rank owning its rows.

`fully_shard` wraps every decoder layer (the model's `_no_split_modules`), then the root. Each
weight becomes a DTensor Shard(0): rank r holds a contiguous block of whole rows (torch.chunk
split, uneven when the rows do not divide), i.e. the flat range [first_row·d_in, end_row·d_in).
That block, `weight.to_local().view(-1)`, is the `SparseDelta.base` of the rank: a view of FSDP's
own sharded storage, so θ edits (merged drops, adapt prunes, resumed edits) are what FSDP's next
all-gather reads. Masks, window gradients and slots follow the same rows; nothing of full size
is kept on any rank outside one layer's forward/backward.

Forward/backward of a target: FSDP all-gathers the layer's working weight (in
`fsdp.param_dtype`) and the method adds the delta (seft/method.py); window gradients are summed
over ranks in `fsdp.reduce_dtype` (`grad_dtype`).

Checkpoints are checkpoint.save_checkpoint's per-rank slot files (slots, masks, optimizer state,
window G, θ edits, keyed by matrix name and flat offset; load_deltas reshards them for any world
size) on top of the run's starting model folder. We do not write a torch.distributed.checkpoint of
the model: θ is frozen, so the model is exactly the starting folder plus the recorded edits, and a
DCP copy would rewrite the whole model at every checkpoint to add nothing.

The model is materialised on rank 0 only (CPU, for pruning and saving the starting folder); the
other ranks build it on the meta device, and `wrap` broadcasts rank 0's weights into the shards
(`set_model_state_dict(..., broadcast_from_rank0=True)`), buffers included. The export gathers the
full state dict to rank 0's CPU (`get_model_state_dict(full_state_dict=True, cpu_offload=True)`).
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                     set_model_state_dict)
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard

from seft_scale.backends.base import TargetShard
from seft_scale.backends.comm import Comm, init_distributed
from seft_scale.config import DTYPES, FSDPConfig
from seft_scale.errors import ConfigError
from seft_scale.model import load_on_rank0

class FSDPBackend:
    """One process per device under torchrun; see the module docstring for the layout."""

    name, sharded = "fsdp", True

    def __init__(self, cfg: Optional[FSDPConfig] = None):
        self.cfg = cfg or FSDPConfig()
        self.rank, self.world, local_rank = init_distributed()
        self.comm = Comm()
        self.device = torch.device("cuda", local_rank) if torch.cuda.is_available() \
            else torch.device("cpu")
        self.grad_dtype = DTYPES[self.cfg.reduce_dtype]
        self.model: Optional[nn.Module] = None
        self._shards: dict[str, TargetShard] = {}

    def load_model(self, cfg, path: Optional[str] = None, train_text: Optional[str] = None,
                   for_edit: bool = False):
        """The whole model on CPU on rank 0, its skeleton on the meta device elsewhere."""
        return load_on_rank0(cfg, torch.device("cpu"), self.comm, train_text, path)

    def wrap(self, model: nn.Module) -> nn.Module:
        for p in model.parameters():
            p.requires_grad_(False)
        full_state = model.state_dict() if self.rank == 0 else {}
        param_dtype = None if self.cfg.param_dtype == "auto" and self.device.type != "cuda" \
            else DTYPES["bfloat16" if self.cfg.param_dtype == "auto" else self.cfg.param_dtype]
        policy = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=self.grad_dtype)
        blocks = set(getattr(model, "_no_split_modules", None) or [])
        layers = [m for m in model.modules() if type(m).__name__ in blocks]
        if not layers:
            raise ConfigError(f"model.path: {type(model).__name__} names no decoder layer class to "
                              f"shard (_no_split_modules={sorted(blocks)})")
        for module in layers + [model]:
            fully_shard(module, mp_policy=policy,
                        reshard_after_forward=self.cfg.reshard_after_forward)
        with self.comm.guard("broadcasting the model from rank 0"):
            if self.rank == 0:
                model.to(self.device)
            else:
                model.to_empty(device=self.device)
            set_model_state_dict(model, full_state, options=StateDictOptions(
                full_state_dict=True, broadcast_from_rank0=True))
            del full_state
            for b in model.buffers():  # non-persistent ones (rotary) are in no state dict
                dist.broadcast(b, src=0)
        self.model = model
        return model

    def shards(self, model: nn.Module, targets: Sequence[tuple[str, nn.Linear]]) -> list[TargetShard]:
        # every rank's row count per target -> the flat ranges, in rank order
        rows = torch.tensor([lin.weight.to_local().shape[0] for _, lin in targets], dtype=torch.int64)
        all_rows = self.comm.gather_flat(rows, [len(targets)] * self.world).view(self.world, -1)
        out = []
        for i, (name, lin) in enumerate(targets):
            d_in = lin.weight.shape[1]
            ends = all_rows[:, i].cumsum(0).tolist()
            bounds = [(s * d_in, e * d_in) for s, e in zip([0] + ends[:-1], ends)]
            out.append(TargetShard(name, tuple(lin.weight.shape), bounds[self.rank][0],
                                   lin.weight.to_local().view(-1), bounds, lin))
            self._shards[name] = out[-1]
        return out

    def refresh(self, names: Sequence[str]) -> None:
        # drop gathered copies older than the edit (an eval forward with reshard_after_forward
        # False leaves them), then make sure the edits went into the storage FSDP gathers from
        for m in self.model.modules():
            if isinstance(m, FSDPModule):
                m.reshard()
        for name in names:
            shard = self._shards[name]
            local = shard.module.weight.to_local()
            if local.untyped_storage().data_ptr() != shard.view.untyped_storage().data_ptr():
                raise RuntimeError(f"{name}: FSDP replaced the sharded weight's storage; the view "
                                   "of θ is stale (model moved or reloaded after wrap?)")

    def save_pretrained(self, model: nn.Module, tokenizer, out) -> None:
        """The full state dict gathered to rank 0's CPU one parameter at a time; rank 0 writes."""
        with self.comm.guard("gathering the model for export"):
            state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True,
                                                                         cpu_offload=True))
        if self.rank == 0:
            model.save_pretrained(out, state_dict=state, safe_serialization=True)
            tokenizer.save_pretrained(out)
        self.comm.wait("rank 0 writing the model")
