"""PyTorch FSDP2: θ sharded by whole rows, each target's SEFT state on the rank owning its rows.

`fully_shard` wraps every decoder layer (the model's `_no_split_modules`), then the root. Each
weight becomes a DTensor Shard(0): rank r holds a contiguous block of whole rows (torch.chunk
split, uneven when the rows do not divide), i.e. the flat range [first_row·d_in, end_row·d_in).
That block, `weight.to_local().view(-1)`, is the `SparseDelta.base` of the rank: a view of FSDP's
own sharded storage, so θ edits (merged drops, adapt prunes, resumed edits) are what FSDP's next
all-gather reads. Masks, window gradients and slots follow the same rows; nothing of full size
is kept on any rank outside one layer's forward/backward.

Forward/backward of a target: FSDP all-gathers the layer's working weight (in
`fsdp.param_dtype`); `SparseDeltaLinear` gets the matrix's full (pos, δ) from the owners through
`dist.gather_slots`, whose backward sums every rank's δ-gradients and hands each owner its own.
In selection windows the dense G of each target (formed in backward from this rank's
micro-batch) is summed over ranks straight into the row layout by `reduce_scatter_flat`.

Checkpoints are checkpoint.save_checkpoint's per-rank slot files (slots, masks, optimizer state,
window G, θ edits, keyed by matrix name and flat offset; load_deltas reshards them for any world
size) on top of the run's starting model folder. We do not write a torch.distributed.checkpoint of
the model: θ is frozen, so the model is exactly the starting folder plus the recorded edits, and a
DCP copy would rewrite the whole model at every checkpoint to add nothing.

The model is materialised on rank 0 only (CPU, for pruning and saving the starting folder); the
other ranks build it on the meta device, and `attach` broadcasts rank 0's weights into the shards
(`set_model_state_dict(..., broadcast_from_rank0=True)`), buffers included.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Callable, Optional, Sequence

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard

from seft_scale.backends import set_grad_capture
from seft_scale.backends.dist import (gather_slots, init_distributed, make_allreduce, peer_guard,
                                      reduce_scatter_flat)
from seft_scale.config import ConfigError, FSDPConfig, ModelConfig
from seft_scale.delta import SparseDelta, SparseDeltaLinear

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class FSDPBackend:
    """One process per device under torchrun; see the module docstring for the layout."""

    def __init__(self, cfg: Optional[FSDPConfig] = None):
        self.cfg = cfg or FSDPConfig()
        self.rank, self.world, local_rank = init_distributed()
        self.device = torch.device("cuda", local_rank) if torch.cuda.is_available() \
            else torch.device("cpu")
        self.allreduce = make_allreduce()
        self.model: Optional[nn.Module] = None
        self._model_cfg: Optional[ModelConfig] = None
        self._modules: dict[str, SparseDeltaLinear] = {}
        self._bounds: dict[str, list[tuple[int, int]]] = {}  # every rank's flat range, by target

    # -- model construction --------------------------------------------------------------------
    def load_model(self, cfg: ModelConfig, train_text: Optional[str] = None,
                   path: Optional[str] = None):
        """(model, tokenizer): the full model on CPU on rank 0, its skeleton on the meta device
        elsewhere (filled by `attach`). Dtype and attention are resolved for the training device."""
        from seft_scale.model import build_tiny_llama, load_model, resolve_attn, resolve_dtype
        dtype = resolve_dtype(cfg.dtype, self.device)
        attn = resolve_attn(cfg.attn_implementation, self.device)
        self._model_cfg = cfg = dataclasses.replace(
            cfg, dtype=str(dtype).removeprefix("torch."), attn_implementation=attn)
        model, tok = load_model(cfg, torch.device("cpu"), train_text, path) if self.rank == 0 \
            else (None, None)
        shared = [tok]
        with peer_guard(self.rank, "loading the model"):
            dist.broadcast_object_list(shared, src=0)  # one tokenizer for all ranks' data
        tok = shared[0]
        if self.rank != 0:
            with torch.device("meta"):
                if path or cfg.path:
                    from transformers import AutoConfig, AutoModelForCausalLM
                    config = AutoConfig.from_pretrained(path or cfg.path,
                                                        trust_remote_code=cfg.trust_remote_code)
                    model = AutoModelForCausalLM.from_config(
                        config, dtype=dtype, attn_implementation=attn,
                        trust_remote_code=cfg.trust_remote_code)
                else:
                    model = build_tiny_llama(cfg, len(tok), dtype, attn)
            model.config.use_cache = False
        return model, tok

    def attach(self, model: nn.Module, targets: Sequence[tuple[str, nn.Linear]],
               kernel_for: Callable[[tuple[int, int]], str]) -> list[SparseDelta]:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

        for p in model.parameters():
            p.requires_grad_(False)
        full_state = model.state_dict() if self.rank == 0 else {}
        param_dtype = None if self.cfg.param_dtype == "auto" and self.device.type != "cuda" \
            else _DTYPES["bfloat16" if self.cfg.param_dtype == "auto" else self.cfg.param_dtype]
        policy = MixedPrecisionPolicy(param_dtype=param_dtype,
                                      reduce_dtype=_DTYPES[self.cfg.reduce_dtype])
        blocks = set(getattr(model, "_no_split_modules", None) or [])
        layers = [m for m in model.modules() if type(m).__name__ in blocks]
        if not layers:
            raise ConfigError(f"model.path: {type(model).__name__} names no decoder layer class to "
                              f"shard (_no_split_modules={sorted(blocks)})")
        for module in layers + [model]:
            fully_shard(module, mp_policy=policy,
                        reshard_after_forward=self.cfg.reshard_after_forward)
        with peer_guard(self.rank, "broadcasting the model from rank 0"):
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

        # every rank's row count per target -> the flat ranges, in rank order
        rows = torch.tensor([lin.weight.to_local().shape[0] for _, lin in targets],
                            dtype=torch.int64, device=self.device)
        all_rows = torch.empty(self.world * len(targets), dtype=torch.int64, device=self.device)
        with peer_guard(self.rank, "sharding the model"):
            dist.all_gather_into_tensor(all_rows, rows)
        all_rows = all_rows.cpu().view(self.world, len(targets))
        deltas = []
        for i, (name, lin) in enumerate(targets):
            d_in = lin.weight.shape[1]
            ends = all_rows[:, i].cumsum(0).tolist()
            self._bounds[name] = [(s * d_in, e * d_in) for s, e in zip([0] + ends[:-1], ends)]
            start = self._bounds[name][self.rank][0]
            d = SparseDelta(name, tuple(lin.weight.shape), start, lin.weight.to_local().view(-1),
                            budget=-1, capacity=-1)
            SparseDeltaLinear.attach(lin, lambda d=d: gather_slots(d.pos, d.values),
                                     kernel_for(d.shape))
            self._modules[name] = lin  # type: ignore[assignment]
            deltas.append(d)
        return deltas

    # -- the step --------------------------------------------------------------------------------
    def barrier(self) -> None:
        with peer_guard(self.rank, "a barrier"):
            dist.barrier()

    def set_dense_grad_capture(self, deltas: Sequence[SparseDelta], on: bool) -> None:
        # every rank holds its micro-batch's full G for one matrix at a time: sum it into rows
        reduce_dtype = _DTYPES[self.cfg.reduce_dtype]
        set_grad_capture(self._modules, deltas, on, lambda d, G: reduce_scatter_flat(
            G.to(reduce_dtype), self._bounds[d.name]))

    def forward_backward(self, batch: dict[str, torch.Tensor], scale: float) -> torch.Tensor:
        with peer_guard(self.rank, "a forward/backward pass"):
            out = self.model(**batch)
            (out.loss * scale).backward()
        return out.loss.detach()

    def base_changed(self, deltas: Sequence[SparseDelta]) -> None:
        # drop gathered copies older than the edit (an eval forward with reshard_after_forward
        # False leaves them), then make sure the edits went into the storage FSDP gathers from
        for m in self.model.modules():
            if isinstance(m, FSDPModule):
                m.reshard()
        for d in deltas:
            local = self._modules[d.name].weight.to_local()
            if local.untyped_storage().data_ptr() != d.base.untyped_storage().data_ptr():
                raise RuntimeError(f"{d.name}: FSDP replaced the sharded weight's storage; SEFT's "
                                   "view of θ is stale (model moved or reloaded after attach?)")

    # -- export ----------------------------------------------------------------------------------
    def _to_rank0(self, local: torch.Tensor, bounds: list[tuple[int, int]]):
        """Every rank's 1-D part, concatenated on rank 0 (None elsewhere)."""
        width = max(e - s for s, e in bounds)
        padded = torch.zeros(width, dtype=local.dtype, device=local.device)
        padded[: len(local)] = local
        parts = [torch.empty_like(padded) for _ in bounds] if self.rank == 0 else None
        with peer_guard(self.rank, "gathering a matrix for export"):
            dist.gather(padded, parts, dst=0)
        if self.rank != 0:
            return None
        return torch.cat([p[: e - s] for p, (s, e) in zip(parts, bounds)])

    def full_matrices(self, deltas: Sequence[SparseDelta]):
        for d in deltas:
            bounds = self._bounds[d.name]
            w = self._to_rank0(d.effective(), bounds)
            mask = self._to_rank0(d.mask.to(torch.uint8), bounds)
            if self.rank == 0:
                yield d, w.view(d.shape).cpu(), mask.view(d.shape).bool().cpu()
            else:
                yield d, None, None

    def save_pretrained(self, model: nn.Module, tokenizer, out) -> None:
        """Rank 0 saves `model`, the plain copy from `export_model` (merged targets written in)."""
        if self.rank == 0:
            if isinstance(model, FSDPModule):
                raise TypeError("save_pretrained takes the plain model of export_model(), not the "
                                "sharded one")
            from seft_scale.model import save_model
            save_model(model, tokenizer, out)

    def export_model(self, model: nn.Module, start_dir: Path) -> nn.Module:
        """Rank 0: a plain copy of the starting model (every non-target weight is unchanged by
        training) for merge_deltas to write the targets into; other ranks: `model` itself."""
        if self.rank != 0:
            return model
        from seft_scale.model import load_model
        plain, _ = load_model(self._model_cfg, torch.device("cpu"), path=str(start_dir))
        return plain
