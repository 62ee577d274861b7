"""SeftMethod: SEFT over the shards a backend hands out, as the training loop drives it.

Per target matrix this rank holds a SparseDelta over its shard of θ. The delta enters the
forward through SparseDeltaLinear, which gets the matrix's full (pos, δ) from the slots' owners
(`Comm.gather_slots`; the identity on one process). In selection windows each target's dense G
is summed over ranks into the shard layout (`Comm.reduce_scatter_flat`) and accumulated; every
ΔT steps drop -> grow -> adapt runs one decoder layer at a time (seft/topology.py). At the end
the deltas are merged into each rank's own shard of θ, so the backend saves a plain model.
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import TYPE_CHECKING, Optional, Sequence

import torch
from torch import nn

from seft_scale.config import RunConfig
from seft_scale.errors import ConfigError
from seft_scale.model import SafetensorsFolder
from seft_scale.seft.budget import slot_capacity
from seft_scale.seft.checkpoint import delta_tensors, load_deltas
from seft_scale.seft.delta import SparseDelta
from seft_scale.seft.kernels import SparseDeltaLinear, choose_kernel
from seft_scale.seft.optim import SlotAdamW, clip_slot_grads
from seft_scale.seft.schedule import drop_fraction, in_window, is_update_step
from seft_scale.seft.topology import check_budget, init_slots, topology_update
from seft_scale.sparsity import COUNTS, nm_cut_groups_over, nm_shard_groups, report_entry, shard_counts

if TYPE_CHECKING:  # the method takes any backend; it needs only the protocol's names
    from seft_scale.backends.base import Backend


def layer_groups(deltas: Sequence[SparseDelta]) -> list[list[SparseDelta]]:
    """The deltas one decoder layer at a time: selection scratch (candidates, scores, keys: ~28 B
    per weight of the shard) then exists for one layer, not the whole model, at the cost of one
    selector call per layer instead of one per model."""
    groups: dict[str, list[SparseDelta]] = {}
    for d in deltas:
        m = re.search(r"^(.*?\.\d+)\.", d.name)
        groups.setdefault(m.group(1) if m else "", []).append(d)
    return list(groups.values())


def set_grad_capture(modules: dict[str, nn.Module], deltas: Sequence[SparseDelta], on: bool,
                     to_shard) -> None:
    """While on, each backward of a target adds `to_shard(d, G)` — its dense weight gradient,
    summed over ranks, over this rank's shard — into d.grad_acc (fp32, allocated at the window's
    first step)."""
    for d in deltas:
        mod = modules[d.name]
        if not on:
            mod.seft_dense_grad_hook = None
            continue
        if d.grad_acc is None:
            d.grad_acc = torch.zeros(d.length, dtype=torch.float32, device=d.base.device)

        def hook(G: torch.Tensor, d: SparseDelta = d) -> None:
            d.grad_acc.add_(to_shard(d, G).to(d.grad_acc.device, torch.float32))
        mod.seft_dense_grad_hook = hook


class SeftMethod:
    """The sparse delta: slot AdamW on δ, dense G in selection windows, drop/grow/adapt."""

    name = "seft"

    def __init__(self, cfg: RunConfig, backend: "Backend", model: nn.Module,
                 targets: Sequence[tuple[str, nn.Linear]], tokenizer=None):
        self.cfg, self.backend, self.comm, self.nm = cfg, backend, backend.comm, cfg.prune.nm
        s = cfg.seft
        for p in model.parameters():
            p.requires_grad_(False)
        shards = backend.shards(model, targets)
        self.deltas = [SparseDelta(sh.name, sh.shape, sh.offset, sh.view, budget=-1, capacity=-1)
                       for sh in shards]
        budgets = self.comm.allreduce(torch.tensor([int(d.mask.sum()) for d in self.deltas],
                                                   dtype=torch.int64))
        for d, b in zip(self.deltas, budgets.tolist()):
            d.budget, d.capacity = b, slot_capacity(d.shape, s)
            if d.capacity > d.budget:
                key = "seft.lora_rank" if s.lora_rank is not None else "seft.density"
                raise ConfigError(f"{key}: {d.name} would get K={d.capacity} slots but has only "
                                  f"{d.budget} nonzeros; lower {key}")
        self.modules = {sh.name: sh.module for sh in shards}
        self.bounds = {sh.name: sh.bounds for sh in shards}
        for sh, d in zip(shards, self.deltas):
            kernel = s.kernel if s.kernel != "auto" else choose_kernel(
                d.capacity, d.numel, s.gather_cost_ratio)
            SparseDeltaLinear.attach(sh.module, lambda d=d: self.comm.gather_slots(d.pos, d.values),
                                     kernel)
        t = cfg.train
        self.opt = SlotAdamW(t.lr, (t.beta1, t.beta2), t.eps, t.weight_decay)
        self.numel = sum(d.numel for d in self.deltas)

    # -- the loop's calls -----------------------------------------------------------------------
    def init_state(self) -> None:
        for group in layer_groups(self.deltas):
            init_slots(group, self.cfg.seft.init_seed, lambda g: self.opt.seed(g, 0),
                       self.comm.allreduce)

    def load(self, ckpt: Path) -> None:
        load_deltas(ckpt, self.deltas)
        self.backend.refresh([d.name for d in self.deltas])

    def state_tensors(self) -> dict[str, torch.Tensor]:
        return delta_tensors(self.deltas)

    def set_capture(self, on: bool) -> None:
        """Selection-window capture of the dense G on (every backward adds it) or off."""
        dtype = self.backend.grad_dtype
        set_grad_capture(self.modules, self.deltas, on, lambda d, G: self.comm.reduce_scatter_flat(
            G, self.bounds[d.name], dtype))

    def before_step(self, step: int) -> dict:
        s, T = self.cfg.seft, self.cfg.train.steps
        window = in_window(step, s.update_interval, s.window, T)
        self.set_capture(window)
        return {"window": window}

    def after_backward(self, step: int, lr: float) -> dict:
        s, t, allreduce = self.cfg.seft, self.cfg.train, self.comm.allreduce
        rec = {"grad_norm": clip_slot_grads(self.deltas, t.max_grad_norm, allreduce),
               "dropped": 0, "grown": 0, "reactivated": 0, "adapt_pruned": 0}
        self.opt.step(self.deltas, lr)
        if is_update_step(step, s.update_interval, t.steps):
            self.set_capture(False)
            p = drop_fraction(step, t.steps, s.drop_rate, s.drop_schedule)
            for group in layer_groups(self.deltas):
                stats = topology_update(
                    group, p, s.window, lambda g: self.opt.seed(g, s.window),
                    merge_dropped=s.merge_dropped, reactivation=s.reactivation,
                    nm=self.nm is not None, criterion=s.adapt_criterion, allreduce=allreduce)
                for key, value in stats.totals().items():
                    rec[key] += value
            self.backend.refresh([d.name for d in self.deltas])
            rec["drop_fraction"] = p
        return rec

    def check(self) -> None:
        check_budget(self.deltas, self.comm.allreduce, self.nm)

    def local_counts(self) -> tuple[int, int]:
        """(support positions, trainable values) held by this rank."""
        return sum(int(d.mask.sum()) for d in self.deltas), sum(len(d.pos) for d in self.deltas)

    def finish(self) -> None:
        self.set_capture(False)
        self.check()

    # -- the end ---------------------------------------------------------------------------------
    @torch.no_grad()
    def merge(self, start_dir: Optional[Path]) -> dict:
        """W = θ + S written into each rank's own shard of θ (rounded once, from fp32), the
        modules made plain Linears again, and the report of every target (summed over ranks)."""
        start = SafetensorsFolder(start_dir) if start_dir is not None else None
        rows, edges = [], []
        for d in self.deltas:
            idx = d.local_index()
            d.base[idx] = (d.base[idx].to(torch.float32) + d.values.detach()).to(d.base.dtype)
            ref = start.get_flat(f"{d.name}.weight", d.offset, d.offset + d.length) \
                if start is not None else None
            counts = shard_counts(d.base, d.mask, ref)
            bad, edge = nm_shard_groups(d.base != 0, d.offset, *self.nm) if self.nm else (0, [-1] * 4)
            rows.append(counts + [bad])
            edges.append(edge)
        self.backend.refresh([d.name for d in self.deltas])
        for mod in self.modules.values():
            mod.detach_delta()
        totals = self.comm.allreduce(torch.tensor(rows, dtype=torch.int64)).tolist()
        all_edges = self.comm.gather_flat(torch.tensor(edges, dtype=torch.int64).reshape(-1),
                                          [4 * len(edges)] * self.comm.world)
        all_edges = all_edges.view(self.comm.world, len(edges), 4)
        report = {}
        for i, (d, row) in enumerate(zip(self.deltas, totals)):
            nm_ok = None
            if self.nm:
                nm_ok = row[len(COUNTS)] + nm_cut_groups_over(all_edges[:, i].tolist(), self.nm[0]) == 0
            report[d.name] = report_entry(d.shape, d.budget, row[:len(COUNTS)], start is not None, nm_ok)
        return report
