"""The run config (seft_scale/config.py): YAML numbers as people write them, overrides, unknown
keys and wrong types named, every section's ranges, the parsed N:M pattern, paths resolved from
the config file's folder and `asset:` names, and a docstring on every field."""
import ast
import dataclasses
import subprocess
import sys
import typing
from pathlib import Path

import pytest

from seft_scale import assets
from seft_scale import config as config_module
from seft_scale.cli.train import main as train_main
from seft_scale.config import (BaselineConfig, DataConfig, EvalConfig, ModelConfig, PruneConfig, RunConfig,
                               SeftConfig, TinyModelConfig, TrainConfig, from_dict, load_config, parse_pattern,
                               parse_yaml)
from seft_scale.errors import ConfigError
from tests.conftest import ROOT


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


# ------------------------------------------------------------------------------ YAML numbers

@pytest.mark.parametrize("text, value", [
    ("2:4", "2:4"),  # YAML 1.1 reads base-60: 124
    ("1:2:3", "1:2:3"),
    ("1e-3", 1e-3),  # YAML 1.1 reads a string
    ("3.0e-3", 3e-3), ("-2E+2", -200.0), (".5", 0.5), ("1.", 1.0), ("1_000", 1000),
    ("10", 10), ("-7", -7), ("0", 0),
    ("true", True), ("null", None), ("unstructured", "unstructured"),
])
def test_yaml_numbers_as_people_write_them(text, value):
    got = parse_yaml(f"v: {text}")["v"]
    assert got == value and type(got) is type(value)


def test_a_config_file_keeps_patterns_and_reads_exponents(tmp_path):
    cfg = load_config(str(write(tmp_path / "r.yaml", "prune: {pattern: 2:4}\ntrain: {lr: 1e-3}\n"
                                "data: {train: someone/corpus}\n")))
    assert cfg.prune.pattern == "2:4" and cfg.prune.nm == (2, 4)
    assert cfg.train.lr == 1e-3 and isinstance(cfg.train.lr, float)


# -------------------------------------------------------------------------------- overrides

def test_overrides(tiny_yaml):
    cfg = load_config(tiny_yaml, ["train.steps=7", "train.lr=2e-4", "seft.lora_rank=null",
                                  "seft.density=0.01", "seft.targets=[q_proj, v_proj]",
                                  "prune.pattern=4:8", "model.tiny.hidden_size=32",
                                  "train.check_invariants=true", "method=static"])
    assert (cfg.train.steps, cfg.train.lr, cfg.seft.lora_rank, cfg.seft.density) == (7, 2e-4, None, 0.01)
    assert cfg.seft.targets == ["q_proj", "v_proj"] and cfg.prune.nm == (4, 8)
    assert cfg.model.tiny.hidden_size == 32 and cfg.train.check_invariants is True
    assert cfg.method == "static"
    assert cfg.train.micro_batch_size == 8  # untouched keys keep the file's value
    assert isinstance(load_config(tiny_yaml, ["train.lr=1"]).train.lr, float)  # int -> float
    # a value that is no YAML is the string itself
    assert load_config(tiny_yaml, ["data.train=[unclosed"], check_paths=False).data.train == "[unclosed"
    assert load_config(None, ["data.train=x/y"]).data.train == "x/y"  # no file: defaults + overrides


def test_options_may_follow_the_overrides():
    """`train.py ... train.steps=7 --resume` and `compare.py ... seft.x=y --methods seft` parse as
    users write them (argparse's plain parse_args rejects options after the positionals)."""
    from seft_scale.cli.train import parse_args
    args = parse_args(["--config", "c.yaml", "train.steps=7", "--output-dir", "o", "seft.window=2", "--resume"])
    assert args.overrides == ["train.steps=7", "seft.window=2"] and args.output_dir == "o" and args.resume


@pytest.mark.parametrize("override, message", [
    ("train.steps", "override 'train.steps': expected section.key=value"),
    ("train.steps.x=1", "override 'train.steps.x=1': steps is not a section"),
    ("data.train=", "data.train: is required"),
])
def test_bad_overrides_are_named(tiny_yaml, override, message):
    with pytest.raises(ConfigError) as e:
        load_config(tiny_yaml, [override])
    assert message in str(e.value)


