"""Frozen core types shared by planning and execution.

Ranges are half-open everywhere: a stage ``[start, end)`` holds units
``start, start+1, ..., end-1`` of the model's unit chain.

A *placement unit* is the smallest thing a stage can hold: ``embed`` (token and
position embeddings), ``block.<i>`` (one decoder block) and ``lm_head`` (final
norm + LM head). Units form a chain in that order.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Literal

__all__ = ["GIB", "OBJECTIVES", "Objective", "BatchCurve", "Unit", "NodeProfile", "Node", "Link", "Cluster",
           "Workload", "Pin", "Constraints", "FormatOption", "Formats", "Problem", "Stage", "Plan", "unit_names"]

GIB = 2**30
Objective = Literal["throughput", "latency"]
OBJECTIVES: tuple[str, ...] = ("throughput", "latency")


def unit_names(num_blocks: int) -> list[str]:
    """Chain of placement-unit names for a decoder with ``num_blocks`` blocks."""
    return ["embed", *(f"block.{i}" for i in range(num_blocks)), "lm_head"]


@dataclass(frozen=True)
class BatchCurve:
    """A unit's decode step against the batch ``b`` of sequences it steps, on the reference device (a roofline):
    ``ms(b) = max(b * row_compute_ms, fixed_read_ms + b * row_read_ms)``: its weights are read once per step,
    each sequence adds its FLOPs and its own reads (KV cache, activations). Non-decreasing in ``b``."""

    row_compute_ms: float  # one sequence's FLOPs / peak
    fixed_read_ms: float  # bytes read once per step (the weights) / bandwidth
    row_read_ms: float  # bytes read per sequence / bandwidth

    def ms(self, batch: int) -> float:
        return max(batch * self.row_compute_ms, self.fixed_read_ms + batch * self.row_read_ms)


@dataclass(frozen=True)
class Unit:
    """One placement unit with its per-token costs on the reference device.

    Attributes:
        name: unit name (``embed``, ``block.3``, ``lm_head``).
        latency_ms: one decode step on the reference device (compute_score 1.0).
        param_bytes: bytes of weights the unit holds.
        activation_bytes: bytes the unit hands to the next one per decoded token.
        kv_bytes_per_token: KV-cache bytes per token of context (per sequence).
        prefill_ms_per_token: prefill cost per prompt token, when known (informational).
        curve: how a decode step grows with its batch (analytic models); None: measured at one batch only.
    """

    name: str
    latency_ms: float
    param_bytes: int
    activation_bytes: int
    kv_bytes_per_token: int = 0
    prefill_ms_per_token: float | None = None
    curve: BatchCurve | None = None

    def latency_at(self, batch: int) -> float:
        """One decode step of ``batch`` sequences on the reference device: the curve's figure, else ``latency_ms``."""
        return self.latency_ms if self.curve is None else self.curve.ms(batch)


