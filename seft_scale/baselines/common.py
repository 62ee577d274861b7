"""What the baselines share: one process, torch AdamW over the parameters each baseline's
`build()` makes trainable, the starting model's support masks, checkpoints of parameters and
optimizer state, and the per-matrix report of the merged model."""
from __future__ import annotations

import math
from abc import ABC, abstractmethod
from pathlib import Path
from typing import Optional, Sequence

import torch
from safetensors.torch import load_file
from torch import nn

from seft_scale.checkpoint import rank_file
from seft_scale.config import RunConfig
from seft_scale.errors import ConfigError
from seft_scale.model import SafetensorsFolder
from seft_scale.sparsity import matrix_report


def lora_rank(cfg: RunConfig) -> int:
    """LoRA rank r of the LoRA-based baselines: baseline.lora_rank, else seft.lora_rank, so they
    train SEFT's K = r·(d_in + d_out) values per matrix."""
    r = cfg.baseline.lora_rank or cfg.seft.lora_rank
    if r is None:
        raise ConfigError("baseline.lora_rank: set it (or seft.lora_rank) for LoRA-based methods")
    return r


def lora_alpha(cfg: RunConfig) -> float:
    """LoRA scaling numerator: baseline.lora_alpha, else 2·r."""
    return cfg.baseline.lora_alpha if cfg.baseline.lora_alpha is not None else 2 * lora_rank(cfg)


class TorchOptimMethod(ABC):
    """A baseline: `build()` returns [(name, parameter)] to train; `merge()` makes the model plain."""

    name = ""

    def __init__(self, cfg: RunConfig, backend, model: nn.Module,
                 targets: Sequence[tuple[str, nn.Linear]], tokenizer=None):
        if backend.sharded or backend.world != 1:
            raise ConfigError(f"method: {self.name} runs on one process (--backend local); "
                              "only seft has sharded backends")
        self.cfg, self.backend, self.model, self.tokenizer = cfg, backend, model, tokenizer
        self.nm = cfg.prune.nm
        for p in model.parameters():
            p.requires_grad_(False)
        self.targets = list(targets)
        self.masks = {name: lin.weight.detach() != 0 for name, lin in self.targets}
        self.budgets = {name: int(m.sum()) for name, m in self.masks.items()}
        self.numel = sum(m.numel() for m in self.masks.values())
        self.params = self.build()
        t = cfg.train
        self.opt = torch.optim.AdamW([p for _, p in self.params], lr=t.lr, betas=(t.beta1, t.beta2),
                                     eps=t.eps, weight_decay=t.weight_decay) if self.params else None

    @abstractmethod
    def build(self) -> list[tuple[str, nn.Parameter]]:
        """Make this baseline's parameters trainable (or add them); returns them by name."""

    @abstractmethod
    def merge(self, start_dir: Optional[Path]) -> dict:
        """Leave a plain model with the budget exact; returns the per-matrix report."""

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
        for n, p in self.params:
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
                if state:  # the moments on the parameter's device (load_file gives CPU tensors);
                    # `step` stays on the CPU, where torch's AdamW keeps it (not fused/capturable)
                    state = {k: v.reshape(()) if k == "step" else v.to(p.device) for k, v in state.items()}
                    self.opt.state[p] = state

    def report(self, model: nn.Module, start_dir: Optional[Path], support_is_nonzeros: bool = False) -> dict:
        """The merged targets' report; the support is the start mask, or (a baseline that
        re-prunes) the merged weight's nonzeros."""
        start = SafetensorsFolder(start_dir) if start_dir is not None else None
        modules = dict(model.named_modules())
        out = {}
        for name in self.masks:
            w = modules[name].weight.detach()
            ref = start.get(f"{name}.weight") if start is not None else None
            support = w != 0 if support_is_nonzeros else self.masks[name]
            out[name] = matrix_report(w, support, ref, self.budgets[name], self.nm)
        return out
