"""The causal LM to repair: a local HF folder or a tiny random Llama built offline; meta-device
skeletons for the ranks that hold no weights; target lookup; saving; reading single tensors of a
saved folder."""
from __future__ import annotations

import importlib.util
import json
import math
import re
from pathlib import Path
from typing import Optional

import torch
from safetensors import SafetensorError, safe_open
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from torch import nn
from transformers import (AutoConfig, AutoModelForCausalLM, AutoTokenizer, LlamaConfig,
                          LlamaForCausalLM, PreTrainedTokenizerFast)

from seft_scale.config import ModelConfig, resolve_dtype
from seft_scale.errors import ConfigError

def resolve_attn(name: str, device: torch.device) -> str:
    """auto: flash-attn 2 when installed and on CUDA, else PyTorch sdpa."""
    has_flash = importlib.util.find_spec("flash_attn") is not None
    if name == "auto":
        return "flash_attention_2" if device.type == "cuda" and has_flash else "sdpa"
    if name == "flash_attention_2" and not (device.type == "cuda" and has_flash):
        raise ConfigError("model.attn_implementation: flash_attention_2 needs CUDA and the "
                          "flash-attn package (pip install -e '.[gpu]'); use sdpa or auto")
    return name


def train_tokenizer(text: str, vocab_size: int):
    """A byte-level BPE tokenizer trained on `text` (deterministic), wrapped for transformers."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator([text], trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>",
                                   bos_token="<|endoftext|>", pad_token="<|endoftext|>")


def build_tiny_llama(cfg: ModelConfig, vocab_size: int, dtype: torch.dtype, attn: str):
    t = cfg.tiny
    config = LlamaConfig(
        hidden_size=t.hidden_size, intermediate_size=t.intermediate_size,
        num_hidden_layers=t.num_hidden_layers, num_attention_heads=t.num_attention_heads,
        num_key_value_heads=t.num_key_value_heads, vocab_size=vocab_size,
        max_position_embeddings=t.max_position_embeddings, tie_word_embeddings=False,
        bos_token_id=0, eos_token_id=0, pad_token_id=0)
    config._attn_implementation = attn
    with torch.random.fork_rng():
        torch.manual_seed(t.seed)
        model = LlamaForCausalLM(config)
    # parameters only: the rotary inv_freq buffers stay fp32, as from_pretrained builds them, so
    # the model reloaded from its saved folder (a resumed run, the export) computes the same
    # (model.to(bfloat16) would round them: a different model in 16 bits)
    with torch.no_grad():
        for p in model.parameters():
            p.data = p.data.to(dtype)
    return model


def load_model(cfg: ModelConfig, device: torch.device, train_text: Optional[str] = None,
               path: Optional[str] = None):
    """(model, tokenizer). `path` overrides cfg.path (a resumed run reloads its saved start)."""
    dtype, attn = resolve_dtype(cfg.dtype, device), resolve_attn(cfg.attn_implementation, device)
    path = path or cfg.path
    if path:
        check_weights(Path(path))
        try:
            tok = AutoTokenizer.from_pretrained(path, trust_remote_code=cfg.trust_remote_code)
        except (OSError, ValueError) as e:
            raise ConfigError(f"model.path: no usable tokenizer in {path}: {e}") from None
        try:
            model = AutoModelForCausalLM.from_pretrained(
                path, dtype=dtype, attn_implementation=attn, use_safetensors=True,
                trust_remote_code=cfg.trust_remote_code)
        except (OSError, ValueError, SafetensorError) as e:
            raise ConfigError(f"model.path: cannot load a causal LM from {path}: {e}") from None
    else:
        if train_text is None:
            raise ConfigError("model.path is empty and there is no text to build a tokenizer from")
        tok = train_tokenizer(train_text, cfg.tiny.vocab_size)
        model = build_tiny_llama(cfg, len(tok), dtype, attn)
    model.config.use_cache = False
    return model.to(device), tok


def skeleton(cfg: ModelConfig, path: Optional[str], vocab_size: int, dtype: torch.dtype, attn: str):
    """The model's modules on the meta device, no weights: what ranks that receive their shards
    from rank 0 build (FSDP2's broadcast, ZeRO-3's partitioning)."""
    with torch.device("meta"):
        if path:
            config = AutoConfig.from_pretrained(path, trust_remote_code=cfg.trust_remote_code)
            model = AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation=attn,
                                                     trust_remote_code=cfg.trust_remote_code)
        else:
            model = build_tiny_llama(cfg, vocab_size, dtype, attn)
    model.config.use_cache = False
    return model


def load_on_rank0(cfg: ModelConfig, device: torch.device, comm, train_text: Optional[str] = None,
                  path: Optional[str] = None):
    """(model, tokenizer): the whole model on rank 0 (on `device`), a meta skeleton elsewhere;
    every rank gets rank 0's tokenizer, so all ranks tokenise the data alike."""
    dtype, attn = resolve_dtype(cfg.dtype, device), resolve_attn(cfg.attn_implementation, device)
    model, tok = load_model(cfg, device, train_text, path) if comm.rank == 0 else (None, None)
    comm.wait("rank 0 loading the model")  # minutes for a 70B model: not a hung rank
    tok = comm.broadcast_object(tok)
    if comm.rank != 0:
        model = skeleton(cfg, path or cfg.path, len(tok), dtype, attn)
    return model, tok


