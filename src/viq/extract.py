"""Offline code extraction: images -> a :class:`viq.store.reader.CodeStore`, on one or many devices, resumable.

::

    viq extract M photos/ -o codes.store
    torchrun --nproc_per_node 8 -m viq extract M 'shards/{00000..09999}.tar' -o codes.store
    viq extract M data.parquet -o codes.store --image-column jpg --id-column key

* **Inputs**: a folder (recursive; id = path relative to the folder), a LLaVA JSON/JSONL file (every
  distinct image path of its records, read through the training data reader :mod:`viq.data.llava` and
  sized as training sizes it, the record's ``"resize"`` included; id = the path as written, so training
  finds its codes; one path under two different resizes is an error naming both records),
  WebDataset tar shards as files, folders or brace patterns (:mod:`viq.data.shards`; id =
  ``<shard name>/<member name>``), or Parquet / Arrow / ``datasets.save_to_disk`` data
  (:mod:`viq.data.columnar`; id = the id column, else the image path, else ``<file>/<row>``).
* **Sharding** (rank and world size from flags or the launcher, :mod:`viq.launch`): shards and
  row groups / record batches are *units of work*, dealt out whole: rank r of W takes units r, r+W, ...
  of the ordered unit list, and DataLoader worker k of K of those takes every K-th; each tar is read
  once, sequentially, and nothing is listed up front. Folders and LLaVA files are dealt out image by
  image (r, r+W, ...). Each rank writes its own store shards (writer ``rank<r>``): no locks, no shared files.
* **Pipeline**: DataLoader workers read, hash (sha256 of the image bytes) and preprocess images in
  parallel; the main process drops duplicates and hands the rest to :meth:`ViQModel.encode_stream`,
  which packs them up to ``batch_tokens`` patch tokens per forward pass.
* **Resumable**: shards are finalised atomically every ``flush_every`` images; a re-run skips every id
  already in the store, so a run killed at any moment (even mid-shard) finishes with each image stored
  exactly once and nothing corrupt. A unit of work whose images are all durably stored is recorded in
  ``done-units-rank<r>.jsonl`` (rewritten atomically after the store flush that made it durable); a
  re-run skips recorded units without opening them, whichever rank recorded them.
* **Deduplication**: an image whose bytes were already stored (same sha256, and same per-record resize:
  :func:`viq.store.ids.content_hash`) is not encoded again; its codes are copied under the new id.
* **One image per id**: an id met again in a run with other bytes (or another resize) -- a repeated id
  column value, the same tar member name -- is recorded as an error naming both sources, never given
  the first one's codes. (A re-run does not re-read images already stored under their id.)
* **Errors**: unreadable images (and images whose forward pass fails) are recorded in
  ``errors-rank<r>.jsonl`` beside the shards and skipped; the summary counts them. A shard or file
  that cannot be read to its end is recorded there too (id = the unit) and is not marked done, so a
  re-run retries it (its images already stored are skipped).
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import json
import logging
import os
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from viq.formats.codes import Codes
from viq.formats.image import IMAGE_EXTENSIONS
from viq.store.ids import content_hash, image_id, tar_member_id

log = logging.getLogger(__name__)

__all__ = ["extract", "list_items", "list_units", "Item", "Unit", "DONE_FILE"]

#: Completion records of units of work, one file per rank, in the store directory.
DONE_FILE = "done-units-rank{rank}.jsonl"


@dataclass(frozen=True)
class Item:
    """One image to extract: its id in the store and where its bytes are (``path``, and ``member``:
    the tar member or the row of a columnar file). ``unit``: the unit of work it belongs to, if any.
    ``resize``: a LLaVA record's own resize rule (:class:`viq.formats.resize.OfficialResize`)."""

    sample_id: str
    path: str
    member: str | None = None
    unit: str | None = None
    resize: object = None

    @property
    def name(self) -> str:
        """The image's location, for error messages: ``path`` or ``path:member``."""
        return self.path if self.member is None else f"{self.path}:{self.member}"


@dataclass(frozen=True)
class Unit:
    """A unit of work: a tar shard, or a row group / record batch of a columnar file. ``name`` is
    stable across runs (completion records); ``read()`` yields its ``(Item, bytes)`` (``None``: read
    the file ``Item.path``). Picklable, for DataLoader workers started by spawn."""

    name: str
    read: Callable[[], Iterator[tuple[Item, bytes | None]]]


def _is_image_name(name: str) -> bool:
    return Path(name).suffix.lower() in IMAGE_EXTENSIONS