@dataclass(frozen=True)
class NodeProfile:
    """Unit costs measured on one node itself, in the model's unit chain order.

    Read by :class:`~noodle.profile.pernode.PerNodeCostModel` instead of scaling the model's
    profile by ``compute_score``.

    Attributes:
        unit_names: the units measured; must be the model's chain (checked by :meth:`mismatch`).
        latency_ms: one decode step of each unit on this node, at ``batch_size`` sequences.
        batch_size: the batch size ``latency_ms`` was measured at.
        decode_ms: decode steps measured at other batch sizes: ``((batch_size, per-unit ms), ...)``.
        param_bytes: weight bytes per unit as this node loads them; None: the model's.
        kv_bytes_per_token: KV-cache bytes per token and sequence per unit; None: the model's.
        prefill_ms_per_token: prefill per prompt token per unit, when measured (informational).
        source: where the numbers come from (a profile path, or a note such as the measuring device).
        step_overhead_ms: the fixed work of one decode step of a stage on this node, whatever its units
            (slicing, masks, KV-cache bookkeeping: what timing units inside one whole-model forward misses);
            every stage placed on the node pays it once per step.
        prefill_overhead_ms: the same for one prefill step, when measured (informational, like the prefill times).
    """

    unit_names: tuple[str, ...]
    latency_ms: tuple[float, ...]
    batch_size: int = 1
    decode_ms: tuple[tuple[int, tuple[float, ...]], ...] = ()
    param_bytes: tuple[int, ...] | None = None
    kv_bytes_per_token: tuple[int, ...] | None = None
    prefill_ms_per_token: tuple[float, ...] | None = None
    source: str = "inline"
    step_overhead_ms: float = 0.0
    prefill_overhead_ms: float | None = None

    def __post_init__(self) -> None:
        n = len(self.unit_names)
        columns = {"latency_ms": self.latency_ms, "param_bytes": self.param_bytes,
                   "kv_bytes_per_token": self.kv_bytes_per_token, "prefill_ms_per_token": self.prefill_ms_per_token,
                   **{f"decode_ms[{b}]": ms for b, ms in self.decode_ms}}
        for key, col in columns.items():
            if col is not None and len(col) != n:
                raise ValueError(f"NodeProfile.{key}: {len(col)} values for {n} units")
        if self.batch_size < 1 or any(b < 1 for b, _ in self.decode_ms):
            raise ValueError("NodeProfile: batch sizes are at least 1")
        for key, ms in (("step_overhead_ms", self.step_overhead_ms), ("prefill_overhead_ms", self.prefill_overhead_ms)):
            if ms is not None and not 0.0 <= ms < float("inf"):
                raise ValueError(f"NodeProfile.{key}: {ms}; a finite time of at least 0 ms")

    def decode_latency_ms(self, batch_size: int) -> tuple[float, ...]:
        """Per-unit decode step at ``batch_size``, piecewise-linear in the measured batch sizes.

        At a measured size: its figures. Between two measured sizes ``b0 < b < b1``: each unit's
        ``ms(b0) + (ms(b1) - ms(b0)) * (b - b0) / (b1 - b0)``. Below the smallest: the smallest's figures
        (clamped: a smaller batch is assumed to cost no less). Above the largest: the slope of the last two
        sizes, floored at 0 (extrapolated; with one measured size only, that size's figures).
        """
        points = sorted({self.batch_size: self.latency_ms, **dict(self.decode_ms)}.items())
        b0, ms0 = points[0]
        if batch_size <= b0 or len(points) == 1:
            return ms0
        for (lo, ms_lo), (hi, ms_hi) in zip(points, points[1:]):
            if batch_size <= hi:
                if batch_size == hi:
                    return ms_hi
                t = (batch_size - lo) / (hi - lo)
                return tuple(a + (b - a) * t for a, b in zip(ms_lo, ms_hi))
        (lo, ms_lo), (hi, ms_hi) = points[-2], points[-1]
        t = (batch_size - hi) / (hi - lo)
        return tuple(b + max(0.0, b - a) * t for a, b in zip(ms_lo, ms_hi))

    def mismatch(self, names: Sequence[str]) -> str | None:
        """Words for the first unit where this profile and the chain ``names`` differ; None when they agree."""
        for i, (mine, theirs) in enumerate(zip(self.unit_names, names)):
            if mine != theirs:
                return f"unit {i} is {mine!r} in the node's profile but {theirs!r} in the model"
        if len(self.unit_names) != len(names):
            i = min(len(self.unit_names), len(names))
            which = (f"the model's unit {i} {names[i]!r} is missing from the node's profile" if i < len(names)
                     else f"the node's profile has an extra unit {i} {self.unit_names[i]!r}")
            return f"{len(self.unit_names)} units in the node's profile, {len(names)} in the model: {which}"
        return None


