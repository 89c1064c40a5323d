"""A map keyed by object identity, for the target adapters: they find, at unfuse time, the
library object that merged a weight or a layer."""

from __future__ import annotations

import weakref
from typing import Any, Generic, TypeVar

__all__ = ["ByIdentity"]

_K = TypeVar("_K")
_V = TypeVar("_V")


class ByIdentity(Generic[_K, _V]):
    """A map from live objects, by identity, to values; an entry dies with its key.

    Tensors compare element-wise, so they cannot be dictionary keys by value: an entry is
    keyed by ``id`` plus a weak reference, which tells a live object from a new one that
    reuses a dead one's id.
    """

    def __init__(self) -> None:
        self._entries: dict[int, tuple[weakref.ref[Any], _V]] = {}

    def get(self, key: _K) -> _V | None:
        self._prune()
        entry = self._entries.get(id(key))
        if entry is None or entry[0]() is not key:
            return None
        return entry[1]

    def put(self, key: _K, value: _V) -> None:
        self._prune()
        self._entries[id(key)] = (weakref.ref(key), value)

    def pop(self, key: _K) -> None:
        entry = self._entries.get(id(key))
        if entry is not None and entry[0]() is key:
            del self._entries[id(key)]

    def __len__(self) -> int:
        self._prune()
        return len(self._entries)

    def _prune(self) -> None:
        for dead in [k for k, (ref, _) in self._entries.items() if ref() is None]:
            del self._entries[dead]
