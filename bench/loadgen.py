"""An async load generator for an OpenAI-compatible server (httpx, streaming completions).

``concurrency`` clients each send streaming ``/v1/completions`` requests back to back for
``duration_s``; per request it records the time to the first text chunk (TTFT), the gaps
between text chunks (inter-token latency, ITL) and the server's ``usage.completion_tokens``.
:func:`summarize` turns a level's records into requests/s, output tokens/s and p50/p95/p99.
"""

from __future__ import annotations

import asyncio
import json
import time
from dataclasses import asdict, dataclass
from typing import Any

import httpx
import numpy as np

__all__ = ["RequestRecord", "LevelResult", "run_level", "summarize"]


@dataclass(frozen=True)
class RequestRecord:
    ok: bool
    status: int
    start_s: float
    end_s: float
    ttft_s: float | None
    itl_s: tuple[float, ...]
    completion_tokens: int


@dataclass(frozen=True)
class LevelResult:
    """One concurrency level: throughput and latency percentiles (seconds as milliseconds)."""

    concurrency: int
    requests: int
    errors: int
    wall_s: float
    requests_per_s: float
    output_tokens_per_s: float
    ttft_ms_p50: float
    ttft_ms_p95: float
    ttft_ms_p99: float
    itl_ms_p50: float
    itl_ms_p95: float
    itl_ms_p99: float
    predicted_tokens_per_s: float | None = None

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


async def _one(client: httpx.AsyncClient, body: dict[str, Any], t0: float) -> RequestRecord:
    start = time.perf_counter()
    first: float | None = None
    last: float | None = None
    gaps: list[float] = []
    tokens = 0
    try:
        async with client.stream("POST", "/v1/completions", json=body) as r:
            if r.status_code != 200:
                await r.aread()
                return RequestRecord(False, r.status_code, start - t0, time.perf_counter() - t0, None, (), 0)
            async for line in r.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line[6:])
                if chunk.get("usage"):
                    tokens = int(chunk["usage"]["completion_tokens"])
                choices = chunk.get("choices") or []
                if choices and choices[0].get("finish_reason") is None:  # one chunk per token (text may be "")
                    now = time.perf_counter()
                    if first is None:
                        first = now
                    else:
                        gaps.append(now - (last or now))
                    last = now
    except httpx.HTTPError:
        return RequestRecord(False, 0, start - t0, time.perf_counter() - t0, None, (), 0)
    ttft = None if first is None else first - start
    return RequestRecord(True, 200, start - t0, time.perf_counter() - t0, ttft, tuple(gaps), tokens)


async def _level(base_url: str, model: str, concurrency: int, duration_s: float, max_tokens: int,
                 prompts: list[str], headers: dict[str, str], temperature: float) -> tuple[list[RequestRecord], float]:  # fmt: skip
    limits = httpx.Limits(max_connections=concurrency + 4, max_keepalive_connections=concurrency + 4)
    records: list[RequestRecord] = []
    async with httpx.AsyncClient(base_url=base_url, headers=headers, limits=limits, timeout=300) as client:
        t0 = time.perf_counter()
        stop_at = t0 + duration_s

        async def worker(w: int) -> None:
            i = 0
            while time.perf_counter() < stop_at:
                body = {"model": model, "prompt": prompts[(w + i) % len(prompts)], "max_tokens": max_tokens,
                        "temperature": temperature, "seed": w * 100_003 + i, "stream": True,
                        "stream_options": {"include_usage": True}}  # fmt: skip
                records.append(await _one(client, body, t0))
                i += 1

        await asyncio.gather(*(worker(w) for w in range(concurrency)))
        wall = time.perf_counter() - t0
    return records, wall


def run_level(base_url: str, model: str, concurrency: int, *, duration_s: float, max_tokens: int,
              prompts: list[str], api_key: str | None = None,
              temperature: float = 0.0) -> tuple[list[RequestRecord], float]:  # fmt: skip
    """Run ``concurrency`` streaming clients for ``duration_s``; returns the records and the wall time.

    The server sends one chunk per token (its text is ``""`` while half a UTF-8 character is
    held back), so TTFT and ITL here are per token.
    """
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    return asyncio.run(_level(base_url, model, concurrency, duration_s, max_tokens, prompts, headers, temperature))


def _pcts(values: list[float]) -> tuple[float, float, float]:
    if not values:
        return float("nan"), float("nan"), float("nan")
    p = np.percentile(np.asarray(values) * 1e3, [50, 95, 99])
    return float(p[0]), float(p[1]), float(p[2])


def summarize(concurrency: int, records: list[RequestRecord], wall_s: float,
              predicted_tokens_per_s: float | None = None) -> LevelResult:  # fmt: skip
    """Requests/s and output tokens/s over the level's wall time; TTFT and ITL percentiles in ms."""
    ok = [r for r in records if r.ok]
    ttft = _pcts([r.ttft_s for r in ok if r.ttft_s is not None])
    itl = _pcts([g for r in ok for g in r.itl_s])
    tokens = sum(r.completion_tokens for r in ok)
    return LevelResult(
        concurrency=concurrency, requests=len(ok), errors=len(records) - len(ok), wall_s=wall_s,
        requests_per_s=len(ok) / wall_s if wall_s > 0 else 0.0,
        output_tokens_per_s=tokens / wall_s if wall_s > 0 else 0.0,
        ttft_ms_p50=ttft[0], ttft_ms_p95=ttft[1], ttft_ms_p99=ttft[2],
        itl_ms_p50=itl[0], itl_ms_p95=itl[1], itl_ms_p99=itl[2],
        predicted_tokens_per_s=predicted_tokens_per_s,
    )  # fmt: skip
