"""Forward hooks that time placement units (and, optionally, every module).

Two timing strategies:

* ``specialized`` (default): hooks only on the root modules of each placement
  unit. A unit's time runs from the first pre-hook of its modules to the last
  post-hook (``embed`` of GPT-2 is ``wte``, ``wpe``, ``drop``; ``lm_head`` is the
  final norm plus the head), so a decoder block costs one pre/post pair.
* ``generic``: the same unit spans plus a pre/post pair on every named module,
  for a per-module breakdown; costlier, so its numbers carry more hook overhead.

Clocks: ``time.perf_counter`` on CPU; CUDA events on a GPU (read after one
synchronize per forward). Hooks only store timestamps; durations are computed
in :meth:`TimingHooks.finish_forward`, outside the timed region.

:class:`TraceHooks` run on one extra, untimed iteration and record what is too
costly to read on every call: input/output shapes, output bytes and memory
(process RSS on CPU, ``torch.cuda.memory_allocated`` on GPU) at each unit's exit.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from torch import nn

from noodle.models import UnitLayout

__all__ = [
    "STRATEGIES",
    "Clock",
    "MemoryProbe",
    "NullHooks",
    "TimingHooks",
    "TraceHooks",
    "TraceRecord",
    "timed_modules",
    "iter_tensors",
]

STRATEGIES: tuple[str, ...] = ("specialized", "generic")


class Clock:
    """Timestamps for hooks: ``perf_counter`` on CPU, CUDA events on a GPU."""

    def __init__(self, device_type: str = "cpu") -> None:
        self.cuda = device_type == "cuda"
        if self.cuda:
            import torch

            self._event = torch.cuda.Event
            self._sync = torch.cuda.synchronize
        self.name = "cuda events" if self.cuda else "time.perf_counter"

    def now(self) -> Any:
        """A timestamp (a float on CPU, a recorded event on a GPU)."""
        if self.cuda:
            ev = self._event(enable_timing=True)
            ev.record()
            return ev
        return time.perf_counter()

    def sync(self) -> None:
        """Wait until every recorded timestamp is final (no-op on CPU)."""
        if self.cuda:
            self._sync()

    def ms(self, start: Any, end: Any) -> float:
        """Milliseconds from ``start`` to ``end``."""
        if self.cuda:
            return float(start.elapsed_time(end))
        return (end - start) * 1e3


class MemoryProbe:
    """Memory in use now, and the high-water mark, in bytes.

    CPU: resident set size of this process (``psutil``), which includes Python,
    weights, allocator caches and anything else the process holds; the peak is
    the larger of the RSS samples seen since :meth:`reset_peak`. GPU:
    ``torch.cuda.memory_allocated`` and ``torch.cuda.max_memory_allocated``.
    """

    def __init__(self, device_type: str = "cpu") -> None:
        self.cuda = device_type == "cuda"
        if self.cuda:
            import torch

            self._torch = torch
            self.source = "gpu: torch.cuda.memory_allocated / max_memory_allocated (bytes held by tensors)"
        else:
            import psutil

            self._proc = psutil.Process()
            self.source = "cpu: process resident set size (psutil RSS) read at each unit's exit"
        self._peak = 0

    def reset_peak(self) -> None:
        if self.cuda:
            self._torch.cuda.reset_peak_memory_stats()
        self._peak = 0

    def now(self) -> int:
        if self.cuda:
            return int(self._torch.cuda.memory_allocated())
        rss = int(self._proc.memory_info().rss)
        self._peak = max(self._peak, rss)
        return rss

    def peak(self) -> int:
        if self.cuda:
            return int(self._torch.cuda.max_memory_allocated())
        return self._peak


def timed_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """Named modules the generic strategy hooks: all but the root and pure containers."""
    return [
        (name, mod)
        for name, mod in model.named_modules()
        if name and not isinstance(mod, (nn.ModuleList, nn.ModuleDict))
    ]


def iter_tensors(obj: Any, depth: int = 0) -> Iterator[Any]:
    """Tensors in a hook's args/output (tensors, tuples, lists, dicts; caches skipped)."""
    import torch

    if isinstance(obj, torch.Tensor):
        yield obj
    elif depth < 3 and isinstance(obj, (tuple, list)):
        for item in obj:
            yield from iter_tensors(item, depth + 1)
    elif depth < 3 and isinstance(obj, dict):
        for item in obj.values():
            yield from iter_tensors(item, depth + 1)


class _Hooked:
    """Owns hook handles; install/remove are idempotent."""

    def __init__(self) -> None:
        self._handles: list[Any] = []

    @property
    def installed(self) -> bool:
        return bool(self._handles)

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()


class NullHooks:
    """No hooks: the uninstrumented baseline, with the same per-forward interface."""

    def start_forward(self) -> None:
        pass

    def finish_forward(self) -> tuple[dict[str, float], dict[str, float]]:
        return {}, {}


