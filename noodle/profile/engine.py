"""The observability engine: instrument a model, warm it up, profile a workload.

One *iteration* is what a request costs: a prefill forward over the prompt
followed by ``decode_tokens`` decode forwards, each feeding the previous
step's greedy token and the KV cache. Warm-up iterations are not counted.

    engine = ObservabilityEngine(model, "runs/gpt2", ProfileConfig(model_name="gpt2"))
    engine.instrument()
    inputs = engine.make_inputs()
    engine.warmup(inputs, 10)
    report = engine.profile(inputs, 100)   # writes metrics.jsonl, summary.json, units.json, ...
    engine.save_dashboard("gpt2_profile")  # dashboard.html + summary.png
"""

from __future__ import annotations

import inspect
import json
import logging
from collections import defaultdict
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

from noodle.errors import SpecError
from noodle.models import layout_of
from noodle.progress import progress_bar
from noodle.profile.hooks import STRATEGIES, Clock, MemoryProbe, NullHooks, TimingHooks, TraceHooks, TraceRecord
from noodle.profile.report import ProfileReport, RunData, build_report
from noodle.profile.system import system_info

__all__ = ["ProfileConfig", "ProfileInputs", "ObservabilityEngine", "fit_workload", "progress_bar"]

_log = logging.getLogger(__name__)

_COUNTS = ("prompt_tokens", "decode_tokens", "batch_size", "iterations")
_NON_NEGATIVE = ("warmup", "module_iterations", "seed")


@dataclass(frozen=True)
class ProfileConfig:
    """How to profile (validated on construction; errors name the field and value).

    Attributes:
        model_name: name recorded in the outputs.
        strategy: ``specialized`` (unit hooks only, low overhead) or ``generic`` (every module).
        prompt_tokens: prompt length of the prefill forward.
        decode_tokens: decode forwards per iteration, each with the KV cache.
        batch_size: sequences per forward.
        warmup: default warm-up iterations (not counted).
        iterations: default profiled iterations.
        module_iterations: with ``specialized`` hooks, extra iterations under generic hooks
            for the per-module breakdown (0 skips it; they never feed unit latencies).
        device: ``cpu``, ``cuda`` or ``auto`` (cuda when available).
        seed: seed of the random prompt.
        progress: show a progress bar on stderr.
        source: where the model came from (folder, config file, preset), for the record.
    """

    model_name: str = "model"
    strategy: str = "specialized"
    prompt_tokens: int = 128
    decode_tokens: int = 16
    batch_size: int = 1
    warmup: int = 10
    iterations: int = 100
    module_iterations: int = 5
    device: str = "cpu"
    seed: int = 0
    progress: bool = False
    source: str | None = None

    def __post_init__(self) -> None:
        if self.strategy not in STRATEGIES:
            raise SpecError(f"profile config: strategy: {self.strategy!r} is not one of {', '.join(STRATEGIES)}")
        for name in _COUNTS:
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise SpecError(f"profile config: {name}: must be a whole number of at least 1, got {value!r}")
        for name in _NON_NEGATIVE:
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise SpecError(f"profile config: {name}: must be a whole number of at least 0, got {value!r}")
        if self.device not in ("cpu", "cuda", "auto"):
            raise SpecError(f"profile config: device: {self.device!r} is not one of cpu, cuda, auto")


@dataclass(frozen=True)
class ProfileInputs:
    """The workload of one iteration: a prompt ``(batch, prompt_tokens)`` and decode steps."""

    input_ids: Any
    decode_tokens: int

    @property
    def prompt_tokens(self) -> int:
        return int(self.input_ids.shape[1])

    @property
    def batch_size(self) -> int:
        return int(self.input_ids.shape[0])


def _resolve_device(name: str) -> Any:
    import torch

    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise SpecError("profile config: device: 'cuda' requested but torch sees no CUDA device; use cpu")
    return torch.device(name)


