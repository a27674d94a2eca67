"""Optional parts of the install: planning is the core, execution is ``pip install 'noodle[exec]'``."""

from __future__ import annotations

import importlib.util

from noodle.errors import DependencyMissing

__all__ = ["EXEC_MODULES", "require_exec"]

EXEC_MODULES = ("torch", "transformers", "safetensors", "grpc")


def require_exec(what: str) -> None:
    """Refuse in one line (exit 4) when the execution extra is missing; planning never calls this.

    Raises:
        DependencyMissing: naming the missing modules and the install command.
    """
    missing = [m for m in EXEC_MODULES if importlib.util.find_spec(m) is None]
    if missing:
        raise DependencyMissing(
            f"{what} needs {', '.join(missing)}, which a planning-only install leaves out; "
            "install the execution extra: pip install 'noodle[exec]'"
        )
