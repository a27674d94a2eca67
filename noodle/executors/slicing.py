"""Load a contiguous range of placement units from a model folder, and nothing else.

The whole model is first built on the ``meta`` device (no memory; the buffers
checkpoints do not hold are computed afterwards for the held modules only), its unit
layout is read with :func:`noodle.models.layout_of`, and only the checkpoint tensors
whose converted names fall in the units ``[start, end)`` are read (``safe_open``
slices) and loaded through transformers' own conversion rules (renamed keys, MoE
experts fused on load, sharded files). Everything else stays on ``meta`` and is dropped.

Weightless helpers the layout marks as shared (Llama's rotary embedding) are
built anew on the CPU, one copy per slice. A tied ``lm_head`` (GPT-2) takes the
token-embedding weight from the file when its slice does not hold the embedding,
and shares the tensor when it does.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import torch
from torch import nn

from noodle.errors import ModelError
from noodle.models.adapter import UnitLayout, layout_of
from noodle.models.loading import causal_lm_from_config, check_config_file, config_errors
from noodle.models.weights import read_index, weight_files

if TYPE_CHECKING:
    from transformers import PreTrainedModel
    from transformers.core_model_loading import WeightRenaming

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


def _skeleton(config: Any) -> PreTrainedModel:
    # on meta, in the checkpoint's dtype as from_pretrained makes it
    dtype = getattr(config, "dtype", None)
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype, None)
    return causal_lm_from_config(config, meta=True, dtype=dtype if isinstance(dtype, torch.dtype) else None)


def _materialize_buffers(model: nn.Module, module: nn.Module) -> None:
    """Compute the buffers checkpoints never hold (Gemma's ``embed_scale``) as from_pretrained does.

    They are allocated on the CPU and filled by the model's own ``_init_weights``, which leaves
    the loaded parameters alone (transformers flags them initialized).
    """
    for sub in module.modules():
        meta = [n for n, b in sub.named_buffers(recurse=False) if b.is_meta]
        if not meta:
            continue
        for name in meta:
            sub.register_buffer(name, torch.empty_like(sub.get_buffer(name), device="cpu"), persistent=False)
        init = getattr(model, "_init_weights", None)
        if callable(init):
            init(sub)


def unit_names_of(folder: str | Path) -> list[str]:
    """The placement-unit names of the model in ``folder`` (no weights are read)."""
    return layout_of(_skeleton(read_config(folder))).unit_names


def _rotary_copy(rotary: nn.Module, config: Any) -> nn.Module:
    try:
        return type(rotary)(config=config)
    except TypeError as exc:
        raise ModelError(f"cannot rebuild shared helper {type(rotary).__name__} from the config ({exc})") from None


def _checkpoint_keys(model: PreTrainedModel, index: dict[str, Path], wanted: Callable[[str], bool]) -> tuple[list[str], list[Any]]:
    """Checkpoint keys whose converted name's module is ``wanted``, and the model's weight conversions.

    transformers' own conversion rules (renamed keys, fused experts, old layouts) give each
    checkpoint key its in-memory name, so a stage reads only its own tensors.
    """
    from transformers.conversion_mapping import get_model_conversion_mapping
    from transformers.core_model_loading import WeightConverter, rename_source_key

    mapping = get_model_conversion_mapping(model, None, None)
    converters = [m for m in mapping if isinstance(m, WeightConverter)]
    # transformers has two kinds of WeightTransform: what is not a converter is a renaming
    renamings = cast("list[WeightRenaming]", [m for m in mapping if not isinstance(m, WeightConverter)])
    meta = dict.fromkeys(model.state_dict())
    prefix = getattr(model, "base_model_prefix", None)
    keys = []
    for key in index:
        target, _ = rename_source_key(key, renamings, converters, prefix, meta)
        if wanted(target.rpartition(".")[0]):
            keys.append(key)
    return keys, mapping


def _load_converted(model: PreTrainedModel, keys: list[str], index: dict[str, Path], mapping: list[Any], folder: Path) -> None:
    """Read ``keys`` from the safetensors files and load them through transformers' conversion."""
    from contextlib import ExitStack

    from safetensors import SafetensorError, safe_open
    from transformers.core_model_loading import convert_and_load_state_dict_in_model
    from transformers.modeling_utils import LoadStateDictConfig

    with ExitStack() as stack:
        files: dict[Path, Any] = {}
        state: dict[str, Any] = {}
        for key in keys:
            file = index[key]
            try:
                if file not in files:
                    files[file] = stack.enter_context(safe_open(str(file), framework="pt", device="cpu"))
                state[key] = files[file].get_slice(key)
            except (SafetensorError, OSError) as exc:  # changed on disk since weight_index checked it
                raise ModelError(f"{file}: cannot read weights ({str(exc).splitlines()[0]})") from None
        try:
            convert_and_load_state_dict_in_model(model, state, LoadStateDictConfig(weight_mapping=mapping))
        except (SafetensorError, OSError) as exc:
            raise ModelError(f"{folder}: cannot read weights ({str(exc).splitlines()[0]})") from None
        except (RuntimeError, ValueError) as exc:
            raise ModelError(f"{folder}: weights do not fit the config ({str(exc).splitlines()[0]})") from None


def load_slice(folder: str | Path, start: int, end: int) -> ModelSlice:
    """Load units ``[start, end)`` of the model in ``folder``.

    Raises:
        ModelError: missing folder/config/weights, or a layout noodle cannot split.
        ValueError: the range is empty or outside the model's units (a caller bug;
            plans are checked against the model before stages are built).
    """
    folder = Path(folder)
    config = read_config(folder)
    model = _skeleton(config)
    config = model.config  # from_config fills in the attention implementation
    layout = layout_of(model)
    names = layout.unit_names
    if not 0 <= start < end <= len(names):
        raise ValueError(f"unit range [{start}, {end}) is not inside [0, {len(names)})")
    index = weight_index(folder)
    units = set(names[start:end])
    keys, mapping = _checkpoint_keys(model, index, lambda path: layout.unit_of_module(path) in units)
    holds_embed = start == 0
    holds_head = end == len(names)
    head_path = layout.lm_head
    if layout.tied and holds_head and not holds_embed:
        # a tied head without the embedding: read the embedding's tensors, as the head's
        emb = layout.input_embedding
        keys += _checkpoint_keys(model, index, lambda path: path == emb or path.startswith(emb + "."))[0]
    with torch.no_grad():
        _load_converted(model, keys, index, mapping, folder)
        if layout.tied and holds_head:
            embedding = model.get_submodule(layout.input_embedding)
            model.get_submodule(head_path).weight = embedding.weight
        for unit in units:
            for path in layout.unit_modules()[unit]:
                module = model.get_submodule(path)
                _materialize_buffers(model, module)
                module.requires_grad_(False)
                for name, t in [*module.named_parameters(), *module.named_buffers()]:
                    if t.is_meta:
                        raise ModelError(f"{folder}: tensor {path}.{name} is missing from the safetensors files")
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
    final = [model.get_submodule(p).eval() for p in layout.final] if holds_head else []
    head = model.get_submodule(layout.lm_head).eval() if holds_head else None
    rotary = None
    if layout.shared and blocks:
        if len(layout.shared) > 1:
            raise ModelError(f"{type(model).__name__}: more than one shared helper ({', '.join(layout.shared)})")
        rotary = _rotary_copy(model.get_submodule(layout.shared[0]), config).eval()
    return ModelSlice(config, layout, start, end, embed, blocks, final, head, rotary)

