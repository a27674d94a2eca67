"""What the structured-output and tool-calling tests share: a model folder, a chat template, schemas.

The model is the random-weight gpt2-tiny with its config's EOS set to the tokenizer's ``<|endoftext|>``
(init_model's config names id 2, which this tokenizer spells ``"``: every JSON string would end the
reply). Constrained decoding must make its output valid anyway; the schemas bound their strings and
numbers so that a random model finishes within ``max_tokens``.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

__all__ = ["MODEL", "TOOL_TEMPLATE", "PERSON", "WEATHER", "TIME", "USER", "json_model", "schema_format"]

MODEL = "gpt2-tiny"
TOOL_TEMPLATE = (
    "{% if tools %}<|system|>tools:{% for t in tools %}{{ t.function.name }},{% endfor %}\n{% endif %}"
    "{% for m in messages %}{% if m.role == 'tool' %}<|tool|>{{ m.tool_call_id }}={{ m.content }}\n"
    "{% elif m.tool_calls %}<|assistant|>{% for c in m.tool_calls %}<tool_call>{{ c.function | tojson }}</tool_call>"
    "{% endfor %}\n{% else %}<|{{ m.role }}|>{{ m.content }}\n{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)
PERSON = {"type": "object", "properties": {
    "name": {"type": "string", "maxLength": 12}, "age": {"type": "integer", "minimum": 0, "maximum": 120},
    "ok": {"type": "boolean"}, "kind": {"enum": ["cat", "dog"]}},
    "required": ["name", "age", "ok", "kind"], "additionalProperties": False}  # fmt: skip
WEATHER = {"type": "function", "function": {"name": "get_weather", "description": "Weather in a city", "parameters": {
    "type": "object", "properties": {"city": {"type": "string", "maxLength": 10}, "unit": {"enum": ["c", "f"]}},
    "required": ["city", "unit"], "additionalProperties": False}}}  # fmt: skip
TIME = {"type": "function", "function": {"name": "get_time", "parameters": {
    "type": "object", "properties": {"zone": {"enum": ["utc", "cet"]}}, "required": ["zone"]}}}  # fmt: skip
USER = [{"role": "user", "content": "What is the weather in Paris?"}]


def json_model(model_dir: Path, root: Path) -> Path:
    """A copy of ``model_dir`` under ``root`` whose EOS is ``<|endoftext|>`` (id 0), and ``root/chat.jinja``."""
    model = shutil.copytree(model_dir, root / MODEL)
    cfg = json.loads((model / "config.json").read_text())
    (model / "config.json").write_text(json.dumps({**cfg, "eos_token_id": 0, "bos_token_id": 0}))
    gen = model / "generation_config.json"
    if gen.exists():
        gen.write_text(json.dumps({**json.loads(gen.read_text()), "eos_token_id": 0, "bos_token_id": 0}))
    (root / "chat.jinja").write_text(TOOL_TEMPLATE)
    return model


def schema_format(schema: dict[str, Any], name: str = "person") -> dict[str, Any]:
    """``response_format`` asking for JSON valid for ``schema``."""
    return {"type": "json_schema", "json_schema": {"name": name, "schema": schema}}
