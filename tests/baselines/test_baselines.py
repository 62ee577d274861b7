"""Every baseline (method static / lora_star / sqft / none) ends with exactly the pruned model's
budget per matrix after merging, and a baseline run resumes bit-identical from a checkpoint."""
import json

import pytest
import torch
from safetensors.torch import load_file

from seft_scale.config import load_config
from seft_scale.errors import ConfigError
from seft_scale.train import train

FAST = ["train.steps=6", "train.eval_batches=1", "train.check_invariants=true", "train.lr=1e-3",
        "eval.plots=false"]


def run(tiny_yaml, out, *overrides, resume=False):
    return train(load_config(tiny_yaml, FAST + list(overrides)), out, resume=resume, progress=False)


@pytest.mark.parametrize("method", ["static", "lora_star", "sqft", "none"])
def test_exact_budget_after_merge(tiny_yaml, tmp_path, method):
    # LoRA* with a large step size, so the merged update is big enough to move the re-pruned support
    lr = "train.lr=5e-2" if method == "lora_star" else "train.lr=1e-3"
    summary = run(tiny_yaml, tmp_path / method, f"method={method}", lr)
    start = load_file(str(tmp_path / method / "pruned" / "model.safetensors"))
    end = load_file(str(tmp_path / method / "export" / "model.safetensors"))
    report = json.loads((tmp_path / method / "report.json").read_text())["matrices"]
    assert summary["sparsity"]["exact_budget"] and len(report) == 14
    changed = 0
    for name, m in report.items():
        a, b = start[f"{name}.weight"], end[f"{name}.weight"]
        assert int((b != 0).sum()) == int((a != 0).sum()) == m["budget"] == m["nnz"], name
        if method in ("static", "sqft"):  # the support itself cannot move
            assert torch.equal(a != 0, b != 0), name
        changed += int((a != b).sum())
    assert (changed == 0) == (method == "none")  # the baselines really trained
    if method == "lora_star":  # re-pruning after the merge moves the support
        assert sum(m["reactivated"] for m in report.values()) > 0


def test_static_resumes_bit_identical(tiny_yaml, tmp_path, monkeypatch):
    run(tiny_yaml, tmp_path / "a", "method=static", "train.checkpoint_every=2")
    real = torch.optim.AdamW.step
    calls = {"n": 0}

    def crashing(self, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 4:
            raise RuntimeError("simulated crash")
        return real(self, *args, **kwargs)
    monkeypatch.setattr(torch.optim.AdamW, "step", crashing)
    with pytest.raises(RuntimeError, match="simulated crash"):
        run(tiny_yaml, tmp_path / "b", "method=static", "train.checkpoint_every=2")
    monkeypatch.setattr(torch.optim.AdamW, "step", real)
    run(tiny_yaml, tmp_path / "b", "method=static", "train.checkpoint_every=2", resume=True)
    a = load_file(str(tmp_path / "a" / "export" / "model.safetensors"))
    b = load_file(str(tmp_path / "b" / "export" / "model.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_lora_methods_need_a_rank(tiny_yaml):
    with pytest.raises(ConfigError, match="baseline.lora_rank"):
        load_config(tiny_yaml, ["method=sqft", "seft.lora_rank=null", "seft.density=0.01"])
