"""Training data: sources -> fixed-length token examples -> a deterministic, resumable order.

`build_data(cfg, tokenizer)` reads `data.train` (a local file or folder, or a hub dataset),
renders it (`data.kind`: packed LM text, or instruction examples with the loss on the response),
holds out a validation set before any shuffling, and caches the tokens on disk (seft_scale/data/
cache.py); `batch_indices` shuffles the training examples per epoch.

Held-out split (`data.val_fraction`, unless `data.validation` names another source):
- text: the last blocks of the packed stream. A contiguous tail is text the model never saw
  around a training block (a random choice of blocks would interleave them), as in the
  train/test splits of LM corpora; it follows file order, so give `data.validation` when the
  file is sorted by topic.
- instruction: examples chosen by a hash of their content (encode.heldout_by_digest): the
  choice ignores file order (commonsense_170k is sorted by task) and the seed, so the held-out
  loss compares across seeds and runs, and duplicated examples never straddle the split.
"""
from __future__ import annotations

import logging

from seft_scale.config import DataConfig
from seft_scale.errors import ConfigError
from seft_scale.data.blocks import IGNORE_INDEX, TokenBlocks, TokenSplit, batch_indices
from seft_scale.data.cache import cache_key, cache_root, load_cached, save_cached
from seft_scale.data.encode import (documents, encode_instructions, examples, heldout_by_digest,
                                    pack_documents)
from seft_scale.data.sources import Source

__all__ = ["IGNORE_INDEX", "TokenBlocks", "TokenSplit", "batch_indices", "build_data",
           "tokenizer_training_text"]

log = logging.getLogger(__name__)

TOKENIZER_TEXT_CHARS = 8_000_000
"""Most characters a tiny model's BPE tokenizer is trained on: plenty for a few hundred merges,
and it bounds the cost on a large corpus."""


def _sources(cfg: DataConfig) -> list[Source]:
    return [Source.of(cfg, "train")] + ([Source.of(cfg, "validation")] if cfg.validation else [])


def _rows(src: Source, cfg: DataConfig):
    ds = src.load(cache_root(cfg) / "hf")
    if src.key == "data.train" and cfg.max_examples is not None:
        ds = ds.select(range(min(cfg.max_examples, len(ds))))
    return ds


def _texts(src: Source, cfg: DataConfig):
    """Batches of the strings a source contributes: documents, or rendered examples."""
    ds = _rows(src, cfg)
    if cfg.kind == "text":
        yield from documents(ds, cfg, src)
    else:
        for prompts, responses in examples(ds, cfg, src):
            yield [p + (r or "") for p, r in zip(prompts, responses)]


def tokenizer_training_text(cfg: DataConfig, max_chars: int = TOKENIZER_TEXT_CHARS) -> str:
    """The text a tiny model's tokenizer is trained on: the training documents, or the rendered
    instruction examples, newline-joined, up to max_chars. Reading it also checks the training
    source (columns, emptiness) before any model is built."""
    out, size = [], 0
    for batch in _texts(Source.of(cfg, "train"), cfg):
        for text in batch:
            out.append(text[: max_chars - size])
            size += len(out[-1]) + 1
            if size >= max_chars:
                return "\n".join(out)
    if not out:
        raise ConfigError(f"data.train: {cfg.train} holds no text")
    return "\n".join(out)


def build_data(cfg: DataConfig, tokenizer) -> TokenBlocks:
    """The run's training and validation examples, from the cache when it holds them."""
    sources = _sources(cfg)
    key = cache_key(cfg, tokenizer, [s.fingerprint() for s in sources])
    path = cache_root(cfg) / f"{key}.safetensors"
    cached = load_cached(path, cfg.seq_len)
    if cached is not None:
        tensors, stats = cached
    else:
        tensors, stats = (_pack if cfg.kind == "text" else _instructions)(cfg, tokenizer, sources)
        save_cached(path, tensors, stats)
    stats = {**stats, "cache_file": str(path), "cache_hit": cached is not None}
    _report(stats, cfg)
    return TokenBlocks(train=TokenSplit(tensors["train_input_ids"], tensors["train_labels"]),
                       val=TokenSplit(tensors["val_input_ids"], tensors["val_labels"]), stats=stats)


