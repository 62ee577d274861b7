"""SeftMethod: SEFT over the shards a backend hands out, as the training loop drives it.

Per target matrix this rank holds a SparseDelta over its shard of θ. The delta enters the
forward through SparseDeltaLinear, which gets the matrix's full (pos, δ) from the slots' owners
(`Slots`; its own on one process). In selection windows each target's dense G is summed over
ranks into the shard layout (`Comm.reduce_scatter_flat`) and fed to its window scores
(seft/window.py); every ΔT steps drop -> grow -> adapt runs one decoder layer at a time
(seft/topology.py). At the end the deltas are merged into each rank's own shard of θ, so the
backend saves a plain model.
"""
from __future__ import annotations

import math

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
from seft_scale.seft.topology import check_budget, init_slots, topology_update, update_sizes
from seft_scale.seft.window import open_window
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


class Slots:
    """A target's slot source for the kernel (seft/kernels.SlotSource): on one rank the
    SparseDelta's own slots; on several, every rank's slots gathered with the slot counts cached
    between topology updates (no collective or host sync to learn them), and the δ-gradients
    summed back onto their owners."""

    def __init__(self, d: SparseDelta, comm, device: torch.device):
        self.d, self.comm, self.device = d, comm, device
        self.counts: list[int] = [0] * comm.world

    def full(self) -> tuple[torch.Tensor, torch.Tensor]:
        d = self.d
        if not self.comm.grouped:
            return d.pos.to(self.device), d.values.detach().to(self.device)
        return self.comm.gather_flat(d.pos, self.counts), self.comm.gather_flat(d.values.detach(), self.counts)

    def reduce(self, grad_full: torch.Tensor) -> torch.Tensor:
        if not self.comm.grouped:
            return grad_full.to(self.d.values.device)
        ends = torch.tensor(self.counts).cumsum(0).tolist()
        bounds = list(zip([0] + ends[:-1], ends))
        return self.comm.reduce_scatter_flat(grad_full, bounds).to(self.d.values.device)


class Tap:
    """A target's selection-window tap for the kernel (seft/kernels.WindowTap): the dense G (or
    G sampled at every rank's candidates) of each micro-batch, summed over ranks onto the shard
    that owns each position, into the window scores."""

    def __init__(self, d: SparseDelta, comm, bounds, dtype: torch.dtype):
        self.d, self.comm, self.bounds, self.dtype = d, comm, bounds, dtype
        self.counts: Optional[list[int]] = None  # every rank's candidate count, once chosen

    def wants_dense(self) -> bool:
        return self.d.window.wants_dense()

    def add_dense(self, G: torch.Tensor) -> None:
        shard = self.comm.reduce_scatter_flat(G, self.bounds, self.dtype)
        self.d.window.add(shard.to(self.d.base.device, torch.float32))

    def screen_stride(self) -> int:
        return self.d.window.screen_stride()

    def choose(self, G: torch.Tensor) -> None:
        shard = self.comm.reduce_scatter_flat(G, self.bounds, self.dtype)
        self.d.window.choose(shard.to(self.d.base.device, torch.float32))

    def positions(self) -> torch.Tensor:
        mine = self.d.window.sample_positions() + self.d.offset
        if not self.comm.grouped:
            return mine
        if self.counts is None:  # candidates change only when chosen: one exchange per window
            self.counts = self.comm.counts(len(mine))
        return self.comm.gather_flat(mine, self.counts)

    def add_sampled(self, values: torch.Tensor) -> None:
        if self.comm.grouped:
            ends = torch.tensor(self.counts).cumsum(0).tolist()
            values = self.comm.reduce_scatter_flat(values, list(zip([0] + ends[:-1], ends)))
        self.d.window.add_sampled(values.to(self.d.base.device, torch.float32))