def _read_shard(shard: Path, unit: str) -> Iterator[tuple[Item, bytes]]:
    from viq.data.shards import iter_samples

    for sample in iter_samples(shard):
        for fld, data in sample.fields.items():
            member = sample.members[fld]
            if _is_image_name(member):
                yield Item(tar_member_id(shard, member), str(shard), member, unit), data


def _read_part(part, image_column: str, id_column: str | None, image_root: Path) -> Iterator[tuple[Item, bytes | None]]:
    from viq.data.columnar import image_value, iter_rows, row_id

    columns = [image_column] + ([id_column] if id_column and id_column != image_column else [])
    for row, values in iter_rows(part, columns):
        label = f"row {row}"
        try:
            value = image_value(values[image_column])
        except ValueError as e:
            raise ValueError(f"{part.path}: {label}: {e}") from None
        if id_column and values[id_column] is None:
            raise ValueError(f"{part.path}: {label}: empty id column {id_column!r}")
        if isinstance(value, str):  # a path: read by the worker, stored with the path as source
            path = image_root / value
            sid = str(values[id_column]) if id_column else image_id(path, image_root)
            yield Item(sid, str(path), None, part.name), None
        else:
            sid = str(values[id_column]) if id_column else row_id(part.file, row)
            yield Item(sid, str(part.path), label, part.name), value


def list_units(source: str | os.PathLike, *, image_column: str = "image", id_column: str | None = None,
               image_root: str | None = None) -> list[Unit] | None:
    """The units of work of a streamed source (tar shards, or columnar files' row groups / record
    batches), in order, without reading any images; ``None`` for the other inputs (folders, LLaVA files)."""
    from viq.data.columnar import is_columnar_source, list_parts
    from viq.data.shards import is_shard_source, list_shards

    if is_shard_source(source):
        return [Unit(p.name, functools.partial(_read_shard, p, p.name)) for p in list_shards(source)]
    if is_columnar_source(source):
        src = Path(source)
        root = Path(image_root) if image_root else src.parent  # as for LLaVA files: the data's folder
        return [Unit(part.name, functools.partial(_read_part, part, image_column, id_column, root))
                for part in list_parts(source, [image_column] + ([id_column] if id_column else []))]
    return None


def list_items(source: str | os.PathLike, image_root: str | None = None, **columns: Any) -> list[Item]:
    """All images of an input, sorted by id. Streamed inputs (tar shards, columnar files) are read
    through to list them: :func:`extract` never does this, it deals out :func:`list_units` instead.
    ``columns``: ``image_column`` / ``id_column`` of columnar inputs."""
    units = list_units(source, image_root=image_root, **columns)
    if units is not None:
        found = {item.sample_id: item for unit in units for item, _ in unit.read()}
        return [found[k] for k in sorted(found)]
    source = Path(source)
    items: dict[str, Item] = {}
    if source.is_dir():
        for p in sorted(source.rglob("*")):
            rel = p.relative_to(source)
            if p.is_file() and _is_image_name(p.name) and not any(s.startswith(".") for s in rel.parts):
                sid = image_id(p, source)
                items[sid] = Item(sid, str(p))
    elif source.suffix in (".json", ".jsonl"):
        from viq.data.llava import LlavaDataset

        dataset = LlavaDataset(source, image_root=image_root)
        root = Path(image_root) if image_root else source.parent
        first: dict[str, str] = {}  # id -> the record that named it first
        for i in range(len(dataset)):
            record = dataset.record(i)
            for ref in record.images:
                # the id is the path relative to the image root (as a record writes it), so training
                # finds an image's codes by the same string
                sid = image_id(ref.path, root)
                known = items.get(sid)
                if known is None:
                    items[sid] = Item(sid, str(ref.path), resize=ref.resize)
                    first[sid] = record.label
                elif known.resize != ref.resize:
                    raise ValueError(
                        f"{record.label}: image {sid} with resize {ref.resize or 'none'}, but {first[sid]} gives it "
                        f"resize {known.resize or 'none'}: the two are different pixels and a code store keeps one "
                        f"code set per image id; give the records the same resize")
    elif not source.exists():
        raise FileNotFoundError(f"{source}: no such input")
    else:
        raise ValueError(f"{source}: expected a folder of images, a LLaVA .json/.jsonl file, WebDataset .tar "
                         "shards (file, folder or {a..b} pattern), or Parquet / Arrow data")
    return [items[k] for k in sorted(items)]


