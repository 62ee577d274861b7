"""LoRA* (the SEFT paper's baseline): PEFT LoRA on the pruned model, merged, then re-pruned to
each matrix's original budget with the run's pruner (with prune.method none, by magnitude to
exactly B)."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import torch

from seft_scale.baselines.common import TorchOptimMethod, lora_alpha, lora_rank
from seft_scale.errors import ConfigError
from seft_scale.model import find_targets
from seft_scale.prune import prune_model
from seft_scale.prune.masks import keep_top


class LoraStarMethod(TorchOptimMethod):
    name = "lora_star"

    def build(self):
        try:
            from peft import LoraConfig, get_peft_model
        except ImportError:
            raise ConfigError("method: lora_star needs peft: pip install 'seft_scale[baselines]'") from None
        names = [name for name, _ in self.targets]
        self.peft = get_peft_model(self.model, LoraConfig(
            r=lora_rank(self.cfg), lora_alpha=lora_alpha(self.cfg),
            lora_dropout=self.cfg.baseline.lora_dropout, target_modules=names))
        return [(n, p) for n, p in self.peft.named_parameters() if p.requires_grad]

    def merge(self, start_dir: Optional[Path]) -> dict:
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
        return self.report(merged, start_dir, support_is_nonzeros=True)
