"""The package layout stays readable: no import cycles between project modules, no module reaching into another
module's private (``_name``) names, no file over 400 lines. Checked on the source with ``ast`` (nothing imported).

Function-level imports count as imports; imports under ``if TYPE_CHECKING:`` do not (they never run).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = {"ttrv_edge": ROOT / "ttrv_edge", "ttrv_edge.kernels": ROOT / "kernels"}
MAX_LINES = 400


def _modules() -> dict[str, Path]:
    """Module name -> file, for every .py file of the project (kernels/ is installed as ttrv_edge.kernels)."""
    found = {}
    for package, base in PACKAGES.items():
        for path in sorted(base.rglob("*.py")):
            parts = [p for p in path.relative_to(base).with_suffix("").parts if p != "__init__"]
            if package == "ttrv_edge" and parts[:1] == ["kernels"]:
                continue
            found[".".join([package, *parts])] = path
    return found


def _type_checking_nodes(tree: ast.AST) -> set[int]:
    skipped = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.dump(node.test):
            skipped.update(id(child) for child in ast.walk(node))
    return skipped


def _imports(name: str, path: Path) -> list[tuple[str, str | None]]:
    """(imported module, imported name or None) for every import statement that runs, targets made absolute."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    skipped = _type_checking_nodes(tree)
    package = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
    found = []
    for node in ast.walk(tree):
        if id(node) in skipped:
            continue
        if isinstance(node, ast.Import):
            found += [(alias.name, None) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            target = node.module or ""
            if node.level:  # relative: from the module's package, one level up per extra dot
                base = package[: len(package) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            found += [(target, alias.name) for alias in node.names]
    return found


def _graph() -> tuple[dict[str, set[str]], list[str]]:
    """Edges between project modules, and the imports of another module's private names."""
    modules = _modules()
    edges: dict[str, set[str]] = {name: set() for name in modules}
    private = []
    for name, path in modules.items():
        for target, imported in _imports(name, path):
            if imported and f"{target}.{imported}" in modules:
                edges[name].add(f"{target}.{imported}")
            elif target in modules:
                edges[name].add(target)
                if imported and imported.startswith("_") and not imported.startswith("__") and target != name:
                    private.append(f"{name} imports {target}.{imported}")
        edges[name].discard(name)
    return edges, private


def _cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found = []
    for root in edges:
        if root in index:
            continue
        work = [(root, iter(sorted(edges[root])))]
        index[root] = low[root] = len(index)
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = len(index)
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(edges.get(child, ())))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                if len(component) > 1:
                    found.append(sorted(component))
    return found


def test_the_checks_see_the_whole_package():
    modules = _modules()
    assert {"ttrv_edge", "ttrv_edge.api", "ttrv_edge.rl.loop", "ttrv_edge.kernels.reference"} <= set(modules)
    edges, _ = _graph()
    assert "ttrv_edge.rl.update" in edges["ttrv_edge.rl.loop"]  # relative imports resolve
    assert "ttrv_edge.models.lora" in edges["ttrv_edge.rl.guards"]


def test_no_import_cycles():
    edges, _ = _graph()
    assert _cycles(edges) == []


@pytest.mark.parametrize(
    "edges, expected",
    [({"a": {"b"}, "b": {"c"}, "c": {"a"}}, [["a", "b", "c"]]), ({"a": {"b"}, "b": set()}, [])],
    ids=["cycle", "chain"],
)
def test_cycle_finder(edges, expected):
    assert _cycles(edges) == expected


def test_no_module_imports_another_modules_private_names():
    _, private = _graph()
    assert private == []


def test_no_file_is_over_the_line_limit():
    long = {}
    for path in _modules().values():
        lines = path.read_text(encoding="utf-8").count("\n") + 1
        if lines > MAX_LINES:
            long[str(path.relative_to(ROOT))] = lines
    assert long == {}