def _prepare(item: Item, data: bytes | None, cfg) -> dict[str, Any]:
    """Read (``data`` None: the file ``item.path``), hash and preprocess one image. Never raises:
    errors travel as results."""
    from viq.formats.image import preprocess

    out: dict[str, Any] = {"item": item}
    try:
        if data is None:
            data = Path(item.path).read_bytes()
        out["hash"] = content_hash(data, item.resize)
        if item.resize is not None:  # the record sizes its image itself, as training does
            cfg = dataclasses.replace(cfg, resize=item.resize)
        try:
            prepared = preprocess(data, cfg)
        except Exception as e:  # re-label the "<bytes>" source with the real name
            raise type(e)(str(e).replace("<bytes>", item.name)) if isinstance(e, ValueError) else e
        # named after the file, so that an encoding error from ViQModel.encode_stream names it too
        out["prepared"] = dataclasses.replace(prepared, source=item.name)
    except Exception as e:  # noqa: BLE001 - one bad image must not stop the run
        out["error"] = f"{type(e).__name__}: {e}"
    return out


class _ReadDataset(torch.utils.data.Dataset):
    """Worker side of listed inputs (folders, LLaVA files): read, hash, preprocess item ``i``."""

    def __init__(self, items: list[Item], preprocess) -> None:
        self.items, self.preprocess = items, preprocess

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> dict[str, Any]:
        return _prepare(self.items[i], None, self.preprocess)


class _StreamDataset(torch.utils.data.IterableDataset):
    """Worker side of streamed inputs: worker k of K reads units k, k+K, ... of this rank's units,
    each once, front to back. Yields one result per image (``existing`` for ids already stored: not
    decoded), then ``{"unit_done": name, "images": n}``, or ``{"unit_error": ...}`` if the unit
    could not be read to its end."""

    def __init__(self, units: Sequence[Unit], preprocess, store) -> None:
        self.units, self.preprocess, self.store = list(units), preprocess, store

    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = torch.utils.data.get_worker_info()
        mine = self.units if info is None else self.units[info.id :: info.num_workers]
        for unit in mine:
            n = 0
            try:
                for item, data in unit.read():
                    n += 1
                    if item.sample_id in self.store:
                        # hashed (the bytes are at hand) to tell a repeated id with other bytes
                        yield {"item": item, "existing": True,
                               "hash": content_hash(data, item.resize) if data is not None else None}
                    else:
                        yield _prepare(item, data, self.preprocess)
            except Exception as e:  # noqa: BLE001 - a broken shard must not stop the others
                yield {"unit_error": unit.name, "error": f"{type(e).__name__}: {e}"}
                continue
            yield {"unit_done": unit.name, "images": n}


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
    return (f"id {item.sample_id!r} is already the id of another image ({other}); this one ({item.name}) has "
            f"other bytes and is not stored: give each image its own id")


def _read_done(out: Path, rank: int) -> tuple[dict[str, int], dict[str, int]]:
    """(units recorded done by any rank, those recorded by this rank): name -> image count."""
    every: dict[str, int] = {}
    own: dict[str, int] = {}
    for path in sorted(out.glob(DONE_FILE.format(rank="*"))):
        for line in path.read_text().splitlines():
            if line.strip():
                entry = json.loads(line)
                every[entry["unit"]] = entry["images"]
                if path.name == DONE_FILE.format(rank=rank):
                    own[entry["unit"]] = entry["images"]
    return every, own


def _write_done(out: Path, rank: int, done: dict[str, int]) -> None:
    from viq._io import atomic_write

    text = "".join(json.dumps({"unit": name, "images": n}) + "\n" for name, n in done.items())
    atomic_write(out / DONE_FILE.format(rank=rank), text.encode())


