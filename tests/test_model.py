"""The model code (seft_scale/model.py): target lookup, reading single tensors and flat ranges of
a saved folder (sharded or not), meta skeletons, and telling which rank holds weights."""
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from seft_scale.config import ModelConfig, TinyModelConfig, resolve_dtype
from seft_scale.errors import ConfigError
from seft_scale.model import (SafetensorsFolder, build_tiny_llama, find_targets, has_weights,
                              load_model, resolve_attn, save_model, skeleton, train_tokenizer)

CFG = ModelConfig(tiny=TinyModelConfig(hidden_size=16, intermediate_size=24, num_hidden_layers=2,
                                       num_attention_heads=2, num_key_value_heads=1, vocab_size=300,
                                       max_position_embeddings=32))
TEXT = "To be, or not to be, that is the question. " * 20


@pytest.fixture(scope="module")
def tiny():
    tok = train_tokenizer(TEXT, CFG.tiny.vocab_size)
    return build_tiny_llama(CFG, len(tok), torch.float32, "sdpa"), tok


def test_find_targets(tiny):
    model, _ = tiny
    names = [n for n, _ in find_targets(model, ["q_proj", "down_proj"])]
    assert names == [f"model.layers.{i}.{m}" for i in range(2) for m in ("self_attn.q_proj", "mlp.down_proj")]
    assert len(find_targets(model, [r".*_proj"])) == 14  # 7 per layer; lm_head is not a *_proj
    assert all(isinstance(m, nn.Linear) for _, m in find_targets(model, [r".*_proj"]))
    with pytest.raises(ConfigError, match=r"^seft\.targets: \['proj'\] match no Linear"):
        find_targets(model, ["proj"])  # a full match of the last name component, not a search


def test_find_targets_takes_linear_modules_only():
    model = nn.Module()
    model.q_proj = nn.Sequential(nn.Linear(2, 2))  # named like a target, but not a Linear
    model.block = nn.Module()
    model.block.q_proj = nn.Linear(2, 3)
    assert [n for n, _ in find_targets(model, ["q_proj"])] == ["block.q_proj"]


def write_folder(folder: Path, tensors: dict[str, torch.Tensor], shards: int) -> None:
    """An HF-style safetensors folder: one model.safetensors, or `shards` files and the index."""
    folder.mkdir(parents=True)
    if shards == 1:
        save_file(tensors, str(folder / "model.safetensors"))
        return
    names = sorted(tensors)
    weight_map = {}
    for i in range(shards):
        file = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
        part = {k: tensors[k] for k in names[i::shards]}
        save_file(part, str(folder / file))
        weight_map.update({k: file for k in part})
    (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))


@pytest.mark.parametrize("shards", [1, 3])
def test_safetensors_folder_get_and_flat_ranges(tmp_path, shards):
    g = torch.Generator().manual_seed(0)
    tensors = {"a.weight": torch.randn(5, 7, generator=g), "b.weight": torch.randn(3, 4, generator=g),
               "c.bias": torch.randn(6, generator=g), "d.conv": torch.randn(2, 3, 4, generator=g),
               "e.half": torch.randn(4, 5, generator=g).to(torch.bfloat16)}
    write_folder(tmp_path / "m", tensors, shards)
    folder = SafetensorsFolder(tmp_path / "m")
    assert set(folder.where) == set(tensors)
    assert len(set(folder.where.values())) == shards
    for key, t in tensors.items():
        got = folder.get(key)
        assert got.dtype == t.dtype and torch.equal(got, t), key
        flat, n = t.reshape(-1), t.numel()
        for lo in range(n + 1):  # every range: inside a row, cutting rows, whole, empty
            for hi in range(lo, n + 1):
                part = folder.get_flat(key, lo, hi)
                assert torch.equal(part, flat[lo:hi]), (key, lo, hi)
    with pytest.raises(KeyError):
        folder.get("nope")


