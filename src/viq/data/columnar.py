"""Columnar inputs: Parquet files and Arrow / Hugging Face ``datasets.save_to_disk`` folders, streamed.

Sources (:func:`is_columnar_source`, :func:`list_parts`):

* a ``.parquet`` file, or a folder of them (recursive, sorted by relative path): the unit of work is
  one **row group** (found from the file footers; no data is read to list them);
* an ``.arrow`` file (Arrow IPC stream, as ``datasets`` writes, or IPC file format), or a folder saved
  by ``datasets.Dataset.save_to_disk`` (``state.json`` names its ``data-*.arrow`` files): the unit is
  one **record batch** (files are memory-mapped, so finding the batches copies nothing).

Units (:class:`Part`) are dealt out to ranks and DataLoader workers; :func:`iter_rows` reads one
part's wanted columns only, a few hundred rows at a time.

Image cells (:func:`image_value`) may be bytes (``binary`` columns), a path string (relative paths
are resolved against an image root), or the ``{"bytes", "path"}`` struct of the ``datasets`` Image
feature. A row's store id is the value of the id column when one is named, else the image's id by
:func:`viq.store.ids.image_id` when the cell is a path, else :func:`row_id` (``<file>/<row number>``).

For training, :func:`iter_records` turns rows with a conversations column into LLaVA records
(:mod:`viq.data.llava`), so a recipe's ``data.train`` can be a Parquet file or a saved dataset.
"""

from __future__ import annotations

import functools
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from viq._untrusted import read_json

__all__ = [
    "COLUMNAR_SUFFIXES",
    "Cell",
    "Part",
    "image_value",
    "is_columnar_source",
    "iter_records",
    "iter_rows",
    "list_parts",
    "read_cell",
    "row_id",
]

#: File suffixes read as columnar data.
COLUMNAR_SUFFIXES = (".parquet", ".arrow")
#: Rows decoded per read inside a part (bounds the memory held for image bytes).
_READ_ROWS = 64


def row_id(file: str, row: int) -> str:
    """Store id of row ``row`` (0-based, within the file) of the columnar file ``file`` (its path
    relative to the source), used when the rows have no id column and their images are bytes."""
    return f"{Path(file).as_posix()}/{row}"


def _is_hf_saved(path: Path) -> bool:
    return path.is_dir() and (path / "state.json").is_file()


def is_columnar_source(source: str | os.PathLike) -> bool:
    """Whether ``source`` is a Parquet / Arrow file, a folder saved by ``datasets``, or a folder
    holding ``.parquet`` files directly."""
    path = Path(source)
    if _is_hf_saved(path):
        return True
    if path.is_dir():
        return any(e.name.endswith(".parquet") for e in os.scandir(path) if e.is_file())
    return path.suffix.lower() in COLUMNAR_SUFFIXES


@dataclass(frozen=True)
class Part:
    """One unit of work of a columnar source: a row group of a Parquet file or a record batch of an
    Arrow file. ``file`` is its path relative to the source (the file name for a file source),
    ``first_row`` the row number (within the file) of its first row."""

    path: Path
    file: str
    kind: str  # "parquet" or "arrow"
    index: int
    first_row: int
    num_rows: int

    @property
    def name(self) -> str:
        """Stable name of the unit (completion records): ``<file>#<index>``."""
        return f"{self.file}#{self.index}"


def _open_arrow(path: Path):
    """An Arrow reader over the memory-mapped file: IPC file format, else stream format."""
    import pyarrow as pa

    source = pa.memory_map(str(path), "r")
    try:
        return pa.ipc.open_file(source)
    except pa.ArrowInvalid:
        source.seek(0)
        return pa.ipc.open_stream(source)


def _arrow_batches(path: Path) -> Iterator[Any]:
    import pyarrow as pa

    reader = _open_arrow(path)
    if isinstance(reader, pa.ipc.RecordBatchFileReader):
        for i in range(reader.num_record_batches):
            yield reader.get_batch(i)
    else:
        yield from reader


