"""One rank's extraction, in named steps: :class:`Extraction` (and :func:`extract`, its one-call form).

::

    Extraction(model, source, out, options).run()
        open the store and take this rank's writer          (the writer lock: one process per rank)
        plan: this rank's items or units, minus what is stored / recorded done
        for each image the DataLoader's workers read, hashed and prepared:
            route it: stored or repeated id (existing, or an error when the bytes differ) / unreadable
                      (an error) / same bytes as stored or queued (deduplicated) / to encode
        encode the routed images in packs (ViQModel.encode_keyed), add their codes
        flush every ``flush_every`` added images; record units whose images are all durable

Every error -- an image that cannot be read or encoded, a unit that cannot be read to its end, an id
given to two images -- goes through :meth:`Extraction.record_error`: one line in
``errors-rank<r>.jsonl``, one count, one log line.
"""

from __future__ import annotations

import collections
import json
import logging
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

import viq
from viq._io import append_line, atomic_write
from viq._progress import progress_bar
from viq._untrusted import loads_json, printable
from viq.extract.inputs import (
    DONE_FILE,
    Item,
    ReadDataset,
    ReadImage,
    StreamDataset,
    UnitDone,
    UnitFailed,
    WorkerResult,
    list_items,
    list_units,
)
from viq.formats.codes import Codes
from viq.formats.image import PreparedImage, PreprocessConfig
from viq.launch import resolve_distributed
from viq.store.reader import CodeStore

log = logging.getLogger(__name__)

__all__ = ["ExtractOptions", "ExtractResult", "Extraction", "extract"]


@dataclass
class ExtractOptions:
    """How an :class:`Extraction` reads and writes (the ``viq extract`` flags)."""

    image_root: str | None = None
    #: columnar inputs: the column with the image (bytes, path or {bytes, path}) and the store id
    image_column: str = "image"
    id_column: str | None = None
    batch_tokens: int = 8192
    num_workers: int = 2
    #: how images are sized (a ``viq.formats.image.PreprocessConfig``; default: the model's patch size)
    preprocess: Any = None
    #: finalise a shard every this many added images: a kill redoes at most these plus the pack in flight
    flush_every: int = 256
    entropy_coding: bool = False
    progress: bool = True


class ExtractResult(dict):
    """The counts of a run (a dict: ``images`` -- this rank's share, including the images of units done
    before --, ``encoded``, ``existing`` (already stored), ``deduplicated`` (same bytes as a stored image),
    ``failed`` (images, units that could not be read to their end, ids given to two images)), and its
    timing: ``wall_s`` (the whole loop) and ``encode_s`` (the model calls alone; their ratio is how busy
    the data path keeps the accelerator)."""

    def __init__(self, counts: dict[str, int], wall_s: float = 0.0, encode_s: float = 0.0) -> None:
        super().__init__(counts)
        self.wall_s, self.encode_s = wall_s, encode_s


@dataclass
class _Waiting:
    """The bookkeeping of images between reading and storing."""

    recent: dict[str, Codes] = field(default_factory=dict)  # content hash -> codes added since the last flush
    twins: dict[str, list[Item]] = field(default_factory=dict)  # content hash -> duplicates of an image being encoded
    in_flight: set[str] = field(default_factory=set)  # ids queued or waiting (not yet added)
    met: dict[str, tuple[str, str]] = field(default_factory=dict)  # id -> (content hash, source) taken this run
    outstanding: collections.Counter = field(default_factory=collections.Counter)  # unit -> images not settled
    read_through: dict[str, int] = field(default_factory=dict)  # unit -> image count, once read to its end
    finished: dict[str, int] = field(default_factory=dict)  # units whose images are all settled, not yet durable


