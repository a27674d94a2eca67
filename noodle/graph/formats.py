"""Weight formats as a planning decision: each stage holds its units on one node in one format.

A problem with :class:`~noodle.types.Formats` gives every node a set of allowed formats
``F_v`` (already filtered by the spec's accuracy budget and by what the node's device can
run), and per format ``f`` the unit costs ``d_v^f(i)`` and ``bytes_v^f(i)`` (the node's own
profile in that format, else the format's model profile over ``compute_score``, exactly as
:class:`~noodle.profile.pernode.PerNodeCostModel` prices one format). The extended model lets
a plan choose, per stage ``k``, a *virtual* node ``(v_k, f_k)`` with ``f_k in F_{v_k}``; each
physical node still holds at most one stage, hence one format.

Stage ``k``'s format touches nothing but stage ``k``'s own compute and memory (activations
between stages stay float32, so hops and the token's return do not depend on it), and both
objectives (sum and max of stage totals) are non-decreasing in every stage's compute. So
the best format of a stage is decided by its segment alone::

    C_v[s, e] = min { C_v^f[s, e] : f in F_v, M_v^f[s, e] <= memory_v }    (INF when none fits)

and a solver that is exact on the tables ``C`` (every exact solver here: they read
:func:`~noodle.solvers.tables.build_tables`'s arrays, additive or not) is exact on the
extended model; ``tests/graph/test_formats.py`` checks it against brute force over
(order, cuts, format per stage). Ties go to the more precise format (the earlier in
``Formats.options``).

After solving, :func:`choose_formats` keeps that choice but, for the throughput objective,
raises a stage that is not the bottleneck to the most precise format that still fits and
keeps it at or under the bottleneck: the same objective value, less quantization.
"""

from __future__ import annotations

from dataclasses import replace

from noodle.profile.pernode import PerNodeCostModel
from noodle.errors import SpecError
from noodle.types import GIB, FormatOption, Formats, Node, Plan, Problem

__all__ = ["FormatCostModel", "FixedFormats", "choose_formats", "format_reason"]



def _formats(problem: Problem) -> Formats:
    """The problem's weight formats; a problem without them is priced by the other cost models."""
    if problem.formats is None:
        raise SpecError(f"{problem.name}: formats: none allowed; the format cost model needs the spec's `formats`")
    return problem.formats

class FormatCostModel:
    """Prices a segment in its best allowed format (see the module docstring)."""

    name = "per-node+formats"

    def __init__(self) -> None:
        self._key: object = None
        self._variants: dict[str, tuple[Problem, PerNodeCostModel]] = {}

    def _variant(self, problem: Problem, fmt: FormatOption) -> tuple[Problem, PerNodeCostModel]:
        """The problem as if every unit were in ``fmt`` (cached for the last problem seen)."""
        if self._key is not problem:
            self._key, self._variants = problem, {}
        hit = self._variants.get(fmt.name)
        if hit is None:
            nodes = tuple(replace(n, profile=fmt.profile(n.id)) for n in problem.cluster.nodes)
            var = replace(problem, units=fmt.units, cluster=replace(problem.cluster, nodes=nodes), formats=None)
            hit = self._variants[fmt.name] = (var, PerNodeCostModel())
        return hit

    def options(self, problem: Problem, node: Node, start: int, end: int) -> list[tuple[str, float, int]]:
        """``(format, compute ms, memory bytes)`` of units ``[start, end)`` on ``node`` in each allowed format."""
        out = []
        for fmt in _formats(problem).for_node(node.id):
            var, cm = self._variant(problem, fmt)
            vnode = var.cluster.node(node.id)
            out.append((fmt.name, cm.stage_compute_ms(var, vnode, start, end),
                        cm.stage_memory_bytes(var, vnode, start, end)))
        return out

    def best(self, problem: Problem, node: Node, start: int, end: int) -> tuple[str, float, int]:
        """The fastest allowed format that fits the node's memory (ties: the more precise); the smallest if none fits."""
        opts = self.options(problem, node, start, end)
        fits = [o for o in opts if o[2] <= node.memory_bytes]
        if fits:
            return min(fits, key=lambda o: o[1])  # min keeps the first of equals: the more precise
        return min(opts, key=lambda o: o[2])

    def stage_compute_ms(self, problem: Problem, node: Node, start: int, end: int) -> float:
        return self.best(problem, node, start, end)[1]

    def stage_memory_bytes(self, problem: Problem, node: Node, start: int, end: int) -> int:
        return self.best(problem, node, start, end)[2]

    def hop_ms(self, problem: Problem, src: Node, dst: Node, cut: int) -> float:
        nbytes = problem.units[cut - 1].activation_bytes * problem.workload.hop_rows  # a batched step's rows
        return problem.cluster.link(src.id, dst.id).transfer_ms(nbytes)

    def return_ms(self, problem: Problem, last: Node, first: Node) -> float:
        return problem.cluster.link(last.id, first.id).latency_ms


