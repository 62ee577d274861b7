"""Collectives shared by the sharded backends (zero3, fsdp). No drop/grow logic here.

* `init_distributed`: the process group from torchrun / deepspeed / srun environment variables,
  gloo on CPU and NCCL on CUDA, with a finite timeout so a dead rank ends the job with an error.
* `make_allreduce`: the sum all-reduce the selector and the topology update take.
* `gather_slots`: the full (pos, values) of one matrix from the slots' owners, differentiable:
  backward sums every rank's δ-gradients and hands each owner its own slots' sum.
* `reduce_scatter_flat`: a dense tensor summed over ranks, each rank keeping its flat range
  (the selection-window G into θ's shard layout).
* `peer_guard`: turns a failed collective into a `PeerFailure` naming the phase.
"""
from __future__ import annotations

import contextlib
import datetime
import os
from typing import Callable, Iterator, Optional

import torch
import torch.distributed as dist


def init_distributed(timeout_s: Optional[float] = None) -> tuple[int, int, int]:
    """Initialise the default process group from the launcher's environment; returns
    (rank, world, local_rank). A rank that dies makes the others fail after `timeout_s`
    (SEFT_DIST_TIMEOUT, default 600 s) instead of hanging forever."""
    timeout_s = float(os.environ.get("SEFT_DIST_TIMEOUT", 600)) if timeout_s is None else timeout_s
    if not dist.is_initialized():
        for key in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
            if key not in os.environ:
                raise RuntimeError(f"{key} is not set: start sharded runs with torchrun, deepspeed "
                                   "or srun (see README, 'Multi-GPU and multi-node')")
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        dist.init_process_group(backend, timeout=datetime.timedelta(seconds=timeout_s))
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank)
    return dist.get_rank(), dist.get_world_size(), local_rank


class PeerFailure(RuntimeError):
    """A collective failed: another rank died, hung past SEFT_DIST_TIMEOUT, or lost the network."""


@contextlib.contextmanager
def peer_guard(rank: int, what: str) -> Iterator[None]:
    """Name the phase and the likely cause when a collective fails (gloo/NCCL only say 'connection
    closed' or 'timed out'), so the surviving ranks exit with an error a user can act on."""
    try:
        yield
    except (RuntimeError, dist.DistError) as e:
        text = str(e).lower()
        if isinstance(e, PeerFailure) or not (isinstance(e, dist.DistError) or any(
                k in text for k in ("gloo", "nccl", "connection", "timed out", "timeout", "peer"))):
            raise
        raise PeerFailure(f"rank {rank}: a collective failed during {what}: another rank probably "
                          f"died or hung (look for the first error in the other ranks' logs). "
                          f"Cause: {str(e).splitlines()[0][:300]}") from e


def make_allreduce(group=None) -> Callable[[torch.Tensor], torch.Tensor]:
    """Sum over ranks (on the backend's communication device); a failure is a PeerFailure."""
    rank = dist.get_rank()

    def allreduce(t: torch.Tensor) -> torch.Tensor:
        with peer_guard(rank, "an all-reduce of the trainer or selector"):
            out = t.to(_comm_device()).contiguous()
            dist.all_reduce(out, group=group)
            return out.to(t.device)
    return allreduce


def _comm_device() -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" \
        else torch.device("cpu")


def _gather_padded(t: torch.Tensor, counts: list[int], group) -> torch.Tensor:
    """Concatenate every rank's 1-D `t` (lengths `counts`) in rank order."""
    width = max(counts)
    padded = torch.zeros(width, dtype=t.dtype, device=t.device)
    padded[: len(t)] = t
    out = torch.empty(width * len(counts), dtype=t.dtype, device=t.device)
    dist.all_gather_into_tensor(out, padded, group=group)
    return torch.cat([out[r * width: r * width + c] for r, c in enumerate(counts)])


class _GatherValues(torch.autograd.Function):
    @staticmethod
    def forward(ctx, local_values, counts, rank, group):
        ctx.counts, ctx.rank, ctx.group = counts, rank, group
        return _gather_padded(local_values.detach(), counts, group)

    @staticmethod
    def backward(ctx, grad_full):
        grad = grad_full.contiguous().clone()
        dist.all_reduce(grad, group=ctx.group)  # every rank computed grads for all slots
        start = sum(ctx.counts[: ctx.rank])
        return grad[start: start + ctx.counts[ctx.rank]], None, None, None


def gather_slots(pos: torch.Tensor, values: torch.Tensor, group=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Full (pos, values) of a matrix whose slots are spread over the ranks of `group`.
    Shards own increasing flat ranges in rank order, so the result is sorted by position."""
    world, rank = dist.get_world_size(group), dist.get_rank(group)
    n = torch.tensor([len(pos)], dtype=torch.int64, device=pos.device)
    counts_t = torch.empty(world, dtype=torch.int64, device=pos.device)
    dist.all_gather_into_tensor(counts_t, n, group=group)
    counts = counts_t.tolist()
    full_pos = _gather_padded(pos, counts, group)
    return full_pos, _GatherValues.apply(values, counts, rank, group)


def reduce_scatter_flat(full: torch.Tensor, bounds: list[tuple[int, int]], group=None) -> torch.Tensor:
    """Sum the flat `full` over ranks; return this rank's [start, end) of `bounds[rank]`.
    Bounds are contiguous increasing ranges, possibly of different lengths."""
    world, rank = dist.get_world_size(group), dist.get_rank(group)
    width = max(e - s for s, e in bounds)
    flat = full.reshape(-1)
    chunks = torch.zeros(world, width, dtype=flat.dtype, device=flat.device)
    for r, (s, e) in enumerate(bounds):
        chunks[r, : e - s] = flat[s:e]
    out = torch.empty(width, dtype=flat.dtype, device=flat.device)
    dist.reduce_scatter_tensor(out, chunks.reshape(-1), group=group)
    s, e = bounds[rank]
    return out[: e - s]
