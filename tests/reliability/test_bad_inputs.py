"""Bad input -> one line naming the key, flag or file, exit status 2, and nothing written.

Each row: the command, its arguments (built from the paths of `inputs`), the fragment the one
`error:` line must hold. The commands run in this process (their main(), as the console
scripts call it); one row also runs as a real process to show the console script itself prints
no traceback."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

from seft_scale.cli import evaluate, export, plan, prune, train
from tests.conftest import ROOT
from tests.reliability.conftest import TEXT, TINY, train_argv


@pytest.fixture(scope="module")
def inputs(tmp_path_factory, pruned_folder, truncated_folder):
    d = tmp_path_factory.mktemp("inputs")
    tiny = Path(TINY).read_text().replace("../data/tempest.txt", TEXT)
    (d / "dup.yaml").write_text(tiny.replace("  sparsity: 0.5\n", "  sparsity: 0.5\n  sparsity: 0.6\n"))
    (d / "broken.yaml").write_text("model: [\n")
    (d / "nm.yaml").write_text(tiny.replace("pattern: unstructured", "pattern: 2:4")
                               .replace("sparsity: 0.5", "sparsity: 0.7"))
    (d / "latin1.txt").write_bytes("café au lait, crème brûlée\n".encode("latin-1") * 200)
    (d / "short.txt").write_text("Full fathom five thy father lies.")
    (d / "no_output.jsonl").write_text("".join(json.dumps(r) + "\n" for r in [
        {"instruction": "Add the numbers.", "input": "1 and 2", "output": None},
        {"instruction": "Repeat the word.", "input": "storm"}]))
    (d / "a_file").write_text("not a folder")
    return SimpleNamespace(dir=d, pruned=pruned_folder, truncated=truncated_folder,
                           text=TEXT, out=d / "never")


def T(*overrides, out=None, config=None):
    """seft-train arguments: the tiny config (or `config`) into `out` (default: inputs.out)."""
    def build(x):
        argv = train_argv(out(x) if out else x.out, *(o(x) if callable(o) else o for o in overrides))
        if config:
            argv[1] = str(x.dir / config)
        return argv
    return build


ROWS = [
    # -- seft-train: config values
    ("lr-inf", train, T("train.lr=.inf"), "train.lr: expected a finite number, got inf"),
    ("lr-nan", train, T("train.lr=.nan"), "train.lr: expected a finite number, got nan"),
    ("nm-vs-sparsity", train, T("prune.pattern=2:4", "prune.sparsity=0.7"),
     "prune.sparsity: 0.7 contradicts prune.pattern 2:4, which means sparsity 0.5"),
    ("duplicate-key", train, T(config="dup.yaml"), "line 10, column 3: the key 'sparsity' is given twice"),
    ("yaml-syntax", train, T(config="broken.yaml"), "is not valid YAML: line 2, column 1: expected the node"),
    ("tiny-heads", train, T("model.tiny.num_attention_heads=3"),
     "model.tiny.num_attention_heads: 3 does not divide hidden_size 64"),
    ("tiny-kv-heads", train, T("model.tiny.num_key_value_heads=3"),
     "model.tiny.num_key_value_heads: 3 does not divide num_attention_heads 4"),
    ("targets-regex", train, T("seft.targets=[(]"), "seft.targets: '(' is not a regular expression"),
    # -- seft-train: what needs the model's shape, checked before anything is written
    ("seq-len-tiny", train, T("data.seq_len=1024"),
     "data.seq_len: 1024 exceeds the model's max_position_embeddings 512 (model.tiny)"),
    ("seq-len-folder", train, T(lambda x: f"model.path={x.pruned}", "prune.method=none", "data.seq_len=600"),
     "data.seq_len: 600 exceeds the model's max_position_embeddings 512 ("),
    ("eval-seqlen", train, T(f"eval.ppl_data={TEXT}", "eval.seqlen=1024"),
     "eval.seqlen: 1024 exceeds the model's max_position_embeddings 512"),
    ("prune-seqlen-in-run", train, T("prune.method=wanda", f"prune.calib_data={TEXT}"),
     "prune.seqlen: 2048 exceeds the model's max_position_embeddings 512"),
    ("slots-over-budget", train, T("seft.lora_rank=20"),
     "seft.lora_rank: model.layers.0.self_attn.q_proj (64x64) would get K=2560 slots but has only "
     "2048 nonzeros (prune.sparsity 0.5)"),
    ("slots-over-budget-folder", train,
     T(lambda x: f"model.path={x.pruned}", "prune.method=none", "seft.lora_rank=20"),
     "would get K=2560 slots but has only 2048 nonzeros (in "),
    ("targets-match-nothing", train, T("seft.targets=[nothing]"),
     "seft.targets: ['nothing'] match no Linear module of this model (its Linear modules end in: "),
    ("nm-shape", train, T("prune.pattern=3:6"), "prune.pattern: 3:6 needs d_in divisible by 6"),
    # -- seft-train: files
    ("truncated-model", train, T(lambda x: f"model.path={x.truncated}", "prune.method=none"),
     "model.path: {truncated}/model.safetensors is truncated or not a safetensors file"),
    ("truncated-start", train, lambda x: T()(x) + ["--start-model", x.truncated],
     "--start-model: {truncated}/model.safetensors is truncated"),
    ("output-under-a-file", train, T(out=lambda x: x.dir / "a_file" / "run"),
     "--output-dir: cannot create {dir}/a_file/run: {dir}/a_file is a file"),
    ("not-utf8", train, T(lambda x: f"data.train={x.dir}/latin1.txt"),
     "data.train: {dir}/latin1.txt is not UTF-8 text (invalid continuation byte at byte 3)"),
    ("too-little-text", train, T(lambda x: f"data.train={x.dir}/short.txt"),
     "tokens make 0 example(s) of data.seq_len=128; need at least 1"),
    ("no-responses", train, T(lambda x: f"data.train={x.dir}/no_output.jsonl", "data.kind=instruction"),
     "data.train: none of the 2 rows of {dir}/no_output.jsonl has a response in 'output'"),
    # -- seft-prune
    ("prune-truncated", prune, lambda x: ["--model", x.truncated, "--method", "magnitude",
                                          "--out", str(x.out)],
     "--model: {truncated}/model.safetensors is truncated"),
    ("prune-targets-flag", prune, lambda x: ["--model", x.pruned, "--method", "magnitude",
                                             "--targets", "nothing", "--out", str(x.out)],
     "--targets: ['nothing'] match no Linear module"),
    ("prune-cli-seqlen", prune, lambda x: ["--model", x.pruned, "--method", "wanda", "--calib-data", TEXT,
                                       "--seqlen", "4096", "--out", str(x.out)],
     "prune.seqlen (--seqlen): 4096 exceeds the model's max_position_embeddings 512"),
    ("prune-config-nm", prune, lambda x: ["--config", str(x.dir / "nm.yaml"), "--model", x.pruned,
                                          "--out", str(x.out)],
     "prune.sparsity: 0.7 contradicts prune.pattern 2:4"),
    # -- seft-eval, seft-export, seft-plan
    ("eval-truncated", evaluate, lambda x: ["--model", x.truncated, "--ppl-data", TEXT, "--seqlen", "64"],
     "--model: {truncated}/model.safetensors is truncated"),
    ("export-out-is-a-file", export, lambda x: ["--run", str(x.dir), "--out", str(x.dir / "a_file")],
     "--out: {dir}/a_file is a file"),
    ("plan-yaml-syntax", plan, lambda x: ["--config", str(x.dir / "broken.yaml"), "--world-size", "1"],
     "--config: {dir}/broken.yaml is not valid YAML: line 2, column 1"),
    ("plan-duplicate-key", plan, lambda x: ["--config", str(x.dir / "dup.yaml"), "--world-size", "1"],
     "the key 'sparsity' is given twice"),
]


def snapshot(*folders) -> dict:
    return {str(p): p.stat().st_mtime_ns for f in folders for p in sorted(Path(f).rglob("*"))}


@pytest.mark.parametrize("name, command, argv, fragment", ROWS, ids=[r[0] for r in ROWS])
def test_bad_input_is_one_named_line_and_nothing_is_written(inputs, capsys, name, command, argv,
                                                           fragment):
    if name == "export-out-is-a-file":
        (inputs.dir / "config.yaml").write_text(Path(TINY).read_text())  # a run folder to export
    before = snapshot(inputs.dir, inputs.pruned, inputs.truncated)
    rc = command.main(argv(inputs))
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert rc == 2 and "Traceback" not in err, err[-3000:]
    expected = fragment.format(dir=inputs.dir, truncated=inputs.truncated)
    assert len(lines) == 1 and expected in lines[0], (lines, expected)
    assert not inputs.out.exists()
    assert snapshot(inputs.dir, inputs.pruned, inputs.truncated) == before  # nothing changed


def test_the_console_script_prints_the_line_not_a_traceback(inputs, tmp_path):
    out = tmp_path / "run"
    res = subprocess.run([sys.executable, str(ROOT / "launch" / "train.py"), *train_argv(
        out, f"model.path={inputs.truncated}", "prune.method=none")], capture_output=True, text=True)
    assert res.returncode == 2 and "Traceback" not in res.stderr, res.stderr[-3000:]
    assert res.stderr.strip().splitlines()[-1].startswith(
        f"error: model.path: {inputs.truncated}/model.safetensors is truncated")
    assert not out.exists()


def test_a_refused_start_leaves_the_folder_ready_for_the_fixed_command(inputs, fast, tmp_path):
    """The checks that need the model come before the first write: the same folder takes the
    corrected command, as a new run (no --resume, no 'config differs')."""
    out = tmp_path / "run"
    assert train.main(train_argv(out, *fast, "seft.lora_rank=20")) == 2
    assert not out.exists()
    out.mkdir()  # even an empty folder made by hand is a new run's
    assert train.main(train_argv(out, *fast, "train.steps=1", "seft.lora_rank=2")) == 0
    assert (out / "report.json").is_file()


def test_rows_without_a_response_are_dropped_and_counted(tmp_path, inputs):
    from seft_scale.config import DataConfig
    from seft_scale.data import build_data
    from seft_scale.model import train_tokenizer
    source = ROOT / "configs" / "data" / "arith_alpaca.jsonl"
    rows = [json.loads(x) for x in source.read_text().splitlines()]
    rows[0]["output"], rows[1]["output"] = None, ""
    del rows[2]["output"]
    path = tmp_path / "rows.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    tok = train_tokenizer(Path(TEXT).read_text()[:20000], 384)
    cfg = DataConfig(train=str(path), kind="instruction", seq_len=256, val_fraction=0.0,
                     cache_dir=str(tmp_path / "cache"))
    stats = build_data(cfg, tok).stats
    assert (stats["rows"], stats["no_response"], stats["dropped"], stats["train_examples"]) == \
        (len(rows), 3, 3, len(rows) - 3)
    shutil.rmtree(tmp_path / "cache")
