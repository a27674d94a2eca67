"""The executor protocol, its registry, what a run reports, and plan checks shared by executors.

An executor runs a plan's stages over some transport (one process, torch.distributed,
gRPC) and must produce exactly the tokens the reference ``local`` executor
produces on the same plan. Use one as a context manager::

    with noodle.executors.EXECUTORS.get("local")(plan, model_dir) as ex:
        result = ex.generate([[1, 2, 3]], max_new_tokens=16)
    print(result.tokens, result.report)
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

import numpy as np

from noodle.errors import SpecError
from noodle.executors.generation import Sampling
from noodle.formats import check_format
from noodle.plandoc import PlanDoc

if TYPE_CHECKING:
    from noodle.executors.scheduler import Pipeline

__all__ = [
    "check_formats",
    "Executor",
    "ClosesOnExit",
    "ExecutorFactory",
    "RunResult",
    "RunReport",
    "StageReport",
    "check_plan",
    "check_workload",
    "error_pct",
    "percentile",
]


@dataclass(frozen=True)
class StageReport:
    """Measured (and planned) figures of one stage over one run.

    Times are milliseconds. ``decode_*`` are per decode step (batch included);
    ``hop_ms_p50`` is the time spent handing this stage's output on (emulated
    links sleep it; in one process it is zero). ``bytes_out`` counts every tensor
    byte the stage handed on; the last stage hands back the sampled token ids.
    """

    stage_id: int
    node: str
    start: int
    end: int
    units: str
    param_bytes: int
    kv_cache_bytes: int
    prefill_ms: float
    decode_ms_p50: float
    decode_ms_p95: float
    hop_ms_p50: float
    bytes_out: int
    bytes_out_per_decode: int
    predicted_compute_ms: float | None = None
    predicted_latency_ms: float | None = None
    busy_fraction: float | None = None

    @property
    def measured_latency_ms(self) -> float:
        return self.decode_ms_p50 + self.hop_ms_p50

    @property
    def compute_error_pct(self) -> float | None:
        return error_pct(self.decode_ms_p50, self.predicted_compute_ms)

    @property
    def latency_error_pct(self) -> float | None:
        return error_pct(self.measured_latency_ms, self.predicted_latency_ms)

    def as_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["measured_latency_ms"] = self.measured_latency_ms
        d["compute_error_pct"] = self.compute_error_pct
        d["latency_error_pct"] = self.latency_error_pct
        return d


@dataclass(frozen=True)
class RunReport:
    """What a run measured, stage by stage, next to what the plan predicted.

    ``tokens_per_s`` counts every generated token over the whole run (prefill
    included); ``decode_tokens_per_s`` counts decode steps only. A pipelined run
    (``concurrency`` set) also reports the plan's tokens/s for that configuration and
    per-request time to first token and inter-token latency (ms).
    """

    backend: str
    emulated: bool
    batch_size: int
    prompt_tokens: int
    new_tokens: int
    wall_s: float
    prefill_ms: float
    decode_ms_p50: float
    decode_ms_p95: float
    tokens_per_s: float
    decode_tokens_per_s: float
    stages: tuple[StageReport, ...]
    predicted_token_latency_ms: float | None = None
    concurrency: int | None = None
    micro_batch: int | None = None
    batching: str | None = None  # the pipelined engine's mode: continuous | exact | groups
    prefill_chunk: int | None = None
    requests: int | None = None
    predicted_tokens_per_s: float | None = None
    ttft_ms_p50: float | None = None
    ttft_ms_p95: float | None = None
    itl_ms_p50: float | None = None
    itl_ms_p95: float | None = None
    steady_tokens_per_s: float | None = None  # while every group slot was busy (ramp-up and tail left out)
    peak_in_flight: int | None = None  # most sequences in flight at once (KV memory may hold it below concurrency)

    @property
    def throughput_of_plan(self) -> float | None:
        """Measured tokens/s over the plan's tokens/s for this configuration."""
        p = self.predicted_tokens_per_s
        return self.tokens_per_s / p if p else None

    @property
    def token_latency_error_pct(self) -> float | None:
        return error_pct(self.decode_ms_p50, self.predicted_token_latency_ms)

    def as_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["stages"] = [s.as_dict() for s in self.stages]
        d["token_latency_error_pct"] = self.token_latency_error_pct
        d["throughput_of_plan"] = self.throughput_of_plan
        return d


@dataclass(frozen=True)
class RunResult:
    """New tokens per prompt, the report, and (on request) per-step last-position logits."""

    tokens: list[list[int]]
    report: RunReport
    logits: tuple[Any, ...] = ()


def percentile(values: Iterable[float], q: float) -> float:
    """The ``q``-th percentile (0..100, linear interpolation as numpy's default); 0.0 for no values."""
    values = list(values)
    return float(np.percentile(values, q)) if values else 0.0


def error_pct(measured: float, predicted: float | None) -> float | None:
    """``(measured - predicted) / predicted`` in percent; ``None`` without a usable prediction."""
    if predicted is None or predicted <= 0:
        return None
    return (measured - predicted) / predicted * 100.0


