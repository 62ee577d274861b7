"""Fixed-length token examples and the deterministic, resumable order they are visited in."""
from __future__ import annotations

from dataclasses import dataclass, field
from functools import lru_cache

import torch

IGNORE_INDEX = -100
"""Label of a position without loss (prompt and padding); what HF causal-LM losses skip."""


@dataclass
class TokenSplit:
    """Fixed-length examples: input_ids [N, seq_len]; labels the same ids, -100 where no loss.

    Padding is on the right with labels -100, so a causal LM needs no attention mask: no real
    token ever attends to a pad."""

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
    stats: dict = field(default_factory=dict)
    """What building them found: example counts, truncations, tokens, cache file."""


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
        out.append(int(epoch_order(num_blocks, seed, epoch)[j]))
    return torch.tensor(out, dtype=torch.int64)


@lru_cache(maxsize=4)
def epoch_order(num_blocks: int, seed: int, epoch: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return torch.randperm(num_blocks, generator=g)
