"""Reading the YAML/JSON documents users hand to noodle (specs, plans), with bounds.

Every limit here is checked before the parsed data reaches pydantic or a solver, and every
failure is a :class:`~noodle.errors.SpecError` that names the file (and line, where there is one):

- at most :data:`MAX_DOCUMENT_BYTES` (4 MiB), checked before the file is read;
- UTF-8 text (a byte-order mark is allowed);
- YAML 1.1 / JSON with no duplicate keys in a mapping;
- nested at most :data:`MAX_DEPTH` levels, and at most :data:`MAX_ELEMENTS` values once
  aliases are expanded (a YAML "billion laughs" document is refused, not walked).

libyaml (``yaml.CSafeLoader``) parses when PyYAML has it; the pure-Python loader is the fallback
and then carries the depth check itself (its composer recurses).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from noodle.errors import SpecError

__all__ = ["MAX_DOCUMENT_BYTES", "MAX_DEPTH", "MAX_ELEMENTS", "read_text", "parse_document", "load_document",
           "validation_message"]

MAX_DOCUMENT_BYTES = 4 * 2**20
MAX_DEPTH = 64
MAX_ELEMENTS = 1_000_000

_BASE: type = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


class _TooDeep(Exception):
    def __init__(self, line: int) -> None:
        super().__init__(line)
        self.line = line


class _DuplicateKey(Exception):
    def __init__(self, key: str, line: int, first: int) -> None:
        super().__init__(key)
        self.key, self.line, self.first = key, line, first


def _check_duplicates(node: yaml.MappingNode) -> None:
    seen: dict[tuple[str, str], int] = {}
    for key_node, _ in node.value:
        if not isinstance(key_node, yaml.ScalarNode) or key_node.tag == "tag:yaml.org,2002:merge":
            continue
        key = (key_node.tag, key_node.value)
        line = key_node.start_mark.line + 1
        if key in seen:
            raise _DuplicateKey(key_node.value, line, seen[key])
        seen[key] = line


class _Loader(_BASE):
    """SafeLoader that refuses duplicate keys (and, in pure Python, deep nesting while composing)."""

    _depth = 0

    def construct_mapping(self, node: Any, deep: bool = False) -> Any:
        if isinstance(node, yaml.MappingNode):
            _check_duplicates(node)
        return super().construct_mapping(node, deep=deep)

    def compose_node(self, parent: Any, index: Any) -> Any:  # pure-Python composer only
        self._depth += 1
        try:
            if self._depth > MAX_DEPTH:
                raise _TooDeep(self.peek_event().start_mark.line + 1)
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1


def read_text(path: str | Path, what: str) -> str:
    """The UTF-8 text of ``path``; refuses files over :data:`MAX_DOCUMENT_BYTES` before reading them."""
    path = Path(path)
    try:
        size = path.stat().st_size
        if path.is_dir():
            raise SpecError(f"{path}: is a folder, not a {what} file")
        if size > MAX_DOCUMENT_BYTES:
            raise SpecError(
                f"{path}: {size / 2**20:.1f} MiB is too large for a {what} file "
                f"(at most {MAX_DOCUMENT_BYTES / 2**20:.0f} MiB); put per-layer data in a profile folder"
            )
        with path.open("rb") as f:
            data = f.read(MAX_DOCUMENT_BYTES + 1)
    except OSError as exc:
        raise SpecError(f"{path}: cannot read {what} ({exc.strerror or exc})") from None
    if len(data) > MAX_DOCUMENT_BYTES:  # grew while we looked, or a special file
        raise SpecError(f"{path}: larger than {MAX_DOCUMENT_BYTES / 2**20:.0f} MiB; not a {what} file")
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = data[: exc.start].count(b"\n") + 1
        raise SpecError(
            f"{path}: line {line}: not valid UTF-8 (byte 0x{data[exc.start]:02x} at offset {exc.start}); "
            f"save the {what} as UTF-8 text"
        ) from None


def _check_shape(data: Any, source: str) -> None:
    """Depth and expanded size, walked without recursion (aliases count each time they are used)."""
    stack: list[tuple[Any, int]] = [(data, 0)]
    count = 0
    while stack:
        value, depth = stack.pop()
        count += 1
        if count > MAX_ELEMENTS:
            raise SpecError(
                f"{source}: more than {MAX_ELEMENTS:,} values once YAML aliases are expanded; "
                "write the document out without anchors and aliases"
            )
        if isinstance(value, dict):
            children: Any = [*value.keys(), *value.values()]
        elif isinstance(value, list):
            children = value
        else:
            continue
        if depth >= MAX_DEPTH:  # this container is level depth + 1
            raise SpecError(f"{source}: nested more than {MAX_DEPTH} levels deep; a spec or plan needs fewer than 10")
        stack.extend((c, depth + 1) for c in children)


def parse_document(text: str, source: str) -> Any:
    """Parse YAML (or JSON) text with the limits of this module; errors name ``source`` and a line."""
    loader = _Loader(text)
    try:
        data = loader.get_single_data()
    except _TooDeep as exc:
        raise SpecError(f"{source}: line {exc.line}: nested more than {MAX_DEPTH} levels deep") from None
    except _DuplicateKey as exc:
        raise SpecError(
            f"{source}: line {exc.line}: duplicate key {exc.key!r} (first given on line {exc.first}); "
            "give each key once"
        ) from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"line {mark.line + 1}" if mark is not None else "(parse)"
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        if "nesting depth" in str(problem):
            problem = f"nested more than {MAX_DEPTH} levels deep"
        raise SpecError(f"{source}: {where}: not valid YAML/JSON ({problem})") from None
    except RecursionError:  # a loader without libyaml's own nesting limit
        raise SpecError(f"{source}: nested more than {MAX_DEPTH} levels deep") from None
    finally:
        loader.dispose()
    _check_shape(data, source)
    return data


def load_document(path: str | Path, what: str) -> Any:
    """Read and parse a spec or plan file: :func:`read_text` then :func:`parse_document`."""
    return parse_document(read_text(path, what), str(path))


def validation_message(source: str, exc: ValidationError, *, schema: str = "specs/spec.schema.json") -> str:
    """One line for the first pydantic error: ``<source>: <field path>: <problem> (got <value>)``.

    ``schema``: the JSON Schema an unknown key's message points to.
    """
    err = exc.errors()[0]
    loc = ".".join(str(p) if not isinstance(p, int) else f"[{p}]" for p in err["loc"]).replace(".[", "[")
    msg = err["msg"].removeprefix("Value error, ")
    if err["type"] == "extra_forbidden":
        msg = f"unknown key (check the spelling; see {schema})"
    elif err["type"] == "missing":
        msg = "required key is missing"
    value = err.get("input")
    if isinstance(value, (int, float, str)) and not isinstance(value, bool) and err["type"] not in ("missing",):
        text = repr(value)
        msg += f" (got {text if len(text) <= 40 else text[:37] + '...'})"
    extra = f" (+{len(exc.errors()) - 1} more problems)" if len(exc.errors()) > 1 else ""
    return f"{source}: {loc or '(top level)'}: {msg}{extra}"
