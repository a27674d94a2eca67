"""Run a list of prompts through an executor's pipeline, several in flight, and report.

What ``noodle exec --concurrency N`` and the pipeline benchmark call: every prompt is
its own request (grouped ``micro_batch`` at a time), at most ``concurrency`` groups
in flight; the report adds tokens/s over the run next to the plan's tokens/s for
that configuration, and per-request time to first token and inter-token latency.
"""

from __future__ import annotations

import time
from dataclasses import replace
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from noodle.errors import ExecutorError
from noodle.executors.base import RunReport, RunResult, StageReport
from noodle.executors.generation import Sampling
from noodle.executors.scheduler import Completion, predicted_tokens_per_s
from noodle.plandoc import Predicted

__all__ = ["run_concurrent", "steady_tokens_per_s"]


def _pct(values: Sequence[float], q: float) -> float | None:
    return float(np.percentile(values, q)) * 1e3 if len(values) else None


def steady_tokens_per_s(comps: Sequence[Completion], concurrency: int) -> float | None:
    """Tokens/s while the pipeline was full: from the moment ``concurrency`` requests had started
    (each had its first token) to the moment the last request started (the queue ran dry).

    Token times are taken from each completion's TTFT and inter-token gaps, relative to its
    submission; ``run_concurrent`` submits every request before the pipeline starts.
    ``None`` when there were not more requests than slots.
    """
    firsts = sorted(c.ttft_s for c in comps if c.ttft_s is not None)
    if len(firsts) <= concurrency:
        return None
    lo, hi = firsts[concurrency - 1], firsts[-1]
    if hi <= lo:
        return None
    n = 0
    for c in comps:
        if c.ttft_s is None:
            continue
        t = c.ttft_s
        n += lo < t <= hi
        for gap in c.itl_s:
            t += gap
            n += lo < t <= hi
    return n / (hi - lo)


