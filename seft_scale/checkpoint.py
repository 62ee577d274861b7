"""Atomic, resumable checkpoints: per-rank SEFT state (safetensors) + trainer state (JSON).

Layout:  <output>/checkpoints/step_000040/{trainer.json, slots-rank00000.safetensors, ...}
          <output>/checkpoints/latest   (the name of the newest complete checkpoint)
A checkpoint folder is written under a temporary name and renamed when complete, then `latest`
is replaced atomically, so a run killed at any moment leaves the previous checkpoint intact.
SEFT state is keyed by matrix name and carries each shard's global flat offset, so it can be
re-sharded for another world size.
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Callable, Optional, Sequence

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from seft_scale.delta import SparseDelta

CKPT_DIR = "checkpoints"


def rank_file(rank: int) -> str:
    return f"slots-rank{rank:05d}.safetensors"


def delta_tensors(deltas: Sequence[SparseDelta]) -> dict[str, torch.Tensor]:
    """This rank's SEFT state as named tensors: `<matrix>/<field>` plus `<matrix>/offset`
    ([global flat offset, length] of the shard), which lets load_deltas reshard."""
    tensors = {}
    for d in deltas:
        for key, t in d.state_dict().items():
            tensors[f"{d.name}/{key}"] = t
        tensors[f"{d.name}/offset"] = torch.tensor([d.offset, d.length], dtype=torch.int64)
    return tensors


def save_checkpoint(output_dir: Path, step: int, tensors: dict[str, torch.Tensor], trainer_state: dict,
                    rank: int = 0, world: int = 1, barrier: Callable[[], None] = lambda: None,
                    keep: int = 2) -> Path:
    """Write this rank's `tensors` and (rank 0) the trainer state as checkpoint `step`."""
    root = output_dir / CKPT_DIR
    name = f"step_{step:08d}"
    final, tmp = root / name, root / f".{name}.tmp"
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    barrier()
    save_file({k: t.detach().contiguous().cpu() for k, t in tensors.items()},
              str(tmp / rank_file(rank)))
    barrier()
    if rank == 0:
        state = dict(trainer_state, step=step, world_size=world)
        (tmp / "trainer.json").write_text(json.dumps(state, indent=1))
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        latest_tmp = root / ".latest.tmp"
        latest_tmp.write_text(name)
        os.replace(latest_tmp, root / "latest")
        for old in sorted(p for p in root.glob("step_*") if p.is_dir())[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    barrier()
    return final


def latest_checkpoint(output_dir: Path) -> Optional[Path]:
    pointer = output_dir / CKPT_DIR / "latest"
    if not pointer.is_file():
        return None
    path = output_dir / CKPT_DIR / pointer.read_text().strip()
    return path if (path / "trainer.json").is_file() else None


def load_trainer_state(ckpt: Path) -> dict:
    return json.loads((ckpt / "trainer.json").read_text())


def load_deltas(ckpt: Path, deltas: Sequence[SparseDelta]) -> None:
    """Restore this rank's SEFT state from a checkpoint written at any world size.

    Each saved shard records its flat range; this rank reads, from every saved shard that overlaps
    its own range, only the overlapping part of the support and the slots and edits that fall in
    it (safetensors slices, never a whole matrix)."""
    files = sorted(ckpt.glob("slots-rank*.safetensors"))
    if not files:
        raise FileNotFoundError(f"{ckpt} holds no slots-rank*.safetensors")
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
        state = {k: torch.cat(v).to(d.base.device) for k, v in parts.items()}
        state["mask"] = mask.to(d.base.device)
        if grad_acc is not None:
            state["grad_acc"] = grad_acc.to(d.base.device)
        d.load_state_dict(state)
