"""The data layer: formats, packing, response-only loss, held-out split, cache, errors, order."""
from __future__ import annotations

import csv
import gzip
import json
from dataclasses import replace
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from seft_scale.config import DataConfig, RunConfig
from seft_scale.errors import ConfigError
from seft_scale.data import IGNORE_INDEX, batch_indices, build_data, tokenizer_training_text
from seft_scale.data import cache as data_cache
from seft_scale.data.blocks import epoch_order
from seft_scale.model import train_tokenizer

ROOT = Path(__file__).resolve().parents[2]
TEMPEST = (ROOT / "configs/data/tempest.txt").read_text()
COMMONSENSE = ROOT / "tests/fixtures/data/commonsense_sample.json"
ALPACA_NO_INPUT = ("Below is an instruction that describes a task. Write a response that "
                   "appropriately completes the request.\n\n### Instruction:\n{}\n\n### Response:\n")
ALPACA_INPUT = ("Below is an instruction that describes a task, paired with an input that provides "
                "further context. Write a response that appropriately completes the request.\n\n"
                "### Instruction:\n{}\n\n### Input:\n{}\n\n### Response:\n")
ROWS = [{"instruction": "Add the two numbers.", "input": "12 and 30", "output": "42"},
        {"instruction": "What is the capital of France?", "input": "", "output": "Paris, in France."},
        {"instruction": "Repeat the word.", "input": "storm", "output": "storm storm"}]


@pytest.fixture(scope="module")
def tok():
    return train_tokenizer(TEMPEST[:40_000], 384)


class CountingTokenizer:
    """Delegates to a tokenizer and counts its calls (the cache must skip them)."""

    def __init__(self, tok):
        self.tok, self.calls = tok, 0

    def __call__(self, *args, **kwargs):
        self.calls += 1
        return self.tok(*args, **kwargs)

    def __getattr__(self, name):
        return getattr(self.tok, name)


