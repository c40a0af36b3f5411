"""One small registry type, one instance per kind of part.

Parts register themselves where they are defined::

    @HALTING.register("mlp_gate")
    class MLPGate(HaltingPolicy): ...

and the builder (``zoo/build.py``) is the one place that looks names up. Names are
the public contract: they are what a :class:`~zoo.config.ModelConfig` stores, so a
config round-trips through JSON.
"""

from __future__ import annotations

import difflib
from typing import Callable, Generic, Iterator, TypeVar

T = TypeVar("T")

__all__ = ["Registry", "MODELS", "BLOCKS", "RECURRENCES", "HALTING", "CACHES", "REGISTRIES", "available"]


class Registry(Generic[T]):
    """A name -> object table for one kind of part.

    Args:
        kind: what the registry holds, used in error messages (``"halting"``).
    """

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._entries: dict[str, T] = {}

    def register(self, name: str) -> Callable[[T], T]:
        """Decorator that registers its target under ``name``.

        Raises:
            ValueError: ``name`` is already taken in this registry.
        """

        def decorate(obj: T) -> T:
            self.add(name, obj)
            return obj

        return decorate

    def add(self, name: str, obj: T) -> None:
        """Registers ``obj`` under ``name``; a duplicate name raises ``ValueError``."""
        if name in self._entries:
            raise ValueError(
                f"{self.kind} {name!r} is already registered (by {self._entries[name]!r}); "
                f"pick another name"
            )
        self._entries[name] = obj

    def get(self, name: str) -> T:
        """Returns the entry called ``name``.

        Raises:
            ValueError: unknown name; the message lists the valid names and the closest one.
        """
        try:
            return self._entries[name]
        except (KeyError, TypeError):
            raise ValueError(self.unknown_message(name)) from None

    def unknown_message(self, name: object) -> str:
        """The error text for an unknown ``name``: valid names and the nearest match."""
        names = self.names()
        close = difflib.get_close_matches(str(name), names, n=1, cutoff=0.5)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        return f"unknown {self.kind} {name!r}{hint}; valid {self.kind} names: {', '.join(names)}"

    def names(self) -> list[str]:
        """The registered names, sorted."""
        return sorted(self._entries)

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())

    def __len__(self) -> int:
        return len(self._entries)

    def __repr__(self) -> str:
        return f"Registry({self.kind!r}, {self.names()})"


MODELS: Registry = Registry("model")
BLOCKS: Registry = Registry("block")
RECURRENCES: Registry = Registry("recurrence")
HALTING: Registry = Registry("halting")
CACHES: Registry = Registry("cache")

REGISTRIES: dict[str, Registry] = {
    "model": MODELS,
    "block": BLOCKS,
    "recurrence": RECURRENCES,
    "halting": HALTING,
    "cache": CACHES,
}


def available(kind: str) -> list[str]:
    """The sorted names registered for ``kind``.

    Args:
        kind: one of ``"model"``, ``"block"``, ``"recurrence"``, ``"halting"``, ``"cache"``.

    Example:
        >>> import zoo
        >>> zoo.available("cache")
        ['kv_reuse', 'recompute']
    """
    if kind not in REGISTRIES:
        raise ValueError(f"unknown registry kind {kind!r}; valid kinds: {', '.join(REGISTRIES)}")
    return REGISTRIES[kind].names()


def import_plugins(modules) -> None:
    """Imports each module named in ``modules`` (parts registered outside the library)."""
    import importlib

    for module in modules:
        importlib.import_module(module)
