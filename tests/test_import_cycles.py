"""The package has no import cycle: imports between noodle modules form a DAG.

Every import counts, those inside functions included (a deferred import can hide a cycle
without removing it); only ``if TYPE_CHECKING:`` blocks, which never run, are left out.
"""

from __future__ import annotations

import ast
from pathlib import Path

import networkx as nx

ROOT = Path(__file__).resolve().parents[1] / "noodle"


def _module(path: Path) -> str:
    parts = list(path.relative_to(ROOT.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(tree: ast.Module, here: str, is_pkg: bool) -> set[str]:
    found: set[str] = set()

    def visit(nodes: list[ast.stmt]) -> None:
        for node in nodes:
            if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
                continue
            for field in ("body", "orelse", "finalbody", "handlers"):
                inner = getattr(node, field, None)
                if isinstance(inner, list) and inner and not isinstance(node, (ast.Import, ast.ImportFrom)):
                    visit([h for h in inner if isinstance(h, ast.stmt)])
                    for h in inner:
                        if isinstance(h, ast.ExceptHandler):
                            visit(h.body)
            if isinstance(node, ast.Import):
                found.update(a.name for a in node.names if a.name.startswith("noodle"))
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base = here.split(".")[: len(here.split(".")) - node.level + (1 if is_pkg else 0)]
                    mod = ".".join(base + ([node.module] if node.module else []))
                else:
                    mod = node.module or ""
                if mod.startswith("noodle"):
                    found.add(mod)
                    found.update(f"{mod}.{a.name}" for a in node.names)

    visit(tree.body)
    return found


def import_graph() -> nx.DiGraph:
    modules = {_module(p): p for p in ROOT.rglob("*.py")}
    graph = nx.DiGraph()
    for name, path in modules.items():
        graph.add_node(name)
        tree = ast.parse(path.read_text())
        for target in _imports(tree, name, path.name == "__init__.py"):
            if target in modules and target != name:
                graph.add_edge(name, target)
    return graph


def test_no_import_cycle_in_the_package():
    graph = import_graph()
    cycles = list(nx.simple_cycles(graph))
    assert not cycles, "import cycles: " + "; ".join(" -> ".join([*c, c[0]]) for c in cycles[:10])