class TimingHooks(_Hooked):
    """Times placement units (``specialized``) or units and all modules (``generic``).

    Use: :meth:`install` once, then around each forward :meth:`start_forward` and
    :meth:`finish_forward`, which returns ``(unit_ms, module_ms)``.
    """

    def __init__(self, model: nn.Module, layout: UnitLayout, strategy: str, clock: Clock) -> None:
        super().__init__()
        if strategy not in STRATEGIES:
            raise ValueError(f"unknown hook strategy {strategy!r}; valid: {', '.join(STRATEGIES)}")
        self.model = model
        self.layout = layout
        self.strategy = strategy
        self.clock = clock
        self._unit_start: dict[str, Any] = {}
        self._unit_end: dict[str, Any] = {}
        self._mod_start: dict[str, Any] = {}
        self._spans: list[tuple[str, Any, Any]] = []

    def install(self) -> None:
        if self.installed:
            return
        for unit, paths in self.layout.unit_modules().items():
            for path in paths:
                mod = self.model.get_submodule(path)
                self._handles.append(mod.register_forward_pre_hook(self._unit_pre(unit)))
                self._handles.append(mod.register_forward_hook(self._unit_post(unit)))
        if self.strategy == "generic":
            for name, mod in timed_modules(self.model):
                self._handles.append(mod.register_forward_pre_hook(self._mod_pre(name)))
                self._handles.append(mod.register_forward_hook(self._mod_post(name)))

    def _unit_pre(self, unit: str) -> Any:
        starts, now = self._unit_start, self.clock.now

        def hook(module: nn.Module, args: Any) -> None:
            if unit not in starts:
                starts[unit] = now()

        return hook

    def _unit_post(self, unit: str) -> Any:
        ends, now = self._unit_end, self.clock.now

        def hook(module: nn.Module, args: Any, output: Any) -> None:
            ends[unit] = now()

        return hook

    def _mod_pre(self, name: str) -> Any:
        starts, now = self._mod_start, self.clock.now

        def hook(module: nn.Module, args: Any) -> None:
            starts[name] = now()

        return hook

    def _mod_post(self, name: str) -> Any:
        starts, spans, now = self._mod_start, self._spans, self.clock.now

        def hook(module: nn.Module, args: Any, output: Any) -> None:
            spans.append((name, starts[name], now()))

        return hook

    def start_forward(self) -> None:
        self._unit_start.clear()
        self._unit_end.clear()
        self._mod_start.clear()
        self._spans.clear()

    def finish_forward(self) -> tuple[dict[str, float], dict[str, float]]:
        """Per-unit and per-module milliseconds of the forward that just ran.

        A module called several times in one forward gets the sum of its calls.
        """
        self.clock.sync()
        ms = self.clock.ms
        units = {u: ms(s, self._unit_end[u]) for u, s in self._unit_start.items() if u in self._unit_end}
        modules: dict[str, float] = {}
        for name, start, end in self._spans:
            modules[name] = modules.get(name, 0.0) + ms(start, end)
        return units, modules


@dataclass
class TraceRecord:
    """What one traced forward saw for a unit or module (shapes, bytes, memory)."""

    input_shapes: list[list[int]] | None = None
    output_shapes: list[list[int]] | None = None
    activation_bytes_out: int = 0
    memory_after_bytes: int | None = None
    peak_memory_bytes: int | None = None


class TraceHooks(_Hooked):
    """Shapes, output bytes and memory at exit of every unit and timed module.

    ``units[name]`` and ``modules[path]`` are overwritten on every call, so after a
    forward they hold that forward's last call (a unit's input is its first module's,
    its output its last module's); ``timeline`` collects ``(unit, bytes)`` at each exit
    of a unit's module.
    """

    def __init__(self, model: nn.Module, layout: UnitLayout, probe: MemoryProbe) -> None:
        super().__init__()
        self.model = model
        self.layout = layout
        self.probe = probe
        self.units: dict[str, TraceRecord] = {}
        self.modules: dict[str, TraceRecord] = {}
        self.timeline: list[tuple[str, int]] = []
        self._open: set[str] = set()

    def install(self) -> None:
        if self.installed:
            return
        for unit, paths in self.layout.unit_modules().items():
            for path in paths:
                mod = self.model.get_submodule(path)
                self._handles.append(mod.register_forward_pre_hook(self._pre(unit, True), with_kwargs=True))
                self._handles.append(mod.register_forward_hook(self._post(unit, True)))
        for name, mod in timed_modules(self.model):
            self._handles.append(mod.register_forward_pre_hook(self._pre(name, False), with_kwargs=True))
            self._handles.append(mod.register_forward_hook(self._post(name, False)))

    def start_forward(self) -> None:
        self._open.clear()

    def finish_forward(self) -> tuple[dict[str, float], dict[str, float]]:
        """No timings: traced forwards are not timed."""
        return {}, {}

    def _pre(self, key: str, is_unit: bool) -> Any:
        def hook(module: nn.Module, args: Any, kwargs: Any) -> None:
            if is_unit:
                if key in self._open:
                    return  # a later module of a multi-module unit: keep the first input
                self._open.add(key)
            rec = (self.units if is_unit else self.modules).setdefault(key, TraceRecord())
            rec.input_shapes = [list(t.shape) for t in iter_tensors((args, kwargs))]
            if is_unit:
                self.probe.reset_peak()

        return hook

    def _post(self, key: str, is_unit: bool) -> Any:
        def hook(module: nn.Module, args: Any, output: Any) -> None:
            rec = (self.units if is_unit else self.modules).setdefault(key, TraceRecord())
            tensors = list(iter_tensors(output))
            rec.output_shapes = [list(t.shape) for t in tensors]
            rec.activation_bytes_out = sum(t.numel() * t.element_size() for t in tensors)
            if is_unit:
                rec.memory_after_bytes = self.probe.now()
                rec.peak_memory_bytes = max(rec.peak_memory_bytes or 0, self.probe.peak())
                self.timeline.append((key, rec.memory_after_bytes))

        return hook
