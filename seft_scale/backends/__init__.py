"""Backends: local (one process), zero3 (DeepSpeed ZeRO-3), fsdp (PyTorch FSDP2); the protocol
they share is in base.py, their collectives in comm.py. Each backend module pulls in its own
stack (transformers, torch.distributed.fsdp, deepspeed), so `make_backend` imports the one chosen
and light users (the planner, ds_config) import nothing of them."""
from __future__ import annotations

import os
from typing import Optional

from seft_scale.backends.base import Backend, TargetShard
from seft_scale.errors import ConfigError

__all__ = ["Backend", "TargetShard", "make_backend"]


def make_backend(name: str, cfg=None, ds_config: Optional[str] = None) -> Backend:
    """The backend for `seft-train --backend NAME` (cfg: the RunConfig)."""
    if name == "local":
        if int(os.environ.get("WORLD_SIZE", 1)) > 1:
            raise ConfigError(f"--backend local runs on one process, but the launcher started "
                              f"{os.environ['WORLD_SIZE']} (WORLD_SIZE): pass --backend fsdp, or "
                              "--ds_config for zero3")
        from seft_scale.backends.local import LocalBackend
        return LocalBackend()
    if name == "fsdp":
        from seft_scale.backends.fsdp import FSDPBackend
        return FSDPBackend(cfg.fsdp if cfg is not None else None)
    if name == "zero3":
        try:
            from seft_scale.backends.zero3 import Zero3Backend  # deepspeed is an optional extra
        except ImportError as e:
            raise ConfigError(f"--backend zero3 needs DeepSpeed ({e}): pip install "
                              "'seft_scale[deepspeed]'") from None
        return Zero3Backend(cfg, ds_config)
    raise ValueError(f"unknown backend {name!r}")
