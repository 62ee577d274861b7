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
from safetensors.torch import load_file, save_file

from seft_scale.delta import SparseDelta

CKPT_DIR = "checkpoints"


def _rank_file(rank: int) -> str:
    return f"slots-rank{rank:05d}.safetensors"


def save_checkpoint(output_dir: Path, step: int, deltas: Sequence[SparseDelta], trainer_state: dict,
                    rank: int = 0, world: int = 1, barrier: Callable[[], None] = lambda: None,
                    keep: int = 2) -> Path:
    root = output_dir / CKPT_DIR
    name = f"step_{step:08d}"
    final, tmp = root / name, root / f".{name}.tmp"
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    barrier()
    tensors = {}
    for d in deltas:
        for key, t in d.state_dict().items():
            tensors[f"{d.name}/{key}"] = t.detach().contiguous().cpu()
        tensors[f"{d.name}/offset"] = torch.tensor([d.offset, d.length], dtype=torch.int64)
    save_file(tensors, str(tmp / _rank_file(rank)))
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


def load_deltas(ckpt: Path, deltas: Sequence[SparseDelta], rank: int = 0) -> None:
    """Restore the SEFT state saved by the same rank of a run at the same world size."""
    tensors = load_file(str(ckpt / _rank_file(rank)))
    for d in deltas:
        off, length = tensors[f"{d.name}/offset"].tolist()
        if (off, length) != (d.offset, d.length):
            raise ValueError(f"{ckpt}: {d.name} was saved as flat range [{off}, {off + length}) "
                             f"but this rank holds [{d.offset}, {d.offset + d.length})")
        prefix = f"{d.name}/"
        d.load_state_dict({k[len(prefix):]: v.to(d.base.device) for k, v in tensors.items()
                           if k.startswith(prefix)})
