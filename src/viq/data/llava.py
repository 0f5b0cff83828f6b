"""LLaVA-style multimodal conversation data for training ViQ together with an LLM.

This module is long because it specifies and validates the file format in one place: every
malformed record is an error naming the file, the line and the problem.

File format (the official training format, see ``official-viq-training.md`` §9.1)
---------------------------------------------------------------------------------
``path`` is a ``.json`` file holding one list of records, or a ``.jsonl`` file with one record
per line (blank lines are ignored). A record::

    {"id": "optional, str or int",
     "image": <image spec>,                        # optional; absent/null/[] = text-only sample
     "conversations": [{"from": "human" | "gpt" | "system", "value": "<image>\\nWhat is this?"},
                       ...]}

or, instead of ``conversations``, the chat-API style ``"messages": [{"role": "user" |
"assistant" | "system", "content": str}, ...]``. Both role vocabularies are accepted in both
forms (``human``/``user`` -> ``user``, ``gpt``/``assistant`` -> ``assistant``).

An image spec is a path string, ``{"img_path": path, "resize": ...}`` (official), or a list of
those (mixed freely). Relative paths are resolved against ``image_root`` (default: the folder
of the data file); absolute paths are used as they are. The official packed form
(``{"patch": file, "start_num": ..., "size": ...}``) is not supported and is reported as invalid.

``"resize"`` (official semantics, :class:`OfficialResize`):

* ``"<base>x<p>"``: area-preserving toward ``base**2``, each side floored to a multiple of ``p``
  (small images are up-scaled too); ``p <= 0``: a square ``base x base`` resize.
* ``[a, b]``: exactly ``(max(a, 64), max(b, 64))`` as PIL ``(width, height)``.
* absent / ``null``: the dataset's :class:`~viq.formats.image.PreprocessConfig` (viq's native-resolution
  policy, :func:`viq.formats.image.preprocess`).

Official resizes resample with PIL bilinear (as the authors' code); the image is decoded with
:func:`viq.formats.image.load_image` (EXIF orientation applied, alpha over ``background``, bomb guard),
and normalised with :func:`viq.formats.image.to_pixels` to float32 ``(3, H, W)`` in [-1, 1].

Validation
----------
Everything that can be checked without decoding an image is checked eagerly in
:class:`LlavaDataset` ``__init__``: JSON syntax, record shape, roles and their order, empty or
non-string turns, image specs and resize specs, and that the number of literal ``"<image>"``
placeholders (over all turns) equals the number of images. Differences from the official loader,
which mostly warns or silently repairs, are deliberate: a conversation whose first non-system
turn is not a user turn, non-alternating turns, a conversation not ending with an assistant turn,
or a placeholder/image count mismatch is an error here (the official code drops the first turn,
or prints a warning and trains on a misaligned sample). Images themselves are decoded lazily in
``__getitem__``.

Errors are :class:`DataError` with messages ``"<file>:<line> (id=<id>): <problem>"`` (the
``(id=...)`` part only when the record has an id). With ``on_error="skip"``, invalid records are
dropped at construction (listed in ``dataset.skipped`` and summarised in one logging warning),
and a sample whose image fails to load makes ``__getitem__`` return ``None`` (with a warning
naming it); :func:`collate_samples` drops those ``None``\\ s, so always use it (or an equivalent)
as the DataLoader's ``collate_fn`` in skip mode. A JSON syntax error in a ``.json`` file breaks
the whole list and is always raised; in a ``.jsonl`` file it only affects that line and is
skipped like any other invalid record.

Text is kept exactly as written (``"<image>"`` placeholders stay where they are; nothing is
stripped). Text-only samples have ``images == []``; the official trainer feeds a dummy 224x224
zero image for those, which is the training loop's business, not the dataset's.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import operator
import os
import re
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch
from PIL import Image
from torch.utils.data import Dataset

from viq.formats.image import (
    ImageError,
    PreprocessConfig,
    padded_grid,
    target_size,
)
from viq.formats.image import preprocess as preprocess_image
from viq.formats.resize import OfficialResize, parse_resize
from viq.mllm.chat import IMAGE_TOKEN, LLAVA_ROLES

__all__ = [
    "DataError",
    "LlavaDataset",
    "load_record_image",
    "record_image_config",
    "header_size",
    "read_json_records",
    "parse_record",
    "OfficialResize",
    "Sample",
    "collate_samples",
    "parse_resize",
]

logger = logging.getLogger(__name__)

#: How many skipped-record reasons the summary warning spells out.
_MAX_REASONS_LOGGED = 5

_JSON_WS = re.compile(r"[ \t\n\r]*")


class DataError(ValueError):
    """A data file, record or image of a dataset is invalid.

    Messages start with where the problem is: ``"<file>:<line> (id=<id>): <problem>"`` for
    records, ``"<file>: <problem>"`` for whole files or single image files.
    """


class _Invalid(Exception):
    """Internal: one record is invalid (the message is the problem, without location)."""


# ----------------------------------------------------------------------------------------------
# samples
# ----------------------------------------------------------------------------------------------


@dataclass
class Sample:
    """One conversation with its images, as returned by :meth:`LlavaDataset.__getitem__`.

    Attributes:
        id: the record's ``id`` as a string, or ``"<file name>:<line>"`` when it has none.
        messages: ``[{"role": "system"|"user"|"assistant", "content": str}, ...]``; optional
            leading system turn, then user/assistant alternating, ending with assistant.
            ``"<image>"`` placeholders are where the data put them.
        images: one float32 ``(3, H, W)`` tensor in [-1, 1] per placeholder, in text order;
            sizes differ between images (native resolution / per-image resize).
        where: ``"<file>:<line>"`` of the record.
        index: the dataset index.
    """

    id: str
    messages: list[dict[str, str]]
    images: list[torch.Tensor]
    where: str
    index: int


# Internal records are NamedTuples: one is built per record/image at load time, and a tuple is
# several times cheaper to construct than a (frozen) dataclass (matters for ~1M-record files).
class _ImageRef(NamedTuple):
    path: str  # resolved against image_root
    resize: OfficialResize | None
    #: an image stored as bytes in a columnar file (viq.data.columnar.Cell); ``path`` is then its store id
    cell: Any = None


class _Record(NamedTuple):
    id: str
    has_id: bool
    where: str
    messages: tuple[tuple[str, str], ...]  # (role, content), normalised roles
    images: tuple[_ImageRef, ...]

    @property
    def label(self) -> str:
        """``"<file>:<line> (id=...)"`` for error messages."""
        return f"{self.where} (id={self.id})" if self.has_id else self.where


def collate_samples(batch: Sequence[Sample | None]) -> list[Sample]:
    """DataLoader ``collate_fn``: drop ``None`` (failed samples in skip mode), keep a plain list.

    Images are not stacked: every sample keeps its own list of differently sized ``(3, H, W)``
    tensors; the training code packs them (the encoder takes variable-size images). The result can
    be empty if every sample of the batch failed; the training loop should skip such a batch.
    """
    return [s for s in batch if s is not None]


def _reason(exc: Exception, path: str) -> str:
    """The problem of an :class:`ImageError` without its leading ``"<path>: "`` (we add our own)."""
    msg = str(exc)
    prefix = f"{path}: "
    return msg.removeprefix(prefix)


# ----------------------------------------------------------------------------------------------
# record parsing / validation
# ----------------------------------------------------------------------------------------------


def _type_name(value: Any) -> str:
    return "null" if value is None else type(value).__name__


def _parse_image_entry(entry: Any, k: int, root: str) -> _ImageRef:
    """One image spec -> ``_ImageRef``; ``root`` ends with a separator (or is empty)."""
    where = f"image[{k}]"
    if isinstance(entry, str):
        path, resize = entry, None
    elif isinstance(entry, dict):
        if "img_path" not in entry:
            if "patch" in entry:
                raise _Invalid(f"{where}: packed image entries ({{'patch': ...}}) are not supported; use img_path")
            raise _Invalid(f"{where}: an image dict needs an 'img_path' key, got keys {sorted(entry)}")
        path = entry["img_path"]
        if not isinstance(path, str):
            raise _Invalid(f"{where}: img_path must be a string, got {_type_name(path)}")
        try:
            resize = parse_resize(entry.get("resize"))
        except ValueError as e:
            raise _Invalid(f"{where}: {e}") from None
    else:
        raise _Invalid(
            f"{where}: expected a path string or {{'img_path': ..., 'resize': ...}}, got {_type_name(entry)}"
        )
    if not path.strip():
        raise _Invalid(f"{where}: empty image path")
    # Same as os.path.join(root, path) (absolute paths kept as they are), without its overhead.
    cell = entry.get("cell") if isinstance(entry, dict) else None
    if cell is not None and type(cell).__name__ != "Cell":
        raise _Invalid(f"{where}: 'cell' is viq's own reference to image bytes in a columnar file, got {_type_name(cell)}")
    return _ImageRef(path if os.path.isabs(path) else root + path, resize, cell)


def _parse_images(spec: Any, root: str) -> tuple[_ImageRef, ...]:
    if spec is None:
        return ()
    entries = spec if isinstance(spec, list) else [spec]
    return tuple(_parse_image_entry(e, k, root) for k, e in enumerate(entries))


def _parse_turns(record: dict[str, Any]) -> tuple[tuple[str, str], ...]:
    has_conv, has_msgs = "conversations" in record, "messages" in record
    if has_conv and has_msgs:
        raise _Invalid("record has both 'conversations' and 'messages'; use one")
    if not has_conv and not has_msgs:
        raise _Invalid("record has no 'conversations' (or 'messages')")
    key, role_key, text_key = ("conversations", "from", "value") if has_conv else ("messages", "role", "content")
    turns = record[key]
    if not isinstance(turns, list):
        raise _Invalid(f"'{key}' must be a list of turns, got {_type_name(turns)}")
    if not turns:
        raise _Invalid(f"empty '{key}'")

    out: list[tuple[str, str]] = []
    for k, turn in enumerate(turns):
        where = f"{key}[{k}]"
        if not isinstance(turn, dict):
            raise _Invalid(f"{where}: a turn must be an object with '{role_key}' and '{text_key}', got {_type_name(turn)}")
        if role_key not in turn or text_key not in turn:
            raise _Invalid(f"{where}: a turn needs '{role_key}' and '{text_key}', got keys {sorted(turn)}")
        raw_role, text = turn[role_key], turn[text_key]
        role = LLAVA_ROLES.get(raw_role) if isinstance(raw_role, str) else None
        if role is None:
            raise _Invalid(f"{where}: unknown role {raw_role!r} (expected one of {sorted(LLAVA_ROLES)})")
        if not isinstance(text, str):
            raise _Invalid(f"{where}: '{text_key}' must be a string, got {_type_name(text)}")
        if not text.strip():
            raise _Invalid(f"{where}: empty {role} turn")
        out.append((role, text))

    # Order: [system] user assistant (user assistant)* -- what chat templates and the official
    # round-wise label masking assume.
    start = 0
    if out[0][0] == "system":
        start = 1
    for k in range(start, len(out)):
        role = out[k][0]
        expected = "user" if (k - start) % 2 == 0 else "assistant"
        if role == "system":
            raise _Invalid(f"{key}[{k}]: a system turn is only allowed as the first turn")
        if role != expected:
            what = "the first non-system turn" if k == start else f"turns must alternate user/assistant; {key}[{k}]"
            raise _Invalid(f"{what} must be {expected}, got {role}")
    if len(out) == start:
        raise _Invalid(f"'{key}' has only a system turn")
    if out[-1][0] != "assistant":
        raise _Invalid(f"the last turn must be assistant (the supervised answer), got {out[-1][0]}")
    return tuple(out)


def parse_record(obj: Any, where: str, root: str) -> _Record:
    """Validate one JSON value; raises :class:`DataError` (with location) if it is invalid."""
    name = os.path.basename(where)
    if not isinstance(obj, dict):
        raise DataError(f"{where}: a record must be a JSON object, got {_type_name(obj)}")
    raw_id = obj.get("id")
    has_id = raw_id is not None
    if has_id and (isinstance(raw_id, bool) or not isinstance(raw_id, (str, int))):
        raise DataError(f"{where}: 'id' must be a string or an int, got {_type_name(raw_id)}")
    sample_id = str(raw_id) if has_id else name
    label = f"{where} (id={sample_id})" if has_id else where
    try:
        messages = _parse_turns(obj)
        images = _parse_images(obj.get("image"), root)
        n_placeholders = sum(text.count(IMAGE_TOKEN) for _, text in messages)
        if n_placeholders != len(images):
            raise _Invalid(
                f"{n_placeholders} '{IMAGE_TOKEN}' placeholder(s) in the text but {len(images)} image(s); "
                "they must match (one placeholder where each image goes)"
            )
    except _Invalid as e:
        raise DataError(f"{label}: {e}") from None
    return _Record(sample_id, has_id, where, messages, images)


# ----------------------------------------------------------------------------------------------
# file reading (yields (line, json value) or raises DataError)
# ----------------------------------------------------------------------------------------------


def _iter_jsonl(path: str) -> Iterator[tuple[int, Any]]:
    """``(line_number, value)`` per non-blank line; a bad line yields a :class:`DataError` value."""
    lineno = 0
    try:
        # utf-8-sig: tolerate a BOM written by some editors.
        with open(path, encoding="utf-8-sig") as f:
            for lineno, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    yield lineno, json.loads(line)
                except json.JSONDecodeError as e:
                    # A broken line only spoils itself: hand it back as a (skippable) error.
                    yield lineno, DataError(f"{path}:{lineno}: invalid JSON: {e.msg} (column {e.colno})")
    except UnicodeDecodeError as e:
        raise DataError(f"{path}:{lineno + 1}: not valid UTF-8 text ({e.reason})") from None


def _iter_json_list(path: str) -> Iterator[tuple[int, Any]]:
    """``(line_number, value)`` per element of the top-level list of a ``.json`` file.

    The list is decoded element by element with ``raw_decode`` so that every record knows the
    line it starts on (``json.load`` loses positions). A syntax error anywhere is raised: the
    rest of the list cannot be trusted.
    """
    try:
        with open(path, encoding="utf-8-sig") as f:
            text = f.read()
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not valid UTF-8 text ({e.reason} at byte {e.start})") from None
    decoder = json.JSONDecoder()
    n = len(text)
    counted_to, line = 0, 1

    def line_at(pos: int) -> int:
        # Positions only move forward: count newlines incrementally (O(file size) overall).
        nonlocal counted_to, line
        line += text.count("\n", counted_to, pos)
        counted_to = pos
        return line

    def skip_ws(pos: int) -> int:
        return _JSON_WS.match(text, pos).end()  # type: ignore[union-attr]  # always matches

    i = skip_ws(0)
    if i >= n:
        raise DataError(f"{path}: empty file (expected a JSON list of records)")
    if text[i] != "[":
        hint = " (one object per line? name the file .jsonl)" if text[i] == "{" else ""
        raise DataError(f"{path}:{line_at(i)}: the top level of a .json file must be a list of records{hint}")
    i = skip_ws(i + 1)
    if i < n and text[i] == "]":
        i = skip_ws(i + 1)
    else:
        while True:
            try:
                value, end = decoder.raw_decode(text, i)
            except json.JSONDecodeError as e:
                raise DataError(f"{path}:{e.lineno}: invalid JSON: {e.msg} (column {e.colno})") from None
            yield line_at(i), value
            i = skip_ws(end)
            if i < n and text[i] == ",":
                i = skip_ws(i + 1)  # a trailing comma then fails in raw_decode ("Expecting value")
                continue
            if i < n and text[i] == "]":
                i = skip_ws(i + 1)
                break
            at = line_at(min(i, n))
            raise DataError(f"{path}:{at}: invalid JSON: expected ',' or ']' after a record")
    if i < n:
        raise DataError(f"{path}:{line_at(i)}: invalid JSON: extra data after the top-level list")


def read_json_records(path: str | os.PathLike[str]) -> list[Any]:
    """The JSON values of a ``.jsonl`` (one per line) or ``.json`` (one list) data file, unvalidated:
    the file reading of :class:`LlavaDataset`, for callers that need the raw records (``viq eval-qa``
    reads their ``task`` / ``question`` / ``answer`` fields). Raises :class:`DataError` naming the file
    (and line) for a missing file, another extension, or invalid JSON."""
    path = os.fspath(path)
    ext = os.path.splitext(path)[1].lower()
    if ext not in (".json", ".jsonl"):
        raise DataError(f"{path}: expected a .jsonl or .json file of LLaVA records")
    if not os.path.isfile(path):
        raise DataError(f"{path}: data file not found" if not os.path.exists(path) else f"{path}: not a file")
    values = []
    for _, value in _iter_jsonl(path) if ext == ".jsonl" else _iter_json_list(path):
        if isinstance(value, DataError):
            raise value
        values.append(value)
    return values


# ----------------------------------------------------------------------------------------------
# the dataset
# ----------------------------------------------------------------------------------------------


def header_size(ref: _ImageRef | str) -> tuple[int, int] | str:
    """Upright ``(width, height)`` from the file header (no pixel decoding), or an error reason. ``ref``:
    a record's image, or a path."""
    if isinstance(ref, str):
        ref = _ImageRef(ref, None)
    try:
        if ref.cell is not None:
            import io

            from viq.data.columnar import read_cell

            source: Any = io.BytesIO(read_cell(ref.cell))
        else:
            source = ref.path
        with Image.open(source) as im:
            w, h = im.size
            # EXIF orientations 5..8 swap the sides (viq.formats.image applies them when decoding).
            # PNG's getexif() decodes the whole image when the eXIf chunk comes after the pixel
            # data, so only look at PNG EXIF that the header already contains.
            if (im.format != "PNG" or "exif" in im.info) and im.getexif().get(0x0112) in (5, 6, 7, 8):
                w, h = h, w
            return (w, h)
    except Exception as e:  # noqa: BLE001 - any header failure is reported, not raised from a thread
        return f"cannot read image header: {type(e).__name__}: {e}"


