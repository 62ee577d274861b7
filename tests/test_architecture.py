"""The package's structure, read from its source with `ast` (nothing here imports the modules):

* no import circle among seft_scale's modules at module level (importing a.b.c runs the
  __init__ of a and a.b too, so those count);
* no file imports a private (leading underscore) name of another module;
* the layers: seft/ knows no backend, baseline, torch.distributed or DeepSpeed; backends/ know
  nothing of SEFT or the baselines; errors.py and paths.py are the bottom floor;
* no file cites documents that are not in the repo or tracker issue numbers;
* README's Architecture tree names every module and sub-package, and nothing that is gone.

Every checker takes the root of a tree, so the tests at the end plant each kind of violation in
a small tree under tmp_path and see the same checker catch it.
"""
from __future__ import annotations

import ast
import re
import subprocess
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Iterator, Optional

import pytest

from tests.conftest import ROOT

PACKAGE = "seft_scale"


# ---------------------------------------------------------------------------------- reading

@dataclass(frozen=True)
class Import:
    """One import statement's view from the importing module."""

    module: str
    """The module imported from, absolute (`from . import x` in a.b.c gives a.b)."""
    names: tuple[str, ...]
    """The names of a `from` import; empty for `import module`."""
    line: int
    where: str
    """module (runs at import), function (runs when called) or type_checking."""


def module_name(root: Path, path: Path) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def python_files(root: Path, folder: str) -> Iterator[Path]:
    base = root / folder
    if base.is_dir():
        yield from sorted(p for p in base.rglob("*.py") if "__pycache__" not in p.parts)