def fit_workload(prompt: int, decode: int, positions: int) -> tuple[int, int]:
    """``(prompt, decode)`` clamped so that ``prompt + decode <= positions``.

    Decode steps keep at most a quarter of the positions (at least 1); the prompt takes the rest.

    Raises:
        SpecError: the model has fewer than 2 positions.
    """
    if positions < 2:
        raise SpecError(f"profile: the model has {positions} position(s); profiling needs at least 2")
    if prompt + decode <= positions:
        return prompt, decode
    decode = max(1, min(decode, positions // 4))
    return min(prompt, positions - decode), decode


class ObservabilityEngine:
    """Instruments one causal LM and profiles it unit by unit.

    Args:
        model: a transformers decoder-only causal LM (GPT-2, Llama, ... layouts).
        log_dir: folder the outputs are written to (created when needed).
        config: how to profile; defaults to :class:`ProfileConfig`.

    Raises:
        ModelError: the model cannot be mapped onto placement units.
        SpecError: the config asks for something this machine cannot do.
    """

    def __init__(self, model: Any, log_dir: str | Path, config: ProfileConfig | None = None) -> None:
        self.config = config or ProfileConfig()
        self.log_dir = Path(log_dir)
        self.layout = layout_of(model)
        self.device = _resolve_device(self.config.device)
        self.model = model.to(self.device).eval()
        self.clock = Clock(self.device.type)
        self.probe = MemoryProbe(self.device.type)
        self.timing = TimingHooks(self.model, self.layout, self.config.strategy, self.clock)
        self.report: ProfileReport | None = None
        params = inspect.signature(self.model.forward).parameters
        self._cache_kw = "cache" if "cache" in params else "past_key_values"
        self._extra: dict[str, Any] = {"use_cache": True}
        if "logits_to_keep" in params:
            self._extra["logits_to_keep"] = 1  # as generate() does: logits of the last position only

    # -- setup -------------------------------------------------------------
    def make_inputs(self, prompt_tokens: int | None = None, decode_tokens: int | None = None) -> ProfileInputs:
        """A seeded random prompt of the configured (or given) size, within the vocabulary."""
        import torch

        prompt = prompt_tokens or self.config.prompt_tokens
        decode = decode_tokens or self.config.decode_tokens
        cfg = self.model.config.get_text_config() if hasattr(self.model.config, "get_text_config") else self.model.config
        limit = getattr(cfg, "max_position_embeddings", None) or getattr(cfg, "n_positions", None)
        if limit is not None and prompt + decode > limit:
            fitted = fit_workload(prompt, decode, int(limit))
            _log.warning(
                "profile: prompt_tokens + decode_tokens = %d + %d = %d exceeds the model's %d positions; "
                "profiling %d + %d instead",
                prompt, decode, prompt + decode, limit, *fitted,
            )  # fmt: skip
            prompt, decode = fitted
            self.config = replace(self.config, prompt_tokens=prompt, decode_tokens=decode)
        gen = torch.Generator().manual_seed(self.config.seed)
        ids = torch.randint(0, int(cfg.vocab_size), (self.config.batch_size, prompt), generator=gen)
        return ProfileInputs(ids.to(self.device), decode)

    def instrument(self) -> None:
        """Install the timing hooks of the configured strategy (idempotent)."""
        self.timing.install()

    def remove(self) -> None:
        """Detach every hook; the model runs as before."""
        self.timing.remove()

    def __enter__(self) -> ObservabilityEngine:
        self.instrument()
        return self

    def __exit__(self, *exc: object) -> None:
        self.remove()

    # -- running -----------------------------------------------------------
    def step(self, ids: Any, cache: Any, hooks: TimingHooks | TraceHooks | NullHooks) -> tuple[Any, Any, float, Any]:
        """One forward of ``ids`` on ``cache`` (``None``: a prefill).

        Returns ``(next_ids, cache, forward_ms, (unit_ms, module_ms))``: the greedy next token,
        the updated KV cache, the wall time around ``model(...)`` and what ``hooks`` measured.
        """
        import torch

        with torch.inference_mode():
            hooks.start_forward()
            t0 = self.clock.now()
            out = self.model(input_ids=ids, **{self._cache_kw: cache}, **self._extra)
            t1 = self.clock.now()
            timings = hooks.finish_forward()
            return out.logits[:, -1:].argmax(-1), out.get(self._cache_kw), self.clock.ms(t0, t1), timings

    def run_iteration(
        self, inputs: ProfileInputs, hooks: TimingHooks | TraceHooks | NullHooks, on_forward: Callable[..., None] | None
    ) -> None:
        """One prefill and ``decode_tokens`` decode forwards.

        ``hooks`` must already be installed; ``on_forward(phase, step, forward_ms, unit_ms,
        module_ms)`` is called after each forward with the wall time around ``model(...)``.
        """
        ids, cache = inputs.input_ids, None
        for i in range(inputs.decode_tokens + 1):
            ids, cache, ms, (units, modules) = self.step(ids, cache, hooks)
            if on_forward is not None:
                on_forward("prefill" if i == 0 else "decode", i, ms, units, modules)

    def _loop(self, inputs: ProfileInputs, n: int, label: str, hooks: Any, on_forward: Any) -> None:
        with progress_bar(self.config.progress, f"{self.config.model_name}: {label}", n) as advance:
            for _ in range(n):
                self.run_iteration(inputs, hooks, on_forward)
                advance()

    def warmup(self, inputs: ProfileInputs, n: int | None = None) -> None:
        """Run ``n`` iterations (default ``config.warmup``) with hooks on; nothing is recorded."""
        self.instrument()
        self._loop(inputs, self.config.warmup if n is None else n, "warm-up", self.timing, None)

    def profile(self, inputs: ProfileInputs, n: int | None = None) -> ProfileReport:
        """Profile ``n`` iterations (default ``config.iterations``) and write the outputs.

        Writes ``metrics.jsonl``, ``summary.json``, ``units.json``, ``system_info.json``
        and ``profile_config.json`` to ``log_dir``.
        """
        n = self.config.iterations if n is None else n
        if n < 1:
            raise SpecError(f"profile: iterations: must be at least 1, got {n}")
        self.instrument()
        samples: dict[tuple[str, str, str], list[float]] = defaultdict(list)

        def record(phase: str, step: int, total: float, units: dict[str, float], modules: dict[str, float]) -> None:
            samples[("model", "forward", phase)].append(total)
            for name, value in units.items():
                samples[("unit", name, phase)].append(value)
            for name, value in modules.items():
                samples[("module", name, phase)].append(value)

        self._loop(inputs, n, "profile", self.timing, record)
        module_source = f"main pass ({n} iterations)" if self.config.strategy == "generic" else None
        if self.config.strategy == "specialized" and self.config.module_iterations > 0:
            module_source = self._module_pass(inputs, samples)
        traces, timeline = self._trace(inputs)

        info = system_info(self.device)
        data = RunData(
            model=self.model,
            layout=self.layout,
            config=self.config,
            inputs=inputs,
            iterations=n,
            samples=dict(samples),
            traces=traces,
            timeline=timeline,
            system=info,
            timer=self.clock.name,
            memory_source=self.probe.source,
            module_source=module_source,
        )
        self.report = build_report(data)
        self._write(self.report, info, inputs, n)
        return self.report

    def _module_pass(self, inputs: ProfileInputs, samples: dict[tuple[str, str, str], list[float]]) -> str:
        """A few iterations under generic hooks for the per-module breakdown (units untouched)."""
        n = self.config.module_iterations
        generic = TimingHooks(self.model, self.layout, "generic", self.clock)
        self.timing.remove()
        generic.install()
        try:

            def record(phase: str, step: int, total: float, units: dict[str, float], modules: dict[str, float]) -> None:
                for name, value in modules.items():
                    samples[("module", name, phase)].append(value)

            self._loop(inputs, n, "module breakdown", generic, record)
        finally:
            generic.remove()
            self.timing.install()
        return f"generic hooks, {n} extra iterations after the unit pass"

    def _trace(self, inputs: ProfileInputs) -> tuple[dict[str, dict[str, dict[str, TraceRecord]]], list[dict[str, Any]]]:
        """One untimed iteration recording shapes, output bytes and memory per phase."""
        trace = TraceHooks(self.model, self.layout, self.probe)
        traces: dict[str, dict[str, dict[str, TraceRecord]]] = {}
        timeline: list[dict[str, Any]] = []
        self.probe.reset_peak()

        def snapshot(phase: str, step: int, *_: Any) -> None:
            seen = len(timeline)
            for unit, nbytes in trace.timeline[seen:]:
                timeline.append({"seq": len(timeline), "phase": phase, "step": step, "unit": unit, "memory_bytes": nbytes})
            traces[phase] = {
                "unit": {k: replace(v) for k, v in trace.units.items()},
                "module": {k: replace(v) for k, v in trace.modules.items()},
            }

        trace.install()
        try:
            self.run_iteration(inputs, trace, snapshot)
        finally:
            trace.remove()
        return traces, timeline

    # -- output ------------------------------------------------------------
    def _write(self, report: ProfileReport, info: dict[str, Any], inputs: ProfileInputs, n: int) -> None:
        self.log_dir.mkdir(parents=True, exist_ok=True)
        report.write(self.log_dir)
        (self.log_dir / "system_info.json").write_text(json.dumps(info, indent=2) + "\n")
        run_config = {
            "config": asdict(self.config),
            "run": {"iterations": n, "prompt_tokens": inputs.prompt_tokens, "decode_tokens": inputs.decode_tokens,
                    "batch_size": inputs.batch_size},
        }
        (self.log_dir / "profile_config.json").write_text(json.dumps(run_config, indent=2) + "\n")

    def save_dashboard(self, title: str | None = None) -> dict[str, Path]:
        """Write ``dashboard.html`` (Plotly, self-contained) and ``summary.png`` (matplotlib).

        Raises:
            SpecError: :meth:`profile` has not run yet.
        """
        if self.report is None:
            raise SpecError("save_dashboard: nothing to show yet; call profile() first")
        from noodle.profile.dashboard import write_dashboard

        return write_dashboard(self.report, self.log_dir, title or self.config.model_name)
