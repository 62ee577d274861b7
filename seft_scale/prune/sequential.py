"""Layer-by-layer calibration, the protocol of the Wanda and SparseGPT papers, in bounded memory.

1. Capture: each calibration window runs through the model up to the first decoder layer, which
   is replaced by a stand-in that records its input hidden states and the keyword arguments the
   model passes (attention mask, position ids, rotary embeddings) and cuts the forward.
2. For each decoder layer i: forward hooks on its target Linears accumulate their statistics
   (Wanda: ‖X_j‖₂²; SparseGPT: H = mean x xᵀ) while the layer runs over all windows; every
   target of the layer is then pruned from these statistics, i.e. from the inputs of the layer
   before any of its matrices is pruned (the reference implementations' default for both
   methods; SparseGPT's optional "true sequential" order is not implemented); the layer runs
   again with its pruned weights and its outputs become layer i+1's inputs.

Only two activation buffers (inputs and outputs of the current layer) and the current layer's
statistics exist at any time. With `load_layer` / `save_layer` callbacks (prune/streaming.py,
which states the peak-memory formula) the weights, too, are present one decoder layer at a time.
"""
from __future__ import annotations

import math
from dataclasses import replace
from typing import Callable, Optional, Sequence

import torch
from torch import nn

from seft_scale.config import PruneConfig
from seft_scale.errors import ConfigError
from seft_scale.prune.masks import keep_mask, keep_top
from seft_scale.prune.sparsegpt import Hessian, sparsegpt_prune
from seft_scale.prune.wanda import InputNorms, wanda_scores
from seft_scale.sparsity import matrix_report

CALIBRATED = ("wanda", "sparsegpt")


