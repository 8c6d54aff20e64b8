"""Imports point one way (docs/ARCHITECTURE.md): a module imports only from its own layer or the layers below it,
and no two modules import each other, directly or around a loop.

Imports under `if TYPE_CHECKING:` are annotations only and do not count. The exceptions that exist today are
listed in KNOWN with the reason; the test fails on any new one, and on a listed one that has been fixed (so the
list only shrinks).
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "mtl_breast"

# Lowest first. A module's layer is that of its longest listed prefix.
LAYERS = {
    # tensors and arrays in, tensors and arrays out; data also reads and caches cases
    "mtl_breast.models": 0, "mtl_breast.losses": 0, "mtl_breast.metrics": 0, "mtl_breast.data": 0,
    "mtl_breast.memtrace": 0, "mtl_breast.modelcard": 0, "mtl_breast.figures": 0, "mtl_breast.files": 0,
    "mtl_breast.phantoms": 0, "mtl_breast.acquisition": 0,
    # weights, prediction of one volume, the baselines
    "mtl_breast.hub": 1, "mtl_breast.predictor": 1, "mtl_breast.features": 1, "mtl_breast.baselines": 1,
    # training (LightningModules, optimisation, checkpoints, logs)
    "mtl_breast.tasks": 2,
    # jobs: read a folder, write a folder; the command line
    "mtl_breast.run": 3, "mtl_breast.cli": 3, "mtl_breast": 3,
}

# (importer, imported): why it is still there. Remove an entry when it is fixed.
KNOWN: dict[tuple[str, str], str] = {}


def _modules() -> dict[str, Path]:
    out = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        out[name] = path
    return out


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _imports(path: Path, modules: dict[str, Path]) -> set[str]:
    """Package modules imported anywhere in the file (functions included), except under TYPE_CHECKING."""
    found: set[str] = set()

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.If) and _is_type_checking(node):
            for child in node.orelse:
                visit(child)
            return
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("mtl_breast"):
            for alias in node.names:  # `from mtl_breast.data import window` imports a module
                sub = f"{node.module}.{alias.name}"
                found.add(sub if sub in modules else node.module)
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.startswith("mtl_breast"))
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(ast.parse(path.read_text()))
    return {m for m in found if m in modules}


def _layer(module: str) -> int:
    prefix = max((p for p in LAYERS if module == p or module.startswith(p + ".")), key=len)
    return LAYERS[prefix]


def _graph() -> dict[str, set[str]]:
    modules = _modules()
    return {name: _imports(path, modules) - {name} for name, path in modules.items()}


def test_every_module_has_a_layer():
    assert all(any(m == p or m.startswith(p + ".") for p in LAYERS) for m in _graph())


def test_no_module_imports_a_higher_layer():
    graph = _graph()
    upward = {(a, b) for a, targets in graph.items() for b in targets
              if _layer(b) > _layer(a) and not b.startswith(a + ".")}  # a package may import its own modules
    new = sorted(upward - set(KNOWN))
    assert not new, "imports pointing up a layer (docs/ARCHITECTURE.md): " + ", ".join(f"{a} -> {b}" for a, b in new)


def _cycles(graph: dict[str, set[str]]) -> set[tuple[str, str]]:
    """Edges that lie on an import loop (Tarjan's strongly connected components, iteratively)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[set[str]] = []
    counter = 0
    for root in graph:
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = counter
        counter += 1
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            for child in children:
                if child not in index:
                    index[child] = low[child] = counter
                    counter += 1
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph.get(child, ())))))
                    break
                if child in on_stack:
                    low[node] = min(low[node], index[child])
            else:
                work.pop()
                if work:
                    low[work[-1][0]] = min(low[work[-1][0]], low[node])
                if low[node] == index[node]:
                    component = set()
                    while True:
                        member = stack.pop()
                        on_stack.discard(member)
                        component.add(member)
                        if member == node:
                            break
                    components.append(component)
    # A package and its own modules (mtl_breast/__init__ re-exporting) are not a loop of concern.
    return {(a, b) for c in components if len(c) > 1 for a in c for b in graph[a] & c
            if not (b.startswith(a + ".") or a.startswith(b + "."))}


def test_no_import_cycles():
    loops = _cycles(_graph())
    new = sorted(loops - set(KNOWN))
    assert not new, "imports in a loop: " + ", ".join(f"{a} -> {b}" for a, b in new)


def test_known_exceptions_still_exist():
    graph = _graph()
    fixed = sorted((a, b) for a, b in KNOWN if b not in graph.get(a, set()))
    assert not fixed, f"fixed, remove from KNOWN: {fixed}"


def test_the_checker_sees_an_upward_import_and_a_loop():
    low, high = "mtl_breast.models.x", "mtl_breast.tasks.y"
    assert _layer(low) < _layer(high)
    assert _cycles({low: {high}, high: {low}}) == {(low, high), (high, low)}
    assert _cycles({low: set(), high: {low}}) == set()