def has_weights(model: nn.Module) -> bool:
    """Whether this rank holds the model's weights: not a meta skeleton, nor ZeRO-3 partitions
    (which hold no data between gathers). Pruning and weight checks run where the weights are."""
    return not any(p.is_meta or p.numel() == 0 for p in model.parameters())


def find_targets(model: nn.Module, patterns: list[str],
                 key: str = "seft.targets") -> list[tuple[str, nn.Linear]]:
    """Linear modules whose last name component matches one of `patterns` (regex, full match);
    `key` is the config key or flag the patterns came from, named in errors."""
    try:
        regs = [re.compile(p) for p in patterns]
    except re.error as e:
        raise ConfigError(f"{key}: {patterns} is not a list of regular expressions ({e})") from None
    found = [(name, mod) for name, mod in model.named_modules()
             if isinstance(mod, nn.Linear) and any(r.fullmatch(name.rsplit(".", 1)[-1]) for r in regs)]
    if not found:
        names = sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, nn.Linear)})
        raise ConfigError(f"{key}: {patterns} match no Linear module of this model (its Linear "
                          f"modules end in: {', '.join(names)})")
    return found


def save_model(model: nn.Module, tokenizer, out: Path) -> None:
    """A plain HF folder in safetensors."""
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)


def check_weights(folder: Path, key: str = "model.path") -> dict[str, str]:
    """{tensor name: file} of an HF safetensors folder, after checking that every weight file
    exists and is complete: its header parses and the file holds every byte the header names
    (safetensors checks both on open; only headers are read). A truncated copy or an interrupted
    download is a ConfigError naming the file and `key`, not an error deep inside a load."""
    folder = Path(folder)
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
            files = sorted(set(weight_map.values()))
        except (ValueError, KeyError, TypeError, AttributeError) as e:
            raise ConfigError(f"{key}: {index} is not a safetensors index ({type(e).__name__}: "
                              f"{e})") from None
    elif (folder / "model.safetensors").is_file():
        weight_map, files = None, ["model.safetensors"]
    else:
        raise ConfigError(f"{key}: {folder} has no model.safetensors(.index.json); only "
                          "safetensors checkpoints are read (convert .bin files first)")
    where = {}
    for name in files:
        f = folder / name
        if not f.is_file():
            raise ConfigError(f"{key}: {f} is missing (named by {index.name})")
        try:
            with safe_open(str(f), "pt") as h:
                where.update({k: name for k in h.keys()})
        except (SafetensorError, OSError) as e:
            raise ConfigError(f"{key}: {f} is truncated or not a safetensors file "
                              f"({str(e).splitlines()[0]}); copy or download it again") from None
    return weight_map if weight_map is not None else where


class SafetensorsFolder:
    """Read single tensors of an HF folder (sharded or not) without loading the model."""

    def __init__(self, folder: Path, key: str = "model.path"):
        self.folder = Path(folder)
        self.where = check_weights(self.folder, key)

    def get(self, key: str) -> torch.Tensor:
        with safe_open(str(self.folder / self.where[key]), "pt") as f:
            return f.get_tensor(key)

    def get_flat(self, key: str, lo: int, hi: int) -> torch.Tensor:
        """Elements [lo, hi) of the flattened tensor, reading only the rows that hold them."""
        with safe_open(str(self.folder / self.where[key]), "pt") as f:
            part = f.get_slice(key)
            shape = part.get_shape()
            cols = math.prod(shape[1:])
            r0, r1 = lo // cols, -(-hi // cols)
            return part[r0:r1].reshape(-1)[lo - r0 * cols: hi - r0 * cols]