class SeftMethod:
    """The sparse delta: slot AdamW on δ, window scores before each update, drop/grow/adapt."""

    name = "seft"

    def __init__(self, cfg: RunConfig, backend: "Backend", model: nn.Module,
                 targets: Sequence[tuple[str, nn.Linear]], tokenizer=None):
        self.cfg, self.backend, self.comm, self.nm = cfg, backend, backend.comm, cfg.prune.nm
        s = cfg.seft
        self.restricted = self.nm is not None or not s.reactivation  # grow inside the support only
        for p in model.parameters():
            p.requires_grad_(False)
        shards = backend.shards(model, targets)
        self.deltas = [SparseDelta(sh.name, sh.shape, sh.offset, sh.view) for sh in shards]
        budgets = self.comm.allreduce(torch.tensor([int((d.base != 0).sum()) for d in self.deltas],
                                                   dtype=torch.int64))
        for d, b in zip(self.deltas, budgets.tolist()):
            d.budget, d.capacity = b, slot_capacity(d.shape, s)
            if d.capacity > d.budget:
                key = "seft.lora_rank" if s.lora_rank is not None else "seft.density"
                raise ConfigError(f"{key}: {d.name} would get K={d.capacity} slots but has only "
                                  f"{d.budget} nonzeros; lower {key}")
        self.modules = {sh.name: sh.module for sh in shards}
        self.bounds = {sh.name: sh.bounds for sh in shards}
        self.slots = {d.name: Slots(d, self.comm, backend.device) for d in self.deltas}
        for sh, d in zip(shards, self.deltas):
            kernel = s.kernel if s.kernel != "auto" else choose_kernel(
                d.capacity, d.numel, s.gather_cost_ratio)
            SparseDeltaLinear.attach(sh.module, lambda d=d: d.values, self.slots[d.name], kernel)
        t = cfg.train
        self.opt = SlotAdamW(t.lr, (t.beta1, t.beta2), t.eps, t.weight_decay, self.cfg.seft.slot_warmup)
        self.numel = sum(d.numel for d in self.deltas)
        self._support = 0  # this rank's support positions: constant between topology updates
        self._saved_windows: dict[str, dict] = {}  # window scores of a checkpoint, until reopened

    # -- state between updates --------------------------------------------------------------------
    def slots_changed(self) -> None:
        """After slots moved (placement, update, resume, or a tool editing them directly): every
        rank's slot count per matrix (one all-gather for all of them) and this rank's support
        count, cached until the next change; other copies of θ refreshed."""
        mine = torch.tensor([len(d.pos) for d in self.deltas], dtype=torch.int64)
        every = self.comm.gather_flat(mine, [len(mine)] * self.comm.world).view(self.comm.world, -1)
        for i, d in enumerate(self.deltas):
            self.slots[d.name].counts = every[:, i].tolist()
        self._support = sum(d.support_count() for d in self.deltas)
        self.backend.refresh([d.name for d in self.deltas])

    def _drop_fraction(self, update_step: int) -> float:
        s, t = self.cfg.seft, self.cfg.train
        if s.initial_reselection and update_step == s.update_interval:
            return 1.0  # SpIEL's first selection: every random initial slot is reselected
        return drop_fraction(update_step, t.steps, s.drop_rate, s.drop_schedule)

    def _open_windows(self, update_step: int) -> None:
        s = self.cfg.seft
        counts = [sum(self.slots[d.name].counts) for d in self.deltas]
        _, n_grow = update_sizes(self.deltas, self._drop_fraction(update_step), counts)
        for d, ng in zip(self.deltas, n_grow):
            if d.window is None:
                d.window = open_window(d, s.window_scores, ng, self.restricted,
                                       s.adapt_criterion == "sensitivity", self.comm.allreduce,
                                       s.window_candidates, s.window_screen_stride)
                saved = self._saved_windows.pop(d.name, None)
                if saved:  # resumed inside this window
                    d.window.load_state_dict(saved)

    def set_capture(self, on: bool) -> None:
        """Window scores fed by every backward (a tap on each target) or not."""
        for d in self.deltas:
            mod = self.modules[d.name]
            if not on:
                mod.seft_window = None
            elif mod.seft_window is None:
                mod.seft_window = Tap(d, self.comm, self.bounds[d.name], self.backend.grad_dtype)

    # -- the loop's calls -----------------------------------------------------------------------
    def init_state(self) -> None:
        for group in layer_groups(self.deltas):
            init_slots(group, self.cfg.seft.init_seed, self.opt.seed, self.comm.allreduce)
        self.slots_changed()

    def load(self, ckpt: Path) -> None:
        """A checkpoint written at any world size; window scores saved inside a selection window
        are restored when the next step opens the window again."""
        self._saved_windows = load_deltas(ckpt, self.deltas)
        self.slots_changed()

    def state_tensors(self) -> dict[str, torch.Tensor]:
        return delta_tensors(self.deltas)

    def before_step(self, step: int) -> dict:
        s, T = self.cfg.seft, self.cfg.train.steps
        window = in_window(step, s.update_interval, s.window, T)
        if window:
            self._open_windows(-(-step // s.update_interval) * s.update_interval)
        self.set_capture(window)
        return {"window": window}

    def after_backward(self, step: int, lr: float) -> dict:
        s, t, allreduce = self.cfg.seft, self.cfg.train, self.comm.allreduce
        norm, scale = clip_slot_grads(self.deltas, t.max_grad_norm, allreduce)
        rec = {"grad_norm": norm, "dropped": 0, "grown": 0, "reactivated": 0, "adapt_pruned": 0}
        if not math.isfinite(norm):  # the loop stops the run on it: no step, no topology update
            return rec
        if in_window(step, s.update_interval, s.window, t.steps):
            for d in self.deltas:  # the step's G on the clipped scale of the δ-gradients
                d.window.end_step(scale, d.values.grad)
        self.opt.step(self.deltas, lr)
        if is_update_step(step, s.update_interval, t.steps):
            self.set_capture(False)
            p = self._drop_fraction(step)
            for group in layer_groups(self.deltas):
                stats = topology_update(group, p, self.opt.seed, merge_dropped=s.merge_dropped,
                                        restricted=self.restricted, criterion=s.adapt_criterion,
                                        allreduce=allreduce)
                for key, value in stats.totals().items():
                    rec[key] += value
            self.slots_changed()
            rec["drop_fraction"] = p
        return rec

    def check(self) -> None:
        check_budget(self.deltas, self.comm.allreduce, self.nm)

    def local_counts(self) -> tuple[int, int]:
        """(support positions, trainable values) held by this rank (cached: no host sync)."""
        return self._support, sum(len(d.pos) for d in self.deltas)

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
            support = d.support()
            idx = d.local_index()
            d.base[idx] = (d.base[idx].to(torch.float32) + d.values.detach()).to(d.base.dtype)
            ref = start.get_flat(f"{d.name}.weight", d.offset, d.offset + d.length) \
                if start is not None else None
            counts = shard_counts(d.base, support, ref)
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
