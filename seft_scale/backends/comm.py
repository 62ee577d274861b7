"""How ranks talk: every collective of the trainer, the selector and the backends, in one place.

`Comm` is the one object the rest of the code holds. With one process (with or without a process
group) every call is the identity (a sum over one rank), so the same code runs at any world size:

* `allreduce`: the sum the selector, the topology update and the loop's metrics take;
* `gather_slots`: the full (pos, values) of one matrix from the slots' owners, differentiable —
  its backward sums every rank's δ-gradients and hands each owner its own slots' sum;
* `reduce_scatter_flat`: a dense tensor summed over ranks, each rank keeping its flat range (the
  selection-window G into θ's shard layout);
* `gather_flat`: every rank's part of a flat tensor, concatenated (on every rank);
* `wait`: a barrier for work ranks do alone or at their own pace (rank 0 loading, pruning or
  saving a model; every rank tokenising data or writing its checkpoint file);
* `guard`: a failed collective becomes a `PeerFailure` naming the phase.

`init_distributed` creates the default group from torchrun / deepspeed / srun environment
variables: gloo on CPU, NCCL on CUDA. How long a rank waits for the others:

* SEFT_DIST_TIMEOUT (seconds, default 300): every collective of the training loop. A rank that
  dies is noticed within about a second (its connections close); one that hangs (a stuck GPU, a
  deadlocked filesystem) stops the others after this long. A training step of a 70B model on a
  cluster takes seconds, so five minutes is a wide margin and costs little of an allocation.
* SEFT_DIST_SETUP_TIMEOUT (seconds, default 7200): `wait`, on a side group of its own (gloo,
  whatever the default group's backend) — minutes of rank 0 reading or writing 140 GB, or of
  calibrating a pruner, must not count as a hung rank.
"""
from __future__ import annotations

import contextlib
import datetime
import os
from typing import Iterator, Optional, Sequence

import torch
import torch.distributed as dist

from seft_scale.errors import ConfigError


DEFAULT_TIMEOUT_S = 300.0
"""SEFT_DIST_TIMEOUT when unset: how long a collective waits for a rank that stopped answering."""
DEFAULT_SETUP_TIMEOUT_S = 7200.0
"""SEFT_DIST_SETUP_TIMEOUT when unset: how long `Comm.wait` waits for work done alone."""
_WAIT_GROUP = None  # the side group of Comm.wait, made beside the default group


def timeout_from_env(name: str, default: float) -> float:
    raw = os.environ.get(name)
    if raw is None or raw == "":
        return default
    try:
        value = float(raw)
    except ValueError:
        value = -1.0
    if not value > 0 or value == float("inf"):
        raise ConfigError(f"{name}: expected seconds (a number > 0), got {raw!r}")
    return value


def init_distributed(timeout_s: Optional[float] = None) -> tuple[int, int, int]:
    """Initialise the default process group from the launcher's environment; returns
    (rank, world, local_rank). A rank that hangs makes the others fail after `timeout_s`
    (SEFT_DIST_TIMEOUT, default DEFAULT_TIMEOUT_S) instead of holding them forever."""
    timeout_s = timeout_from_env("SEFT_DIST_TIMEOUT", DEFAULT_TIMEOUT_S) if timeout_s is None else timeout_s
    setup_s = max(timeout_from_env("SEFT_DIST_SETUP_TIMEOUT", DEFAULT_SETUP_TIMEOUT_S), timeout_s)
    if not dist.is_initialized():
        for key in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
            if key not in os.environ:
                raise RuntimeError(f"{key} is not set: start sharded runs with torchrun, deepspeed "
                                   "or srun (see README, 'Use')")
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        dist.init_process_group(backend, timeout=datetime.timedelta(seconds=timeout_s))
        # every rank creates it here, in the same order: made later, the first Comm.wait would
        # itself wait under the default group's timeout
        _make_wait_group(setup_s)
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
                          f"died or hung (look for the first error in the other ranks' logs; a hung "
                          f"rank is given up on after SEFT_DIST_TIMEOUT seconds, see README). "
                          f"Cause: {str(e).splitlines()[0][:300]}") from e


def _make_wait_group(setup_s: Optional[float] = None):
    global _WAIT_GROUP
    if setup_s is None:
        setup_s = timeout_from_env("SEFT_DIST_SETUP_TIMEOUT", DEFAULT_SETUP_TIMEOUT_S)
    _WAIT_GROUP = dist.new_group(backend="gloo", timeout=datetime.timedelta(seconds=setup_s))
    return _WAIT_GROUP


Bounds = Sequence[tuple[int, int]]