def run_concurrent(
    executor: Any,
    prompts: Sequence[Sequence[int]],
    *,
    max_new_tokens: int,
    sampling: Sampling = Sampling(),
    concurrency: int = 1,
    micro_batch: int = 1,
    prefill_chunk: int = 0,
    on_done: Callable[[int], None] | None = None,
    batching: str = "groups",
    max_batch_tokens: int = 256,
) -> RunResult:
    """Generate for every prompt with up to ``concurrency`` groups in flight (the executor must be entered).

    Every request gets ``sampling`` with its own seed (``seed + index``), so sampled runs are
    reproducible whatever the interleaving. ``on_done(n)`` is called as requests finish. ``batching``:
    see :func:`noodle.executors.batching.make_pipeline` (``auto`` with ``micro_batch > 1`` means groups).
    """
    if batching == "auto" and micro_batch > 1:
        batching = "groups"
    pipe = executor.pipeline(concurrency=concurrency, micro_batch=micro_batch, prefill_chunk=prefill_chunk,
                             max_queue=max(1, len(prompts)), batching=batching, max_batch_tokens=max_batch_tokens)  # fmt: skip
    finished = [0]

    def done(_: Completion) -> None:
        finished[0] += 1
        if on_done is not None:
            on_done(finished[0])

    handles = []
    for i, p in enumerate(prompts):
        s = sampling if sampling.greedy else replace(sampling, seed=sampling.seed + i)
        handles.append(pipe.submit(p, max_new_tokens=max_new_tokens, sampling=s, on_done=done))
    t0 = time.perf_counter()
    with pipe:
        comps = [h.result() for h in handles]
        wall = time.perf_counter() - t0
        stats = pipe.stats(window_s=max(wall, 1e-3))
    failed = [c for c in comps if c.finish_reason == "error"]
    if failed:
        raise ExecutorError(f"{len(failed)} of {len(comps)} requests failed; first: {failed[0].error}")
    plan = executor.plan
    total = sum(len(c.tokens) for c in comps)
    ttft = [c.ttft_s for c in comps if c.ttft_s is not None]
    itl = [x for c in comps for x in c.itl_s]
    local_stages = list(getattr(executor, "stages", None) or [])
    weights = [s.param_bytes() for s in local_stages] if len(local_stages) == len(plan.stages) else [0] * len(plan.stages)
    # One lane per stage (local, grpc) gives per-stage figures; the torchrpc ring has two lanes (send,
    # receive) on the coordinator, so its stages are reported with the plan's figures only.
    per_stage = len(stats.stages) == len(plan.stages)
    stages = []
    for k, (doc, w) in enumerate(zip(plan.stages, weights)):
        lane = stats.stages[k] if per_stage else None
        stages.append(
            StageReport(
                stage_id=doc.stage_id, node=doc.node, start=doc.start, end=doc.end,
                units=doc.layers[0] if len(doc.layers) == 1 else f"{doc.layers[0]}..{doc.layers[-1]}",
                param_bytes=w, kv_cache_bytes=0, prefill_ms=0.0,
                decode_ms_p50=max(0.0, lane.step_ms_p50 - lane.hop_ms_p50) if lane else 0.0,
                decode_ms_p95=max(0.0, lane.step_ms_p95 - lane.hop_ms_p50) if lane else 0.0,
                hop_ms_p50=lane.hop_ms_p50 if lane else 0.0, bytes_out=lane.bytes_out if lane else 0,
                bytes_out_per_decode=0, predicted_compute_ms=doc.compute_ms,
                predicted_latency_ms=doc.expected_latency_ms, busy_fraction=lane.busy_fraction if lane else None,
            )  # fmt: skip
        )
    pred = plan.predicted
    mode = getattr(pipe, "batching", "groups")
    tps = total / wall if wall > 0 else 0.0
    groups = max(1, min(concurrency, -(-(stats.peak_in_flight or 1) // micro_batch)))  # KV memory may admit fewer
    report = RunReport(
        backend=executor.name, emulated=bool(getattr(executor, "emulate", False)), batch_size=micro_batch,
        prompt_tokens=max(len(p) for p in prompts), new_tokens=max(len(c.tokens) for c in comps), wall_s=wall,
        prefill_ms=_pct(ttft, 50) or 0.0, decode_ms_p50=_pct(itl, 50) or 0.0, decode_ms_p95=_pct(itl, 95) or 0.0,
        tokens_per_s=tps, decode_tokens_per_s=tps, stages=tuple(stages),
        predicted_token_latency_ms=pred.token_latency_ms, concurrency=concurrency, micro_batch=micro_batch,
        prefill_chunk=prefill_chunk, requests=len(prompts),
        predicted_tokens_per_s=_predicted(pred, mode, concurrency, groups, micro_batch),
        batching=mode,
        ttft_ms_p50=_pct(ttft, 50), ttft_ms_p95=_pct(ttft, 95), itl_ms_p50=_pct(itl, 50), itl_ms_p95=_pct(itl, 95),
        steady_tokens_per_s=steady_tokens_per_s(comps, min(concurrency * micro_batch, stats.peak_in_flight or 1)),
        peak_in_flight=stats.peak_in_flight,
    )  # fmt: skip
    return RunResult(tokens=[c.tokens for c in comps], report=report)


def _predicted(pred: Predicted, mode: str, concurrency: int, groups: int, micro_batch: int) -> float | None:
    """The plan's tokens/s for this run: batched, the plan's own figure when it was priced for this many
    streams (None otherwise: the plan cannot be re-priced here); grouped, ``groups`` groups of ``micro_batch``."""
    if mode == "continuous":
        return pred.pipeline_tokens_per_s if pred.streams == concurrency else None
    if pred.streams is not None:  # a batched plan run in groups: its figures are priced at another batch
        return None
    return predicted_tokens_per_s(pred.token_latency_ms, pred.bottleneck_ms, groups, micro_batch)