def _too_few(key: str, what: str, have: int, need: int, cfg: DataConfig) -> ConfigError:
    return ConfigError(f"{key}: {what} make {have} example(s) of data.seq_len={cfg.seq_len}; "
                       f"need at least {need}")


def _pack(cfg: DataConfig, tokenizer, sources: list[Source]):
    blocks, tokens = pack_documents(_texts(sources[0], cfg), tokenizer, cfg.seq_len)
    if tokens == 0:
        raise ConfigError(f"data.train: {sources[0].location} holds no text")
    if len(sources) > 1:
        train = blocks
        val, val_tokens = pack_documents(_texts(sources[1], cfg), tokenizer, cfg.seq_len)
        if len(val) == 0:
            raise _too_few("data.validation", f"{val_tokens} tokens", 0, 1, cfg)
    else:
        n_val = int(round(len(blocks) * cfg.val_fraction))
        if len(blocks) - n_val < 1:
            raise _too_few("data.train", f"{tokens} tokens", len(blocks), n_val + 1, cfg)
        train, val = blocks[: len(blocks) - n_val], blocks[len(blocks) - n_val:]
    if len(train) == 0:
        raise _too_few("data.train", f"{tokens} tokens", 0, 1, cfg)
    stats = {"kind": "text", "tokens": tokens, "train_examples": len(train),
             "val_examples": len(val)}
    return {"train_input_ids": train, "train_labels": train, "val_input_ids": val,
            "val_labels": val}, stats


def _instructions(cfg: DataConfig, tokenizer, sources: list[Source]):
    enc = [encode_instructions(examples(_rows(s, cfg), cfg, s), tokenizer, cfg.seq_len)
           for s in sources]
    for e, s in zip(enc, sources):
        if e.rows and e.no_response == e.rows:
            raise ConfigError(f"{s.key}: none of the {e.rows} rows of {s.location} has a response "
                              f"in {cfg.output_field!r} (data.output_field): all null, missing or empty")
        if len(e.input_ids) == 0:
            raise ConfigError(f"{s.key}: none of the {e.rows} examples of {s.location} keeps a "
                              f"response token within data.seq_len={cfg.seq_len}")
    if len(sources) > 1:
        (train_ids, train_labels), (val_ids, val_labels) = [(e.input_ids, e.labels) for e in enc]
    else:
        tr, va = heldout_by_digest(enc[0].digests, cfg.val_fraction)
        train_ids, train_labels = enc[0].input_ids[tr], enc[0].labels[tr]
        val_ids, val_labels = enc[0].input_ids[va], enc[0].labels[va]
    if len(train_ids) == 0:
        raise _too_few("data.train", f"{len(enc[0].input_ids)} examples", 0, 1, cfg)
    stats = {"kind": "instruction", "template": cfg.template, "train_examples": len(train_ids),
             "val_examples": len(val_ids), "rows": sum(e.rows for e in enc),
             "truncated": sum(e.truncated for e in enc), "dropped": sum(e.dropped for e in enc),
             "no_response": sum(e.no_response for e in enc),
             "loss_tokens": int((train_labels[:, 1:] != IGNORE_INDEX).sum())}
    return {"train_input_ids": train_ids, "train_labels": train_labels, "val_input_ids": val_ids,
            "val_labels": val_labels}, stats


def _report(stats: dict, cfg: DataConfig) -> None:
    source = "cached " if stats["cache_hit"] else ""
    log.info("data: %s%d training / %d validation examples of %d tokens (%s)", source,
             stats["train_examples"], stats["val_examples"], cfg.seq_len, stats["cache_file"])
    if stats.get("no_response"):
        log.warning("data: %d of %d instruction rows have no %s (null, missing or empty) and were "
                    "dropped", stats["no_response"], stats["rows"], cfg.output_field)
    cut_off = stats.get("dropped", 0) - stats.get("no_response", 0)
    if stats.get("truncated") or cut_off:
        log.warning("data: %d of %d instruction examples were longer than data.seq_len=%d and "
                    "were cut; %d of them kept no response token and were dropped",
                    stats["truncated"], stats["rows"], cfg.seq_len, cut_off)
