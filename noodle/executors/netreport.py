"""What the network cost in a distributed run: per hop bytes, serialization, transit, round trips.

A run of ``S`` stages has ``S + 1`` hops per step: ``coordinator -> stage 0``,
``stage i -> stage i+1`` and ``stage S-1 -> coordinator``. A hop's *transit* is the
time from its sender having the output ready to its receiver having the input
decoded and ready to compute, measured from timestamps taken on both sides. The
workers' clocks are mapped onto the coordinator's with an offset estimated at
connect time (NTP style: ``worker_clock - (sent + received) / 2`` of a ping);
on one machine the offset is ~0, across machines its error is about half a
ping's asymmetry, which is why :attr:`NetworkRunReport.network_ms_p50` (step
time minus the workers' compute, no clocks needed) is reported beside it.

The plan's ``hop_ms`` of stage ``i`` is its output's way to stage ``i+1``; for the
last stage it is the token's way back to the first, which here is the
``stage S-1 -> coordinator`` hop plus the next step's ``coordinator -> stage 0``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from noodle.executors.base import RunReport, StageReport, percentile
from noodle.plandoc import PlanDoc

__all__ = ["HopReport", "RttReport", "FailoverEvent", "NetworkRunReport", "StepTrace", "TraceBook"]



@dataclass(frozen=True)
class HopReport:
    """One hop of the pipeline, per decode step (p50) unless the name says total.

    Attributes:
        name: ``"coordinator->node0"``, ``"node0->node1"``, ``"node1->coordinator"``.
        relayed: the data went through the coordinator (gRPC star) rather than directly.
        bytes_per_decode: bytes on the wire for this hop in one decode step (both legs when relayed).
        bytes_total: bytes over the whole run, prefill included.
        serialize_ms_p50: time turning tensors into bytes and back on this hop.
        transit_ms_p50: output ready at the sender -> input ready at the receiver.
        predicted_hop_ms: the plan's ``hop_ms`` for this hand-off, when the plan has one.
    """

    name: str
    src: str
    dst: str
    relayed: bool
    bytes_per_decode: int
    bytes_total: int
    serialize_ms_p50: float
    transit_ms_p50: float
    predicted_hop_ms: float | None = None


@dataclass(frozen=True)
class RttReport:
    """A measured round trip: a worker call minus the worker's compute (gRPC), or the ring (torchrpc)."""

    peer: str
    rtt_ms_p50: float
    ping_ms: float | None = None
    clock_offset_ms: float = 0.0


@dataclass(frozen=True)
class FailoverEvent:
    """A node that stopped answering and what the coordinator did about it."""

    step: int
    node: str
    reason: str
    action: str  # "retried" | "spare" | "merged" | "restarted"
    detail: str
    replayed_steps: int
    seconds: float


@dataclass(frozen=True)
class NetworkRunReport(RunReport):
    """A :class:`RunReport` plus what the network cost and any failovers.

    ``network_ms_p50`` is the p50 over decode steps of step time minus the sum of
    the stages' compute: everything the transport added. ``network_share`` is that
    over the step's p50 time.
    """

    hops: tuple[HopReport, ...] = ()
    rtts: tuple[RttReport, ...] = ()
    network_ms_p50: float = 0.0
    network_share: float = 0.0
    failovers: tuple[FailoverEvent, ...] = ()
    data_path: str = ""

    def as_dict(self) -> dict[str, Any]:
        d = super().as_dict()
        d["hops"] = [asdict(h) for h in self.hops]
        d["rtts"] = [asdict(r) for r in self.rtts]
        d["failovers"] = [asdict(f) for f in self.failovers]
        return d


@dataclass
class StepTrace:
    """What one step through the pipeline measured (ms and bytes; index = stage or hop)."""

    prefill: bool
    step_ms: float = 0.0
    compute_ms: list[float] = field(default_factory=list)  # per stage
    transit_ms: list[float] = field(default_factory=list)  # per hop (stages + 1)
    bytes: list[int] = field(default_factory=list)  # per hop
    serialize_ms: list[float] = field(default_factory=list)  # per hop
    rtt_ms: dict[str, float] = field(default_factory=dict)  # per peer