class Comm:
    """Collectives over the default process group, or over one process when there is none."""

    def __init__(self):
        initialized = dist.is_available() and dist.is_initialized()
        self.rank = dist.get_rank() if initialized else 0
        self.world = dist.get_world_size() if initialized else 1
        self.grouped = self.world > 1  # a group of one needs no collective: every call is local
        # NCCL moves CUDA tensors only; gloo CPU tensors
        self.device = torch.device("cuda", torch.cuda.current_device()) \
            if self.grouped and dist.get_backend() == "nccl" else torch.device("cpu")

    def guard(self, what: str):
        return peer_guard(self.rank, what)

    def allreduce(self, t: torch.Tensor) -> torch.Tensor:
        """The sum over ranks (a new tensor on t's device)."""
        if not self.grouped:
            return t
        with self.guard("an all-reduce of the trainer or selector"):
            out = t.to(self.device).contiguous()
            dist.all_reduce(out)
            return out.to(t.device)

    def barrier(self) -> None:
        if self.grouped:
            with self.guard("a barrier"):
                dist.barrier()

    def wait(self, what: str) -> None:
        """Every rank here, however long one of them took to come (`what` it was doing): up to
        SEFT_DIST_SETUP_TIMEOUT, on the side group. A rank that dies still ends the wait at once."""
        if not self.grouped:
            return
        group = _WAIT_GROUP
        if group is None:  # the default group was made elsewhere: a side group now, on every rank
            group = _make_wait_group()
        with self.guard(what):
            dist.barrier(group=group)

    def broadcast_object(self, obj, src: int = 0):
        """`obj` of rank `src`, on every rank (a tokenizer, a small dict)."""
        if not self.grouped:
            return obj
        box = [obj]
        with self.guard("a broadcast from rank 0"):
            dist.broadcast_object_list(box, src=src)
        return box[0]

    def gather_flat(self, local: torch.Tensor, counts: Sequence[int]) -> torch.Tensor:
        """Every rank's 1-D `local` (rank r holds counts[r] elements), concatenated in rank order."""
        if not self.grouped:
            return local
        width = max(counts)
        if len(local) == width:
            padded = local.contiguous()
        else:
            padded = torch.zeros(width, dtype=local.dtype, device=self.device)
            padded[: len(local)] = local
        out = torch.empty(width * len(counts), dtype=local.dtype, device=self.device)
        with self.guard("an all-gather"):
            dist.all_gather_into_tensor(out, padded)
        if all(c == width for c in counts):  # no padding to cut out (e.g. ZeRO's equal partitions)
            return out
        return torch.cat([out[r * width: r * width + c] for r, c in enumerate(counts)])

    def counts(self, n: int) -> list[int]:
        """Every rank's `n`."""
        if not self.grouped:
            return [n]
        return self.gather_flat(torch.tensor([n], dtype=torch.int64), [1] * self.world).tolist()

    def gather_slots(self, pos: torch.Tensor, values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Full (pos, values) of a matrix whose slots are spread over the ranks; shards own
        increasing flat ranges in rank order, so the result is sorted by position."""
        if not self.grouped:
            return pos, values
        counts = self.counts(len(pos))
        return self.gather_flat(pos, counts), _GatherValues.apply(values, counts, self)

    def reduce_scatter_flat(self, full: torch.Tensor, bounds: Bounds,
                            dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """Sum the flat `full` over ranks in `dtype`; return this rank's [start, end) of
        `bounds[rank]` (contiguous increasing ranges, possibly of different lengths)."""
        if not self.grouped:
            return full.reshape(-1).to(dtype)
        flat = full.reshape(-1).to(self.device, dtype)
        width = max(e - s for s, e in bounds)
        chunks = torch.zeros(self.world, width, dtype=flat.dtype, device=flat.device)
        for r, (s, e) in enumerate(bounds):
            chunks[r, : e - s] = flat[s:e]
        out = torch.empty(width, dtype=flat.dtype, device=flat.device)
        with self.guard("a reduce-scatter of the window gradient"):
            dist.reduce_scatter_tensor(out, chunks.reshape(-1))
        s, e = bounds[self.rank]
        return out[: e - s]


class _GatherValues(torch.autograd.Function):
    @staticmethod
    def forward(ctx, local_values, counts, comm):
        ctx.counts, ctx.comm, ctx.device = counts, comm, local_values.device
        return comm.gather_flat(local_values.detach(), counts)

    @staticmethod
    def backward(ctx, grad_full):
        comm = ctx.comm
        grad = comm.allreduce(grad_full.contiguous())  # every rank computed grads for all slots
        start = sum(ctx.counts[: comm.rank])
        return grad[start: start + ctx.counts[comm.rank]].to(ctx.device), None, None
