"""Datasets over a code store: :class:`CodeDataset` (``(sample_id, Codes)`` pairs) and
:class:`LlavaCodesDataset` (training an LLM on stored codes, the offline path: LLaVA conversations
whose images are codes).

The encoder leaves the training loop: ``viq extract`` wrote every image's codes into a code store
once, and here each ``<image>`` of a conversation becomes ``embedder(codes) -> projector`` tokens.
It is the ``mllm`` stage of the training engine (same loop, packing, FSDP2, checkpoints, resume):

    viq extract viq-16k data.jsonl -o codes.store
    viq train-mllm --config recipe.yaml        # stage: mllm, data.codes: codes.store

The embedder (``model.init: viq:<dir>``, its ``embedder.*`` weights) is frozen by default; list
``embedder`` in ``optim.trainable`` to train it.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.utils.data

from viq.data.llava import DataError, LlavaDataset
from viq.formats.codes import Codes
from viq.store.ids import image_id
from viq.store.reader import CodeStore

log = logging.getLogger(__name__)

__all__ = ["CodeDataset", "LlavaCodesDataset", "CodesSample"]


class CodeDataset(torch.utils.data.Dataset):
    """``dataset[i] -> (sample_id, Codes)`` over a code store, for ``torch.utils.data.DataLoader``.

    The index is read once in the constructor; shard memory maps are opened lazily in each
    process (DataLoader worker) on first access and never pickled. The default collate
    function cannot batch :class:`~viq.formats.codes.Codes` of different grids: pass ``collate_fn``
    (e.g. ``list``) and build batches/sequences yourself.

    Args:
        store_path: the store directory.
        ids: the sample ids to serve, in this order (default: all, in index order).

    Raises:
        StoreError: the store cannot be opened. KeyError: an id in ``ids`` is not stored.
    """

    def __init__(self, store_path: str | os.PathLike, ids: Sequence[str] | None = None) -> None:
        self.store_path = Path(store_path)
        self._store = CodeStore.open(self.store_path, "r")
        # ids=None: a lazy view of the memory-mapped index (no list of every id); else each given
        # id is checked with the index's membership test.
        self.ids = self._store.ids() if ids is None else list(ids)
        missing = [] if ids is None else [sid for sid in self.ids if sid not in self._store]
        if missing:
            raise KeyError(f"{len(missing)} id(s) not in {self.store_path}, e.g. {missing[:3]}")

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> tuple[str, Codes]:
        sid = self.ids[i]
        return sid, self._store.get(sid)

    @property
    def store(self) -> CodeStore:
        return self._store


@dataclass
class CodesSample:
    """A conversation whose images are stored codes (``images`` is empty; ``codes`` has one per image)."""

    id: str
    messages: list[dict]
    codes: list[Codes]
    where: str
    index: int
    images: list[torch.Tensor] = field(default_factory=list)


class LlavaCodesDataset(torch.utils.data.Dataset):
    """LLaVA JSON/JSONL conversations with their images' codes read from a code store.

    An image path of a record is looked up in the store by the id ``viq extract`` gave it: the path
    relative to ``image_root`` (default: the data file's folder). A record whose image has no codes in
    the store is an error naming the sample and the image (``on_error="skip"``: skipped, counted).
    """

    def __init__(
        self,
        path: str | os.PathLike,
        store: str | os.PathLike,
        *,
        image_root: str | None = None,
        on_error: str = "raise",
        columns: dict[str, str | None] | None = None,
    ) -> None:

        # columns: Parquet / Arrow data only (viq.data.llava.LlavaDataset)
        self.records = LlavaDataset(path, image_root=image_root, on_error=on_error, columns=columns)
        self.store_path = str(store)
        self._store = CodeStore.open(store)
        self.root = Path(image_root) if image_root else Path(path).parent
        self.on_error = on_error
        self.keep: list[int] = []
        self.skipped: list[tuple[str, str]] = []
        for i in range(len(self.records)):
            missing = [p for p in self._ids(i) if p not in self._store]
            if not missing:
                self.keep.append(i)
                continue
            record = self.records.record(i)
            problem = f"{record.label}: no codes in {store} for image {missing[0]} (run viq extract)"
            where = record.where
            if on_error == "raise":
                raise DataError(problem)
            self.skipped.append((where, problem))
        if self.skipped:
            log.warning("%s: skipped %d samples whose images have no codes", path, len(self.skipped))

    def _ids(self, index: int) -> list[str]:
        return [image_id(p, self.root) for p in self.records.image_paths(index)]

    def __len__(self) -> int:
        return len(self.keep)

    def __getitem__(self, i: int) -> CodesSample:
        index = self.keep[i]
        record = self.records.record(index)
        messages = [{"role": role, "content": content} for role, content in record.messages]
        codes = [self._store.get(sid) for sid in self._ids(index)]
        return CodesSample(id=record.id, messages=messages, codes=codes, where=record.where, index=index)

    def __getstate__(self):
        state = dict(self.__dict__)
        state["_store"] = None  # re-opened (memory maps) in each DataLoader worker
        return state

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._store = CodeStore.open(self.store_path)
