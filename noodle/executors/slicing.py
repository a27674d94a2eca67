"""Load a contiguous range of placement units from a model folder, and nothing else.

The whole model is first built on the ``meta`` device (no memory), its unit
layout is read with :func:`noodle.models.layout_of`, and only the modules of the
units ``[start, end)`` are filled from the folder's safetensors files through
``safe_open``, tensor by tensor. Everything else stays on ``meta`` and is dropped.

Weightless helpers the layout marks as shared (Llama's rotary embedding) are
built anew on the CPU, one copy per slice. A tied ``lm_head`` (GPT-2) takes the
token-embedding weight from the file when its slice does not hold the embedding,
and shares the tensor when it does.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from noodle.errors import ModelError
from noodle.models.adapter import UnitLayout, layout_of
from noodle.models.loading import causal_lm_from_config, check_config_file, config_errors
from noodle.models.weights import read_index, weight_files

__all__ = ["ModelSlice", "load_slice", "read_config", "unit_names_of", "weight_index"]


@dataclass
class ModelSlice:
    """The modules of units ``[start, end)`` with real weights, in call order.

    Attributes:
        config: the model's transformers config (attention implementation set).
        layout: the unit layout of the full model.
        start, end: the unit range held.
        embed: ``(kind, module)`` pairs of the ``embed`` unit when held; ``kind`` is
            ``"tokens"`` (takes token ids), ``"positions"`` (an ``nn.Embedding``
            taking position ids, added) or ``"apply"`` (applied to the hidden states).
        blocks: ``(global layer index, block)`` of the decoder blocks held.
        final: modules after the blocks (final norm), when ``lm_head`` is held.
        head: the output projection, when ``lm_head`` is held.
        rotary: this slice's own copy of the shared rotary embedding, if the model has one.
    """

    config: Any
    layout: UnitLayout
    start: int
    end: int
    embed: list[tuple[str, nn.Module]]
    blocks: list[tuple[int, nn.Module]]
    final: list[nn.Module]
    head: nn.Module | None
    rotary: nn.Module | None

    def modules(self) -> Iterator[nn.Module]:
        yield from (m for _, m in self.embed)
        yield from (m for _, m in self.blocks)
        yield from self.final
        if self.head is not None:
            yield self.head
        if self.rotary is not None:
            yield self.rotary

    def param_bytes(self) -> int:
        """Bytes of weights and buffers held (a tied head shared with the embedding counts once)."""
        seen: set[int] = set()
        total = 0
        for mod in self.modules():
            for t in [*mod.parameters(), *mod.buffers()]:
                if id(t) not in seen:
                    seen.add(id(t))
                    total += t.numel() * t.element_size()
        return total


def read_config(folder: str | Path) -> Any:
    """The transformers config of a local model folder; problems raise :class:`ModelError`."""
    from transformers import AutoConfig

    folder = Path(folder)
    if not folder.is_dir():
        raise ModelError(f"{folder}: no such model folder")
    if not (folder / "config.json").is_file():
        raise ModelError(f"{folder}: not a model folder (no config.json)")
    check_config_file(folder / "config.json")
    try:
        return AutoConfig.from_pretrained(folder, local_files_only=True)
    except config_errors() as exc:
        raise ModelError(f"{folder}: cannot read config.json ({str(exc).splitlines()[0]})") from None


def weight_index(folder: str | Path) -> dict[str, Path]:
    """Tensor name -> safetensors file holding it (sharded or not), every file's header checked first.

    Raises:
        ModelError: no weights, an index pointing outside the folder, a truncated or garbage file.
    """
    folder = Path(folder)
    index = read_index(folder)
    files = weight_files(folder)
    if index is not None:
        return index
    out: dict[str, Path] = {}
    for file, names in files.items():
        out.update(dict.fromkeys(names, file))
    return out


def _skeleton(config: Any) -> nn.Module:
    return causal_lm_from_config(config, meta=True)


def unit_names_of(folder: str | Path) -> list[str]:
    """The placement-unit names of the model in ``folder`` (no weights are read)."""
    return layout_of(_skeleton(read_config(folder))).unit_names


def _load_into(module: nn.Module, path: str, tensors: dict[str, torch.Tensor], folder: Path) -> None:
    try:
        module.load_state_dict(tensors, strict=True, assign=True)
    except RuntimeError as exc:
        raise ModelError(f"{folder}: weights of {path} do not fit the config ({str(exc).splitlines()[0]})") from None
    for name, t in [*module.named_parameters(), *module.named_buffers()]:
        if t.is_meta:
            raise ModelError(f"{folder}: no weights for {path}.{name} in the safetensors files")


def _rotary_copy(rotary: nn.Module, config: Any) -> nn.Module:
    try:
        return type(rotary)(config=config)
    except TypeError as exc:
        raise ModelError(f"cannot rebuild shared helper {type(rotary).__name__} from the config ({exc})") from None


def load_slice(folder: str | Path, start: int, end: int) -> ModelSlice:
    """Load units ``[start, end)`` of the model in ``folder``.

    Raises:
        ModelError: missing folder/config/weights, or a layout noodle cannot split.
        ValueError: the range is empty or outside the model's units (a caller bug;
            plans are checked against the model before stages are built).
    """
    from safetensors import SafetensorError, safe_open

    folder = Path(folder)
    config = read_config(folder)
    model = _skeleton(config)
    config = model.config  # from_config fills in the attention implementation
    layout = layout_of(model)
    names = layout.unit_names
    if not 0 <= start < end <= len(names):
        raise ValueError(f"unit range [{start}, {end}) is not inside [0, {len(names)})")
    index = weight_index(folder)

    owned = layout.unit_modules()
    wanted: dict[str, list[str]] = {}  # module path -> its tensor names in the file
    sources: dict[str, str] = {}  # tensor name in the model -> name in the file
    for unit in names[start:end]:
        for path in owned[unit]:
            module = model.get_submodule(path)
            keys = list(module.state_dict().keys())
            wanted[path] = keys
            for key in keys:
                full = f"{path}.{key}"
                source = full
                if full not in index and layout.tied and path == layout.lm_head:
                    source = f"{layout.input_embedding}.{key}"
                if source not in index:
                    raise ModelError(f"{folder}: tensor {full} is missing from the safetensors files")
                sources[full] = source

    holds_embed = start == 0
    share_head = layout.tied and holds_embed and end == len(names)
    by_file: dict[Path, list[str]] = {}
    for full, source in sources.items():
        if share_head and full.startswith(layout.lm_head + "."):
            continue  # tied: shares the embedding's tensor below
        by_file.setdefault(index[source], []).append(full)
    loaded: dict[str, torch.Tensor] = {}
    for file, fulls in by_file.items():
        try:
            with safe_open(str(file), framework="pt", device="cpu") as f:
                for full in fulls:
                    loaded[full] = f.get_tensor(sources[full])
        except (SafetensorError, OSError) as exc:  # changed on disk since weight_index checked it
            raise ModelError(f"{file}: cannot read weights ({str(exc).splitlines()[0]})") from None

    with torch.no_grad():
        for path, keys in wanted.items():
            module = model.get_submodule(path)
            if share_head and path == layout.lm_head:
                continue
            _load_into(module, path, {k: loaded.pop(f"{path}.{k}") for k in keys}, folder)
            module.requires_grad_(False)
        if share_head:
            head = model.get_submodule(layout.lm_head)
            head.weight = model.get_submodule(layout.input_embedding).weight
            rest = {k: loaded.pop(f"{layout.lm_head}.{k}") for k in wanted[layout.lm_head] if k != "weight"}
            if rest:
                _load_into_partial(head, rest)

    embed: list[tuple[str, nn.Module]] = []
    if holds_embed:
        for path in layout.embed:
            mod = model.get_submodule(path)
            if path == layout.input_embedding:
                kind = "tokens"
            elif isinstance(mod, nn.Embedding):
                kind = "positions"
            else:
                kind = "apply"
            embed.append((kind, mod.eval()))
    first_block, last_block = max(start, 1) - 1, min(end, len(names) - 1) - 1
    blocks = [(i, model.get_submodule(layout.blocks[i]).eval()) for i in range(first_block, last_block)]
    holds_head = end == len(names)
    final = [model.get_submodule(p).eval() for p in layout.final] if holds_head else []
    head = model.get_submodule(layout.lm_head).eval() if holds_head else None
    rotary = None
    if layout.shared and blocks:
        if len(layout.shared) > 1:
            raise ModelError(f"{type(model).__name__}: more than one shared helper ({', '.join(layout.shared)})")
        rotary = _rotary_copy(model.get_submodule(layout.shared[0]), config).eval()
    return ModelSlice(config, layout, start, end, embed, blocks, final, head, rotary)


def _load_into_partial(module: nn.Module, tensors: dict[str, torch.Tensor]) -> None:
    for name, value in tensors.items():
        owner_path, _, attr = name.rpartition(".")
        owner = module.get_submodule(owner_path) if owner_path else module
        setattr(owner, attr, nn.Parameter(value, requires_grad=False))
