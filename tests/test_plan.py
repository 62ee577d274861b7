"""seft_scale/plan.py and launch/plan.py: presets hold the published shapes, the formula's pieces
match hand arithmetic and a real forward's saved tensors, the CLI reads run configs, presets and
config.json folders, says when a run does not fit, writes a DeepSpeed config the zero3 backend
accepts, and names bad input. (Whole-phase agreement with measured memory at 1-3 ranks:
tests/distributed/test_plan_measured.py.)"""
import dataclasses
import json

import pytest
import torch

from seft_scale.config import SeftConfig
from seft_scale.errors import ConfigError
from seft_scale.plan import (GIB, ModelShape, PlanInput, load_preset, plan_memory, read_shape,
                             usable_bytes)
from tests.conftest import ROOT

PRESETS = ROOT / "configs" / "models"
# parameter counts the model cards publish (billions, rounded as they print them)
PUBLISHED = {"llama-2-7b": 6.74, "llama-2-13b": 13.02, "llama-2-70b": 68.98, "llama-3-8b": 8.03,
             "llama-3-70b": 70.55, "mistral-7b": 7.24, "deepseek-llm-7b": 6.91}


def plan_cli(*argv):
    import importlib.util
    spec = importlib.util.spec_from_file_location("plan_cli", ROOT / "launch" / "plan.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.main(list(argv))


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_presets_have_the_published_shapes(name):
    p = load_preset(PRESETS / f"{name}.yaml")
    assert round(p.shape.num_params() / 1e9, 2) == PUBLISHED[name]
    assert p.seft.targets == SeftConfig().targets and p.seft.lora_rank == 32
    assert p.zero_optimization["stage"] == 3 and p.fsdp.param_dtype == "bfloat16"


def test_every_preset_file_is_tested():
    assert {p.stem for p in PRESETS.glob("*.yaml")} == set(PUBLISHED)


@pytest.mark.parametrize("edit,message", [
    ({"colour": 1}, "unknown key"),
    ({"zero_optimization": {"stage": 3, "stage3_prefetch_bucket": 5}}, "stage3_prefetch_bucket"),
    ({"zero_optimization": {"stage": 2}}, "stage must be 3"),
    ({"fsdp": {"reshard": True}}, "fsdp.reshard: unknown key"),
    ({"shape": {"hidden_size": 64}}, "no intermediate_size"),
    ({"shape": {**load_preset(PRESETS / "llama-2-70b.yaml").shape.__dict__, "num_key_value_heads": 7}},
     "not a multiple of num_key_value_heads"),
    ({"shape": {"model_type": "gpt2", "hidden_size": 64}}, "not a Llama-style decoder"),
])
def test_bad_presets_are_named(tmp_path, edit, message):
    import yaml
    data = yaml.safe_load((PRESETS / "llama-2-7b.yaml").read_text())
    data.update(edit)
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(data))
    with pytest.raises(ConfigError, match=message):
        load_preset(path)


