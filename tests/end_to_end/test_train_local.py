"""End to end on one process (configs/runs/tiny.yaml, shortened):
* exact budget after every step and update (train.check_invariants) and in the export;
* pruned positions are reactivated;
* N:M stays valid after every step;
* a run interrupted after a checkpoint and resumed ends bit-identical to an uninterrupted one;
* the export loads in a clean process that never imports seft_scale, with the reported nnz;
* a slot budget larger than the support is refused before anything is trained.
(Bad configs: tests/test_config.py; taken output folders: tests/test_run.py; exporting a
checkpoint: tests/test_export.py.)"""
import json
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from seft_scale.errors import ConfigError
from seft_scale.seft.optim import SlotAdamW
from tests.helpers import train_tiny as run


def test_budget_reactivation_and_clean_export(tiny_yaml, tmp_path):
    summary = run(tiny_yaml, tmp_path / "run")
    report = json.loads((tmp_path / "run" / "report.json").read_text())
    assert summary["sparsity"]["exact_budget"]
    assert report["summary"]["sparsity"]["reactivated"] > 0
    for m in report["matrices"].values():
        assert m["support"] == m["budget"] and m["nnz"] == m["budget"]
    lines = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lines] == list(range(1, 25))
    assert {"loss", "lr", "tokens_per_s", "step_time_s", "density", "dropped", "grown",
            "reactivated", "adapt_pruned"} <= set(lines[0])

    # a clean interpreter: plain transformers, never seft_scale
    code = f"""
import json, sys
from transformers import AutoModelForCausalLM
m = AutoModelForCausalLM.from_pretrained({str(tmp_path / 'run' / 'export')!r})
assert not any(k.startswith('seft_scale') for k in sys.modules)
rep = json.load(open({str(tmp_path / 'run' / 'report.json')!r}))['matrices']
for name, mod in m.named_modules():
    if name in rep:
        assert int((mod.weight != 0).sum()) == rep[name]['nnz'], name
print('ok', len(rep))
"""
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd="/")
    assert res.returncode == 0, res.stderr[-2000:]
    assert res.stdout.split() == ["ok", "14"]


def test_reactivated_count_matches_the_start_model(tiny_yaml, tmp_path):
    run(tiny_yaml, tmp_path / "run")
    start = load_file(str(tmp_path / "run" / "pruned" / "model.safetensors"))
    end = load_file(str(tmp_path / "run" / "export" / "model.safetensors"))
    report = json.loads((tmp_path / "run" / "report.json").read_text())["matrices"]
    for name, m in report.items():
        a, b = start[name + ".weight"], end[name + ".weight"]
        assert m["reactivated"] == int(((b != 0) & (a == 0)).sum())
        assert int((a != 0).sum()) == m["budget"]


def test_nm_valid_after_every_step(tiny_yaml, tmp_path):
    summary = run(tiny_yaml, tmp_path / "nm", "prune.pattern=2:4")
    assert summary["sparsity"]["nm_valid"] and summary["sparsity"].get("reactivated", 0) == 0


def test_resume_is_bit_identical(tiny_yaml, tmp_path, monkeypatch):
    run(tiny_yaml, tmp_path / "a", "train.checkpoint_every=8")

    real_step = SlotAdamW.step
    calls = {"n": 0}

    def crashing_step(self, deltas, lr=None):
        calls["n"] += 1
        if calls["n"] == 19:  # between the checkpoints of steps 16 and 24, inside a window
            raise RuntimeError("simulated crash")
        return real_step(self, deltas, lr)

    monkeypatch.setattr(SlotAdamW, "step", crashing_step)
    with pytest.raises(RuntimeError, match="simulated crash"):
        run(tiny_yaml, tmp_path / "b", "train.checkpoint_every=8")
    monkeypatch.setattr(SlotAdamW, "step", real_step)
    assert (tmp_path / "b" / "checkpoints" / "latest").read_text() == "step_00000016"
    run(tiny_yaml, tmp_path / "b", "train.checkpoint_every=8", resume=True)

    wa = load_file(str(tmp_path / "a" / "export" / "model.safetensors"))
    wb = load_file(str(tmp_path / "b" / "export" / "model.safetensors"))
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
    sa = load_file(str(tmp_path / "a" / "checkpoints" / "step_00000024" / "slots-rank00000.safetensors"))
    sb = load_file(str(tmp_path / "b" / "checkpoints" / "step_00000024" / "slots-rank00000.safetensors"))
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
    strip = lambda p: [{k: v for k, v in json.loads(x).items() if k not in ("tokens_per_s", "step_time_s")}
                       for x in p.read_text().splitlines()]
    assert strip(tmp_path / "a" / "metrics.jsonl") == strip(tmp_path / "b" / "metrics.jsonl")


def test_slot_budget_larger_than_support_is_refused_before_writing_slots(tiny_yaml, tmp_path):
    with pytest.raises(ConfigError, match="seft.lora_rank"):
        run(tiny_yaml, tmp_path / "k", "seft.lora_rank=40")
    assert not (tmp_path / "k" / "checkpoints").exists()


def test_activation_checkpointing_changes_memory_not_results(tiny_yaml, tmp_path):
    run(tiny_yaml, tmp_path / "plain")
    run(tiny_yaml, tmp_path / "ckpt", "train.activation_checkpointing=true")
    a = load_file(str(tmp_path / "plain" / "export" / "model.safetensors"))
    b = load_file(str(tmp_path / "ckpt" / "export" / "model.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)