def _files(source: Path) -> list[tuple[Path, str]]:
    """(path, name relative to the source) of every data file of a columnar source, in order."""
    if _is_hf_saved(source):
        state = read_json(source / "state.json")
        names = [f["filename"] for f in state.get("_data_files", [])] or sorted(
            p.name for p in source.glob("data-*.arrow")
        )
        if not names:
            raise ValueError(f"{source}: a saved dataset without data files (state.json lists none)")
        return [(source / n, n) for n in names]
    if source.is_dir():
        found = []
        for dirpath, dirnames, filenames in os.walk(source):
            dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
            for f in filenames:
                if f.lower().endswith(COLUMNAR_SUFFIXES) and not f.startswith("."):
                    p = Path(dirpath, f)
                    found.append((p.relative_to(source).parts, p))
        if not found:
            raise ValueError(f"{source}: no {' / '.join(COLUMNAR_SUFFIXES)} files in this folder")
        return [(p, Path(*parts).as_posix()) for parts, p in sorted(found)]
    if not source.exists():
        raise FileNotFoundError(f"{source}: no such file or folder")
    return [(source, source.name)]


def list_parts(source: str | os.PathLike, columns: list[str] | None = None) -> list[Part]:
    """Every unit of work (row group / record batch) of ``source``, in order; reads only metadata.
    ``columns``: columns every file must have (checked against each file's schema, so a misspelt
    column name fails here, before any work, rather than in every unit).

    Raises:
        FileNotFoundError, ValueError: a missing source, a folder without data files, a file without
            one of ``columns``.
        pyarrow.ArrowInvalid: a file that is not Parquet / Arrow.
    """
    import pyarrow.parquet as pq

    parts: list[Part] = []
    for path, name in _files(Path(source)):
        if path.suffix.lower() == ".parquet":
            pf = pq.ParquetFile(path)
            if columns:
                _check_columns(Part(path, name, "parquet", 0, 0, 0), pf.schema_arrow.names, columns)
            meta = pf.metadata
            first = 0
            for i in range(meta.num_row_groups):
                rows = meta.row_group(i).num_rows
                parts.append(Part(path, name, "parquet", i, first, rows))
                first += rows
        else:
            if columns:
                _check_columns(Part(path, name, "arrow", 0, 0, 0), list(_open_arrow(path).schema.names), columns)
            first = 0
            for i, batch in enumerate(_arrow_batches(path)):
                parts.append(Part(path, name, "arrow", i, first, batch.num_rows))
                first += batch.num_rows
    return parts


def _check_columns(part: Part, schema_names: list[str], columns: list[str]) -> None:
    missing = [c for c in columns if c not in schema_names]
    if missing:
        raise ValueError(f"{part.path}: no column {', '.join(map(repr, missing))} (columns: {', '.join(schema_names)})")


def iter_rows(part: Part, columns: list[str]) -> Iterator[tuple[int, dict[str, Any]]]:
    """``(row number within the file, {column: value})`` for every row of ``part``, reading only
    ``columns``, at most a few dozen rows decoded at a time.

    Raises:
        ValueError: a column that the file does not have.
    """
    if part.kind == "parquet":
        import pyarrow.parquet as pq

        pf = pq.ParquetFile(part.path)
        _check_columns(part, pf.schema_arrow.names, columns)
        batches = pf.iter_batches(batch_size=_READ_ROWS, row_groups=[part.index], columns=columns, use_threads=False)
    else:
        batch = next(b for i, b in enumerate(_arrow_batches(part.path)) if i == part.index)
        _check_columns(part, batch.schema.names, columns)
        batch = batch.select(columns)
        batches = (batch.slice(o, _READ_ROWS) for o in range(0, batch.num_rows, _READ_ROWS))
    row = part.first_row
    for batch in batches:
        data = {c: batch.column(c).to_pylist() for c in columns}
        for k in range(batch.num_rows):
            yield row, {c: data[c][k] for c in columns}
            row += 1


@dataclass(frozen=True)
class Cell:
    """Where one image stored as bytes lies in a columnar file: the part (row group / record batch)
    ``index`` of ``path``, its row ``row`` within the part, column ``column``. Pixel stages read the
    bytes lazily by :func:`read_cell`, so a dataset of millions of rows holds no image in memory."""

    path: str
    kind: str
    index: int
    row: int
    column: str


@functools.lru_cache(maxsize=2)
def _part_column(path: str, kind: str, index: int, column: str) -> list:
    # One part's column, decoded once: consecutive samples of a part cost one read. Random order costs
    # one part read per sample (a Parquet row group is ~100 images for HF datasets' image sets).
    if kind == "parquet":
        import pyarrow.parquet as pq

        return pq.ParquetFile(path).read_row_group(index, columns=[column]).column(0).to_pylist()
    batch = next(b for i, b in enumerate(_arrow_batches(Path(path))) if i == index)
    return batch.column(column).to_pylist()


