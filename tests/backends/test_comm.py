"""Comm (seft_scale/backends/comm.py) at one process, with and without a process group of one:
every collective is the identity, gradients included; failed collectives are named.
(2-3 ranks: tests/distributed/test_collectives.py.)"""
import pytest
import torch
import torch.distributed as dist

from seft_scale.backends.comm import Comm, PeerFailure, init_distributed, peer_guard


@pytest.fixture(params=["no group", "group of one"])
def comm(request):
    if request.param == "no group":
        yield Comm()
        return
    assert not dist.is_initialized()
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        yield Comm()
    finally:
        dist.destroy_process_group()


def test_one_process_is_the_identity(comm):
    assert (comm.rank, comm.world, comm.grouped) == (0, 1, False)
    t = torch.arange(6, dtype=torch.float64)
    assert comm.allreduce(t) is t
    comm.barrier()
    tok = {"vocab": 3}
    assert comm.broadcast_object(tok) is tok
    assert torch.equal(comm.gather_flat(t, [6]), t) and comm.counts(6) == [6]


def test_gather_slots_and_reduce_scatter_at_world_one(comm):
    pos = torch.tensor([1, 4, 9])
    values = torch.tensor([0.5, -1.0, 2.0], requires_grad=True)
    full_pos, full_values = comm.gather_slots(pos, values)
    assert torch.equal(full_pos, pos) and torch.equal(full_values, values)
    (full_values * torch.tensor([1.0, 2.0, 3.0])).sum().backward()
    assert torch.equal(values.grad, torch.tensor([1.0, 2.0, 3.0]))  # each slot's own gradient
    g = torch.randn(3, 4, dtype=torch.bfloat16)
    out = comm.reduce_scatter_flat(g, [(0, 12)], torch.float32)
    assert out.dtype == torch.float32 and out.shape == (12,) and torch.equal(out, g.reshape(-1).float())


def test_failed_collectives_are_named():
    with pytest.raises(PeerFailure, match=r"^rank 1: a collective failed during the export: another "
                                          r"rank probably died.*Cause: Connection closed by peer"):
        with peer_guard(1, "the export"):
            raise RuntimeError("Connection closed by peer [127.0.0.1]:29500\nmore detail")
    with pytest.raises(RuntimeError, match="^shape mismatch$"):  # not a collective's failure
        with peer_guard(0, "x"):
            raise RuntimeError("shape mismatch")
    with pytest.raises(ValueError):
        with Comm().guard("x"):
            raise ValueError("timeout")


def test_init_distributed_names_the_missing_variable(monkeypatch):
    for key in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(key, raising=False)
    with pytest.raises(RuntimeError, match="^RANK is not set: start sharded runs with torchrun"):
        init_distributed()
