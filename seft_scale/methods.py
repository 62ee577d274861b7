"""Repair methods, chosen by `method:` in the run config; every one ends with exactly the pruned
model's nonzero budget in every target matrix, so results compare at equal sparsity.

| method     | trains                                   | budget kept by                                 |
|------------|------------------------------------------|------------------------------------------------|
| seft       | K slots δ per matrix; topology evolves   | drop / grow / adapt (sparsity/topology.py)     |
| static     | every nonzero of the targets             | mask re-applied to weights, grads, Adam moments |
| lora_star  | LoRA (PEFT) on the targets               | merge, then re-prune with the run's pruner      |
| sqft       | LoRA whose update is masked, (B·A)⊙M     | the mask: the merged update is zero outside M  |
| none       | nothing: the pruned model as it is       | —                                              |

SEFT runs on every backend; the baselines run on one process (--backend local). LoRA-based
methods train r·(d_in + d_out) values per matrix, SEFT's K for seft.lora_rank = r
(`trainable_count`), so a comparison at one rank compares equal trainable budgets.
"""
from __future__ import annotations

import math
import re
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch import nn

from seft_scale.checkpoint import delta_tensors, load_deltas, rank_file
from seft_scale.config import ConfigError, RunConfig
from seft_scale.delta import SparseDelta, choose_kernel
from seft_scale.export import matrix_report, merge_deltas
from seft_scale.optim import SlotAdamW, clip_slot_grads
from seft_scale.sparsity.schedule import drop_fraction, in_window, is_update_step
from seft_scale.sparsity.topology import check_budget, init_slots, topology_update

METHODS = ("seft", "static", "lora_star", "sqft", "none")


def slot_capacity(shape: tuple[int, int], s_cfg) -> int:
    """SEFT's K: a LoRA-rank match r·(d_in + d_out), or density·n."""
    d_out, d_in = shape
    if s_cfg.lora_rank is not None:
        return min(s_cfg.lora_rank * (d_in + d_out), d_in * d_out)
    return max(1, int(s_cfg.density * d_in * d_out))


def trainable_count(method: str, shapes_and_budgets: list[tuple[tuple[int, int], int]],
                    cfg: RunConfig) -> int:
    """Trainable values of `method` over matrices given as ((d_out, d_in), budget B)."""
    if method == "seft":
        return sum(slot_capacity(s, cfg.seft) for s, _ in shapes_and_budgets)
    if method in ("lora_star", "sqft"):
        r = lora_rank(cfg)
        return sum(r * (s[0] + s[1]) for s, _ in shapes_and_budgets)
    if method == "static":
        return sum(b for _, b in shapes_and_budgets)
    return 0


def lora_rank(cfg: RunConfig) -> int:
    r = cfg.baseline.lora_rank or cfg.seft.lora_rank
    if r is None:
        raise ConfigError("baseline.lora_rank: set it (or seft.lora_rank) for LoRA-based methods")
    return r


def attach_seft(backend, model, targets, s_cfg) -> list[SparseDelta]:
    """SparseDeltas over this rank's shards of the targets, with budgets B (the nonzeros of the
    starting model, over all ranks) and slot capacities K; no slots placed yet."""
    kernel_for = (lambda shape: s_cfg.kernel) if s_cfg.kernel != "auto" else (
        lambda shape: choose_kernel(slot_capacity(shape, s_cfg), shape[0] * shape[1],
                                    s_cfg.gather_cost_ratio))
    deltas: list[SparseDelta] = backend.attach(model, targets, kernel_for)
    counts = torch.tensor([int(d.mask.sum()) for d in deltas], dtype=torch.int64)
    if backend.allreduce is not None:
        counts = backend.allreduce(counts)
    for d, b in zip(deltas, counts.tolist()):
        d.budget, d.capacity = b, slot_capacity(d.shape, s_cfg)
        if d.capacity > d.budget:
            key = "seft.lora_rank" if s_cfg.lora_rank is not None else "seft.density"
            raise ConfigError(f"{key}: {d.name} would get K={d.capacity} slots but has only "
                              f"{d.budget} nonzeros; lower {key}")
    return deltas


