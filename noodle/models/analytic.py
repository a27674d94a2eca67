"""Analytic unit profiles from a transformers config, without weights.

Each unit's parameters are counted exactly: from the config's sizes alone for the families
:mod:`noodle.models.paramcount` knows (GPT-2, Llama, Mistral, Qwen2; no torch needed), else by
instantiating the model on PyTorch's ``meta`` device (no memory, no weights) and mapping it onto
placement units with :func:`noodle.models.layout_of`. Per decode step, for a workload with ``B`` sequences
and an average context of ``T = prompt_tokens + max_new_tokens / 2`` tokens:

* ``param_bytes``   = parameters of the unit x dtype bytes (a tied ``lm_head`` is
  charged in full: a head stage on another node needs its own copy);
* ``kv_bytes_per_token`` = 2 x kv_heads x head_dim x dtype bytes per block;
* ``activation_bytes`` = B x hidden_size x dtype bytes (8 x B for the sampled token ids
  that ``lm_head`` hands back);
* ``latency_ms`` = max(FLOPs / peak, bytes moved / bandwidth) on the reference device
  (a roofline), where FLOPs = 2 x B x matmul params (+ 4 x B x T x heads x head_dim for
  attention) and bytes moved = weights read + KV cache read + activations;
* ``curve`` = the same roofline as a function of the batch ``b`` (:class:`~noodle.types.BatchCurve`):
  the weights are read once per step, FLOPs and KV/activation reads grow with each sequence, so
  ``curve.ms(B) == latency_ms`` and a batch of ``b`` costs what the roofline says at ``b`` (the
  planner prices continuous batching's step batches with it, and scales a node's measurement at one
  batch size along it).

The reference device is the one with ``compute_score: 1.0`` in the cluster.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from noodle.errors import ModelError
from noodle.models.paramcount import UnitParams, facts_of, unit_params
from noodle.sizes import MAX_UNITS
from noodle.types import BatchCurve, Unit, Workload

__all__ = ["ReferenceDevice", "AnalyticModel", "analytic_units", "DTYPE_BYTES"]

DTYPE_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2, "int8": 1, "float8": 1}


@dataclass(frozen=True)
class ReferenceDevice:
    """The device whose ``compute_score`` is 1.0 (default: a desktop CPU)."""

    tflops: float = 1.0
    mem_bandwidth_gbps: float = 50.0  # GB/s

    def time_ms(self, flops: float, nbytes: float) -> float:
        return max(flops / (self.tflops * 1e12), nbytes / (self.mem_bandwidth_gbps * 1e9)) * 1e3

    def curve(self, row_flops: float, fixed_bytes: float, row_bytes: float) -> BatchCurve:
        """The roofline of a unit that reads ``fixed_bytes`` once per step and ``row_flops``/``row_bytes`` per sequence."""
        compute, read = 1e3 / (self.tflops * 1e12), 1e3 / (self.mem_bandwidth_gbps * 1e9)
        return BatchCurve(row_flops * compute, fixed_bytes * read, row_bytes * read)


@dataclass(frozen=True)
class AnalyticModel:
    """What the analytic profile found: units plus model facts for reports."""

    units: tuple[Unit, ...]
    model_type: str
    num_parameters: int  # unique parameters (tied weights once), as published
    dtype: str
    tied_lm_head: bool


def _config_dtype(config: Any) -> str:
    raw = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None) or "float32"
    return str(raw).removeprefix("torch.")


def analytic_units(
    config: Any,
    workload: Workload,
    *,
    dtype: str | None = None,
    reference: ReferenceDevice = ReferenceDevice(),
) -> AnalyticModel:
    """Build the unit chain of ``config`` for ``workload``.

    ``config`` is a config.json object (a dict) or a transformers ``PretrainedConfig``. The families
    :mod:`noodle.models.paramcount` knows are counted from the config alone (no torch); any other is built
    on the ``meta`` device, which needs torch and transformers (the ``exec`` extra) and a ``PretrainedConfig``.
    """
    raw = config if isinstance(config, dict) else config.to_dict()
    facts = facts_of(raw)
    blocks = facts.num_hidden_layers if facts else getattr(_text(config), "num_hidden_layers", None)
    if isinstance(blocks, int) and blocks + 2 > MAX_UNITS:  # before building: 10^6 blocks take minutes and GBs
        raise ModelError(f"num_hidden_layers: {blocks} blocks, at most {MAX_UNITS - 2} are supported "
                         f"(with embedding and head, {MAX_UNITS} placement units; see noodle/sizes.py)")
    dtype = dtype or (facts.dtype if facts and facts.dtype else _config_dtype(config))
    if dtype not in DTYPE_BYTES:
        raise ModelError(f"dtype {dtype!r} is not supported; use one of {', '.join(DTYPE_BYTES)}")
    if facts is not None:
        counted = unit_params(facts)
        sizes = (facts.hidden_size, facts.num_attention_heads, facts.head_dim, facts.num_key_value_heads)
        model_type = facts.model_type
    else:
        if isinstance(config, dict):
            raise ModelError(f"model_type {raw.get('model_type')!r}: counted by building the model, which needs a "
                             "transformers config (noodle.models.load_config)")  # fmt: skip
        counted, model_type = _count_on_meta(config), str(config.model_type)
        text = _text(config)
        heads = int(text.num_attention_heads)
        head_dim = int(getattr(text, "head_dim", None) or int(text.hidden_size) // heads)
        sizes = (int(text.hidden_size), heads, head_dim, int(getattr(text, "num_key_value_heads", None) or heads))
    units = _roofline_units(counted, sizes, DTYPE_BYTES[dtype], workload, reference)
    return AnalyticModel(units, model_type, counted.unique, dtype, counted.tied)


def _text(config: Any) -> Any:
    return config.get_text_config() if hasattr(config, "get_text_config") else config


def _count_on_meta(config: Any) -> UnitParams:
    """Parameters per unit of any causal LM transformers can build, counted on the ``meta`` device."""
    from noodle.models.adapter import layout_of
    from noodle.models.loading import causal_lm_from_config

    model = causal_lm_from_config(config, meta=True)
    layout = layout_of(model)
    modules = layout.unit_modules()

    def count(paths: tuple[str, ...]) -> int:
        return sum(p.numel() for path in paths for p in model.get_submodule(path).parameters())

    unique = sum(p.numel() for p in model.parameters())  # parameters() skips tied duplicates
    tables = sum(1 for path in modules.get("embed", ()) if count((path,)))  # a dropout is no table
    return UnitParams(tuple(modules), tuple(count(p) for p in modules.values()), unique, layout.tied, max(1, tables))


def _roofline_units(counted: UnitParams, sizes: tuple[int, int, int, int], nbytes: int, workload: Workload,
                    reference: ReferenceDevice) -> tuple[Unit, ...]:  # fmt: skip
    """Each unit's roofline time, weights, activations and KV per token (the module docstring's formulas)."""
    hidden, heads, head_dim, kv_heads = sizes
    kv_per_token = 2 * kv_heads * head_dim * nbytes
    batch = workload.batch_size
    avg_ctx = workload.prompt_tokens + workload.max_new_tokens / 2
    units: list[Unit] = []
    for name, params in zip(counted.names, counted.params):
        # per sequence: FLOPs and bytes read; once per step: the weights (an embedding reads rows only)
        if name == "embed":
            row_flops, fixed, row_bytes = 0.0, 0.0, float(hidden * nbytes * counted.embed_tables)
            act, kv = batch * hidden * nbytes, 0
        elif name == "lm_head":
            row_flops, fixed, row_bytes = 2.0 * params, float(params * nbytes), float(hidden * nbytes)
            act, kv = 8 * batch, 0
        else:
            row_flops = 2.0 * params + 4.0 * avg_ctx * heads * head_dim
            fixed, row_bytes = float(params * nbytes), kv_per_token * avg_ctx + 2.0 * hidden * nbytes
            act, kv = batch * hidden * nbytes, kv_per_token
        curve = reference.curve(row_flops, fixed, row_bytes)
        units.append(
            Unit(
                name=name,
                latency_ms=curve.ms(batch),
                param_bytes=params * nbytes,
                activation_bytes=act,
                kv_bytes_per_token=kv,
                prefill_ms_per_token=reference.time_ms(row_flops, 0.0),
                curve=curve,
            )
        )
    return tuple(units)
