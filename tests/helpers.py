"""Test helpers: shard simulation in one process (threads), SEFT over a backend without a run,
and a short run of the tiny config."""
from __future__ import annotations

import threading
from typing import Callable

import torch


class ThreadGroup:
    """An in-process stand-in for a process group: `world` threads, a sum all-reduce.

    Lets the full topology update run with its state split into shards exactly as ranks hold it,
    before (and besides) the real multi-process gloo tests."""

    def __init__(self, world: int):
        self.world = world
        self._barrier = threading.Barrier(world)
        self._slots: list = [None] * world
        self._result = None

    def allreduce_for(self, rank: int) -> Callable[[torch.Tensor], torch.Tensor]:
        def allreduce(t: torch.Tensor) -> torch.Tensor:
            self._slots[rank] = t.clone()
            if self._barrier.wait() == 0:
                self._result = torch.stack(self._slots).sum(0)
            self._barrier.wait()
            out = self._result.clone()
            self._barrier.wait()
            return out
        return allreduce

    def run(self, fn: Callable[[int, Callable], object]) -> list:
        """Run fn(rank, allreduce) on `world` threads; returns the per-rank results."""
        results, errors = [None] * self.world, []

        def target(r):
            try:
                results[r] = fn(r, self.allreduce_for(r))
            except BaseException as e:  # noqa: BLE001 - re-raised below
                errors.append(e)
                self._barrier.abort()

        threads = [threading.Thread(target=target, args=(r,)) for r in range(self.world)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
        if errors:
            raise errors[0]
        return results


def shard_bounds(n: int, world: int, rank: int, mode: str = "zero") -> tuple[int, int]:
    """[start, end) of rank's flat range: 'zero' = ceil(n/world) per rank (last short / empty),
    like ZeRO-3's padded flat partitions; 'rows' would be whole rows (FSDP2) — callers pass n
    as rows·cols and handle rows themselves."""
    per = -(-n // world)
    return min(rank * per, n), min((rank + 1) * per, n)


def seft_method(backend, model, seft=None, **run_fields):
    """(SeftMethod, wrapped model): SEFT attached to `model` on `backend`, as a run attaches it
    (wrap, then the method over the targets' shards), with the config's seft section `seft`."""
    from seft_scale.config import RunConfig, SeftConfig
    from seft_scale.model import find_targets
    from seft_scale.seft.method import SeftMethod

    cfg = RunConfig(seft=seft or SeftConfig(), **run_fields)
    model = backend.wrap(model)
    return SeftMethod(cfg, backend, model, find_targets(model, cfg.seft.targets)), model


# configs/runs/tiny.yaml shortened: 4 topology updates in 24 steps, budgets checked every step
TINY_FAST = ["train.steps=24", "seft.update_interval=6", "seft.window=3", "train.check_invariants=true",
             "train.eval_batches=2"]


def train_tiny(tiny_yaml: str, out, *overrides: str, resume: bool = False) -> dict:
    """A run of configs/runs/tiny.yaml with TINY_FAST and `overrides`, on one process."""
    from seft_scale.config import load_config
    from seft_scale.train import train

    return train(load_config(tiny_yaml, TINY_FAST + list(overrides)), out, resume=resume, progress=False)


def pruned_tiny_llama(pattern: str = "unstructured", seed: int = 0):
    """A small random Llama (hidden 32, 2 layers, vocab 64) whose 14 projections keep the larger
    half of each row by |W| (or, for an N:M pattern, the N largest of every M inputs)."""
    from seft_scale.config import ModelConfig, TinyModelConfig
    from seft_scale.model import build_tiny_llama, find_targets
    from seft_scale.prune.masks import keep_mask

    cfg = ModelConfig(tiny=TinyModelConfig(hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                           num_attention_heads=4, num_key_value_heads=2, seed=seed))
    model = build_tiny_llama(cfg, 64, torch.float32, "sdpa")
    with torch.no_grad():
        for _, lin in find_targets(model, [r".*_proj"]):
            lin.weight.mul_(keep_mask(lin.weight.abs(), 0.5, pattern))
    return model
