"""launch/compare.py on the tiny model (configs/runs/tiny.yaml, a few steps):
* all five methods run, each in its own process, from the one pruned folder, with the same tokens,
  matched trainable budgets and the per-method learning rates, every one ending at the exact budget;
* the table, compare.json and compare.png hold one row per method with numbers;
* a method that fails is reported with its reason while the others still run (exit status 1);
* bad input (method name, --lr, a taken folder, a method= override) is refused by name, writing nothing."""
import json
import math

import pytest
import torch
import yaml
from safetensors.torch import load_file

from launch.compare import main
from seft_scale.compare import DEFAULT_METHODS, folder_sha256
from tests.conftest import ROOT

FAST = ["train.steps=6", "train.eval_batches=1", "train.warmup_steps=2", "train.check_invariants=true"]


def test_every_method_from_one_pruned_model(tiny_yaml, tmp_path, capsys):
    out = tmp_path / "cmp"
    assert main(["--config", tiny_yaml, "--output-dir", str(out), "--lr", "static=1e-4", *FAST]) == 0
    table = capsys.readouterr().out
    result = json.loads((out / "compare.json").read_text())
    rows = {r["method"]: r for r in result["rows"]}
    assert [r["method"] for r in result["rows"]] == list(DEFAULT_METHODS)

    pruned = out / "pruned"
    start = load_file(str(pruned / "model.safetensors"))
    assert result["start"]["sha256"] == folder_sha256(pruned)  # no run wrote into the shared start
    budgets = {k[: -len(".weight")]: int((v != 0).sum()) for k, v in start.items() if "_proj" in k}
    shapes = {k[: -len(".weight")]: v.shape for k, v in start.items() if "_proj" in k}
    lora = sum(4 * (d_out + d_in) for d_out, d_in in shapes.values())  # tiny.yaml: seft.lora_rank 4
    expected_trainable = {"none": 0, "static": sum(budgets.values()), "lora_star": lora, "sqft": lora,
                          "seft": lora}
    expected_lr = {"none": None, "static": 1e-4, "lora_star": 5e-4, "sqft": 5e-4, "seft": 3e-3}
    for m, row in rows.items():
        run = out / m
        assert row["status"] == "ok", row
        assert row["exact_budget"] and abs(row["sparsity"] - 0.5) < 1e-9
        assert math.isfinite(row["ppl"]) and row["ppl"] > 1
        assert row["peak_rss_mib"] > 100 and row["wall_s"] > 0  # the interpreter alone is > 100 MiB
        assert row["trainable"] == expected_trainable[m] and row["lr"] == expected_lr[m]
        assert row["tokens_seen"] == (0 if m == "none" else 6 * 8 * 128)
        report = json.loads((run / "report.json").read_text())["matrices"]
        assert {n: e["budget"] for n, e in report.items()} == budgets  # budgets of the one start
        assert all(e["nnz"] == e["budget"] for e in report.values())
        cfg = yaml.safe_load((run / "config.yaml").read_text())
        assert cfg["method"] == m and cfg["train"]["steps"] == 6
        assert expected_lr[m] is None or cfg["train"]["lr"] == expected_lr[m]
        assert not (run / "pruned").exists()  # nobody pruned again
        if m != "none":  # the start each trained run recorded in its checkpoint
            ckpt = run / "checkpoints" / (run / "checkpoints" / "latest").read_text().strip()
            assert json.loads((ckpt / "trainer.json").read_text())["start_model"] == str(pruned.resolve())
        assert f"\n{m} " in table
    none = load_file(str(out / "none" / "export" / "model.safetensors"))
    assert all(torch.equal(none[k], v) for k, v in start.items())  # the pruned model, bit for bit
    assert rows["seft"]["ppl"] < rows["none"]["ppl"]  # SEFT at lr 3e-3 improves in 6 steps
    assert "trains all nonzeros" in table and "exp(held-out loss)" in table
    png = (out / "compare.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000


def test_a_failed_method_is_reported_and_the_others_run(tiny_yaml, tmp_path, capsys):
    """Also the eval.ppl_data path: Wanda-protocol perplexity, dense measured once before pruning."""
    out = tmp_path / "cmp"
    # rank 20 asks K = 20·(64+64) > the 2048 nonzeros of q_proj: SEFT refuses at start, LoRA would not
    rc = main(["--config", tiny_yaml, "--output-dir", str(out), "--methods", "seft,none", *FAST,
               "seft.lora_rank=20", f"eval.ppl_data={ROOT / 'configs/data/tempest.txt'}", "eval.seqlen=128",
               "eval.max_windows=2", "eval.stages=[dense,pruned,repaired]"])
    assert rc == 1
    result = json.loads((out / "compare.json").read_text())
    seft, none = result["rows"]
    assert seft["status"] == "failed" and "seft.lora_rank" in seft["reason"] and seft["returncode"] != 0
    assert none["status"] == "ok" and none["exact_budget"]
    report = json.loads((out / "none" / "report.json").read_text())["summary"]["eval"]
    assert list(report) == ["repaired"]  # one perplexity per run; none's is the pruned model's
    assert none["ppl"] == report["repaired"]["perplexity"]["ppl"]
    assert math.isfinite(result["start"]["dense_ppl"]) and result["start"]["dense_ppl"] != none["ppl"]
    table = capsys.readouterr().out
    assert "FAILED: error: seft.lora_rank" in table and "(dense)" in table and "eval.ppl_data" in table
    assert (out / "compare.png").is_file()


@pytest.mark.parametrize("args, message", [
    (["--methods", "none,seft,lora"], "--methods: unknown method(s) ['lora']"),
    (["--methods", "seft,seft"], "--methods: seft named more than once"),
    (["--lr", "seft:1e-3"], "--lr: 'seft:1e-3' is not method=value"),
    (["--lr", "seft=fast"], "--lr: 'fast' (for seft) is not a number"),
    (["--lr", "none=1e-3"], "--lr: 'none' takes no learning rate"),
    (["--lr", "static=-1"], "--lr: static=-1 must be a finite number > 0"),
    (["method=seft"], "compare sets each run's method; use --methods"),
    (["train.eval_batches=0"], "a comparison needs a held-out measure"),
])
def test_bad_input_is_refused_writing_nothing(tiny_yaml, tmp_path, capsys, args, message):
    out = tmp_path / "cmp"
    assert main(["--config", tiny_yaml, "--output-dir", str(out), *args]) == 2
    assert message in capsys.readouterr().err
    assert not out.exists()


def test_a_taken_output_dir_is_never_overwritten(tiny_yaml, tmp_path, capsys):
    out = tmp_path / "cmp"
    out.mkdir()
    (out / "keep.txt").write_text("earlier results")
    assert main(["--config", tiny_yaml, "--output-dir", str(out)]) == 2
    assert "--output-dir:" in capsys.readouterr().err
    assert [p.name for p in out.iterdir()] == ["keep.txt"]
    assert (out / "keep.txt").read_text() == "earlier results"
