"""The on-disk format of a code store (version 1): layout, record codec, configuration, indexes.

Codes are extracted once, offline, by many processes (one per GPU, resumable), and read many
times by training. A store is a directory that any number of writers
(:class:`~viq.store.writer.ShardWriter`) append to concurrently without locks (each writer owns
the files that carry its name), and that readers open memory-mapped for random access by sample
id. This module is the format alone: reading is :mod:`viq.store.reader`, appending
:mod:`viq.store.writer`, checking :mod:`viq.store.scan` and :mod:`viq.store.check`.

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
        <writer>-<seq>.lookup          derived: the index as binary columns (a cache, see below)
      index/
        <key>.viqx                     derived: the merged, memory-mapped index of all shards

``<writer>`` is the writer name (``[A-Za-z0-9][A-Za-z0-9._-]*``, e.g. ``rank0``) and ``<seq>``
the writer's shard number, ``0, 1, 2, ...`` zero-padded to at least 6 digits.

``store.json`` is a UTF-8 JSON object::

    {"format": "viq-code-store", "format_version": 1,
     "levels": [8, 8, 8, 6, 5], "codebook_size": 15360, "bits_per_code": 14,
     "codes_per_patch": 4, "patch_size": 16, "model_fingerprint": "0123456789abcdef",
     "entropy_coding": false, "codec": "packed", "shard_bytes": 268435456}

``codebook_size`` and ``bits_per_code`` are derived (``K = prod(levels)``,
``B = max(1, ceil(log2 K))``, see :func:`viq.formats.bits.bits_for_levels`) and are checked on open.
``codec`` is ``"packed"`` or ``"lzma"`` and always agrees with ``entropy_coding``.
``shard_bytes`` is the size at which writers roll over to a new shard.

Shard file ``<writer>-<seq>.bin``: an 8-byte header -- magic ``b"VIQS"``, u16 format version
(1), u16 flags (bit 0 = entropy coded, other bits 0), little-endian -- followed by the records
of its samples, back to back in index order with no gaps: record ``i`` starts at
``offset[i]`` (the first at 8) and the last ends at the end of the file. A record is the codes
of one image in the official flat order ``C * (y * w + x) + j`` (see :mod:`viq.formats.codes`) and
nothing else: the grid, image size, etc. live in the index. With ``N = h * w * C`` codes:

* ``entropy_coding=False``: exactly ``ceil(N * B / 8)`` bytes, the codes bit-packed at ``B``
  bits each, LSB-first, by :func:`viq.formats.bits.pack_bits` (unused high bits of the last byte are 0),
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
of all finalised shard indexes; :meth:`CodeStore.refresh` picks up shards finalised since.

The ``.idx.json`` files are the source of truth; readers do not parse them on open but use two
derived binary files (:mod:`viq.store.index`): a ``.lookup`` per shard (written by the writer right
after finalising the shard, else by the first reader; keyed by the ``(mtime_ns, size)`` of its
``.idx.json``) and one merged ``index/<key>.viqx`` (keyed by the list of shard indexes; built by the
first reader that needs it, atomically, and memory-mapped by every process). Stores written before
these files existed open unchanged (the files are derived once); deleting them is always safe. If two shards claim the same sample id, the first in shard order
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

import dataclasses
import functools
import hashlib
import json
import math
import os
import re
import struct
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Union

from viq._io import create_exclusive
from viq._untrusted import loads_json
from viq.formats.bits import bits_for_levels

__all__ = ["IndexEntry", "ShardName", "StoreConfig", "StoreError", "file_sha256"]

PathLike = Union[str, "os.PathLike[str]"]

STORE_FORMAT = "viq-code-store"
SHARD_INDEX_FORMAT = "viq-code-store-shard"
FORMAT_VERSION = 1
STORE_FILE = "store.json"
SHARD_DIR = "shards"
SHARD_MAGIC = b"VIQS"
SHARD_HEADER = struct.Struct("<4sHH")  # magic, version, flags
SHARD_HEADER_SIZE = SHARD_HEADER.size  # 8: offset of the first record
FLAG_ENTROPY = 1


WRITER_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
# Greedy name, so "a-b-000001.bin" is writer "a-b", seq 1.
SHARD_FILE = re.compile(r"(?P<writer>.+)-(?P<seq>\d{6,})\.bin")
INDEX_FILE = re.compile(r"(?P<writer>.+)-(?P<seq>\d{6,})\.idx\.json")
#: A shard's binary lookup file, derived from its index (see :mod:`viq.store.index`).
LOOKUP_FILE = re.compile(r"(?P<writer>.+)-(?P<seq>\d{6,})\.lookup")
#: The hidden temporary file of an atomic write of a lookup file (:func:`viq._io.atomic_write`).
LOOKUP_TMP = re.compile(r"\.(?P<writer>.+)-(?P<seq>\d{6,})\.lookup\..+\.tmp")
#: ``shards/.<writer>.lock``: held (flock) by the one process writing under that name
WRITER_LOCK = re.compile(r"\.(?P<writer>[A-Za-z0-9][A-Za-z0-9._-]{0,127})\.lock")


@dataclasses.dataclass(frozen=True)
class ShardName:
    """The names of one shard's files: ``<writer>-<seq>`` plus ``.bin`` (records), ``.idx.json`` (its
    index) and ``.lookup`` (the index as binary columns). The one place these names are spelt."""

    writer: str
    seq: int

    @property
    def base(self) -> str:
        return f"{self.writer}-{self.seq:06d}"

    @property
    def bin(self) -> str:
        return self.base + ".bin"

    @property
    def index(self) -> str:
        return self.base + ".idx.json"

    @property
    def lookup(self) -> str:
        return self.base + ".lookup"

    @classmethod
    def parse(cls, filename: str) -> ShardName | None:
        """The shard a ``.bin``, ``.idx.json`` or ``.lookup`` file name belongs to (None: another file)."""
        m = SHARD_FILE.fullmatch(filename) or INDEX_FILE.fullmatch(filename) or LOOKUP_FILE.fullmatch(filename)
        return cls(m["writer"], int(m["seq"])) if m else None


def writer_lock_name(writer: str) -> str:
    """The lock file of writer ``writer`` in ``shards/`` (see :data:`WRITER_LOCK`)."""
    return f".{writer}.lock"


#: Suffix of a shard or index file still being written (``<writer>-<seq>.bin.tmp``).
TMP_SUFFIX = ".tmp"
HEX64 = re.compile(r"[0-9a-f]{64}")


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


# --------------------------------------------------------------------------------------
# store.json
# --------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class StoreConfig:
    """The configuration of a store, as ``store.json`` holds it (see the layout above).

    Attributes:
        levels: FSQ levels of the codes, e.g. ``(8, 8, 8, 6, 5)``.
        codes_per_patch: codes per patch (4 for ViQ).
        patch_size: patch side in pixels (16 for ViQ).
        model_fingerprint: id of the code space (:meth:`viq.ViQModel.fingerprint`).
        entropy_coding: records are LZMA-coded (``codec`` ``"lzma"``), else bit-packed.
        shard_bytes: writers roll over to a new shard when one would exceed this many bytes.
    """

    levels: tuple[int, ...]
    codes_per_patch: int
    patch_size: int
    model_fingerprint: str
    entropy_coding: bool
    shard_bytes: int

    # cached_property writes the instance __dict__ directly, so it works on a frozen dataclass;
    # both are read per record, on the hot path.
    @functools.cached_property
    def codebook_size(self) -> int:
        """``K = prod(levels)``."""
        return math.prod(self.levels)

    @functools.cached_property
    def bits_per_code(self) -> int:
        """Bits per code of packed records, ``max(1, ceil(log2 K))``."""
        return bits_for_levels(self.levels)

    @property
    def codec(self) -> str:
        """``"lzma"`` or ``"packed"``: always agrees with ``entropy_coding``."""
        return "lzma" if self.entropy_coding else "packed"

    @classmethod
    def build(
        cls,
        *,
        levels: Sequence[int],
        codes_per_patch: int,
        patch_size: int,
        model_fingerprint: str,
        entropy_coding: bool,
        shard_bytes: int,
    ) -> StoreConfig:
        """The configuration of a new store, from the arguments of ``CodeStore.create``.

        Raises:
            ValueError: invalid levels, ``codes_per_patch`` / ``patch_size`` outside
                ``[1, 65535]``, empty fingerprint, non-positive ``shard_bytes``.
        """
        lv = tuple(int(v) for v in levels)
        bits_for_levels(lv)  # validates the levels
        for name, value in (("codes_per_patch", codes_per_patch), ("patch_size", patch_size)):
            if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= 0xFFFF:
                raise ValueError(f"{name} must be an integer in [1, 65535], got {value!r}")
        if not isinstance(model_fingerprint, str) or not model_fingerprint:
            raise ValueError(f"model_fingerprint must be a non-empty string, got {model_fingerprint!r}")
        if isinstance(shard_bytes, bool) or not isinstance(shard_bytes, int) or shard_bytes < 1:
            raise ValueError(f"shard_bytes must be a positive integer, got {shard_bytes!r}")
        return cls(lv, codes_per_patch, patch_size, model_fingerprint, bool(entropy_coding), shard_bytes)

    @classmethod
    def from_dict(cls, config: Mapping[str, Any]) -> StoreConfig:
        """Parse the fields of a ``store.json`` object, checking the derived ones agree.

        ``format`` and ``format_version`` are the caller's to check first (their errors name the file
        as not a store at all, or of another version).

        Raises:
            KeyError: a missing field. TypeError, ValueError: an invalid or inconsistent one.
        """
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
        return cls(
            levels,
            int(config["codes_per_patch"]),
            int(config["patch_size"]),
            str(config["model_fingerprint"]),
            bool(config["entropy_coding"]),
            int(config["shard_bytes"]),
        )

    def to_dict(self) -> dict[str, Any]:
        """The ``store.json`` object, fields in file order."""
        return {
            "format": STORE_FORMAT,
            "format_version": FORMAT_VERSION,
            "levels": list(self.levels),
            "codebook_size": self.codebook_size,
            "bits_per_code": self.bits_per_code,
            "codes_per_patch": self.codes_per_patch,
            "patch_size": self.patch_size,
            "model_fingerprint": self.model_fingerprint,
            "entropy_coding": self.entropy_coding,
            "codec": self.codec,
            "shard_bytes": self.shard_bytes,
        }


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


# --------------------------------------------------------------------------------------
# Records
# --------------------------------------------------------------------------------------


# --------------------------------------------------------------------------------------
# Small file helpers
# --------------------------------------------------------------------------------------


def json_bytes(obj: Any) -> bytes:
    """Compact UTF-8 JSON, as ``store.json`` and shard indexes are written."""
    return json.dumps(obj, ensure_ascii=False, separators=(",", ":"), allow_nan=False).encode("utf-8")


def file_sha256(path: PathLike, chunk_bytes: int = 1 << 20) -> str:
    """sha256 hex digest of a file's bytes: the ``content_hash`` of an image file."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(chunk_bytes):
            h.update(chunk)
    return h.hexdigest()


