"""``noodle model init`` (seeded weights from a preset or config) and ``noodle model import`` (a GGUF file)."""

from __future__ import annotations

from pathlib import Path

import typer

from noodle.cli.checks import MAX_SEED, check_int
from noodle.cli.output import stdout_console
from noodle.errors import SpecError
from noodle.extras import require_exec

__all__ = ["register", "model_app"]

model_app = typer.Typer(help="Local model folders: built from presets or configs, or imported from GGUF (no model hub).", no_args_is_help=True)


@model_app.command("init")
def init_cmd(
    out: Path = typer.Option(..., "--out", "-o", help="folder to save_pretrained the model into"),
    preset: str | None = typer.Option(None, "--preset", help="preset name: gpt2, gpt2-tiny, llama-small, llama-tiny"),
    config: Path | None = typer.Option(None, "--config", help="a transformers config.json (decoder-only LM)"),
    seed: int = typer.Option(0, "--seed", help="seed of the random weights"),
) -> None:
    """Build a model with seeded random weights and save it as a local folder."""
    require_exec("noodle model init")
    from noodle.cli.profile import quiet_transformers
    from noodle.models import init_model, layout_of, load_model

    if (preset is None) == (config is None):
        raise SpecError("model init: give exactly one of --preset NAME or --config FILE.json")
    check_int("--seed", seed, ge=0, le=MAX_SEED)
    quiet_transformers()
    path = init_model(preset if preset is not None else config, out, seed=seed)  # type: ignore[arg-type]
    model = load_model(path, verified=False)
    n_params = sum(p.numel() for p in model.parameters())
    layout = layout_of(model, verified=False)
    stdout_console().print(
        f"wrote {path}: {type(model).__name__}, {n_params / 1e6:.1f}M parameters, "
        f"{layout.num_blocks} blocks ({layout.num_blocks + 2} placement units), seed {seed}"
    )


@model_app.command("import")
def import_cmd(
    file: Path = typer.Argument(..., help="a GGUF file (llama.cpp's format; quantized weights are dequantized)"),
    out: Path = typer.Option(..., "--out", "-o", help="folder to write config.json, safetensors and tokenizer into"),
    dtype: str = typer.Option("float32", "--dtype", help="dtype of the written weights: float32 | bfloat16 | float16"),
) -> None:
    """Import a GGUF file into a model folder (config, safetensors, tokenizer with its chat template)."""
    from noodle.cli.profile import quiet_transformers
    from noodle.models.gguf import DTYPES, import_gguf

    if dtype not in DTYPES:
        raise SpecError(f"--dtype: {dtype!r} is not a dtype; use one of {', '.join(DTYPES)}")
    quiet_transformers()
    result = import_gguf(file, out, dtype=dtype, progress=True)
    stdout_console().print(
        f"wrote {result.out}: {result.model_class} ({result.architecture}), {result.parameters / 1e6:.1f}M parameters, "
        f"{result.dtype}, tokenizer {'with' if result.chat_template else 'without'} a chat template",
        highlight=False,
    )


def register(app: typer.Typer) -> None:
    app.add_typer(model_app, name="model")