def test_safetensors_folder_reads_what_save_model_writes(tiny, tmp_path):
    model, tok = tiny
    save_model(model, tok, tmp_path / "one")
    model.save_pretrained(tmp_path / "many", safe_serialization=True, max_shard_size="20KB")
    assert (tmp_path / "many" / "model.safetensors.index.json").is_file()
    state = model.state_dict()
    for name in ("one", "many"):
        folder = SafetensorsFolder(tmp_path / name)
        w = state["model.layers.1.mlp.down_proj.weight"]  # [16, 24]
        assert torch.equal(folder.get("model.layers.1.mlp.down_proj.weight"), w)
        assert torch.equal(folder.get_flat("model.layers.1.mlp.down_proj.weight", 20, 77),
                           w.reshape(-1)[20:77])


def test_skeleton_is_on_meta_with_the_real_shapes(tiny, tmp_path):
    model, tok = tiny
    save_model(model, tok, tmp_path / "saved")
    shapes = {k: v.shape for k, v in model.state_dict().items()}
    for path in (None, str(tmp_path / "saved")):
        meta = skeleton(CFG, path, len(tok), torch.float32, "sdpa")
        assert all(p.is_meta for p in meta.parameters())
        assert {k: v.shape for k, v in meta.state_dict().items()} == shapes
        assert not has_weights(meta) and meta.config.use_cache is False
    assert has_weights(model)


def test_has_weights_is_false_for_partitions():
    """ZeRO-3 leaves every parameter with an empty tensor between gathers."""
    lin = nn.Linear(3, 2)
    assert has_weights(lin)
    lin.weight.data = torch.empty(0)
    assert not has_weights(lin)


def test_load_model_from_a_folder_and_its_errors(tiny, tmp_path):
    model, tok = tiny
    save_model(model, tok, tmp_path / "saved")
    loaded, loaded_tok = load_model(CFG, torch.device("cpu"), path=str(tmp_path / "saved"))
    assert loaded_tok.encode(TEXT) == tok.encode(TEXT)
    got = loaded.state_dict()
    assert all(torch.equal(got[k], v) for k, v in model.state_dict().items())
    assert loaded.config.use_cache is False
    built, _ = load_model(CFG, torch.device("cpu"), train_text=TEXT)  # the tiny model, built offline
    assert all(torch.equal(built.state_dict()[k], v) for k, v in model.state_dict().items())
    (tmp_path / "no_tok").mkdir()
    model.save_pretrained(tmp_path / "no_tok")
    with pytest.raises(ConfigError, match=r"^model\.path: no usable tokenizer in "):
        load_model(CFG, torch.device("cpu"), path=str(tmp_path / "no_tok"))
    with pytest.raises(ConfigError, match=r"^model\.path is empty and there is no text"):
        load_model(CFG, torch.device("cpu"))


def test_dtype_and_attention_choices():
    cpu = torch.device("cpu")
    assert resolve_dtype("auto", cpu) == torch.float32 and resolve_dtype("bfloat16", cpu) == torch.bfloat16
    assert resolve_attn("auto", cpu) == "sdpa" and resolve_attn("eager", cpu) == "eager"
    with pytest.raises(ConfigError, match=r"^model\.attn_implementation: flash_attention_2 needs CUDA"):
        resolve_attn("flash_attention_2", cpu)


@pytest.mark.parametrize("dtype", ["bfloat16", "float16", "float32"])
def test_a_built_model_computes_what_its_saved_folder_computes(tmp_path, dtype):
    """The tiny model built in memory (a run's start) and the same model reloaded from its folder
    (a resumed run, the export): same tensors, buffers included, and the same loss to the bit. A
    16-bit model.to(dtype) would round the rotary inv_freq that from_pretrained keeps in fp32."""
    cfg = ModelConfig(tiny=CFG.tiny, dtype=dtype)
    built, tok = load_model(cfg, torch.device("cpu"), train_text=TEXT)
    assert all(p.dtype == getattr(torch, dtype) for p in built.parameters())
    save_model(built, tok, tmp_path / "m")
    loaded, _ = load_model(cfg, torch.device("cpu"), path=str(tmp_path / "m"))
    a, b = dict(built.named_buffers()), dict(loaded.named_buffers())
    assert a.keys() == b.keys() and all(a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]) for k in a)
    ids = torch.randint(len(tok), (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(built(input_ids=ids, labels=ids).loss, loaded(input_ids=ids, labels=ids).loss)
