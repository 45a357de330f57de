"""The package's import structure: every module imports on its own, no module imports
(directly or through others) a module that imports it back, and modules stay readable.

The import graph is read from the source (``ast``), not from ``sys.modules``: module-level and
function-level imports both count (a function-level import is still a cycle, only deferred),
imports under ``if TYPE_CHECKING:`` do not (they never run).  Relative imports are resolved
against the importing module's package.
"""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import networkx as nx
import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "knapspec"
MAX_LINES = 600
# module path (relative to the repository) -> why it may exceed MAX_LINES
LONG_MODULES: dict[str, str] = {}
# third-party packages behind optional extras: a module needing a missing one is not an error
OPTIONAL = {"torch", "transformers", "gguf", "accelerate", "safetensors", "tqdm", "llama_cpp",
            "matplotlib"}


def module_name(path: Path, root: Path = ROOT) -> str:
    """``knapspec/backends/base.py`` -> ``knapspec.backends.base`` (``__init__`` -> package)."""
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def package_modules(package: Path = PACKAGE) -> dict[str, Path]:
    """Every module of ``package`` (a folder directly under the import root), by dotted name."""
    return {module_name(p, package.parent): p for p in sorted(package.rglob("*.py"))}


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _imports(tree: ast.AST) -> list[ast.Import | ast.ImportFrom]:
    """Import statements anywhere in ``tree`` except the bodies of ``if TYPE_CHECKING:``."""
    found: list[ast.Import | ast.ImportFrom] = []
    stack = [tree]
    while stack:
        node = stack.pop()
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            found.append(node)
        if isinstance(node, ast.If) and _is_type_checking(node.test):
            stack.extend(node.orelse)
            continue
        stack.extend(ast.iter_child_nodes(node))
    return found


def _resolve(name: str, path: Path, node: ast.ImportFrom) -> str:
    """The absolute module ``from <dots><module> import ...`` names inside module ``name``."""
    if node.level == 0:
        return node.module or ""
    package = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
    if node.level > 1:
        package = package[: len(package) - (node.level - 1)]
    return ".".join(package + ([node.module] if node.module else []))


def import_graph(package: Path = PACKAGE) -> nx.DiGraph:
    """Directed graph of the imports inside ``package``: an edge ``a -> b`` (attribute
    ``line``: where ``a`` imports it) when module ``a`` imports module ``b``.

    ``from pkg import name`` points at ``pkg.name`` when that is a module, else at ``pkg``;
    ``import pkg.a.b`` at the deepest module that exists.
    """
    modules = package_modules(package)
    graph = nx.DiGraph()
    graph.add_nodes_from(modules)
    for name, path in modules.items():
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        for node in _imports(tree):
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            else:
                base = _resolve(name, path, node)
                targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base
                           for a in node.names]
            for target in targets:
                while target and target not in modules:
                    target = target.rpartition(".")[0]
                if target and target != name:
                    graph.add_edge(name, target, line=node.lineno)
    return graph


def import_cycles(graph: nx.DiGraph) -> list[str]:
    """One cycle per strongly connected group of modules, as ``a -> b -> a (a:12, b:3)``."""
    cycles = []
    for component in nx.strongly_connected_components(graph):
        if len(component) > 1:
            cycle = [a for a, _ in nx.find_cycle(graph.subgraph(component))]
            first = cycle.index(min(cycle))
            cycle = cycle[first:] + cycle[:first]  # start at the first name: stable text
            edges = list(zip(cycle, cycle[1:] + cycle[:1], strict=True))
            where = ", ".join(f"{a}:{graph.edges[a, b]['line']}" for a, b in edges)
            cycles.append(" -> ".join([*cycle, cycle[0]]) + f"  ({where})")
    return sorted(cycles)


def test_the_graph_reader_finds_deferred_cycles_and_skips_type_checking(tmp_path):
    """The reader itself, on a made-up package: a cycle closed by a function-level relative
    import is found; one closed only under ``if TYPE_CHECKING:`` is not."""
    pkg = tmp_path / "pkg"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "a.py").write_text("from .sub import b\nfrom . import c\n")
    (pkg / "c.py").write_text("from typing import TYPE_CHECKING\n"
                              "if TYPE_CHECKING:\n    from .a import A\n")
    (pkg / "sub" / "__init__.py").write_text("")
    (pkg / "sub" / "b.py").write_text("def f():\n    from ..a import g\n    import pkg.c\n")
    graph = import_graph(pkg)
    assert sorted(graph.edges) == [("pkg.a", "pkg.c"), ("pkg.a", "pkg.sub.b"),
                                   ("pkg.sub.b", "pkg.a"), ("pkg.sub.b", "pkg.c")]
    assert import_cycles(graph) == ["pkg.a -> pkg.sub.b -> pkg.a  (pkg.a:1, pkg.sub.b:2)"]


def test_the_import_graph_is_acyclic():
    graph = import_graph()
    assert graph.number_of_edges() > 20  # the reader found the package's imports
    cycles = import_cycles(graph)
    assert not cycles, "import cycles in knapspec/:\n" + "\n".join(cycles)


_IMPORT_EACH = r"""
import importlib, json, sys, traceback
optional = set(json.loads(sys.argv[1]))
results = {}
for name in json.loads(sys.argv[2]):
    for loaded in [m for m in sys.modules if m == "knapspec" or m.startswith("knapspec.")]:
        del sys.modules[loaded]
    try:
        importlib.import_module(name)
        results[name] = "ok"
    except ModuleNotFoundError as e:
        top = (e.name or "").split(".")[0]
        results[name] = f"missing {top}" if top in optional else traceback.format_exc()
    except Exception:
        results[name] = traceback.format_exc()
print(json.dumps(results))
"""


def test_every_module_imports_on_its_own():
    """Each module imported first, with no other knapspec module loaded: import-order
    dependent cycles (``cannot import name ... partially initialized module``) fail here."""
    names = [n for n in sorted(package_modules()) if not n.endswith("__main__")]  # runs the CLI
    out = subprocess.run(
        [sys.executable, "-c", _IMPORT_EACH, json.dumps(sorted(OPTIONAL)), json.dumps(names)],
        capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert out.returncode == 0, out.stderr
    results = json.loads(out.stdout.strip().splitlines()[-1])
    failed = {n: r for n, r in results.items() if r != "ok" and not r.startswith("missing ")}
    assert not failed, "\n\n".join(f"{n}:\n{r}" for n, r in failed.items())
    assert results["knapspec"] == "ok" and results["knapspec.planner"] == "ok"


@pytest.mark.parametrize("path", sorted(PACKAGE.rglob("*.py")),
                         ids=lambda p: str(p.relative_to(ROOT)))
def test_no_module_is_too_long(path):
    rel = str(path.relative_to(ROOT))
    lines = len(path.read_text(encoding="utf-8").splitlines())
    if rel in LONG_MODULES:
        return
    assert lines <= MAX_LINES, (
        f"{rel} has {lines} lines (> {MAX_LINES}): split it, or list it in LONG_MODULES "
        "with the reason it must stay one module")
