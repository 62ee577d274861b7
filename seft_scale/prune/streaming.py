"""Prune an HF safetensors folder holding one decoder layer in memory at a time.

The model is built on the meta device (accelerate's `init_empty_weights`); the tensors the
forward needs before the first decoder layer (embeddings) are read to capture the calibration
inputs and freed; then each decoder layer's tensors are read from the safetensors files, the
layer is calibrated and pruned (prune/sequential.py), written as its own shard of the output
folder in the checkpoint's dtype, and returned to the meta device. The output is a plain HF
folder: sharded safetensors + index, exact zeros, and every other file of the source folder
(config, tokenizer) copied, plus prune_report.json.

Peak memory (b = bytes per element of the compute dtype, N windows of T tokens, hidden size h,
the largest decoder layer holding P_L parameters, its largest MLP width d_ff):

    peak ≈ R0 + max( F,                             the non-layer tensors, written first
                     E + N·T·h·b,                   capture: embeddings + the input buffer
                     2·P_L·b + 2·N·T·h·b + S + X )  one layer: weights, in/out buffers,
                                                    statistics, transients
    S = Σ_targets d_in·8 (wanda) | Σ_targets d_in²·4 (sparsegpt) | 0 (magnitude)
    X = max( T·(6h + 4·d_ff)·b,                     one window through one decoder layer
             17·d_out·d_in (magnitude, wanda: sort values, int64 indices, mask)
             | 9·d_out·d_in + 8·d_in² (sparsegpt: weight copy, update, mask, two d_in² factors) )

R0 is the process before the heavy work (interpreter, torch, transformers, tokenizer, token
ids); F the non-layer tensors in the checkpoint's dtype (embeddings, final norm, untied
lm_head); E those of them the forward needs before layer 0, in the compute dtype (an upper
bound: a checkpoint already in the compute dtype stays memory-mapped, and only the embedding rows
of calibration tokens are paged in). The layer counts twice: safetensors maps the file, and
the pages read stay resident beside the copy that in-place pruning writes. magnitude needs no
capture and no buffers (N = 0). `predicted_peak` evaluates this; launch/prune.py prints it next
to the measured peak RSS. Measured on SmolLM2-135M (fp32, 16 windows × 512 tokens, 2 CPU
cores): magnitude 516.3 MiB measured / 516.0 predicted, wanda 525.5 / 543.3, sparsegpt
563.1 / 554.5 (R0 ≈ 410-430 MiB of these).
"""
from __future__ import annotations

import ctypes
import ctypes.util
import json
import resource
import shutil
import sys
import time
from pathlib import Path
from typing import Sequence

import psutil
import torch
from accelerate import init_empty_weights
from accelerate.utils import set_module_tensor_to_device
from safetensors.torch import save_file
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from seft_scale.config import PruneConfig, SeftConfig
from seft_scale.errors import ConfigError
from seft_scale.model import SafetensorsFolder, find_targets
from seft_scale.prune.calibration import calibration_windows, read_calibration_text
from seft_scale.prune.sequential import (CALIBRATED, check_shapes, decoder_layers,
                                         prune_layerwise, targets_by_layer)
from seft_scale.sparsity import summarize

