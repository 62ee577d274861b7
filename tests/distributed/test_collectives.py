"""The shared collectives on real gloo ranks: slot gathering (with its gradient), the flat
reduce-scatter, and the selector across ranks equal to one process."""
import torch

from tests.distributed.harness import run_world


def _gather_worker(rank, world):
    from seft_scale.backends.comm import Comm
    comm = Comm()
    pos = torch.arange(rank * 10, rank * 10 + rank + 1)  # uneven counts: 1, 2, 3
    vals = (pos.float() + 0.5).requires_grad_(True)
    full_pos, full_vals = comm.gather_slots(pos, vals)
    (full_vals * (rank + 1)).sum().backward()  # each rank's loss weights every slot by rank+1
    bounds = [(0, 4), (4, 5), (5, 9)][:world] if world == 3 else [(0, 5), (5, 9)]
    rs = comm.reduce_scatter_flat(torch.arange(9.0) * (rank + 1), bounds)
    return full_pos.tolist(), full_vals.detach().tolist(), vals.grad.tolist(), rs.tolist()


def test_gather_slots_and_grad_reduction():
    out = run_world(_gather_worker, 3)
    expect_pos = [0, 10, 11, 20, 21, 22]
    for rank, (pos, vals, grad, rs) in enumerate(out):
        assert pos == expect_pos and vals == [p + 0.5 for p in expect_pos]
        assert grad == [6.0] * (rank + 1)  # 1 + 2 + 3 summed over ranks, own slots only
        lo, hi = [(0, 4), (4, 5), (5, 9)][rank]
        assert rs == [6.0 * i for i in range(lo, hi)]


def _select_worker(rank, world, scores, k):
    from seft_scale.backends.comm import Comm
    from seft_scale.seft.selection import select_topk
    n = len(scores)
    per = -(-n // world)
    lo, hi = min(rank * per, n), min((rank + 1) * per, n)
    sel = select_topk([scores[lo:hi]], [torch.arange(lo, hi)], [k], True, Comm().allreduce)[0]
    return (torch.nonzero(sel).reshape(-1) + lo).tolist()


def test_selector_across_real_ranks_equals_one_process():
    from seft_scale.seft.selection import select_topk
    g = torch.Generator().manual_seed(0)
    scores = torch.randint(0, 7, (1001,), generator=g).float() / 3
    ref = torch.nonzero(select_topk([scores], [torch.arange(1001)], [333])[0]).reshape(-1).tolist()
    for world in (2, 3):
        got = sum(run_world(_select_worker, world, scores, 333), [])
        assert got == ref