def decoder_layers(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """(name, module list) of the model's decoder layers: the ModuleList of num_hidden_layers."""
    n = getattr(model.config, "num_hidden_layers", None)
    for name, mod in model.named_modules():
        if isinstance(mod, nn.ModuleList) and len(mod) == n and name.endswith("layers"):
            return name, mod
    raise ConfigError(f"{type(model).__name__}: found no list of {n} decoder layers to calibrate")


def targets_by_layer(targets: Sequence[tuple[str, nn.Linear]], layers_name: str,
                     num_layers: int, key: str = "seft.targets") -> list[list[tuple[str, nn.Linear]]]:
    """The targets inside each decoder layer; a target outside them is an error naming `key`
    (the config key or flag the targets came from)."""
    groups = [[] for _ in range(num_layers)]
    for name, lin in targets:
        head, _, rest = name.partition(layers_name + ".")
        index = rest.split(".", 1)[0]
        if head or not index.isdigit():
            raise ConfigError(f"{key}: {name} is outside the decoder layers "
                              f"({layers_name}.*); layer-wise pruning covers only their Linears")
        groups[int(index)].append((name, lin))
    return groups


def new_statistic(method: str, lin: nn.Linear):
    """The calibration statistic a pruner needs for one Linear (None for magnitude)."""
    if method == "wanda":
        return InputNorms(lin.in_features, lin.weight.device)
    if method == "sparsegpt":
        return Hessian(lin.in_features, lin.weight.device)
    return None


@torch.no_grad()
def prune_weight(weight: torch.Tensor, cfg: PruneConfig, statistic=None,
                 budget: Optional[int] = None) -> torch.Tensor:
    """Prune one [d_out, d_in] weight in place by cfg.method; returns the keep mask.

    `budget`: end with exactly this many nonzeros (re-pruning to a start's budget, which can be
    below the pattern's count when the start held exact zeros inside its kept set). Unstructured
    patterns then prune at the budget's own sparsity 1 - B/numel; see `fit_budget` for the rest."""
    if budget is not None and cfg.nm is None:
        cfg = replace(cfg, sparsity=1 - budget / weight.numel())
    if cfg.method == "sparsegpt":
        pruned, keep = sparsegpt_prune(weight, statistic.hessian, cfg.sparsity, cfg.pattern,
                                       cfg.granularity, cfg.block_size, cfg.damp)
        weight.copy_(pruned)
        if budget is not None:  # the OBS update is done: trim by the magnitude of what it left
            keep = fit_budget(keep, weight.abs().float(), weight != 0, budget, cfg.nm)
            weight.mul_(keep)
        return keep
    if cfg.method == "wanda":
        scores = wanda_scores(weight, statistic.sq_norms)
    elif cfg.method == "magnitude":
        scores = weight.abs()
    else:
        raise ConfigError(f"prune.method: {cfg.method!r} is not a pruner")
    keep = keep_mask(scores, cfg.sparsity, cfg.pattern, cfg.granularity)
    if budget is not None:
        keep = fit_budget(keep, scores, weight != 0, budget, cfg.nm)
    weight.mul_(keep)
    return keep


def fit_budget(keep: torch.Tensor, scores: torch.Tensor, nonzero: torch.Tensor, budget: int,
               nm: Optional[tuple[int, int]]) -> torch.Tensor:
    """The pruner's mask made to hold exactly `budget` nonzeros: kept positions whose weight is an
    exact zero do not count; extra ones are dropped lowest score first, and a shortfall is filled
    with the highest-scored nonzero positions the pattern leaves room for (N:M: groups holding
    fewer than N). Ties go to the lower flat position. When the weight has fewer than `budget`
    nonzeros left the mask keeps them all (the caller's budget check then names the matrix)."""
    have = keep & nonzero
    count = int(have.sum())
    flat = scores.to(torch.float32).reshape(-1)
    if count > budget:
        ranked = torch.where(have.reshape(-1), flat, torch.tensor(-math.inf))
        return keep_top(ranked, budget).view_as(keep)
    if count == budget:
        return have
    extra = nonzero & ~have
    if nm is not None:  # per group, only the best (N - kept) of its extra positions may join
        n, m = nm
        d_out, d_in = keep.shape
        room = n - have.reshape(d_out, d_in // m, m).sum(-1, keepdim=True)
        grouped = torch.where(extra.reshape(d_out, d_in // m, m), scores.to(torch.float32).reshape(
            d_out, d_in // m, m), torch.tensor(-math.inf))
        order = torch.sort(grouped, dim=-1, descending=True, stable=True).indices
        rank = torch.empty_like(order).scatter_(-1, order, torch.arange(m).expand_as(order))
        extra = extra & (rank < room).reshape(d_out, d_in)
    ranked = torch.where(extra.reshape(-1), flat, torch.tensor(-math.inf))
    take = min(budget - count, int(extra.sum()))
    return have | keep_top(ranked, take).view_as(keep)


def matrix_entry(weight: torch.Tensor, keep: torch.Tensor, nm) -> dict:
    """sparsity.matrix_report of a freshly pruned matrix (budget = kept count) plus its sparsity."""
    entry = matrix_report(weight, keep, None, int(keep.sum()), nm)
    entry["sparsity"] = 1 - entry["density"]
    return entry


def check_shapes(targets: Sequence[tuple[str, nn.Linear]], cfg: PruneConfig) -> None:
    """N:M needs every target's d_in divisible by M: name the matrices that are not."""
    nm, pattern = cfg.nm, cfg.pattern
    if nm is None:
        return
    bad = [f"{name} (d_in={lin.in_features})" for name, lin in targets if lin.in_features % nm[1]]
    if bad:
        raise ConfigError(f"prune.pattern: {pattern} needs d_in divisible by {nm[1]}; not so for "
                          f"{', '.join(bad[:3])}{' ...' if len(bad) > 3 else ''}")


class _Captured(Exception):
    def __init__(self, hidden: torch.Tensor, args: tuple, kwargs: dict):
        super().__init__()
        self.hidden, self.args, self.kwargs = hidden, args, kwargs


class _StopAtLayer(nn.Module):
    """Stands in for decoder layer 0: hands its inputs out and stops the forward."""

    def forward(self, hidden_states, *args, **kwargs):
        raise _Captured(hidden_states, args, kwargs)


@torch.no_grad()
def capture_layer_inputs(model: nn.Module, layers: nn.ModuleList, calib: torch.Tensor,
                         device) -> tuple[torch.Tensor, tuple[tuple, dict]]:
    """([N, T, h] inputs of layer 0, the other (args, kwargs) the model passes to its layers).

    The extra arguments depend only on the window length (no padding), so one copy serves all."""
    first, layers[0] = layers[0], _StopAtLayer()
    inputs, call = None, None
    try:
        for j in range(len(calib)):
            try:
                model(input_ids=calib[j: j + 1].to(device), use_cache=False)
            except _Captured as c:
                if inputs is None:
                    inputs = torch.empty((len(calib), *c.hidden.shape[1:]), dtype=c.hidden.dtype,
                                         device=c.hidden.device)
                inputs[j] = c.hidden[0]
                call = (c.args, c.kwargs)
            else:
                raise RuntimeError("the model's forward returned without calling its first decoder layer")
    finally:
        layers[0] = first
    return inputs, call


def _run_layer(layer: nn.Module, inputs: torch.Tensor, outputs: Optional[torch.Tensor],
               call: tuple[tuple, dict]) -> None:
    args, kwargs = call
    for j in range(len(inputs)):
        out = layer(inputs[j: j + 1], *args, **kwargs)
        if outputs is not None:
            outputs[j] = (out[0] if isinstance(out, (tuple, list)) else out)[0]


def _statistic_hook(statistic):
    def hook(module, args, output):
        statistic.add(args[0].reshape(-1, args[0].shape[-1]))
    return hook


@torch.no_grad()
def prune_layerwise(model: nn.Module, targets: Sequence[tuple[str, nn.Linear]], cfg: PruneConfig,
                    calib: Optional[torch.Tensor], device,
                    load_layer: Optional[Callable[[int], None]] = None,
                    save_layer: Optional[Callable[[int], None]] = None,
                    budgets: Optional[dict[str, int]] = None) -> dict[str, dict]:
    """Prune `targets` layer by layer (see the module docstring); returns the per-matrix report.
    `budgets` ({name: nonzeros}) makes each matrix end with exactly that many (`prune_weight`).

    `calib` ([N, T] token ids) is required by wanda and sparsegpt and unused by magnitude.
    `load_layer(i)` is called before layer i is touched and `save_layer(i)` once it is final."""
    if cfg.method in CALIBRATED and calib is None:
        raise ConfigError(f"prune.method {cfg.method}: needs calibration windows")
    layers_name, layers = decoder_layers(model)
    groups = targets_by_layer(targets, layers_name, len(layers))
    nm = cfg.nm
    was_training = model.training
    model.eval()
    inputs = outputs = call = None
    if cfg.method in CALIBRATED:
        inputs, call = capture_layer_inputs(model, layers, calib, device)
        outputs = torch.empty_like(inputs)
    report = {}
    for i, layer in enumerate(layers):
        if load_layer is not None:
            load_layer(i)
        statistics = {}
        if inputs is not None:
            statistics = {name: new_statistic(cfg.method, lin) for name, lin in groups[i]}
            hooks = [lin.register_forward_hook(_statistic_hook(statistics[name]))
                     for name, lin in groups[i]]
            try:
                _run_layer(layer, inputs, None, call)
            finally:
                for h in hooks:
                    h.remove()
        for name, lin in groups[i]:
            keep = prune_weight(lin.weight.data, cfg, statistics.pop(name, None),
                                None if budgets is None else budgets[name])
            report[name] = matrix_entry(lin.weight.data, keep, nm)
        if inputs is not None and i + 1 < len(layers):
            _run_layer(layer, inputs, outputs, call)
            inputs, outputs = outputs, inputs
        if save_layer is not None:
            save_layer(i)
    model.train(was_training)
    return report
