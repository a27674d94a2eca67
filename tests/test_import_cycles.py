"""Imports between noodle modules form a DAG, and none points upward across DESIGN.md's layers.

The layers, lowest first: core -> spec -> graph -> solvers -> plan -> engine -> serve -> cli. A module
imports its own layer and those below it. ``models/`` and ``profile/`` stand beside the chain: every
layer above core may import them, and they import only core and each other.

Every import counts, those inside functions included (a deferred import can hide a cycle or an
upward edge without removing it); only ``if TYPE_CHECKING:`` blocks, which never run, are left out.
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


CHAIN = ("core", "spec", "graph", "solvers", "plan", "engine", "serve", "cli")
BESIDE = ("models", "profile")
LAYER_OF = {
    **dict.fromkeys(("types", "errors", "registry", "docfile", "sizes", "formats", "extras", "progress"), "core"),
    **dict.fromkeys(("spec", "specresolve", "formatspec", "joint", "cluster"), "spec"),
    "graph": "graph",
    "solvers": "solvers",
    **dict.fromkeys(("plandoc", "jointdoc"), "plan"),
    "executors": "engine",
    **dict.fromkeys(("serve", "deploy"), "serve"),
    **dict.fromkeys(("cli", "__main__"), "cli"),
    "models": "models",
    "profile": "profile",
}
EXEMPT = {"noodle"}  # the package's __init__: the public API re-exports names from every layer


def layer(module: str) -> str:
    """The layer of a ``noodle.*`` module, from the package or top-level module it lives in."""
    parts = module.split(".")
    return LAYER_OF[parts[1]] if len(parts) > 1 else "cli"


def allowed(src: str, dst: str) -> bool:
    """Whether layer ``src`` may import layer ``dst``."""
    if src == dst or dst == "core":
        return True
    if src in BESIDE:
        return dst in BESIDE
    if dst in BESIDE:
        return src != "core"  # core stands below everything: models/ and profile/ import it
    return CHAIN.index(dst) < CHAIN.index(src)


def upward_edges(graph: nx.DiGraph) -> list[str]:
    """Every import edge of ``graph`` that breaks the layering, as ``a -> b (layer X imports layer Y)``."""
    bad = []
    for a, b in sorted(graph.edges):
        if a in EXEMPT:
            continue
        la, lb = layer(a), layer(b)
        if not allowed(la, lb):
            bad.append(f"{a} -> {b} (layer {la} imports layer {lb})")
    return bad


def test_every_module_has_a_layer() -> None:
    unknown = sorted({m.split(".")[1] for m in import_graph().nodes if m not in EXEMPT} - LAYER_OF.keys())
    assert not unknown, f"modules with no layer in tests/test_import_cycles.py: {unknown}"


def test_the_rule_itself() -> None:
    assert allowed("serve", "engine") and allowed("spec", "models") and allowed("profile", "models")
    assert not allowed("spec", "graph") and not allowed("profile", "engine") and not allowed("models", "spec")
    assert not allowed("core", "models") and not allowed("engine", "serve")
    graph = nx.DiGraph([("noodle.specresolve", "noodle.graph.build"), ("noodle.serve.app", "noodle.executors.base"),
                        ("noodle.profile.units", "noodle.models.loading"), ("noodle", "noodle.cli.main")])  # fmt: skip
    assert upward_edges(graph) == ["noodle.specresolve -> noodle.graph.build (layer spec imports layer graph)"]


def test_no_upward_import_between_layers() -> None:
    bad = upward_edges(import_graph())
    assert not bad, f"{len(bad)} upward imports:\n" + "\n".join(bad)
