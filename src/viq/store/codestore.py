"""Code store: the codes of millions of images in append-only shards, for LLM training.

Codes are extracted once, offline, by many processes (one per GPU, resumable), and read many
times by training. A store is a directory that any number of :class:`ShardWriter` s append to
concurrently without locks (each writer owns the files that carry its name), and that readers
open memory-mapped for random access by sample id.

Layout (format version 1)
=========================

::

    <store>/
      store.json                       the store's configuration (written once, by create)
      shards/
        <writer>-<seq>.bin             a finalised shard: records, immutable once visible
        <writer>-<seq>.idx.json        its index; its presence is what makes the shard visible
        <writer>-<seq>.bin.tmp         in progress / left by a killed writer (ignored by readers)
        <writer>-<seq>.idx.json.tmp    idem

``<writer>`` is the writer name (``[A-Za-z0-9][A-Za-z0-9._-]*``, e.g. ``rank0``) and ``<seq>``
the writer's shard number, ``0, 1, 2, ...`` zero-padded to at least 6 digits.

``store.json`` is a UTF-8 JSON object::

    {"format": "viq-code-store", "format_version": 1,
     "levels": [8, 8, 8, 6, 5], "codebook_size": 15360, "bits_per_code": 14,
     "codes_per_patch": 4, "patch_size": 16, "model_fingerprint": "0123456789abcdef",
     "entropy_coding": false, "codec": "packed", "shard_bytes": 268435456}

``codebook_size`` and ``bits_per_code`` are derived (``K = prod(levels)``,
``B = max(1, ceil(log2 K))``, see :func:`viq.formats.codes.bits_for_levels`) and are checked on open.
``codec`` is ``"packed"`` or ``"lzma"`` and always agrees with ``entropy_coding``.
``shard_bytes`` is the size at which writers roll over to a new shard.

Shard file ``<writer>-<seq>.bin``: an 8-byte header -- magic ``b"VIQS"``, u16 format version
(1), u16 flags (bit 0 = entropy coded, other bits 0), little-endian -- followed by the records
of its samples, back to back in index order with no gaps: record ``i`` starts at
``offset[i]`` (the first at 8) and the last ends at the end of the file. A record is the codes
of one image in the official flat order ``C * (y * w + x) + j`` (see :mod:`viq.formats.codes`) and
nothing else: the grid, image size, etc. live in the index. With ``N = h * w * C`` codes:

* ``entropy_coding=False``: exactly ``ceil(N * B / 8)`` bytes, the codes bit-packed at ``B``
  bits each, LSB-first, by :func:`viq.formats.codes.pack_bits` (unused high bits of the last byte are 0),
  i.e. the payload of a ``.viq`` file. 64k levels (B = 16) with 4 codes per 16x16 patch cost
  ``4 * 16 / 256 = 0.25`` bits per (padded) pixel; see the table in ``docs/formats.md``.
* ``entropy_coding=True``: one tag byte, then either (tag 0) the packed bytes as above or
  (tag 1) the codes as little-endian unsigned integers of ``ceil(B / 8)`` bytes each
  (``uint16`` for every ViQ level set), compressed as a raw LZMA2 stream (``lzma.FORMAT_RAW``,
  no container) with exactly the filter :data:`LZMA_FILTERS` (preset 6, 1 MiB dictionary,
  ``lc=0, lp=1, pb=1``, the settings for 2-byte aligned data). Writers emit tag 1 only when it
  is smaller than the packed bytes, so entropy coding never costs more than one byte a record.

Index ``<writer>-<seq>.idx.json``: a UTF-8 JSON object::

    {"format": "viq-code-store-shard", "format_version": 1, "writer": "rank0", "seq": 3,
     "shard": "rank0-000003.bin", "shard_size": 123456, "sha256": "<hex digest of the .bin>",
     "levels": [...], "codes_per_patch": 4, "patch_size": 16, "bits_per_code": 14,
     "model_fingerprint": "...", "entropy_coding": false, "count": 2,
     "records": {"id": ["a", "b"], "source": ["/data/a.jpg", ""],
                 "content_hash": ["<sha256 hex of the image file bytes>", ""],
                 "grid": [[64, 48], [1, 1]], "image_size": [[1024, 768], null],
                 "offset": [8, 21512], "length": [21504, 7], "crc32": [123, 456]}}

``records`` is column-major (one list per field, all ``count`` long) because that parses far
faster than a list of objects. ``grid`` is ``(h, w)`` in patches, ``image_size``
``(height, width)`` in pixels before padding or ``null`` when unknown, ``crc32`` the
``zlib.crc32`` of the record bytes (checked on every :meth:`CodeStore.get`), ``sha256`` the
digest of the whole ``.bin`` file (checked by :meth:`CodeStore.verify`).

Durability protocol
===================

A writer appends records to ``<name>-<seq>.bin.tmp``. :meth:`ShardWriter.flush` (also called
when the next record would push the shard past ``shard_bytes``) writes the index to
``<name>-<seq>.idx.json.tmp``, fsyncs both files, renames the shard to ``.bin``, then the
index to ``.idx.json``, then fsyncs the directory. Readers only look at ``.idx.json`` files, so
a shard becomes visible atomically, complete and durable, or not at all:

* what a killed process had not flushed is lost and is simply re-done by the re-run
  (``if sample_id in store: continue``);
* a ``.tmp`` file, or a ``.bin`` without its index (a crash between the two renames), is
  ignored by readers and deleted by the next writer *with the same name*, which continues
  numbering after the last finalised shard;
* an index whose ``.bin`` is missing means real damage: readers skip that shard with a
  warning and :meth:`CodeStore.verify` reports it.

Two writers must never use the same name at the same time (there are no locks); a writer name
per rank/worker (``rank0``, ``rank1``, ...) is the intended use. The store's index is the union
of all finalised shard indexes, cached in memory on open; :meth:`CodeStore.refresh` picks up
shards finalised since. If two shards claim the same sample id, the first in shard order
(writer name, then seq) wins for :meth:`CodeStore.get`, iteration and ``len``, and
:meth:`CodeStore.verify` reports the duplicate.

Entropy coding: measured
========================

Bits per code of the stored records (tag byte included), per-record compression (what random
access needs), 16k levels (B = 14), 1024x1024 images (N = 16384 codes a record); "source" is the
entropy of the distribution the codes were drawn from (the limit for a context-free coder)::

    codes                                source   zlib-9  zlib-9  lzma    lzma uint16 with packed
                                         entropy  packed  uint16  packed  fallback (the store's)
    uniform over K (a trained FSQ
      tokenizer's codes are close)       13.9     14.00   15.16   14.00   14.00 (fallback)
    Zipf(1.1) over K                      8.6     12.88   12.05   12.63   10.83
    16 distinct codes                     4.0      7.02    5.79    6.33    4.74
    4x4-patch blocks of equal codes       0.9      1.12    1.20    1.01    1.03

With 256x256 images (1024 codes a record) the store reaches 14.01 / 12.57 / 6.61 / 1.40.
LZMA on byte-aligned codes beats zlib, and beats compressing the bit-packed bytes whenever the
gain comes from a skewed code distribution (a byte-oriented coder cannot model 14-bit symbols
that straddle byte boundaries); ``preset 9 | PRESET_EXTREME`` gained < 0.1 bit/code over
preset 6 at 5-8x the time, and a 64 MiB dictionary is useless for ~30 KB records. Cost on one
core for a 1024x1024 image: ~10 ms to compress (vs ~1 ms to bit-pack) and ~1-2 ms to
decompress (vs ~0.5 ms). For codes of a trained tokenizer (near-uniform usage) expect little
or no gain; :meth:`CodeStore.stats` reports the reached bits per pixel and per code next to
the codes' entropy, so you can decide per data set.
"""

from __future__ import annotations

import collections
import dataclasses
import hashlib
import json
import logging
import lzma
import math
import mmap
import os
import re
import struct
import sys
import zlib
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, Union

import numpy as np
import torch
import torch.utils.data