class TraceBook:
    """Collects :class:`StepTrace` s of one generation and turns them into a report.

    Args:
        plan: the plan being run (its current stages: after a failover, the new ones).
        relayed: whether hops between stages pass through the coordinator.
    """

    def __init__(self, plan: PlanDoc, *, relayed: bool) -> None:
        self.plan = plan
        self.relayed = relayed
        self.steps: list[StepTrace] = []
        self.failovers: list[FailoverEvent] = []

    def add(self, trace: StepTrace) -> None:
        self.steps.append(trace)

    def reset_shape(self, plan: PlanDoc) -> None:
        """The pipeline changed (stages merged): keep only traces of the new shape."""
        self.plan = plan
        n = len(plan.stages)
        self.steps = [s for s in self.steps if len(s.compute_ms) == n]

    def hop_names(self) -> list[tuple[str, str]]:
        nodes = [s.node for s in self.plan.stages]
        ends = ["coordinator", *nodes, "coordinator"]
        return list(zip(ends, ends[1:]))

    def build(
        self,
        *,
        backend: str,
        emulated: bool,
        prompts: Sequence[Sequence[int]],
        n_steps: int,
        wall_s: float,
        stage_facts: Sequence[tuple[str, int, int]],
        rtt_extra: dict[str, tuple[float | None, float]] | None = None,
        data_path: str = "",
    ) -> NetworkRunReport:
        """The report; ``stage_facts[i]`` is ``(units label, param bytes, kv cache bytes)``."""
        stages = self.plan.stages
        n = len(stages)
        steps = [s for s in self.steps if len(s.compute_ms) == n] or self.steps
        decode = [s for s in steps if not s.prefill]
        prefill = next((s for s in steps if s.prefill), None)

        def col(rows: Sequence[StepTrace], attr: str, i: int) -> list[float]:
            return [float(getattr(r, attr)[i]) for r in rows if i < len(getattr(r, attr))]

        hops = []
        names = self.hop_names()
        for k, (src, dst) in enumerate(names):
            predicted = stages[k - 1].hop_ms if 1 <= k < n else (stages[-1].hop_ms if k == n else None)
            per_dec = col(decode, "bytes", k)
            hops.append(
                HopReport(
                    name=f"{src}->{dst}",
                    src=src,
                    dst=dst,
                    relayed=self.relayed and 0 < k < n,
                    bytes_per_decode=int(per_dec[-1]) if per_dec else 0,
                    bytes_total=int(sum(col(steps, "bytes", k))),
                    serialize_ms_p50=percentile(col(decode, "serialize_ms", k), 50),
                    transit_ms_p50=percentile(col(decode, "transit_ms", k), 50),
                    predicted_hop_ms=predicted,
                )
            )
        stage_reports = []
        for i, doc in enumerate(stages):
            dec = col(decode, "compute_ms", i)
            hop_after = hops[i + 1].transit_ms_p50 + (hops[0].transit_ms_p50 if i == n - 1 else 0.0)
            units, params, kv = stage_facts[i]
            stage_reports.append(
                StageReport(
                    stage_id=doc.stage_id,
                    node=doc.node,
                    start=doc.start,
                    end=doc.end,
                    units=units,
                    param_bytes=params,
                    kv_cache_bytes=kv,
                    prefill_ms=prefill.compute_ms[i] if prefill is not None and i < len(prefill.compute_ms) else 0.0,
                    decode_ms_p50=percentile(dec, 50),
                    decode_ms_p95=percentile(dec, 95),
                    hop_ms_p50=hop_after,
                    bytes_out=hops[i + 1].bytes_total,
                    bytes_out_per_decode=hops[i + 1].bytes_per_decode,
                    predicted_compute_ms=doc.compute_ms,
                    predicted_latency_ms=doc.expected_latency_ms,
                )
            )
        peers: dict[str, list[float]] = {}
        for s in decode:
            for peer, v in s.rtt_ms.items():
                peers.setdefault(peer, []).append(v)
        extra = rtt_extra or {}
        rtts = tuple(
            RttReport(peer=p, rtt_ms_p50=percentile(v, 50), ping_ms=extra.get(p, (None, 0.0))[0], clock_offset_ms=extra.get(p, (None, 0.0))[1])
            for p, v in peers.items()
        )
        step_ms = [s.step_ms for s in decode]
        net = [s.step_ms - sum(s.compute_ms) for s in decode]
        batch = len(prompts)
        decode_s = sum(step_ms) / 1e3
        dec_p50 = percentile(step_ms, 50)
        net_p50 = percentile(net, 50)
        return NetworkRunReport(
            backend=backend,
            emulated=emulated,
            batch_size=batch,
            prompt_tokens=max(len(p) for p in prompts),
            new_tokens=n_steps,
            wall_s=wall_s,
            prefill_ms=prefill.step_ms if prefill is not None else 0.0,
            decode_ms_p50=dec_p50,
            decode_ms_p95=percentile(step_ms, 95),
            tokens_per_s=batch * n_steps / wall_s if wall_s > 0 else 0.0,
            decode_tokens_per_s=batch * len(step_ms) / decode_s if decode_s > 0 else 0.0,
            stages=tuple(stage_reports),
            predicted_token_latency_ms=self.plan.predicted.token_latency_ms,
            hops=tuple(hops),
            rtts=rtts,
            network_ms_p50=net_p50,
            network_share=net_p50 / dec_p50 if dec_p50 > 0 else 0.0,
            failovers=tuple(self.failovers),
            data_path=data_path,
        )