class Extraction:
    """Extract the codes of every image of ``source`` (this rank's share) into the store ``out``.

    Args:
        model: a loaded :class:`viq.ViQModel` with its encoder.
        source: a folder, LLaVA file, tar shards or columnar data (:mod:`viq.extract`).
        out: the store directory (created if needed).
        options: :class:`ExtractOptions`.
        rank, world: this process's share.
    """

    def __init__(
        self,
        model,
        source: str | os.PathLike,
        out: str | os.PathLike,
        options: ExtractOptions,
        rank: int = 0,
        world: int = 1,
    ) -> None:

        self.model, self.source, self.out, self.options = model, source, Path(out), options
        self.rank, self.world = rank, world
        self.preprocess = options.preprocess or PreprocessConfig(patch_size=model.patch_size)
        self.fingerprint = model.fingerprint()
        self.counts = {"images": 0, "encoded": 0, "existing": 0, "deduplicated": 0, "failed": 0}
        self.errors_path = self.out / f"errors-rank{rank}.jsonl"
        self.state = _Waiting()
        self.done_own: dict[str, int] = {}
        self.since_flush = 0
        self.reading_s = 0.0
        #: whether the input comes in units (tar shards, columnar files; set by :meth:`plan`)
        self.streamed = False
        # set by open_store / the run (typed Any: each is used only once it is set)
        self.store: Any = None
        self.writer: Any = None
        self.bar: Any = None

    # ------------------------------------------------------------------ steps
    def open_store(self):
        """The store, created when missing, in the model's code space."""

        m = self.model
        return CodeStore.create(
            self.out,
            levels=m.levels,
            codes_per_patch=m.config.head.codes_per_patch,
            patch_size=m.patch_size,
            model_fingerprint=self.fingerprint,
            entropy_coding=self.options.entropy_coding,
            exist_ok=True,
        )

    def plan(self) -> tuple[torch.utils.data.Dataset, int | None, int]:
        """This rank's work: (the workers' dataset, images to process if known, DataLoader workers).
        Listed inputs (folders, LLaVA files) are dealt out image by image, minus ids already stored;
        streamed inputs (tar shards, columnar files) unit by unit, minus units recorded done by any rank."""
        o, rank, world = self.options, self.rank, self.world
        units = list_units(self.source, image_column=o.image_column, id_column=o.id_column, image_root=o.image_root)
        self.streamed = units is not None
        if units is None:
            items = list_items(self.source, o.image_root)[rank::world]
            todo = [it for it in items if it.sample_id not in self.store]
            self.counts.update(images=len(items), existing=len(items) - len(todo))
            return ReadDataset(todo, self.preprocess), len(todo), o.num_workers
        done_any, self.done_own = read_done(self.out, rank)
        mine = units[rank::world]
        todo_units = [u for u in mine if u.name not in done_any]
        before = sum(done_any[u.name] for u in mine if u.name in done_any)
        self.counts.update(images=before, existing=before)
        log.info(
            "rank %d of %d: %d of %d units (%d done before)",
            rank,
            world,
            len(todo_units),
            len(units),
            len(mine) - len(todo_units),
        )
        return StreamDataset(todo_units, self.preprocess, self.store), None, min(o.num_workers, len(todo_units))

    def record_error(self, sample_id: str, source: str, error: str, *, level: int = logging.WARNING) -> None:
        """Every failure, in one place: a line of ``errors-rank<r>.jsonl``, a count, a log line."""
        self.counts["failed"] += 1
        append_line(self.errors_path, json.dumps({"id": sample_id, "source": source, "error": error}))
        log.log(level, "%s: %s", printable(source), error)

    def add(self, item: Item, codes: Codes, content_hash: str) -> None:
        """Store ``codes`` under ``item``'s id (with this model's fingerprint and the item's source)."""
        codes = Codes(
            codes.indices,
            codes.levels,
            image_size=codes.image_size,
            patch_size=codes.patch_size,
            metadata={"model": self.fingerprint, "source": item.path},
        )
        self.writer.add(item.sample_id, codes, source=item.path, content_hash=content_hash)
        self.state.recent[content_hash] = codes
        self.since_flush += 1
        self.settle(item)

    def fail(self, item: Item, error: str) -> None:
        self.record_error(item.sample_id, item.name, error)
        self.settle(item)

    def settle(self, item: Item) -> None:
        """``item`` is stored or failed: its unit may be finished."""
        s = self.state
        s.in_flight.discard(item.sample_id)
        if item.unit is not None:
            s.outstanding[item.unit] -= 1
            self.settle_unit(item.unit)
        if self.bar is not None:
            self.bar.update(1)

    def settle_unit(self, unit: str) -> None:
        s = self.state
        if unit in s.read_through and s.outstanding[unit] == 0:
            del s.outstanding[unit]
            s.finished[unit] = s.read_through.pop(unit)
            if self.since_flush == 0:
                self.record_done()

    def record_done(self) -> None:
        """Record the finished units as done -- only when every record added so far is durable (just
        flushed, or nothing added since)."""
        if self.state.finished:
            self.done_own.update(self.state.finished)
            self.state.finished.clear()
            write_done(self.out, self.rank, self.done_own)

    def maybe_flush(self) -> None:
        """Finalise the shard every ``flush_every`` added images, whatever is being encoded (duplicates
        of an image being encoded wait in ``twins``, not in ``recent``)."""
        if self.since_flush >= self.options.flush_every:
            self.writer.flush()
            self.state.recent.clear()
            self.since_flush = 0
            self.record_done()

    def route(self, result: WorkerResult) -> ReadImage | None:
        """Decide what becomes of one result of the workers; the image to encode, or None when it is
        settled here (a unit read to its end or broken, a stored or repeated id, an unreadable image, a
        duplicate of stored or queued bytes)."""
        s, counts = self.state, self.counts
        if isinstance(result, UnitDone):
            s.read_through[result.unit] = result.images
            self.settle_unit(result.unit)
            return None
        if isinstance(result, UnitFailed):  # not marked done: a re-run retries it
            self.record_error(
                result.unit, result.unit, f"{result.error} (the unit is retried by a re-run)", level=logging.ERROR
            )
            return None
        item = result.item
        if self.streamed:
            counts["images"] += 1
        if result.existing or item.sample_id in self.writer or item.sample_id in s.in_flight:
            clash = _other_image(item, result.hash, s.met, self.store)
            if clash is not None:  # the same id for other pixels: never give it the first one's codes
                self.record_error(item.sample_id, item.name, clash, level=logging.ERROR)
            else:
                counts["existing"] += 1  # stored before (or the same image twice in the input)
            if self.bar is not None:
                self.bar.update(1)
            return None
        if item.unit is not None:
            s.outstanding[item.unit] += 1
        s.in_flight.add(item.sample_id)
        if result.hash is not None:
            s.met[item.sample_id] = (result.hash, item.name)
        if result.error is not None or result.hash is None:
            self.fail(item, result.error or "not read")
            return None
        h = result.hash
        # Same bytes as an image already stored, added, or being encoded: no second encode.
        known = s.recent.get(h)
        if known is None:
            stored_as = self.store.has_hash(h)
            known = self.store.get(stored_as) if stored_as is not None else None
        if known is not None:
            self.add(item, known, h)
            counts["deduplicated"] += 1
            return None
        if h in s.twins:
            s.twins[h].append(item)
            return None
        s.twins[h] = []
        return result

    def to_encode(self, loader) -> Iterator[tuple[ReadImage, PreparedImage]]:
        """The images the model must encode, in order, each keyed by its worker result (everything else
        is routed on the way)."""
        t0 = time.perf_counter()
        for result in loader:
            routed = self.route(result)
            if routed is not None and routed.prepared is not None:
                self.reading_s += time.perf_counter() - t0
                yield routed, routed.prepared
                t0 = time.perf_counter()
            self.maybe_flush()
        self.reading_s += time.perf_counter() - t0

    def store_codes(self, result: ReadImage, codes: Codes | Exception) -> None:
        """The model's answer for ``result``'s image: stored under the image's id and its twins', or
        their error."""
        item, h = result.item, result.hash
        assert h is not None  # only read images are encoded
        twins = self.state.twins.pop(h, [])
        if isinstance(codes, Exception):
            for it in (item, *twins):
                self.fail(it, f"{type(codes).__name__}: {codes}")
        else:
            self.add(item, codes, h)
            self.counts["encoded"] += 1
            for twin in twins:
                self.add(twin, codes, h)
                self.counts["deduplicated"] += 1
        self.maybe_flush()

    # ------------------------------------------------------------------ the run
    def run(self) -> ExtractResult:
        started = time.perf_counter()
        self.store = self.open_store()
        dataset, total, workers = self.plan()
        loader = torch.utils.data.DataLoader(
            dataset, batch_size=None, num_workers=workers, prefetch_factor=8 if workers else None
        )
        if self.options.progress and self.rank == 0:
            self.bar = progress_bar(total, "extract")
        stream_s = 0.0
        with self.store.writer(name=f"rank{self.rank}") as self.writer:
            stream = self.model.encode_keyed(self.to_encode(loader), batch_tokens=self.options.batch_tokens)
            while True:
                t0 = time.perf_counter()
                answer = next(stream, None)  # Codes are on the CPU: the device work is done
                stream_s += time.perf_counter() - t0
                if answer is None:
                    break
                self.store_codes(*answer)
        # the writer's close() flushed the last shard: every unit finished in this run is now durable
        self.record_done()
        if self.bar is not None:
            self.bar.close()
        result = ExtractResult(self.counts, wall_s=time.perf_counter() - started, encode_s=stream_s - self.reading_s)
        log.info(
            "rank %d: %s (%.1f s, %.0f%% of it encoding)",
            self.rank,
            dict(result),
            result.wall_s,
            100 * result.encode_s / max(result.wall_s, 1e-9),
        )
        return result


