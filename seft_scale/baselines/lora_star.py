"""LoRA* (the SEFT paper's LoRA baseline, arXiv 2505.24037): a dense PEFT LoRA trained on the
pruned model, merged (W + s·B·A is dense again), then re-pruned to each matrix's starting budget by
the pruner that made the start — Wanda or SparseGPT calibrated layer by layer on prune.calib_data
through the merged model, as those pruners' code does, or magnitude.

The re-pruner is baseline.reprune, else prune.method; a start pruned elsewhere (prune.method none)
must name it, which the config checks before anything runs. Re-pruning ends with exactly the
start's nonzeros per matrix, also when the start holds exact zeros inside its kept set (a GGUF
model's dequantised zeros: Wanda 2:4 kept 165,888 positions of a SmolLM2 q_proj but 7 were 0,
so its budget is 165,881): the pruner's mask is fitted to the budget (prune/sequential.py
`fit_budget`), staying inside the N:M pattern.

Defaults from Wanda's LoRA fine-tuning (locuslab/wanda lora_ft/finetune_lm.py): α/r = 2 (16/8),
dropout 0.05, lr 1e-4; all seft.targets are adapted (Wanda adapts q and v only, SPP's LoRA all 7).
PEFT keeps the adapter weights in fp32 over a 16-bit model (autocast_adapter_dtype).
"""
from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Optional

from seft_scale.baselines.common import PaperDefaults, TorchOptimMethod, lora_alpha, lora_dropout, lora_rank
from seft_scale.errors import ConfigError
from seft_scale.model import find_targets
from seft_scale.prune import prepare_calibration, prune_model


class LoraStarMethod(TorchOptimMethod):
    name = "lora_star"
    paper = PaperDefaults("LoRA* of the SEFT paper (arXiv 2505.24037); LoRA settings of Wanda's "
                          "lora_ft/finetune_lm.py (locuslab/wanda)", lr=1e-4, lora_dropout=0.05)

    def build(self):
        try:
            from peft import LoraConfig, get_peft_model
        except ImportError:
            raise ConfigError("method: lora_star needs peft: pip install 'seft_scale[baselines]'") from None
        # calibration windows now, so a text too short for them fails before training, not after
        self.calib = prepare_calibration(self.tokenizer, self.reprune_config())
        names = [name for name, _ in self.targets]
        self.peft = get_peft_model(self.model, LoraConfig(
            r=lora_rank(self.cfg), lora_alpha=lora_alpha(self.cfg),
            lora_dropout=lora_dropout(self.cfg, self.paper), target_modules=names))
        return [(n, p) for n, p in self.peft.named_parameters() if p.requires_grad]

    def reprune_config(self):
        """The start's pruner with its calibration settings (config.py has checked it exists)."""
        return replace(self.cfg.prune, method=self.cfg.baseline.reprune or self.cfg.prune.method)

    def merge(self, start_dir: Optional[Path]) -> dict:
        merged = self.peft.merge_and_unload()
        targets = [(n, lin) for n, lin in find_targets(merged, self.cfg.seft.targets) if n in self.masks]
        prune_model(merged, self.tokenizer, targets, self.reprune_config(), self.backend.device,
                    budgets=self.budgets, calib=self.calib)
        for name, lin in targets:
            nnz = int((lin.weight != 0).sum())
            if nnz != self.budgets[name]:
                raise AssertionError(f"{name}: re-pruned to {nnz} nonzeros, budget {self.budgets[name]}")
        return self.report(merged, start_dir, support_is_nonzeros=True)