# ------------------------------------------------------------------ unknown keys, wrong types

@pytest.mark.parametrize("data, message", [
    ({"bogus": 1}, "bogus: unknown key; valid keys: method, model, prune"),
    ({"train": {"stepz": 1}}, "train.stepz: unknown key; valid keys of train: steps, micro_batch_size"),
    ({"model": {"tiny": {"hiden_size": 8}}}, "model.tiny.hiden_size: unknown key; valid keys of "
                                             "model.tiny: hidden_size"),
    ({"train": {"steps": "abc"}}, "train.steps: expected int, got 'abc'"),
    ({"train": {"steps": 2.5}}, "train.steps: expected int, got 2.5"),
    ({"train": {"steps": True}}, "train.steps: expected int, got True"),
    ({"train": {"lr": "fast"}}, "train.lr: expected float, got 'fast'"),
    ({"train": {"check_invariants": 1}}, "train.check_invariants: expected true or false, got 1"),
    ({"train": 5}, "train: expected a mapping of TrainConfig fields, got 5"),
    ({"seft": {"targets": "q_proj"}}, "seft.targets: expected a list, got 'q_proj'"),
    ({"seft": {"targets": ["q_proj", 3]}}, "seft.targets[1]: expected str, got 3"),
    ({"seft": {"drop_schedule": "step"}}, "seft.drop_schedule: 'step' is not one of 'cosine', "
                                          "'linear', 'constant'"),
    ({"eval": {"stages": ["pruned", "later"]}}, "eval.stages[1]: 'later' is not one of"),
    ({"method": "lora"}, "method: 'lora' is not one of 'seft', 'static'"),
    ({"data": {"subset": 3}}, "data.subset: expected str, got 3"),  # Optional[str]
])
def test_unknown_keys_and_wrong_types_are_named(data, message):
    with pytest.raises(ConfigError) as e:
        from_dict(RunConfig, data)
    assert message in str(e.value)


@pytest.mark.parametrize("text, message", [
    ("train: [1, 2\n", "is not valid YAML"),
    ("- a\n- b\n", "must hold a mapping of sections"),
])
def test_unreadable_config_files_are_named(tmp_path, text, message):
    path = write(tmp_path / "bad.yaml", text)
    with pytest.raises(ConfigError, match=f"--config: {path}.*{message}"):
        load_config(str(path))
    with pytest.raises(ConfigError, match="--config: .*nowhere.yaml does not exist"):
        load_config(str(tmp_path / "nowhere.yaml"))


# ------------------------------------------------------- bad configs from the command line

