"""Shared inputs of the reliability suite: a short tiny run, a pruned tiny model folder, and
damaged copies of files a user might hand the commands."""
from __future__ import annotations

import shutil

import pytest
import torch

from tests.conftest import ROOT

TINY = str(ROOT / "configs" / "runs" / "tiny.yaml")
TEXT = str(ROOT / "configs" / "data" / "tempest.txt")


@pytest.fixture(scope="session")
def cache(tmp_path_factory) -> str:
    return str(tmp_path_factory.mktemp("data_cache"))


@pytest.fixture(scope="session")
def fast(cache) -> list[str]:
    """Overrides that make configs/runs/tiny.yaml a run of seconds with three checkpoints."""
    return ["train.steps=6", "train.checkpoint_every=2", "seft.update_interval=3", "seft.window=2",
            "train.warmup_steps=1", "train.micro_batch_size=4", "data.seq_len=64",
            "train.eval_batches=1", "eval.plots=false", f"data.cache_dir={cache}"]


def train_argv(out, *overrides, resume: bool = False) -> list[str]:
    return ["--config", TINY, "--output-dir", str(out), "--no-progress", *overrides] + \
        (["--resume"] if resume else [])


@pytest.fixture(scope="session")
def pruned_folder(tmp_path_factory) -> str:
    """A tiny Llama (the tiny.yaml shape) pruned to 50% by magnitude, as a plain HF folder."""
    from seft_scale.config import ModelConfig, TinyModelConfig
    from seft_scale.model import build_tiny_llama, find_targets, save_model, train_tokenizer
    from seft_scale.prune.magnitude import prune_magnitude
    out = tmp_path_factory.mktemp("pruned_tiny")
    tok = train_tokenizer(open(TEXT).read()[:20000], 384)
    model = build_tiny_llama(ModelConfig(tiny=TinyModelConfig()), len(tok), torch.float32, "sdpa")
    with torch.no_grad():
        prune_magnitude(find_targets(model, [".*_proj"]), 0.5)
    save_model(model, tok, out)
    return str(out)


@pytest.fixture(scope="session")
def truncated_folder(pruned_folder, tmp_path_factory) -> str:
    """The pruned folder with model.safetensors cut in half (an interrupted copy)."""
    out = tmp_path_factory.mktemp("truncated") / "model"
    shutil.copytree(pruned_folder, out)
    weights = out / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])
    return str(out)


@pytest.fixture(autouse=True)
def one_thread():
    """The tiny model's matmuls are far too small for two threads: on shared cores the second
    thread's spin-waits make a step ~40x slower (measured 1.2 s vs 0.03 s under load)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
