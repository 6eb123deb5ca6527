"""The engine's modules import each other without cycles, lazy imports included.

The graph is read from the source, never by importing it: every module under ``engine/`` is parsed
and each absolute ``import engine.…`` / ``from engine.… import …`` statement, at module level or
inside a function, becomes an edge. ``from engine.x import y`` points at ``engine.x.y`` when that is
a module, else at ``engine.x``. Imports under ``if TYPE_CHECKING:`` never run, so they are skipped.
Package ``__init__`` modules are in the graph like any other module (none needs excluding: they
re-export nothing from their subpackages' modules except ``engine/__init__``'s lazy ``__getattr__``,
whose imports are counted).
"""

from __future__ import annotations

import ast
from pathlib import Path


ENGINE_ROOT = Path(__file__).resolve().parents[2] / "engine"

def module_names(root: Path, package: str) -> dict[str, Path]:
    """``{dotted module name: file}`` of every ``.py`` file under ``root`` (the folder of ``package``)."""
    out = {}
    for path in sorted(root.rglob("*.py")):
        parts = list(path.relative_to(root).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join([package, *parts])] = path
    return out


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _import_nodes(tree: ast.AST) -> list[ast.Import | ast.ImportFrom]:
    """Every import statement in ``tree`` at any depth, except the bodies of ``if TYPE_CHECKING:``."""
    found: list[ast.Import | ast.ImportFrom] = []

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.If) and _is_type_checking(node.test):
            for child in node.orelse:
                visit(child)
            return
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            found.append(node)
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(tree)
    return found


def import_graph(root: Path, package: str) -> dict[str, set[str]]:
    """``{module: {modules of package it imports}}`` from the AST of every module under ``root``.

    Absolute imports only (the engine uses no relative ones); a target outside the package, or a name
    that is neither a module nor inside one of the package, is ignored.
    """
    modules = module_names(root, package)
    prefix = package + "."

    def resolve(name: str) -> str | None:
        while name and name not in modules:  # "engine.x.y.attr" -> the nearest module
            name = name.rpartition(".")[0]
        return name or None

    graph: dict[str, set[str]] = {name: set() for name in modules}
    for name, path in modules.items():
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        for node in _import_nodes(tree):
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif node.level == 0 and node.module:
                targets = [f"{node.module}.{alias.name}" if f"{node.module}.{alias.name}" in modules else node.module
                           for alias in node.names]
            else:
                continue
            for target in targets:
                if target == package or target.startswith(prefix):
                    resolved = resolve(target)
                    if resolved is not None and resolved != name:
                        graph[name].add(resolved)
    return graph


def find_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The graph's cycles, one per strongly connected component of more than one module (Tarjan),
    each as its sorted module names."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[list[str]] = []
    counter = 0

    def strongconnect(start: str) -> None:
        nonlocal counter
        # iterative DFS: (node, iterator over its successors)
        work = [(start, iter(sorted(graph.get(start, ()))))]
        index[start] = low[start] = counter
        counter += 1
        stack.append(start)
        on_stack.add(start)
        while work:
            node, successors = work[-1]
            advanced = False
            for succ in successors:
                if succ not in index:
                    index[succ] = low[succ] = counter
                    counter += 1
                    stack.append(succ)
                    on_stack.add(succ)
                    work.append((succ, iter(sorted(graph.get(succ, ())))))
                    advanced = True
                    break
                if succ in on_stack:
                    low[node] = min(low[node], index[succ])
            if advanced:
                continue
            work.pop()
            if work:
                parent = work[-1][0]
                low[parent] = min(low[parent], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                if len(component) > 1:
                    components.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            strongconnect(node)
    return sorted(components)


def test_engine_has_no_import_cycles():
    cycles = find_cycles(import_graph(ENGINE_ROOT, "engine"))
    assert not cycles, "import cycles in the engine: " + "; ".join(" <-> ".join(c) for c in cycles)


def _write(root: Path, files: dict[str, str]) -> None:
    for rel, text in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")


def test_check_finds_a_lazy_cycle_and_ignores_type_checking(tmp_path):
    pkg = tmp_path / "fake"
    _write(pkg, {
        "__init__.py": "",
        "a.py": "from fake.b import helper\n",
        # the cycle closes through a function-level import
        "b.py": "def helper():\n    from fake import a\n    return a\n",
        "sub/__init__.py": "",
        "sub/c.py": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from fake.sub.d import D\n",
        "sub/d.py": "import fake.sub.c\nimport os\n",
    })
    graph = import_graph(pkg, "fake")
    assert graph["fake.a"] == {"fake.b"}
    assert graph["fake.b"] == {"fake.a"}  # "from fake import a" is the module fake.a
    assert graph["fake.sub.c"] == set()  # TYPE_CHECKING only
    assert graph["fake.sub.d"] == {"fake.sub.c"}
    assert find_cycles(graph) == [["fake.a", "fake.b"]]


def test_check_passes_an_acyclic_package(tmp_path):
    pkg = tmp_path / "fake"
    _write(pkg, {"__init__.py": "", "a.py": "import fake.b\n", "b.py": "from fake.c import x\n", "c.py": "x = 1\n"})
    graph = import_graph(pkg, "fake")
    assert graph == {"fake": set(), "fake.a": {"fake.b"}, "fake.b": {"fake.c"}, "fake.c": set()}
    assert find_cycles(graph) == []