def load_record_image(ref: _ImageRef, preprocess: PreprocessConfig) -> torch.Tensor:
    """A record's image (a file, or bytes in a columnar file) -> float32 ``(3, H, W)`` in [-1, 1], sized
    by ``preprocess`` (give :meth:`LlavaDataset.image_config`: the record's own ``resize`` applies). The
    one way from a LLaVA record to pixels, for training, validation and ``viq eval-qa``.

    Raises:
        ImageError, OSError: the image cannot be read (messages start with ``ref.path``).
    """
    if ref.cell is None:
        return preprocess_image(ref.path, preprocess).pixels
    from viq.data.columnar import read_cell

    try:
        data = read_cell(ref.cell)
        return preprocess_image(data, preprocess).pixels
    except (ImageError, ValueError) as e:
        raise ImageError(f"{ref.path}: {str(e).removeprefix('<bytes>: ')}") from e


def record_image_config(ref: _ImageRef, preprocess: PreprocessConfig) -> PreprocessConfig:
    """How image ``ref`` is sized: ``preprocess``, or the record's own ``resize``."""
    return preprocess if ref.resize is None else dataclasses.replace(preprocess, resize=ref.resize)


class LlavaDataset(Dataset):
    """LLaVA-style conversations with images (module docstring: format, rules, errors).

    Args:
        path: a ``.json`` (list of records) or ``.jsonl`` (one record per line) file, or Parquet /
            Arrow data with a conversations column (:func:`viq.data.columnar.iter_records`).
        image_root: folder that relative image paths are resolved against; default: the folder
            of ``path``.
        preprocess: how images without an official ``"resize"`` are sized
            (:func:`viq.formats.image.preprocess`); its ``max_image_pixels``/``background`` also apply to
            officially resized images, and its ``patch_size`` to :meth:`approx_lengths`.
        on_error: ``"raise"`` (default): any invalid record or image raises :class:`DataError`.
            ``"skip"``: invalid records are dropped (``self.skipped``, one warning), and a sample
            whose image fails makes ``__getitem__`` return ``None`` (with a warning); use
            :func:`collate_samples`, which drops them.
        max_samples: keep only the first ``max_samples`` valid records (reading stops there).
        columns: columnar data only: ``conversations_column``, ``image_column``, ``id_column``
            (default ``conversations``, ``image``, ``id``).

    Attributes:
        path: the data file, as given.
        image_root: the resolved image root.
        skipped: ``[(where, reason), ...]`` for records dropped in skip mode.

    ``__getitem__(i)`` returns a :class:`Sample` (images decoded now), or ``None`` in skip mode if
    an image fails.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        image_root: str | os.PathLike[str] | None = None,
        preprocess: PreprocessConfig = PreprocessConfig(),
        on_error: str = "raise",
        max_samples: int | None = None,
        columns: dict[str, str | None] | None = None,
    ) -> None:
        if on_error not in ("raise", "skip"):
            raise ValueError(f"on_error must be 'raise' or 'skip', got {on_error!r}")
        if not isinstance(preprocess, PreprocessConfig):
            raise TypeError(f"preprocess must be a viq.formats.image.PreprocessConfig, got {type(preprocess).__name__}")
        if max_samples is not None and (
            isinstance(max_samples, bool) or not isinstance(max_samples, int) or max_samples < 1
        ):
            raise ValueError(f"max_samples must be a positive int or None, got {max_samples!r}")
        self.path = os.fspath(path)
        self.columns = dict(columns or {})
        self.image_root = os.fspath(image_root) if image_root is not None else os.path.dirname(self.path)
        self.preprocess = preprocess
        self.on_error = on_error
        self.max_samples = max_samples
        self.skipped: list[tuple[str, str]] = []
        self._lengths: list[int] | None = None
        self._records: list[_Record] = self._read()

    # -- reading -------------------------------------------------------------------------------

    def _read(self) -> list[_Record]:
        from viq.data.columnar import is_columnar_source, iter_records

        path = self.path
        ext = os.path.splitext(path)[1].lower()
        values: Iterator[tuple[int | str, Any]]
        if os.path.exists(path) and is_columnar_source(path):  # records from the rows of Parquet / Arrow data
            try:
                values = iter(list(iter_records(path, **self.columns)))
            except (ValueError, OSError) as e:
                raise DataError(f"{path}: {e}") from e
        elif ext not in (".json", ".jsonl"):
            raise DataError(f"{path}: unsupported data file extension {ext!r}: expected .json, .jsonl, "
                            ".parquet, .arrow or a folder of Parquet / saved datasets files")
        elif not os.path.isfile(path):
            raise DataError(f"{path}: data file not found" if not os.path.exists(path) else f"{path}: not a file")
        else:
            values = _iter_jsonl(path) if ext == ".jsonl" else _iter_json_list(path)

        root = os.path.join(self.image_root, "")  # "" -> "", "dir" -> "dir/"
        records: list[_Record] = []
        total = 0
        for line, value in values:
            total += 1
            where = line if isinstance(line, str) else f"{path}:{line}"  # columnar rows say "<file>#row<n>"
            try:
                if isinstance(value, DataError):
                    raise value
                records.append(parse_record(value, where, root))
            except DataError as e:
                if self.on_error == "raise":
                    raise
                self.skipped.append((where, str(e)))
                continue
            if self.max_samples is not None and len(records) >= self.max_samples:
                break

        if self.skipped:
            shown = "; ".join(reason for _, reason in self.skipped[:_MAX_REASONS_LOGGED])
            more = len(self.skipped) - _MAX_REASONS_LOGGED
            logger.warning(
                "%s: skipped %d invalid record(s) of %d (see dataset.skipped): %s%s",
                path, len(self.skipped), total, shown, f"; ... and {more} more" if more > 0 else "",
            )
        if not records:
            if self.skipped:
                raise DataError(f"{path}: all {total} record(s) are invalid; first: {self.skipped[0][1]}")
            raise DataError(f"{path}: no records")
        return records

    # -- access --------------------------------------------------------------------------------

    def __len__(self) -> int:
        return len(self._records)

    def _load_pixels(self, ref: _ImageRef) -> torch.Tensor:
        """Decode one image -> float32 ``(3, H, W)`` in [-1, 1]. Raises ImageError."""
        return load_record_image(ref, self.image_config(ref))

    def image_config(self, ref: _ImageRef) -> PreprocessConfig:
        """How image ``ref`` is sized: the dataset's preprocessing, or the record's own ``resize``."""
        return record_image_config(ref, self.preprocess)

    def __getitem__(self, index: int) -> Sample | None:
        i = operator.index(index)  # accepts numpy / torch integer indices from samplers
        n = len(self._records)
        if not -n <= i < n:
            raise IndexError(f"index {i} out of range for a dataset of {n} samples")
        i %= n
        rec = self._records[i]
        images: list[torch.Tensor] = []
        for k, ref in enumerate(rec.images):
            try:
                images.append(self._load_pixels(ref))
            except (ImageError, OSError) as e:
                msg = f"{rec.label}: image {k + 1} of {len(rec.images)} ({ref.path}): {_reason(e, ref.path)}"
                if self.on_error == "skip":
                    logger.warning("skipping sample %d: %s", i, msg)
                    return None
                raise DataError(msg) from e
        return Sample(
            id=rec.id,
            messages=[{"role": role, "content": text} for role, text in rec.messages],
            images=images,
            where=rec.where,
            index=i,
        )

    def drop(self, indices: Sequence[int], reason: str) -> None:
        """Remove the samples at ``indices`` (listed in ``skipped`` with ``reason``)."""
        gone = set(indices)
        self.skipped.extend((self._records[i].where, f"{self._records[i].label}: {reason}") for i in sorted(gone))
        self._records = [r for i, r in enumerate(self._records) if i not in gone]
        self._lengths = None
        if not self._records:
            raise DataError(f"{self.path}: no sample left ({len(gone)} dropped: {reason})")

    def image_paths(self, index: int) -> list[str]:
        """The resolved image paths of sample ``index`` (no decoding)."""
        return [ref.path for ref in self._records[operator.index(index)].images]

    def record(self, index: int) -> _Record:
        """Sample ``index`` as parsed, without decoding its images: ``id``, ``where``
        (``"<file>:<line>"``), ``label`` (for error messages), ``messages`` (``(role, text)`` pairs)."""
        return self._records[operator.index(index)]

    # -- lengths for length-grouped sampling ---------------------------------------------------

    def approx_lengths(self, num_threads: int = 8) -> list[int]:
        """Per-sample cost estimate for length-grouped batching (computed once, then cached).

        ``cost = (characters of text, placeholders excluded) // 3 + sum of image patch tokens``,
        where an image's tokens are its patch grid ``ceil(H'/p) * ceil(W'/p)`` (``p`` =
        ``preprocess.patch_size``) at the size it will be resized to (official ``resize`` or
        ``preprocess``), from the image *header* only (``PIL.Image.open``, no decoding; EXIF
        orientation respected). Headers are read once per distinct path, ``num_threads`` at a
        time (I/O bound; helps on network file systems).

        An unreadable header raises :class:`DataError` (naming the sample and the image) with
        ``on_error="raise"``; in skip mode that image counts 0 tokens (one summary warning), and
        the sample itself fails later in ``__getitem__``.
        """
        if self._lengths is not None:
            return list(self._lengths)
        refs = list({ref.path: ref for rec in self._records for ref in rec.images}.values())
        if len(refs) > 1 and num_threads > 1:
            with ThreadPoolExecutor(max_workers=min(num_threads, len(refs))) as pool:
                sizes = dict(zip((r.path for r in refs), pool.map(header_size, refs)))
        else:
            sizes = {r.path: header_size(r) for r in refs}

        p = self.preprocess.patch_size
        lengths: list[int] = []
        failed: list[str] = []
        for rec in self._records:
            chars = sum(len(text) - text.count(IMAGE_TOKEN) * len(IMAGE_TOKEN) for _, text in rec.messages)
            tokens = 0
            for k, ref in enumerate(rec.images):
                size = sizes[ref.path]
                if isinstance(size, str):
                    msg = f"{rec.label}: image {k + 1} of {len(rec.images)} ({ref.path}): {size}"
                    if self.on_error == "raise":
                        raise DataError(msg)
                    failed.append(msg)
                    continue
                w, h = target_size(*size, self.image_config(ref))
                gh, gw = padded_grid(h, w, p)
                tokens += gh * gw
            lengths.append(chars // 3 + tokens)
        if failed:
            logger.warning(
                "%s: approx_lengths: %d image header(s) unreadable, counted as 0 tokens; first: %s",
                self.path, len(failed), failed[0],
            )
        self._lengths = lengths
        return list(lengths)

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}({self.path!r}, samples={len(self)}, skipped={len(self.skipped)}, "
            f"on_error={self.on_error!r})"
        )
