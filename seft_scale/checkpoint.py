"""Atomic, resumable checkpoints: each rank's method state (safetensors) + trainer state (JSON).

Layout:  <output>/checkpoints/step_000040/{trainer.json, slots-rank00000.safetensors, ...}
          <output>/checkpoints/latest   (the name of the newest checkpoint written, for people)
A checkpoint folder is written under a temporary name and renamed when complete, so a run killed
at any moment leaves the previous checkpoints intact; old ones are renamed away before they are
removed, so a half-removed folder never carries a checkpoint's name. trainer.json lists every
rank file with its size and tensor count, and a resume trusts a folder only when they all open
and match (`check_checkpoint`): it takes the newest complete checkpoint and sets aside, never
deletes, one it could not read (`find_resume_point`). What the tensors are is the method's
business (SEFT's reshard to any world size: seft_scale/seft/checkpoint.py).
"""
from __future__ import annotations

import json
import os
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

CKPT_DIR = "checkpoints"
RANK_FILES = "slots-rank*.safetensors"
_STEP_DIR = re.compile(r"step_\d{8}")
UNREADABLE_SUFFIX = ".unreadable"


def write_text_atomic(path: Path, text: str) -> None:
    """`path` holds the old text or the new one, never a part: written beside, then renamed."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def rank_file(rank: int) -> str:
    return f"slots-rank{rank:05d}.safetensors"


def _tensor_count(path: Path) -> int:
    with safe_open(str(path), "pt") as f:
        return len(list(f.keys()))


def save_checkpoint(output_dir: Path, step: int, tensors: dict[str, torch.Tensor], trainer_state: dict,
                    rank: int = 0, world: int = 1, barrier: Callable[[], None] = lambda: None,
                    keep: int = 2) -> Path:
    """Write this rank's `tensors` and (rank 0) the trainer state as checkpoint `step`; then keep
    the newest `keep` checkpoints."""
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
        files = {rank_file(r): {"bytes": (tmp / rank_file(r)).stat().st_size,
                                "tensors": _tensor_count(tmp / rank_file(r))} for r in range(world)}
        state = dict(trainer_state, step=step, world_size=world, files=files)
        (tmp / "trainer.json").write_text(json.dumps(state, indent=1))
        if final.exists():  # only a checkpoint of this very step (same state) can be here
            _remove(final)
        os.replace(tmp, final)
        write_text_atomic(root / "latest", name)
        for old in step_dirs(output_dir)[keep:]:
            _remove(old)
    barrier()
    return final


def _remove(folder: Path) -> None:
    """Rename, then delete: a removal killed half-way leaves a hidden folder, not a damaged
    checkpoint under its own name."""
    doomed = folder.with_name(f".{folder.name}.removing")
    shutil.rmtree(doomed, ignore_errors=True)
    os.replace(folder, doomed)
    shutil.rmtree(doomed, ignore_errors=True)


def step_dirs(output_dir: Path) -> list[Path]:
    """The checkpoint folders (complete or not), newest first."""
    root = output_dir / CKPT_DIR
    if not root.is_dir():
        return []
    return sorted((p for p in root.iterdir() if p.is_dir() and _STEP_DIR.fullmatch(p.name)),
                  reverse=True)


def check_checkpoint(ckpt: Path) -> Optional[str]:
    """Why `ckpt` cannot be resumed from, or None when it is complete: trainer.json parses and
    names its step and world size, and every rank file it lists opens as safetensors (header and
    every byte it names) with the size and tensor count trainer.json recorded. Reads headers only."""
    try:
        state = json.loads((ckpt / "trainer.json").read_text())
    except FileNotFoundError:
        return "trainer.json is missing"
    except (OSError, ValueError) as e:
        return f"trainer.json does not parse ({e})"
    if not isinstance(state, dict) or not all(isinstance(state.get(k), int) for k in ("step", "world_size")):
        return "trainer.json names no step and world_size"
    # checkpoints written before trainer.json listed its files: every rank's file must open
    files = state.get("files") or {rank_file(r): {} for r in range(state["world_size"])}
    for name, expect in files.items():
        path = ckpt / name
        if not path.is_file():
            return f"{name} is missing"
        if "bytes" in expect and path.stat().st_size != expect["bytes"]:
            return f"{name} has {path.stat().st_size} bytes, trainer.json says {expect['bytes']}"
        try:
            count = _tensor_count(path)
        except (SafetensorError, OSError) as e:
            return f"{name} does not open ({str(e).splitlines()[0]})"
        if "tensors" in expect and count != expect["tensors"]:
            return f"{name} holds {count} tensors, trainer.json says {expect['tensors']}"
    return None


@dataclass
class ResumePoint:
    """What a resume found in a run's checkpoints."""

    checkpoint: Optional[Path]
    """The newest complete checkpoint; None: the run starts from step 1."""
    unreadable: list[tuple[Path, str]] = field(default_factory=list)
    """Newer checkpoint folders that are not complete, with the reason: set aside, not deleted."""


def find_resume_point(output_dir: Path) -> ResumePoint:
    """The newest complete checkpoint and the incomplete ones newer than it (read-only)."""
    point = ResumePoint(None)
    for ckpt in step_dirs(output_dir):
        reason = check_checkpoint(ckpt)
        if reason is None:
            point.checkpoint = ckpt
            break
        point.unreadable.append((ckpt, reason))
    return point


def set_aside(ckpt: Path) -> Path:
    """Rename an unreadable checkpoint folder so that no later save or clean-up touches it."""
    target = ckpt.with_name(ckpt.name + UNREADABLE_SUFFIX)
    n = 1
    while target.exists():
        target, n = ckpt.with_name(f"{ckpt.name}{UNREADABLE_SUFFIX}-{n}"), n + 1
    os.replace(ckpt, target)
    return target


def latest_checkpoint(output_dir: Path) -> Optional[Path]:
    """The newest complete checkpoint of a run, or None."""
    return find_resume_point(output_dir).checkpoint


def load_trainer_state(ckpt: Path) -> dict:
    return json.loads((ckpt / "trainer.json").read_text())