def layer_groups(deltas: list[SparseDelta]) -> list[list[SparseDelta]]:
    """The deltas one decoder layer at a time: selection scratch (candidates, scores, keys: ~28 B
    per weight of the shard) then exists for one layer, not the whole model, at the cost of one
    selector call per layer instead of one per model."""
    groups: dict[str, list[SparseDelta]] = {}
    for d in deltas:
        m = re.search(r"^(.*?\.\d+)\.", d.name)
        groups.setdefault(m.group(1) if m else "", []).append(d)
    return list(groups.values())


class SeftMethod:
    """The sparse delta: slot AdamW on δ, dense G in selection windows, drop/grow/adapt."""

    name = "seft"
    merge_changes_function = False  # W = θ + S before and after

    def __init__(self, cfg: RunConfig, backend, model, targets, tokenizer, nm):
        self.cfg, self.backend, self.nm = cfg, backend, nm
        self.deltas = attach_seft(backend, model, targets, cfg.seft)
        t = cfg.train
        self.opt = SlotAdamW(t.lr, (t.beta1, t.beta2), t.eps, t.weight_decay)
        self.numel = sum(d.numel for d in self.deltas)

    def init_state(self) -> None:
        for group in layer_groups(self.deltas):
            init_slots(group, self.cfg.seft.init_seed, lambda g: self.opt.seed(g, 0),
                       self.backend.allreduce)

    def load(self, ckpt: Path) -> None:
        load_deltas(ckpt, self.deltas)
        self.backend.base_changed(self.deltas)

    def state_tensors(self) -> dict[str, torch.Tensor]:
        return delta_tensors(self.deltas)

    def before_step(self, step: int) -> dict:
        s, T = self.cfg.seft, self.cfg.train.steps
        window = in_window(step, s.update_interval, s.window, T)
        self.backend.set_dense_grad_capture(self.deltas, window)
        return {"window": window}

    def after_backward(self, step: int, lr: float) -> dict:
        s, t, backend = self.cfg.seft, self.cfg.train, self.backend
        rec = {"grad_norm": clip_slot_grads(self.deltas, t.max_grad_norm, backend.allreduce),
               "dropped": 0, "grown": 0, "reactivated": 0, "adapt_pruned": 0}
        self.opt.step(self.deltas, lr)
        if is_update_step(step, s.update_interval, t.steps):
            backend.set_dense_grad_capture(self.deltas, False)
            p = drop_fraction(step, t.steps, s.drop_rate, s.drop_schedule)
            for group in layer_groups(self.deltas):
                stats = topology_update(
                    group, p, s.window, lambda g: self.opt.seed(g, s.window),
                    merge_dropped=s.merge_dropped, reactivation=s.reactivation,
                    nm=self.nm is not None, criterion=s.adapt_criterion, allreduce=backend.allreduce)
                for key, value in stats.totals().items():
                    rec[key] += value
            backend.base_changed(self.deltas)
            rec["drop_fraction"] = p
        return rec

    def check(self) -> None:
        check_budget(self.deltas, self.backend.allreduce, self.nm)

    def local_counts(self) -> tuple[int, int]:
        """(support positions, trainable values) held by this rank."""
        return sum(int(d.mask.sum()) for d in self.deltas), sum(len(d.pos) for d in self.deltas)

    def finish(self) -> None:
        self.backend.set_dense_grad_capture(self.deltas, False)
        self.check()

    def merge(self, model, start_dir, nm) -> dict:
        return merge_deltas(model, self.deltas, self.backend, start_dir, nm)


