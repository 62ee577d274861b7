"""Rows -> fixed-length token examples.

text: every document is tokenised without special tokens and followed by EOS; the stream is cut
into blocks of seq_len (the remainder dropped); labels are the ids.
instruction: [BOS if the tokenizer adds one] + prompt + response + EOS, prompt and response
tokenised apart so the loss boundary is exact; labels are -100 on BOS, prompt and padding.
Longer examples are cut at seq_len (an example left with no response token is dropped);
shorter ones are right-padded with the pad token (EOS when there is none). A row whose response
is null, missing or empty is dropped and counted (it would teach the model to answer with EOS).
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Iterator, Optional

import torch

from seft_scale.config import DataConfig
from seft_scale.errors import ConfigError
from seft_scale.data.blocks import IGNORE_INDEX
from seft_scale.data.sources import Source
from seft_scale.data.templates import TEMPLATES

_BATCH = 1000  # rows per tokenizer call: the fast tokenizers parallelise within a call


def _columns(ds, need: list[tuple[str, str]], src: Source, kind: str) -> None:
    for column, knob in need:
        if column not in ds.column_names:
            raise ConfigError(f"{src.key}: {kind} data needs the column {column!r} ({knob}); the "
                              f"rows of {src.location} have: {', '.join(ds.column_names)}")


def _text(value) -> str:
    return "" if value is None else value if isinstance(value, str) else str(value)


def documents(ds, cfg: DataConfig, src: Source) -> Iterator[list[str]]:
    """Batches of the non-empty documents of text data."""
    _columns(ds, [(cfg.text_field, "data.text_field")], src, "text")
    for batch in ds.select_columns([cfg.text_field]).iter(batch_size=_BATCH):
        docs = [d for d in map(_text, batch[cfg.text_field]) if d]
        if docs:
            yield docs


def examples(ds, cfg: DataConfig, src: Source) -> Iterator[tuple[list[str], list[Optional[str]]]]:
    """Batches of (prompts, responses) of instruction data; a response is None where the row has
    none (null, missing or empty)."""
    _columns(ds, [(cfg.instruction_field, "data.instruction_field"),
                  (cfg.output_field, "data.output_field")], src, "instruction")
    template = TEMPLATES[cfg.template]
    cols = [cfg.instruction_field, cfg.output_field]
    has_input = cfg.input_field in ds.column_names
    cols += [cfg.input_field] if has_input else []
    for batch in ds.select_columns(cols).iter(batch_size=_BATCH):
        n = len(batch[cfg.output_field])
        inputs = map(_text, batch[cfg.input_field]) if has_input else [""] * n
        prompts = [template.prompt(_text(i), x)
                   for i, x in zip(batch[cfg.instruction_field], inputs)]
        yield prompts, [_text(o) or None for o in batch[cfg.output_field]]


def _ids(tokenizer, texts: list[str]) -> list[list[int]]:
    return tokenizer(texts, add_special_tokens=False)["input_ids"] if texts else []


def _eos(tokenizer) -> int:
    if tokenizer.eos_token_id is None:
        raise ConfigError("model: the tokenizer has no EOS token, needed to end documents and "
                          "responses")
    return tokenizer.eos_token_id


def bos_prefix(tokenizer) -> list[int]:
    """The special tokens the tokenizer puts before a text (BOS for Llama, none for GPT-2)."""
    with_special = tokenizer("a")["input_ids"]
    plain = tokenizer("a", add_special_tokens=False)["input_ids"]
    for i in range(len(with_special) - len(plain) + 1):
        if with_special[i:i + len(plain)] == plain:
            return with_special[:i]
    return []


def pack_documents(batches: Iterator[list[str]], tokenizer,
                   seq_len: int) -> tuple[torch.Tensor, int]:
    """(blocks [n, seq_len] int64, tokens in the stream): documents joined by EOS, cut into
    blocks, the remainder dropped."""
    eos, parts = _eos(tokenizer), []
    for docs in batches:
        parts += [torch.tensor(ids + [eos], dtype=torch.int64) for ids in _ids(tokenizer, docs)]
    stream = torch.cat(parts) if parts else torch.zeros(0, dtype=torch.int64)
    n = len(stream) // seq_len
    return stream[: n * seq_len].view(n, seq_len), len(stream)


@dataclass
class Encoded:
    """Instruction examples with their content digests (for the held-out split)."""

    input_ids: torch.Tensor
    labels: torch.Tensor
    digests: list[int]
    rows: int
    truncated: int
    dropped: int
    """Examples left out: no response in the row, or none left within seq_len."""
    no_response: int
    """Of those, the rows whose response is null, missing or empty."""


def encode_instructions(batches: Iterator[tuple[list[str], list[Optional[str]]]], tokenizer,
                        seq_len: int) -> Encoded:
    eos, bos = _eos(tokenizer), bos_prefix(tokenizer)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
    ids, labels, digests = [], [], []
    rows = truncated = dropped = no_response = 0
    for all_prompts, all_responses in batches:
        rows += len(all_prompts)
        kept = [i for i, r in enumerate(all_responses) if r is not None]
        no_response += len(all_prompts) - len(kept)
        dropped += len(all_prompts) - len(kept)
        prompts, responses = [all_prompts[i] for i in kept], [all_responses[i] for i in kept]
        batch_ids, batch_labels = [], []
        for p, r, prompt, response in zip(_ids(tokenizer, prompts), _ids(tokenizer, responses),
                                          prompts, responses):
            x = bos + p + r + [eos]
            y = [IGNORE_INDEX] * (len(bos) + len(p)) + r + [eos]
            truncated += len(x) > seq_len
            x, y = x[:seq_len], y[:seq_len]
            if max(len(bos) + len(p), 1) >= len(y):  # no label left (position 0 is never one)
                dropped += 1
                continue
            batch_ids.append(x + [pad] * (seq_len - len(x)))
            batch_labels.append(y + [IGNORE_INDEX] * (seq_len - len(y)))
            digests.append(int.from_bytes(hashlib.blake2b(
                f"{prompt}\0{response}".encode(), digest_size=8).digest(), "big"))
        ids.append(torch.tensor(batch_ids, dtype=torch.int64).view(-1, seq_len))
        labels.append(torch.tensor(batch_labels, dtype=torch.int64).view(-1, seq_len))
    empty = torch.zeros(0, seq_len, dtype=torch.int64)
    return Encoded(torch.cat(ids) if ids else empty, torch.cat(labels) if labels else empty,
                   digests, rows, truncated, dropped, no_response)


def heldout_by_digest(digests: list[int], val_fraction: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(train indices, val indices), both in source order: about round(n·val_fraction) examples,
    those whose content digest is below the cut, are held out. Membership depends on an example's
    content, not its position, so a file sorted by task (commonsense_170k is) gives a mixed
    validation set; identical examples share a digest, so none is split between the two sides
    (the held-out count is exact unless duplicates straddle the cut)."""
    n_val = int(round(len(digests) * val_fraction))
    d = torch.tensor([x - (1 << 63) for x in digests], dtype=torch.int64)  # order-preserving shift
    if n_val == 0:
        val = torch.zeros(len(digests), dtype=torch.bool)
    elif n_val >= len(digests):
        val = torch.ones(len(digests), dtype=torch.bool)
    else:
        val = d < d.sort().values[n_val]
    return (~val).nonzero().flatten(), val.nonzero().flatten()
