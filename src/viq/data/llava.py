"""LLaVA-style multimodal conversation data for training ViQ together with an LLM: :class:`LlavaDataset`.

The file format and its validation are :mod:`viq.data.records` (every malformed record is an error
naming the file, the line and the problem). Here: the dataset over those records, and the one way
from a record's image to pixels (:func:`load_record_image`: the record's own ``"resize"``, else the
dataset's :class:`~viq.formats.image.PreprocessConfig`), shared by training, validation, ``viq
eval-qa`` and extraction.

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
import logging
import operator
import os
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import torch
from PIL import Image
from torch.utils.data import Dataset

from viq.data.columnar import is_columnar_source, iter_records, read_cell
from viq.data.records import (
    DataError,
    ImageRef,
    Record,
    iter_json_list,
    iter_jsonl,
    parse_record,
    read_json_records,
)
from viq.formats.image import (
    ImageError,
    PreprocessConfig,
    padded_grid,
    target_size,
)
from viq.formats.image import preprocess as preprocess_image
from viq.formats.resize import OfficialResize, parse_resize
from viq.mllm.chat import IMAGE_TOKEN

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


# ----------------------------------------------------------------------------------------------
# file reading (yields (line, json value) or raises DataError)
# ----------------------------------------------------------------------------------------------


# ----------------------------------------------------------------------------------------------
# the dataset
# ----------------------------------------------------------------------------------------------


def header_size(ref: ImageRef | str) -> tuple[int, int] | str:
    """Upright ``(width, height)`` from the file header (no pixel decoding), or an error reason. ``ref``:
    a record's image, or a path."""
    if isinstance(ref, str):
        ref = ImageRef(ref, None)
    try:
        if ref.cell is not None:
            import io

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


def load_record_image(ref: ImageRef, preprocess: PreprocessConfig) -> torch.Tensor:
    """A record's image (a file, or bytes in a columnar file) -> float32 ``(3, H, W)`` in [-1, 1], sized
    by the record's own ``resize`` when it has one, else by ``preprocess`` (:func:`record_image_config`).
    The one way from a LLaVA record to pixels, for training, validation and ``viq eval-qa``.

    Raises:
        ImageError, OSError: the image cannot be read (messages start with ``ref.path``).
    """
    preprocess = record_image_config(ref, preprocess)
    if ref.cell is None:
        return preprocess_image(ref.path, preprocess).pixels

    try:
        data = read_cell(ref.cell)
        return preprocess_image(data, preprocess).pixels
    except (ImageError, ValueError) as e:
        raise ImageError(f"{ref.path}: {str(e).removeprefix('<bytes>: ')}") from e


def record_image_config(ref: ImageRef, preprocess: PreprocessConfig) -> PreprocessConfig:
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
        self._records: list[Record] = self._read()

    # -- reading -------------------------------------------------------------------------------

    def _read(self) -> list[Record]:

        path = self.path
        ext = os.path.splitext(path)[1].lower()
        values: Iterator[tuple[int | str, Any]]
        if os.path.exists(path) and is_columnar_source(path):  # records from the rows of Parquet / Arrow data
            try:
                values = iter(list(iter_records(path, **self.columns)))
            except (ValueError, OSError) as e:
                raise DataError(f"{path}: {e}") from e
        elif ext not in (".json", ".jsonl"):
            raise DataError(
                f"{path}: unsupported data file extension {ext!r}: expected .json, .jsonl, "
                ".parquet, .arrow or a folder of Parquet / saved datasets files"
            )
        elif not os.path.isfile(path):
            raise DataError(f"{path}: data file not found" if not os.path.exists(path) else f"{path}: not a file")
        else:
            values = iter_jsonl(path) if ext == ".jsonl" else iter_json_list(path)

        root = os.path.join(self.image_root, "")  # "" -> "", "dir" -> "dir/"
        records: list[Record] = []
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
                path,
                len(self.skipped),
                total,
                shown,
                f"; ... and {more} more" if more > 0 else "",
            )
        if not records:
            if self.skipped:
                raise DataError(f"{path}: all {total} record(s) are invalid; first: {self.skipped[0][1]}")
            raise DataError(f"{path}: no records")
        return records

    # -- access --------------------------------------------------------------------------------

    def __len__(self) -> int:
        return len(self._records)

    def _load_pixels(self, ref: ImageRef) -> torch.Tensor:
        """Decode one image -> float32 ``(3, H, W)`` in [-1, 1]. Raises ImageError."""
        return load_record_image(ref, self.preprocess)

    def image_config(self, ref: ImageRef) -> PreprocessConfig:
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

    def record(self, index: int) -> Record:
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
                self.path,
                len(failed),
                failed[0],
            )
        self._lengths = lengths
        return list(lengths)

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}({self.path!r}, samples={len(self)}, skipped={len(self.skipped)}, "
            f"on_error={self.on_error!r})"
        )