from viq._io import create_exclusive, fsync_dir
from viq.formats.bits import bits_for_levels, pack_bits, unpack_bits, usage_stats
from viq.formats.codes import Codes

__all__ = [
    "LZMA_FILTERS",
    "CodeDataset",
    "CodeStore",
    "IndexEntry",
    "ShardWriter",
    "StoreError",
    "VerifyReport",
    "file_sha256",
    "plot_stats",
    "stats_main",
    "verify_main",
]

log = logging.getLogger(__name__)

PathLike = Union[str, "os.PathLike[str]"]

STORE_FORMAT = "viq-code-store"
SHARD_INDEX_FORMAT = "viq-code-store-shard"
FORMAT_VERSION = 1
STORE_FILE = "store.json"
SHARD_DIR = "shards"
SHARD_MAGIC = b"VIQS"
_SHARD_HEADER = struct.Struct("<4sHH")  # magic, version, flags
SHARD_HEADER_SIZE = _SHARD_HEADER.size  # 8: offset of the first record
_FLAG_ENTROPY = 1

#: The LZMA2 filter chain of entropy-coded records (part of format version 1: never change it).
#: lp=1/pb=1 align the literal/position contexts to the 2-byte code units; lc=0 because the
#: previous byte (the other half of a code) says little about the next.
LZMA_FILTERS: tuple[dict[str, int], ...] = (
    {"id": lzma.FILTER_LZMA2, "preset": 6, "dict_size": 1 << 20, "lc": 0, "lp": 1, "pb": 1},
)
_TAG_PACKED = 0
_TAG_LZMA = 1

_WRITER_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
# Greedy name, so "a-b-000001.bin" is writer "a-b", seq 1.
_SHARD_FILE = re.compile(r"(?P<writer>.+)-(?P<seq>\d{6,})\.bin")
_INDEX_FILE = re.compile(r"(?P<writer>.+)-(?P<seq>\d{6,})\.idx\.json")
_TMP_SUFFIX = ".tmp"
_HEX64 = re.compile(r"[0-9a-f]{64}")

# Memory-mapped shards kept open per process. Each mapping holds a file descriptor, and a
# store can have thousands of shards, so the cache is LRU-bounded well below common fd limits.
_MAX_OPEN_SHARDS = 64
# Report at most this many per-record problems per shard (a corrupt shard could yield 10^4).
_MAX_PROBLEMS_PER_SHARD = 20
# Codes gathered before one np.bincount in stats(): amortises the K-bin allocation.
_HIST_BATCH = 1 << 22


class StoreError(Exception):
    """A code store is missing, corrupt, incompatible or misused.

    Attributes:
        path: the store directory or the file the problem is about.
        problem: human-readable description of what is wrong.
    """

    def __init__(self, path: PathLike, problem: str) -> None:
        super().__init__(f"{os.fspath(path)}: {problem}")
        self.path = os.fspath(path)
        self.problem = problem

    def __reduce__(self):  # picklable across DataLoader workers despite the custom __init__
        return (type(self), (self.path, self.problem))


@dataclasses.dataclass(frozen=True)
class IndexEntry:
    """Where and what one stored sample is.

    Attributes:
        sample_id: the id given to :meth:`ShardWriter.add`.
        source: free-form source (usually the image path), ``""`` if not given.
        content_hash: sha256 hex digest of the image file bytes, ``""`` if not given.
        grid: ``(h, w)`` patch grid.
        image_size: ``(height, width)`` in pixels before padding, or ``None`` if unknown.
        shard: shard file name inside ``shards/`` (e.g. ``"rank0-000003.bin"``).
        offset: byte offset of the record in the shard file.
        length: record length in bytes (the stored payload of this image).
        crc32: ``zlib.crc32`` of the record bytes.
        model_fingerprint: id of the code space (:meth:`viq.ViQModel.fingerprint`).
        levels: FSQ levels.
        codes_per_patch: codes per patch.
        patch_size: patch side in pixels.
    """

    sample_id: str
    source: str
    content_hash: str
    grid: tuple[int, int]
    image_size: tuple[int, int] | None
    shard: str
    offset: int
    length: int
    crc32: int
    model_fingerprint: str
    levels: tuple[int, ...]
    codes_per_patch: int
    patch_size: int

    @property
    def num_codes(self) -> int:
        """``h * w * codes_per_patch``."""
        return self.grid[0] * self.grid[1] * self.codes_per_patch


@dataclasses.dataclass
class VerifyReport:
    """Result of :meth:`CodeStore.verify`.

    Attributes:
        path: the store directory.
        shards: number of shard indexes checked.
        records: number of records checked.
        problems: everything that is wrong (empty for a sound store).
        notes: harmless findings, e.g. temporary files of a killed writer awaiting clean-up.
        duplicate_ids: sample id -> the shard files that claim it (only ids claimed twice+).
    """

    path: str
    shards: int = 0
    records: int = 0
    problems: list[str] = dataclasses.field(default_factory=list)
    notes: list[str] = dataclasses.field(default_factory=list)
    duplicate_ids: dict[str, list[str]] = dataclasses.field(default_factory=dict)

    @property
    def ok(self) -> bool:
        """True when no problem was found (notes do not count)."""
        return not self.problems

    def summary(self) -> str:
        """Multi-line human-readable summary."""
        head = f"{self.path}: {self.shards} shard(s), {self.records} record(s): "
        head += "OK" if self.ok else f"{len(self.problems)} problem(s)"
        lines = [head]
        lines += [f"  problem: {p}" for p in self.problems]
        lines += [f"  note: {n}" for n in self.notes]
        return "\n".join(lines)


# --------------------------------------------------------------------------------------
# Record encoding
# --------------------------------------------------------------------------------------


def _aligned_dtype(bits: int) -> np.dtype:
    """Smallest little-endian unsigned dtype holding a ``bits``-bit code."""
    return np.dtype("<u1" if bits <= 8 else "<u2" if bits <= 16 else "<u4")


def _encode_record(values: np.ndarray, bits: int, entropy_coding: bool) -> bytes:
    """Codes ``(N,)`` int32 in ``[0, 2**bits)`` -> record bytes (see the module docstring)."""
    packed = pack_bits(values, bits)
    if not entropy_coding:
        return packed
    aligned = values.astype(_aligned_dtype(bits)).tobytes()
    compressed = lzma.compress(aligned, format=lzma.FORMAT_RAW, filters=list(LZMA_FILTERS))
    if len(compressed) < len(packed):
        return bytes((_TAG_LZMA,)) + compressed
    return bytes((_TAG_PACKED,)) + packed


def _decode_record(data: bytes, num_codes: int, bits: int, k: int, entropy_coding: bool) -> np.ndarray:
    """Record bytes -> ``(num_codes,)`` uint32 codes, validated (length, padding, every code < K).

    Raises:
        ValueError: describing what is wrong with the record.
    """
    packed_len = (num_codes * bits + 7) // 8
    tag = _TAG_PACKED
    body = data
    if entropy_coding:
        if not data:
            raise ValueError("empty record (missing codec tag byte)")
        tag, body = data[0], data[1:]
    if tag == _TAG_PACKED:
        if len(body) != packed_len:
            raise ValueError(f"packed payload is {len(body)} bytes, {num_codes} codes of {bits} bits need {packed_len}")
        tail_bits = (num_codes * bits) % 8
        if tail_bits and body[-1] >> tail_bits:
            raise ValueError("non-zero padding bits after the last code")
        values = unpack_bits(body, bits, num_codes)
    elif tag == _TAG_LZMA:
        dtype = _aligned_dtype(bits)
        want = num_codes * dtype.itemsize
        dec = lzma.LZMADecompressor(format=lzma.FORMAT_RAW, filters=list(LZMA_FILTERS))
        try:
            # max_length bounds the output, so a corrupt stream cannot balloon memory.
            raw = dec.decompress(body, max_length=want + 1)
        except lzma.LZMAError as exc:
            raise ValueError(f"corrupt LZMA stream: {exc}") from None
        if len(raw) != want or not dec.eof or dec.unused_data:
            raise ValueError(f"LZMA stream does not decode to exactly {num_codes} codes ({want} bytes)")
        values = np.frombuffer(raw, dtype=dtype).astype(np.uint32)
    else:
        raise ValueError(f"unknown codec tag {tag}")
    if num_codes:
        top = int(values.max())
        if top >= k:
            bad = int(np.count_nonzero(values >= k))
            raise ValueError(f"{bad} code(s) out of range: max code {top} >= codebook size {k}")
    return values


