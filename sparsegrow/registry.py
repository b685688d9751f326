"""A tiny name -> implementation registry.

A registry exists only where a config string names an implementation (grow criteria,
distributions, methods, search backends). Each entry carries a one-line description, and
`names()` feeds both the CLI's help and the contract tests, so a new entry is tested
automatically.
"""
from __future__ import annotations

from typing import Callable, Generic, TypeVar

T = TypeVar("T")


class Registry(Generic[T]):
    def __init__(self, kind: str):
        self.kind = kind  # e.g. "grow criterion"; used in error messages
        self._entries: dict[str, tuple[T, str]] = {}

    def register(self, name: str, description: str) -> Callable[[T], T]:
        def decorator(obj: T) -> T:
            self.add(name, obj, description)
            return obj

        return decorator

    def add(self, name: str, obj: T, description: str) -> None:
        if name in self._entries:
            raise ValueError(f"{self.kind} {name!r} is already registered")
        self._entries[name] = (obj, description)

    def get(self, name: str) -> T:
        if name not in self._entries:
            raise ValueError(
                f"unknown {self.kind} {name!r}; allowed: {', '.join(self.names())}"
            )
        return self._entries[name][0]

    def names(self) -> list[str]:
        return list(self._entries)

    def describe(self) -> dict[str, str]:
        return {name: desc for name, (_, desc) in self._entries.items()}

    def __contains__(self, name: str) -> bool:
        return name in self._entries
