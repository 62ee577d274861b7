"""The DeepSpeed JSON of the zero3 backend: the default shipped with the package, and its check
against the run config (importable without deepspeed: the planner and the launchers read it)."""
from __future__ import annotations

import copy
import json
from importlib import resources
from pathlib import Path
from typing import Optional

import torch

from seft_scale.config import RunConfig, resolve_dtype
from seft_scale.errors import ConfigError


def default_ds_config() -> dict:
    """The ZeRO-3 config used without --ds_config (shipped with the package; the same file as
    configs/ds/zero3.json, which users copy and edit)."""
    return json.loads(resources.files("seft_scale.backends").joinpath("zero3.json").read_text())


def read_ds_json(path: Optional[str | Path], flag: str = "--ds_config") -> dict:
    """A DeepSpeed JSON file as a dict (None: the default); the error names `flag` and the file."""
    if path is None:
        return default_ds_config()
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"{flag}: {path} does not exist")
    try:
        ds = json.loads(p.read_text())
    except json.JSONDecodeError as e:
        raise ConfigError(f"{flag}: {path} is not valid JSON: {e}") from None
    if not isinstance(ds, dict):
        raise ConfigError(f"{flag}: {path} must hold a JSON object")
    return ds


def load_ds_config(source, cfg: RunConfig, world: int) -> dict:
    """The DeepSpeed config for this run, validated against the run config before any heavy work.

    Keys the loop executes itself take "auto" (or absence) as "the run config's value"; an
    explicit value must equal the run config's, else a ConfigError names both keys."""
    ds = copy.deepcopy(source) if isinstance(source, dict) else read_ds_json(source)
    def need(ok: bool, key: str, msg: str) -> None:
        if not ok:
            raise ConfigError(f"--ds_config {key}: {msg}")

    zero = ds.setdefault("zero_optimization", {})
    need(zero.get("stage") == 3, "zero_optimization.stage",
         f"the zero3 backend runs ZeRO stage 3, got {zero.get('stage')!r}")
    for key in ("optimizer", "scheduler"):
        need(key not in ds, key, "θ is frozen and has no DeepSpeed optimizer; SEFT's slot AdamW "
             "trains the deltas with train.lr / train.lr_schedule: remove this section")
    need(not (ds.get("fp16") or {}).get("enabled", False), "fp16.enabled",
         "fp16 is not supported (no loss scaling of the slot gradients); use bf16 or fp32")
    need((zero.get("offload_optimizer") or {}).get("device", "none") == "none",
         "zero_optimization.offload_optimizer", "the engine holds no optimizer state to offload "
         "(the slot optimizer state is O(K/world) per rank, next to the slots): remove it")
    need((zero.get("offload_param") or {}).get("device", "none") in ("none", "cpu"),
         "zero_optimization.offload_param.device",
         "only 'cpu' (or 'none'): SEFT edits θ's partitions in place and needs them in memory")

    t = cfg.train
    dtype = resolve_dtype(cfg.model.dtype, torch.device("cuda" if torch.cuda.is_available() else "cpu"))
    if dtype == torch.float16:
        raise ConfigError("model.dtype: float16 is not supported by the zero3 backend; use "
                          "bfloat16 or float32")
    shared = [
        ("train_micro_batch_size_per_gpu", t.micro_batch_size, "train.micro_batch_size"),
        ("gradient_accumulation_steps", t.grad_accum, "train.grad_accum"),
        ("train_batch_size", t.micro_batch_size * t.grad_accum * world,
         f"train.micro_batch_size x train.grad_accum x world ({world})"),
        ("gradient_clipping", t.max_grad_norm, "train.max_grad_norm"),
    ]
    for key, value, run_key in shared:
        given = ds.get(key, "auto")
        if given == "auto":
            ds[key] = value
        elif isinstance(given, bool) or not isinstance(given, (int, float)) or given != value:
            raise ConfigError(f"--ds_config {key}={given!r} conflicts with {run_key}={value!r}: "
                              "make them equal or write \"auto\"")
    bf16 = ds.setdefault("bf16", {})
    given = bf16.get("enabled", "auto")
    if given == "auto":
        bf16["enabled"] = dtype == torch.bfloat16
    elif bool(given) != (dtype == torch.bfloat16):
        raise ConfigError(f"--ds_config bf16.enabled={given!r} conflicts with model.dtype="
                          f"{cfg.model.dtype!r} ({str(dtype).removeprefix('torch.')} here): "
                          "make them agree or write \"auto\"")
    ds.setdefault("steps_per_print", 1 << 30)  # the engine never steps; keep its log quiet
    return ds
