"""Layer rules of src/bonexray, checked on the source (AST), imports inside functions included.

* no module imports itself back through others (zero module cycles);
* no package imports itself back through others (zero package cycles; a top-level module such as
  ``bonexray.pipeline`` counts as its own package);
* ``bonexray.core`` imports no torch, sklearn or matplotlib, and no other part of bonexray;
* only ``bonexray.evaluation`` itself and the CLI import ``bonexray.evaluation``.

Imports under ``if TYPE_CHECKING:`` never run and are not counted. Importing ``a.b.c`` runs the
``__init__`` of ``a`` and ``a.b`` too; those files are counted as modules like any other, but the
implicit parent imports are not edges (the package ``__init__`` files import nothing eagerly).
"""
from __future__ import annotations

import ast
from pathlib import Path


SRC = Path(__file__).resolve().parents[1] / "src"
ROOT = "bonexray"


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(SRC).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for p in (SRC / ROOT).rglob("*.py")}


def _type_checking_nodes(tree: ast.AST) -> set[int]:
    skip: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            skip.update(id(n) for child in node.body for n in ast.walk(child))
    return skip


def _imports(name: str, path: Path, known: set[str]) -> set[str]:
    """Every module of ``known`` or outside library that ``name`` imports (anywhere in its code)."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    skip = _type_checking_nodes(tree)
    is_package = path.name == "__init__.py"
    found: set[str] = set()
    for node in ast.walk(tree):
        if id(node) in skip:
            continue
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = name.split(".") if is_package else name.split(".")[:-1]
                anchor = anchor[: len(anchor) - (node.level - 1)]
                base = ".".join(anchor + ([base] if base else []))
            for alias in node.names:
                sub = f"{base}.{alias.name}"
                found.add(sub if sub in known else base)
    return found


def _graph() -> dict[str, set[str]]:
    mods = _modules()
    known = set(mods)
    return {m: {t for t in _imports(m, p, known) if t in known and t != m} for m, p in mods.items()}


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one node (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    out: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
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
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def _package(module: str) -> str:
    parts = module.split(".")
    return ".".join(parts[:2])


def _package_graph() -> dict[str, set[str]]:
    out: dict[str, set[str]] = {}
    for m, targets in _graph().items():
        out.setdefault(_package(m), set()).update(_package(t) for t in targets if _package(t) != _package(m))
    return out




def test_cycle_finder_finds_a_cycle():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert _cycles({"a": {"b"}, "b": set()}) == []


def test_relative_imports_resolve_to_modules():
    graph = _graph()
    assert "bonexray.pipeline" in graph["bonexray.api"]
    assert "bonexray.core.decision" in graph["bonexray.core.findings"]
    assert "bonexray.inference.scope" in graph["bonexray.pipeline"]  # an import inside a function


def test_no_module_cycles():
    assert _cycles(_graph()) == []


def test_no_package_cycles():
    assert _cycles(_package_graph()) == []


def test_core_imports_no_heavy_library_and_nothing_else_of_bonexray():
    mods = _modules()
    for name, path in mods.items():
        if not name.startswith(f"{ROOT}.core"):
            continue
        for target in _imports(name, path, set(mods)):
            top = target.split(".")[0]
            assert top not in ("torch", "torchvision", "timm", "lightning", "sklearn", "matplotlib"), (name, target)
            assert top != ROOT or target.startswith(f"{ROOT}.core"), (name, target)


def _evaluation_importers() -> list[tuple[str, str]]:
    allowed = (f"{ROOT}.evaluation", f"{ROOT}.cli")
    return sorted((m, t) for m, targets in _graph().items() for t in targets
                  if t.startswith(f"{ROOT}.evaluation") and not m.startswith(allowed))


def test_only_evaluation_and_the_cli_import_evaluation():
    assert _evaluation_importers() == []