def extract(
    model_path: str | os.PathLike | None,
    source: str | os.PathLike,
    out: str | os.PathLike,
    *,
    rank: int | None = None,
    world_size: int | None = None,
    device: str = "auto",
    dtype: torch.dtype = torch.float32,
    model=None,
    **options: Any,
) -> ExtractResult:
    """Extract the codes of every image of ``source`` into the store ``out`` (:class:`Extraction`).

    ``model_path``: the model to load (its encoder), unless ``model`` is given. ``rank`` /
    ``world_size``: this process's share (default: from the launcher, :func:`viq.launch.resolve_distributed`).
    ``options``: :class:`ExtractOptions` fields (``image_root``, ``image_column``, ``id_column``,
    ``batch_tokens``, ``num_workers``, ``preprocess``, ``flush_every``, ``entropy_coding``, ``progress``).
    """

    dist = resolve_distributed(rank, world_size)
    if model is None:
        if device == "auto":
            device = f"cuda:{dist.local_rank}" if torch.cuda.is_available() else "cpu"
        model = viq.load(model_path, device=device, dtype=dtype, components=["encoder"])
    return Extraction(model, source, out, ExtractOptions(**options), dist.rank, dist.world_size).run()


def _other_image(item: Item, digest: str | None, met: dict[str, tuple[str, str]], store) -> str | None:
    """The error for ``item`` when its id already names an image with other bytes (taken earlier in
    this run, or stored before), else None. Without the item's hash (a re-run skipping stored ids
    unread) nothing is compared."""
    if not digest:
        return None
    if item.sample_id in met:
        other_hash, other = met[item.sample_id]
    elif item.sample_id in store:
        entry = store.entry(item.sample_id)
        other_hash, other = entry.content_hash, entry.source or "the store"
    else:
        return None
    if not other_hash or other_hash == digest:
        return None
    return (
        f"id {item.sample_id!r} is already the id of another image ({other}); this one ({item.name}) has "
        f"other bytes and is not stored: give each image its own id"
    )


def read_done(out: Path, rank: int) -> tuple[dict[str, int], dict[str, int]]:
    """(units recorded done by any rank, those recorded by this rank): name -> image count."""
    every: dict[str, int] = {}
    own: dict[str, int] = {}
    for path in sorted(out.glob(DONE_FILE.format(rank="*"))):
        for line in path.read_text().splitlines():
            if line.strip():
                entry = loads_json(line, path)
                every[entry["unit"]] = entry["images"]
                if path.name == DONE_FILE.format(rank=rank):
                    own[entry["unit"]] = entry["images"]
    return every, own


def write_done(out: Path, rank: int, done: dict[str, int]) -> None:

    text = "".join(json.dumps({"unit": name, "images": n}) + "\n" for name, n in done.items())
    atomic_write(out / DONE_FILE.format(rank=rank), text.encode())