def test_shards_and_slots_by_hand():
    """A one-layer model small enough to count by hand at W = 4: ZeRO-3 pads every flat
    parameter to ceil(n/W), FSDP2 gives rank 0 ceil(rows/W) whole rows."""
    shape = ModelShape(hidden_size=6, intermediate_size=10, num_hidden_layers=1,
                       num_attention_heads=2, num_key_value_heads=1, vocab_size=11,
                       max_position_embeddings=8)
    seft = SeftConfig(targets=["q_proj"], lora_rank=1)
    # params: embed 11x6, q 6x6, k 3x6, v 3x6, o 6x6, gate/up 10x6, down 6x10, norms 3x6, lm_head 11x6
    zero = plan_memory(PlanInput(shape=shape, seft=seft, world=4, backend="zero3", dtype="float32",
                                 zero={"stage3_param_persistence_threshold": 0}))
    numels = [66, 36, 18, 18, 36, 60, 60, 60, 6, 6, 6, 66]
    assert zero.get("θ shard") == sum(-(-n // 4) for n in numels) * 4
    fsdp = plan_memory(PlanInput(shape=shape, seft=seft, world=4, backend="fsdp", dtype="float32"))
    rows_cols = [(11, 6), (6, 6), (3, 6), (3, 6), (6, 6), (10, 6), (10, 6), (6, 10), (6, 1), (6, 1),
                 (6, 1), (11, 6)]
    assert fsdp.get("θ shard") == sum(-(-r // 4) * c for r, c in rows_cols) * 4
    # q_proj: K = 1·(6+6) = 12 slots, 3 per rank, each pos int64 + δ, grad, m, v fp32 + age int32
    # + steps since grown int16
    assert fsdp.get("SEFT slots + optimizer") == 3 * (8 + 4 * 4 + 4 + 2)
    # no mask: a bit per weight of θ's edits in host memory (2 rows of 6 at FSDP, 9 elements at ZeRO)
    assert fsdp.get("θ-edit bitmap (host memory)") == 2 * 6 / 8 and zero.get("θ-edit bitmap (host memory)") == 9 / 8
    # candidates: grown = ceil(0.2·12·(1 + 2·12/36)) = 4, so 2·4 grow + 2·4 adapt non-slot ones;
    # per rank K/W = 3 slots of 21 + 8 B and 16/4 = 4 non-slot candidates of 21 + 16 B
    assert fsdp.get("window scores (candidates)") == 3 * (21 + 8) + 4 * (21 + 16)
    # update: 12.8 B per window entry of the rank ((12 + 16)/4 = 7) + 3.6 B per slot of the layer (12)
    assert zero.get("topology update scratch") == pytest.approx(12.8 * 7 + 3.6 * 12)
    dense = plan_memory(PlanInput(shape=shape, seft=dataclasses.replace(seft, window_scores="dense"),
                                  world=4, backend="fsdp", dtype="float32"))
    assert dense.get("window scores (dense)") == 2 * 6 * 12


def test_zero3_persistence_and_offload():
    shape = load_preset(PRESETS / "llama-2-7b.yaml").shape
    base = dict(shape=shape, seft=SeftConfig(), world=8, backend="zero3", seq_len=512)
    kept = plan_memory(PlanInput(**base, zero={"stage3_param_persistence_threshold": 40960}))
    assert kept.get("ZeRO-3 persistent params") == (2 * 32 + 1) * 4096 * 2  # the norms, bf16
    off = plan_memory(PlanInput(**base, zero={"offload_param": {"device": "cpu"}}))
    assert off.cpu_bytes_per_rank > off.get("θ shard") > 0
    assert off.peak < kept.peak and off.update_peak < kept.update_peak  # θ and SEFT state on host


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_activation_line_is_what_a_forward_saves_for_backward(dtype):
    """The bytes a real HF Llama forward with SEFT attached keeps for backward (every tensor
    packed by autograd, by storage, except parameters, slots and the loss's own) == the plan's
    'activations'."""
    from seft_scale.backends.local import LocalBackend
    from seft_scale.config import ModelConfig, TinyModelConfig
    from seft_scale.model import build_tiny_llama, find_targets
    from seft_scale.prune.magnitude import prune_magnitude
    from tests.helpers import seft_method

    tiny = TinyModelConfig(hidden_size=64, intermediate_size=176, num_hidden_layers=3,
                           num_attention_heads=4, num_key_value_heads=2)
    model = build_tiny_llama(ModelConfig(tiny=tiny), 300, dtype, "sdpa")
    targets = find_targets(model, SeftConfig().targets)
    prune_magnitude(targets, 0.5)
    seft = SeftConfig(lora_rank=2)
    method, model = seft_method(LocalBackend(torch.device("cpu")), model, seft)
    method.init_state()
    deltas = method.deltas
    B, L = 2, 24
    ids = torch.randint(0, 300, (B, L), generator=torch.Generator().manual_seed(0))
    own = {t.untyped_storage().data_ptr() for t in list(model.parameters())
           + [d.pos for d in deltas] + [d.values for d in deltas]}
    saved = {}

    def pack(t):
        ptr = t.untyped_storage().data_ptr()
        if ptr not in own:
            saved[ptr] = (t.untyped_storage().nbytes(), tuple(t.shape))
        return t
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(input_ids=ids, labels=ids)
    loss_saved = sum(n for n, shape in saved.values() if shape in ((B * L, 300), (B * L,), ()))
    got = sum(n for n, _ in saved.values()) - loss_saved
    name = str(dtype).removeprefix("torch.")
    shape = ModelShape(64, 176, 3, 4, 2, 300, 512)
    plan = plan_memory(PlanInput(shape=shape, seft=seft, dtype=name, compute_dtype=name,
                                 micro_batch=B, seq_len=L))
    assert got == pytest.approx(plan.get("activations"), rel=0.01)
    assert loss_saved == pytest.approx(4 * B * L * 300, rel=0.01)  # the fp32 log-softmax


def test_read_shape_from_a_model_folder_and_preset_agreement(tmp_path):
    from transformers import LlamaConfig
    folder = tmp_path / "pruned"
    folder.mkdir()
    LlamaConfig(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                num_attention_heads=32, vocab_size=32000, max_position_embeddings=4096
                ).to_json_file(folder / "config.json")
    run = tmp_path / "run.yaml"
    run.write_text(f"model: {{path: {folder}}}\ndata: {{train: somewhere.txt}}\n")
    preset = load_preset(PRESETS / "llama-2-7b.yaml")
    assert read_shape(str(run), None) == preset.shape == read_shape(str(run), preset)
    with pytest.raises(ConfigError, match="hidden_size, intermediate_size.*differ"):
        read_shape(str(run), load_preset(PRESETS / "llama-2-13b.yaml"))
    run.write_text("model: {path: not/here}\ndata: {train: somewhere.txt}\n")
    with pytest.raises(ConfigError, match="pass --preset"):
        read_shape(str(run), None)
    assert read_shape(str(run), preset) == preset.shape


def test_cli_preset_fits_or_says_how_many_ranks(capsys):
    assert plan_cli("--config", str(PRESETS / "llama-2-7b.yaml"), "--world-size", "8",
                    "--gpu", "h100-80gb") == 0
    out = capsys.readouterr().out
    assert "FITS" in out and "topology update scratch" in out and "backend fsdp, W = 8" in out
    assert plan_cli("--config", str(PRESETS / "llama-2-70b.yaml"), "--world-size", "8",
                    "--backend", "zero3", "--gpu", "a100-40gb", "--seq", "1024") == 1
    out = capsys.readouterr().out
    assert "DOES NOT FIT" in out and "smallest world size that fits (8 per node):" in out
    assert "with ZeRO param offload" in out


def test_cli_run_config_and_overrides(capsys, tiny_yaml):
    assert plan_cli("--config", tiny_yaml, "--world-size", "3", "--backend", "zero3",
                    "train.micro_batch_size=2", "--gpu-mem", "4") == 0
    out = capsys.readouterr().out
    assert "micro-batch 2 x 128 tokens" in out and "ZeRO-3 gathered weights" in out
    # the shipped example runs plan against their presets
    for run, preset in [("llama-2-7b-commonsense", "llama-2-7b"), ("llama-2-70b-c4", "llama-2-70b")]:
        assert plan_cli("--config", str(ROOT / "configs" / "runs" / f"{run}.yaml"), "--preset",
                        str(PRESETS / f"{preset}.yaml"), "--world-size", "64", "--nodes", "8",
                        "--backend", "zero3", "--gpu", "h100-80gb") == 0


def test_cli_writes_a_ds_config_the_zero3_backend_accepts(tmp_path, tiny_yaml, capsys):
    from seft_scale.backends.zero3 import load_ds_config
    from seft_scale.config import load_config
    out = tmp_path / "ds.json"
    assert plan_cli("--config", str(PRESETS / "llama-2-70b.yaml"), "--world-size", "64",
                    "--backend", "zero3", "--write-ds-config", str(out)) == 0
    ds = json.loads(out.read_text())
    assert ds["zero_optimization"]["stage3_param_persistence_threshold"] == 81920
    assert ds["zero_optimization"]["overlap_comm"] is True  # kept from configs/ds/zero3.json
    load_ds_config(str(out), load_config(tiny_yaml), world=64)


@pytest.mark.parametrize("argv,message", [
    (["--config", "missing.yaml", "--world-size", "2"], "missing.yaml does not exist"),
    (["--config", "{preset}", "--world-size", "6", "--nodes", "4"], "not a multiple of --nodes"),
    (["--config", "{preset}", "--world-size", "2", "--backend", "local"], "runs on one process"),
    (["--config", "{preset}", "--world-size", "2", "seft.lora_rank=8"], "it takes neither"),
    (["--config", "{tiny}", "--world-size", "2", "seft.lora_rank=0"], "seft.lora_rank: must be > 0"),
    (["--config", "{tiny}", "--world-size", "2", "--seq", "0"], "--seq must be >= 1"),
    (["--config", "{tiny}", "--world-size", "2", "--write-ds-config", "x.json"], "needs a preset"),
    (["--config", "{preset}", "--world-size", "2", "--backend", "zero3", "--ds-config", "no.json"],
     "no.json does not exist"),
])
def test_cli_bad_input_is_named(capsys, tiny_yaml, argv, message):
    argv = [a.format(preset=PRESETS / "llama-2-7b.yaml", tiny=tiny_yaml) for a in argv]
    assert plan_cli(*argv) == 2
    assert message in capsys.readouterr().err


def test_usable_memory_rule():
    assert usable_bytes(80) == pytest.approx((80 - 2) * 0.9 * GIB)
