"""Prometheus metrics of the server (prometheus-client), one registry per app.

Request-side figures (counts by endpoint and status, time to first token, inter-token
latency, generated tokens) are recorded as requests run; pipeline figures (queue depth,
in flight, tokens/s, per-stage busy fraction, step time next to the planned time, hop
latency and bytes) are read from ``pipeline.stats()`` at scrape time by a collector.

Beside noodle's own ``noodle_*`` series, the request-level series also go out under vLLM's
names (``vllm:time_to_first_token_seconds``, ``vllm:num_requests_running``, ... labelled
``model_name``; names, kinds and buckets as ``vllm/v1/metrics/loggers.py`` has them, the latency
buckets extended below 10 ms for CPU-sized models), so dashboards written for vLLM read them.

A server of several models keeps one :class:`ServeMetrics` per model and renders them as one exposition
(:func:`merged_registry`): every series of a model carries its ``model_name`` (the ``noodle_*`` ones too),
each metric family once, as Prometheus wants it; ``noodle_requests`` (HTTP, by endpoint) is the server's.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from noodle.serve.runtime import RequestObserver

__all__ = ["ServeMetrics", "merged_registry", "stage_rows", "field_of", "predicted_tps", "count_buckets", "CONTENT_TYPE"]

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
_VLLM_TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
                      20.0, 40.0, 80.0, 160.0, 640.0, 2560.0)  # fmt: skip
_VLLM_TOKEN_BUCKETS = (0.001, 0.0025, 0.005, 0.0075, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75,
                       1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0)  # fmt: skip
_VLLM_REQUEST_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0,
                         40.0, 50.0, 60.0, 120.0, 240.0, 480.0, 960.0, 1920.0, 7680.0)  # fmt: skip
# noodle's finish reasons -> vLLM's finished_reason label
_FINISHED = {"stop": "stop", "length": "length", "error": "error", "timeout": "abort", "cancelled": "abort",
             "disconnected": "abort"}  # fmt: skip


def count_buckets(most: int) -> tuple[float, ...]:
    """1, 2, 5, 10, 20, 50, ... up to ``most`` (vLLM's buckets for token counts)."""
    out: list[float] = []
    scale = 1
    while True:
        for m in (1, 2, 5):
            if m * scale > most:
                return tuple(out) or (1.0,)
            out.append(float(m * scale))
        scale *= 10


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
    gap = getattr(getattr(plan, "solver", None), "gap", None)
    if gap is not None:  # a heuristic's plan has no proven bound, so no gap to export
        g = GaugeMetricFamily("noodle_plan_optimality_gap", "the solver's relative gap between the served plan's "
                              "objective and its proven lower bound, (objective - bound) / objective (0: proven optimal)")  # fmt: skip
        g.add_metric([], float(gap))
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
    def __init__(self, runtime: Any, plan: Any, model_name: str) -> None:
        self._rt = runtime
        self._plan = plan
        self._model = model_name

    def _vllm(self, stats: Any) -> Iterator[Metric]:
        """The engine's state under vLLM's names (zeros before the pipeline runs)."""
        labels = ["model_name"]
        cap = field_of(stats, "kv_capacity_tokens", None) if stats is not None else None
        reserved = float(field_of(stats, "kv_reserved_tokens", 0) or 0) if stats is not None else 0.0
        for name, doc, value in (
            ("vllm:num_requests_running", "Number of requests in model execution batches.",
             field_of(stats, "in_flight", 0) if stats is not None else 0),
            ("vllm:num_requests_waiting", "Number of requests waiting to be processed.",
             field_of(stats, "queue_depth", 0) if stats is not None else 0),
            ("vllm:kv_cache_usage_perc", "KV-cache usage of the tightest stage. 1 means 100 percent usage "
             "(0 while no stage has a KV budget).", reserved / cap if cap else 0.0),
        ):  # fmt: skip
            g = GaugeMetricFamily(name, doc, labels=labels)
            g.add_metric([self._model], float(value or 0))
            yield g
        pre = CounterMetricFamily("vllm:num_preemptions", "Cumulative number of preemption from the engine.",
                                  labels=labels)  # fmt: skip
        pre.add_metric([self._model], float(field_of(stats, "preemptions", 0) or 0) if stats is not None else 0.0)
        yield pre

    def collect(self) -> Iterator[Metric]:
        stats = self._rt.stats()
        ready = GaugeMetricFamily("noodle_ready", "1 once the stages are loaded and requests are accepted")
        ready.add_metric([], 1.0 if self._rt.state == "ready" else 0.0)
        yield ready
        yield from _plan_gauges(self._plan)
        yield from self._vllm(stats)
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


class ServeMetrics(RequestObserver):
    """Every metric of one server, in its own registry (several apps can live in one process).

    It is the runtime's :class:`~noodle.serve.runtime.RequestObserver`: each request's timings and
    token counts go to the ``noodle_*`` series and to the vLLM-named ones.
    """

    def __init__(self, runtime: Any, plan: Any, *, model_name: str = "noodle") -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("noodle_requests", "HTTP requests by endpoint and status", ["endpoint", "status"], registry=r)
        self.ttft = Histogram("noodle_time_to_first_token_seconds", "from request arrival to its first token",
                              buckets=_LATENCY_BUCKETS, registry=r)  # fmt: skip
        self.itl = Histogram("noodle_inter_token_latency_seconds", "between consecutive tokens of a request",
                             buckets=_LATENCY_BUCKETS, registry=r)  # fmt: skip
        self.tokens = Counter("noodle_generated_tokens", "tokens generated for clients", registry=r)
        self.prompt_tokens = Counter("noodle_prompt_tokens", "prompt tokens read (counted at each request's first "
                                     "token)", registry=r)  # fmt: skip
        self._vllm(model_name, int(getattr(getattr(runtime, "limits", None), "context_tokens", 0) or 0) or 8192)
        r.register(_PipelineCollector(runtime, plan, model_name))

    def _vllm(self, model: str, context: int) -> None:
        r, lab = self.registry, ["model_name"]

        def hist(name: str, doc: str, buckets: tuple[float, ...]) -> Any:
            return Histogram(name, doc, lab, buckets=buckets, registry=r).labels(model)

        self.v_ttft = hist("vllm:time_to_first_token_seconds", "Histogram of time to first token in seconds.",
                           _VLLM_TTFT_BUCKETS)  # fmt: skip
        self.v_itl = hist("vllm:inter_token_latency_seconds", "Histogram of inter-token latency in seconds.",
                          _VLLM_TOKEN_BUCKETS)  # fmt: skip
        self.v_tpot = hist("vllm:time_per_output_token_seconds", "Histogram of time per output token in seconds "
                           "(the older name of the inter-token latency; the same observations).",
                           _VLLM_TOKEN_BUCKETS)  # fmt: skip
        self.v_e2e = hist("vllm:e2e_request_latency_seconds", "Histogram of e2e request latency in seconds.",
                          _VLLM_REQUEST_BUCKETS)  # fmt: skip
        self.v_queue = hist("vllm:request_queue_time_seconds", "Histogram of time spent in WAITING phase for request.",
                            _VLLM_REQUEST_BUCKETS)  # fmt: skip
        self.v_prompt_hist = hist("vllm:request_prompt_tokens", "Number of prefill tokens processed.",
                                  count_buckets(context))  # fmt: skip
        self.v_gen_hist = hist("vllm:request_generation_tokens", "Number of generation tokens processed.",
                               count_buckets(context))  # fmt: skip
        self.v_prompt = Counter("vllm:prompt_tokens", "Number of prefill tokens processed.", lab, registry=r).labels(model)
        self.v_gen = Counter("vllm:generation_tokens", "Number of generation tokens processed.", lab,
                             registry=r).labels(model)  # fmt: skip
        success = Counter("vllm:request_success", "Count of successfully processed requests.",
                          [*lab, "finished_reason"], registry=r)  # fmt: skip
        self.v_success = {reason: success.labels(model, reason) for reason in sorted(set(_FINISHED.values()))}
        # Requests that ran to their end (stop or length) since the server started: the status page's count, which a
        # re-plan (a new pipeline, whose own count starts at 0) does not reset.
        self.completed = 0

    # -- RequestObserver -------------------------------------------------------------------------
    def first_token(self, seconds: float, prompt_tokens: int) -> None:
        self.ttft.observe(seconds)
        self.v_ttft.observe(seconds)
        self.prompt_tokens.inc(prompt_tokens)
        self.v_prompt.inc(prompt_tokens)
        self.tokens.inc()
        self.v_gen.inc()

    def next_token(self, seconds: float) -> None:
        self.itl.observe(seconds)
        self.v_itl.observe(seconds)
        self.v_tpot.observe(seconds)
        self.tokens.inc()
        self.v_gen.inc()

    def queued(self, seconds: float) -> None:
        self.v_queue.observe(seconds)

    def finished(self, reason: str, prompt_tokens: int, completion_tokens: int, seconds: float) -> None:
        self.v_e2e.observe(seconds)
        self.v_prompt_hist.observe(prompt_tokens)
        self.v_gen_hist.observe(completion_tokens)
        self.v_success[_FINISHED.get(reason, "abort")].inc()
        if reason in ("stop", "length"):
            self.completed += 1

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


_SERVER_FAMILIES = frozenset({"noodle_requests"})  # counted once for the server (the first model's registry)


class _Merged(Collector):
    def __init__(self, registries: Sequence[tuple[str, CollectorRegistry]]) -> None:
        self._registries = list(registries)

    def collect(self) -> Iterator[Metric]:
        families: dict[str, Metric] = {}
        for i, (model, registry) in enumerate(self._registries):
            for fam in registry.collect():
                if fam.name in _SERVER_FAMILIES:
                    if i == 0:
                        families[fam.name] = fam
                    continue
                out = families.setdefault(fam.name, Metric(fam.name, fam.documentation, fam.type, fam.unit))
                for sample in fam.samples:
                    labels = sample.labels if "model_name" in sample.labels else {"model_name": model, **sample.labels}
                    out.samples.append(sample._replace(labels=labels))
        yield from families.values()


def merged_registry(registries: Sequence[tuple[str, CollectorRegistry]]) -> CollectorRegistry:
    """One registry rendering several models' registries (``(model_name, registry)``) as one exposition."""
    out = CollectorRegistry(auto_describe=False)
    out.register(_Merged(registries))
    return out
