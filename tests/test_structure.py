"""The structure docs/architecture.md promises, checked from the source: no import cycle between
library modules (imports inside functions included), no function over 100 lines, pyarrow.fs
imported by sftscale/storage/remote.py only, one formatting style (no `fmt: skip`), and every
import inside a function says why it is there."""

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("sftscale", "data_tools")


def _modules() -> dict[str, Path]:
    mods = {}
    for pkg in PACKAGES:
        for f in (ROOT / pkg).rglob("*.py"):
            name = ".".join(f.relative_to(ROOT).with_suffix("").parts)
            mods[name.removesuffix(".__init__")] = f
    return mods


def _imported(node: ast.AST) -> list[str]:
    if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
        return [node.module] + [f"{node.module}.{a.name}" for a in node.names]
    if isinstance(node, ast.Import):
        return [a.name for a in node.names]
    return []


def _graph() -> dict[str, set[str]]:
    mods = _modules()
    edges: dict[str, set[str]] = {m: set() for m in mods}
    for name, f in mods.items():
        for node in ast.walk(ast.parse(f.read_text())):
            for target in _imported(node):
                while target and target not in mods:
                    target = target.rpartition(".")[0]
                if target and target != name:
                    edges[name].add(target)
    return edges


def _cycles(edges: dict[str, set[str]]) -> list[set[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index, low, stack, on, out = {}, {}, [], set(), []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in edges[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = set()
            while True:
                w = stack.pop()
                on.discard(w)
                component.add(w)
                if w == v:
                    break
            if len(component) > 1:
                out.append(component)

    for v in edges:
        if v not in index:
            visit(v)
    return out


def test_no_import_cycle_between_library_modules():
    assert _cycles(_graph()) == []


def test_the_cycle_check_finds_a_cycle():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [{"a", "b", "c"}]


def test_no_function_over_100_lines():
    long = []
    for name, f in _modules().items():
        for node in ast.walk(ast.parse(f.read_text())):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                n = node.end_lineno - node.lineno + 1
                if n > 100:
                    long.append(f"{name}.{node.name}: {n} lines")
    assert long == []


def test_pyarrow_fs_is_imported_by_the_storage_module_only():
    users = {
        name
        for name, f in _modules().items()
        for node in ast.walk(ast.parse(f.read_text()))
        if any(t.startswith("pyarrow.fs") for t in _imported(node))
        or (
            isinstance(node, ast.ImportFrom)
            and node.module == "pyarrow"
            and "fs" in [a.name for a in node.names]
        )
    }
    assert users == {"sftscale.storage.remote"}


def test_one_formatting_style():
    marked = [
        str(f.relative_to(ROOT))
        for pkg in (*PACKAGES, "tests", "benchmarks")
        for f in (ROOT / pkg).rglob("*.py")
        if re.search(r"#\s*fmt:\s*(skip|off)", f.read_text()) and f.name != "test_structure.py"
    ]
    assert marked == []


def test_imports_inside_functions_say_why():
    """An import inside a function keeps a heavy library off a light path: the line (or the one
    above it) says so in a comment; a light import belongs at the top of the module."""
    silent = []
    for name, f in _modules().items():
        lines = f.read_text().splitlines()
        for fn in ast.walk(ast.parse("\n".join(lines))):
            if not isinstance(fn, ast.FunctionDef | ast.AsyncFunctionDef):
                continue
            for node in fn.body:
                if isinstance(node, ast.Import | ast.ImportFrom):
                    said = "#" in lines[node.lineno - 1] or any(
                        lines[i].strip().startswith("#")
                        for i in range(max(node.lineno - 3, 0), node.lineno - 1)
                    )
                    if not said and not _follows_a_said_import(fn, node, lines):
                        silent.append(f"{name}:{node.lineno}")
    assert silent == []


def _follows_a_said_import(fn, node, lines) -> bool:
    """Part of a block of imports whose first line says why."""
    block = []
    for stmt in fn.body:
        if isinstance(stmt, ast.Import | ast.ImportFrom):
            block.append(stmt)
            if stmt is node:
                break
        elif stmt.lineno < node.lineno:
            block = []
    first = block[0]
    return "#" in lines[first.lineno - 1] or (
        first.lineno >= 2 and lines[first.lineno - 2].strip().startswith("#")
    )