# Files of the source folder that are not copied: weights (rewritten) and stale reports.
_WEIGHT_SUFFIXES = {".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".gguf", ".h5", ".msgpack"}
_NOT_COPIED = {"model.safetensors.index.json", "pytorch_model.bin.index.json", "prune_report.json"}


def _find_malloc_trim():
    try:
        return ctypes.CDLL(ctypes.util.find_library("c")).malloc_trim
    except (OSError, AttributeError, TypeError):  # not glibc
        return None


_MALLOC_TRIM = _find_malloc_trim() if sys.platform == "linux" else None


def release_freed_memory() -> None:
    """Hand freed heap back to the OS (glibc's malloc_trim). Without it, RSS creeps up by the
    allocator's retained fragments layer after layer (~2.5 MB per SmolLM2 layer measured) and no
    longer tracks what is alive."""
    if _MALLOC_TRIM is not None:
        _MALLOC_TRIM(0)


def current_rss() -> int:
    return psutil.Process().memory_info().rss


def peak_rss() -> int:
    """High-water resident set size of this process (ru_maxrss: KiB on Linux, bytes on macOS)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024


def _nbytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def predicted_peak(baseline: int, nonlayer_file_bytes: int, embedding_bytes: int, layer: nn.Module,
                   targets: Sequence[tuple[str, nn.Linear]], method: str, nsamples: int,
                   seqlen: int, hidden: int, elem: int) -> dict:
    """The module docstring's formula, term by term (bytes); `layer` is the largest decoder layer
    (on any device, meta included) and `targets` its target Linears."""
    n = nsamples if method in CALIBRATED else 0
    buffer = n * seqlen * hidden * elem
    stats = sum(lin.in_features * 8 if method == "wanda" else
                lin.in_features ** 2 * 4 if method == "sparsegpt" else 0 for _, lin in targets)
    d_ff = max(m.out_features for m in layer.modules() if isinstance(m, nn.Linear))
    forward = seqlen * (6 * hidden + 4 * d_ff) * elem if n else 0
    prune = max(9 * lin.out_features * lin.in_features + 8 * lin.in_features ** 2
                if method == "sparsegpt" else 17 * lin.out_features * lin.in_features
                for _, lin in targets)
    terms = {"baseline_R0": baseline, "nonlayer_file_F": nonlayer_file_bytes,
             "embeddings_E": embedding_bytes, "layer_weights": 2 * _nbytes(layer.parameters()),
             "activation_buffers": 2 * buffer, "statistics_S": stats,
             "transient_X": max(forward, prune)}
    phases = [nonlayer_file_bytes, embedding_bytes + buffer,
              terms["layer_weights"] + 2 * buffer + stats + terms["transient_X"]]
    return {"predicted_peak_rss": baseline + max(phases), "terms": terms}


class _LayerShards:
    """Reads one decoder layer's tensors into the meta-device model, writes it as one shard."""

    def __init__(self, model: nn.Module, source: SafetensorsFolder, out: Path, layers_name: str,
                 layers: nn.ModuleList, dtype: torch.dtype, device):
        self.model, self.source, self.out, self.dtype, self.device = model, source, out, dtype, device
        self.layers_name, self.layers = layers_name, layers
        self.keys = [[] for _ in layers]
        self.nonlayer = []
        for key in source.where:
            head, _, rest = key.partition(layers_name + ".")
            index = rest.split(".", 1)[0]
            if not head and index.isdigit() and int(index) < len(layers):
                self.keys[int(index)].append(key)
            else:
                self.nonlayer.append(key)
        self.file_dtype: dict[str, torch.dtype] = {}
        self.weight_map: dict[str, str] = {}
        self.total_size = 0

    def shard(self, k: int) -> str:
        return f"model-{k + 1:05d}-of-{len(self.layers) + 1:05d}.safetensors"

    def write(self, k: int, tensors: dict[str, torch.Tensor]) -> None:
        save_file(tensors, str(self.out / self.shard(k)), metadata={"format": "pt"})
        self.weight_map.update({key: self.shard(k) for key in tensors})
        self.total_size += _nbytes(tensors.values())

    def materialize(self, keys: Sequence[str]) -> int:
        """Read `keys` into the model (compute dtype, on the device); returns the bytes held."""
        held = 0
        for key in keys:
            t = self.source.get(key)
            self.file_dtype[key] = t.dtype
            t = t.to(self.dtype) if t.is_floating_point() else t
            set_module_tensor_to_device(self.model, key, self.device, value=t)
            held += _nbytes([t])
        return held

    def free(self, keys: Sequence[str]) -> None:
        for key in keys:
            set_module_tensor_to_device(self.model, key, "meta")

    def load(self, i: int) -> None:
        self.materialize(self.keys[i])
        missing = [n for n, p in self.layers[i].named_parameters() if p.is_meta]
        if missing:
            raise ConfigError(f"--model: the checkpoint lacks {self.layers_name}.{i}.{missing[0]}"
                              f"{f' and {len(missing) - 1} more' if len(missing) > 1 else ''}")
        self.layers[i].to(self.device)  # its non-persistent buffers, if any

    def save(self, i: int) -> None:
        state = self.layers[i].state_dict(prefix=f"{self.layers_name}.{i}.")
        self.write(i + 1, {k: state[k].to(self.file_dtype[k]).contiguous().cpu() for k in self.keys[i]})
        self.layers[i].to("meta")

    def write_index(self) -> None:
        index = {"metadata": {"total_size": self.total_size},
                 "weight_map": dict(sorted(self.weight_map.items()))}
        (self.out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))


def open_skeleton(model_dir: Path, dtype: torch.dtype, attn_implementation: str,
                  trust_remote_code: bool):
    """(tokenizer, model on the meta device, checkpoint reader) of an HF safetensors folder."""

    if not (model_dir / "config.json").is_file():
        raise ConfigError(f"--model: {model_dir} is not a Hugging Face model folder (no config.json)")
    source = SafetensorsFolder(model_dir, "--model")  # every weight file complete, before any work
    try:
        tokenizer = AutoTokenizer.from_pretrained(model_dir, trust_remote_code=trust_remote_code)
        config = AutoConfig.from_pretrained(model_dir, trust_remote_code=trust_remote_code)
        with init_empty_weights():
            model = AutoModelForCausalLM.from_config(config, dtype=dtype, trust_remote_code=trust_remote_code,
                                                     attn_implementation=attn_implementation)
    except (OSError, ValueError, KeyError) as e:
        raise ConfigError(f"--model: cannot build a causal LM and tokenizer from {model_dir}: {e}") from None
    model.config.use_cache = False
    known = model.state_dict().keys()
    unknown = [k for k in source.where if k not in known]
    if unknown:
        raise ConfigError(f"--model: checkpoint tensors {unknown[:3]} are not parameters of the "
                          f"{type(model).__name__} that config.json describes")
    return tokenizer, model, source


