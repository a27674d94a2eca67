"""Build models from configs with seeded random weights, save them, load them back.

There is no model hub here: every model is made from a config (a preset or a
``config.json``), saved with ``save_pretrained`` and read back through the real
``from_pretrained(path)`` code path.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from noodle.errors import ModelError

__all__ = ["PRESETS", "load_config", "causal_lm_from_config", "build_model", "init_model", "load_model"]

# name -> (model_type, config kwargs). Full-size presets follow the published configs.
PRESETS: dict[str, tuple[str, dict[str, Any]]] = {
    "gpt2": ("gpt2", dict(n_layer=12, n_embd=768, n_head=12, n_positions=1024, vocab_size=50257)),
    "gpt2-tiny": ("gpt2", dict(n_layer=4, n_embd=64, n_head=4, n_positions=256, vocab_size=512, bos_token_id=1, eos_token_id=2)),
    "llama-small": (
        "llama",
        dict(
            num_hidden_layers=8, hidden_size=512, intermediate_size=1376, num_attention_heads=8,
            num_key_value_heads=4, vocab_size=32000, max_position_embeddings=2048,
        ),
    ),
    "llama-tiny": (
        "llama",
        dict(
            num_hidden_layers=4, hidden_size=64, intermediate_size=172, num_attention_heads=4,
            num_key_value_heads=2, vocab_size=512, max_position_embeddings=256, bos_token_id=1, eos_token_id=2,
        ),
    ),
}


def load_config(source: str | Path | dict[str, Any]) -> Any:
    """A transformers ``PretrainedConfig`` from a preset name, a config.json path, a folder or a dict."""
    from transformers import AutoConfig

    if isinstance(source, dict):
        data = dict(source)
    elif isinstance(source, str) and source in PRESETS:
        model_type, kwargs = PRESETS[source]
        data = {"model_type": model_type, **kwargs}
    else:
        path = Path(source)
        if path.is_dir():
            path = path / "config.json"
        if not path.is_file():
            valid = ", ".join(PRESETS)
            raise ModelError(f"{source}: not a preset ({valid}) and no config.json there")
        data = check_config_file(path)
    model_type = data.pop("model_type", None)
    if not model_type:
        raise ModelError(f"{source}: config has no 'model_type'")
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    if model_type not in CONFIG_MAPPING:
        raise ModelError(f"{source}: model_type {model_type!r} is not known to this transformers version")
    try:
        return AutoConfig.for_model(model_type, **data)
    except config_errors() as exc:
        raise ModelError(f"{source}: invalid {model_type} config ({str(exc).splitlines()[0][:200]})") from None


def config_errors() -> tuple[type[BaseException], ...]:
    """What transformers raises for a config with fields of the wrong type or value (its versions differ)."""
    errors: tuple[type[BaseException], ...] = (OSError, ValueError, KeyError, TypeError, AttributeError, OverflowError)
    try:
        from huggingface_hub.errors import StrictDataclassError  # transformers >= 5 validates configs with it
    except ImportError:
        return errors
    return (*errors, StrictDataclassError)


def check_config_file(path: Path, raw: bytes | None = None) -> dict[str, Any]:
    """The JSON object of a config.json (or of its bytes ``raw``, read already), or a ModelError naming the file."""
    try:
        data = json.loads(raw.decode("utf-8") if raw is not None else path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ModelError(f"{path}: not a readable JSON config ({exc})") from None
    except RecursionError:
        raise ModelError(f"{path}: not a model config (JSON nested too deeply)") from None
    if not isinstance(data, dict):
        raise ModelError(f"{path}: expected a JSON object of config keys, got {type(data).__name__}")
    return data


def causal_lm_from_config(config: Any, *, dtype: Any = None, meta: bool = False) -> Any:
    """``AutoModelForCausalLM.from_config``; ``meta`` builds it without memory or weights.

    Raises:
        ModelError: the config's model type has no causal-LM class (an encoder, an encoder-decoder).
    """
    import contextlib

    import torch
    from transformers import AutoModelForCausalLM

    try:
        with torch.device("meta") if meta else contextlib.nullcontext():  # a thread-local mode
            return AutoModelForCausalLM.from_config(config, dtype=dtype)
    except ValueError as exc:
        raise ModelError(
            f"model_type {getattr(config, 'model_type', '?')!r} has no causal-LM class in transformers; "
            "noodle runs decoder-only LMs"
        ) from exc
    except (TypeError, AttributeError, OverflowError) as exc:  # a config field of the wrong type or size
        raise ModelError(f"the config does not build a model ({type(exc).__name__}: {str(exc).splitlines()[0][:200]})") from None


def build_model(config: Any, *, seed: int = 0, dtype: Any = None) -> Any:
    """A causal LM from ``config`` with seeded random weights, in eval mode."""
    import torch

    from noodle.models.adapter import layout_of

    torch.manual_seed(seed)
    model = causal_lm_from_config(config, dtype=dtype)
    layout_of(model, verified=False)  # refuse layouts noodle cannot split before anything is written
    return model.eval()


def init_model(source: str | Path | dict[str, Any], out: str | Path, *, seed: int = 0, tokenizer: bool = True) -> Path:
    """Build a model from a preset/config with seeded weights and ``save_pretrained`` it to ``out``.

    With ``tokenizer`` a small byte-level BPE tokenizer is trained and saved beside the weights
    (see :mod:`noodle.models.tokenizer`), so ``noodle exec --prompt TEXT`` works on the folder.
    """
    out = Path(out)
    model = build_model(load_config(source), seed=seed)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    if tokenizer:
        from noodle.models.tokenizer import save_tokenizer

        save_tokenizer(out, int(model.config.get_text_config().vocab_size))
    (out / "noodle_init.json").write_text(json.dumps({"source": str(source), "seed": seed}) + "\n")
    return out


def load_model(path: str | Path, *, dtype: Any = None, verified: bool = True) -> Any:
    """Load a local model folder through ``from_pretrained`` (no network), in eval mode.

    ``verified`` refuses architectures the conformance suite does not verify (see :func:`layout_of`).
    """
    from transformers import AutoModelForCausalLM

    path = Path(path)
    if not path.is_dir():
        raise ModelError(f"{path}: no such model folder")
    if not (path / "config.json").is_file():
        raise ModelError(f"{path}: not a model folder (no config.json)")
    check_config_file(path / "config.json")
    if not any(path.glob("*.safetensors")) and not any(path.glob("*.bin")):
        raise ModelError(f"{path}: not a model folder (no *.safetensors weights)")
    from safetensors import SafetensorError

    from noodle.models.weights import weight_files

    if any(path.glob("*.safetensors")):
        weight_files(path)  # truncated or garbage files, an index pointing outside the folder: one line
    load_errors: tuple[type[BaseException], ...] = (*config_errors(), SafetensorError)
    try:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, local_files_only=True)
    except load_errors as exc:
        raise ModelError(f"{path}: cannot load model ({str(exc).splitlines()[0]})") from None
    from noodle.models.adapter import layout_of

    layout_of(model, verified=verified)
    return model.eval()
