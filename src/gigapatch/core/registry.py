"""One registry for building models by name (encoders θ1 and heads θ2)."""

from __future__ import annotations

import difflib
from collections.abc import Callable
from typing import Generic, TypeVar

from gigapatch.core.errors import ConfigError

T = TypeVar("T", bound=Callable)


class Registry(Generic[T]):
    """A name → builder mapping that answers unknown names with close matches."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._builders: dict[str, T] = {}

    def register(self, name: str) -> Callable[[T], T]:
        """Decorator: ``@ENCODERS.register("resnet18")``."""

        def deco(fn: T) -> T:
            if name in self._builders:
                raise ValueError(f"{self.kind} {name!r} is already registered")
            self._builders[name] = fn
            return fn

        return deco

    def get(self, name: str) -> T:
        """The builder registered as ``name``; a :class:`ConfigError` listing choices if none."""
        try:
            return self._builders[name]
        except KeyError:
            close = difflib.get_close_matches(str(name), self._builders, n=3)
            hint = f" Did you mean {', '.join(repr(c) for c in close)}?" if close else ""
            raise ConfigError(
                f"unknown {self.kind} {name!r}.{hint} Available: {', '.join(self.names())}."
            ) from None

    def names(self) -> list[str]:
        """All registered names, sorted."""
        return sorted(self._builders)

    def __contains__(self, name: object) -> bool:
        return name in self._builders