def is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or \
        (isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def absolute(module: Optional[str], level: int, importer: str, is_package: bool) -> str:
    if not level:
        return module or ""
    parts = importer.split(".") if is_package else importer.split(".")[:-1]
    parts = parts[: len(parts) - (level - 1)]
    return ".".join(parts + ([module] if module else []))


def imports_of(root: Path, path: Path) -> list[Import]:
    """Every import statement of a file, tagged by when it runs."""
    name, is_package = module_name(root, path), path.name == "__init__.py"
    out: list[Import] = []

    def visit(nodes: list[ast.stmt], where: str) -> None:
        for node in nodes:
            if isinstance(node, ast.Import):
                out.extend(Import(a.name, (), node.lineno, where) for a in node.names)
            elif isinstance(node, ast.ImportFrom):
                out.append(Import(absolute(node.module, node.level, name, is_package),
                                  tuple(a.name for a in node.names), node.lineno, where))
            elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                visit(node.body, "function" if where == "module" else where)
            elif isinstance(node, ast.If) and is_type_checking(node.test):
                visit(node.body, "type_checking")
                visit(node.orelse, where)
            else:  # class bodies and if / try / with / for blocks at module level run at import
                blocks = [getattr(node, f, []) for f in ("body", "orelse", "finalbody")]
                blocks += [h.body for h in getattr(node, "handlers", [])]
                for block in blocks:
                    visit([b for b in block if isinstance(b, ast.stmt)], where)

    visit(ast.parse(path.read_text(), str(path)).body, "module")
    return out


def package_modules(root: Path, package: str = PACKAGE) -> dict[str, Path]:
    return {module_name(root, p): p for p in python_files(root, package)}


def import_targets(imp: Import, importer: str, modules: dict[str, Path]) -> set[str]:
    """The package modules an import runs: the module, each submodule named in a `from`
    import, and the __init__ of every package above them that the importer is not inside of
    (the importer's own packages are already being imported when it runs)."""
    if imp.names:
        subs = {f"{imp.module}.{n}" for n in imp.names if f"{imp.module}.{n}" in modules}
        named = subs if len(subs) == len(imp.names) else subs | {imp.module}
    else:
        named = {imp.module}
    targets = set()
    for mod in named:
        parts = mod.split(".")
        for i in range(1, len(parts) + 1):
            up = ".".join(parts[:i])
            implicit = i < len(parts)  # a package above the module named
            inside = importer == up or importer.startswith(up + ".")
            if up in modules and not (implicit and inside):
                targets.add(up)
    targets.discard(importer)
    return targets


def import_graph(root: Path, package: str = PACKAGE,
                 kinds: tuple[str, ...] = ("module",)) -> dict[str, dict[str, int]]:
    """importer -> {imported package module: line}, over imports of the given kinds."""
    modules = package_modules(root, package)
    graph: dict[str, dict[str, int]] = {}
    for name, path in modules.items():
        edges = graph.setdefault(name, {})
        for imp in imports_of(root, path):
            if imp.where in kinds:
                for t in import_targets(imp, name, modules):
                    edges.setdefault(t, imp.line)
    return graph


# --------------------------------------------------------------------------------- checkers

def import_cycles(root: Path, package: str = PACKAGE, kinds: tuple[str, ...] = ("module",)) -> list[str]:
    """Each import circle through imports of `kinds`, as 'a (line) -> b (line) -> a'."""
    graph = import_graph(root, package, kinds)
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[list[str]] = []

    def strongconnect(v: str) -> None:  # Tarjan's strongly connected components
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, {})):
            if w not in index:
                strongconnect(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                components.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            strongconnect(v)
    cycles = []
    for comp in components:  # one concrete circle through the component's first module
        inside, start = set(comp), comp[0]
        paths = {start: [start]}
        queue = [start]
        while queue:
            v = queue.pop(0)
            for w in sorted(graph[v]):
                if w == start:
                    path = paths[v] + [start]
                    cycles.append(" -> ".join(f"{a} (line {graph[a][b]})" if b else a
                                              for a, b in zip(path, path[1:] + [None])))
                    queue = []
                    break
                if w in inside and w not in paths:
                    paths[w] = paths[v] + [w]
                    queue.append(w)
    return cycles


def is_private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def private_imports(root: Path, folders: tuple[str, ...] = (PACKAGE, "launch", "tests")) -> list[str]:
    """`from m import _x`, `import m._x`, and `m._x` on an imported project module m, in every
    file of `folders` (another module's underscore names are its own business). Attributes of
    other libraries' modules are not checked: the standard library documents some underscore
    names as public (os._exit, sys._getframe)."""
    found = []
    for folder in folders:
        for path in python_files(root, folder):
            rel = path.relative_to(root)
            tree = ast.parse(path.read_text(), str(path))
            aliases: set[str] = set()
            for node in ast.walk(tree):
                if isinstance(node, ast.ImportFrom) and node.module != "__future__":
                    for a in node.names:
                        if is_private(a.name):
                            found.append(f"{rel}:{node.lineno}: imports {a.name} from "
                                         f"{node.module or '.' * node.level}")
                        if (root / Path(*(node.module or "").split("."), a.name)).exists() or \
                                (root / Path(*(node.module or "").split("."), a.name + ".py")).exists():
                            aliases.add(a.asname or a.name)  # a project module imported by name
                elif isinstance(node, ast.Import):
                    for a in node.names:
                        if any(is_private(p) for p in a.name.split(".")):
                            found.append(f"{rel}:{node.lineno}: imports the private module {a.name}")
                        if (root / a.name.split(".")[0]).is_dir():  # a project module
                            aliases.add(a.asname or a.name.split(".")[0])
            for node in ast.walk(tree):
                if isinstance(node, ast.Attribute) and is_private(node.attr) and \
                        isinstance(node.value, ast.Name) and node.value.id in aliases:
                    found.append(f"{rel}:{node.lineno}: uses {node.value.id}.{node.attr}")
    return found


# (package folder, forbidden import prefixes, kinds of import that count)
LAYERS = [
    (f"{PACKAGE}.seft", (f"{PACKAGE}.backends", f"{PACKAGE}.baselines", "torch.distributed",
                         "deepspeed"), ("module", "function")),
    (f"{PACKAGE}.backends", (f"{PACKAGE}.seft", f"{PACKAGE}.baselines"),
     ("module", "function", "type_checking")),
]
# The bottom floor: what each may import of the package, at import time and inside functions.
FLOOR = {f"{PACKAGE}.errors": ((), ()),
         f"{PACKAGE}.paths": ((f"{PACKAGE}.errors",), (f"{PACKAGE}.errors", f"{PACKAGE}.assets"))}


def matches(module: str, prefixes: tuple[str, ...]) -> bool:
    return any(module == p or module.startswith(p + ".") for p in prefixes)


def reached(imp: Import) -> set[str]:
    """What an import statement reaches, as dotted names (`from torch import distributed`
    reaches torch and torch.distributed)."""
    return {imp.module} | {f"{imp.module}.{n}" for n in imp.names}


def layer_violations(root: Path, package: str = PACKAGE) -> list[str]:
    """Imports across the layers, direct or through other package modules (at import time)."""
    modules = package_modules(root, package)
    graph = import_graph(root, package)
    found = []
    for layer, forbidden, kinds in LAYERS:
        for name in (m for m in modules if matches(m, (layer,))):
            for imp in imports_of(root, modules[name]):
                bad = sorted(r for r in reached(imp) if matches(r, forbidden))
                if imp.where in kinds and bad:
                    found.append(f"{name}:{imp.line}: imports {bad[0]} ({imp.where} level)")
            # through other modules: everything reachable at import time, and what they import
            chain = {name: [name]}
            queue = [name]
            while queue:
                v = queue.pop(0)
                for w in sorted(graph.get(v, {})):
                    if w not in chain:
                        chain[w] = chain[v] + [w]
                        queue.append(w)
            for via, path in chain.items():
                if via == name or matches(via, (layer,)):
                    continue
                hits = sorted(r for imp in imports_of(root, modules[via]) if imp.where == "module"
                              for r in reached(imp) if matches(r, forbidden))
                if matches(via, forbidden) or hits:
                    found.append(f"{name}: imports {via if matches(via, forbidden) else hits[0]} "
                                 f"through {' -> '.join(path)}")
    for name, (at_import, in_functions) in FLOOR.items():
        if name not in modules:
            continue
        for imp in imports_of(root, modules[name]):
            allowed = at_import if imp.where == "module" else in_functions
            for t in sorted(import_targets(imp, name, modules)):
                if not matches(t, allowed):
                    found.append(f"{name}:{imp.line}: the bottom floor imports {t}")
    return found


STALE = re.compile(r"\b(design|method|platform)\.md\b|\bissue\s*#?\s*\d+", re.IGNORECASE)
SKIP_DIRS = {".git", ".venv", "venv", "__pycache__", ".pytest_cache", ".ruff_cache"}
SKIP_TOP = {"out", "runs", "build", "dist"}  # outputs at the top of a checkout (.gitignore)


def repo_files(root: Path) -> list[Path]:
    """The files git tracks or would track (untracked, not ignored); every file without git."""
    if (root / ".git").exists():
        res = subprocess.run(["git", "-C", str(root), "ls-files", "-z", "--cached", "--others",
                              "--exclude-standard"], capture_output=True, text=True, check=True)
        return sorted(root / f for f in res.stdout.split("\0") if f and (root / f).is_file())
    def skipped(rel: Path) -> bool:
        return rel.parts[0] in SKIP_TOP or any(
            part in SKIP_DIRS or part.endswith(".egg-info") for part in rel.parts)
    return sorted(p for p in root.rglob("*") if p.is_file() and not skipped(p.relative_to(root)))


def stale_references(root: Path) -> list[str]:
    """Lines that cite background notes outside the repo or tracker issues by number."""
    found = []
    for path in repo_files(root):
        data = path.read_bytes()
        if b"\0" in data:
            continue  # binary
        for i, line in enumerate(data.decode("utf-8", "replace").splitlines(), 1):
            m = STALE.search(line)
            if m:
                found.append(f"{path.relative_to(root)}:{i}: {m.group(0)!r}")
    return found


def readme_mismatches(root: Path, package: str = PACKAGE) -> list[str]:
    """README's Architecture tree against the package: each top-level module and sub-package is
    named there, and each file it names exists in the package."""
    text = (root / "README.md").read_text()
    section = text.split("## Architecture", 1)[1].split("\n## ", 1)[0] if "## Architecture" in text else ""
    tree = section.split("```")[1] if section.count("```") >= 2 else ""
    named = set(re.findall(r"\b([\w]+\.py|[\w]+/)", tree))
    base = root / package
    files = {p.name for p in base.rglob("*.py")} | {p.name for p in base.rglob("*.json")}
    found = [f"README names {n}, which is not in {package}/" for n in sorted(named)
             if n.endswith(".py") and n not in files]
    for p in sorted(base.iterdir()):
        if p.name == "__init__.py" or p.name.startswith((".", "__")):
            continue
        name = p.name + "/" if p.is_dir() else p.name
        if (p.is_dir() or p.suffix == ".py") and name not in named:
            found.append(f"README's Architecture does not name {package}/{name}")
    return found


# ------------------------------------------------------------------------- the tree as it is

def test_no_import_cycle():
    assert import_cycles(ROOT) == []


def test_no_circle_hidden_in_functions():
    """An import inside a function defers a circle, it does not remove it: the package has none
    even counting those (the lazy imports left are for optional extras and cached assets)."""
    assert import_cycles(ROOT, kinds=("module", "function")) == []


def test_no_private_imports():
    assert private_imports(ROOT) == []


def test_layers():
    assert layer_violations(ROOT) == []


def test_no_references_outside_the_repo():
    assert stale_references(ROOT) == []


def test_readme_architecture_matches_the_tree():
    assert readme_mismatches(ROOT) == []


def test_the_checkers_see_the_whole_package():
    """Guards against checkers that pass because they read nothing."""
    graph = import_graph(ROOT)
    assert {"seft_scale.seft.method", "seft_scale.backends.zero3", "seft_scale.cli.train",
            "seft_scale.errors"} <= set(graph)
    assert "seft_scale.seft.topology" in graph["seft_scale.seft.method"]
    assert "seft_scale.backends.comm" in graph["seft_scale.backends.local"]
    # seft/method.py names the Backend protocol for type checkers only
    kinds = {i.where for i in imports_of(ROOT, ROOT / "seft_scale/seft/method.py")
             if i.module.startswith("seft_scale.backends")}
    assert kinds == {"type_checking"}
    assert len(repo_files(ROOT)) > 100


# -------------------------------------------------------------------- planted violations

def plant(root: Path, files: dict[str, str]) -> Path:
    for rel, text in files.items():
        p = root / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(text)
    return root


CLEAN = {
    "seft_scale/__init__.py": "",
    "seft_scale/errors.py": "class ConfigError(ValueError):\n    pass\n",
    "seft_scale/paths.py": "from seft_scale.errors import ConfigError\n\n"
                           "def find(name):\n    from seft_scale.assets import lookup\n"
                           "    return lookup(name)\n",
    "seft_scale/assets.py": "def lookup(name):\n    return name\n",
    "seft_scale/config.py": "from seft_scale.errors import ConfigError\n",
    "seft_scale/model.py": "from seft_scale.config import ConfigError\n",
    "seft_scale/seft/__init__.py": "",
    "seft_scale/seft/method.py": "from typing import TYPE_CHECKING\nimport torch\n"
                                 "from seft_scale.model import ConfigError\n"
                                 "if TYPE_CHECKING:\n    from seft_scale.backends.base import Backend\n",
    "seft_scale/backends/__init__.py": "from seft_scale.backends.base import Backend\n",
    "seft_scale/backends/base.py": "from seft_scale.backends import comm\nfrom seft_scale import model\n"
                                   "class Backend:\n    pass\n",
    "seft_scale/backends/comm.py": "import torch.distributed as dist\n",
    "seft_scale/baselines/__init__.py": "",
    "seft_scale/baselines/static.py": "from seft_scale.seft.method import ConfigError\n",
    "launch/train.py": "from seft_scale.config import ConfigError\n",
    "tests/test_x.py": "from seft_scale import config\n\ndef test():\n    assert config.ConfigError\n",
    "README.md": "# x\n\n## Architecture\n\n```\nseft_scale/\n  errors.py paths.py assets.py config.py "
                 "model.py\n  seft/ method.py\n  backends/ base.py comm.py\n  baselines/ static.py\n```\n"
                 "\n## Tests\n\nSee seft_scale/seft/method.py.\n",
}


def test_the_clean_synthetic_tree_passes(tmp_path):
    root = plant(tmp_path, CLEAN)
    assert import_cycles(root) == [] and private_imports(root) == []
    assert layer_violations(root) == [] and stale_references(root) == []
    assert readme_mismatches(root) == []


ISSUE = "issue " + "12"  # split, here and below, so this file does not cite one itself
PLANTED = [
    # circles: direct, through a package __init__, through a `from package import name`
    (import_cycles, {"seft_scale/config.py": "from seft_scale.model import x\n"}, "seft_scale.config"),
    (import_cycles, {"seft_scale/model.py": "import seft_scale.backends.comm\n"},
     "seft_scale.model (line 1) -> seft_scale.backends"),
    (import_cycles, {"seft_scale/config.py": "from seft_scale.backends import Backend\n"},
     "seft_scale.backends"),
    (import_cycles, {"seft_scale/config.py": "try:\n    from .model import x\nexcept ImportError:\n"
                                             "    pass\n"}, "seft_scale.model"),
    (partial(import_cycles, kinds=("module", "function")),
     {"seft_scale/config.py": "def f():\n    from seft_scale import model\n"}, "seft_scale.config"),
    (private_imports, {"seft_scale/model.py": "from seft_scale.config import _resolve\n"}, "_resolve"),
    (private_imports, {"launch/train.py": "from seft_scale.backends import comm\ncomm._pad(1)\n"},
     "comm._pad"),
    (private_imports, {"tests/test_x.py": "import seft_scale.config as c\n\ndef test():\n"
                                          "    c._Loader\n"}, "c._Loader"),
    (private_imports, {"tests/test_x.py": "def test():\n    from tests.helpers import _x\n"}, "_x"),
    (private_imports, {"seft_scale/model.py": "import seft_scale._impl\n"}, "seft_scale._impl"),
    (layer_violations, {"seft_scale/seft/method.py": "def f():\n    from seft_scale.backends.base "
                                                     "import Backend\n"}, "seft_scale.backends"),
    (layer_violations, {"seft_scale/seft/method.py": "from torch import distributed\n"},
     "torch.distributed"),
    (layer_violations, {"seft_scale/seft/method.py": "import deepspeed\n"}, "deepspeed"),
    (layer_violations, {"seft_scale/seft/method.py": "from seft_scale.baselines import static\n"},
     "seft_scale.baselines"),
    (layer_violations, {"seft_scale/model.py": "import torch.distributed\n"},
     "through seft_scale.seft.method -> seft_scale.model"),
    (layer_violations, {"seft_scale/backends/comm.py": "from seft_scale.seft import method\n"},
     "seft_scale.seft"),
    (layer_violations, {"seft_scale/model.py": "from seft_scale.baselines.static import x\n"},
     "seft_scale.backends.base: imports seft_scale.baselines"),
    (layer_violations, {"seft_scale/errors.py": "def f():\n    from seft_scale import config\n"},
     "seft_scale.config"),
    (layer_violations, {"seft_scale/paths.py": "from seft_scale.assets import lookup\n"},
     "seft_scale.assets"),
    (readme_mismatches, {"seft_scale/plots.py": "\n"}, "does not name seft_scale/plots.py"),
    (readme_mismatches, {"seft_scale/prune/__init__.py": ""}, "does not name seft_scale/prune/"),
    (readme_mismatches, {"README.md": CLEAN["README.md"].replace("base.py", "dist.py")},
     "README names dist.py"),
    (stale_references, {"README.md": "as design" + ".md explains\n"}, "design" + ".md"),
    (stale_references, {"configs/runs/x.yaml": "# see Platform" + ".md\n"}, "Platform" + ".md"),
    (stale_references, {"seft_scale/model.py": f"# fixed in {ISSUE}\n"}, ISSUE),
    (stale_references, {"launch/slurm/a.sbatch": "# (Issue #" + "4)\n"}, "Issue #" + "4"),
]


CASES = [(c, change, named, False) for c, change, named in PLANTED] + [
    (c, change, named, True) for c, change, named in PLANTED if c is stale_references]


@pytest.mark.parametrize("checker, change, named, git", CASES, ids=[
    f"{getattr(c, '__name__', 'import_cycles_in_functions')}-{i}{'-git' if git else ''}"
    for i, (c, _, _, git) in enumerate(CASES)])
def test_each_checker_catches_a_planted_violation(tmp_path, checker, change, named, git):
    root = plant(tmp_path, {**CLEAN, **change})
    if git:  # the file list comes from git ls-files then
        subprocess.run(["git", "init", "-q", str(root)], check=True)
    found = checker(root)
    assert found and any(named in f for f in found), found
