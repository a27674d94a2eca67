"""Checks of a model folder's safetensors files before any loader opens them (no torch needed).

A safetensors file is an 8-byte little-endian header length ``N``, ``N`` bytes of JSON
(``name -> {dtype, shape, data_offsets}``), then the tensor bytes. :func:`check_safetensors`
reads only the header and refuses a truncated or garbage file with one line naming the
file and the problem; :func:`weight_files` also refuses a ``model.safetensors.index.json``
whose ``weight_map`` points outside the model folder.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from noodle.errors import ModelError

__all__ = ["INDEX_FILE", "MAX_HEADER_BYTES", "check_safetensors", "read_index", "weight_files"]

INDEX_FILE = "model.safetensors.index.json"
MAX_HEADER_BYTES = 100 * 2**20  # the safetensors library's own limit
_MAX_INDEX_BYTES = 64 * 2**20
_ITEMSIZE = {
    "BOOL": 1, "U8": 1, "I8": 1, "F8_E4M3": 1, "F8_E5M2": 1, "F8_E8M0": 1, "I16": 2, "U16": 2, "F16": 2,
    "BF16": 2, "I32": 4, "U32": 4, "F32": 4, "I64": 8, "U64": 8, "F64": 8, "C64": 8,
}


def _bad(file: Path, what: str) -> ModelError:
    return ModelError(f"{file}: not a usable safetensors file ({what}); re-save the model with save_pretrained")


def check_safetensors(file: str | Path) -> list[str]:
    """The tensor names of ``file`` after checking its header against its size.

    Raises:
        ModelError: the file is unreadable, truncated, or its header is not safetensors JSON.
    """
    file = Path(file)
    try:
        size = file.stat().st_size
        with file.open("rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise _bad(file, f"{size} bytes, shorter than the 8-byte header length")
            n = int.from_bytes(head, "little")
            if n > size - 8 or n > MAX_HEADER_BYTES:
                raise _bad(file, f"header of {n} bytes does not fit the {size}-byte file: truncated or garbage")
            raw = f.read(n)
    except OSError as exc:
        raise ModelError(f"{file}: cannot read weights ({exc.strerror or exc})") from None
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError):
        raise _bad(file, "header is not JSON") from None
    if not isinstance(header, dict):
        raise _bad(file, "header is not a JSON object")
    data_len = size - 8 - n
    spans = []
    for name, info in header.items():
        if name == "__metadata__":
            continue
        offsets = info.get("data_offsets") if isinstance(info, dict) else None
        shape = info.get("shape") if isinstance(info, dict) else None
        if (
            not isinstance(offsets, list) or len(offsets) != 2 or not all(type(o) is int for o in offsets)
            or not isinstance(shape, list) or not all(type(d) is int and d >= 0 for d in shape)
        ):
            raise _bad(file, f"tensor {name!r} has no valid shape and data_offsets")
        begin, end = offsets
        if not 0 <= begin <= end <= data_len:
            raise _bad(file, f"tensor {name!r} spans bytes [{begin}, {end}) of {data_len}: truncated")
        itemsize = _ITEMSIZE.get(str(info.get("dtype")))
        if itemsize is not None and end - begin != math.prod(shape) * itemsize:
            raise _bad(file, f"tensor {name!r}: {end - begin} bytes for shape {shape} of {info.get('dtype')}")
        spans.append((begin, end))
    covered = 0
    for begin, end in sorted(spans):
        if begin != covered:
            raise _bad(file, f"tensor data has a gap or overlap at byte {covered}")
        covered = end
    if covered != data_len:
        raise _bad(file, f"tensors cover {covered} of {data_len} data bytes")
    return [k for k in header if k != "__metadata__"]


def read_index(folder: str | Path) -> dict[str, Path] | None:
    """``weight_map`` of the folder's safetensors index (tensor -> file), or None without an index.

    Raises:
        ModelError: the index is unreadable, or names a file outside ``folder`` or not a ``.safetensors``.
    """
    folder = Path(folder)
    index_file = folder / INDEX_FILE
    if not index_file.is_file():
        return None
    try:
        if index_file.stat().st_size > _MAX_INDEX_BYTES:
            raise ModelError(f"{index_file}: larger than {_MAX_INDEX_BYTES >> 20} MiB; not a safetensors index")
        weight_map = json.loads(index_file.read_text(encoding="utf-8"))["weight_map"]
    except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError, RecursionError) as exc:
        raise ModelError(f"{index_file}: unreadable safetensors index ({type(exc).__name__}: {exc})"[:300]) from None
    if not isinstance(weight_map, dict) or not weight_map:
        raise ModelError(f"{index_file}: weight_map: expected an object of tensor name -> file name")
    root = folder.resolve()
    out: dict[str, Path] = {}
    for name, rel in weight_map.items():
        if not isinstance(rel, str) or not rel.endswith(".safetensors"):
            raise ModelError(f"{index_file}: weight_map[{name!r}]: {rel!r} is not a .safetensors file name")
        path = (folder / rel).resolve()
        if not path.is_relative_to(root):
            raise ModelError(
                f"{index_file}: weight_map[{name!r}]: {rel!r} points outside the model folder; "
                "weights must lie inside it"
            )
        out[name] = folder / rel
    return out


def weight_files(folder: str | Path) -> dict[Path, list[str]]:
    """Every safetensors file of the model in ``folder`` (index first, else ``*.safetensors``), checked.

    Raises:
        ModelError: no weights, an index pointing outside the folder, a missing, truncated or garbage file,
            or an index naming a tensor its file does not hold.
    """
    folder = Path(folder)
    index = read_index(folder)
    files = sorted(set(index.values())) if index is not None else sorted(folder.glob("*.safetensors"))
    if not files:
        raise ModelError(f"{folder}: no *.safetensors weights")
    found = {file: check_safetensors(file) for file in files}
    if index is not None:
        for name, file in index.items():
            if name not in found[file]:
                raise ModelError(f"{folder / INDEX_FILE}: weight_map[{name!r}]: tensor is not in {file.name}")
    return found
