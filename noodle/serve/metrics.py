"""Prometheus metrics of the server (prometheus-client), one registry per app.

Request-side figures (counts by endpoint and status, time to first token, inter-token
latency, generated tokens) are recorded as requests run; pipeline figures (queue depth,
in flight, tokens/s, per-stage busy fraction, step time next to the planned time, hop
latency and bytes) are read from ``pipeline.stats()`` at scrape time by a collector.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

__all__ = ["ServeMetrics", "stage_rows", "field_of", "predicted_tps", "CONTENT_TYPE"]

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


def field_of(obj: Any, name: str, default: Any = None) -> Any:
    """``obj.name`` or ``obj[name]``: per-stage stats may be dataclasses or mappings."""
    if isinstance(obj, dict):
        return obj.get(name, default)
    return getattr(obj, name, default)


def predicted_tps(plan: Any) -> float:
    """The served plan's predicted tokens/s with its workload in flight: the batched pipeline's (``streams / round``)
    under continuous batching, the groups' pipeline figure else, one sequence's without either; 0 without a plan."""
    plan = getattr(plan, "current", plan)  # a LivePlan reads through to its plan
    if plan is None:
        return 0.0
    p = plan.predicted
    return float(p.pipeline_tokens_per_s or p.tokens_per_s or 0.0)


def _plan_gauges(plan: Any) -> Iterator[Metric]:
    plan = getattr(plan, "current", plan)
    if plan is None:
        return
    p = plan.predicted
    for name, doc, value in (
        ("noodle_plan_predicted_tokens_per_second", "the served plan's predicted tokens/s (the batched pipeline's "
         "under continuous batching)", predicted_tps(plan)),
        ("noodle_plan_streams", "sequences in flight the plan is priced for under continuous batching (0: priced "
         "in groups)", p.streams or 0),
        ("noodle_plan_step_batch", "sequences the plan prices each stage's step at (continuous batching; 0: groups)",
         p.step_batch or 0),
    ):
        g = GaugeMetricFamily(name, doc)
        g.add_metric([], float(value))
        yield g


def stage_rows(stats: Any, plan: Any) -> list[dict[str, Any]]:
    """Per-stage measured figures beside the plan's, as plain dicts (for metrics and the status page)."""
    rows = []
    measured = list(field_of(stats, "stages", ()) or ()) if stats is not None else []
    for i, doc in enumerate(plan.stages):
        m = measured[i] if i < len(measured) else None
        rows.append(
            {
                "stage": doc.stage_id,
                "node": doc.node,
                "device": doc.device,
                "units": doc.layers[0] if len(doc.layers) == 1 else f"{doc.layers[0]}..{doc.layers[-1]}",
                "n_units": len(doc.layers),
                "planned_ms": float(field_of(m, "planned_ms", None) or doc.expected_latency_ms),
                "planned_compute_ms": doc.compute_ms,
                "busy_fraction": float(field_of(m, "busy_fraction", 0.0) or 0.0),
                "step_ms_p50": float(field_of(m, "step_ms_p50", 0.0) or 0.0),
                "hop_ms_p50": float(field_of(m, "hop_ms_p50", 0.0) or 0.0),
                "bytes_out": int(field_of(m, "bytes_out", 0) or 0),
                "memory_mb": doc.memory_required_mb,
            }
        )
    return rows