def docs() -> list[str]:
    """Four documents with line breaks, commas and quotes (csv must keep them)."""
    return [TEMPEST[i * 3000:(i + 1) * 3000] for i in range(4)]


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def write_text_formats(d: Path, texts: list[str]) -> dict[str, Path]:
    (d / "folder").mkdir(parents=True)
    for i, t in enumerate(texts):  # names sort in document order
        (d / "folder" / f"doc{i:02d}.txt").write_text(t)
    rows = [{"text": t, "id": i} for i, t in enumerate(texts)]
    (d / "docs.json").write_text(json.dumps(rows))
    pq.write_table(pa.table({"text": texts}), d / "docs.parquet")
    with open(d / "docs.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["id", "text"])
        w.writerows(enumerate(texts))
    with gzip.open(d / "docs.jsonl.gz", "wt") as f:
        f.write("".join(json.dumps(r) + "\n" for r in rows))
    return {"folder": d / "folder", "json": d / "docs.json", "jsonl.gz": d / "docs.jsonl.gz",
            "jsonl": write_jsonl(d / "docs.jsonl", rows), "parquet": d / "docs.parquet",
            "csv": d / "docs.csv"}


def cfg_for(path, tmp_path: Path, **kw) -> DataConfig:
    return DataConfig(train=str(path), cache_dir=str(tmp_path / "cache"), **kw)


# ------------------------------------------------------------------------------------- formats

def test_every_format_packs_the_same_blocks(tok, tmp_path):
    texts = docs()
    stream = sum((tok(t, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
                  for t in texts), [])
    seq_len = 64
    n = len(stream) // seq_len
    expected = torch.tensor(stream[: n * seq_len]).view(n, seq_len)
    for name, path in write_text_formats(tmp_path, texts).items():
        b = build_data(cfg_for(path, tmp_path, seq_len=seq_len, val_fraction=0.1), tok)
        both = torch.cat([b.train.input_ids, b.val.input_ids])
        assert torch.equal(both, expected), name
        assert torch.equal(b.train.labels, b.train.input_ids), name
        assert len(b.val) == round(n * 0.1) and torch.equal(b.val.input_ids, expected[-len(b.val):])
    # a .txt file is one document: the same text as a one-record json
    (tmp_path / "one.txt").write_text(texts[0])
    one = write_jsonl(tmp_path / "one.jsonl", [{"text": texts[0]}])
    a, b = (build_data(cfg_for(p, tmp_path, seq_len=32, val_fraction=0), tok)
            for p in (tmp_path / "one.txt", one))
    assert len(a.train) > 0 and torch.equal(a.train.input_ids, b.train.input_ids)


def test_validation_source_and_max_examples(tok, tmp_path):
    paths = write_text_formats(tmp_path, docs())
    (tmp_path / "val.txt").write_text(TEMPEST[20_000:23_000])
    b = build_data(cfg_for(paths["jsonl"], tmp_path, seq_len=64,
                           validation=str(tmp_path / "val.txt")), tok)
    val_ids = tok(TEMPEST[20_000:23_000], add_special_tokens=False)["input_ids"]
    assert torch.equal(b.val.input_ids[0], torch.tensor(val_ids[:64]))
    full = sum(len(tok(t, add_special_tokens=False)["input_ids"]) + 1 for t in docs())
    assert len(b.train) == full // 64  # nothing held out of train when validation is given
    first = len(tok(docs()[0], add_special_tokens=False)["input_ids"]) + 1
    b1 = build_data(cfg_for(paths["jsonl"], tmp_path, seq_len=64, val_fraction=0,
                            max_examples=1), tok)
    assert len(b1.train) == first // 64


# ---------------------------------------------------------------------------------- instructions

def test_alpaca_prompt_is_masked_response_kept(tok, tmp_path):
    path = write_jsonl(tmp_path / "alpaca.jsonl", ROWS)
    seq_len = 256
    b = build_data(cfg_for(path, tmp_path, kind="instruction", seq_len=seq_len, val_fraction=0), tok)
    assert len(b.train) == len(ROWS) and b.stats["truncated"] == 0
    for row, ids, labels in zip(ROWS, b.train.input_ids, b.train.labels):
        prompt = (ALPACA_INPUT.format(row["instruction"], row["input"]) if row["input"]
                  else ALPACA_NO_INPUT.format(row["instruction"]))
        p = tok(prompt, add_special_tokens=False)["input_ids"]
        r = tok(row["output"], add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        pad = seq_len - len(p) - len(r)
        assert ids.tolist() == p + r + [tok.pad_token_id] * pad
        assert labels.tolist() == [IGNORE_INDEX] * len(p) + r + [IGNORE_INDEX] * pad
        assert tok.decode(labels[labels != IGNORE_INDEX][:-1]) == row["output"]


def test_commonsense_layout_with_field_mapping(tok, tmp_path):
    rows = json.loads(COMMONSENSE.read_text())
    renamed = [{"question": r["instruction"], "context": r["input"], "target": r["output"],
                "answer": r["answer"]} for r in rows]
    path = tmp_path / "cs.json"
    path.write_text(json.dumps(renamed))
    cfg = cfg_for(path, tmp_path, kind="instruction", template="commonsense", seq_len=512,
                  val_fraction=0, instruction_field="question", input_field="context",
                  output_field="target")
    b = build_data(cfg, tok)
    assert len(b.train) == len(rows) and b.stats["truncated"] == 0
    indent = " " * 16
    for row, ids, labels in zip(rows, b.train.input_ids, b.train.labels):
        prompt = ("Below is an instruction that describes a task. Write a response that "
                  f"appropriately completes the request. \n\n{indent}### Instruction:\n{indent}"
                  f"{row['instruction']}\n\n{indent}### Response:\n{indent}")
        n_prompt = len(tok(prompt, add_special_tokens=False)["input_ids"])
        assert tok.decode(ids[:n_prompt]) == prompt
        assert (labels[:n_prompt] == IGNORE_INDEX).all()
        assert tok.decode(labels[labels != IGNORE_INDEX][:-1]) == row["output"]
    text = tokenizer_training_text(cfg)
    assert text.startswith("Below is an instruction") and "the correct answer is solution1" in text


def test_csv_cells_stay_strings(tok, tmp_path):
    with open(tmp_path / "q.csv", "w", newline="") as f:
        csv.writer(f).writerows([["instruction", "input", "output"], ["Code?", "NA", "007"]])
    b = build_data(cfg_for(tmp_path / "q.csv", tmp_path, kind="instruction", seq_len=256,
                           val_fraction=0), tok)
    ids, labels = b.train.input_ids[0], b.train.labels[0]
    assert tok.decode(labels[labels != IGNORE_INDEX][:-1]) == "007"
    assert "### Input:\nNA\n" in tok.decode(ids)


def test_long_examples_truncated_and_counted(tok, tmp_path, caplog):
    long_prompt = {"instruction": "word " * 300, "input": "", "output": "lost"}
    long_answer = {"instruction": "Say it.", "input": "", "output": "yes " * 300}
    path = write_jsonl(tmp_path / "long.jsonl", ROWS + [long_prompt, long_answer])
    with caplog.at_level("WARNING", logger="seft_scale.data"):
        b = build_data(cfg_for(path, tmp_path, kind="instruction", seq_len=256, val_fraction=0), tok)
    assert b.stats["truncated"] == 2 and b.stats["dropped"] == 1 and len(b.train) == len(ROWS) + 1
    cut = b.train.labels[-1]
    assert cut[-1] != IGNORE_INDEX and (cut != IGNORE_INDEX).sum() > 50  # response runs to the end
    assert "2 of 5 instruction examples were longer than data.seq_len=256" in caplog.text


def test_instruction_heldout_split_disjoint_stable_and_order_free(tok, tmp_path):
    rows = [{"instruction": f"What is {a} + {a + 7}?", "input": "", "output": str(2 * a + 7)}
            for a in range(60)]
    rows += [rows[5]] * 3  # duplicates must stay on one side

    def split(order, cache):
        path = write_jsonl(tmp_path / f"{cache}.jsonl", order)
        cfg = DataConfig(train=str(path), kind="instruction", seq_len=256, val_fraction=0.2,
                         cache_dir=str(tmp_path / cache))
        b = build_data(cfg, tok)
        as_set = lambda s: {tuple(x.tolist()) for x in s.input_ids}
        return as_set(b.train), as_set(b.val), len(b.val)

    train, val, n_val = split(rows, "a")
    assert train.isdisjoint(val) and 0 < n_val <= round(63 * 0.2)
    assert len(train) + len(val) == 60  # distinct examples; the repeats of rows[5] on one side
    assert split(rows, "b")[:2] == (train, val)              # stable across calls
    assert split(rows[::-1], "c")[:2] == (train, val)        # membership by content, not position


# ----------------------------------------------------------------------------------------- cache

def test_cache_hit_skips_tokenizer_and_invalidates(tok, tmp_path, monkeypatch):
    path = write_jsonl(tmp_path / "a.jsonl", ROWS)
    counting = CountingTokenizer(tok)
    cfg = cfg_for(path, tmp_path, kind="instruction", seq_len=256, val_fraction=0)

    def calls(c=cfg):
        counting.calls = 0
        b = build_data(c, counting)
        return counting.calls, b

    n, first = calls()
    assert n > 0 and not first.stats["cache_hit"]
    n, second = calls()
    assert n == 0 and second.stats["cache_hit"]
    assert torch.equal(first.train.labels, second.train.labels)
    assert second.train.input_ids.dtype == torch.int64
    assert calls(replace(cfg, seed=7))[0] == 0  # the seed orders batches only
    assert calls(replace(cfg, seq_len=240))[0] > 0
    assert calls(replace(cfg, template="plain"))[0] > 0
    write_jsonl(path, ROWS[:2])
    n, changed = calls()
    assert n > 0 and len(changed.train) == 2
    # a damaged file is never used: rebuilt, same result
    cache_file = Path(changed.stats["cache_file"])
    cache_file.write_bytes(cache_file.read_bytes()[:100])
    n, rebuilt = calls()
    assert n > 0 and torch.equal(rebuilt.train.input_ids, changed.train.input_ids)
    # SEFT_CACHE moves the default root
    monkeypatch.setenv("SEFT_CACHE", str(tmp_path / "env"))
    b = build_data(DataConfig(train=str(path), kind="instruction", seq_len=256), tok)
    assert Path(b.stats["cache_file"]).parent == tmp_path / "env" / "data"


def test_cache_write_is_atomic(tok, tmp_path, monkeypatch):
    def crash(tensors, filename, metadata=None):
        Path(filename).write_bytes(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(data_cache, "save_file", crash)  # the name the cache writes with
    path = write_jsonl(tmp_path / "a.jsonl", ROWS)
    with pytest.raises(OSError, match="disk full"):
        build_data(cfg_for(path, tmp_path, kind="instruction", seq_len=256), tok)
    assert [p.name for p in (tmp_path / "cache").iterdir()] == ["hf"]  # no file left behind


# ---------------------------------------------------------------------------------------- errors

def test_named_errors(tok, tmp_path):
    def err(path, **kw):
        with pytest.raises(ConfigError) as e:
            build_data(cfg_for(path, tmp_path, **kw), tok)
        return str(e.value)

    (tmp_path / "data.xml").write_text("<a/>")
    assert "data.format" in err(tmp_path / "data.xml")
    assert "does not exist" in err(tmp_path / "missing.jsonl", format="json")
    (tmp_path / "empty.jsonl").write_text("")
    assert "is empty" in err(tmp_path / "empty.jsonl")
    assert "holds no text" in err(write_jsonl(tmp_path / "blank.jsonl", [{"text": ""}] * 2))
    (tmp_path / "nofiles").mkdir()
    assert "no .txt files" in err(tmp_path / "nofiles")
    qa = write_jsonl(tmp_path / "qa.jsonl", [{"question": "why?", "answer": "because"}])
    msg = err(qa, kind="instruction")
    assert "'instruction'" in msg and "data.instruction_field" in msg and "question, answer" in msg
    assert "'text'" in err(qa) and "data.text_field" in err(qa)
    (tmp_path / "short.txt").write_text("a short text")
    assert "need at least 1" in err(tmp_path / "short.txt", seq_len=512)


def test_hub_dataset_offline_names_the_fix(tok, tmp_path, monkeypatch):
    import datasets.config

    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    cfg = DataConfig(train="nobody-here/not-cached-corpus", cache_dir=str(tmp_path))
    with pytest.raises(ConfigError) as e:
        build_data(cfg, tok)
    msg = str(e.value)
    assert "data.train" in msg and "not in the local datasets cache" in msg and ".jsonl" in msg


def test_config_resolves_paths_and_keeps_hub_names(tmp_path):
    (tmp_path / "t.txt").write_text("text")
    run = RunConfig()
    run.data.train = "t.txt"  # relative to the config file's folder
    assert run.validate().resolve_paths(tmp_path).data.train == str(tmp_path / "t.txt")
    run.data.train = "someone/some-corpus"  # no such path, no known extension: a hub name
    assert run.resolve_paths(tmp_path).data.train == "someone/some-corpus"
    run.data.validation = "./missing.txt"
    with pytest.raises(ConfigError, match="data.validation: ./missing.txt does not exist"):
        run.resolve_paths(tmp_path)
    run.data.validation, run.data.max_examples = None, 0
    with pytest.raises(ConfigError, match="data.max_examples"):
        run.validate()


# ----------------------------------------------------------------------------------------- order

def test_batch_indices_resume_from_counter_alone():
    n, bs, world = 37, 4, 3
    run = [[batch_indices(n, b, bs, seed=5, rank=r, world=world) for r in range(world)]
           for b in range(30)]
    flat = torch.cat([torch.cat(ranks) for ranks in run])
    for epoch in range(3):  # each epoch visits every block once
        assert sorted(flat[epoch * n:(epoch + 1) * n].tolist()) == list(range(n))
    epoch_order.cache_clear()  # a resumed process has no memory of earlier batches
    for b in (29, 11, 0):
        for r in range(world):
            assert torch.equal(batch_indices(n, b, bs, seed=5, rank=r, world=world), run[b][r])
    assert not torch.equal(batch_indices(n, 3, bs, seed=6), batch_indices(n, 3, bs, seed=5))
