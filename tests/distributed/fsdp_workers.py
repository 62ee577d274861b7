"""Rank functions for tests/distributed/test_fsdp.py (module level: the harness pickles them by
reference). Each runs inside an initialised gloo group on a fresh forked process."""
from __future__ import annotations

import os

import torch
import torch.distributed as dist

from seft_scale.backends.fsdp import FSDPBackend
from seft_scale.config import FSDPConfig, ModelConfig, SeftConfig


def state_bytes(deltas) -> int:
    """This rank's SEFT state: slots, optimizer moments, ages, support mask, θ edits, window G."""
    return sum(t.numel() * t.element_size() for d in deltas for t in d.state_dict().values())


class Probe:
    """Records this rank's peak SEFT state (reached in selection windows, when the dense G shard
    exists) and re-checks the exact budget after every topology update of the real method."""

    def __init__(self):
        from seft_scale.seft.method import SeftMethod
        self.peak_state, self.largest_fraction, self.updates_checked = 0, 0.0, 0
        self.real = (SeftMethod.set_capture, SeftMethod.after_backward)
        probe = self

        def set_capture(method, on):
            probe.real[0](method, on)
            deltas = method.deltas
            probe.peak_state = max(probe.peak_state, state_bytes(deltas))
            # no tensor of any matrix's SEFT state may approach the full matrix on one rank
            probe.largest_fraction = max(probe.largest_fraction, max(
                t.numel() / d.numel for d in deltas for t in d.state_dict().values()))

        def after_backward(method, step, lr):
            rec = probe.real[1](method, step, lr)
            if "drop_fraction" in rec:  # a topology update ran
                method.check()
                probe.updates_checked += 1
            return rec
        SeftMethod.set_capture, SeftMethod.after_backward = set_capture, after_backward


def train_worker(rank, world, yaml_path, out, overrides, resume=False, crash_at_step=None,
                 die_at_step=None):
    """One real run of seft_scale.train.train on the FSDP backend. crash_at_step: every rank raises
    in that step's optimizer call; die_at_step: rank 1 exits hard there (no cleanup at all)."""
    from seft_scale.config import load_config
    from seft_scale.seft.optim import SlotAdamW
    from seft_scale.train import train

    if crash_at_step is not None or die_at_step is not None:
        real_step, calls = SlotAdamW.step, {"n": 0}

        def step(self, deltas, lr=None):
            calls["n"] += 1
            if calls["n"] == crash_at_step:
                raise RuntimeError("simulated crash")
            if calls["n"] == die_at_step and rank == 1:
                os._exit(17)
            return real_step(self, deltas, lr)
        SlotAdamW.step = step
    cfg = load_config(yaml_path, overrides)
    probe = Probe()
    summary = train(cfg, out, resume=resume, backend=FSDPBackend(cfg.fsdp), progress=False)
    return {"summary": summary, "peak_state": probe.peak_state,
            "largest_fraction": probe.largest_fraction,
            "updates_checked": probe.updates_checked}


def _full(local: torch.Tensor) -> torch.Tensor:
    """Concatenate every rank's 1-D tensor in rank order (tests only: small tensors)."""
    parts = [None] * dist.get_world_size()
    dist.all_gather_object(parts, local.detach().cpu().numpy())
    return torch.cat([torch.from_numpy(p) for p in parts])


def _plain(x):
    """Tensors as numpy arrays: a tensor put on the result queue travels as a shared-memory handle
    that dies with the worker process."""
    if isinstance(x, torch.Tensor):
        return x.numpy()
    if isinstance(x, dict):
        return {k: _plain(v) for k, v in x.items()}
    if isinstance(x, tuple):
        return tuple(_plain(v) for v in x)
    return x


def _attach(model_dir: str, fsdp: FSDPConfig, seft: SeftConfig):
    from tests.helpers import seft_method
    backend = FSDPBackend(fsdp)
    model, _ = backend.load_model(ModelConfig(path=model_dir), path=model_dir)
    method, model = seft_method(backend, model, seft, fsdp=fsdp)
    return backend, model, method


def _tied_scores(name: str, seed: int, pos: torch.Tensor, levels: int) -> torch.Tensor:
    """A function of the global position only, with many exact ties (broken by position)."""
    from seft_scale.seft.topology import position_noise
    return torch.floor(position_noise(name, seed, pos) * levels) / levels


