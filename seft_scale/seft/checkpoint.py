"""SEFT's state in a checkpoint: each rank's slots, optimizer state, support and θ edits as named
tensors keyed by matrix name, with each shard's global flat range, so a checkpoint written at
world size W loads at any W' (`load_deltas` reads only the overlapping slices)."""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import torch
from safetensors import safe_open

from seft_scale.checkpoint import RANK_FILES
from seft_scale.seft.delta import SparseDelta


def delta_tensors(deltas: Sequence[SparseDelta]) -> dict[str, torch.Tensor]:
    """This rank's SEFT state as named tensors: `<matrix>/<field>` plus `<matrix>/offset`
    ([global flat offset, length] of the shard), which lets load_deltas reshard."""
    tensors = {}
    for d in deltas:
        for key, t in d.state_dict().items():
            tensors[f"{d.name}/{key}"] = t
        tensors[f"{d.name}/offset"] = torch.tensor([d.offset, d.length], dtype=torch.int64)
    return tensors


def load_deltas(ckpt: Path, deltas: Sequence[SparseDelta]) -> None:
    """Restore this rank's SEFT state from a checkpoint written at any world size.

    Each saved shard records its flat range; this rank reads, from every saved shard that overlaps
    its own range, only the overlapping part of the support and the slots and edits that fall in
    it (safetensors slices, never a whole matrix)."""
    files = sorted(ckpt.glob(RANK_FILES))
    if not files:
        raise FileNotFoundError(f"{ckpt} holds no {RANK_FILES}")
    handles = [safe_open(str(f), "pt") for f in files]
    for d in deltas:
        lo, hi = d.offset, d.offset + d.length
        parts: dict[str, list[torch.Tensor]] = {}
        mask = torch.zeros(d.length, dtype=torch.bool)
        grad_acc = None
        covered = 0
        for h in handles:
            if f"{d.name}/offset" not in h.keys():
                raise KeyError(f"{ckpt}: no state for {d.name} (was it a target of this run?)")
            s_off, s_len = h.get_tensor(f"{d.name}/offset").tolist()
            a, b = max(lo, s_off), min(hi, s_off + s_len)
            if a >= b:
                continue
            covered += b - a
            mask[a - lo: b - lo] = h.get_slice(f"{d.name}/mask")[a - s_off: b - s_off]
            if f"{d.name}/grad_acc" in h.keys():
                if grad_acc is None:
                    grad_acc = torch.zeros(d.length, dtype=torch.float32)
                grad_acc[a - lo: b - lo] = h.get_slice(f"{d.name}/grad_acc")[a - s_off: b - s_off]
            pos = h.get_tensor(f"{d.name}/pos")
            keep = (pos >= a) & (pos < b)
            for key in ("pos", "values", "exp_avg", "exp_avg_sq", "age"):
                parts.setdefault(key, []).append(h.get_tensor(f"{d.name}/{key}")[keep])
            edited = h.get_tensor(f"{d.name}/edited")
            keep = (edited >= a) & (edited < b)
            parts.setdefault("edited", []).append(edited[keep])
            parts.setdefault("edited_values", []).append(h.get_tensor(f"{d.name}/edited_values")[keep])
        if covered != d.length:
            raise ValueError(f"{ckpt}: the saved shards of {d.name} cover {covered} of this rank's "
                             f"{d.length} positions")
        if not d.length:  # an empty range (more ranks than partitions or rows) overlaps nothing
            parts = {k: [v] for k, v in d.state_dict().items() if k not in ("mask", "grad_acc")}
            if any(f"{d.name}/grad_acc" in h.keys() for h in handles):
                grad_acc = torch.zeros(0, dtype=torch.float32)
        state = {k: torch.cat(v).to(d.base.device) for k, v in parts.items()}
        state["mask"] = mask.to(d.base.device)
        if grad_acc is not None:
            state["grad_acc"] = grad_acc.to(d.base.device)
        d.load_state_dict(state)
