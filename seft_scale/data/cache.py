"""Tokenised data on disk: one safetensors file per (source contents, tokenizer, data settings).

The file is written under a temporary name and renamed into place, so a crash never leaves a
partial file under a real name; a file that does not load, or does not hold what its key
promises, is ignored and rebuilt. Concurrent writers (ranks of one job) race harmlessly: the
contents are identical and the rename is atomic.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import tempfile
from pathlib import Path
from typing import Optional

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from seft_scale.config import DataConfig

log = logging.getLogger(__name__)

CACHE_VERSION = 2
"""Part of every key: bump it when encoding changes what the same inputs produce."""
_NOT_IN_KEY = {"cache_dir", "seed"}  # where the cache is; the seed only orders batches
_TENSORS = ("train_input_ids", "train_labels", "val_input_ids", "val_labels")


def cache_root(cfg: DataConfig) -> Path:
    """data.cache_dir, else $SEFT_CACHE/data, else ~/.cache/seft_scale/data."""
    if cfg.cache_dir:
        return Path(cfg.cache_dir).expanduser()
    return Path(os.environ.get("SEFT_CACHE") or "~/.cache/seft_scale").expanduser() / "data"


def tokenizer_fingerprint(tokenizer) -> str:
    """Vocabulary, merges, normalisation and special tokens: what decides the ids of a text."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    state = (backend.to_str() if backend is not None
             else json.dumps(sorted(tokenizer.get_vocab().items())))
    specials = [type(tokenizer).__name__, tokenizer.bos_token_id, tokenizer.eos_token_id,
                tokenizer.pad_token_id, getattr(tokenizer, "add_bos_token", None),
                getattr(tokenizer, "add_eos_token", None)]
    return hashlib.sha256((state + json.dumps(specials)).encode()).hexdigest()


def cache_key(cfg: DataConfig, tokenizer, source_fingerprints: list[str]) -> str:
    settings = {k: v for k, v in dataclasses.asdict(cfg).items() if k not in _NOT_IN_KEY}
    material = json.dumps({"version": CACHE_VERSION, "settings": settings,
                           "sources": source_fingerprints,
                           "tokenizer": tokenizer_fingerprint(tokenizer)}, sort_keys=True)
    return hashlib.sha256(material.encode()).hexdigest()[:32]


def load_cached(path: Path, seq_len: int) -> Optional[tuple[dict[str, torch.Tensor], dict]]:
    """(tensors, stats), or None when the file is missing, unreadable or inconsistent."""
    if not path.is_file():
        return None

    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in _TENSORS}
        stats = json.loads(meta["stats"])
    except Exception as e:  # truncated / garbled file: any of safetensors' or json's errors
        log.warning("ignoring unreadable data cache %s (%s: %s); rebuilding", path,
                    type(e).__name__, e)
        return None
    ok = all(t.dim() == 2 and t.shape[1] == seq_len for t in tensors.values()) and \
        tensors["train_input_ids"].shape == tensors["train_labels"].shape and \
        tensors["val_input_ids"].shape == tensors["val_labels"].shape and \
        len(tensors["train_input_ids"]) == stats.get("train_examples") and \
        len(tensors["val_input_ids"]) == stats.get("val_examples")
    if not ok:
        log.warning("ignoring inconsistent data cache %s; rebuilding", path)
        return None
    return {k: t.to(torch.int64) for k, t in tensors.items()}, stats


def save_cached(path: Path, tensors: dict[str, torch.Tensor], stats: dict) -> None:
    """Write atomically: temporary file in the same folder, fsync, rename."""

    path.parent.mkdir(parents=True, exist_ok=True)
    # int32 halves the file; every vocabulary fits (ids < 2^31), labels' -100 too
    small = {k: t.to(torch.int32).contiguous() for k, t in tensors.items()}
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        save_file(small, tmp, metadata={"stats": json.dumps(stats)})
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
