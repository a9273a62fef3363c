"""The house has no import circles: proxy/, local_backend/ and netguard/ import each other in one direction.

The imports are read with ast (nothing is imported). A module-level import edge is any import outside a
function, except in an `if TYPE_CHECKING:` block. An import inside a function is allowed only for optional
heavy dependencies (torch, diffusers, ray, redis, obstore, ...): a project module imported there is one
dodging a circle, and fails the test too.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("proxy", "local_backend", "netguard")


def modules(root: Path = ROOT) -> dict[str, Path]:
    """Every module of the packages by dotted name (a package by its own name, not `.__init__`)."""
    found = {}
    for package in PACKAGES:
        for path in sorted((root / package).rglob("*.py")):
            parts = list(path.relative_to(root).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            found[".".join(parts)] = path
    return found


def _type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _imports(tree: ast.AST):
    """(node, inside_a_function) for each import, leaving out `if TYPE_CHECKING:` blocks."""
    def walk(node, in_function):
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and _type_checking(child):
                for sub in child.orelse:
                    yield from walk(sub, in_function)
                continue
            if isinstance(child, (ast.Import, ast.ImportFrom)):
                yield child, in_function
            yield from walk(child, in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef,
                                                                     ast.Lambda)))
    yield from walk(tree, False)


def _targets(node: ast.Import | ast.ImportFrom, name: str, is_package: bool, known: dict) -> list[str]:
    """The project modules an import statement loads (the deepest known module of each name)."""
    if isinstance(node, ast.Import):
        names = [alias.name for alias in node.names]
    else:
        base = node.module or ""
        if node.level:
            package = name.split(".") if is_package else name.split(".")[:-1]
            package = package[: len(package) - node.level + 1]
            base = ".".join(package + ([base] if base else []))
        names = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in known else base for alias in node.names]
    out = []
    for target in names:
        while target and target not in known:
            target = target.rpartition(".")[0]
        if target and target != name:
            out.append(target)
    return out


def import_graph(root: Path = ROOT) -> tuple[dict[str, set[str]], list[str]]:
    """Module-level import edges between the project's modules, and the function-local project imports."""
    known = modules(root)
    edges: dict[str, set[str]] = {name: set() for name in known}
    local = []
    for name, path in known.items():
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        for node, in_function in _imports(tree):
            targets = _targets(node, name, path.name == "__init__.py", known)
            if in_function:
                local += [f"{path.relative_to(root)}:{node.lineno}: {ast.unparse(node)}" for _ in targets[:1]]
            else:
                edges[name].update(targets)
    return edges, local


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """The circles in the graph: one per strongly connected component of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(edges[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return found


def test_no_import_cycles():
    edges, _ = import_graph()
    found = cycles(edges)
    assert not found, "import circles (modules that import each other, directly or around):\n" + "\n".join(
        " <-> ".join(c) for c in found)


def test_no_project_imports_inside_functions():
    _, local = import_graph()
    assert not local, ("imports of project modules inside functions (put them at the top; only optional heavy "
                       "dependencies are imported late):\n" + "\n".join(local))


def test_the_walk_finds_a_cycle_and_a_local_import(tmp_path):
    """The checks themselves: a circle and a function-local import in a small package are both found."""
    package = tmp_path / "proxy"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "a.py").write_text("from .b import thing\n")
    (package / "b.py").write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from .c import C\n"
                                  "from . import c\n")
    (package / "c.py").write_text("import proxy.a\n\ndef late():\n    from .a import thing\n    import torch\n")
    edges, local = import_graph(tmp_path)
    assert cycles(edges) == [["proxy.a", "proxy.b", "proxy.c"]]
    assert local == ["proxy/c.py:4: from .a import thing"]
