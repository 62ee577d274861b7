"""The main job's pipeline (configs/runs/demo.yaml: Wanda prune in the run, SEFT, perplexity
dense -> pruned -> repaired, plots) end to end, with the tiny model and local text in place of the
real SmolLM2-135M and Shakespeare assets (the real demo takes minutes; see README)."""
import json

from seft_scale.config import load_config
from seft_scale.train import train

from tests.conftest import ROOT

TEXT = str(ROOT / "configs" / "data" / "tempest.txt")


def test_demo_pipeline_on_the_tiny_model(tmp_path):
    cfg = load_config(str(ROOT / "configs" / "runs" / "demo.yaml"), [
        "model.path=null", f"data.train={TEXT}", f"prune.calib_data={TEXT}", f"eval.ppl_data={TEXT}",
        "prune.nsamples=4", "prune.seqlen=64", "seft.lora_rank=2", "train.steps=12",
        "eval.seqlen=64", "eval.max_windows=4", "train.check_invariants=true"])
    assert cfg.prune.method == "wanda" and cfg.eval.stages == ["dense", "pruned", "repaired"]
    summary = train(cfg, tmp_path / "demo", progress=False)
    ev = summary["eval"]
    assert ev["dense"]["sparsity"]["summary"]["sparsity"] < 0.01
    assert abs(ev["pruned"]["sparsity"]["summary"]["sparsity"] - 0.5) < 1e-9
    assert abs(ev["repaired"]["sparsity"]["summary"]["sparsity"] - 0.5) < 1e-9
    for stage in ("dense", "pruned", "repaired"):
        assert ev[stage]["perplexity"]["windows"] == 4 and ev[stage]["perplexity"]["ppl"] > 1
    assert summary["sparsity"]["exact_budget"] and summary["sparsity"]["reactivated"] > 0
    report = json.loads((tmp_path / "demo" / "report.json").read_text())
    assert report["summary"]["eval"]["repaired"]["perplexity"]["ppl"] == ev["repaired"]["perplexity"]["ppl"]
    for png in ("loss.png", "reactivation.png"):
        assert (tmp_path / "demo" / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
