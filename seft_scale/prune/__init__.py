"""One-shot pruners: magnitude, Wanda, SparseGPT; unstructured (per row or per matrix) or N:M.

- `prune_model(model, tokenizer, targets, cfg, device)`: prune a model that is in memory (the
  training entry uses it); Wanda and SparseGPT calibrate layer by layer (prune/sequential.py).
- `prune_folder(model_dir, out_dir, cfg, ...)` (prune/streaming.py, behind launch/prune.py):
  prune an HF safetensors folder holding one decoder layer in memory at a time.

`masks.keep_mask` turns scores into an exact sparsity pattern; every pruned matrix has exactly
the kept count of its comparison groups.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import nn

from seft_scale.config import PruneConfig
from seft_scale.errors import ConfigError
from seft_scale.prune.calibration import calibration_windows, read_calibration_text
from seft_scale.prune.sequential import (CALIBRATED, check_shapes, matrix_entry, prune_layerwise,
                                         prune_weight)
from seft_scale.prune.streaming import prune_folder

__all__ = ["prune_model", "prune_folder", "prepare_calibration"]


def prepare_calibration(tokenizer, cfg: PruneConfig) -> Optional[torch.Tensor]:
    """[nsamples, seqlen] calibration windows of cfg.calib_data for wanda / sparsegpt (None for
    magnitude); a text too short for them is a ConfigError."""
    if cfg.method not in CALIBRATED:
        return None
    return calibration_windows(read_calibration_text(cfg.calib_data), tokenizer, cfg.nsamples,
                               cfg.seqlen, cfg.seed)


def prune_model(model: nn.Module, tokenizer, targets: Sequence[tuple[str, nn.Linear]],
                cfg: PruneConfig, device, budgets: Optional[dict[str, int]] = None,
                calib: Optional[torch.Tensor] = None) -> dict[str, dict]:
    """Prune `targets` of an in-memory model in place by cfg.method; returns the per-matrix
    report (sparsity.matrix_report entries plus `sparsity`). `budgets` ({name: nonzeros}):
    each matrix ends with exactly that many (LoRA*'s re-prune to the start's budget). `calib`:
    calibration windows prepared earlier (`prepare_calibration`), else read from cfg now."""
    check_shapes(targets, cfg)
    if cfg.method == "magnitude":  # no calibration: any Linear, in or outside decoder layers
        report = {}
        for name, lin in targets:
            keep = prune_weight(lin.weight.data, cfg, None, None if budgets is None else budgets[name])
            report[name] = matrix_entry(lin.weight.data, keep, cfg.nm)
        return report
    if cfg.method not in CALIBRATED:
        raise ConfigError(f"prune.method: {cfg.method!r} is not a pruner")
    calib = calib if calib is not None else prepare_calibration(tokenizer, cfg)
    return prune_layerwise(model, targets, cfg, calib, device, budgets=budgets)
