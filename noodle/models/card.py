"""One frozen description of a model folder, read once: its config, units, limits, token ids and hashes.

:func:`read_card` reads ``config.json`` once (its bytes give the folder hash, its JSON object every fact
below) and checks the folder; everything downstream (``noodle serve --cluster``'s registry, planner,
link prober and join verifier) takes the card instead of reading the folder again. Importing this
module needs neither torch nor transformers: the families :mod:`noodle.models.paramcount` counts get
their unit names and KV bytes from the config alone; any other family is built on the ``meta`` device
for its unit names (the ``exec`` extra). :attr:`ModelCard.hf_config` makes the transformers config from
the parsed object (no disk read) when a caller needs one; the weights' sha256 is computed on first use
(each file's hash cached on disk).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

from noodle.errors import ModelError

__all__ = ["ModelCard", "read_card", "folder_hash", "weights_hash", "max_positions", "token_ids_of",
           "DEFAULT_CACHE_DIR", "HASH_CHUNK"]  # fmt: skip

DEFAULT_CACHE_DIR = Path("~/.cache/noodle")
HASH_CHUNK = 8 * 2**20
_POSITION_KEYS = ("max_position_embeddings", "n_positions", "max_seq_len", "seq_length")


def max_positions(config: Any) -> int | None:
    """The longest sequence the model's positions allow (``None`` when the config does not say).

    ``config``: a transformers config or a config.json object (a dict).
    """
    for name in _POSITION_KEYS:
        value = config.get(name) if isinstance(config, dict) else getattr(config, name, None)
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return value
    return None


def token_ids_of(config: object) -> tuple[int | list[int] | None, int]:
    """``(eos_token_id, pad_token_id)`` of a config the way ``generate`` falls back: pad = eos when unset."""
    get = config.get if isinstance(config, dict) else lambda k: getattr(config, k, None)
    eos, pad = get("eos_token_id"), get("pad_token_id")
    if pad is None:  # an empty eos list gives no pad id (0), where int([]) raised before
        pad = (eos[0] if eos else None) if isinstance(eos, list) else eos
    return eos, int(pad) if pad is not None else 0


def folder_hash(folder: Path, config_bytes: bytes | None = None) -> str:
    """A short hash of the model folder: config.json's bytes and each weights file's name and size."""
    data = config_bytes if config_bytes is not None else (Path(folder) / "config.json").read_bytes()
    h = hashlib.sha256(data)
    for f in sorted(Path(folder).glob("*.safetensors")):
        h.update(f"{f.name}:{f.stat().st_size}".encode())
    return h.hexdigest()[:16]


def _file_sha256(path: Path, cache: Path) -> str:
    """sha256 of ``path``'s bytes, cached in ``cache`` under its resolved path, size and mtime (ns)."""
    st = path.stat()
    key = f"{path.resolve()}:{st.st_size}:{st.st_mtime_ns}"
    entry = cache / f"{hashlib.sha256(key.encode()).hexdigest()[:32]}.json"
    try:
        known = json.loads(entry.read_text())
        if isinstance(known, dict) and known.get("key") == key and isinstance(known.get("sha256"), str):
            return str(known["sha256"])
    except (OSError, ValueError):
        pass
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(HASH_CHUNK):
            h.update(chunk)
    digest = h.hexdigest()
    try:
        cache.mkdir(parents=True, exist_ok=True)
        entry.write_text(json.dumps({"key": key, "sha256": digest}))
    except OSError as exc:
        import logging

        logging.getLogger(__name__).warning("cannot cache the weights hash in %s (%s)", entry, exc.strerror)
    return digest


def weights_hash(model_dir: Path, cache_dir: Path | None = None) -> str:
    """sha256 over the model folder's weights: each ``*.safetensors`` file's name and the sha256 of its bytes.

    Coordinator and worker must agree on it: a folder with the same config and file sizes but other
    weights is refused. Each file's hash is computed once and cached under ``<cache dir>/hashes/``,
    keyed by its resolved path, size and mtime (a rewritten file is hashed again).
    """
    cache = (cache_dir or DEFAULT_CACHE_DIR).expanduser() / "hashes"
    h = hashlib.sha256()
    for f in sorted(Path(model_dir).glob("*.safetensors")):
        h.update(f"{f.name}:{_file_sha256(f, cache)}\n".encode())
    return h.hexdigest()