def read_cell(cell: Cell) -> bytes:
    """The image bytes at ``cell`` (ValueError for a cell that holds no bytes)."""
    value = image_value(_part_column(cell.path, cell.kind, cell.index, cell.column)[cell.row])
    if not isinstance(value, bytes):
        raise ValueError(
            f"{cell.path}: row {cell.row} of part {cell.index}: column {cell.column!r} holds a path, not image bytes"
        )
    return value


def image_value(cell: Any) -> bytes | str:
    """The image of a cell: bytes, or a path string (``datasets`` Image structs give their bytes, else
    their path).

    Raises:
        ValueError: an empty cell or a value of another type.
    """
    if isinstance(cell, dict):
        cell = cell.get("bytes") or cell.get("path")
    if isinstance(cell, (bytes, bytearray, memoryview)):
        return bytes(cell)
    if isinstance(cell, str) and cell:
        return cell
    raise ValueError(f"expected image bytes, a path or a {{'bytes', 'path'}} struct, got {type(cell).__name__}")


def _conversation(cell: Any) -> tuple[str, Any]:
    """(record key, turns) of a conversations cell: JSON text or a list of turn structs."""
    if isinstance(cell, str):
        cell = json.loads(cell)
    if isinstance(cell, list) and cell and isinstance(cell[0], dict) and "role" in cell[0] and "from" not in cell[0]:
        return "messages", cell
    return "conversations", cell


def iter_records(
    source: str | os.PathLike,
    *,
    conversations_column: str = "conversations",
    image_column: str | None = "image",
    id_column: str | None = "id",
) -> Iterator[tuple[str, Any]]:
    """LLaVA records (:func:`viq.data.llava.parse_record` input) from the rows of a columnar source:
    ``("<file>#row<n>", {"id", "image", "conversations" | "messages"})``.

    The conversations cell is a list of ``{"from", "value"}`` (or ``{"role", "content"}``) structs, or
    the same as JSON text. The image cell is a path, a list of paths, empty, or image bytes; bytes
    (and ``datasets`` Image structs without a path) are referred to by the row's id
    (:func:`row_id` without an id column), the id under which ``viq extract`` stores their codes, so
    a codes stage finds them, and carry their :class:`Cell`, so pixel stages read the bytes (lazily,
    :func:`read_cell`). A missing image or id column is allowed (text-only samples / no ids); a missing
    conversations column is an error.
    """
    import pyarrow.parquet as pq  # noqa: F401  - fail early, with pyarrow's message, if it is missing

    for part in list_parts(source):
        names = _schema_names(part)
        if conversations_column not in names:
            raise ValueError(
                f"{part.path}: no conversations column {conversations_column!r} (columns: {', '.join(names)})"
            )
        columns = [conversations_column] + [c for c in (image_column, id_column) if c and c in names]
        for offset, (row, values) in enumerate(iter_rows(part, columns)):
            key, turns = _conversation(values[conversations_column])
            record: dict[str, Any] = {key: turns}
            rid = values.get(id_column) if id_column else None
            if rid is not None:
                record["id"] = rid if isinstance(rid, (str, int)) else str(rid)
            cell = values.get(image_column) if image_column else None
            if cell is not None and cell != []:
                if isinstance(cell, list):
                    record["image"] = [image_value(c) for c in cell]
                else:
                    record["image"] = image_value(cell)
                images = record["image"] if isinstance(record["image"], list) else [record["image"]]
                if any(isinstance(v, bytes) for v in images):
                    if len(images) > 1:
                        raise ValueError(
                            f"{part.path}#row{row}: several images as bytes in one row; "
                            "store them as paths (one id per image)"
                        )
                    record["image"] = {
                        "img_path": str(rid) if rid is not None else row_id(part.file, row),
                        "cell": Cell(str(part.path), part.kind, part.index, offset, image_column),
                    }
            yield f"{part.path}#row{row}", record


def _schema_names(part: Part) -> list[str]:
    if part.kind == "parquet":
        import pyarrow.parquet as pq

        return list(pq.ParquetFile(part.path).schema_arrow.names)
    return list(_open_arrow(part.path).schema.names)
