"""Rank functions for tests/distributed/test_zero3.py (module level: the harness pickles them by
reference). Each runs inside an initialised gloo group forked by tests/distributed/harness.py."""
from __future__ import annotations

import copy
import json
import os
import time

import torch

from tests.conftest import ROOT

TINY = str(ROOT / "configs" / "runs" / "tiny.yaml")


def ds_config(name: str = "zero3.json", **zero) -> dict:
    cfg = json.loads((ROOT / "configs" / "ds" / name).read_text())
    cfg["zero_optimization"].update(zero)
    return cfg


def seft_state_bytes(deltas) -> int:
    """Bytes of SEFT state on this rank: support mask, slots, optimizer state, window G."""
    total = 0
    for d in deltas:
        window = d.window.state_dict().values() if d.window is not None else ()
        for t in (d.pos, d.values, d.exp_avg, d.exp_avg_sq, d.age, d.since_grown, d.zeros, d.edited.bits, *window):
            total += t.numel() * t.element_size()
    return total


def _hashed(pos: torch.Tensor, salt: float) -> torch.Tensor:
    """A deterministic float per global flat position (same at every world size)."""
    return torch.sin(pos.double() * 0.7071 + salt).float()


def topology(rank, world, model_dir, ds, updates=3):
    """The real backend on a saved model: captured window G, then `updates` topology updates
    from identical δ and G given as functions of the global flat position. Returns this rank's
    captured G, per-update (positions of slots, support) and the loss after the updates."""
    from seft_scale.backends.zero3 import Zero3Backend
    from seft_scale.config import load_config
    from seft_scale.model import find_targets
    from seft_scale.seft.method import SeftMethod
    from seft_scale.seft.optim import SlotAdamW
    from seft_scale.seft.topology import check_budget, init_slots, topology_update
    from seft_scale.seft.window import DenseWindow

    cfg = load_config(TINY, [f"model.path={model_dir}", "prune.method=none"])
    backend = Zero3Backend(cfg, ds)
    model, _ = backend.load_model(cfg.model, path=model_dir)
    model = backend.wrap(model)
    method = SeftMethod(cfg, backend, model, find_targets(model, cfg.seft.targets))
    deltas, allreduce = method.deltas, backend.comm.allreduce
    opt = SlotAdamW(1e-2)
    init_slots(deltas, 3, opt.seed, allreduce)
    method.slots_changed()
    # one global batch of 6 sequences, split over the ranks (each rank's loss is its mean: scale
    # by its share so the summed G is the global mean gradient)
    tokens = (torch.arange(6 * 32).view(6, 32) * 7919 % 300).long()
    share = torch.tensor_split(torch.arange(6), world)[rank]
    for d in deltas:  # dense window scores: the captured G itself, summed into this rank's range
        d.window = DenseWindow(d)
    method.set_capture(True)
    for _ in range(2):  # two passes: ZeRO keeps persistent weights resident from the second on
        (model(input_ids=tokens[share], labels=tokens[share]).loss * (len(share) / 6 / 2)).backward()
    method.set_capture(False)
    from deepspeed.runtime.zero.partition_parameters import ZeroParamStatus
    gathered = [n for n, p in model.named_parameters()  # ZeRO released every non-persistent weight
                if p.ds_status != ZeroParamStatus.NOT_AVAILABLE and not p.ds_persist]
    # results go back as numpy: torch tensors would travel as shared memory that dies with the rank
    captured = {d.name: d.window.step.numpy().copy() for d in deltas}
    out = {"offsets": {d.name: (d.offset, d.length) for d in deltas}, "G": captured, "updates": [],
           "gathered_after_backward": gathered,
           "partition_device": {d.base.device.type for d in deltas}}
    for u in range(updates):
        for d in deltas:
            gpos = torch.arange(d.length) + d.offset
            d.values = (_hashed(d.pos, u) * 1e-2).requires_grad_(True)
            g = _hashed(gpos, 10 + u).abs()
            g[gpos % 5 == 0] = 0.5  # ties, broken by position
            d.window = DenseWindow(d)
            d.window.add(g)
            d.window.end_step(1.0)
        topology_update(deltas, 0.5, opt.seed, allreduce=allreduce)
        method.slots_changed()
        check_budget(deltas, allreduce)  # raises on every rank if any budget is off
        out["updates"].append({d.name: (d.pos.numpy().copy(), d.support().numpy().copy(),
                                        int(d.support().sum()), len(d.pos)) for d in deltas})
    with torch.no_grad():
        loss = model(input_ids=tokens, labels=tokens).loss
    out["loss"] = float(loss)
    return out


def run(rank, world, out_dir, overrides, ds, crash_at_step=None, resume=False, die_at_step=None,
        late_rank_s=0.0):
    """train() with the zero3 backend. crash_at_step: every rank raises in that step's optimizer
    step (a crash after a checkpoint); die_at_step: rank 1 exits at once (a dead process);
    late_rank_s: the last rank enters train() that much later than the others."""
    from seft_scale.backends.zero3 import Zero3Backend
    from seft_scale.config import load_config
    from seft_scale.seft.method import SeftMethod
    from seft_scale.seft.optim import SlotAdamW
    from seft_scale.train import train

    cfg = load_config(TINY, overrides)
    backend = Zero3Backend(cfg, copy.deepcopy(ds))
    attached = {}
    init = SeftMethod.__init__

    def recording_init(self, *args, **kwargs):
        init(self, *args, **kwargs)
        attached["deltas"] = self.deltas
    SeftMethod.__init__ = recording_init
    calls = {"n": 0}
    step = SlotAdamW.step

    def failing_step(self, deltas, lr=None):
        calls["n"] += 1
        if calls["n"] == crash_at_step:
            raise RuntimeError("simulated crash")
        if calls["n"] == die_at_step and rank == 1:
            os._exit(3)
        return step(self, deltas, lr)
    SlotAdamW.step = failing_step
    if rank == world - 1:
        time.sleep(late_rank_s)
    t0 = time.perf_counter()
    try:
        summary = train(cfg, out_dir, resume=resume, backend=backend, progress=False)
    except RuntimeError as e:
        return {"error": f"{type(e).__name__}: {e}", "elapsed_s": time.perf_counter() - t0}
    finally:
        SlotAdamW.step, SeftMethod.__init__ = step, init
    return {"summary": summary, "state_bytes": seft_state_bytes(attached["deltas"]),
            "partition_numel": sum(d.length for d in attached["deltas"])}
