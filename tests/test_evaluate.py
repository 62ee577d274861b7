"""Evaluation: Wanda-protocol perplexity vs a hand computation, lm-eval on a local YAML task,
the sparsity report of a hand-pruned model, launch/evaluate.py end to end, and named errors."""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from seft_scale.config import ModelConfig
from seft_scale.errors import ConfigError
from seft_scale.evaluate import (evaluate_model, folder_matrices, load_tasks, model_matrices,
                                 perplexity, ppl_windows, read_ppl_texts, sparsity_report)
from seft_scale.model import build_tiny_llama, save_model, train_tokenizer

ROOT = Path(__file__).resolve().parents[1]
TEMPEST = (ROOT / "configs/data/tempest.txt").read_text()
LMEVAL = ROOT / "tests/fixtures/lmeval"
TEXTS = [TEMPEST[:3000], TEMPEST[3000:5000], TEMPEST[9000:11000]]


@pytest.fixture(scope="module")
def tiny():
    tok = train_tokenizer(TEMPEST[:20_000], 384)
    return build_tiny_llama(ModelConfig(), len(tok), torch.float32, "sdpa").eval(), tok


@pytest.fixture(scope="module")
def saved(tiny, tmp_path_factory):
    out = tmp_path_factory.mktemp("tiny_model")
    save_model(*tiny, out)
    return out


def test_perplexity_is_the_wanda_protocol(tiny):
    model, tok = tiny
    seqlen = 64
    ids = tok("\n\n".join(TEXTS))["input_ids"]
    n = len(ids) // seqlen
    assert len(ids) % seqlen, "pick texts whose token count leaves a remainder"
    losses = []
    with torch.no_grad():
        for w in range(n):
            window = torch.tensor(ids[w * seqlen:(w + 1) * seqlen])
            logp = torch.log_softmax(model(window[None]).logits[0].double(), -1)
            losses.append(-logp[torch.arange(seqlen - 1), window[1:]].mean())
    want = math.exp(sum(float(x) * seqlen for x in losses) / (n * seqlen))

    got = perplexity(model, tok, TEXTS, seqlen, batch_size=3)  # batches of 3 windows, last one short
    assert got["windows"] == n and got["seqlen"] == seqlen and got["tokens"] == len(ids)
    assert got["unused_tokens"] == len(ids) - n * seqlen > 0
    assert got["ppl"] == pytest.approx(want, rel=1e-5)
    windows, total = ppl_windows(tok, TEXTS, seqlen)
    assert torch.equal(windows, torch.tensor(ids[: n * seqlen]).view(n, seqlen)) and total == len(ids)
    first2 = perplexity(model, tok, TEXTS, seqlen, max_windows=2)
    assert first2["windows"] == 2
    assert first2["ppl"] == pytest.approx(math.exp(float(sum(losses[:2])) / 2), rel=1e-5)


def _hand_accuracy(model, tok, docs) -> float:
    """lm-eval's multiple choice: argmax over choices of log p(" " + choice | question)."""
    right = 0
    with torch.no_grad():
        for d in docs:
            ctx = tok(d["question"])["input_ids"]
            scores = []
            for choice in d["choices"]:
                whole = tok(d["question"] + " " + choice)["input_ids"]
                logp = torch.log_softmax(model(torch.tensor(whole)[None]).logits[0].double(), -1)
                scores.append(sum(float(logp[t - 1, whole[t]]) for t in range(len(ctx), len(whole))))
            right += int(max(range(len(scores)), key=scores.__getitem__) == d["answer"])
    return right / len(docs)


