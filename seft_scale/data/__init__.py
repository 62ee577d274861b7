"""Training data: token blocks and a deterministic, resumable batch order."""
from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import torch

from seft_scale.config import ConfigError, DataConfig


@dataclass
class TokenSplit:
    """Fixed-length examples: input_ids [N, seq_len]; labels the same ids, -100 where no loss."""

    input_ids: torch.Tensor
    labels: torch.Tensor

    def __len__(self) -> int:
        return len(self.input_ids)

    def batch(self, idx: torch.Tensor, device) -> dict[str, torch.Tensor]:
        return {"input_ids": self.input_ids[idx].to(device), "labels": self.labels[idx].to(device)}


@dataclass
class TokenBlocks:
    """Training examples and the held-out validation examples."""

    train: TokenSplit
    val: TokenSplit


def read_text(path: str) -> str:
    try:
        return Path(path).read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise ConfigError(f"data.train: {path} is not UTF-8 text ({e})") from None


def pack_text(text: str, tokenizer, cfg: DataConfig) -> TokenBlocks:
    """Tokenise, pack into blocks of seq_len (remainder dropped), hold out the last blocks."""
    ids = torch.tensor(tokenizer(text, add_special_tokens=False)["input_ids"], dtype=torch.int64)
    n = len(ids) // cfg.seq_len
    n_val = int(round(n * cfg.val_fraction))
    if n - n_val < 1:
        raise ConfigError(f"data.train: {len(ids)} tokens make {n} blocks of data.seq_len="
                          f"{cfg.seq_len}; need at least {n_val + 1}")
    blocks = ids[: n * cfg.seq_len].view(n, cfg.seq_len)
    train, val = blocks[: n - n_val], blocks[n - n_val:]
    return TokenBlocks(train=TokenSplit(train, train), val=TokenSplit(val, val))


def build_data(cfg: DataConfig, tokenizer) -> TokenBlocks:
    """The run's training and validation examples."""
    return pack_text(read_text(cfg.train), tokenizer, cfg)


def batch_indices(num_blocks: int, micro_batch: int, batch_size: int, seed: int,
                  rank: int = 0, world: int = 1) -> torch.Tensor:
    """Block indices of global micro-batch number `micro_batch` for `rank`.

    Blocks are visited in a seeded permutation per epoch; global micro-batch b holds the
    batch_size·world consecutive entries starting at b·batch_size·world, rank r taking its own
    batch_size of them. Depends only on (seed, b): resuming needs only the micro-batch counter."""
    per = batch_size * world
    start = micro_batch * per + rank * batch_size
    out = []
    for i in range(start, start + batch_size):
        epoch, j = divmod(i, num_blocks)
        out.append(int(_epoch_order(num_blocks, seed, epoch)[j]))
    return torch.tensor(out, dtype=torch.int64)


@lru_cache(maxsize=4)
def _epoch_order(num_blocks: int, seed: int, epoch: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return torch.randperm(num_blocks, generator=g)
