"""Turn a ``--model`` argument into a local model folder, without any network.

Accepted: a model folder (``config.json`` + weights), a Hugging Face cache snapshot folder
(``.../models--org--name/snapshots/<commit>``, already a model folder), a repo's cache folder
(``.../models--org--name``, its ``main`` snapshot is used), or a repo id such as
``HuggingFaceTB/SmolLM2-135M-Instruct`` already in the local Hugging Face cache, looked up
with huggingface_hub's offline cache lookup (``local_files_only``).
"""

from __future__ import annotations

import re
from pathlib import Path

from noodle.errors import ModelError

__all__ = ["resolve_model"]

_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")


def _repo_cache_snapshot(folder: Path) -> Path | None:
    """The snapshot a repo cache folder (``models--org--name``) points at, or None if it is not one."""
    snapshots = folder / "snapshots"
    if not snapshots.is_dir():
        return None
    ref = folder / "refs" / "main"
    if ref.is_file():
        chosen = snapshots / ref.read_text().strip()
        if chosen.is_dir():
            return chosen
    found = sorted((p for p in snapshots.iterdir() if p.is_dir()), key=lambda p: p.stat().st_mtime)
    if not found:
        raise ModelError(f"{folder}: a Hugging Face cache folder with no snapshot in {snapshots}")
    return found[-1]


def resolve_model(model: str | Path, *, cache_dir: str | Path | None = None) -> Path:
    """The local folder ``model`` names (see the module docstring); nothing is downloaded.

    ``cache_dir`` overrides the Hugging Face cache folder (default: huggingface_hub's, from its env vars).

    Raises:
        ModelError: ``model`` is neither an existing path nor a repo id in the local cache.
    """
    path = Path(model)
    if path.is_dir():
        if (path / "config.json").is_file():
            return path
        return _repo_cache_snapshot(path) or path
    text = str(model)
    if path.exists() or not _REPO_ID.match(text) or "/" not in text:
        return path  # a file or a plain missing folder: the loaders report it
    from huggingface_hub import snapshot_download
    from huggingface_hub.constants import HF_HUB_CACHE
    from huggingface_hub.errors import LocalEntryNotFoundError

    try:
        return Path(snapshot_download(text, local_files_only=True, cache_dir=cache_dir))
    except (LocalEntryNotFoundError, FileNotFoundError, ValueError, OSError):
        raise ModelError(
            f"{text}: no such folder, and no repo {text!r} in the local Hugging Face cache ({cache_dir or HF_HUB_CACHE}); "
            "noodle never downloads: pass a model folder, or put the repo in that cache first"
        ) from None
