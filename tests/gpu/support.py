"""What the GPU tests need besides the package: which sdpa backend a profiled run used, the rows
of .txt data without the `datasets` package, and the facts file the tests write.

These run on CPU too (tests/gpu/test_support.py checks them there), so a machine with a GPU
only ever runs helpers that were already seen working.
"""
from __future__ import annotations

import importlib.util
import json
import os
from pathlib import Path

import torch

# aten ops torch.nn.functional.scaled_dot_product_attention dispatches to, by backend (their
# backward ops carry the same stem); CPU's fused kernel is `..._flash_attention_for_cpu`
SDPA_OPS = {"flash": "_scaled_dot_product_flash_attention",
            "efficient": "_scaled_dot_product_efficient_attention",
            "cudnn": "_scaled_dot_product_cudnn_attention", "math": "_scaled_dot_product_attention_math"}
_KERNEL_WORDS = ("flash", "fmha", "attention", "attn", "sdpa")


def sdpa_backends(prof) -> dict:
    """The sdpa backends a torch.profiler run went through: the aten ops it dispatched to (every
    device), and on CUDA the attention kernels that ran (their names say e.g. flash_fwd)."""
    names = {e.name for e in prof.events()}
    ops = sorted(n for n in names if "scaled_dot_product" in n)
    backends = sorted(b for b, stem in SDPA_OPS.items() if any(stem in n for n in ops))
    kernels = sorted({e.name for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA
                      and any(w in e.name.lower() for w in _KERNEL_WORDS)})
    return {"backends": backends, "aten_ops": ops, "cuda_kernels": kernels[:12]}


class TextRows:
    """The rows `datasets`' text builder gives for .txt files with sample_by="document" (one row
    {"text": the whole file, read in text mode} per file), with the calls the data layer makes on
    them (seft_scale/data/__init__.py, encode.py). The GPU machine has no `datasets` package;
    tests/gpu/test_support.py checks on CPU that these rows tokenise to the same blocks."""

    column_names = ["text"]

    def __init__(self, texts: list[str]):
        self.texts = list(texts)

    def __len__(self) -> int:
        return len(self.texts)

    def select_columns(self, columns: list[str]) -> "TextRows":
        assert list(columns) == self.column_names, columns
        return self

    def select(self, indices) -> "TextRows":
        return TextRows([self.texts[i] for i in indices])

    def iter(self, batch_size: int):
        for i in range(0, len(self.texts), batch_size):
            yield {"text": self.texts[i:i + batch_size]}


def load_txt_rows(source, hf_cache_dir=None) -> TextRows:
    """A stand-in for seft_scale.data.sources.Source._load_local, .txt sources only."""
    if source.format != "txt":
        raise ValueError(f"{source.key}: the GPU tests read .txt data only (the device has no datasets "
                         f"package), got {source.format}")
    return TextRows([f.read_text(encoding="utf-8") for f in source.files()])


def has_module(name: str) -> bool:
    return importlib.util.find_spec(name) is not None


def write_facts(facts: dict, path: str | os.PathLike | None = None) -> None:
    """The facts the GPU tests recorded, as JSON at `path` (default $SEFT_GPU_FACTS; neither: no file)."""
    path = path or os.environ.get("SEFT_GPU_FACTS")
    if path:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(json.dumps(facts, indent=1, sort_keys=True, default=str) + "\n")
