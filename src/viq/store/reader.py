"""Reading a code store: :class:`CodeStore`, memory-mapped random access to the codes of an image
by its sample id (the layout is described in :mod:`viq.store.format`)."""

from __future__ import annotations

import collections
import json
import logging
import mmap
import os
import zlib
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from viq._io import create_exclusive
from viq.formats.codes import Codes
from viq.store.format import (
    FORMAT_VERSION,
    INDEX_FILE,
    SHARD_DIR,
    SHARD_HEADER_SIZE,
    STORE_FILE,
    STORE_FORMAT,
    IndexEntry,
    PathLike,
    ShardIndex,
    StoreConfig,
    StoreError,
    decode_record,
    json_bytes,
    parse_shard_index,
)
from viq.store.scan import VerifyReport, code_stats, verify_shards
from viq.store.writer import ShardWriter

__all__ = ["CodeStore"]

log = logging.getLogger(__name__)

# Memory-mapped shards kept open per process. Each mapping holds a file descriptor, and a
# store can have thousands of shards, so the cache is LRU-bounded well below common fd limits.
_MAX_OPEN_SHARDS = 64


class CodeStore:
    """A directory of append-only shards plus an index (layout: see :mod:`viq.store.format`).

    Reading is memory-mapped random access by sample id (:meth:`get`) or sequential
    iteration in index order. Writing goes through :meth:`writer`, one :class:`ShardWriter`
    per process. Instances are picklable (open memory maps are not carried along; each
    process maps shards lazily), so a store can be handed to ``DataLoader`` workers.

    Use :meth:`create` or :meth:`open`, not the constructor.
    """

    def __init__(self, path: Path, config: StoreConfig, mode: str, raw: dict[str, Any] | None = None) -> None:
        """``raw``: the ``store.json`` object as read (default: ``config.to_dict()``)."""
        self._path = path
        self._cfg = config
        self._config = config.to_dict() if raw is None else raw
        self._mode = mode
        # Unpacked once: read for every record.
        self._levels: tuple[int, ...] = config.levels
        self._k = config.codebook_size
        self._bits = config.bits_per_code
        self._cpp = config.codes_per_patch
        self._patch = config.patch_size
        self._fingerprint = config.model_fingerprint
        self._entropy = config.entropy_coding
        self._shard_bytes = config.shard_bytes
        self._shards: list[ShardIndex] = []
        self._parsed: dict[str, ShardIndex] = {}  # index file name -> parsed (reused by refresh)
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
            entropy_coding: LZMA-compress each record (see :mod:`viq.store.format`).
            shard_bytes: roll over to a new shard when a shard would exceed this many bytes.
            exist_ok: if False, an existing store is an error.

        Raises:
            StoreError: existing incompatible store, non-empty non-store directory, or
                ``exist_ok=False`` with an existing store.
            ValueError: invalid arguments.
        """
        path = Path(path)
        config = StoreConfig.build(levels=levels, codes_per_patch=codes_per_patch, patch_size=patch_size,
                                   model_fingerprint=model_fingerprint, entropy_coding=entropy_coding,
                                   shard_bytes=shard_bytes)
        wanted = config.to_dict()
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
            if create_exclusive(store_file, json_bytes(wanted) + b"\n"):
                log.info("created code store %s (levels %s, %s)", path, config.levels, config.codec)
                return cls(path, config, "a")
        if not exist_ok:
            raise StoreError(path, "a code store already exists here")
        store = cls.open(path, "a")
        diffs = [
            f"{key} {store._config[key]!r} (requested {wanted[key]!r})"
            for key in ("levels", "codes_per_patch", "patch_size", "model_fingerprint", "entropy_coding")
            if store._config[key] != wanted[key]
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
            parsed = StoreConfig.from_dict(config)
        except (KeyError, TypeError, ValueError) as exc:
            what = f"missing field {exc}" if isinstance(exc, KeyError) else str(exc)
            raise StoreError(store_file, f"invalid configuration: {what}") from None
        if not (path / SHARD_DIR).is_dir():
            raise StoreError(path, f"corrupt code store: missing {SHARD_DIR}/ directory")
        return cls(path, parsed, mode, config)

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

    @property
    def store_config(self) -> StoreConfig:
        """``store.json`` parsed (immutable)."""
        return self._cfg

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
            m = INDEX_FILE.fullmatch(name)
            if m:
                found.append((m["writer"], int(m["seq"]), name))
        found.sort()  # shard order: writer name, then seq (numeric)

        problems: list[str] = []
        parsed: dict[str, ShardIndex] = {}
        shards: list[ShardIndex] = []
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
                    shard = parse_shard_index(shard_dir / index_name, writer, seq, key, self._cfg)
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

    def _locate(self, sample_id: str) -> tuple[ShardIndex, int]:
        try:
            si, row = self._by_id[sample_id]
        except (KeyError, TypeError):
            raise KeyError(sample_id) from None
        return self._shards[si], row

    def entry(self, sample_id: str) -> IndexEntry:
        """Index entry of ``sample_id`` (raises KeyError if absent)."""
        shard, row = self._locate(sample_id)
        return self._entry(shard, row)

    def _entry(self, shard: ShardIndex, row: int) -> IndexEntry:
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

    def _map(self, shard: ShardIndex) -> mmap.mmap:
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

    def _record(self, shard: ShardIndex, row: int) -> bytes:
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

    def _codes(self, shard: ShardIndex, row: int, data: bytes) -> Codes:
        h, w = (int(v) for v in shard.grids[row])
        try:
            values = decode_record(data, h * w * self._cpp, self._bits, self._k, self._entropy)
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
        for shard, row, data in self._records():
            yield shard.ids[row], self._codes(shard, row, data)

    def _records(self) -> Iterator[tuple[ShardIndex, int, bytes]]:
        """``(shard, row, record bytes)`` of every distinct id, in index order (checked like :meth:`get`)."""
        for si, shard in enumerate(self._shards):
            for row, sid in enumerate(shard.ids):
                if self._by_id.get(sid) == (si, row):
                    yield shard, row, self._record(shard, row)

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

    def writer_records(self, name: str) -> Iterator[tuple[str, str]]:
        """``(sample_id, content_hash)`` of every record in the finalised shards of writer ``name``,
        in shard order, duplicates included (what a writer of that name already stored)."""
        for shard in self._shards:
            if shard.writer == name:
                yield from zip(shard.ids, shard.hashes)

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

    # ---- checking (the scans themselves are in viq.store.scan) ------------------------------

    def verify(self) -> VerifyReport:
        """Check everything; return a report listing problems (never raises for store damage).

        Re-reads the index first, then checks: index files that failed to load or whose shard
        is missing; each finalised shard's size, header and sha256; every record's bounds,
        contiguity, CRC-32 and decoding (length, padding bits, every code < K, image size vs
        grid); sample ids claimed more than once. Reads every byte of the store.
        """
        self.refresh()
        return verify_shards(self._path, self._cfg, self._shards, self._problems)

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

        Raises:
            StoreError: a corrupt record.
        """
        return code_stats(self._path, self._cfg, self._shards, self._records())