class _TorchOptimMethod:
    """Shared by the baselines: one process, torch AdamW over the named parameters each baseline's
    `build()` makes trainable, the start model's support masks, and checkpoints of parameters +
    optimizer state."""

    name = ""
    merge_changes_function = False

    def __init__(self, cfg: RunConfig, backend, model, targets, tokenizer, nm):
        if backend.world != 1 or type(backend).__name__ != "LocalBackend":
            raise ConfigError(f"method: {self.name} runs on one process (--backend local); "
                              "only seft has sharded backends")
        self.cfg, self.backend, self.model, self.tokenizer, self.nm = cfg, backend, model, tokenizer, nm
        for p in model.parameters():
            p.requires_grad_(False)
        self.targets = list(targets)
        self.masks = {name: lin.weight.detach() != 0 for name, lin in self.targets}
        self.budgets = {name: int(m.sum()) for name, m in self.masks.items()}
        self.numel = sum(m.numel() for m in self.masks.values())
        backend.model = model
        self.params = self.build()  # [(name, parameter)], trainable
        t = cfg.train
        self.opt = torch.optim.AdamW([p for _, p in self.params], lr=t.lr, betas=(t.beta1, t.beta2),
                                     eps=t.eps, weight_decay=t.weight_decay) if self.params else None

    def init_state(self) -> None:
        pass

    def before_step(self, step: int) -> dict:
        return {}

    def after_backward(self, step: int, lr: float) -> dict:
        params = [p for _, p in self.params]
        norm = float(torch.nn.utils.clip_grad_norm_(params, self.cfg.train.max_grad_norm or math.inf))
        for group in self.opt.param_groups:
            group["lr"] = lr
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        return {"grad_norm": norm}

    def check(self) -> None:
        for name, lin in self.targets:
            base = lin.base_layer.weight if hasattr(lin, "base_layer") else lin.weight
            if bool((base.detach() != 0)[~self.masks[name]].any()):
                raise AssertionError(f"{name}: weights outside the starting support")

    def local_counts(self) -> tuple[int, int]:
        return sum(self.budgets.values()), sum(p.numel() for _, p in self.params)

    def finish(self) -> None:
        self.check()

    def state_tensors(self) -> dict[str, torch.Tensor]:
        out = {f"param/{n}": p.detach() for n, p in self.params}
        for i, (n, p) in enumerate(self.params):
            for key, v in self.opt.state.get(p, {}).items():
                out[f"opt/{n}/{key}"] = v.detach().reshape(-1) if key == "step" else v
        return out

    def load(self, ckpt: Path) -> None:
        tensors = load_file(str(ckpt / rank_file(0)))
        with torch.no_grad():
            for n, p in self.params:
                p.copy_(tensors[f"param/{n}"])
                state = {k.rsplit("/", 1)[1]: v for k, v in tensors.items()
                         if k.startswith(f"opt/{n}/")}
                if state:
                    state["step"] = state["step"].reshape(())
                    self.opt.state[p] = state

    def report(self, model, start_dir, nm) -> dict:
        from seft_scale.export import SafetensorsFolder
        start = SafetensorsFolder(start_dir) if start_dir is not None else None
        modules = dict(model.named_modules())
        out = {}
        for name in self.masks:
            w = modules[name].weight.detach()
            ref = start.get(f"{name}.weight") if start is not None else None
            support = self.masks[name] if self.name != "lora_star" else w != 0
            out[name] = matrix_report(w, support, ref, self.budgets[name], nm)
        return out


class StaticMethod(_TorchOptimMethod):
    """All nonzeros trainable; the start mask is re-applied to gradients (before the step) and to
    weights and Adam moments (after it), so nothing outside the support ever moves."""

    name = "static"

    def build(self):
        for _, lin in self.targets:
            lin.weight.requires_grad_(True)
        return [(f"{name}.weight", lin.weight) for name, lin in self.targets]

    def after_backward(self, step: int, lr: float) -> dict:
        for (name, lin) in self.targets:
            if lin.weight.grad is not None:
                lin.weight.grad.mul_(self.masks[name])
        rec = super().after_backward(step, lr)
        with torch.no_grad():
            for name, lin in self.targets:
                lin.weight.mul_(self.masks[name])
                for v in self.opt.state.get(lin.weight, {}).values():
                    if v.shape == lin.weight.shape:
                        v.mul_(self.masks[name])
        return rec

    def merge(self, model, start_dir, nm) -> dict:
        for _, lin in self.targets:
            lin.weight.requires_grad_(False)
        return self.report(model, start_dir, nm)