class _PipelineCollector(Collector):
    def __init__(self, runtime: Any, plan: Any) -> None:
        self._rt = runtime
        self._plan = plan

    def collect(self) -> Iterator[Metric]:
        stats = self._rt.stats()
        ready = GaugeMetricFamily("noodle_ready", "1 once the stages are loaded and requests are accepted")
        ready.add_metric([], 1.0 if self._rt.state == "ready" else 0.0)
        yield ready
        yield from _plan_gauges(self._plan)
        if stats is None:
            return
        for name, doc, attr in (
            ("noodle_queue_depth", "requests waiting for a slot in the pipeline", "queue_depth"),
            ("noodle_in_flight", "sequences being generated", "in_flight"),
            ("noodle_tokens_per_second", "generated tokens per second (recent window)", "tokens_per_s"),
        ):
            g = GaugeMetricFamily(name, doc)
            g.add_metric([], float(field_of(stats, attr, 0) or 0))
            yield g
        done = CounterMetricFamily("noodle_pipeline_completed", "requests the pipeline finished")
        done.add_metric([], float(field_of(stats, "completed", 0) or 0))
        yield done
        pre = CounterMetricFamily("noodle_preemptions", "sequences sent back to the queue to free KV memory (recomputed)")
        pre.add_metric([], float(field_of(stats, "preemptions", 0) or 0))
        yield pre
        kv = GaugeMetricFamily("noodle_kv_tokens", "KV cache tokens of the tightest stage", labels=["kind"])
        cap = field_of(stats, "kv_capacity_tokens", None)
        if cap is not None:
            kv.add_metric(["capacity"], float(cap))
        kv.add_metric(["reserved"], float(field_of(stats, "kv_reserved_tokens", 0) or 0))
        yield kv
        failovers = field_of(stats, "failovers", None)
        if failovers is not None:
            fo = CounterMetricFamily("noodle_failovers", "stages moved to a spare worker")
            fo.add_metric([], float(len(failovers) if isinstance(failovers, (list, tuple)) else failovers))
            yield fo
        labels = ["stage", "node"]
        busy = GaugeMetricFamily("noodle_stage_busy_fraction", "fraction of recent time the stage was computing", labels=labels)
        step = GaugeMetricFamily("noodle_stage_step_ms", "per-step time of the stage, measured p50 and planned",
                                 labels=[*labels, "kind"])  # fmt: skip
        hop = GaugeMetricFamily("noodle_stage_hop_ms", "p50 time handing the stage's output on", labels=labels)
        nbytes = CounterMetricFamily("noodle_stage_bytes_out", "bytes the stage handed on", labels=labels)
        for row in stage_rows(stats, self._plan):
            key = [str(row["stage"]), row["node"]]
            busy.add_metric(key, row["busy_fraction"])
            step.add_metric([*key, "measured"], row["step_ms_p50"])
            step.add_metric([*key, "planned"], row["planned_ms"])
            hop.add_metric(key, row["hop_ms_p50"])
            nbytes.add_metric(key, float(row["bytes_out"]))
        yield from (busy, step, hop, nbytes)


class ServeMetrics:
    """Every metric of one server, in its own registry (several apps can live in one process)."""

    def __init__(self, runtime: Any, plan: Any) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("noodle_requests", "HTTP requests by endpoint and status", ["endpoint", "status"], registry=r)
        self.ttft = Histogram("noodle_time_to_first_token_seconds", "from request arrival to its first token",
                              buckets=_LATENCY_BUCKETS, registry=r)  # fmt: skip
        self.itl = Histogram("noodle_inter_token_latency_seconds", "between consecutive tokens of a request",
                             buckets=_LATENCY_BUCKETS, registry=r)  # fmt: skip
        self.tokens = Counter("noodle_generated_tokens", "tokens generated for clients", registry=r)
        self.prompt_tokens = Counter("noodle_prompt_tokens", "prompt tokens of accepted requests", registry=r)
        r.register(_PipelineCollector(runtime, plan))

    def token_latency(self, kind: str, seconds: float) -> None:
        (self.ttft if kind == "ttft" else self.itl).observe(seconds)
        self.tokens.inc()

    def render(self) -> bytes:
        return generate_latest(self.registry)

    def request_counts(self) -> dict[str, int]:
        """``{"<endpoint> <status>": count}`` for the status page."""
        out: dict[str, int] = {}
        for metric in self.requests.collect():
            for s in metric.samples:
                if s.name.endswith("_total"):
                    out[f"{s.labels['endpoint']} {s.labels['status']}"] = int(s.value)
        return out
