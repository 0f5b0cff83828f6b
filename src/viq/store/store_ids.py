"""The ids of a code store as a lazy, read-only sequence (``store.ids``): id lookup by position from the
memory-mapped index, apart from record decoding. ``store`` is the :class:`viq.store.reader.CodeStore` it
views (not imported here: the reader imports this module)."""

from __future__ import annotations

import collections.abc
from collections.abc import Iterator
from typing import Any

__all__ = ["StoreIds"]


class StoreIds(collections.abc.Sequence):
    """The ids of a :class:`CodeStore` in index order, read lazily from its memory-mapped index."""

    def __init__(self, store: Any) -> None:
        self._store = store

    def __len__(self) -> int:
        return len(self._store)

    def __getitem__(self, i):  # type: ignore[override]
        if isinstance(i, slice):
            start, stop, step = i.indices(len(self))
            if step == 1:
                return list(self._store._idx.iter_ids(start, stop)) if stop > start else []
            return [self._store.id_at(j) for j in range(start, stop, step)]
        return self._store.id_at(i)

    def __iter__(self) -> Iterator[str]:
        return self._store._idx.iter_ids()

    def __contains__(self, sample_id: object) -> bool:
        return sample_id in self._store

    def __eq__(self, other: object) -> bool:
        if isinstance(other, StoreIds):
            other = list(other)
        if not isinstance(other, (list, tuple)):
            return NotImplemented
        return len(other) == len(self) and all(a == b for a, b in zip(self, other))

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        return f"StoreIds({len(self)} ids of {str(self._store.path)!r})"
