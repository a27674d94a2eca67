"""JSON Lines: one JSON object per line, readable with ``pandas.read_json(path, lines=True)``."""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from noodle.errors import SpecError

__all__ = ["write_jsonl", "read_jsonl", "to_json_value"]


def to_json_value(value: Any) -> Any:
    """``value`` with tuples as lists and non-finite floats as ``None`` (strict JSON)."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, Mapping):
        return {str(k): to_json_value(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [to_json_value(v) for v in value]
    return value


def write_jsonl(path: str | Path, rows: Iterable[Mapping[str, Any]]) -> Path:
    """Write ``rows`` to ``path``, one compact JSON object per line."""
    path = Path(path)
    with path.open("w", encoding="utf-8") as fh:
        for row in rows:
            fh.write(json.dumps(to_json_value(row), allow_nan=False, separators=(",", ":")) + "\n")
    return path


def read_jsonl(path: str | Path) -> list[dict[str, Any]]:
    """Rows of a JSONL file; blank lines are skipped.

    Raises:
        SpecError: the file cannot be read, or a line is not a JSON object (names the line).
    """
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise SpecError(f"{path}: cannot read profile ({exc})") from None
    rows: list[dict[str, Any]] = []
    for lineno, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise SpecError(f"{path}: line {lineno}: not JSON ({exc.msg})") from None
        except RecursionError:
            raise SpecError(f"{path}: line {lineno}: nested too deeply; not a row written by noodle profile") from None
        if not isinstance(row, dict):
            raise SpecError(f"{path}: line {lineno}: expected a JSON object, got {type(row).__name__}")
        rows.append(row)
    return rows
