"""Imports point one way (docs/ARCHITECTURE.md): a module imports only from its own layer or the layers below it,
the packages of the domain layer (models, losses, metrics, data, phantoms) import none of each other, and no two
modules import each other, directly or around a loop.

Every import counts: at the top of a module, inside a function, and under `if TYPE_CHECKING:` (an annotation that
names another module's class is a dependency on that module, even though it is not loaded at run time; two modules
that need each other only for annotations are still one concept split in two). The exceptions that exist today
are listed in KNOWN with the reason; the test fails on any new one, and on a listed one that has been fixed (so
the list only shrinks).
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "mtl_breast"

# Lowest first. A module's layer is that of its longest listed prefix.
LAYERS = {
    # foundations: single modules every layer may use (acquisition values, sizes, the file writer, figures)
    "mtl_breast.acquisition": 0, "mtl_breast.sizes": 0, "mtl_breast.files": 0, "mtl_breast.figures": 0,
    "mtl_breast.memtrace": 0,
    # the domain: tensors and arrays in, tensors and arrays out; data also reads and caches cases
    "mtl_breast.models": 1, "mtl_breast.losses": 1, "mtl_breast.metrics": 1, "mtl_breast.data": 1,
    "mtl_breast.phantoms": 1,
    # weights, prediction of one volume, the baselines
    "mtl_breast.hub": 2, "mtl_breast.predictor": 2, "mtl_breast.features": 2, "mtl_breast.baselines": 2,
    # training (LightningModules, optimisation, checkpoints, logs)
    "mtl_breast.tasks": 3,
    # jobs: read a folder, write a folder; the command line
    "mtl_breast.run": 4, "mtl_breast.cli": 4, "mtl_breast": 4,
}
# The domain layer's packages are siblings: none imports another (the data pipeline never loads a model, a model
# never reads a case; weights load in pure PyTorch), so each can be read, tested and replaced alone.
SIBLINGS = ("mtl_breast.models", "mtl_breast.losses", "mtl_breast.metrics", "mtl_breast.data", "mtl_breast.phantoms")

# (importer, imported): why it is still there. Remove an entry when it is fixed.
KNOWN: dict[tuple[str, str], str] = {}


def _modules() -> dict[str, Path]:
    out = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        out[name] = path
    return out


def _imports(path: Path, modules: dict[str, Path]) -> set[str]:
    """Package modules imported anywhere in the file: functions and `if TYPE_CHECKING:` blocks included."""
    found: set[str] = set()

    def visit(node: ast.AST) -> None:
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


def _package(module: str) -> str | None:
    return next((p for p in SIBLINGS if module == p or module.startswith(p + ".")), None)


def _sibling_imports(graph: dict[str, set[str]]) -> set[tuple[str, str]]:
    """Edges from one domain package into another (`SIBLINGS`)."""
    return {(a, b) for a, targets in graph.items() for b in targets
            if _package(a) and _package(b) and _package(a) != _package(b)}


def test_domain_packages_import_no_other():
    new = sorted(_sibling_imports(_graph()) - set(KNOWN))
    assert not new, "a domain package imports another (docs/ARCHITECTURE.md): " + ", ".join(
        f"{a} -> {b}" for a, b in new)


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


def test_the_checker_sees_an_upward_import_a_sibling_import_and_a_loop():
    low, high = "mtl_breast.models.x", "mtl_breast.tasks.y"
    assert _layer(low) < _layer(high)
    assert _cycles({low: {high}, high: {low}}) == {(low, high), (high, low)}
    assert _cycles({low: set(), high: {low}}) == set()
    data, model = "mtl_breast.data.dataset", "mtl_breast.models.kinetics"
    assert _sibling_imports({data: {model}, model: {"mtl_breast.acquisition"}}) == {(data, model)}
    assert _sibling_imports({model: {data}}) == {(model, data)}
    assert _sibling_imports({data: {"mtl_breast.data.cache", "mtl_breast.sizes"}}) == set()


def test_an_annotation_only_import_counts(tmp_path):
    source = tmp_path / "m.py"
    source.write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from mtl_breast.data.cache import X\n")
    assert _imports(source, {"mtl_breast.data.cache": source}) == {"mtl_breast.data.cache"}


# A module whose functions all import late for one reason states it once, at module level, after this marker.
_MODULE_REASON = "# Imports inside functions:"


def _unexplained_function_imports(source: str) -> list[int]:
    """Lines of imports inside a function with no comment saying why: on the import's own lines, or on the line
    above its run of consecutive imports; none when the module states its reason once (`_MODULE_REASON`)."""
    if any(line.startswith(_MODULE_REASON) for line in source.splitlines()):
        return []
    lines = source.splitlines()
    imports: list[ast.stmt] = []

    def visit(node: ast.AST, in_function: bool) -> None:
        if in_function and isinstance(node, (ast.Import, ast.ImportFrom)):
            imports.append(node)
        inside = in_function or isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))
        for child in ast.iter_child_nodes(node):
            visit(child, inside)

    visit(ast.parse(source), False)
    starts = {line for node in imports for line in range(node.lineno, node.end_lineno + 1)}
    bad = []
    for node in imports:
        own = lines[node.lineno - 1:node.end_lineno]
        above = node.lineno - 1  # the line above the run of imports this one belongs to (1-based: lines[above - 1])
        while above in starts or (above >= 1 and not lines[above - 1].strip()):
            above -= 1
        if not any("#" in line for line in own) and not (above >= 1 and lines[above - 1].strip().startswith("#")):
            bad.append(node.lineno)
    return bad


def test_imports_inside_functions_say_why():
    unexplained = [f"{path.relative_to(PACKAGE.parent)}:{line}" for path in sorted(PACKAGE.rglob("*.py"))
                   for line in _unexplained_function_imports(path.read_text())]
    assert not unexplained, ("imports inside a function without a comment saying why (move them to the top of the "
                             "module, or say why they are late): " + ", ".join(unexplained))


def test_the_checker_sees_an_unexplained_late_import():
    assert _unexplained_function_imports("def f():\n    import torch\n    return torch\n") == [2]
    assert _unexplained_function_imports("def f():\n    import torch  # heavy\n") == []
    assert _unexplained_function_imports("def f():\n    # heavy: only f needs them\n    import a\n    import b\n") == []
    assert _unexplained_function_imports(f"{_MODULE_REASON} startup\ndef f():\n    import a\n") == []
    assert _unexplained_function_imports("import a\n") == []