def test_lm_eval_on_a_local_yaml_task(tiny, monkeypatch):
    model, tok = tiny
    monkeypatch.chdir(ROOT)  # the fixture's data_files path is relative to the repository
    result = evaluate_model(model, tok, tasks=["seft_tiny_mc"], include_path=LMEVAL, batch_size=4)
    metrics = result["lm_eval"]["seft_tiny_mc"]
    docs = [json.loads(line) for line in (LMEVAL / "seft_tiny_mc.jsonl").read_text().splitlines()]
    assert metrics["sample_len"] == len(docs)
    assert 0 <= metrics["acc"] <= 1
    assert metrics["acc"] == pytest.approx(_hand_accuracy(model, tok, docs))
    assert "perplexity" not in result and result["sparsity"]["summary"]["sparsity"] == 0


def test_sparsity_report_counts_exact_nonzeros(tiny, tmp_path):
    model, tok = tiny
    pruned = build_tiny_llama(ModelConfig(), len(tok), torch.float32, "sdpa")
    g = torch.Generator().manual_seed(0)
    want = {}
    with torch.no_grad():
        for name, w in model_matrices(pruned):
            if name.endswith("q_proj"):  # 2:4 by hand: zero inputs 1 and 3 of every group of 4
                w.view(w.shape[0], -1, 4)[:, :, 1::2] = 0
            else:
                w.mul_(torch.rand(w.shape, generator=g) > 0.6)
            want[name] = int((w != 0).sum())
    save_model(pruned, tok, tmp_path)

    report = sparsity_report(folder_matrices(tmp_path))
    assert {n: m["nnz"] for n, m in report["matrices"].items()} == want
    q = report["matrices"]["model.layers.0.self_attn.q_proj"]
    assert q["sparsity"] == 0.5 and q["shape"] == [64, 64]
    numel = sum(m["shape"][0] * m["shape"][1] for m in report["matrices"].values())
    assert report["summary"]["nnz"] == sum(want.values())
    assert report["summary"]["sparsity"] == pytest.approx(1 - sum(want.values()) / numel)
    assert sparsity_report(model_matrices(pruned)) == report

    q_only = sparsity_report(folder_matrices(tmp_path, ["q_proj"]), nm=(2, 4))
    assert q_only["summary"]["matrices"] == 2 and q_only["summary"]["nm_valid"]
    assert not sparsity_report(folder_matrices(tmp_path, ["k_proj"]), nm=(2, 4))["summary"]["nm_valid"]


def test_launch_evaluate_end_to_end(tiny, saved, tmp_path):
    model, tok = tiny
    ppl_file = tmp_path / "heldout.jsonl"
    ppl_file.write_text("".join(json.dumps({"text": t}) + "\n" for t in TEXTS))
    out = tmp_path / "res" / "eval.json"
    cmd = [sys.executable, str(ROOT / "launch/evaluate.py"), "--model", str(saved), "--tasks",
           "ppl,seft_tiny_mc", "--ppl-data", str(ppl_file), "--seqlen", "64", "--include-path",
           str(LMEVAL), "--limit", "5", "--batch-size", "2", "--out", str(out)]
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1")
    res = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "perplexity  heldout      ppl" in res.stdout and "seqlen 64" in res.stdout
    result = json.loads(out.read_text())
    assert result["perplexity"]["ppl"] == pytest.approx(perplexity(model, tok, TEXTS, 64)["ppl"], rel=1e-5)
    assert result["lm_eval"]["seft_tiny_mc"]["sample_len"] == 5
    assert result["sparsity"]["summary"]["matrices"] == 14


def _main(argv, capsys) -> str:
    from launch.evaluate import main
    assert main(argv) == 2
    return capsys.readouterr().err


