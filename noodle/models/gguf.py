"""Import a GGUF file into a normal model folder through transformers' own GGUF loading.

``from_pretrained(folder, gguf_file=name)`` reads the config, dequantizes the weights and
builds the tokenizer (with its chat template) from the GGUF metadata; this module checks the
file first (so a missing, truncated or corrupt file is one clear :class:`ModelError`), then
writes config.json, safetensors in the chosen dtype and the tokenizer files with
``save_pretrained``. The result is a folder every noodle command reads like any other.
"""

from __future__ import annotations

import contextlib
import json
import logging
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from noodle.errors import ModelError, SpecError
from noodle.progress import progress_bar

_log = logging.getLogger(__name__)

__all__ = ["DTYPES", "GgufInfo", "ImportResult", "gguf_info", "import_gguf"]

DTYPES = ("float32", "bfloat16", "float16")
_MAGIC = b"GGUF"


@dataclass(frozen=True)
class GgufInfo:
    """What the GGUF header says: architecture, model name, tensor count, file size in bytes."""

    architecture: str
    name: str
    tensors: int
    size: int


@dataclass(frozen=True)
class ImportResult:
    """A written model folder: its path, class, parameter count, dtype and whether a chat template came along."""

    out: Path
    model_class: str
    architecture: str
    parameters: int
    dtype: str
    chat_template: bool


def _field(reader: Any, key: str) -> str:
    field = reader.fields.get(key)
    if field is None or not field.data:
        return ""
    return bytes(field.parts[field.data[0]]).decode("utf-8", errors="replace")


def gguf_info(file: str | Path) -> GgufInfo:
    """Read and check a GGUF file's header and tensor table (no weights are dequantized).

    Raises:
        ModelError: the file is missing, empty, not GGUF, truncated or corrupt.
    """
    file = Path(file)
    if not file.is_file():
        raise ModelError(f"{file}: no such GGUF file")
    size = file.stat().st_size
    with file.open("rb") as f:
        magic = f.read(4)
    if magic != _MAGIC:
        raise ModelError(f"{file}: not a GGUF file (starts with {magic!r}, a GGUF file starts with b'GGUF')")
    from gguf import GGUFReader

    try:
        reader = GGUFReader(str(file))
    except Exception as exc:  # the reader raises ValueError, IndexError, struct errors... on bad bytes
        raise ModelError(f"{file}: truncated or corrupt GGUF file ({type(exc).__name__}: {str(exc)[:160]})") from None
    end = max((int(t.data_offset) + int(t.n_bytes) for t in reader.tensors), default=0)
    if end > size:
        raise ModelError(f"{file}: truncated GGUF file: its tensors need {end} bytes, the file has {size}")
    arch = _field(reader, "general.architecture")
    if not arch:
        raise ModelError(f"{file}: corrupt GGUF file (no general.architecture in its metadata)")
    return GgufInfo(arch, _field(reader, "general.name"), len(reader.tensors), size)


def _check_architecture(file: Path, info: GgufInfo) -> None:
    from transformers.modeling_gguf_pytorch_utils import GGUF_SUPPORTED_ARCHITECTURES

    known = set(GGUF_SUPPORTED_ARCHITECTURES) - {"general", "tokenizer"}  # metadata sections, not architectures
    if not {info.architecture, info.architecture.replace("moe", "_moe")} & known:
        raise ModelError(
            f"{file}: architecture {info.architecture!r} cannot be read from GGUF by this transformers version; "
            f"it reads {', '.join(sorted(known))}"
        )


@contextlib.contextmanager
def _dequantize_progress(progress: bool, label: str) -> Iterator[None]:
    """transformers' GGUF dequantization draws its own tqdm bar: report it through :func:`progress_bar` instead."""
    from unittest import mock

    import transformers.modeling_gguf_pytorch_utils as gguf_utils

    def tensors(iterable: Any, *args: Any, **kwargs: Any) -> Iterator[Any]:
        items = list(iterable)
        with progress_bar(progress, label, len(items)) as advance:
            for item in items:
                yield item
                advance()

    if not hasattr(gguf_utils, "tqdm"):  # another transformers: its loop reports nothing, so neither do we
        yield
        return
    with mock.patch.object(gguf_utils, "tqdm", tensors):
        yield


def import_gguf(file: str | Path, out: str | Path, *, dtype: str = "float32", progress: bool = True) -> ImportResult:
    """Write ``out`` (config.json, model.safetensors in ``dtype``, tokenizer files) from a GGUF file.

    ``progress`` reports the dequantization per tensor on stderr (a bar, or log lines off a terminal).

    Raises:
        SpecError: ``dtype`` is not one of :data:`DTYPES`.
        ModelError: the file cannot be read, or transformers cannot load its architecture.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if dtype not in DTYPES:
        raise SpecError(f"--dtype: {dtype!r} is not a dtype; use one of {', '.join(DTYPES)}")
    file = Path(file).resolve()
    info = gguf_info(file)
    _check_architecture(file, info)
    kwargs = {"gguf_file": file.name, "local_files_only": True}
    try:
        _log.info("reading %s (%s, %.0f MB): tokenizer", file.name, info.architecture, file.stat().st_size / 1e6)
        tokenizer = AutoTokenizer.from_pretrained(file.parent, **kwargs)
        _log.info("reading %s: config and weights (the GGUF metadata is parsed twice; dequantizing follows)", file.name)
        with _dequantize_progress(progress, f"dequantizing {file.name}"):
            model = AutoModelForCausalLM.from_pretrained(file.parent, dtype=getattr(torch, dtype), **kwargs)
    except (ValueError, KeyError, OSError, NotImplementedError, RuntimeError) as exc:
        raise ModelError(
            f"{file}: transformers cannot load this {info.architecture} GGUF ({str(exc).splitlines()[0][:200]})"
        ) from None
    # The weights are dequantized already; drop the GGUF quantizer so the folder saves as plain tensors.
    model.hf_quantizer = None  # type: ignore[assignment]  # PreTrainedModel sets it without declaring it (Module.__getattr__)
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model = model.to(getattr(torch, dtype)).eval()
    from noodle.models.adapter import layout_of

    layout_of(model, verified=False)  # a folder noodle can split; profile/exec refuse unverified architectures
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    _log.info("writing %s (%s)", out, dtype)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    record = {"source": str(file), "architecture": info.architecture, "name": info.name, "dtype": dtype}
    (out / "noodle_import.json").write_text(json.dumps(record) + "\n")
    return ImportResult(
        out=out,
        model_class=type(model).__name__,
        architecture=info.architecture,
        parameters=sum(p.numel() for p in model.parameters()),
        dtype=dtype,
        chat_template=bool(getattr(tokenizer, "chat_template", None)),
    )