@torch.no_grad()
def prune_folder(model_dir: str | Path, out_dir: str | Path, cfg: PruneConfig,
                 targets: Sequence[str] = tuple(SeftConfig().targets), device: str = "cpu",
                 dtype: torch.dtype = torch.float32, attn_implementation: str = "sdpa",
                 trust_remote_code: bool = False, log=print, targets_key: str = "seft.targets") -> dict:
    """Prune the HF folder `model_dir` into `out_dir` (module docstring); returns the report that
    is also written to <out_dir>/prune_report.json. All inputs are checked before heavy work;
    `targets_key` is where `targets` came from (a config key or flag), named in errors."""
    if cfg.method not in ("magnitude", *CALIBRATED):
        raise ConfigError(f"prune.method (--method): {cfg.method!r}; choose magnitude, wanda or sparsegpt")
    cfg.validate()
    model_dir, out = Path(model_dir).expanduser(), Path(out_dir).expanduser()
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ConfigError(f"--out: {out} exists and is not an empty folder (nothing was written)")
    tokenizer, model, source = open_skeleton(model_dir, dtype, attn_implementation, trust_remote_code)
    found = find_targets(model, list(targets), targets_key)
    check_shapes(found, cfg)
    layers_name, layers = decoder_layers(model)
    groups = targets_by_layer(found, layers_name, len(layers), targets_key)
    calib = None
    if cfg.method in CALIBRATED:
        text = read_calibration_text(cfg.calib_data)
        context = getattr(model.config, "max_position_embeddings", None)
        if context and cfg.seqlen > context:
            raise ConfigError(f"prune.seqlen (--seqlen): {cfg.seqlen} exceeds the model's "
                              f"max_position_embeddings {context} ({model_dir / 'config.json'})")
        calib = calibration_windows(text, tokenizer, cfg.nsamples, cfg.seqlen, cfg.seed)

    # -- heavy work from here on
    baseline, t0 = current_rss(), time.perf_counter()
    out.mkdir(parents=True, exist_ok=True)
    shards = _LayerShards(model, source, out, layers_name, layers, dtype, device)
    nonlayer = {k: source.get(k) for k in shards.nonlayer}  # memory-mapped, paged in by the write
    nonlayer_bytes = _nbytes(nonlayer.values())
    shards.write(0, nonlayer)
    del nonlayer
    head = next((n for n, m in model.named_modules() if m is model.get_output_embeddings()), None)
    needed = [k for k in shards.nonlayer if head is None or not k.startswith(head + ".")]
    for name, buf in model.named_buffers():  # rotary tables etc. are real tensors already
        if not buf.is_meta and not name.startswith(layers_name + "."):
            buf.data = buf.data.to(device)
    embedding_bytes = shards.materialize(needed) if calib is not None else 0

    def load_layer(i: int) -> None:
        if i == 0 and calib is not None:  # layer 0's inputs are captured: drop the embeddings
            shards.free(needed)
        shards.load(i)

    def save_layer(i: int) -> None:
        shards.save(i)
        release_freed_memory()
        log(f"  layer {i + 1}/{len(layers)} written")

    log(f"pruning {len(found)} matrices in {len(layers)} layers with {cfg.method}"
        f"{'' if calib is None else f' ({cfg.nsamples} windows x {cfg.seqlen} tokens)'}")
    try:
        per_matrix = prune_layerwise(model, found, cfg, calib, device, load_layer, save_layer)
        shards.write_index()
        for f in sorted(model_dir.iterdir()):
            if f.is_file() and f.suffix not in _WEIGHT_SUFFIXES and f.name not in _NOT_COPIED:
                shutil.copy2(f, out / f.name)
    except BaseException:
        log(f"failed: {out} is incomplete; delete it before running again")
        raise

    largest = max(range(len(layers)), key=lambda i: _nbytes(layers[i].parameters()))
    memory = predicted_peak(baseline, nonlayer_bytes, embedding_bytes, layers[largest], groups[largest],
                            cfg.method, cfg.nsamples, cfg.seqlen, model.config.hidden_size,
                            torch.finfo(dtype).bits // 8)
    memory["measured_peak_rss"] = peak_rss()
    calibration = None if calib is None else {"data": cfg.calib_data, "nsamples": cfg.nsamples,
                                              "seqlen": cfg.seqlen, "seed": cfg.seed}
    report = {"source": str(model_dir), "method": cfg.method, "sparsity": cfg.sparsity,
              "pattern": cfg.pattern, "granularity": cfg.granularity, "calibration": calibration,
              "time_s": round(time.perf_counter() - t0, 3), "memory": memory,
              "summary": summarize(per_matrix), "matrices": per_matrix}
    (out / "prune_report.json").write_text(json.dumps(report, indent=1))
    return report
