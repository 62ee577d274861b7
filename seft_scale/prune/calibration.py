"""Calibration windows, sampled the way the Wanda / SparseGPT code samples C4: `nsamples`
windows of `seqlen` consecutive tokens at seeded random offsets of the tokenised text."""
from __future__ import annotations

from pathlib import Path

import torch

from seft_scale.config import DataConfig
from seft_scale.data import tokenizer_training_text
from seft_scale.errors import ConfigError
from seft_scale.paths import resolve_source


def read_calibration_text(source: str | Path, max_chars: int = 64 << 20) -> str:
    """Calibration text: a local .txt file as it is, or the documents of any source the data layer
    reads (.json/.jsonl(.gz)/.parquet/.csv with a `text` column, a folder of .txt files, a Hugging
    Face dataset name such as allenai/c4 when a hub is reachable), joined, up to max_chars."""
    path = Path(source)
    if path.is_file() and path.suffix == ".txt":
        try:
            return path.read_text(encoding="utf-8")
        except UnicodeDecodeError as e:
            raise ConfigError(f"prune.calib_data (--calib-data): {path} is not UTF-8 text ({e})") from None
    src = resolve_source(str(source), "auto", None, "prune.calib_data (--calib-data)")
    return tokenizer_training_text(DataConfig(train=src, kind="text"), max_chars=max_chars)


def tokenize(text: str, tokenizer, chunk_chars: int = 1 << 16) -> torch.Tensor:
    """Token ids of `text`, encoded in line-aligned chunks: the fast tokenizer's per-token
    bookkeeping for one multi-MB string would otherwise cost far more memory than the ids."""
    ids, start = [], 0
    while start < len(text):
        end = len(text) if start + chunk_chars >= len(text) else text.find("\n", start + chunk_chars) + 1
        end = end or len(text)
        ids.append(torch.tensor(tokenizer(text[start:end], add_special_tokens=False)["input_ids"],
                                dtype=torch.int64))
        start = end
    return torch.cat(ids) if ids else torch.zeros(0, dtype=torch.int64)


def calibration_windows(text: str, tokenizer, nsamples: int, seqlen: int, seed: int) -> torch.Tensor:
    """[nsamples, seqlen] token ids: windows starting at seeded uniform offsets of the text.

    The text must hold at least nsamples·seqlen tokens, so the windows can cover distinct text."""
    ids = tokenize(text, tokenizer)
    need = nsamples * seqlen
    if len(ids) < need:
        raise ConfigError(f"prune.calib_data (--calib-data): the text has {len(ids)} tokens; "
                          f"nsamples × seqlen = {nsamples} × {seqlen} needs {need}. Give more text "
                          "or lower nsamples / seqlen")
    g = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, len(ids) - seqlen + 1, (nsamples,), generator=g)
    return torch.stack([ids[s: s + seqlen] for s in starts.tolist()])
