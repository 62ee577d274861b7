"""The package outside the checkout: a wheel built from the tree, installed (not editable) into a
fresh environment, imports from there, finds its ZeRO-3 default as package data, and runs a
command from another folder; the shipped default is the same as configs/ds/zero3.json."""
import importlib.metadata
import json
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

from seft_scale.backends.ds_config import default_ds_config
from tests.conftest import ROOT


def test_the_shipped_zero3_default_is_configs_ds_zero3():
    ours = json.loads((ROOT / "configs" / "ds" / "zero3.json").read_text())
    shipped = json.loads((ROOT / "seft_scale" / "backends" / "zero3.json").read_text())
    assert ours == shipped == default_ds_config()


CHECK = """
import runpy, sys
import seft_scale.config
from seft_scale.backends.ds_config import default_ds_config
where = {where!r}
assert all(p.startswith(where) for p in seft_scale.__path__), list(seft_scale.__path__)
assert seft_scale.config.__file__.startswith(where), seft_scale.config.__file__
assert default_ds_config()["zero_optimization"]["stage"] == 3
assert not any(p.rstrip("/") == {root!r} for p in sys.path), sys.path
sys.argv = ["seft-plan", "--config", "llama.yaml", "--world-size", "8", "--backend", "fsdp"]
runpy.run_module("seft_scale.cli.plan", run_name="__main__", alter_sys=True)  # = python -m
"""


def setuptools_version() -> tuple[int, ...]:
    try:
        return tuple(int(p) for p in importlib.metadata.version("setuptools").split(".")[:2])
    except importlib.metadata.PackageNotFoundError:
        return (0,)


@pytest.mark.slow
@pytest.mark.skipif(setuptools_version() < (77,), reason="building the wheel offline needs "
                    "setuptools>=77 (pyproject.toml's build requirement) in this environment")
def test_a_wheel_installed_outside_the_checkout_works(tmp_path):
    # the tree as a user has it, without build outputs (the build writes beside the sources)
    src = tmp_path / "src"
    shutil.copytree(ROOT, src, ignore=shutil.ignore_patterns(
        ".git", ".venv", "__pycache__", "*.egg-info", "build", "dist", "out", "runs", ".*_cache"))
    run = lambda *cmd, **kw: subprocess.run(cmd, capture_output=True, text=True, **kw)  # noqa: E731
    res = run(sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index",
              "-q", "-w", str(tmp_path / "wheels"), str(src))
    assert res.returncode == 0, res.stderr[-3000:]
    wheel, = (tmp_path / "wheels").glob("seft_scale-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    modules = {p.relative_to(ROOT).as_posix() for p in (ROOT / "seft_scale").rglob("*.py")}
    assert modules <= set(names), sorted(modules - set(names))  # every module, namespace folders too
    assert "seft_scale/backends/zero3.json" in names
    assert all(n.startswith(("seft_scale/", "seft_scale-")) for n in names), names  # no tests/, launch/

    # a fresh environment: its own site-packages, plus this one's (the dependencies) through a
    # .pth line, which adds the folder without running its .pth files (an editable install's
    # finder among them), so seft_scale can only come from the wheel
    venv = tmp_path / "venv"
    res = run(sys.executable, "-m", "venv", "--without-pip", str(venv))
    assert res.returncode == 0, res.stderr
    python = venv / "bin" / "python"
    site = Path(run(str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])")
                .stdout.strip())
    (site / "dependencies.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    res = run(str(python), "-m", "pip", "install", "--no-deps", "--no-index", "--ignore-installed", "-q",
              str(wheel))
    assert res.returncode == 0, res.stderr[-3000:]
    for script in ("seft-train", "seft-prune", "seft-eval", "seft-export", "seft-compare", "seft-plan"):
        assert (venv / "bin" / script).is_file(), script

    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    shutil.copy(ROOT / "configs" / "models" / "llama-2-7b.yaml", elsewhere / "llama.yaml")
    env = {k: v for k, v in __import__("os").environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
    res = run(str(python), "-c", CHECK.format(where=str(site / "seft_scale"), root=str(ROOT)),
              cwd=elsewhere, env=env)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "PEAK" in res.stdout and "fsdp" in res.stdout.lower(), res.stdout
