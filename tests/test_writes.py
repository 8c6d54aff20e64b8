"""Every file the package writes goes through `mtl_breast.files` (docs/RELIABILITY.md): its atomic writers
(`write_text`, `write_bytes`, `write_safetensors`) or a library writer pointed at the temporary path that
`files.atomic_path` hands out (``with atomic_path(path) as tmp: sitk.WriteImage(image, str(tmp))``), so a killed
or failed write leaves the previous file or none, never half of one.

A static scan of every module but `files.py` itself: a call that writes a file (`WRITERS`, and `open` or
``.open`` with a mode that writes) fails the test unless one of its arguments is a name bound by an enclosing
``with atomic_path(...) as name``, or it is in `ALLOWED` with its reason. Writers owned by a library and never
called here (Lightning's TensorBoard and CSV loggers writing their event files and metrics.csv, ModelCheckpoint
writing best-*.ckpt) are not calls in this package and are not seen.
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "mtl_breast"

# Calls that write a file whatever their arguments: dotted name as written (module alias included) or, after
# ".", any method of that name.
WRITERS = {
    "np.save", "np.savez", "np.savez_compressed", "np.savetxt", "torch.save", "nib.save", "sitk.WriteImage",
    "json.dump", "pickle.dump", "shutil.copy", "shutil.copy2", "shutil.copyfile",
    "shutil.copytree", "shutil.move", "os.replace", "os.rename", "os.open", "save_file",
    ".write_text", ".write_bytes", ".savefig", ".tofile", ".to_filename", ".save_checkpoint",
}
# Calls that write only when given a target, at this position or under one of these keywords (without one,
# `table.to_csv()` and `yaml.safe_dump(data)` return the text).
WRITERS_WITH_TARGET = {
    ".to_csv": (0, "path_or_buf"), ".to_parquet": (0, "path"), ".to_excel": (0, "excel_writer"),
    ".to_json": (0, "path_or_buf"), ".to_pickle": (0, "path"), "yaml.dump": (1, "stream"),
    "yaml.safe_dump": (1, "stream"),
}

# (module, call): (how many such calls, why they may write outside mtl_breast.files). The count is exact, so a new
# call of the same kind in the same module fails too; remove an entry when its calls go.
ALLOWED: dict[tuple[str, str], tuple[int, str]] = {
    ("data/convert.py", "os.replace"): (2, "a finished case folder swapped into place, the old one moved aside: "
                                           "folders, not files; every file in them was written through "
                                           "files.atomic_path / write_text"),
    ("tasks/checkpointing.py", ".save_checkpoint"): (1, "the ranks other than 0 only join Lightning's collective "
                                                        "save: Lightning writes on rank 0, whose call goes to "
                                                        "atomic_path's temporary file"),
}


def _name(node: ast.AST) -> str:
    """Dotted name of a call target (`np.save`, `fig.savefig`), "" for anything else."""
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        base = _name(node.value)
        return f"{base}.{node.attr}" if base else f".{node.attr}"
    return ""


def _writer(call: ast.Call) -> str | None:
    """What `call` is, when it writes a file: the entry of `WRITERS` it matches, or "open"; else None."""
    name = _name(call.func)
    method = "." + name.rsplit(".", 1)[-1] if "." in name else None
    if name in WRITERS or method in WRITERS:
        return name if name in WRITERS else method
    for key in (name, method):
        if key in WRITERS_WITH_TARGET:
            position, keyword = WRITERS_WITH_TARGET[key]
            if len(call.args) > position or any(k.arg == keyword for k in call.keywords):
                return key
    if name in ("open", "io.open", "gzip.open") or method == ".open":
        position = 0 if method == ".open" and name not in ("io.open", "gzip.open") else 1  # Path.open(mode)
        mode = call.args[position] if len(call.args) > position else next(
            (k.value for k in call.keywords if k.arg == "mode"), None)
        if isinstance(mode, ast.Constant) and isinstance(mode.value, str) and set(mode.value) & set("wax+"):
            return "open"
    return None


def _atomic_names(node: ast.With) -> set[str]:
    """Names bound by ``with atomic_path(...) as name`` (also ``files.atomic_path``) in one with statement."""
    return {item.optional_vars.id for item in node.items
            if isinstance(item.context_expr, ast.Call) and _name(item.context_expr.func).endswith("atomic_path")
            and isinstance(item.optional_vars, ast.Name)}


def direct_writes(source: str) -> list[tuple[int, str]]:
    """(line, writer) of each call in ``source`` that writes a file other than through mtl_breast.files."""
    found: list[tuple[int, str]] = []

    def visit(node: ast.AST, atomic: frozenset[str]) -> None:
        if isinstance(node, ast.With):
            atomic = atomic | _atomic_names(node)
        if isinstance(node, ast.Call) and (writer := _writer(node)):
            used = {n.id for arg in [*node.args, *(k.value for k in node.keywords), node.func]
                    for n in ast.walk(arg) if isinstance(n, ast.Name)}
            if not used & atomic:
                found.append((node.lineno, writer))
        for child in ast.iter_child_nodes(node):
            visit(child, atomic)

    visit(ast.parse(source), frozenset())
    return found


def test_every_write_goes_through_files():
    found: dict[tuple[str, str], list[int]] = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        module = path.relative_to(PACKAGE).as_posix()
        if module != "files.py":
            for line, writer in direct_writes(path.read_text()):
                found.setdefault((module, writer), []).append(line)
    unexplained = [f"mtl_breast/{module}:{line} {writer}" for (module, writer), lines in sorted(found.items())
                   if len(lines) != ALLOWED.get((module, writer), (0, ""))[0] for line in lines]
    assert not unexplained, ("files written other than through mtl_breast.files (use write_text / write_bytes / "
                             "write_safetensors, or write to the path of `with atomic_path(path) as tmp`; a "
                             "changed count of an ALLOWED kind lists all its calls): " + ", ".join(unexplained))
    stale = sorted(set(ALLOWED) - set(found))
    assert not stale, f"no longer written directly, remove from ALLOWED: {stale}"


def test_the_scan_sees_direct_writes_and_accepts_atomic_ones():
    planted = """
import json, numpy as np, torch, yaml
from pathlib import Path
from mtl_breast.files import atomic_path, write_text

def bad(path, obj, fig, table):
    Path(path).write_text("x")
    with open(path, "w") as f:
        json.dump(obj, f)
    np.save(path, obj)
    torch.save(obj, path)
    fig.savefig(path)
    table.to_csv(path)
    Path(path).open("ab")
    yaml.safe_dump(obj, f)

def good(path, obj, fig, table):
    write_text(path, json.dumps(obj))
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
        torch.save(obj, str(tmp))
    with open(path) as f, open(path, "rb") as g:
        f.read(), g.read()
    return table.to_csv(index=False), Path(path).read_text(), yaml.safe_dump(obj, sort_keys=False)
"""
    assert [w for _, w in direct_writes(planted)] == [".write_text", "open", "json.dump", "np.save", "torch.save",
                                                      ".savefig", ".to_csv", "open", "yaml.safe_dump"]