@dataclass(frozen=True)
class Node:
    """A machine (or device) that can host one contiguous stage.

    ``profile``: the node's own measured unit costs, when it has them (see :class:`NodeProfile`);
    ``compute_score`` then only serves code that reads one speed per node (the default model, orderings).
    """

    id: str
    device: str
    memory_gb: float
    compute_score: float
    address: str | None = None
    profile: NodeProfile | None = field(default=None, repr=False)

    @property
    def memory_bytes(self) -> int:
        return int(self.memory_gb * GIB)


@dataclass(frozen=True)
class Link:
    """A symmetric network link."""

    bandwidth_gbps: float
    latency_ms: float

    def transfer_ms(self, nbytes: float) -> float:
        """Latency plus serialisation time of ``nbytes`` over this link, in ms."""
        return self.latency_ms + nbytes * 8.0 / (self.bandwidth_gbps * 1e9) * 1e3


@dataclass(frozen=True)
class Cluster:
    """Nodes plus links; a pair without its own link uses ``default_link``."""

    nodes: tuple[Node, ...]
    default_link: Link
    pair_links: tuple[tuple[str, str, Link], ...] = ()
    _lookup: Mapping[frozenset[str], Link] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        lookup = {frozenset((a, b)): link for a, b, link in self.pair_links}
        object.__setattr__(self, "_lookup", lookup)

    def link(self, a: str, b: str) -> Link:
        return self._lookup.get(frozenset((a, b)), self.default_link)

    def node(self, node_id: str) -> Node:
        for n in self.nodes:
            if n.id == node_id:
                return n
        raise KeyError(node_id)

    @property
    def node_ids(self) -> list[str]:
        return [n.id for n in self.nodes]