@pytest.mark.parametrize("override, key", [
    ("seft.drop_rat=0.1", "seft.drop_rat"),
    ("seft.drop_rate=1.5", "seft.drop_rate"),
    ("train.steps=abc", "train.steps"),
    ("seft.drop_schedule=step", "seft.drop_schedule"),
    ("prune.pattern=4:2", "prune.pattern"),
    ("data.train=/nonexistent.txt", "data.train"),
    ("model.path=/tmp", "model.path"),
    ("seft.density=0.1", "seft.lora_rank/seft.density"),
])
def test_bad_config_named_error_nothing_written(tiny_yaml, tmp_path, override, key, capsys):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        load_config(tiny_yaml, [override])
    out = tmp_path / "never"
    assert train_main(["--config", tiny_yaml, "--output-dir", str(out), override]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and key in err and len(err.strip().splitlines()) == 1
    assert not out.exists()


@pytest.mark.slow
def test_bad_config_through_the_launch_script(tiny_yaml, tmp_path):
    """The command as README types it: one line on stderr, exit status 2, nothing written."""
    out = tmp_path / "never"
    res = subprocess.run([sys.executable, str(ROOT / "launch" / "train.py"), "--config", tiny_yaml,
                          "--output-dir", str(out), "seft.drop_rate=1.5"], capture_output=True, text=True)
    assert res.returncode == 2 and res.stderr.startswith("error: seft.drop_rate: must be in [0, 1]")
    assert not out.exists()


# ------------------------------------------------------------------- every section's ranges

RANGES = [  # (section, field values, key the error names)
    (PruneConfig, {"pattern": "4:2"}, "prune.pattern"),
    (PruneConfig, {"pattern": "2-4"}, "prune.pattern"),
    (PruneConfig, {"sparsity": 1.0}, "prune.sparsity"),
    (PruneConfig, {"sparsity": -0.1}, "prune.sparsity"),
    (PruneConfig, {"nsamples": 0}, "prune.nsamples"),
    (PruneConfig, {"seqlen": 1}, "prune.seqlen"),
    (PruneConfig, {"block_size": 0}, "prune.block_size"),
    (PruneConfig, {"damp": 0.0}, "prune.damp"),
    (PruneConfig, {"method": "wanda"}, "prune.calib_data"),
    (PruneConfig, {"method": "sparsegpt", "calib_data": ""}, "prune.calib_data"),
    (SeftConfig, {"density": 0.1}, "seft.lora_rank/seft.density"),
    (SeftConfig, {"lora_rank": None}, "seft.lora_rank/seft.density"),
    (SeftConfig, {"lora_rank": 0}, "seft.lora_rank"),
    (SeftConfig, {"lora_rank": None, "density": 0.0}, "seft.density"),
    (SeftConfig, {"lora_rank": None, "density": 1.5}, "seft.density"),
    (SeftConfig, {"update_interval": 0}, "seft.update_interval"),
    (SeftConfig, {"window": 0}, "seft.window"),
    (SeftConfig, {"window": 11, "update_interval": 10}, "seft.window"),
    (SeftConfig, {"drop_rate": 1.5}, "seft.drop_rate"),
    (SeftConfig, {"drop_rate": -0.5}, "seft.drop_rate"),
    (SeftConfig, {"gather_cost_ratio": 0.0}, "seft.gather_cost_ratio"),
    (SeftConfig, {"targets": []}, "seft.targets"),
    (DataConfig, {"seq_len": 1}, "data.seq_len"),
    (DataConfig, {"val_fraction": 1.0}, "data.val_fraction"),
    (DataConfig, {"max_examples": 0}, "data.max_examples"),
    (DataConfig, {"train": ""}, "data.train"),
    *[(TrainConfig, {k: 0}, f"train.{k}")
      for k in ("steps", "micro_batch_size", "grad_accum", "log_every", "keep_checkpoints")],
    *[(TrainConfig, {k: -1}, f"train.{k}")
      for k in ("warmup_steps", "checkpoint_every", "eval_batches", "max_grad_norm", "weight_decay")],
    (TrainConfig, {"lr": 0.0}, "train.lr"),
    (TrainConfig, {"min_lr_ratio": 1.5}, "train.min_lr_ratio"),
    (TrainConfig, {"beta1": 1.0}, "train.beta1/beta2"),
    (TrainConfig, {"beta2": -0.1}, "train.beta1/beta2"),
    (TrainConfig, {"eps": 0.0}, "train.eps"),
    (EvalConfig, {"seqlen": 1}, "eval.seqlen"),
    (EvalConfig, {"max_windows": 0}, "eval.max_windows"),
    (EvalConfig, {"limit": 0}, "eval.limit"),
    (BaselineConfig, {"lora_rank": 0}, "baseline.lora_rank"),
    (BaselineConfig, {"lora_alpha": 0.0}, "baseline.lora_alpha"),
    (BaselineConfig, {"lora_dropout": 1.0}, "baseline.lora_dropout"),
    (BaselineConfig, {"spp_groups": 0}, "baseline.spp_groups"),
    (ModelConfig, {"tiny": TinyModelConfig(hidden_size=0)}, "model.tiny.hidden_size"),
    (ModelConfig, {"tiny": TinyModelConfig(num_attention_heads=3)}, "model.tiny.num_attention_heads"),
]
VALID = {DataConfig: {"train": "x.txt"}}  # the defaults of every other section are valid


@pytest.mark.parametrize("section, values, key", RANGES,
                         ids=[f"{key}={values}" for _, values, key in RANGES])
def test_each_range_error_names_its_key(section, values, key):
    section(**VALID.get(section, {})).validate()
    bad = section(**{**VALID.get(section, {}), **values})
    with pytest.raises(ConfigError) as e:
        bad.validate()
    assert str(e.value).startswith(f"{key}: ")
    # and RunConfig.validate checks the section
    run = RunConfig(data=DataConfig(train="x.txt"))
    field = next(k for k, t in typing.get_type_hints(RunConfig).items() if t is section)
    setattr(run, field, bad)
    with pytest.raises(ConfigError, match=f"^{key}: "):
        run.validate()


def test_every_section_with_ranges_is_covered():
    sections = {t for t in typing.get_type_hints(RunConfig).values()
                if dataclasses.is_dataclass(t) and "validate" in vars(t)}
    assert sections == {s for s, _, _ in RANGES}


@pytest.mark.parametrize("fields, key", [
    ({"method": "sqft", "seft": SeftConfig(lora_rank=None, density=0.01)}, "baseline.lora_rank"),
    ({"method": "lora_star", "seft": SeftConfig(lora_rank=None, density=0.01),
      "prune": PruneConfig(method="magnitude")}, "baseline.lora_rank"),
    ({"method": "lora_star"}, "baseline.reprune"),  # a start pruned elsewhere names its re-pruner
    ({"eval": EvalConfig(stages=["dense", "repaired"])}, "eval.stages"),
])
def test_rules_across_sections_name_the_key(fields, key):
    with pytest.raises(ConfigError, match=f"^{key}: "):
        RunConfig(data=DataConfig(train="x.txt"), **fields).validate()
    if key == "baseline.lora_rank":  # a rank of its own is enough
        RunConfig(data=DataConfig(train="x.txt"), baseline=BaselineConfig(lora_rank=4), **fields).validate()


# ------------------------------------------------------------------------------- N:M pattern

@pytest.mark.parametrize("pattern, nm", [("unstructured", None), ("2:4", (2, 4)), ("4:8", (4, 8)),
                                         ("1:2", (1, 2))])
def test_prune_config_hands_out_the_parsed_pattern(pattern, nm):
    assert PruneConfig(pattern=pattern).validate().nm == nm == parse_pattern(pattern)


@pytest.mark.parametrize("pattern", ["4:2", "2:2", "0:4", "2:4:8", "a:b", "2/4", "", "dense"])
def test_bad_patterns(pattern):
    with pytest.raises(ValueError):
        parse_pattern(pattern)
    with pytest.raises(ConfigError, match="^prune.pattern: "):
        PruneConfig(pattern=pattern).validate()


# ------------------------------------------------------------------------------------ paths

def test_paths_resolve_against_the_config_folder(tmp_path, monkeypatch):
    conf = tmp_path / "project" / "configs"
    write(tmp_path / "project" / "data" / "train.jsonl", '{"text": "a"}\n')
    write(conf / "held.txt", "held out")
    write(conf / "calib.txt", "calibration")
    write(conf / "tasks" / "t.yaml", "task: t\n")
    write(conf / "model" / "config.json", "{}")
    cfg_file = write(conf / "run.yaml", """
model: {path: model}
prune: {method: wanda, calib_data: calib.txt}
data: {train: ../data/train.jsonl, validation: held.txt}
eval: {ppl_data: held.txt, include_path: tasks}
""")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    cfg = load_config(str(cfg_file))
    assert cfg.model.path == str(conf / "model")
    assert cfg.prune.calib_data == str(conf / "calib.txt")
    assert cfg.data.train == str(tmp_path / "project" / "data" / "train.jsonl")
    assert cfg.data.validation == cfg.eval.ppl_data == str(conf / "held.txt")
    assert cfg.eval.include_path == str(conf / "tasks")
    # the working directory is tried first
    write(elsewhere / "held.txt", "here")
    assert load_config(str(cfg_file)).eval.ppl_data == str(elsewhere / "held.txt")
    # unchecked, paths stay as written (a finished run exports without its data)
    assert load_config(str(cfg_file), check_paths=False).data.train == "../data/train.jsonl"


@pytest.mark.parametrize("yaml_text, message", [
    ("data: {train: missing.txt}", "data.train: missing.txt does not exist"),
    ("data: {train: t.txt, validation: ./gone.txt}", "data.validation: ./gone.txt does not exist"),
    ("data: {train: t.txt}\neval: {ppl_data: gone.txt}", "eval.ppl_data: gone.txt does not exist"),
    ("data: {train: t.txt}\neval: {include_path: gone}", "eval.include_path: gone does not exist"),
    ("data: {train: t.txt}\nprune: {method: sparsegpt, calib_data: gone.txt}",
     "prune.calib_data: gone.txt does not exist"),
    ("data: {train: t.txt}\nmodel: {path: .}", "is not a Hugging Face model folder (no config.json)"),
    ("data: {train: t.bin}", "data.train: cannot tell the format"),
])
def test_path_errors_name_the_key(tmp_path, monkeypatch, yaml_text, message):
    monkeypatch.chdir(tmp_path)
    write(tmp_path / "t.txt", "text")
    write(tmp_path / "t.bin", "text")
    with pytest.raises(ConfigError) as e:
        load_config(str(write(tmp_path / "run.yaml", yaml_text)))
    assert message in str(e.value)


def test_asset_names_resolve_to_the_cached_assets(tmp_path, monkeypatch):
    built = write(tmp_path / "cache" / "train.txt", "cached text")
    monkeypatch.setitem(assets.ASSETS, "shakespeare/train", lambda: built)
    cfg = load_config(None, ["data.train=asset:shakespeare/train",
                             "eval.ppl_data=asset:shakespeare/train"])
    assert cfg.data.train == cfg.eval.ppl_data == str(built)
    with pytest.raises(ConfigError) as e:
        load_config(None, ["data.train=asset:shakespear/train"])
    assert str(e.value).startswith("data.train: asset:shakespear/train is not an asset; known: ")
    assert "shakespeare/train" in str(e.value)


# ------------------------------------------------------------------------------- docstrings

def undocumented_fields(source: str) -> list[str]:
    """Fields of the @dataclass classes in `source` with no docstring right below them, and
    such classes without a docstring of their own."""
    missing = []
    for node in ast.walk(ast.parse(source)):
        decorators = [d.func if isinstance(d, ast.Call) else d for d in getattr(node, "decorator_list", [])]
        if not isinstance(node, ast.ClassDef) or not any(
                getattr(d, "id", getattr(d, "attr", None)) == "dataclass" for d in decorators):
            continue
        if ast.get_docstring(node) is None:
            missing.append(node.name)
        for stmt, after in zip(node.body, node.body[1:] + [None]):
            if isinstance(stmt, ast.AnnAssign) and isinstance(stmt.target, ast.Name):
                documented = isinstance(after, ast.Expr) and isinstance(after.value, ast.Constant) \
                    and isinstance(after.value.value, str) and after.value.value.strip()
                if not documented:
                    missing.append(f"{node.name}.{stmt.target.id}")
    return missing


def test_every_config_field_has_a_docstring():
    source = Path(config_module.__file__).read_text()
    assert undocumented_fields(source) == []
    classes = [n for n in ast.walk(ast.parse(source)) if isinstance(n, ast.ClassDef)]
    fields = sum(isinstance(s, ast.AnnAssign) for c in classes for s in c.body)
    assert fields == sum(len(dataclasses.fields(c)) for c in (
        RunConfig, *[t for t in typing.get_type_hints(RunConfig).values() if dataclasses.is_dataclass(t)],
        config_module.TinyModelConfig))  # every dataclass of config.py was read


def test_the_docstring_check_finds_a_missing_one():
    source = ('@dataclass\nclass A:\n    """A."""\n    x: int = 1\n    """X."""\n    y: int = 2\n'
              '    z: int = 3\n    """"""\n\n@dataclasses.dataclass(frozen=True)\nclass B:\n'
              '    w: int = 0\n    """W."""\n')
    assert undocumented_fields(source) == ["A.y", "A.z", "B"]