class ClosesOnExit:
    """Mixin for executors: leaving the ``with`` block calls ``self.close()``, whatever happened."""

    close: Callable[[], None]  # provided by the executor

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()


@runtime_checkable
class Executor(Protocol):
    """Runs a plan's stages. Enter to load the stages, exit to release them."""

    name: str

    def __enter__(self) -> Executor: ...

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None: ...

    def generate(
        self,
        prompts: Sequence[Sequence[int]],
        *,
        max_new_tokens: int,
        sampling: Sampling = Sampling(),
        keep_logits: bool = False,
        on_step: Callable[[int], None] | None = None,
    ) -> RunResult:
        """Generate up to ``max_new_tokens`` for each prompt (left-padded into one batch).

        ``keep_logits`` returns every step's last-position logits in ``RunResult.logits``;
        ``on_step(n)`` is called after step ``n`` (1-based) for progress displays.
        """
        ...

    def pipeline(
        self,
        *,
        concurrency: int = ...,
        micro_batch: int = ...,
        prefill_chunk: int = ...,
        max_queue: int = ...,
        batching: str = ...,
        max_batch_tokens: int = ...,
    ) -> Pipeline:
        """The pipelined engine over the entered executor's stages (call ``start()``); see
        :func:`noodle.executors.batching.make_pipeline`. Each backend keeps its own defaults."""
        ...


class ExecutorFactory(Protocol):
    """What the registry hands out: ``factory(plan, model_dir, *, emulate=False) -> Executor``."""

    def __call__(self, plan: PlanDoc, model_dir: str | Path, *, emulate: bool = False) -> Executor: ...


def check_formats(plan: PlanDoc, backend: str, *, where: str = "plan", devices: Sequence[str] | None = None) -> None:
    """Refuse, in one line, a stage format the backend or its device cannot run.

    ``local`` (and a spawned ``torchrpc`` ring) runs every stage on this machine in its plan format, on
    ``devices`` (each stage's torch device type; the CPU when not given); remote workers (``grpc``, a
    joined ring) load each stage in its format and refuse, at load time, one their device cannot run.

    Raises:
        ExecutorError: naming the stage, its node and format, and what would run.
    """
    for i, st in enumerate(plan.stages):
        if st.format == "float32":
            continue
        if backend != "local" and devices is None:
            continue  # remote workers load the stage in its format and refuse one their device cannot run
        dev = devices[i] if devices is not None else "cpu"
        check_format(st.format, dev, f"{where}: stages.{i}.format ({st.node}, run on this machine's {dev})")


def check_plan(plan: PlanDoc, unit_names: list[str], *, where: str = "plan") -> None:
    """Check that ``plan`` was made for a model with these units and that its stages chain.

    Raises:
        SpecError: naming the first mismatch, with the numbers.
    """
    if list(plan.units) != list(unit_names):
        n_plan, n_model = len(plan.units), len(unit_names)
        first = next(
            (i for i, (a, b) in enumerate(zip(plan.units, unit_names)) if a != b), min(n_plan, n_model)
        )
        got = plan.units[first] if first < n_plan else "(end)"
        want = unit_names[first] if first < n_model else "(end)"
        raise SpecError(
            f"{where}: units: the plan has {n_plan} units but the model has {n_model} "
            f"(first difference at unit {first}: plan {got!r}, model {want!r}); "
            "solve the plan again for this model"
        )
    if not plan.stages:
        raise SpecError(f"{where}: stages: the plan has no stages")
    expect = 0
    for i, st in enumerate(plan.stages):
        if st.start != expect or st.end <= st.start:
            raise SpecError(
                f"{where}: stages.{i}: range [{st.start}, {st.end}) does not continue from unit {expect}; "
                "stages must cover the units in order without gaps"
            )
        expect = st.end
    if expect != len(unit_names):
        raise SpecError(f"{where}: stages: cover units [0, {expect}) but the model has {len(unit_names)} units")


def check_workload(plan: PlanDoc, prompts: Sequence[Sequence[int]], max_new_tokens: int, *, where: str = "plan") -> None:
    """Refuse prompts longer than the plan's workload (its memory figures assume that length)."""
    limit = plan.workload.get("prompt_tokens")
    longest = max((len(p) for p in prompts), default=0)
    if limit is not None and longest > limit:
        raise SpecError(
            f"prompt: {longest} tokens, but {where} was planned for prompts of at most {limit} tokens "
            "(workload.prompt_tokens); shorten the prompt or plan again with a larger workload"
        )
    batch = plan.workload.get("streams") or plan.workload.get("batch_size")
    if batch is not None and len(prompts) > batch:
        field = "workload.streams" if plan.workload.get("streams") else "workload.batch_size"
        raise SpecError(
            f"--batch: {len(prompts)} prompts, but {where} was planned for batches of at most {batch} ({field})"
        )
    gen = plan.workload.get("max_new_tokens")
    if limit is not None and gen is not None and longest + max_new_tokens > limit + gen:
        raise SpecError(
            f"--max-new-tokens: {max_new_tokens} new tokens after a {longest}-token prompt exceed the "
            f"planned context of {limit + gen} tokens (workload prompt_tokens + max_new_tokens)"
        )