@dataclass(frozen=True)
class ModelCard:
    """What noodle knows of a model folder, read once by :func:`read_card`.

    Attributes:
        folder: the folder, resolved.
        config: config.json's JSON object (parsed once; do not change it).
        model_hash: :func:`folder_hash` of the folder (config bytes, weights names and sizes).
        model_type: the config's ``model_type`` (``None`` when it has none).
        architecture: the config's first ``architectures`` entry (``None`` when it names none).
        unit_names: the placement units, in chain order (``embed``, ``block.i``, ``lm_head``).
        context_tokens: the longest sequence its positions allow (``None``: the config does not say).
        kv_bytes_per_token: KV cache bytes per token of each unit in the checkpoint's dtype, for the
            families counted from the config alone (``None`` for others).
        eos_ids: the end-of-sequence ids (empty when the config names none).
        pad_id: the padding id (eos when unset, else 0), as ``generate`` falls back.
        vocab_size: the vocabulary size (``None`` when the config does not say).
        hidden_size: the width of the hidden states (``None`` when the config does not say).
        cache_dir: where weights hashes are cached (``None``: :data:`DEFAULT_CACHE_DIR`).
    """

    folder: Path
    config: dict[str, Any] = field(repr=False, compare=False)
    model_hash: str
    model_type: str | None
    architecture: str | None
    unit_names: tuple[str, ...]
    context_tokens: int | None
    kv_bytes_per_token: tuple[int, ...] | None
    eos_ids: tuple[int, ...]
    pad_id: int
    vocab_size: int | None
    hidden_size: int | None
    cache_dir: Path | None = field(default=None, repr=False, compare=False)

    @property
    def num_blocks(self) -> int:
        """Decoder blocks (units named ``block.i``)."""
        return sum(1 for u in self.unit_names if u.startswith("block."))

    @property
    def config_path(self) -> Path:
        return self.folder / "config.json"

    @cached_property
    def weights_sha256(self) -> str:
        """:func:`weights_hash` of the folder, computed on first use (each file's hash cached on disk)."""
        return weights_hash(self.folder, self.cache_dir)

    @cached_property
    def hf_config(self) -> Any:
        """The transformers config made from the parsed object (no disk read; needs the ``exec`` extra)."""
        return _hf_config(self.folder, self.config)


def _hf_config(folder: Path, raw: dict[str, Any]) -> Any:
    """``AutoConfig.from_pretrained(folder)`` without reading the folder: the config class's ``from_dict``."""
    if not _has_transformers():
        from noodle.extras import require_exec

        require_exec(f"{folder}: the transformers config of model_type {raw.get('model_type')!r}")
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    from noodle.models.loading import config_errors

    kind = raw.get("model_type")
    if not isinstance(kind, str) or kind not in CONFIG_MAPPING:
        raise ModelError(f"{folder}: cannot read config.json (model_type {kind!r} is not one this transformers "
                         "version knows)")  # fmt: skip
    try:
        config = CONFIG_MAPPING[kind].from_dict(dict(raw))
    except config_errors() as exc:
        raise ModelError(f"{folder}: cannot read config.json ({str(exc).splitlines()[0]})") from None
    config.name_or_path = str(folder)
    return config


def read_card(folder: str | Path, *, cache_dir: Path | None = None) -> ModelCard:
    """The :class:`ModelCard` of a local model folder; config.json is read once. Problems raise :class:`ModelError`."""
    from noodle.models.loading import check_config_file
    from noodle.models.paramcount import facts_of, unit_params

    folder = Path(folder)
    if not folder.is_dir():
        raise ModelError(f"{folder}: no such model folder")
    path = folder / "config.json"
    if not path.is_file():
        raise ModelError(f"{folder}: not a model folder (no config.json)")
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise ModelError(f"{path}: not a readable JSON config ({exc})") from None
    raw = check_config_file(path, data)
    folder = folder.resolve()
    facts = facts_of(raw)
    # the facts the serving path has always read from the transformers config (its class defaults apply):
    # from it when transformers is here, else from the JSON object
    source: Any = raw
    if facts is None or _has_transformers():
        source = _hf_config(folder, raw)
    if facts is not None:
        names = unit_params(facts).names
        kv_bytes = _kv_bytes(facts, names)
    else:
        names, kv_bytes = _built_unit_names(source), None
    eos, pad = token_ids_of(source)
    arch = raw.get("architectures")
    get = source.get if isinstance(source, dict) else lambda k: getattr(source, k, None)
    vocab, hidden = get("vocab_size"), get("hidden_size") or get("n_embd")
    return ModelCard(
        folder=folder, config=raw, model_hash=folder_hash(folder, data),
        model_type=raw.get("model_type") if isinstance(raw.get("model_type"), str) else None,
        architecture=str(arch[0]) if isinstance(arch, list) and arch else None,
        unit_names=tuple(names), context_tokens=max_positions(source), kv_bytes_per_token=kv_bytes,
        eos_ids=(eos,) if isinstance(eos, int) else tuple(eos or ()), pad_id=pad,
        vocab_size=int(vocab) if isinstance(vocab, int) else None,
        hidden_size=int(hidden) if isinstance(hidden, int) else None, cache_dir=cache_dir,
    )  # fmt: skip


def _has_transformers() -> bool:
    import importlib.util

    return importlib.util.find_spec("transformers") is not None


def _kv_bytes(facts: Any, names: tuple[str, ...]) -> tuple[int, ...]:
    """KV bytes per token of each unit: ``2 x kv_heads x head_dim x dtype bytes`` per block, none elsewhere."""
    from noodle.models.analytic import DTYPE_BYTES

    per_block = 2 * facts.num_key_value_heads * facts.head_dim * DTYPE_BYTES.get(facts.dtype or "float32", 4)
    return tuple(per_block if n.startswith("block.") else 0 for n in names)


def _built_unit_names(config: Any) -> tuple[str, ...]:
    """The unit names of a family not counted from the config: the model built on ``meta`` (torch)."""
    from noodle.models.adapter import layout_of
    from noodle.models.loading import causal_lm_from_config

    return tuple(layout_of(causal_lm_from_config(config, meta=True)).unit_names)
