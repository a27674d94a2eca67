"""``noodle serve --model``'s values: a folder, or ``NAME=FOLDER``; several of them serve several models.

Checked here, at the edge, before anything loads: names distinct, folders present, and the flags that
several models do not take yet (each one line naming the flag).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path

from noodle.errors import SpecError

__all__ = ["parse_models", "check_several"]

_NAME = re.compile(r"[^\s=]{1,256}")


def parse_models(values: Sequence[str]) -> list[tuple[str | None, Path]]:
    """``(name or None, folder)`` for each ``--model`` value; ``NAME=FOLDER`` names it (a folder whose own
    path holds ``=`` is taken whole)."""
    out: list[tuple[str | None, Path]] = []
    for value in values:
        if not value.strip():
            raise SpecError("--model: empty; give a model folder, or NAME=FOLDER")
        name, eq, folder = value.partition("=")
        if not eq or Path(value).exists():
            out.append((None, Path(value)))
            continue
        if not _NAME.fullmatch(name) or not folder:
            raise SpecError(f"--model: {value!r}: give NAME=FOLDER, a name of 1 to 256 characters without spaces "
                            "and a folder")  # fmt: skip
        out.append((name, Path(folder)))
    return out


def check_several(models: Sequence[tuple[str | None, Path]], *, served_model_name: str | None, backend: str,
                  cluster: bool, emulate: bool, workers: str | None) -> list[tuple[str, Path]]:  # fmt: skip
    """Several ``--model`` values as ``(served id, folder)``: a name is the folder's name unless given.

    Raises:
        SpecError: one line naming the flag: a missing folder, two models of one name, or a flag that serves one
            model only (``--served-model-name``, ``--cluster``, ``--emulate``, a backend other than ``local``).
    """
    if served_model_name is not None:
        raise SpecError("--served-model-name: names one model; with several --model give each NAME=FOLDER")
    if cluster:
        raise SpecError("--cluster: serves one model for now; give one --model")
    if backend != "local" or workers:
        raise SpecError(f"--backend: several models run on the local executor only, got {backend}"
                        f"{' with --workers' if workers else ''}; drop --backend and --workers")  # fmt: skip
    if emulate:
        raise SpecError("--emulate: one model only (several models share this machine's real compute; a sleep "
                        "would not)")  # fmt: skip
    named: dict[str, Path] = {}
    for name, folder in models:
        if not folder.is_dir():
            raise SpecError(f"--model: {(name + '=') if name else ''}{folder}: no such model folder")
        key = name or folder.resolve().name
        if key in named:
            raise SpecError(f"--model: two models are named {key!r} ({named[key]}, {folder}); give each its own name: "
                            "--model NAME=FOLDER")  # fmt: skip
        named[key] = folder
    return list(named.items())