# --------------------------------------------------------------------------------------
# Shard indexes
# --------------------------------------------------------------------------------------


def read_store_config(path: Path) -> tuple[StoreConfig, dict[str, Any]]:
    """The configuration of the store at ``path`` (its ``store.json``), checked: (parsed, as stored).

    Raises:
        StoreError: the directory or ``store.json`` is missing, unreadable, of another format or
            version, or inconsistent.
    """
    if not path.is_dir():
        raise StoreError(path, "no such directory (not a code store)")
    store_file = path / STORE_FILE
    if not store_file.is_file():
        raise StoreError(path, f"not a viq code store (no {STORE_FILE})")
    try:
        config = loads_json(store_file.read_text(encoding="utf-8"), store_file)
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
        parsed = StoreConfig.from_dict(config)
    except (KeyError, TypeError, ValueError) as exc:
        what = f"missing field {exc}" if isinstance(exc, KeyError) else str(exc)
        raise StoreError(store_file, f"invalid configuration: {what}") from None
    if not (path / SHARD_DIR).is_dir():
        raise StoreError(path, f"corrupt code store: missing {SHARD_DIR}/ directory")
    return parsed, config


def create_store_dir(path: Path, config: StoreConfig) -> bool:
    """Make ``path`` a store of ``config`` unless it is one already: True when this call created it (of
    processes creating it at once, exactly one wins; the others then open it)."""

    store_file = path / STORE_FILE
    if store_file.exists():
        return False
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
    return create_exclusive(store_file, json_bytes(config.to_dict()) + b"\n")
