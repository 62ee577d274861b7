"""The GPU tests' helpers (tests/gpu/support.py), on CPU: the sdpa backend read off a profile, the
.txt rows without `datasets` against the rows through it, and the facts file."""
import json

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from seft_scale.config import ModelConfig, TinyModelConfig, load_config
from seft_scale.data import build_data, tokenizer_training_text
from seft_scale.data.sources import Source
from seft_scale.model import load_model
from tests.conftest import ROOT
from tests.gpu.support import SDPA_OPS, load_txt_rows, sdpa_backends, write_facts


@pytest.fixture(scope="module")
def tiny_model():
    model, _ = load_model(ModelConfig(tiny=TinyModelConfig(num_hidden_layers=1)), torch.device("cpu"),
                          train_text=(ROOT / "configs" / "data" / "tempest.txt").read_text()[:20000])
    return model


def profiled(model, backend=None):
    ids = torch.randint(model.config.vocab_size, (2, 32))
    with torch.profiler.profile() as prof, (sdpa_kernel(backend) if backend else torch.enable_grad()):
        model(input_ids=ids, labels=ids).loss.backward()
    return sdpa_backends(prof)


def test_sdpa_backend_read_off_the_profile(tiny_model):
    assert tiny_model.config._attn_implementation == "sdpa"
    forced = profiled(tiny_model, SDPBackend.MATH)
    assert forced["backends"] == ["math"] and forced["cuda_kernels"] == []
    assert any(SDPA_OPS["math"] in op for op in forced["aten_ops"])
    default = profiled(tiny_model)  # CPU: its fused kernel, _scaled_dot_product_flash_attention_for_cpu
    assert len(default["backends"]) == 1 and default["backends"][0] in SDPA_OPS, default


@pytest.fixture
def txt_folder(tmp_path):
    """Two documents, one with Windows line ends, one with non-ASCII text."""
    folder = tmp_path / "docs"
    folder.mkdir()
    tempest = (ROOT / "configs" / "data" / "tempest.txt").read_text()
    (folder / "a.txt").write_bytes(tempest[:30000].replace("\n", "\r\n").encode())
    (folder / "b.txt").write_text("Ariel — “Full fathom five”\n\n" + tempest[30000:60000],
                                  encoding="utf-8")
    return folder


def test_txt_rows_without_datasets_tokenise_like_datasets(txt_folder, tmp_path, monkeypatch):
    pytest.importorskip("datasets")
    tiny = str(ROOT / "configs" / "runs" / "tiny.yaml")
    from seft_scale.model import train_tokenizer

    def data_of(cache):
        cfg = load_config(tiny, [f"data.train={txt_folder}", f"data.cache_dir={tmp_path / cache}"])
        text = tokenizer_training_text(cfg.data)
        tok = train_tokenizer(text, 384)
        return text, build_data(cfg.data, tok)

    text_ds, blocks_ds = data_of("with_datasets")
    monkeypatch.setattr(Source, "_load_local", load_txt_rows)
    text_rows, blocks_rows = data_of("without")
    assert text_rows == text_ds and "\r" not in text_rows
    for split in ("train", "val"):
        a, b = getattr(blocks_ds, split), getattr(blocks_rows, split)
        assert torch.equal(a.input_ids, b.input_ids) and torch.equal(a.labels, b.labels)
    assert len(blocks_rows.train) > 10 and blocks_rows.stats["cache_hit"] is False


def test_txt_rows_refuse_other_formats(tmp_path):
    src = Source(str(tmp_path / "x.jsonl"), "json", "train", None, "data.train")
    with pytest.raises(ValueError, match="data.train: the GPU tests read .txt data only"):
        load_txt_rows(src)


def test_facts_written_where_asked(tmp_path, monkeypatch):
    monkeypatch.setenv("SEFT_GPU_FACTS", str(tmp_path / "sub" / "facts.json"))
    write_facts({"attention": {"x": {"backends": ["flash"]}}})
    facts = json.loads((tmp_path / "sub" / "facts.json").read_text())
    assert facts["attention"]["x"]["backends"] == ["flash"]
    monkeypatch.delenv("SEFT_GPU_FACTS")
    write_facts({"a": 1})  # no path: nothing written, no error
