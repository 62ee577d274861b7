"""The run folder (seft_scale/run.py): a taken folder is refused untouched, a resume names what
changed in the config, the starting model comes from one decision, and a start built here is
written atomically."""
import os

import pytest
import torch
from safetensors.torch import load_file

from seft_scale.backends.local import LocalBackend
from seft_scale.checkpoint import save_checkpoint
from seft_scale.config import load_config
from seft_scale.data import tokenizer_training_text
from seft_scale.errors import ConfigError
from seft_scale.run import RunFolder, Start, build_start, find_start, plan_start
from tests.helpers import train_tiny


@pytest.fixture
def cfg(tiny_yaml):
    return load_config(tiny_yaml, ["model.tiny.hidden_size=32", "model.tiny.intermediate_size=48"])


def test_existing_output_is_never_overwritten(tiny_yaml, tmp_path):
    out = tmp_path / "taken"
    out.mkdir()
    (out / "precious.txt").write_text("keep me")
    with pytest.raises(ConfigError, match="not empty"):
        train_tiny(tiny_yaml, out)
    assert [p.name for p in out.iterdir()] == ["precious.txt"]
    assert (out / "precious.txt").read_text() == "keep me"


def test_prepare(cfg, tmp_path):
    run = RunFolder(tmp_path / "new")
    assert run.prepare(cfg, resume=False) is None and not run.root.exists()  # checks, creates nothing
    run.root.mkdir()
    assert run.prepare(cfg, resume=False) is None  # an empty folder is free
    (tmp_path / "file").write_text("")
    with pytest.raises(ConfigError, match=r"^--output-dir: .*file exists and is not a folder"):
        RunFolder(tmp_path / "file").prepare(cfg, resume=False)
    assert run.prepare(cfg, resume=True) is None  # a requeued job that died before writing anything
    (run.root / "notes.txt").write_text("mine")
    with pytest.raises(ConfigError, match=r"^--resume: .*new holds no run \(no config.yaml\) and is not empty"):
        run.prepare(cfg, resume=True)
    assert [p.name for p in run.root.iterdir()] == ["notes.txt"]


def test_resume_names_what_changed(cfg, tiny_yaml, tmp_path):
    run = RunFolder(tmp_path / "run")
    run.write_config(cfg)
    assert run.prepare(cfg, resume=True).checkpoint is None  # no checkpoint yet: it starts over
    changed = load_config(tiny_yaml, ["model.tiny.hidden_size=32", "model.tiny.intermediate_size=48",
                                      "train.steps=50", "seft.lora_rank=8"])
    with pytest.raises(ConfigError) as e:
        run.prepare(changed, resume=True)
    assert str(e.value) == ("--resume: the config differs from the run's saved config.yaml in "
                            "seft.lora_rank (4 -> 8), train.steps (40 -> 50)")
    with pytest.raises(ConfigError, match="taken|not empty"):
        run.prepare(cfg, resume=False)
    # keys that do not change the result may differ
    free = load_config(tiny_yaml, ["model.tiny.hidden_size=32", "model.tiny.intermediate_size=48",
                                   "train.log_every=1", "train.checkpoint_every=3", "data.cache_dir=/tmp/x"])
    ckpt = save_checkpoint(run.root, 3, {"x": torch.zeros(1)}, {})
    assert run.prepare(free, resume=True).checkpoint == ckpt
    assert run.saved_config() == cfg


def test_plan_start_choices(cfg, tmp_path):
    run = RunFolder(tmp_path / "run")
    given = tmp_path / "pruned_elsewhere"
    # compare: one pruned folder for every method
    assert plan_start(cfg, run, given) == Start(given, key="--start-model")
    built = plan_start(cfg, run)  # a tiny model pruned by magnitude: built here, saved to <run>/pruned
    assert built == Start(None, run.pruned) and built.ref == run.pruned
    cfg.model.path = str(tmp_path / "dense")
    assert plan_start(cfg, run) == Start(None, run.pruned)  # a dense folder to prune: still built
    cfg.prune.method = "none"
    assert plan_start(cfg, run) == Start(tmp_path / "dense")  # it comes pruned: start from it
    assert plan_start(cfg, run).ref == tmp_path / "dense"
    cfg.prune.method = "magnitude"
    run.pruned.mkdir(parents=True)  # renamed into place only when complete (build_start)
    again = plan_start(cfg, run)
    assert (again.folder, again.key) == (run.pruned, "--resume") and str(run.pruned) in again.remedy
    assert plan_start(cfg, run, given).folder == given


def test_build_start_is_atomic(cfg, tmp_path, monkeypatch):
    backend = LocalBackend(torch.device("cpu"))
    text = tokenizer_training_text(cfg.data)
    run = RunFolder(tmp_path / "run")
    run.root.mkdir()
    real = os.replace

    def killed(*args):
        raise KeyboardInterrupt("killed between the save and the rename")
    monkeypatch.setattr(os, "replace", killed)
    with pytest.raises(KeyboardInterrupt):
        build_start(cfg, backend, run.pruned, text)
    monkeypatch.setattr(os, "replace", real)
    assert not run.pruned.exists()
    assert plan_start(cfg, run) == Start(None, run.pruned)  # the next attempt builds it again
    model, tok = build_start(cfg, backend, run.pruned, text)
    assert plan_start(cfg, run).folder == run.pruned
    assert sorted(p.name for p in run.root.iterdir()) == ["pruned"]  # no partial folder left
    saved = load_file(str(run.pruned / "model.safetensors"))
    state = model.state_dict()
    assert saved.keys() <= state.keys() and all(torch.equal(saved[k], state[k]) for k in saved)
    q = saved["model.layers.0.self_attn.q_proj.weight"]
    assert int((q == 0).sum()) == q.numel() // 2  # pruned to prune.sparsity before it was saved
    assert len(tok.encode("Tempest")) > 0


def test_find_start(cfg, tmp_path):
    run = RunFolder(tmp_path / "run")
    recorded, given = tmp_path / "recorded", tmp_path / "model"
    cfg.model.path = str(given)
    with pytest.raises(ConfigError, match="starting model .* is gone"):
        find_start(run, cfg, str(recorded))
    for folder in (given, recorded, run.pruned):  # each one found first once it exists
        folder.mkdir(parents=True)
        (folder / "config.json").write_text("{}")
        assert find_start(run, cfg, str(recorded)) == folder
