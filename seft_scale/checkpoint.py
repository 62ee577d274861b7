"""Atomic, resumable checkpoints: each rank's method state (safetensors) + trainer state (JSON).

Layout:  <output>/checkpoints/step_000040/{trainer.json, slots-rank00000.safetensors, ...}
          <output>/checkpoints/latest   (the name of the newest complete checkpoint)
A checkpoint folder is written under a temporary name and renamed when complete, then `latest`
is replaced atomically, so a run killed at any moment leaves the previous checkpoint intact.
What the tensors are is the method's business (SEFT's reshard to any world size:
seft_scale/seft/checkpoint.py).
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Callable, Optional

import torch
from safetensors.torch import save_file

CKPT_DIR = "checkpoints"


RANK_FILES = "slots-rank*.safetensors"


def rank_file(rank: int) -> str:
    return f"slots-rank{rank:05d}.safetensors"


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