# --------------------------------------------------------------------------------------
# Small file helpers
# --------------------------------------------------------------------------------------


def _json_bytes(obj: Any) -> bytes:
    return json.dumps(obj, ensure_ascii=False, separators=(",", ":"), allow_nan=False).encode("utf-8")


def file_sha256(path: PathLike, chunk_bytes: int = 1 << 20) -> str:
    """sha256 hex digest of a file's bytes: the ``content_hash`` of an image file."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(chunk_bytes):
            h.update(chunk)
    return h.hexdigest()


# --------------------------------------------------------------------------------------
# Loaded shard index
# --------------------------------------------------------------------------------------


@dataclasses.dataclass
class _Shard:
    """One finalised shard's index, parsed into compact columns (row ``i`` = record ``i``)."""

    writer: str
    seq: int
    name: str  # "<writer>-<seq>.bin"
    index_name: str  # "<writer>-<seq>.idx.json"
    stat_key: tuple[int, int]  # (mtime_ns, size) of the index file, to skip re-parsing
    size: int  # recorded shard file size in bytes
    sha256: str
    ids: list[str]
    sources: list[str]
    hashes: list[str]
    grids: np.ndarray  # (n, 2) int64
    image_sizes: np.ndarray  # (n, 2) int64, (0, 0) = unknown
    offsets: np.ndarray  # (n,) int64
    lengths: np.ndarray  # (n,) int64
    crcs: np.ndarray  # (n,) int64

    def __len__(self) -> int:
        return len(self.ids)


def _int_matrix(values: Any, rows: int, what: str, *, allow_null: bool = False) -> np.ndarray:
    if not isinstance(values, list) or len(values) != rows:
        raise ValueError(f"records.{what} must be a list of {rows} items")
    out = np.zeros((rows, 2), dtype=np.int64)
    for i, v in enumerate(values):
        if v is None and allow_null:
            continue
        if (
            not isinstance(v, list)
            or len(v) != 2
            or not all(isinstance(x, int) and not isinstance(x, bool) and 1 <= x < 2**32 for x in v)
        ):
            raise ValueError(f"records.{what}[{i}] must be a pair of positive integers, got {v!r}")
        out[i] = v
    return out


def _int_vector(values: Any, rows: int, what: str, hi: int) -> np.ndarray:
    if not isinstance(values, list) or len(values) != rows:
        raise ValueError(f"records.{what} must be a list of {rows} items")
    if not all(isinstance(v, int) and not isinstance(v, bool) and 0 <= v < hi for v in values):
        raise ValueError(f"records.{what} must hold integers in [0, {hi})")
    return np.asarray(values, dtype=np.int64).reshape(rows)


def _str_list(values: Any, rows: int, what: str) -> list[str]:
    if not isinstance(values, list) or len(values) != rows or not all(isinstance(v, str) for v in values):
        raise ValueError(f"records.{what} must be a list of {rows} strings")
    return values


# --------------------------------------------------------------------------------------
# CodeStore
# --------------------------------------------------------------------------------------