def topology_worker(rank, world, model_dir, global_batch):
    """(1) the real capture path: δ-gradients and window G of one global batch split over the
    ranks; (2) given identical W, δ and G (functions of the global position), one topology update
    through the backend. Returns full results from rank 0."""
    from seft_scale.seft.optim import SlotAdamW
    from seft_scale.seft.topology import check_budget, init_slots, topology_update
    from seft_scale.seft.window import DenseWindow

    seft = SeftConfig(lora_rank=2)
    backend, model, method = _attach(model_dir, FSDPConfig(), seft)
    deltas, allreduce = method.deltas, backend.comm.allreduce
    opt = SlotAdamW(1e-3)
    init_slots(deltas, 0, opt.seed, allreduce)
    method.slots_changed()
    out = {"rows": {d.name: d.length // d.shape[1] for d in deltas}}

    # (1) one backward with capture on; this rank's share of the global batch
    per = len(global_batch) // world
    ids = global_batch[rank * per:(rank + 1) * per]
    for d in deltas:  # dense window scores: the captured G itself, summed into this rank's rows
        d.window = DenseWindow(d)
    method.set_capture(True)
    (model(input_ids=ids, labels=ids).loss / world).backward()
    method.set_capture(False)
    out["G"] = {d.name: _full(d.window.step) for d in deltas}
    out["dgrad"] = {d.name: (_full(d.pos), _full(d.values.grad)) for d in deltas}

    # (2) identical δ and G at every world size, with ties; θ is the loaded model
    with torch.no_grad():
        for d in deltas:
            d.values.copy_(_tied_scores(d.name, 1, d.pos, 16) - 0.5)
            d.window = DenseWindow(d)
            d.window.add(_tied_scores(d.name, 2, d.offset + torch.arange(d.length), 64))
            d.window.end_step(1.0)
    stats = topology_update(deltas, 0.5, opt.seed, allreduce=allreduce)
    method.slots_changed()
    check_budget(deltas, allreduce)
    out["stats"] = stats.totals()
    out["pos"] = {d.name: _full(d.pos) for d in deltas}
    out["W"] = {d.name: _full(d.effective()).view(d.shape) for d in deltas}
    out["mask"] = {d.name: _full(d.support()).view(d.shape) for d in deltas}
    return _plain(out) if rank == 0 else {"rows": out["rows"]}


def edits_worker(rank, world, model_dir):
    """θ edits in the local shards reach FSDP's next all-gather, for two FSDP settings: fp32 with
    the gathered weights kept from forward to backward (a stale gathered copy must be dropped),
    and bf16 working weights (cast at every gather) with fp32 δ."""
    from seft_scale.seft.topology import init_slots
    from seft_scale.seft.optim import SlotAdamW

    results = {}
    for key, fsdp in {"fp32_keep": FSDPConfig(reshard_after_forward=False),
                      "bf16": FSDPConfig(param_dtype="bfloat16")}.items():
        backend, model, method = _attach(model_dir, fsdp, SeftConfig(lora_rank=2))
        deltas = method.deltas
        init_slots(deltas, 0, SlotAdamW(1e-3).seed, backend.comm.allreduce)
        method.slots_changed()
        d = next(x for x in deltas if x.name.endswith("layers.0.mlp.down_proj"))
        seen = {}
        mod = method.modules[d.name]
        mod.register_forward_pre_hook(lambda m, a: seen.__setitem__("w", m.weight.detach().clone()))
        ids = torch.arange(24).reshape(2, 12) % 50
        with torch.no_grad():
            model(input_ids=ids)  # gathers; with reshard_after_forward=False the copy stays
        before = seen["w"]
        with torch.no_grad():  # what a merge or an adapt prune does to this rank's rows
            d.base[d.support()] += 0.25 * (rank + 1)
            d.base[0] = 0.0
        backend.refresh([x.name for x in deltas])
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        theta = _full(d.base).view(d.shape)
        results[key] = {
            "gathered_dtype": str(seen["w"].dtype), "before_equal": torch.equal(before, seen["w"]),
            "after_is_theta": torch.equal(seen["w"], theta.to(seen["w"].dtype)),
            "delta_dtypes": {str(x.values.dtype) for x in deltas} | {
                str(x.values.grad.dtype) for x in deltas if x.values.grad is not None},
            "loss_finite": bool(torch.isfinite(loss))}
    return results
