"""launch/compare.py on the tiny model (configs/runs/tiny.yaml, a few steps):
* all six methods run, each in its own process, from the one pruned folder, with the same tokens,
  matched trainable budgets and each paper's learning rate, every one ending at the exact budget;
* the table, compare.json, compare.md and compare.png hold one row per method with numbers;
* --sweep lr keeps the learning rate of the lowest validation loss (a forced choice where the held-out
  text would pick another), --seeds runs the chosen one again, --ablations rows use SEFT's choice;
* a method that fails is reported with its reason while the others still run (exit status 1);
* bad input (method name, --lr, --grid, --sweep without a validation split, a taken folder, a
  method= override) is refused by name, writing nothing."""
import json
import math

import pytest
import torch
import yaml
from safetensors.torch import load_file

import seft_scale.compare as compare_mod
from launch.compare import main
from seft_scale.baselines.spp import spp_groups
from seft_scale.compare import DEFAULT_METHODS, choose_lr, folder_sha256
from tests.conftest import ROOT

FAST = ["train.steps=6", "train.eval_batches=1", "train.warmup_steps=2", "train.check_invariants=true"]


def test_every_method_from_one_pruned_model(tiny_yaml, tmp_path, capsys):
    out = tmp_path / "cmp"
    assert main(["--config", tiny_yaml, "--output-dir", str(out), "--lr", "static=1e-4", *FAST]) == 0
    table = capsys.readouterr().out
    result = json.loads((out / "compare.json").read_text())
    rows = {r["method"]: r for r in result["rows"]}
    assert [r["method"] for r in result["rows"]] == list(DEFAULT_METHODS)
    assert (out / "compare.md").read_text().startswith("| method |")

    pruned = out / "pruned"
    start = load_file(str(pruned / "model.safetensors"))
    assert result["start"]["sha256"] == folder_sha256(pruned)  # no run wrote into the shared start
    budgets = {k[: -len(".weight")]: int((v != 0).sum()) for k, v in start.items() if "_proj" in k}
    shapes = {k[: -len(".weight")]: v.shape for k, v in start.items() if "_proj" in k}
    lora = sum(4 * (d_out + d_in) for d_out, d_in in shapes.values())  # tiny.yaml: seft.lora_rank 4
    spp = sum(spp_groups(d_out, d_in, 4) * d_in + d_out for d_out, d_in in shapes.values())
    expected_trainable = {"none": 0, "static": sum(budgets.values()), "lora_star": lora, "sqft": lora,
                          "spp": spp, "seft": lora}
    expected_lr = {"none": None, "static": 1e-4, "lora_star": 1e-4, "sqft": 3e-4, "spp": 4e-3, "seft": 3e-3}
    for m, row in rows.items():
        run = out / "runs" / m / ("pruned-seed0" if m == "none" else f"lr{expected_lr[m]:.3g}-seed0")
        assert row["status"] == "ok", row
        assert row["exact_budget"] and abs(row["sparsity"] - 0.5) < 1e-9
        assert list(row["ppl"]) == ["val"] and math.isfinite(row["ppl"]["val"]["mean"])
        assert row["ppl"]["val"]["mean"] > 1 and row["run_dir"] == str(run)
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
    none = load_file(str(out / "runs" / "none" / "pruned-seed0" / "export" / "model.safetensors"))
    assert all(torch.equal(none[k], v) for k, v in start.items())  # the pruned model, bit for bit
    assert rows["seft"]["ppl"]["val"]["mean"] < rows["none"]["ppl"]["val"]["mean"]  # lr 3e-3: better in 6 steps
    assert "exp(held-out loss)" in table
    png = (out / "compare.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000


def test_a_failed_method_is_reported_and_the_others_run(tiny_yaml, tmp_path, capsys):
    """Also the eval.ppl_data path: Wanda-protocol perplexity, dense measured once before pruning."""
    out = tmp_path / "cmp"
    # rank 20 asks K = 20·(64+64) > the 2048 nonzeros of q_proj: SEFT refuses at start, LoRA would not
    tempest = ROOT / "configs/data/tempest.txt"
    rc = main(["--config", tiny_yaml, "--output-dir", str(out), "--methods", "seft,none", *FAST,
               "seft.lora_rank=20", f"eval.ppl_data={{a: {tempest}, b: {tempest}}}", "eval.seqlen=128",
               "eval.max_windows=2", "eval.stages=[dense,pruned,repaired]"])
    assert rc == 1
    result = json.loads((out / "compare.json").read_text())
    seft, none = result["rows"]
    assert seft["status"] == "failed" and "seft.lora_rank" in seft["reason"]
    assert seft["trials"][0]["returncode"] != 0
    assert none["status"] == "ok" and none["exact_budget"]
    report = json.loads((out / "runs/none/pruned-seed0/report.json").read_text())["summary"]["eval"]
    assert list(report) == ["repaired"]  # one perplexity per run; none's is the pruned model's
    texts = report["repaired"]["perplexity_texts"]
    assert list(none["ppl"]) == ["a", "b"] and none["ppl"]["a"]["mean"] == texts["a"]["ppl"]
    assert texts["a"] == texts["b"] or texts["a"]["ppl"] == texts["b"]["ppl"]  # the same text twice
    dense = result["start"]["dense_ppl"]
    assert list(dense) == ["a", "b"] and math.isfinite(dense["a"]) and dense["a"] != none["ppl"]["a"]["mean"]
    table = capsys.readouterr().out
    assert "FAILED: error: seft.lora_rank" in table and "(dense)" in table and "eval.ppl_data" in table
    assert "ppl a" in table and "ppl b" in table
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
    (["--sweep", "lr", "data.val_fraction=0"], "--sweep lr picks by the loss on the validation split"),
    (["--grid", "seft=1e-3,2e-3"], "--grid: needs --sweep lr"),
    (["--sweep", "lr", "--grid", "seft=1e-3,1e-3"], "--grid: seft needs distinct learning rates"),
    (["--sweep", "lr", "--methods", "none,seft", "--grid", "spp=1e-3"], "--grid: ['spp'] not in --methods"),
    (["--ablations", "merge_dropped=false"], "--ablations: 'merge_dropped=false' is not a seft.key=value"),
    (["--ablations", "seft.merge_dropped=maybe"], "seft.merge_dropped: expected true or false"),
    (["--seeds", "0"], "--seeds: must be >= 1"),
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


def test_choose_lr_by_validation_only():
    trials = [{"lr": 1e-4, "status": "ok", "val_loss": 3.0, "ppl": {"heldout": 10.0}},
              {"lr": 3e-4, "status": "ok", "val_loss": 2.5, "ppl": {"heldout": 50.0}},
              {"lr": 1e-3, "status": "ok", "val_loss": float("nan"), "ppl": {"heldout": 1.0}},
              {"lr": 3e-3, "status": "failed", "val_loss": 0.1}]
    assert choose_lr(trials) == 3e-4
    assert choose_lr([dict(trials[0]), dict(trials[0], lr=2e-4)]) == 1e-4  # a tie: grid order
    assert choose_lr(trials[2:]) is None


def test_sweep_seeds_and_ablations(tiny_yaml, tmp_path, monkeypatch, capsys):
    """A forced choice: validation loss is lowest at the grid's middle point while the held-out text
    is best at its largest one; the row takes the middle. Seeds rerun the choice; the ablation runs
    at SEFT's choice. The training processes are replaced by a stand-in that reports numbers."""
    ran = []

    def fake_run(trial, config, start, run_dir, log):
        ran.append((trial.row, trial.lr, trial.seed, list(trial.overrides)))
        return {"returncode": 0, "wall_s": 1.0, "peak_rss_mib": 200.0, "run_dir": str(run_dir), "log": str(log)}

    def fake_read(trial, res):
        lr, mid = trial.lr, {"seft": 3e-3, "static": 1e-4}.get(trial.method)
        val = None if lr is None else 2.0 + abs(math.log10(lr / mid)) + 0.01 * trial.seed
        return {"lr": lr, "seed": trial.seed, "status": "ok", **res,
                "ppl": {"heldout": 100.0 - (lr or 0) * 1e4 + trial.seed}, "val_loss": val,
                "lm_eval": {"mc": {"acc": 0.25 + trial.seed / 100}}, "train_time_s": 1.0, "sparsity": 0.5,
                "nnz": 10, "budget": 10, "exact_budget": True, "nm_valid": None, "tokens_seen": 1}
    monkeypatch.setattr(compare_mod, "run_trial", fake_run)
    monkeypatch.setattr(compare_mod, "read_trial", fake_read)
    out = tmp_path / "cmp"
    assert main(["--config", tiny_yaml, "--output-dir", str(out), "--methods", "none,static,seft",
                 "--sweep", "lr", "--grid", "static=3e-5,1e-4,3e-4", "--seeds", "2",
                 "--ablations", "seft.merge_dropped=false,seft.reactivation=false+seft.adapt_criterion=magnitude",
                 "data.val_fraction=0.05", *FAST]) == 0
    result = json.loads((out / "compare.json").read_text())
    rows = {r["label"]: r for r in result["rows"]}
    assert list(rows) == ["none", "static", "seft", "seft merge_dropped=false",
                          "seft reactivation=false adapt_criterion=magnitude"]
    assert rows["static"]["grid"] == [3e-5, 1e-4, 3e-4] and rows["static"]["lr"] == 1e-4
    assert rows["seft"]["grid"] == [float(f"{3e-3 * f:.3g}") for f in compare_mod.GRID_FACTORS]
    assert rows["seft"]["lr"] == 3e-3  # the config's train.lr, the grid's centre
    for label in ("static", "seft", "seft merge_dropped=false"):
        r = rows[label]
        assert r["seeds"] == 2 and r["ppl"]["heldout"]["n"] == 2 and r["ppl"]["heldout"]["sd"] > 0
        assert r["acc"]["mc"]["values"] == [0.25, 0.26]
    seeds = [t for t in ran if t[0] == "static" and t[2] == 1]
    assert [t[1] for t in seeds] == [1e-4]  # the second seed runs the chosen lr only
    assert "train.seed=1" in seeds[0][3] and "seft.init_seed=1" in seeds[0][3]
    ablation = [t for t in ran if t[0] == "seft merge_dropped=false"]
    assert {t[1] for t in ablation} == {3e-3} and "seft.merge_dropped=false" in ablation[0][3]
    assert len([t for t in ran if t[0] == "none"]) == 1
    table = capsys.readouterr().out
    assert "3e-05,0.0001,0.0003" in table and "±" in table and "acc mc" in table
    (out / "compare.md").unlink()
    assert main(["--render", str(out)]) == 0  # the table again from compare.json
    assert capsys.readouterr().out.splitlines()[-3:-1] == table.splitlines()[-3:-1]
    assert (out / "compare.md").read_text().count("\n") == 2 + 5
    assert main(["--render", str(tmp_path)]) == 2 and "holds no compare.json" in capsys.readouterr().err


def test_sweep_follows_a_best_at_the_grid_edge(tiny_yaml, tmp_path, monkeypatch, capsys):
    """A best at the edge of its grid is followed outward by the grid's own step until a worse point
    brackets it (static upward, seft downward), a failed point also brackets, and at most
    GRID_EXTENSIONS points are added (lora_star, whose optimum lies far out, stays at the new edge)."""
    best = {"static": 1e-4, "seft": 3e-3, "lora_star": 1.0, "sqft": 1.0}

    def fake_run(trial, config, start, run_dir, log):
        return {"returncode": 0, "wall_s": 1.0, "peak_rss_mib": 200.0, "run_dir": str(run_dir), "log": str(log)}

    def fake_read(trial, res):
        lr = trial.lr
        failed = trial.method == "sqft" and lr > 2e-3  # diverges above 2e-3
        return {"lr": lr, "seed": trial.seed, "status": "failed" if failed else "ok", "reason": "diverged", **res,
                "ppl": {"heldout": 10.0}, "val_loss": 2.0 + abs(math.log10(lr / best[trial.method])),
                "lm_eval": {}, "train_time_s": 1.0, "sparsity": 0.5, "nnz": 10, "budget": 10,
                "exact_budget": True, "nm_valid": None, "tokens_seen": 1}
    monkeypatch.setattr(compare_mod, "run_trial", fake_run)
    monkeypatch.setattr(compare_mod, "read_trial", fake_read)
    out = tmp_path / "cmp"
    main(["--config", tiny_yaml, "--output-dir", str(out), "--methods", "static,seft,lora_star,sqft",
          "--sweep", "lr", "--grid", "static=1e-5,3e-5;seft=1e-2,3e-2;lora_star=1e-7,1e-6;sqft=3e-4,1e-3",
          "data.val_fraction=0.05", *FAST])
    rows = {r["label"]: r for r in json.loads((out / "compare.json").read_text())["rows"]}
    assert rows["static"]["grid"] == [1e-5, 3e-5, 9e-5, 2.7e-4] and rows["static"]["lr"] == 9e-5
    assert rows["seft"]["grid"] == [1.11e-3, 3.33e-3, 1e-2, 3e-2] and rows["seft"]["lr"] == 3.33e-3
    assert rows["lora_star"]["grid"] == [1e-7, 1e-6, 1e-5, 1e-4, 1e-3] and rows["lora_star"]["lr"] == 1e-3
    assert compare_mod.GRID_EXTENSIONS == 3
    assert rows["sqft"]["grid"] == [3e-4, 1e-3, 3.33e-3] and rows["sqft"]["lr"] == 1e-3
    assert compare_mod.next_lr([1e-3], 1e-3) is None and compare_mod.next_lr([1e-3, 2e-3], None) is None
    assert compare_mod.next_lr([1e-3, 2e-3, 4e-3], 2e-3) is None


def test_an_interrupted_comparison_ends_its_trial(tmp_path, monkeypatch):
    events = []

    class Proc:
        pid = 0

        @property
        def stdout(self):
            def lines():
                yield "step 1\n"
                raise KeyboardInterrupt
            return lines()

        def kill(self):
            events.append("kill")

        def wait(self):
            events.append("wait")
    monkeypatch.setattr(compare_mod.subprocess, "Popen", lambda *a, **k: Proc())
    trial = compare_mod.Trial("seft", "seft", 1e-3, 0, [], None)
    with pytest.raises(KeyboardInterrupt):
        compare_mod.run_trial(trial, "c.yaml", "start", tmp_path / "run", tmp_path / "logs" / "t")
    assert events == ["kill", "wait"] and (tmp_path / "logs" / "t.out").read_text() == "step 1\n"
