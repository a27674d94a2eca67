"""From a profile to the planner: ``units.json`` and :func:`load_units`.

``units.json`` holds what the planner reads per placement unit, in chain order:

* ``latency_ms``: median decode-step latency of the unit on the profiling machine,
  which becomes the reference device (``compute_score`` 1.0);
* ``prefill_ms_per_token``: median prefill latency divided by the prompt length;
* ``param_bytes``: weights a stage holding the unit must load (a tied LM head counts
  its weight again: a last stage on another node needs its own copy);
* ``activation_bytes``: bytes handed to the next unit per decoded token and sequence
  (``hidden_size * dtype bytes`` for ``embed`` and blocks; the sampled token id, 8 bytes,
  for ``lm_head``);
* ``kv_bytes_per_token``: KV-cache bytes per token of context and sequence.

It is derived from the ``unit`` rows of ``metrics.jsonl`` by :func:`unit_document`,
so a profile can be read from either file.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from noodle.errors import SpecError
from noodle.profile.jsonl import read_jsonl
from noodle.types import Unit, unit_names

__all__ = ["UNITS_FORMAT", "unit_document", "units_from_document", "load_units", "format_units"]

UNITS_FORMAT = "noodle.units/1"
_META = ("model", "reference_device", "workload", "latency_stat")
_FIELDS = ("latency_ms", "param_bytes", "activation_bytes", "kv_bytes_per_token")


def unit_document(rows: list[dict[str, Any]], source: str | Path = "metrics.jsonl") -> dict[str, Any]:
    """The ``units.json`` document of a profile's ``metrics.jsonl`` rows.

    Raises:
        SpecError: the rows have no ``run`` header or lack a unit's decode/prefill row.
    """
    header = next((r for r in rows if r.get("kind") == "run"), None)
    if header is None:
        raise SpecError(f"{source}: no 'run' row; not a metrics.jsonl written by noodle profile")
    names = header.get("units")
    workload = header.get("workload")
    if not isinstance(names, list) or not names or not isinstance(workload, dict):
        raise SpecError(f"{source}: run row: 'units' and 'workload' are missing or malformed")
    by_key = {(r.get("name"), r.get("phase")): r for r in rows if r.get("kind") == "unit"}
    prompt = workload.get("prompt_tokens")
    if not isinstance(prompt, int) or prompt < 1:
        raise SpecError(f"{source}: run row: workload.prompt_tokens: expected a positive integer, got {prompt!r}")
    records = []
    for name in names:
        decode, prefill = by_key.get((name, "decode")), by_key.get((name, "prefill"))
        if decode is None or prefill is None:
            raise SpecError(f"{source}: unit {name!r}: no decode and prefill rows; the profile is incomplete")
        try:
            records.append(
                {
                    "name": name,
                    "latency_ms": decode["latency_ms_p50"],
                    "prefill_ms_per_token": prefill["latency_ms_p50"] / prompt,
                    "param_bytes": decode["param_bytes"],
                    "activation_bytes": decode["handoff_bytes"],
                    "kv_bytes_per_token": decode["kv_bytes_per_token"],
                }
            )
        except (KeyError, TypeError) as exc:
            raise SpecError(f"{source}: unit {name!r}: field {exc} missing or not a number") from None
    doc: dict[str, Any] = {"format": UNITS_FORMAT}
    doc.update({key: header.get(key) for key in _META})
    doc["units"] = records
    return doc


_MAX_INT, _MAX_FLOAT = 2**50, 1e9  # bytes and milliseconds per unit: the spec's bounds (noodle.spec)


def _number(value: Any, where: str, integer: bool) -> float | int:
    top = _MAX_INT if integer else _MAX_FLOAT
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and value >= 0
    if ok and value > top:
        raise SpecError(f"{where}: must be at most {top:g}, got {value!r}")
    if ok and integer and float(value) != int(value):
        ok = False
    if not ok:
        kind = "a whole number" if integer else "a number"
        raise SpecError(f"{where}: must be {kind} >= 0, got {value!r}")
    return int(value) if integer else float(value)


def units_from_document(doc: Any, source: str | Path = "units.json") -> tuple[Unit, ...]:
    """Validated units of a ``units.json`` document, in chain order.

    Raises:
        SpecError: a unit is missing, out of chain order, or has a negative/non-numeric field.
    """
    if not isinstance(doc, dict) or not isinstance(doc.get("units"), list):
        raise SpecError(f"{source}: expected an object with a 'units' list (units.json of noodle profile)")
    raw = doc["units"]
    if len(raw) < 3:
        raise SpecError(f"{source}: units: expected embed, at least one block and lm_head, got {len(raw)} units")
    expected = unit_names(len(raw) - 2)
    units = []
    for i, item in enumerate(raw):
        where = f"{source}: units[{i}]"
        if not isinstance(item, dict):
            raise SpecError(f"{where}: expected an object, got {type(item).__name__}")
        if item.get("name") != expected[i]:
            raise SpecError(f"{where}.name: expected {expected[i]!r} (units in chain order), got {item.get('name')!r}")
        for key in _FIELDS:
            if key not in item:
                raise SpecError(f"{where}.{key}: missing")
        prefill = item.get("prefill_ms_per_token")
        units.append(
            Unit(
                name=expected[i],
                latency_ms=float(_number(item["latency_ms"], f"{where}.latency_ms", False)),
                param_bytes=int(_number(item["param_bytes"], f"{where}.param_bytes", True)),
                activation_bytes=int(_number(item["activation_bytes"], f"{where}.activation_bytes", True)),
                kv_bytes_per_token=int(_number(item["kv_bytes_per_token"], f"{where}.kv_bytes_per_token", True)),
                prefill_ms_per_token=None
                if prefill is None
                else float(_number(prefill, f"{where}.prefill_ms_per_token", False)),
            )
        )
    return tuple(units)


def load_units(path: str | Path) -> tuple[tuple[Unit, ...], dict[str, Any]]:
    """Placement units of a profile, in chain order, and what they were measured on.

    Args:
        path: a profile folder (``units.json`` is read, else ``metrics.jsonl``),
            a ``metrics.jsonl`` or a ``units.json``.

    Returns:
        ``(units, metadata)``; metadata has ``model``, ``reference_device`` (the machine
        that profiled, ``compute_score`` 1.0), ``workload``, ``latency_stat`` and ``source``.

    Raises:
        SpecError: the path holds no profile, or the profile is malformed (names the field).
    """
    p = Path(path)
    if p.is_dir():
        candidates = [p / "units.json", p / "metrics.jsonl"]
        found = next((c for c in candidates if c.is_file()), None)
        if found is None:
            raise SpecError(f"{p}: no profile there (expected units.json or metrics.jsonl written by noodle profile)")
        p = found
    elif not p.is_file():
        raise SpecError(f"{p}: no such profile file (give a profile folder, metrics.jsonl or units.json)")
    if p.suffix == ".jsonl":
        doc = unit_document(read_jsonl(p), p)
    else:
        try:
            doc = json.loads(p.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise SpecError(f"{p}: not a readable JSON profile ({exc})") from None
        except RecursionError:
            raise SpecError(f"{p}: not a units.json profile (nested too deeply)") from None
    units = units_from_document(doc, p)
    meta = {key: doc.get(key) for key in _META}
    meta["source"] = str(p)
    meta["formats"] = doc.get("formats")  # per-format figures of `noodle profile --formats`; absent in older profiles
    ref = meta.get("reference_device")
    if not isinstance(ref, dict):
        raise SpecError(f"{p}: reference_device: missing; the profile does not say what machine measured it")
    return units, meta


def format_units(raw: Any, base: tuple[Unit, ...], source: str | Path = "units.json") -> dict[str, tuple[Unit, ...]]:
    """Per-format units of a profile's ``formats`` section: ``{format: {"units": [{name, latency_ms, param_bytes,
    prefill_ms_per_token?}]}}``; activation and KV bytes are the base units' (activations stay float32).

    Raises:
        SpecError: the section is malformed or its units do not follow the base chain.
    """
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise SpecError(f"{source}: formats: expected an object {{format: {{units: [...]}}}}, got {type(raw).__name__}")
    out: dict[str, tuple[Unit, ...]] = {}
    for fmt, body in raw.items():
        rows = body.get("units") if isinstance(body, dict) else None
        if not isinstance(rows, list) or len(rows) != len(base):
            raise SpecError(f"{source}: formats.{fmt}.units: expected {len(base)} units in chain order")
        units = []
        for i, (row, u) in enumerate(zip(rows, base)):
            where = f"{source}: formats.{fmt}.units[{i}]"
            if not isinstance(row, dict) or row.get("name") != u.name:
                raise SpecError(f"{where}.name: expected {u.name!r} (units in chain order)")
            prefill = row.get("prefill_ms_per_token")
            units.append(Unit(
                name=u.name, latency_ms=float(_number(row.get("latency_ms"), f"{where}.latency_ms", False)),
                param_bytes=int(_number(row.get("param_bytes"), f"{where}.param_bytes", True)),
                activation_bytes=u.activation_bytes, kv_bytes_per_token=u.kv_bytes_per_token,
                prefill_ms_per_token=None if prefill is None else float(_number(prefill, f"{where}.prefill_ms_per_token", False)),
            ))
        out[str(fmt)] = tuple(units)
    return out
