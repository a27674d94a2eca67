"""One error hierarchy for everything noodle raises on purpose.

The CLI turns a :class:`NoodleError` into one line on stderr and the exit code
carried by its class; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

__all__ = [
    "NoodleError",
    "SpecError",
    "InfeasibleError",
    "SolverUnavailable",
    "ExecutorError",
    "ModelError",
    "DependencyMissing",
]


class NoodleError(Exception):
    """Base class of every error noodle raises for a reason it can explain."""

    exit_code: int = 1


class SpecError(NoodleError):
    """User input (spec file, CLI flag, plan, wire message) is invalid."""

    exit_code = 2


class InfeasibleError(NoodleError):
    """No plan satisfies the constraints; the message names the binding one."""

    exit_code = 3


class SolverUnavailable(NoodleError):
    """A solver's optional dependency is missing or the name is unknown."""

    exit_code = 4


class ModelError(NoodleError):
    """A model folder, preset or config cannot be used."""

    exit_code = 2


class DependencyMissing(NoodleError):
    """A command needs an optional part of the install (``pip install 'noodle[exec]'``)."""

    exit_code = 4


class ExecutorError(NoodleError):
    """Running a plan failed; carries the remote traceback when there is one."""

    exit_code = 5

    def __init__(self, message: str, *, remote_traceback: str | None = None) -> None:
        super().__init__(message)
        self.remote_traceback = remote_traceback

    def __str__(self) -> str:
        base = super().__str__()
        if self.remote_traceback:
            return f"{base}\n--- remote traceback ---\n{self.remote_traceback.rstrip()}"
        return base
