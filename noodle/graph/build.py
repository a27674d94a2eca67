"""The cost graph: a NetworkX view of the unit chain and the cluster.

Vertices ``("unit", i)`` carry a unit's costs; edges between consecutive units carry
the activation bytes crossing that cut. Vertices ``("node", id)`` carry a node's
capacity (and its own measured :class:`~noodle.types.NodeProfile`, or None); edges between nodes (both directions) carry the link. The graph is for
inspection and export (``noodle solve --graph FILE.graphml``); solvers read the
:class:`~noodle.types.Problem` that :func:`problem_from_graph` makes from it.
"""

from __future__ import annotations

import networkx as nx

from noodle.types import Cluster, Constraints, Link, Node, Problem, Unit, Workload

__all__ = ["build_cost_graph", "problem_from_graph"]


def build_cost_graph(units: tuple[Unit, ...], cluster: Cluster, workload: Workload) -> nx.DiGraph:
    """Build the cost graph (pure: inputs are not modified)."""
    g = nx.DiGraph(workload=workload, default_link=cluster.default_link)
    for i, u in enumerate(units):
        g.add_node(
            ("unit", i),
            kind="unit",
            name=u.name,
            latency_ms=u.latency_ms,
            param_bytes=u.param_bytes,
            activation_bytes=u.activation_bytes,
            kv_bytes_per_token=u.kv_bytes_per_token,
            prefill_ms_per_token=u.prefill_ms_per_token,
            curve=u.curve,
        )
        if i:
            g.add_edge(("unit", i - 1), ("unit", i), kind="chain", bytes=units[i - 1].activation_bytes)
    for n in cluster.nodes:
        g.add_node(
            ("node", n.id),
            kind="node",
            device=n.device,
            memory_gb=n.memory_gb,
            compute_score=n.compute_score,
            address=n.address,
            profile=n.profile,
        )
    for a in cluster.nodes:
        for b in cluster.nodes:
            if a.id != b.id:
                link = cluster.link(a.id, b.id)
                g.add_edge(
                    ("node", a.id), ("node", b.id), kind="link",
                    bandwidth_gbps=link.bandwidth_gbps, latency_ms=link.latency_ms,
                )
    return g


def problem_from_graph(
    g: nx.DiGraph,
    *,
    objective: str = "throughput",
    constraints: Constraints = Constraints(),
    name: str = "problem",
) -> Problem:
    """The solver-facing :class:`Problem` described by a cost graph."""
    unit_keys = sorted((k for k, d in g.nodes(data=True) if d["kind"] == "unit"), key=lambda k: k[1])
    units = tuple(
        Unit(
            name=g.nodes[k]["name"],
            latency_ms=g.nodes[k]["latency_ms"],
            param_bytes=g.nodes[k]["param_bytes"],
            activation_bytes=g.nodes[k]["activation_bytes"],
            kv_bytes_per_token=g.nodes[k]["kv_bytes_per_token"],
            prefill_ms_per_token=g.nodes[k]["prefill_ms_per_token"],
            curve=g.nodes[k].get("curve"),
        )
        for k in unit_keys
    )
    node_keys = [k for k, d in g.nodes(data=True) if d["kind"] == "node"]
    nodes = tuple(
        Node(
            id=k[1],
            device=g.nodes[k]["device"],
            memory_gb=g.nodes[k]["memory_gb"],
            compute_score=g.nodes[k]["compute_score"],
            address=g.nodes[k]["address"],
            profile=g.nodes[k].get("profile"),
        )
        for k in node_keys
    )
    default: Link = g.graph["default_link"]
    pairs = []
    for i, a in enumerate(node_keys):
        for b in node_keys[i + 1:]:
            d = g.edges[a, b]
            link = Link(d["bandwidth_gbps"], d["latency_ms"])
            if link != default:
                pairs.append((a[1], b[1], link))
    cluster = Cluster(nodes=nodes, default_link=default, pair_links=tuple(pairs))
    return Problem(units, cluster, g.graph["workload"], objective, constraints, name)