def test_bad_inputs_are_named(saved, tmp_path, capsys, monkeypatch):
    assert "--model" in _main(["--model", str(tmp_path / "nope")], capsys)
    assert "--ppl-data" in _main(["--model", str(saved), "--ppl-data", str(tmp_path / "no.txt")], capsys)
    assert "needs --ppl-data" in _main(["--model", str(saved), "--tasks", "ppl"], capsys)
    assert "--seqlen" in _main(["--model", str(saved), "--ppl-data", str(ROOT / "configs/data/tempest.txt"),
                                "--seqlen", "4096"], capsys)
    assert "--include-path" in _main(["--model", str(saved), "--tasks", "x",
                                      "--include-path", str(tmp_path / "none")], capsys)
    bad_json = tmp_path / "bad.jsonl"
    bad_json.write_text('{"body": "no text field"}\n')
    with pytest.raises(ConfigError, match="'text' field"):
        read_ppl_texts(bad_json)
    with pytest.raises(ConfigError, match="no window"):
        ppl_windows(lambda s: {"input_ids": [1, 2, 3]}, ["abc"], 8)

    # an unknown task (searched in lm-eval's whole registry), and a task whose dataset is on the hub
    with pytest.raises(ConfigError, match=r"unknown lm-eval task\(s\) \['no_such_task_xyz'\]"):
        load_tasks(["no_such_task_xyz"], LMEVAL)
    hub_task = tmp_path / "hub_tasks"
    hub_task.mkdir()
    (hub_task / "hub.yaml").write_text((LMEVAL / "seft_tiny_mc.yaml").read_text().replace(
        "task: seft_tiny_mc", "task: seft_hub_mc").replace("dataset_path: json",
                                                           "dataset_path: seft-nobody/no-such-dataset"))
    monkeypatch.chdir(ROOT)
    with pytest.raises(ConfigError, match="cannot load the dataset of lm-eval task 'seft_hub_mc'"):
        load_tasks(["seft_hub_mc"], hub_task)


def test_several_named_texts_each_get_a_perplexity(tiny):
    model, tok = tiny
    sets = {"in_domain": TEXTS[:2], "out_of_domain": TEXTS[2:]}
    res = evaluate_model(model, tok, sets, 64, max_windows=3)
    assert list(res["perplexity_texts"]) == ["in_domain", "out_of_domain"]
    for name, texts in sets.items():
        assert res["perplexity_texts"][name] == pytest.approx(
            dict(perplexity(model, tok, texts, 64, max_windows=3), time_s=res["perplexity_texts"][name]["time_s"]))
    assert res["perplexity"] is res["perplexity_texts"]["in_domain"]  # the headline: the first text
    one = evaluate_model(model, tok, TEXTS, 64, max_windows=3)  # a plain list: one set
    assert list(one["perplexity_texts"]) == ["ppl"]


def test_eval_ppl_data_takes_a_path_or_named_paths(tiny_yaml, tmp_path):
    from seft_scale.config import load_config
    from seft_scale.evaluate import parse_ppl_data

    tempest = str(ROOT / "configs/data/tempest.txt")
    one = load_config(tiny_yaml, [f"eval.ppl_data={tempest}"])
    assert one.eval.ppl_data == tempest and one.eval.ppl_sets() == {"tempest": tempest}
    two = load_config(tiny_yaml, [f"eval.ppl_data={{a: {tempest}, b: configs/data/tempest.txt}}"])
    assert two.eval.ppl_sets() == {"a": tempest, "b": tempest}  # relative paths resolved
    with pytest.raises(ConfigError, match="eval.ppl_data.b: nowhere.txt does not exist"):
        load_config(tiny_yaml, [f"eval.ppl_data={{a: {tempest}, b: nowhere.txt}}"])
    with pytest.raises(ConfigError, match=r"eval.ppl_data: text names \['a b'\]"):
        load_config(tiny_yaml, [f"eval.ppl_data={{'a b': {tempest}}}"])
    with pytest.raises(ConfigError, match="eval.ppl_data: expected str or dict"):
        load_config(tiny_yaml, ["eval.ppl_data=[1, 2]"])
    assert parse_ppl_data("x/held.txt") == {"held": "x/held.txt"}
    assert parse_ppl_data("a=x.txt,b=y.jsonl") == {"a": "x.txt", "b": "y.jsonl"}
    with pytest.raises(ConfigError, match="--ppl-data: the name 'a' is given twice"):
        parse_ppl_data("a=x.txt,a=y.txt")
