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


# arrays keyed by global position: the key holding the positions, then the arrays that follow it
_BY_POSITION = {"pos": ("values", "exp_avg", "exp_avg_sq", "age", "since_grown"), "zeros": (),
                "edited": ("edited_values",),
                "window.cand_pos": ("window.cand_sum", "window.cand_sumsq", "window.cand_sets")}
_BY_RANGE = ("window.sum", "window.sumsq")  # one value per position of the shard


def load_deltas(ckpt: Path, deltas: Sequence[SparseDelta]) -> dict[str, dict[str, torch.Tensor]]:
    """Restore this rank's SEFT state from a checkpoint written at any world size; returns each
    matrix's saved window scores (cut to this rank's range; empty outside a window).

    Each saved shard records its flat range; this rank reads, from every saved shard that overlaps
    its own range, only the slots, exceptions, edits and window entries that fall in it (and
    safetensors slices of per-position arrays, never a whole matrix)."""
    files = sorted(ckpt.glob(RANK_FILES))
    if not files:
        raise FileNotFoundError(f"{ckpt} holds no {RANK_FILES}")
    handles = [safe_open(str(f), "pt") for f in files]
    windows = {}
    for d in deltas:
        lo, hi = d.offset, d.offset + d.length
        parts: dict[str, list[torch.Tensor]] = {}
        window: dict[str, torch.Tensor] = {}
        covered = 0
        for h in handles:
            keys = set(h.keys())
            if f"{d.name}/offset" not in keys:
                raise KeyError(f"{ckpt}: no state for {d.name} (was it a target of this run?)")
            if f"{d.name}/window.steps" in keys:
                window["steps"] = h.get_tensor(f"{d.name}/window.steps")
            s_off, s_len = h.get_tensor(f"{d.name}/offset").tolist()
            a, b = max(lo, s_off), min(hi, s_off + s_len)
            for key, companions in _BY_POSITION.items():  # read even where no range overlaps:
                if f"{d.name}/{key}" not in keys:        # an empty share is still a share
                    continue
                pos = h.get_tensor(f"{d.name}/{key}")
                keep = (pos >= a) & (pos < b)
                for k in (key, *companions):
                    if f"{d.name}/{k}" in keys:  # a field newer than the checkpoint: its default
                        parts.setdefault(k, []).append(h.get_tensor(f"{d.name}/{k}")[keep])
            if a >= b:
                continue
            covered += b - a
            for key in _BY_RANGE:
                if f"{d.name}/{key}" in keys:
                    parts.setdefault(key, []).append(h.get_slice(f"{d.name}/{key}")[a - s_off: b - s_off])
        for key in _BY_RANGE:  # an empty range (more ranks than partitions or rows) overlaps nothing
            if key not in parts and any(f"{d.name}/{key}" in h.keys() for h in handles):
                parts[key] = [torch.zeros(0, dtype=torch.float32)]
        if covered != d.length:
            raise ValueError(f"{ckpt}: the saved shards of {d.name} cover {covered} of this rank's "
                             f"{d.length} positions")
        state = {k: torch.cat(v).to(d.base.device) for k, v in parts.items()}
        d.load_state_dict(state)
        if "steps" in window:
            window.update({k.removeprefix("window."): v for k, v in state.items() if k.startswith("window.")})
        windows[d.name] = window
    return windows
