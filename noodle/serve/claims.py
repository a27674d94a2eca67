"""What a joining worker claims on the wire, and the bounds a claim must keep before it is planned.

A worker's join (:class:`JoinRequest`) and heartbeats (:class:`Heartbeat`) are checked here, at the
edge, against the limits the planner's spec applies (:mod:`noodle.sizes`, as :mod:`noodle.spec` uses them);
a claim outside them is refused with a 400 naming the field and the numbers instead of being
planned (a worker claiming 8 PiB, or 0.00 ms per unit, used to be accepted):

* memory: ``total_memory_bytes`` and ``free_memory_bytes`` at most :data:`MAX_MEMORY_BYTES`
  (the spec's ``memory_gb`` limit, 1 PiB), free at most total; a heartbeat's free memory at most
  the node's total;
* unit times: a decode step of one unit at least :data:`MIN_UNIT_DECODE_MS` (1 us: one torch
  operator's dispatch costs more, on any device) and at most :data:`MAX_WIRE_MS`; prefill per token
  at least :data:`MIN_UNIT_PREFILL_MS` (1 ns);
* counts: at most :data:`~noodle.sizes.MAX_UNITS` units (and the coordinator's own units, by name),
  at most :data:`~noodle.sizes.MAX_NODES` nodes with the table cells :func:`~noodle.sizes.size_problem`
  allows (checked by :meth:`~noodle.serve.registry.ClusterRegistry.join`);
* link figures a worker measures to its peers: :func:`link_problem` (the spec's link bounds).

Bounds only catch the absurd: the unit times a worker claims are then timed on the worker itself
(:mod:`noodle.serve.verify`) before it is planned in.
"""

from __future__ import annotations

import math
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from noodle.errors import SpecError
from noodle.profile.unitcosts import UNIT_COSTS_FORMAT
from noodle.sizes import MAX_MEMORY_GB, MAX_MS, MAX_SCORE, MAX_UNITS, MIN_SCORE
from noodle.types import NodeProfile

__all__ = ["JoinRequest", "Heartbeat", "CostReport", "UnitCostReport", "StepOverheadReport", "DeviceReport",
           "unit_mismatch", "link_problem", "field_message", "ClaimRefused", "MAX_MEMORY_BYTES", "MIN_UNIT_DECODE_MS",
           "MIN_UNIT_PREFILL_MS"]

MAX_MEMORY_BYTES = int(MAX_MEMORY_GB * 2**30)  # the spec's memory_gb limit: 1 PiB per node
MIN_UNIT_DECODE_MS = 1e-3
MIN_UNIT_PREFILL_MS = 1e-6

MAX_WIRE_MS = 1e7  # per unit and step: about 2.8 hours
MAX_WIRE_BYTES = 2**50
MAX_BATCH_SIZES = 16


class _Wire(BaseModel):
    model_config = ConfigDict(frozen=True, extra="ignore", allow_inf_nan=False)


class DeviceReport(_Wire):
    kind: str = Field(min_length=1, max_length=32)
    name: str = Field("", max_length=200)
    total_memory_bytes: int = Field(gt=0, le=MAX_MEMORY_BYTES)
    free_memory_bytes: int = Field(ge=0, le=MAX_MEMORY_BYTES)
    threads: int = Field(ge=1, le=100_000)

    @model_validator(mode="after")
    def _free_within_total(self) -> DeviceReport:
        if self.free_memory_bytes > self.total_memory_bytes:
            raise ValueError(f"free_memory_bytes: {self.free_memory_bytes} free is more than the "
                             f"{self.total_memory_bytes} total_memory_bytes")
        return self


class UnitCostReport(_Wire):
    """One placement unit timed on the worker: decode ms per batch size, prefill ms per token, bytes."""

    name: str = Field(min_length=1, max_length=200)
    decode_ms: dict[Annotated[int, Field(ge=1, le=2**16)], Annotated[float, Field(ge=MIN_UNIT_DECODE_MS, le=MAX_WIRE_MS)]] = Field(
        min_length=1, max_length=MAX_BATCH_SIZES)
    prefill_ms_per_token: float = Field(ge=MIN_UNIT_PREFILL_MS, le=MAX_WIRE_MS)
    param_bytes: int = Field(ge=0, le=MAX_WIRE_BYTES)
    kv_bytes_per_token: int = Field(ge=0, le=MAX_WIRE_BYTES)


class StepOverheadReport(_Wire):
    """The stage runner's fixed work per step that the unit table misses (:func:`~noodle.executors.overhead.measure_step_overhead`)."""

    decode_ms: float = Field(ge=0, le=MAX_WIRE_MS)
    prefill_ms: float = Field(ge=0, le=MAX_WIRE_MS)