def extract(
    model_path: str | os.PathLike,
    source: str | os.PathLike,
    out: str | os.PathLike,
    *,
    image_root: str | None = None,
    image_column: str = "image",
    id_column: str | None = None,
    rank: int | None = None,
    world_size: int | None = None,
    device: str = "auto",
    dtype: torch.dtype = torch.float32,
    batch_tokens: int = 8192,
    num_workers: int = 2,
    preprocess=None,
    flush_every: int = 256,
    entropy_coding: bool = False,
    progress: bool = True,
    model=None,
    return_timing: bool = False,
) -> dict[str, int]:
    """Extract the codes of every image of ``source`` into the store ``out`` (created if needed).

    ``image_column`` / ``id_column``: columns of columnar inputs (the image bytes or path; the store
    id). ``rank`` / ``world_size``: this process's share (default: from the launcher,
    :func:`viq.launch.resolve_distributed`).

    Returns counts: ``images`` (this rank's share, including the images of units done before),
    ``encoded``, ``existing`` (already stored), ``deduplicated`` (same bytes as a stored image),
    ``failed`` (images, and units that could not be read to their end).
    """
    import viq
    from viq.formats.image import PreprocessConfig
    from viq.launch import resolve_distributed
    from viq.store.reader import CodeStore

    dist = resolve_distributed(rank, world_size)
    rank, world = dist.rank, dist.world_size
    if device == "auto":
        device = f"cuda:{dist.local_rank}" if torch.cuda.is_available() else "cpu"
    if model is None:
        model = viq.load(model_path, device=device, dtype=dtype, components=["encoder"])
    pre = preprocess or PreprocessConfig(patch_size=model.patch_size)
    out = Path(out)
    store = CodeStore.create(out, levels=model.levels, codes_per_patch=model.config.head.codes_per_patch,
                             patch_size=model.patch_size, model_fingerprint=model.fingerprint(),
                             entropy_coding=entropy_coding, exist_ok=True)
    counts = {"images": 0, "encoded": 0, "existing": 0, "deduplicated": 0, "failed": 0}
    units = list_units(source, image_column=image_column, id_column=id_column, image_root=image_root)
    done_own: dict[str, int] = {}
    if units is None:  # listed inputs: dealt out image by image
        items = list_items(source, image_root)[rank::world]
        todo = [it for it in items if it.sample_id not in store]
        counts.update(images=len(items), existing=len(items) - len(todo))
        dataset: torch.utils.data.Dataset = _ReadDataset(todo, pre)
        total: int | None = len(todo)
    else:  # streamed inputs: dealt out unit by unit; units recorded done (by any rank) are not opened
        done_any, done_own = _read_done(out, rank)
        mine = units[rank::world]
        todo_units = [u for u in mine if u.name not in done_any]
        before = sum(done_any[u.name] for u in mine if u.name in done_any)
        counts.update(images=before, existing=before)
        log.info("rank %d of %d: %d of %d units (%d done before)", rank, world, len(todo_units), len(units),
                 len(mine) - len(todo_units))
        dataset, total = _StreamDataset(todo_units, pre, store), None
        num_workers = min(num_workers, len(todo_units))
    streamed = units is not None
    # Wall time of the whole loop and of the model calls alone: their ratio is how busy the data path
    # keeps the accelerator (reported by bench/extract_throughput.py).
    timing = {"wall_s": 0.0, "encode_s": 0.0}
    started = time.perf_counter()
    errors_path = out / f"errors-rank{rank}.jsonl"
    loader = torch.utils.data.DataLoader(dataset, batch_size=None, num_workers=num_workers,
                                         prefetch_factor=8 if num_workers else None)
    bar = None
    if progress and rank == 0:
        from tqdm.auto import tqdm

        bar = tqdm(total=total, desc="extract", unit="img")
    fingerprint = model.fingerprint()

    with store.writer(name=f"rank{rank}") as writer:
        since_flush = 0
        recent: dict[str, Codes] = {}  # content hash -> codes added since the last flush
        waiting: dict[str, list[Item]] = {}  # content hash -> duplicates of an image being encoded
        queued: collections.deque[dict[str, Any]] = collections.deque()  # sent to encode_stream, in order
        in_flight: set[str] = set()  # ids queued or waiting (not yet added)
        met: dict[str, tuple[str, str]] = {}  # id -> (content hash, source) of the images taken this run
        outstanding: collections.Counter[str] = collections.Counter()  # unit -> its images not yet added/failed
        read_through: dict[str, int] = {}  # unit -> image count, once its worker has read all of it
        finished: dict[str, int] = {}  # units whose images are all added (or failed), not yet durable
        reading_s = 0.0  # time spent in to_encode() (reading, dedup, store writes), inside the stream's wall time

        def record_done() -> None:
            # called when every record added so far is durable (just flushed, or nothing added since)
            if finished:
                done_own.update(finished)
                finished.clear()
                _write_done(out, rank, done_own)

        def settle(unit: str | None) -> None:
            if unit is not None and unit in read_through and outstanding[unit] == 0:
                del outstanding[unit]
                finished[unit] = read_through.pop(unit)
                if since_flush == 0:
                    record_done()

        def add(item: Item, codes: Codes, content_hash: str) -> None:
            nonlocal since_flush
            codes = Codes(codes.indices, codes.levels, image_size=codes.image_size, patch_size=codes.patch_size,
                          metadata={"model": fingerprint, "source": item.path})
            writer.add(item.sample_id, codes, source=item.path, content_hash=content_hash)
            recent[content_hash] = codes
            since_flush += 1
            resolve(item)

        def fail(item: Item, error: str) -> None:
            counts["failed"] += 1
            with open(errors_path, "a") as f:
                f.write(json.dumps({"id": item.sample_id, "source": item.name, "error": error}) + "\n")
            log.warning("%s: %s", item.name, error)
            resolve(item)

        def resolve(item: Item) -> None:
            in_flight.discard(item.sample_id)
            if item.unit is not None:
                outstanding[item.unit] -= 1
                settle(item.unit)
            if bar is not None:
                bar.update(1)

        def maybe_flush() -> None:
            # Whatever is being encoded: what a kill can lose is bounded by flush_every plus the pack in
            # flight (duplicates of an image being encoded wait in `waiting`, not in `recent`).
            nonlocal since_flush
            if since_flush >= flush_every:
                writer.flush()
                recent.clear()
                since_flush = 0
                record_done()

        def to_encode():
            """The loader's images that need encoding; read errors, stored ids and duplicates are handled here."""
            nonlocal reading_s
            t0 = time.perf_counter()
            for result in loader:
                if "unit_done" in result:
                    read_through[result["unit_done"]] = result["images"]
                    settle(result["unit_done"])
                    continue
                if "unit_error" in result:  # not marked done: a re-run retries it
                    counts["failed"] += 1
                    with open(errors_path, "a") as f:
                        f.write(json.dumps({"id": result["unit_error"], "source": result["unit_error"],
                                            "error": result["error"]}) + "\n")
                    log.error("%s: %s (the unit is retried by a re-run)", result["unit_error"], result["error"])
                    continue
                item = result["item"]
                if streamed:
                    counts["images"] += 1
                if result.get("existing") or item.sample_id in writer or item.sample_id in in_flight:
                    clash = _other_image(item, result.get("hash"), met, store)
                    if clash is not None:  # the same id for other pixels: never give it the first one's codes
                        counts["failed"] += 1
                        with open(errors_path, "a") as f:
                            f.write(json.dumps({"id": item.sample_id, "source": item.name, "error": clash}) + "\n")
                        log.error("%s: %s", item.name, clash)
                    else:
                        counts["existing"] += 1  # stored before (or the same image twice in the input)
                    if bar is not None:
                        bar.update(1)
                    continue
                if item.unit is not None:
                    outstanding[item.unit] += 1
                in_flight.add(item.sample_id)
                if "hash" in result:
                    met[item.sample_id] = (result["hash"], item.name)
                if "error" in result:
                    fail(item, result["error"])
                    maybe_flush()
                    continue
                h = result["hash"]
                # Same bytes as an image already stored, added, or being encoded: no second encode.
                known = recent.get(h)
                if known is None:
                    stored_as = store.has_hash(h)
                    known = store.get(stored_as) if stored_as is not None else None
                if known is not None:
                    add(item, known, h)
                    counts["deduplicated"] += 1
                elif h in waiting:
                    waiting[h].append(item)
                else:
                    waiting[h] = []
                    queued.append(result)
                    reading_s += time.perf_counter() - t0
                    yield result["prepared"]
                    t0 = time.perf_counter()
                maybe_flush()
            reading_s += time.perf_counter() - t0

        stream_s = 0.0
        stream = model.encode_stream(to_encode(), batch_tokens=batch_tokens)
        while True:
            t0 = time.perf_counter()
            codes = next(stream, None)  # Codes are on the CPU: the device work is done
            stream_s += time.perf_counter() - t0
            if codes is None:
                break
            result = queued.popleft()
            item, h = result["item"], result["hash"]
            twins = waiting.pop(h, [])
            if isinstance(codes, Exception):
                for it in (item, *twins):
                    fail(it, f"{type(codes).__name__}: {codes}")
            else:
                add(item, codes, h)
                counts["encoded"] += 1
                for twin in twins:
                    add(twin, codes, h)
                    counts["deduplicated"] += 1
            maybe_flush()
        timing["encode_s"] = stream_s - reading_s
    # the writer's close() flushed the last shard: every unit finished in this run is now durable
    record_done()
    if bar is not None:
        bar.close()
    timing["wall_s"] = time.perf_counter() - started
    log.info("rank %d: %s (%.1f s, %.0f%% of it encoding)", rank, counts, timing["wall_s"],
             100 * timing["encode_s"] / max(timing["wall_s"], 1e-9))
    if return_timing:
        return {**counts, **timing}
    return counts
