"""An ordered name -> factory registry used for solvers and executors.

Insertion order is preference order: ``auto`` strategies walk it front to back.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Generic, TypeVar

from noodle.errors import NoodleError, SolverUnavailable

__all__ = ["Registry"]

T = TypeVar("T")


class Registry(Generic[T]):
    """Named factories of one kind of thing (``kind`` is used in error messages)."""

    def __init__(self, kind: str, error: type[NoodleError] = SolverUnavailable) -> None:
        self.kind = kind
        self._error = error
        self._items: dict[str, Callable[[], T]] = {}

    def register(self, name: str, factory: Callable[[], T]) -> None:
        if name in self._items:
            raise ValueError(f"{self.kind} {name!r} is registered twice")
        self._items[name] = factory

    def names(self) -> list[str]:
        return list(self._items)

    def __contains__(self, name: object) -> bool:
        return name in self._items

    def __iter__(self) -> Iterator[str]:
        return iter(self._items)

    def get(self, name: str) -> T:
        """Build the thing registered as ``name``; unknown names list the valid ones."""
        try:
            factory = self._items[name]
        except KeyError:
            valid = ", ".join(self._items) or "(none)"
            raise self._error(f"unknown {self.kind} {name!r}; valid names: {valid}") from None
        return factory()