@dataclass(frozen=True)
class Workload:
    """What the pipeline decodes: every stage's KV cache holds ``context_tokens`` for each sequence in flight.

    Two modes:

    * groups (``streams`` None, the default): ``batch_size`` sequences step together as one group (a
      micro-batch); ``concurrency`` groups are in flight at once, each on a different stage, so a stage
      holds ``batch_size * concurrency`` sequences' caches;
    * continuous batching (``streams = C``): the serving engine's mode. ``C`` sequences are in flight; with
      ``S`` stages, ``G = min(S, C)`` batches of about ``b = ceil(C / G)`` sequences circulate and every stage
      steps one batch per forward (see :func:`~noodle.graph.costmodel.batched_round_ms`). ``batch_size``
      is then the batch a stage steps, set by the planner per stage count (:meth:`at_stages`).
    """

    prompt_tokens: int = 128
    max_new_tokens: int = 64
    batch_size: int = 1
    concurrency: int = 1
    streams: int | None = None

    def __post_init__(self) -> None:
        if self.streams is not None and self.streams < 1:
            raise ValueError(f"Workload.streams: {self.streams}; at least 1 sequence in flight")

    @property
    def context_tokens(self) -> int:
        return self.prompt_tokens + self.max_new_tokens

    @property
    def sequences(self) -> int:
        """Sequences whose KV cache every stage holds at once."""
        return self.streams if self.streams is not None else self.batch_size * self.concurrency

    @property
    def batched(self) -> bool:
        """Continuous batching (``streams`` given)."""
        return self.streams is not None

    def groups(self, stages: int) -> int:
        """Batches circulating in a pipeline of ``stages`` stages: ``min(S, C)`` (batched), ``concurrency`` else."""
        return min(stages, self.streams) if self.streams is not None else self.concurrency

    def step_batch(self, stages: int) -> int:
        """Sequences a stage steps at once with ``stages`` stages: ``ceil(C / min(S, C))`` (batched), else
        ``batch_size``."""
        if self.streams is None:
            return self.batch_size
        return -(-self.streams // self.groups(stages))

    def at_stages(self, stages: int) -> Workload:
        """This workload priced for a pipeline of ``stages`` stages (batched: ``batch_size`` = the step batch)."""
        if self.streams is None:
            return self
        return replace(self, batch_size=self.step_batch(stages))

    @property
    def hop_rows(self) -> int:
        """Rows of activations one hop carries: the step batch when batched; 1 in groups mode (as always priced)."""
        return self.batch_size if self.streams is not None else 1


@dataclass(frozen=True)
class Pin:
    """Units ``[start, end)`` must all sit on ``node`` (possibly with others)."""

    start: int
    end: int
    node: str


@dataclass(frozen=True)
class Constraints:
    """User constraints every solver honours."""

    pins: tuple[Pin, ...] = ()
    exclude: frozenset[str] = frozenset()
    max_stages: int | None = None


@dataclass(frozen=True)
class FormatOption:
    """One weight format the planner may give a stage (see :mod:`noodle.graph.formats`).

    Attributes:
        name: ``float32``, ``bfloat16``, ``int8`` or ``int4`` (:mod:`noodle.models.quant`).
        units: the model's unit costs with weights in this format (reference device), in chain order.
        profiles: ``(node id, that node's own profile in this format)``; a node not listed is priced
            from ``units`` and its ``compute_score``.
        note: what was measured about its accuracy (for the plan's rationale).
    """

    name: str
    units: tuple[Unit, ...]
    profiles: tuple[tuple[str, NodeProfile], ...] = ()
    note: str = ""

    def profile(self, node_id: str) -> NodeProfile | None:
        return next((p for nid, p in self.profiles if nid == node_id), None)


@dataclass(frozen=True)
class Formats:
    """The formats a plan may choose from, most precise first (ties go to the earlier), and which node runs which."""

    options: tuple[FormatOption, ...]
    allowed: tuple[tuple[str, tuple[str, ...]], ...]  # node id -> format names, every node listed
    excluded: tuple[tuple[str, str], ...] = ()  # (format, why): asked for but over the accuracy budget

    def for_node(self, node_id: str) -> tuple[FormatOption, ...]:
        names = next((a for nid, a in self.allowed if nid == node_id), ())
        return tuple(o for o in self.options if o.name in names)

    def option(self, name: str) -> FormatOption:
        return next(o for o in self.options if o.name == name)


@dataclass(frozen=True)
class Problem:
    """Everything a solver needs: a unit chain, a cluster, a workload, an objective."""

    units: tuple[Unit, ...]
    cluster: Cluster
    workload: Workload = Workload()
    objective: str = "throughput"
    constraints: Constraints = Constraints()
    name: str = "problem"
    formats: Formats | None = None

    def __post_init__(self) -> None:
        from noodle.errors import SpecError

        if self.objective not in OBJECTIVES:
            raise SpecError(f"objective: {self.objective!r} is not one of {', '.join(OBJECTIVES)}")
        if not self.units:
            raise SpecError("units: a problem needs at least one unit")
        if not self.cluster.nodes:
            raise SpecError("cluster.nodes: a problem needs at least one node")
        names = [u.name for u in self.units]
        for node in self.cluster.nodes:
            wrong = node.profile.mismatch(names) if node.profile is not None else None
            if wrong:
                raise SpecError(f"cluster.nodes: {node.id}: profile: {wrong}; profile the same model on that node")

    @property
    def num_units(self) -> int:
        return len(self.units)

    def usable_nodes(self) -> list[Node]:
        return [n for n in self.cluster.nodes if n.id not in self.constraints.exclude]


@dataclass(frozen=True)
class Stage:
    """Units ``[start, end)`` on ``node``."""

    node: str
    start: int
    end: int

    def __len__(self) -> int:
        return self.end - self.start


@dataclass(frozen=True)
class Plan:
    """Stages in pipeline order; they cover ``[0, num_units)`` exactly."""

    stages: tuple[Stage, ...]

    @classmethod
    def from_cuts(cls, nodes: Iterable[str], cuts: Iterable[int]) -> Plan:
        """Build from node order and the boundaries ``0 = c0 < c1 < ... < cS = n``."""
        c = list(cuts)
        return cls(tuple(Stage(node, c[i], c[i + 1]) for i, node in enumerate(nodes)))

    @property
    def nodes(self) -> list[str]:
        return [s.node for s in self.stages]
