"""What the baselines share: one process, torch AdamW over the parameters each baseline's
`build()` makes trainable (fp32 whatever the model's dtype), the starting model's support masks,
checkpoints of parameters and optimizer state, the per-matrix report of the merged model, and
each baseline's paper defaults (`PaperDefaults`)."""
from __future__ import annotations

import math
from abc import ABC, abstractmethod
from dataclasses import dataclass
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


@dataclass(frozen=True)
class PaperDefaults:
    """What a baseline's paper (or reference code) uses, where this toolkit follows it."""

    citation: str
    """The paper and the code the numbers come from."""
    lr: float
    """Peak learning rate: compare's default for the method and the centre of its --sweep lr grid."""
    lora_dropout: float = 0.0
    """Dropout on the adapter's input when baseline.lora_dropout is empty."""


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


def lora_dropout(cfg: RunConfig, paper: PaperDefaults) -> float:
    """Dropout on the adapter input: baseline.lora_dropout, else the paper's."""
    return cfg.baseline.lora_dropout if cfg.baseline.lora_dropout is not None else paper.lora_dropout


def kaiming_uniform(rows: int, cols: int, generator: torch.Generator) -> torch.Tensor:
    """PEFT's / nn.Linear's init of a [rows, cols] factor, kaiming_uniform(a=√5): U(±1/√cols), fp32."""
    bound = 1 / math.sqrt(cols)
    return torch.empty(rows, cols).uniform_(-bound, bound, generator=generator)


class TorchOptimMethod(ABC):
    """A baseline: `build()` returns [(name, parameter)] to train; `merge()` makes the model plain."""

    name = ""
    paper: PaperDefaults

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
        """Parameters and optimizer state of a checkpoint. The state goes through
        `optimizer.load_state_dict`, which moves it to each parameter's device and dtype (the file
        holds CPU tensors)."""
        tensors = load_file(str(ckpt / rank_file(0)))
        with torch.no_grad():
            for n, p in self.params:
                p.copy_(tensors[f"param/{n}"])
        if self.opt is None:
            return
        saved = self.opt.state_dict()
        for i, (n, _) in enumerate(self.params):  # one param group: state keys are these indices
            state = {k.rsplit("/", 1)[1]: v for k, v in tensors.items() if k.startswith(f"opt/{n}/")}
            if state:
                state["step"] = state["step"].reshape(())
                saved["state"][i] = state
        self.opt.load_state_dict(saved)
        self.after_load()

    def after_load(self) -> None:
        """Hook for what a baseline derives from its restored parameters (static: the weights)."""

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