class LoraStarMethod(_TorchOptimMethod):
    """PEFT LoRA on the pruned model, merged, then re-pruned to each matrix's original budget with
    the run's pruner (the paper's LoRA*; with prune.method none, by magnitude to exactly B)."""

    name = "lora_star"
    merge_changes_function = True  # the re-prune after the merge

    def build(self):
        from peft import LoraConfig, get_peft_model
        b = self.cfg.baseline
        r = lora_rank(self.cfg)
        names = [name for name, _ in self.targets]
        self.peft = get_peft_model(self.model, LoraConfig(
            r=r, lora_alpha=b.lora_alpha if b.lora_alpha is not None else 2 * r,
            lora_dropout=b.lora_dropout, target_modules=names))
        return [(n, p) for n, p in self.peft.named_parameters() if p.requires_grad]

    def merge(self, model, start_dir, nm) -> dict:
        from seft_scale.model import find_targets
        from seft_scale.prune import prune_model
        from seft_scale.prune.masks import keep_top
        merged = self.peft.merge_and_unload()
        targets = [(n, lin) for n, lin in find_targets(merged, self.cfg.seft.targets) if n in self.masks]
        if self.cfg.prune.method == "none":
            with torch.no_grad():
                for name, lin in targets:
                    keep = keep_top(lin.weight.abs().reshape(-1), self.budgets[name])
                    lin.weight.mul_(keep.view_as(lin.weight))
        else:
            prune_model(merged, self.tokenizer, targets, self.cfg.prune, self.backend.device)
        for name, lin in targets:
            nnz = int((lin.weight != 0).sum())
            if nnz != self.budgets[name]:
                raise AssertionError(f"{name}: re-pruned to {nnz} nonzeros, budget {self.budgets[name]}")
        return self.report(merged, start_dir, nm)

    def check(self) -> None:  # LoRA leaves the base untouched until the merge
        super().check()


class MaskedLoraLinear(nn.Linear):
    """SQFT's SparsePEFT: y = x·(θ + s·(B·A)⊙M)ᵀ; merging adds zero outside the support M."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        update = (self.lora_B @ self.lora_A) * self.lora_mask * self.lora_scale
        return F.linear(x, self.weight + update.to(self.weight.dtype), self.bias)


class SqftMethod(_TorchOptimMethod):
    name = "sqft"

    def build(self):
        b, r = self.cfg.baseline, lora_rank(self.cfg)
        alpha = b.lora_alpha if b.lora_alpha is not None else 2 * r
        params = []
        g = torch.Generator().manual_seed(self.cfg.train.seed)
        for name, lin in self.targets:
            a = torch.empty(r, lin.in_features)
            bound = 1 / math.sqrt(lin.in_features)  # PEFT's kaiming_uniform(a=√5) bound
            a.uniform_(-bound, bound, generator=g)
            lin.__class__ = MaskedLoraLinear
            lin.lora_A = nn.Parameter(a.to(lin.weight.device))
            lin.lora_B = nn.Parameter(torch.zeros(lin.out_features, r, device=lin.weight.device))
            lin.register_buffer("lora_mask", self.masks[name].to(torch.float32), persistent=False)
            lin.lora_scale = alpha / r
            params += [(f"{name}.lora_A", lin.lora_A), (f"{name}.lora_B", lin.lora_B)]
        return params

    def merge(self, model, start_dir, nm) -> dict:
        with torch.no_grad():
            for _, lin in self.targets:
                update = (lin.lora_B @ lin.lora_A) * lin.lora_mask * lin.lora_scale
                lin.weight.add_(update.to(lin.weight.dtype))
                del lin.lora_A, lin.lora_B, lin.lora_mask, lin.lora_scale
                lin.__class__ = nn.Linear
        return self.report(model, start_dir, nm)


class NoRepair(_TorchOptimMethod):
    """The pruned model as it is (the loop runs no step)."""

    name = "none"

    def build(self):
        return []

    def merge(self, model, start_dir, nm) -> dict:
        return self.report(model, start_dir, nm)


def make_method(cfg: RunConfig, backend, model, targets, tokenizer, nm):
    cls = {"seft": SeftMethod, "static": StaticMethod, "lora_star": LoraStarMethod,
           "sqft": SqftMethod, "none": NoRepair}[cfg.method]
    return cls(cfg, backend, model, targets, tokenizer, nm)