class FixedFormats(FormatCostModel):
    """Prices each stage of one plan in the format chosen for it (other segments as :class:`FormatCostModel`)."""

    def __init__(self, chosen: dict[tuple[str, int, int], str]) -> None:
        super().__init__()
        self.chosen = dict(chosen)

    def best(self, problem: Problem, node: Node, start: int, end: int) -> tuple[str, float, int]:
        fmt = self.chosen.get((node.id, start, end))
        if fmt is None:
            return super().best(problem, node, start, end)
        return next(o for o in self.options(problem, node, start, end) if o[0] == fmt)


def choose_formats(problem: Problem, plan: Plan, cm: FormatCostModel | None = None) -> list[str]:
    """The format of each stage of ``plan``: the segment's best, raised to a more precise one where free.

    For throughput a stage below the bottleneck takes the most precise allowed format that fits
    memory and keeps its total (compute + out) at or under the bottleneck; for latency every extra
    millisecond counts, so the fastest format stays. Under continuous batching (``workload.streams``) the
    stages are priced at the plan's step batch, and a stage is raised (either objective) only when the round
    is ``G * bottleneck`` (``S <= streams``), which a stage at or under the bottleneck cannot grow.
    """
    cm = cm or FormatCostModel()
    w = problem.workload
    raise_ok = problem.objective == "throughput"
    if w.batched and w.streams is not None:
        problem = replace(problem, workload=w.at_stages(len(plan.stages)))
        raise_ok = len(plan.stages) <= w.streams
    nodes = [problem.cluster.node(st.node) for st in plan.stages]
    outs = [cm.hop_ms(problem, a, b, st.end) for st, a, b in zip(plan.stages, nodes, nodes[1:])]
    outs.append(cm.return_ms(problem, nodes[-1], nodes[0]) if len(nodes) > 1 else 0.0)
    best = [cm.best(problem, nd, st.start, st.end) for st, nd in zip(plan.stages, nodes)]
    bottleneck = max(b[1] + out for b, out in zip(best, outs))
    chosen = []
    for st, node, (name, _, _), out in zip(plan.stages, nodes, best, outs):
        if raise_ok:
            for fmt, ms, mem in cm.options(problem, node, st.start, st.end):
                if mem <= node.memory_bytes and ms + out <= bottleneck:
                    name = fmt  # options are most precise first
                    break
        chosen.append(name)
    return chosen


def format_reason(problem: Problem, node: Node, start: int, end: int, fmt: str, cm: FormatCostModel) -> str:
    """Words for why ``fmt`` holds units ``[start, end)`` on ``node``, against the other allowed formats."""
    formats = _formats(problem)
    opts = cm.options(problem, node, start, end)
    mine = next(o for o in opts if o[0] == fmt)
    note = formats.option(fmt).note
    parts = [f"format {fmt}" + (f" ({note})" if note else "")]
    others = []
    for name, ms, mem in opts:
        if name == fmt:
            continue
        if mem > node.memory_bytes:
            others.append(f"{name} would need {mem / GIB:.3f} GiB > {node.memory_gb:g} GiB")
        elif ms > mine[1]:
            others.append(f"{name} {ms:.3f} ms vs {mine[1]:.3f} ms")
        else:
            others.append(f"{name} {ms:.3f} ms is faster but not needed (not the bottleneck) or less precise")
    dropped = [o.name for o in formats.options if o.name not in {n for n, _, _ in opts}]
    if others:
        parts.append("; ".join(others))
    tail = []
    if dropped:
        tail.append(f"not allowed on {node.id} ({node.device}): {', '.join(dropped)}")
    tail += [f"{name} over the accuracy budget ({why.removesuffix(': over the accuracy budget')})"
             for name, why in formats.excluded]
    head = ": ".join(parts)
    return "; ".join([head, *tail])