class CostReport(_Wire):
    """The model's units timed on the worker's own device (:func:`~noodle.profile.unitcosts.measure_unit_costs`).

    ``step_overhead_ms`` is absent in reports of workers from before it was measured: their stages cost no overhead.
    """

    format: Literal["noodle.unit-costs/1"]
    batch_size: int = Field(ge=1, le=2**16)
    prompt_tokens: int = Field(ge=1, le=2**24)
    dtype: str = Field("float32", max_length=32)
    cached: bool = False
    units: list[UnitCostReport] = Field(min_length=1, max_length=MAX_UNITS)
    step_overhead_ms: StepOverheadReport | None = None

    @model_validator(mode="before")
    @classmethod
    def _not_whole_model(cls, data: Any) -> Any:
        if isinstance(data, dict) and "units" not in data and "decode_ms" in data:
            raise ValueError("this worker reports one whole-model decode time (an older noodle worker); the "
                             f"coordinator needs per-unit costs ({UNIT_COSTS_FORMAT}): upgrade noodle on the worker")
        return data

    @model_validator(mode="after")
    def _same_batches(self) -> CostReport:
        sizes = sorted(self.units[0].decode_ms)
        if self.batch_size not in sizes:
            raise ValueError(f"batch_size {self.batch_size} has no decode_ms in units[0] (it has {sizes})")
        for i, u in enumerate(self.units):
            if sorted(u.decode_ms) != sizes:
                raise ValueError(f"units[{i}].decode_ms: batch sizes {sorted(u.decode_ms)} differ from units[0]'s {sizes}")
        return self

    def profile(self, source: str) -> NodeProfile:
        """The report as a :class:`~noodle.types.NodeProfile` (chain order as sent)."""
        b = self.batch_size
        others = sorted(k for k in self.units[0].decode_ms if k != b)
        return NodeProfile(
            unit_names=tuple(u.name for u in self.units), latency_ms=tuple(u.decode_ms[b] for u in self.units),
            batch_size=b, decode_ms=tuple((k, tuple(u.decode_ms[k] for u in self.units)) for k in others),
            param_bytes=tuple(u.param_bytes for u in self.units),
            kv_bytes_per_token=tuple(u.kv_bytes_per_token for u in self.units),
            prefill_ms_per_token=tuple(u.prefill_ms_per_token for u in self.units), source=source,
            step_overhead_ms=self.step_overhead_ms.decode_ms if self.step_overhead_ms else 0.0,
            prefill_overhead_ms=self.step_overhead_ms.prefill_ms if self.step_overhead_ms else None,
        )  # fmt: skip


def unit_mismatch(report: CostReport, names: list[str] | tuple[str, ...]) -> str | None:
    """Words for how ``report``'s units differ from the model's ``names``; None when they agree."""
    if len(report.units) != len(names):
        return f"{len(report.units)} units measured, the coordinator's model has {len(names)}"
    for i, (u, name) in enumerate(zip(report.units, names)):
        if u.name != name:
            return f"units[{i}].name is {u.name!r}, the coordinator's model has {name!r} there"
    return None


class JoinRequest(_Wire):
    """What a joining worker sends."""

    id: str = Field(min_length=1, max_length=100, pattern=r"^[A-Za-z0-9_.@:-]+$")
    address: str = Field(min_length=3, max_length=300, pattern=r"^[^\s/]+:\d{1,5}$")
    device: DeviceReport
    model_hash: str = Field(min_length=1, max_length=64)
    weights_sha256: str = Field(pattern=r"^[0-9a-f]{64}$", description="sha256 over the weights' bytes "
                                "(:func:`noodle.serve.joining.weights_hash`)")
    costs: CostReport


class Heartbeat(_Wire):
    id: str = Field(min_length=1, max_length=100)
    load: float = Field(0.0, ge=0, le=1e6)
    free_memory_bytes: int = Field(ge=0, le=MAX_MEMORY_BYTES)
    secret: str = Field("", max_length=128, description="the node's secret, issued by its join")


class Leave(_Wire):
    """A worker leaving on purpose (SIGTERM: a pod stopped, a rolling update); the coordinator re-plans without it."""

    id: str = Field(min_length=1, max_length=100)
    secret: str = Field("", max_length=128, description="the node's secret, issued by its join")
    wait_s: float = Field(30.0, ge=0, le=600, description="how long to hold the answer until no stage runs on it")


class ClaimRefused(SpecError):
    """A join or heartbeat the coordinator refuses: ``status`` (400, 403, 409) and the field it names."""

    def __init__(self, status: int, param: str, message: str, code: str = "invalid_value") -> None:
        super().__init__(f"{param}: {message}")
        self.status = status
        self.param = param
        self.code = code


def link_problem(rtt_ms: float, up_gbps: float, down_gbps: float) -> str | None:
    """What is out of the spec's link bounds in a worker's measurement of a link; None when it is within."""
    for name, value, lo, hi in (("rtt_ms", rtt_ms, 0.0, 2 * MAX_MS), ("up_gbps", up_gbps, MIN_SCORE, MAX_SCORE),
                                ("down_gbps", down_gbps, MIN_SCORE, MAX_SCORE)):  # fmt: skip
        if not (math.isfinite(value) and lo <= value <= hi):
            return f"{name} {value:g} is outside [{lo:g}, {hi:g}]"
    return None


def field_message(exc: ValidationError) -> tuple[str, str]:
    """``(field, message)`` of a wire body's first problem, with the value it got (``device.total_memory_bytes:
    Input should be less than or equal to 1125899906842624, got 9007199254740992 (8 PiB)``)."""
    err = exc.errors(include_url=False)[0]
    param = ".".join(str(p) for p in err["loc"])
    msg = str(err["msg"]).removeprefix("Value error, ")
    inner, _, rest = msg.partition(": ")
    if err["type"] == "value_error" and inner.isidentifier():
        msg = rest
        param = f"{param}.{inner}" if param else inner
        return param, msg
    got = err.get("input")
    if isinstance(got, (int, float)) and not isinstance(got, bool):
        msg += f", got {got!r}"
        if param.endswith("_bytes") and isinstance(got, int) and got >= 2**40:
            msg += f" ({got / 2**50:g} PiB)"
    more = len(exc.errors()) - 1
    return param or "body", msg + (f" (+{more} more problems)" if more > 0 else "")
