"""Exporting a run (seft_scale/export.py): from a checkpoint, on one process, the same folder as the
run's own export; folders that cannot be exported are refused by name before anything is written."""
import json
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from seft_scale.cli.export import main as export_main
from seft_scale.config import DataConfig, RunConfig
from seft_scale.errors import ConfigError
from seft_scale.export import export_checkpoint
from seft_scale.run import RunFolder
from tests.conftest import ROOT
from tests.helpers import train_tiny


def test_export_from_a_checkpoint_matches_the_run_export(tiny_yaml, tmp_path, capsys):
    train_tiny(tiny_yaml, tmp_path / "r", "train.checkpoint_every=12")
    res = subprocess.run([sys.executable, str(ROOT / "launch" / "export.py"), "--run", str(tmp_path / "r"),
                          "--out", str(tmp_path / "again")], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr[-2000:]
    a = load_file(str(tmp_path / "r" / "export" / "model.safetensors"))
    b = load_file(str(tmp_path / "again" / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    ra = json.loads((tmp_path / "r" / "report.json").read_text())["matrices"]
    rb = json.loads((tmp_path / "again" / "seft_report.json").read_text())["matrices"]
    assert ra == rb
    # an earlier checkpoint exports too, with its own step; a taken folder is refused
    early = tmp_path / "r" / "checkpoints" / "step_00000012"
    summary = export_checkpoint(tmp_path / "r", early, tmp_path / "early")
    assert summary["steps"] == 12 and summary["checkpoint_world_size"] == 1
    assert summary["sparsity"]["exact_budget"]
    c = load_file(str(tmp_path / "early" / "model.safetensors"))
    assert any(not torch.equal(a[k], c[k]) for k in a)
    capsys.readouterr()
    assert export_main(["--run", str(tmp_path / "r"), "--checkpoint", str(early),
                        "--out", str(tmp_path / "again")]) == 2
    assert capsys.readouterr().err.startswith(f"error: --out: {tmp_path / 'again'} exists and is not empty")


def test_what_cannot_be_exported_is_named(tmp_path):
    with pytest.raises(ConfigError, match=r"^--run: .* holds no run \(no config.yaml\)"):
        export_checkpoint(tmp_path / "nothing")
    run = RunFolder(tmp_path / "run")
    run.write_config(RunConfig(data=DataConfig(train="gone.txt")))
    with pytest.raises(ConfigError, match=r"^--checkpoint: no complete checkpoint in .*checkpoints"):
        export_checkpoint(run.root)
    with pytest.raises(ConfigError, match=r"^--checkpoint: .*step_1 is not a complete checkpoint \(no such folder\)"):
        export_checkpoint(run.root, tmp_path / "run" / "checkpoints" / "step_1")
    assert sorted(p.name for p in run.root.iterdir()) == ["config.yaml"]  # nothing written
