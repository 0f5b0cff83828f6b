"""What extraction reads: units of work, the images in them (:class:`Item`), and the worker side that
reads, hashes and prepares each image (never raising: errors travel as results). Workers hand the main
process small dataclasses: :class:`ReadImage` per image, :class:`UnitDone` / :class:`UnitFailed` per
unit of work."""

from __future__ import annotations

import dataclasses
import functools
import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from viq.data.columnar import image_value, is_columnar_source, iter_rows, list_parts, row_id
from viq.data.llava import LlavaDataset
from viq.data.shards import is_shard_source, iter_samples, list_shards
from viq.formats.image import IMAGE_EXTENSIONS, PreparedImage, preprocess
from viq.store.ids import content_hash, image_id, tar_member_id

__all__ = [
    "DONE_FILE",
    "Item",
    "Unit",
    "ReadImage",
    "UnitDone",
    "UnitFailed",
    "WorkerResult",
    "list_items",
    "list_units",
    "prepare",
    "ReadDataset",
    "StreamDataset",
]

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


@dataclass
class ReadImage:
    """A worker's result for one image: its content hash and prepared pixels, or the error that stopped
    it (``"<Type>: <message>"``). ``existing``: its id is stored already, so it was hashed (to tell a
    repeated id with other bytes; None when the bytes were not at hand) and not decoded."""

    item: Item
    hash: str | None = None
    prepared: PreparedImage | None = None
    error: str | None = None
    existing: bool = False


@dataclass(frozen=True)
class UnitDone:
    """A unit of work was read to its end; it held ``images`` images."""

    unit: str
    images: int


@dataclass(frozen=True)
class UnitFailed:
    """A unit of work could not be read to its end (a re-run retries it)."""

    unit: str
    error: str


#: What the workers hand the main process.
WorkerResult = ReadImage | UnitDone | UnitFailed


def _is_image_name(name: str) -> bool:
    return Path(name).suffix.lower() in IMAGE_EXTENSIONS


def _read_shard(shard: Path, unit: str) -> Iterator[tuple[Item, bytes]]:

    for sample in iter_samples(shard):
        for fld, data in sample.fields.items():
            member = sample.members[fld]
            if _is_image_name(member):
                yield Item(tar_member_id(shard, member), str(shard), member, unit), data


def _read_part(part, image_column: str, id_column: str | None, image_root: Path) -> Iterator[tuple[Item, bytes | None]]:

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


def list_units(
    source: str | os.PathLike,
    *,
    image_column: str = "image",
    id_column: str | None = None,
    image_root: str | None = None,
) -> list[Unit] | None:
    """The units of work of a streamed source (tar shards, or columnar files' row groups / record
    batches), in order, without reading any images; ``None`` for the other inputs (folders, LLaVA files)."""

    if is_shard_source(source):
        return [Unit(p.name, functools.partial(_read_shard, p, p.name)) for p in list_shards(source)]
    if is_columnar_source(source):
        src = Path(source)
        root = Path(image_root) if image_root else src.parent  # as for LLaVA files: the data's folder
        return [
            Unit(part.name, functools.partial(_read_part, part, image_column, id_column, root))
            for part in list_parts(source, [image_column] + ([id_column] if id_column else []))
        ]
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
                        f"code set per image id; give the records the same resize"
                    )
    elif not source.exists():
        raise FileNotFoundError(f"{source}: no such input")
    else:
        raise ValueError(
            f"{source}: expected a folder of images, a LLaVA .json/.jsonl file, WebDataset .tar "
            "shards (file, folder or {a..b} pattern), or Parquet / Arrow data"
        )
    return [items[k] for k in sorted(items)]


def prepare(item: Item, data: bytes | None, cfg) -> ReadImage:
    """Read (``data`` None: the file ``item.path``), hash and preprocess one image. Never raises:
    errors travel as results."""

    out = ReadImage(item)
    try:
        if data is None:
            data = Path(item.path).read_bytes()
        out.hash = content_hash(data, item.resize)
        if item.resize is not None:  # the record sizes its image itself, as training does
            cfg = dataclasses.replace(cfg, resize=item.resize)
        try:
            prepared = preprocess(data, cfg)
        except ValueError as e:  # re-label the "<bytes>" source with the real name
            raise type(e)(str(e).replace("<bytes>", item.name)) from e
        # named after the file, so that an encoding error from ViQModel.encode_keyed names it too
        out.prepared = dataclasses.replace(prepared, source=item.name)
    except Exception as e:  # noqa: BLE001 - one bad image must not stop the run
        out.error = f"{type(e).__name__}: {e}"
    return out


class ReadDataset(torch.utils.data.Dataset):
    """Worker side of listed inputs (folders, LLaVA files): read, hash, preprocess item ``i``."""

    def __init__(self, items: list[Item], preprocess) -> None:
        self.items, self.preprocess = items, preprocess

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> ReadImage:
        return prepare(self.items[i], None, self.preprocess)


class StreamDataset(torch.utils.data.IterableDataset):
    """Worker side of streamed inputs: worker k of K reads units k, k+K, ... of this rank's units,
    each once, front to back. Yields one :class:`ReadImage` per image (``existing`` for ids already
    stored: not decoded), then :class:`UnitDone`, or :class:`UnitFailed` if the unit could not be read
    to its end."""

    def __init__(self, units: Sequence[Unit], preprocess, store) -> None:
        self.units, self.preprocess, self.store = list(units), preprocess, store

    def __iter__(self) -> Iterator[WorkerResult]:
        info = torch.utils.data.get_worker_info()
        mine = self.units if info is None else self.units[info.id :: info.num_workers]
        for unit in mine:
            n = 0
            try:
                for item, data in unit.read():
                    n += 1
                    if item.sample_id in self.store:
                        # hashed (the bytes are at hand) to tell a repeated id with other bytes
                        digest = content_hash(data, item.resize) if data is not None else None
                        yield ReadImage(item, hash=digest, existing=True)
                    else:
                        yield prepare(item, data, self.preprocess)
            except Exception as e:  # noqa: BLE001 - a broken shard must not stop the others
                yield UnitFailed(unit.name, f"{type(e).__name__}: {e}")
                continue
            yield UnitDone(unit.name, n)