class CodeStore:
    """A directory of append-only shards plus an index (layout: see the module docstring).

    Reading is memory-mapped random access by sample id (:meth:`get`) or sequential
    iteration in index order. Writing goes through :meth:`writer`, one :class:`ShardWriter`
    per process. Instances are picklable (open memory maps are not carried along; each
    process maps shards lazily), so a store can be handed to ``DataLoader`` workers.

    Use :meth:`create` or :meth:`open`, not the constructor.
    """

    def __init__(self, path: Path, config: dict[str, Any], mode: str) -> None:
        self._path = path
        self._config = config
        self._mode = mode
        self._levels: tuple[int, ...] = tuple(config["levels"])
        self._k = math.prod(self._levels)
        self._bits = int(config["bits_per_code"])
        self._cpp = int(config["codes_per_patch"])
        self._patch = int(config["patch_size"])
        self._fingerprint = str(config["model_fingerprint"])
        self._entropy = bool(config["entropy_coding"])
        self._shard_bytes = int(config["shard_bytes"])
        self._shards: list[_Shard] = []
        self._parsed: dict[str, _Shard] = {}  # index file name -> parsed (reused by refresh)
        self._by_id: dict[str, tuple[int, int]] = {}  # id -> (shard number, row), first claim wins
        self._order: list[str] = []  # unique ids in index order
        self._by_hash: dict[str, str] = {}  # content hash -> first sample id
        self._problems: list[str] = []  # index-level problems found while loading
        self._maps: collections.OrderedDict[str, mmap.mmap] = collections.OrderedDict()
        self._maps_pid = os.getpid()
        self.refresh()

    # ---- construction ---------------------------------------------------------------------

    @classmethod
    def create(
        cls,
        path: PathLike,
        *,
        levels: Sequence[int],
        codes_per_patch: int = 4,
        patch_size: int = 16,
        model_fingerprint: str,
        entropy_coding: bool = False,
        shard_bytes: int = 256 << 20,
        exist_ok: bool = True,
    ) -> CodeStore:
        """Create a store (or, with ``exist_ok``, open an identical existing one) for appending.

        Every rank of an extraction job can call this with the same arguments: exactly one
        creates ``store.json`` (atomically), the others open it. An existing store with a
        different configuration (levels, codes_per_patch, patch_size, model fingerprint,
        entropy coding) is refused with :class:`StoreError`; a different ``shard_bytes`` is only
        logged (the stored value wins).

        Args:
            path: store directory; created if missing, and must otherwise be empty or a store.
            levels: FSQ levels of the codes, e.g. ``(8, 8, 8, 6, 5)``.
            codes_per_patch: codes per patch (4 for ViQ).
            patch_size: patch side in pixels (16 for ViQ).
            model_fingerprint: :meth:`viq.ViQModel.fingerprint` of the encoder; codes from
                another model are refused.
            entropy_coding: LZMA-compress each record (see the module docstring).
            shard_bytes: roll over to a new shard when a shard would exceed this many bytes.
            exist_ok: if False, an existing store is an error.

        Raises:
            StoreError: existing incompatible store, non-empty non-store directory, or
                ``exist_ok=False`` with an existing store.
            ValueError: invalid arguments.
        """
        path = Path(path)
        lv = tuple(int(v) for v in levels)
        bits = bits_for_levels(lv)  # validates the levels
        for name, value in (("codes_per_patch", codes_per_patch), ("patch_size", patch_size)):
            if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= 0xFFFF:
                raise ValueError(f"{name} must be an integer in [1, 65535], got {value!r}")
        if not isinstance(model_fingerprint, str) or not model_fingerprint:
            raise ValueError(f"model_fingerprint must be a non-empty string, got {model_fingerprint!r}")
        if isinstance(shard_bytes, bool) or not isinstance(shard_bytes, int) or shard_bytes < 1:
            raise ValueError(f"shard_bytes must be a positive integer, got {shard_bytes!r}")
        config = {
            "format": STORE_FORMAT,
            "format_version": FORMAT_VERSION,
            "levels": list(lv),
            "codebook_size": math.prod(lv),
            "bits_per_code": bits,
            "codes_per_patch": codes_per_patch,
            "patch_size": patch_size,
            "model_fingerprint": model_fingerprint,
            "entropy_coding": bool(entropy_coding),
            "codec": "lzma" if entropy_coding else "packed",
            "shard_bytes": shard_bytes,
        }
        store_file = path / STORE_FILE
        if not store_file.exists():
            if path.exists() and not path.is_dir():
                raise StoreError(path, "exists and is not a directory")
            path.mkdir(parents=True, exist_ok=True)
            # Refuse to scatter store files into e.g. an image folder given by mistake.
            strangers = sorted(
                e.name for e in os.scandir(path) if e.name != SHARD_DIR and not e.name.startswith(f".{STORE_FILE}.")
            )
            if strangers and not store_file.exists():
                raise StoreError(path, f"not empty and not a code store (contains {', '.join(strangers[:5])})")
            # shards/ first, so that any visible store.json comes with its shard directory.
            (path / SHARD_DIR).mkdir(exist_ok=True)
            if create_exclusive(store_file, _json_bytes(config) + b"\n"):
                log.info("created code store %s (levels %s, %s)", path, lv, config["codec"])
                return cls(path, config, "a")
        if not exist_ok:
            raise StoreError(path, "a code store already exists here")
        store = cls.open(path, "a")
        diffs = [
            f"{key} {store._config[key]!r} (requested {config[key]!r})"
            for key in ("levels", "codes_per_patch", "patch_size", "model_fingerprint", "entropy_coding")
            if store._config[key] != config[key]
        ]
        if diffs:
            raise StoreError(path, "existing code store is incompatible: it has " + ", ".join(diffs))
        if store._shard_bytes != shard_bytes:
            log.warning("%s: keeping the store's shard_bytes %d (requested %d)", path, store._shard_bytes, shard_bytes)
        return store

    @classmethod
    def open(cls, path: PathLike, mode: str = "r") -> CodeStore:
        """Open an existing store: ``mode="r"`` to read, ``"a"`` to also append (:meth:`writer`).

        Problems in individual shard indexes do not prevent opening: such shards are skipped
        with a warning and reported by :meth:`verify`.

        Raises:
            StoreError: the directory or ``store.json`` is missing, unreadable, of another
                format or version, or inconsistent.
            ValueError: ``mode`` is not ``"r"`` or ``"a"``.
        """
        if mode not in ("r", "a"):
            raise ValueError(f"mode must be 'r' or 'a', got {mode!r}")
        path = Path(path)
        if not path.is_dir():
            raise StoreError(path, "no such directory (not a code store)")
        store_file = path / STORE_FILE
        if not store_file.is_file():
            raise StoreError(path, f"not a viq code store (no {STORE_FILE})")
        try:
            config = json.loads(store_file.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, ValueError) as exc:
            raise StoreError(store_file, f"unreadable or corrupt: {exc}") from None
        if not isinstance(config, dict):
            raise StoreError(store_file, "corrupt: not a JSON object")
        if config.get("format") != STORE_FORMAT:
            raise StoreError(store_file, f"not a viq code store configuration (format {config.get('format')!r})")
        version = config.get("format_version")
        if version != FORMAT_VERSION:
            raise StoreError(
                store_file, f"unsupported store format version {version!r} (this reader supports {FORMAT_VERSION})"
            )
        try:
            levels = tuple(config["levels"])
            bits = bits_for_levels(levels)
            checks = {
                "codebook_size": math.prod(levels),
                "bits_per_code": bits,
                "codec": "lzma" if config["entropy_coding"] else "packed",
            }
            for key, want in checks.items():
                if config[key] != want:
                    raise ValueError(f"{key} is {config[key]!r} but must be {want!r}")
            for key in ("codes_per_patch", "patch_size", "shard_bytes"):
                v = config[key]
                if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                    raise ValueError(f"{key} must be a positive integer, got {v!r}")
            if not isinstance(config["model_fingerprint"], str) or not isinstance(config["entropy_coding"], bool):
                raise TypeError("model_fingerprint must be a string and entropy_coding a boolean")
        except (KeyError, TypeError, ValueError) as exc:
            what = f"missing field {exc}" if isinstance(exc, KeyError) else str(exc)
            raise StoreError(store_file, f"invalid configuration: {what}") from None
        if not (path / SHARD_DIR).is_dir():
            raise StoreError(path, f"corrupt code store: missing {SHARD_DIR}/ directory")
        return cls(path, config, mode)

    # ---- properties -----------------------------------------------------------------------

    @property
    def path(self) -> Path:
        """The store directory."""
        return self._path

    @property
    def mode(self) -> str:
        """``"r"`` or ``"a"``."""
        return self._mode

    @property
    def levels(self) -> tuple[int, ...]:
        return self._levels

    @property
    def codebook_size(self) -> int:
        """``K = prod(levels)``."""
        return self._k

    @property
    def bits_per_code(self) -> int:
        """Bits per code of packed records, ``max(1, ceil(log2 K))``."""
        return self._bits

    @property
    def codes_per_patch(self) -> int:
        return self._cpp

    @property
    def patch_size(self) -> int:
        return self._patch

    @property
    def model_fingerprint(self) -> str:
        return self._fingerprint

    @property
    def entropy_coding(self) -> bool:
        return self._entropy

    @property
    def shard_bytes(self) -> int:
        """Shard roll-over size in bytes."""
        return self._shard_bytes

    @property
    def config(self) -> dict[str, Any]:
        """A copy of ``store.json``."""
        return json.loads(json.dumps(self._config))

    def __repr__(self) -> str:
        return (
            f"CodeStore({str(self._path)!r}, mode={self._mode!r}, images={len(self)}, shards={len(self._shards)}, "
            f"levels={self._levels}, codec={self._config['codec']!r})"
        )

    # ---- index ----------------------------------------------------------------------------

    def refresh(self) -> None:
        """Re-read the index: pick up shards that writers finalised since open / the last refresh.

        Unchanged index files are not parsed again, so this is cheap to call periodically.
        """
        shard_dir = self._path / SHARD_DIR
        try:
            names = {e.name for e in os.scandir(shard_dir)}
        except OSError as exc:
            raise StoreError(shard_dir, f"cannot list shards: {exc}") from None
        found: list[tuple[str, int, str]] = []
        for name in names:
            m = _INDEX_FILE.fullmatch(name)
            if m:
                found.append((m["writer"], int(m["seq"]), name))
        found.sort()  # shard order: writer name, then seq (numeric)

        problems: list[str] = []
        parsed: dict[str, _Shard] = {}
        shards: list[_Shard] = []
        for writer, seq, index_name in found:
            bin_name = index_name[: -len(".idx.json")] + ".bin"
            if bin_name not in names:
                problems.append(f"{index_name}: shard file {bin_name} is missing; its records are unavailable")
                continue
            try:
                st = os.stat(shard_dir / index_name)
            except OSError as exc:
                problems.append(f"{index_name}: cannot stat: {exc}")
                continue
            key = (st.st_mtime_ns, st.st_size)
            shard = self._parsed.get(index_name)
            if shard is None or shard.stat_key != key:
                try:
                    shard = self._parse_index(shard_dir / index_name, writer, seq, key)
                except ValueError as exc:
                    problems.append(f"{index_name}: {exc}; shard skipped")
                    continue
            parsed[index_name] = shard
            shards.append(shard)
        for p in problems:
            log.warning("%s: %s", self._path, p)

        by_id: dict[str, tuple[int, int]] = {}
        order: list[str] = []
        by_hash: dict[str, str] = {}
        for si, shard in enumerate(shards):
            for row, sid in enumerate(shard.ids):
                if sid in by_id:
                    continue  # duplicate across shards: the first claim wins; verify() reports it
                by_id[sid] = (si, row)
                order.append(sid)
                h = shard.hashes[row]
                if h and h not in by_hash:
                    by_hash[h] = sid
        self._parsed, self._shards, self._problems = parsed, shards, problems
        self._by_id, self._order, self._by_hash = by_id, order, by_hash
        # Shard files are immutable, but drop mappings of shards that left the index.
        live = {s.name for s in shards}
        for name in [n for n in self._maps if n not in live]:
            self._maps.pop(name).close()

    def _parse_index(self, index_path: Path, writer: str, seq: int, stat_key: tuple[int, int]) -> _Shard:
        """Parse and structurally validate one ``.idx.json`` (raises ValueError)."""
        try:
            obj = json.loads(index_path.read_bytes().decode("utf-8"))
        except (OSError, UnicodeDecodeError, ValueError) as exc:
            raise ValueError(f"unreadable or corrupt index: {exc}") from None
        if not isinstance(obj, dict) or obj.get("format") != SHARD_INDEX_FORMAT:
            raise ValueError("not a shard index")
        if obj.get("format_version") != FORMAT_VERSION:
            raise ValueError(f"unsupported shard index version {obj.get('format_version')!r}")
        expect = {
            "writer": writer,
            "seq": seq,
            "shard": index_path.name[: -len(".idx.json")] + ".bin",
            "levels": list(self._levels),
            "codes_per_patch": self._cpp,
            "patch_size": self._patch,
            "bits_per_code": self._bits,
            "model_fingerprint": self._fingerprint,
            "entropy_coding": self._entropy,
        }
        for key, want in expect.items():
            if obj.get(key) != want:
                raise ValueError(f"{key} is {obj.get(key)!r} but the store requires {want!r}")
        n = obj.get("count")
        recs = obj.get("records")
        if isinstance(n, bool) or not isinstance(n, int) or n < 0 or not isinstance(recs, dict):
            raise ValueError("missing or invalid count / records")
        size, digest = obj.get("shard_size"), obj.get("sha256")
        if isinstance(size, bool) or not isinstance(size, int) or size < SHARD_HEADER_SIZE:
            raise ValueError(f"invalid shard_size {size!r}")
        if not isinstance(digest, str) or not _HEX64.fullmatch(digest):
            raise ValueError("invalid sha256")
        return _Shard(
            writer=writer,
            seq=seq,
            name=expect["shard"],
            index_name=index_path.name,
            stat_key=stat_key,
            size=size,
            sha256=digest,
            ids=_str_list(recs.get("id"), n, "id"),
            sources=_str_list(recs.get("source"), n, "source"),
            hashes=_str_list(recs.get("content_hash"), n, "content_hash"),
            grids=_int_matrix(recs.get("grid"), n, "grid"),
            image_sizes=_int_matrix(recs.get("image_size"), n, "image_size", allow_null=True),
            offsets=_int_vector(recs.get("offset"), n, "offset", 2**63),
            lengths=_int_vector(recs.get("length"), n, "length", 2**63),
            crcs=_int_vector(recs.get("crc32"), n, "crc32", 2**32),
        )

    def __len__(self) -> int:
        """Number of distinct sample ids."""
        return len(self._order)

    def ids(self) -> list[str]:
        """All distinct sample ids, in index order (shard order, then record order)."""
        return list(self._order)

    def __contains__(self, sample_id: object) -> bool:
        return sample_id in self._by_id

    def has_hash(self, content_hash: str) -> str | None:
        """The sample id first stored with this content hash (sha256 of the image bytes), or None."""
        return self._by_hash.get(content_hash.lower()) if content_hash else None

    def _locate(self, sample_id: str) -> tuple[_Shard, int]:
        try:
            si, row = self._by_id[sample_id]
        except (KeyError, TypeError):
            raise KeyError(sample_id) from None
        return self._shards[si], row

    def entry(self, sample_id: str) -> IndexEntry:
        """Index entry of ``sample_id`` (raises KeyError if absent)."""
        shard, row = self._locate(sample_id)
        return self._entry(shard, row)

    def _entry(self, shard: _Shard, row: int) -> IndexEntry:
        ih, iw = (int(v) for v in shard.image_sizes[row])
        return IndexEntry(
            sample_id=shard.ids[row],
            source=shard.sources[row],
            content_hash=shard.hashes[row],
            grid=(int(shard.grids[row, 0]), int(shard.grids[row, 1])),
            image_size=(ih, iw) if ih else None,
            shard=shard.name,
            offset=int(shard.offsets[row]),
            length=int(shard.lengths[row]),
            crc32=int(shard.crcs[row]),
            model_fingerprint=self._fingerprint,
            levels=self._levels,
            codes_per_patch=self._cpp,
            patch_size=self._patch,
        )

    # ---- reading --------------------------------------------------------------------------

    def _map(self, shard: _Shard) -> mmap.mmap:
        """The shard's read-only memory map, opened lazily, per process, LRU-bounded."""
        if self._maps_pid != os.getpid():
            # Forked DataLoader worker: never share the parent's mappings / descriptors.
            self._maps = collections.OrderedDict()
            self._maps_pid = os.getpid()
        m = self._maps.get(shard.name)
        if m is not None:
            self._maps.move_to_end(shard.name)
            return m
        path = self._path / SHARD_DIR / shard.name
        try:
            with open(path, "rb") as fh:
                m = mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ)
        except (OSError, ValueError) as exc:  # ValueError: empty file
            raise StoreError(path, f"cannot map shard: {exc}") from None
        self._maps[shard.name] = m
        while len(self._maps) > _MAX_OPEN_SHARDS:
            self._maps.popitem(last=False)[1].close()
        return m

    def _record(self, shard: _Shard, row: int) -> bytes:
        """Record bytes, bounds- and CRC-checked (raises StoreError)."""
        m = self._map(shard)
        off, length = int(shard.offsets[row]), int(shard.lengths[row])
        if off < SHARD_HEADER_SIZE or off + length > len(m):
            raise StoreError(
                self._path / SHARD_DIR / shard.name,
                f"record {shard.ids[row]!r} at [{off}, {off + length}) lies outside the shard ({len(m)} bytes)",
            )
        data = m[off : off + length]
        if zlib.crc32(data) != int(shard.crcs[row]):
            raise StoreError(
                self._path / SHARD_DIR / shard.name, f"record {shard.ids[row]!r}: CRC-32 mismatch (corrupt)"
            )
        return data

    def _codes(self, shard: _Shard, row: int, data: bytes) -> Codes:
        h, w = (int(v) for v in shard.grids[row])
        try:
            values = _decode_record(data, h * w * self._cpp, self._bits, self._k, self._entropy)
            ih, iw = (int(v) for v in shard.image_sizes[row])
            meta = {"model": self._fingerprint}
            if shard.sources[row]:
                meta["source"] = shard.sources[row]
            return Codes(
                torch.from_numpy(values.view(np.int32).reshape(h, w, self._cpp)),
                self._levels,
                image_size=(ih, iw) if ih else None,
                patch_size=self._patch,
                metadata=meta,
            )
        except ValueError as exc:
            raise StoreError(self._path / SHARD_DIR / shard.name, f"record {shard.ids[row]!r}: {exc}") from None

    def get(self, sample_id: str) -> Codes:
        """The codes of ``sample_id``, read from the memory-mapped shard.

        The returned :class:`~viq.formats.codes.Codes` carry ``metadata = {"model": <fingerprint>,
        "source": <source>}`` (source only if given), like the files ``viq encode`` writes.

        Raises:
            KeyError: unknown sample id.
            StoreError: the record is corrupt (CRC, bounds, decoding, out-of-range code).
        """
        shard, row = self._locate(sample_id)
        return self._codes(shard, row, self._record(shard, row))

    def __iter__(self) -> Iterator[tuple[str, Codes]]:
        """``(sample_id, Codes)`` for every distinct id, in index order (sequential reads)."""
        for si, shard in enumerate(self._shards):
            for row, sid in enumerate(shard.ids):
                if self._by_id.get(sid) == (si, row):
                    yield sid, self._codes(shard, row, self._record(shard, row))

    # ---- writing --------------------------------------------------------------------------

    def writer(self, *, name: str) -> ShardWriter:
        """A writer that appends shards named ``<name>-<seq>`` (see :class:`ShardWriter`).

        Raises:
            StoreError: the store was opened read-only.
            ValueError: invalid name.
        """
        if self._mode != "a":
            raise StoreError(self._path, "opened read-only (mode 'r'); open with mode 'a' to append")
        return ShardWriter(self, name)

    # ---- pickling -------------------------------------------------------------------------

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_maps"] = None  # memory maps are per process: re-opened lazily after unpickling
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._maps = collections.OrderedDict()
        self._maps_pid = os.getpid()

    def close(self) -> None:
        """Unmap all shards (the store stays usable; they are re-mapped on demand)."""
        while self._maps:
            self._maps.popitem()[1].close()

    def __enter__(self) -> CodeStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ---- checking -------------------------------------------------------------------------

    def verify(self) -> VerifyReport:
        """Check everything; return a report listing problems (never raises for store damage).

        Re-reads the index first, then checks: index files that failed to load or whose shard
        is missing; each finalised shard's size, header and sha256; every record's bounds,
        contiguity, CRC-32 and decoding (length, padding bits, every code < K, image size vs
        grid); sample ids claimed more than once. Reads every byte of the store.
        """
        self.refresh()
        report = VerifyReport(path=str(self._path), shards=len(self._shards))
        report.problems.extend(self._problems)
        claims: dict[str, list[str]] = collections.defaultdict(list)
        shard_dir = self._path / SHARD_DIR
        for shard in self._shards:
            for sid in shard.ids:
                claims[sid].append(shard.name)
            report.records += len(shard)
            report.problems.extend(self._verify_shard(shard_dir / shard.name, shard))
        for sid, where in claims.items():
            if len(where) > 1:
                report.duplicate_ids[sid] = where
        if report.duplicate_ids:
            dup = sorted(report.duplicate_ids)
            shown = ", ".join(f"{s!r} in {', '.join(report.duplicate_ids[s])}" for s in dup[:5])
            more = f" and {len(dup) - 5} more" if len(dup) > 5 else ""
            report.problems.append(f"{len(dup)} sample id(s) stored more than once: {shown}{more}")

        # Leftovers of killed writers are expected and harmless: they are notes, not problems.
        names = sorted(e.name for e in os.scandir(shard_dir))
        for name in names:
            if name.endswith(_TMP_SUFFIX):
                report.notes.append(f"{name}: temporary file of an unfinished shard (removed by the next writer "
                                    "with the same name)")
            elif _SHARD_FILE.fullmatch(name):
                if name[: -len(".bin")] + ".idx.json" not in names:
                    report.notes.append(f"{name}: shard without index (writer killed while finalising; ignored)")
            elif not _INDEX_FILE.fullmatch(name):
                report.notes.append(f"{name}: unexpected file in {SHARD_DIR}/")
        level = logging.INFO if report.ok else logging.WARNING
        log.log(level, "verified %s: %d shards, %d records, %d problems", self._path, report.shards,
                report.records, len(report.problems))
        return report

    def _verify_shard(self, path: Path, shard: _Shard) -> list[str]:
        name = shard.name
        try:
            actual_size = path.stat().st_size
        except OSError as exc:
            return [f"{name}: cannot read: {exc}"]
        problems: list[str] = []
        if actual_size != shard.size:
            problems.append(f"{name}: file is {actual_size} bytes but its index records {shard.size}")
        if actual_size < SHARD_HEADER_SIZE:
            return problems + [f"{name}: too short for a shard header"]
        with open(path, "rb") as fh, mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ) as m:
            digest = hashlib.sha256(m).hexdigest()
            if digest != shard.sha256:
                problems.append(f"{name}: sha256 checksum mismatch (file {digest[:16]}..., index "
                                f"{shard.sha256[:16]}...): shard is corrupt")
            magic, version, flags = _SHARD_HEADER.unpack_from(m, 0)
            want_flags = _FLAG_ENTROPY if self._entropy else 0
            if magic != SHARD_MAGIC or version != FORMAT_VERSION or flags != want_flags:
                problems.append(f"{name}: bad shard header (magic {magic!r}, version {version}, flags {flags}; "
                                f"expected {SHARD_MAGIC!r}, {FORMAT_VERSION}, {want_flags})")
            record_problems: list[str] = []
            expected_offset = SHARD_HEADER_SIZE
            for row, sid in enumerate(shard.ids):
                off, length = int(shard.offsets[row]), int(shard.lengths[row])
                where = f"{name}: record {row} ({sid!r})"
                if off != expected_offset:
                    record_problems.append(f"{where}: starts at byte {off}, expected {expected_offset} "
                                           "(records must be contiguous)")
                expected_offset = off + length
                if off < SHARD_HEADER_SIZE or off + length > actual_size:
                    record_problems.append(f"{where}: bytes [{off}, {off + length}) point past the end of the "
                                           f"{actual_size}-byte shard")
                    continue
                data = m[off : off + length]
                if zlib.crc32(data) != int(shard.crcs[row]):
                    record_problems.append(f"{where}: CRC-32 mismatch")
                h, w = (int(v) for v in shard.grids[row])
                ih, iw = (int(v) for v in shard.image_sizes[row])
                if ih and (-(-ih // self._patch) != h or -(-iw // self._patch) != w):
                    record_problems.append(f"{where}: image size {(ih, iw)} does not fit grid {(h, w)}")
                try:
                    _decode_record(data, h * w * self._cpp, self._bits, self._k, self._entropy)
                except ValueError as exc:
                    record_problems.append(f"{where}: {exc}")
            if shard.ids and expected_offset != actual_size:
                record_problems.append(f"{name}: last record ends at byte {expected_offset}, file has {actual_size}")
        if len(record_problems) > _MAX_PROBLEMS_PER_SHARD:
            extra = len(record_problems) - _MAX_PROBLEMS_PER_SHARD
            record_problems = record_problems[:_MAX_PROBLEMS_PER_SHARD] + [f"{name}: ... and {extra} more problems"]
        return problems + record_problems

    def stats(self) -> dict[str, Any]:
        """Size and code-usage statistics (reads and decodes every record).

        Returns a dict with:
            images, total_codes: counts (distinct ids).
            pixels: total image pixels (``image_size`` when known, else the padded grid).
            padded_pixels: total of ``h * w * patch_size**2``.
            payload_bytes: sum of record lengths; store_bytes: bytes of all files of the store
                (shards, indexes, store.json; leftovers of killed writers excluded).
            bpp: ``store_bytes * 8 / pixels``; bpp_payload: ``payload_bytes * 8 / pixels``;
                bpp_payload_padded: ``payload_bytes * 8 / padded_pixels`` (the figure of the
                ``docs/formats.md`` table, e.g. 0.25 for 64k levels without entropy coding).
            bits_per_code: ``B``; payload_bits_per_code: ``payload_bytes * 8 / total_codes``.
            histogram: ``(K,)`` int64 ndarray, occurrences of each code.
            entropy_bits: empirical entropy of the codes, bits/code (<= log2 K).
            perplexity: ``2 ** entropy_bits``.
            codebook_used, codebook_used_fraction: number / fraction of the K codes that occur.
            codebook_size, levels, entropy_coding, shards.
        Ratios are None for an empty store.
        """
        hist = np.zeros(self._k, dtype=np.int64)
        pending: list[np.ndarray] = []
        pending_n = 0
        images = codes_total = pixels = padded = payload = 0
        for si, shard in enumerate(self._shards):
            for row, sid in enumerate(shard.ids):
                if self._by_id.get(sid) != (si, row):
                    continue
                data = self._record(shard, row)
                h, w = (int(v) for v in shard.grids[row])
                n = h * w * self._cpp
                try:
                    values = _decode_record(data, n, self._bits, self._k, self._entropy)
                except ValueError as exc:
                    raise StoreError(self._path / SHARD_DIR / shard.name, f"record {sid!r}: {exc}") from None
                pending.append(values)
                pending_n += n
                if pending_n >= _HIST_BATCH:
                    hist += np.bincount(np.concatenate(pending), minlength=self._k)
                    pending, pending_n = [], 0
                ih, iw = (int(v) for v in shard.image_sizes[row])
                pad = h * w * self._patch * self._patch
                images += 1
                codes_total += n
                padded += pad
                pixels += ih * iw if ih else pad
                payload += len(data)
        if pending:
            hist += np.bincount(np.concatenate(pending), minlength=self._k)

        store_bytes = (self._path / STORE_FILE).stat().st_size
        for shard in self._shards:
            for name in (shard.name, shard.index_name):
                try:
                    store_bytes += (self._path / SHARD_DIR / name).stat().st_size
                except OSError:
                    pass
        used = int(np.count_nonzero(hist))
        entropy = usage_stats(hist)["entropy_bits"] if codes_total else None

        def ratio(a: float, b: float) -> float | None:
            return a / b if b else None

        return {
            "images": images,
            "shards": len(self._shards),
            "total_codes": codes_total,
            "pixels": pixels,
            "padded_pixels": padded,
            "payload_bytes": payload,
            "store_bytes": store_bytes,
            "bpp": ratio(store_bytes * 8, pixels),
            "bpp_payload": ratio(payload * 8, pixels),
            "bpp_payload_padded": ratio(payload * 8, padded),
            "bits_per_code": self._bits,
            "payload_bits_per_code": ratio(payload * 8, codes_total),
            "entropy_coding": self._entropy,
            "levels": list(self._levels),
            "codebook_size": self._k,
            "histogram": hist,
            "entropy_bits": entropy,
            "perplexity": None if entropy is None else float(2.0**entropy),
            "codebook_used": used,
            "codebook_used_fraction": used / self._k,
        }


# --------------------------------------------------------------------------------------
# ShardWriter
# --------------------------------------------------------------------------------------


class ShardWriter:
    """Appends records to shards ``shards/<name>-<seq>.bin`` of one store (one per process).

    Records go to a temporary shard file; :meth:`flush` (automatic when the shard would
    exceed the store's ``shard_bytes``) finalises it atomically, after which everything added
    so far is durable and visible to readers (after their :meth:`CodeStore.refresh`).
    Creating a writer deletes the leftovers (``.tmp`` files, shards without index) of a
    previous writer with the same name, which must therefore not be running anymore, and
    continues its numbering. Use as a context manager, or call :meth:`close`.

    Not thread-safe; use one writer per thread or process, each with its own name.
    """

    def __init__(self, store: CodeStore, name: str) -> None:
        if not isinstance(name, str) or not _WRITER_NAME.fullmatch(name) or name.endswith(_TMP_SUFFIX):
            raise ValueError(
                f"writer name must match [A-Za-z0-9][A-Za-z0-9._-]* (at most 128 characters), got {name!r}"
            )
        self._store = store
        self._name = name
        self._dir = store.path / SHARD_DIR
        self._closed = False
        self._seq = self._clean_up_and_number()
        store.refresh()
        # Ids (and hashes) this writer already finalised in earlier runs: re-adding one is a
        # duplicate within the writer, which add() refuses.
        self._ids: set[str] = set()
        self._hashes: dict[str, str] = {}
        for shard in store._shards:
            if shard.writer == name:
                self._ids.update(shard.ids)
                for sid, h in zip(shard.ids, shard.hashes):
                    if h:
                        self._hashes.setdefault(h, sid)
        self._fh: Any = None  # open temporary shard file
        self._reset_shard()
        self.records_written = 0  # records finalised by this writer object
        self.shards_written = 0

    @property
    def name(self) -> str:
        return self._name

    def _base(self, seq: int) -> str:
        return f"{self._name}-{seq:06d}"

    def _clean_up_and_number(self) -> int:
        """Delete own leftovers; return the next shard number (after the last finalised one)."""
        last = -1
        entries = sorted(e.name for e in os.scandir(self._dir))
        indexes = set()
        for fname in entries:
            m = _INDEX_FILE.fullmatch(fname)
            if m and m["writer"] == self._name:
                indexes.add(fname)
                last = max(last, int(m["seq"]))
        for fname in entries:
            target = fname[: -len(_TMP_SUFFIX)] if fname.endswith(_TMP_SUFFIX) else None
            m = _SHARD_FILE.fullmatch(target or fname) or _INDEX_FILE.fullmatch(target or fname)
            if not m or m["writer"] != self._name:
                continue
            orphan = target is None and fname.endswith(".bin") and fname[: -len(".bin")] + ".idx.json" not in indexes
            if target is not None or orphan:
                log.info("%s: removing leftover %s of an unfinished shard", self._dir, fname)
                try:
                    os.unlink(self._dir / fname)
                except FileNotFoundError:
                    pass
        return last + 1

    def _reset_shard(self) -> None:
        self._fh = None
        self._size = 0
        self._hasher = hashlib.sha256()
        self._cols: dict[str, list[Any]] = {
            k: [] for k in ("id", "source", "content_hash", "grid", "image_size", "offset", "length", "crc32")
        }

    def __contains__(self, sample_id: object) -> bool:
        """True if this writer (under this name, in any run) already holds ``sample_id``."""
        return sample_id in self._ids

    def has_hash(self, content_hash: str) -> str | None:
        """Sample id this writer (under this name) stored with ``content_hash``, flushed or not."""
        return self._hashes.get(content_hash.lower()) if content_hash else None

    def add(self, sample_id: str, codes: Codes, *, source: str = "", content_hash: str = "") -> None:
        """Append one sample.

        Args:
            sample_id: unique id of the sample (non-empty string).
            codes: its codes; levels, codes_per_patch and patch_size must be the store's, and
                ``codes.metadata["model"]``, if present, must be the store's fingerprint.
                Other metadata is not stored.
            source: free-form source, usually the image path.
            content_hash: sha256 hex digest of the image file bytes (:func:`file_sha256`), for
                :meth:`CodeStore.has_hash` de-duplication; ``""`` if unknown.

        Raises:
            ValueError: empty/duplicate id (already added by this writer name), bad hash.
            StoreError: codes from another code space (levels, layout or model fingerprint),
                or the writer is closed.
        """
        st = self._store
        if self._closed:
            raise StoreError(st.path, f"writer {self._name!r} is closed")
        if not isinstance(sample_id, str) or not sample_id:
            raise ValueError(f"sample_id must be a non-empty string, got {sample_id!r}")
        if sample_id in self._ids:
            raise ValueError(f"duplicate sample id {sample_id!r}: writer {self._name!r} already stored it")
        if not isinstance(codes, Codes):
            raise TypeError(f"codes must be viq.Codes, got {type(codes).__name__}")
        if not isinstance(source, str):
            raise TypeError(f"source must be a string, got {type(source).__name__}")
        if not isinstance(content_hash, str) or (content_hash and not _HEX64.fullmatch(content_hash.lower())):
            raise ValueError(f"content_hash must be a sha256 hex digest or '', got {content_hash!r}")
        content_hash = content_hash.lower()
        problems = []
        if codes.levels != st.levels:
            problems.append(f"levels {codes.levels} (store: {st.levels})")
        if codes.codes_per_patch != st.codes_per_patch:
            problems.append(f"codes_per_patch {codes.codes_per_patch} (store: {st.codes_per_patch})")
        if codes.patch_size != st.patch_size:
            problems.append(f"patch_size {codes.patch_size} (store: {st.patch_size})")
        model = codes.metadata.get("model")
        if isinstance(model, str) and model != st.model_fingerprint:
            problems.append(f"model fingerprint {model} (store: {st.model_fingerprint})")
        if problems:
            raise StoreError(st.path, f"refusing codes of sample {sample_id!r} from another code space: "
                                      + ", ".join(problems))

        record = _encode_record(codes.indices.numpy().reshape(-1), st.bits_per_code, st.entropy_coding)
        if self._fh is not None and self._size + len(record) > st.shard_bytes:
            self.flush()  # roll over before the shard would exceed shard_bytes
        if self._fh is None:
            self._open_shard()
        self._fh.write(record)
        self._hasher.update(record)
        cols = self._cols
        cols["id"].append(sample_id)
        cols["source"].append(source)
        cols["content_hash"].append(content_hash)
        cols["grid"].append(list(codes.grid))
        cols["image_size"].append(list(codes.image_size) if codes.image_size is not None else None)
        cols["offset"].append(self._size)
        cols["length"].append(len(record))
        cols["crc32"].append(zlib.crc32(record))
        self._size += len(record)
        self._ids.add(sample_id)
        if content_hash:
            self._hashes.setdefault(content_hash, sample_id)
        if self._size >= st.shard_bytes:
            self.flush()

    def _open_shard(self) -> None:
        tmp = self._dir / f"{self._base(self._seq)}.bin{_TMP_SUFFIX}"
        # "xb": never silently reuse a temp file, e.g. of a concurrent writer given the same name.
        self._fh = open(tmp, "xb")  # noqa: SIM115  # stays open across add() calls until flush()
        header = _SHARD_HEADER.pack(SHARD_MAGIC, FORMAT_VERSION, _FLAG_ENTROPY if self._store.entropy_coding else 0)
        self._fh.write(header)
        self._hasher.update(header)
        self._size = len(header)

    def flush(self) -> None:
        """Finalise the current shard (atomic, durable); no-op if nothing was added since."""
        if self._fh is None:
            return
        st = self._store
        base = self._base(self._seq)
        bin_tmp = self._dir / f"{base}.bin{_TMP_SUFFIX}"
        idx_tmp = self._dir / f"{base}.idx.json{_TMP_SUFFIX}"
        n = len(self._cols["id"])
        index = {
            "format": SHARD_INDEX_FORMAT,
            "format_version": FORMAT_VERSION,
            "writer": self._name,
            "seq": self._seq,
            "shard": f"{base}.bin",
            "shard_size": self._size,
            "sha256": self._hasher.hexdigest(),
            "levels": list(st.levels),
            "codes_per_patch": st.codes_per_patch,
            "patch_size": st.patch_size,
            "bits_per_code": st.bits_per_code,
            "model_fingerprint": st.model_fingerprint,
            "entropy_coding": st.entropy_coding,
            "count": n,
            "records": self._cols,
        }
        with open(idx_tmp, "wb") as fh:
            fh.write(_json_bytes(index))
            fh.flush()
            os.fsync(fh.fileno())
        self._fh.flush()
        os.fsync(self._fh.fileno())
        self._fh.close()
        # Shard first, index last: the index's appearance is the commit point for readers.
        os.replace(bin_tmp, self._dir / f"{base}.bin")
        os.replace(idx_tmp, self._dir / f"{base}.idx.json")
        fsync_dir(self._dir)
        log.debug("%s: finalised shard %s.bin (%d records, %d bytes)", st.path, base, n, self._size)
        self.records_written += n
        self.shards_written += 1
        self._seq += 1
        self._reset_shard()

    def close(self) -> None:
        """Flush, mark the writer closed (further :meth:`add` calls raise) and refresh the store
        it came from, so that its reads see this writer's samples."""
        if self._closed:
            return
        self.flush()
        self._closed = True
        # Only here, not per flush: refresh() rebuilds the id map, O(store size).
        self._store.refresh()

    def __enter__(self) -> ShardWriter:
        return self

    def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
        if exc_type is None:
            self.close()
            return
        # Every added record is complete, so keep them even if the caller's loop failed; but
        # never mask the original exception with a secondary one.
        try:
            self.close()
        except Exception:
            log.exception("%s: could not finalise writer %r after an error", self._store.path, self._name)

    def __repr__(self) -> str:
        pending = len(self._cols["id"])
        return f"ShardWriter({self._name!r}, next_seq={self._seq}, pending={pending}, closed={self._closed})"


# --------------------------------------------------------------------------------------
# PyTorch dataset
# --------------------------------------------------------------------------------------


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

    def __init__(self, store_path: PathLike, ids: Sequence[str] | None = None) -> None:
        self.store_path = Path(store_path)
        self._store = CodeStore.open(self.store_path, "r")
        self.ids = self._store.ids() if ids is None else list(ids)
        missing = [sid for sid in self.ids if sid not in self._store]
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


# --------------------------------------------------------------------------------------
# Plots and CLI helpers
# --------------------------------------------------------------------------------------


def plot_stats(store: CodeStore | PathLike | Mapping[str, Any], path_png: PathLike) -> Path:
    """Draw the code usage (frequencies sorted in decreasing order, log scale) to a PNG.

    Args:
        store: a :class:`CodeStore`, a store path, or the dict returned by :meth:`CodeStore.stats`.
        path_png: output file.

    Returns:
        ``path_png`` as a Path.
    """
    # The object-oriented API with an explicit Agg canvas: no pyplot global state, and the
    # process-wide matplotlib backend is left alone.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    if isinstance(store, Mapping):
        stats = store
    else:
        st = store if isinstance(store, CodeStore) else CodeStore.open(store, "r")
        stats = st.stats()
    hist = np.asarray(stats["histogram"], dtype=np.int64)
    total = int(hist.sum())
    k = hist.size
    fig = Figure(figsize=(8, 4.5), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    if total:
        freq = np.sort(hist)[::-1] / total
        used = int(np.count_nonzero(freq))
        ax.plot(np.arange(1, used + 1), freq[:used], lw=1.2, label="codes (sorted by frequency)")
        ax.axhline(1.0 / k, color="gray", ls="--", lw=1, label=f"uniform 1/K = {1.0 / k:.2e}")
        ax.set_yscale("log")
        ax.legend(loc="upper right")
    ax.set_xlim(0, k)
    ax.set_xlabel(f"code rank (K = {k})")
    ax.set_ylabel("frequency")
    ent = stats.get("entropy_bits")
    title = f"{stats.get('images', '?')} images, {total} codes"
    if ent is not None:
        title += (f"; entropy {ent:.2f} bits/code, perplexity {stats['perplexity']:.0f}, "
                  f"used {stats['codebook_used_fraction']:.1%} of K")
    ax.set_title(title, fontsize=9)
    ax.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    out = Path(path_png)
    fig.savefig(out, format="png")
    return out


def verify_main(path: PathLike) -> int:
    """``viq store verify PATH``: print the report; exit code 0 = sound, 1 = problems, 2 = unopenable."""
    try:
        store = CodeStore.open(path, "r")
    except StoreError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    report = store.verify()
    print(report.summary())
    return 0 if report.ok else 1


def _fmt(value: Any, spec: str) -> str:
    return "n/a" if value is None else format(value, spec)


def stats_main(path: PathLike, plot: str | None = None, as_json: bool = False) -> int:
    """``viq store stats PATH [--plot PNG] [--json]``: print statistics; exit code 0, or 2 on error.

    ``as_json`` prints one JSON object: :meth:`CodeStore.stats` without the histogram.
    """
    try:
        store = CodeStore.open(path, "r")
        stats = store.stats()
    except StoreError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if plot:
        plot_stats(stats, plot)
    if as_json:
        print(json.dumps({k: v for k, v in stats.items() if k != "histogram"}, indent=2))
        return 0
    lines = [
        f"store:       {store.path}",
        (f"codes:       levels {tuple(stats['levels'])}, K = {stats['codebook_size']}, "
         f"{stats['bits_per_code']} bits/code, {'lzma' if stats['entropy_coding'] else 'packed'} records"),
        (f"images:      {stats['images']} in {stats['shards']} shard(s), {stats['total_codes']} codes, "
         f"{stats['pixels']} pixels"),
        f"size:        {stats['store_bytes']} bytes on disk, {stats['payload_bytes']} bytes of payload",
        (f"bits/pixel:  {_fmt(stats['bpp'], '.4f')} (store), {_fmt(stats['bpp_payload'], '.4f')} (payload), "
         f"{_fmt(stats['bpp_payload_padded'], '.4f')} (payload per padded pixel)"),
        (f"bits/code:   {_fmt(stats['payload_bits_per_code'], '.3f')} stored, "
         f"{_fmt(stats['entropy_bits'], '.3f')} entropy"),
        (f"usage:       perplexity {_fmt(stats['perplexity'], '.1f')}, {stats['codebook_used']} of "
         f"{stats['codebook_size']} codes used ({stats['codebook_used_fraction']:.1%})"),
    ]
    if plot:
        lines.append(f"plot:        {plot}")
    print("\n".join(lines))
    return 0
