"""Reading a code store: :class:`CodeStore`, memory-mapped random access to the codes of an image
by its sample id (the layout is described in :mod:`viq.store.format`).

:class:`CodeStore` opens a store and lists its shards, looks ids up in the merged index, maps the
shards and decodes records, and pickles itself for DataLoader workers. Around it: the index files and
their upkeep in :mod:`viq.store.index` and :mod:`viq.store.derived`, one shard's codec and index in
:mod:`viq.store.shard`, the scans behind ``verify`` / ``stats`` in :mod:`viq.store.scan`, appending in
:mod:`viq.store.writer`."""

from __future__ import annotations

import collections
import collections.abc
import json
import logging
import mmap
import os
import zlib
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from viq.formats.codes import Codes
from viq.store.derived import (
    open_merged_index,
    repair_lookup,
    repair_merged_index,
    shard_columns,
)
from viq.store.format import (
    INDEX_FILE,
    SHARD_DIR,
    SHARD_HEADER_SIZE,
    IndexEntry,
    PathLike,
    ShardName,
    StoreConfig,
    StoreError,
    create_store_dir,
    read_store_config,
)
from viq.store.index import FLAG_HASH, StoreIndex, store_key
from viq.store.scan import VerifyReport, code_stats, verify_shards
from viq.store.shard import ShardIndex, decode_record, parse_shard_index
from viq.store.store_ids import StoreIds
from viq.store.writer import ShardWriter

__all__ = ["CodeStore", "StoreIds"]  # StoreIds: viq.store.store_ids, named here too

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
        # The listed shard indexes ((idx.json name, (mtime_ns, size)), shard order), their digest, and
        # the compact memory-mapped index of them (viq.store.index), opened on first use.
        self._entries: list[tuple[str, tuple[int, int]]] = []
        self._key: str | None = None
        self._index: StoreIndex | None = None
        self._list_problems: list[str] = []  # shard indexes whose shard file is missing, etc.
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
        config = StoreConfig.build(
            levels=levels,
            codes_per_patch=codes_per_patch,
            patch_size=patch_size,
            model_fingerprint=model_fingerprint,
            entropy_coding=entropy_coding,
            shard_bytes=shard_bytes,
        )
        wanted = config.to_dict()
        if create_store_dir(path, config):
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
        if store.shard_bytes != shard_bytes:
            log.warning("%s: keeping the store's shard_bytes %d (requested %d)", path, store.shard_bytes, shard_bytes)
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
        parsed, raw = read_store_config(path)
        return cls(path, parsed, mode, raw)

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
        return self._cfg.levels

    @property
    def codebook_size(self) -> int:
        """``K = prod(levels)``."""
        return self._cfg.codebook_size

    @property
    def bits_per_code(self) -> int:
        """Bits per code of packed records, ``max(1, ceil(log2 K))``."""
        return self._cfg.bits_per_code

    @property
    def codes_per_patch(self) -> int:
        return self._cfg.codes_per_patch

    @property
    def patch_size(self) -> int:
        return self._cfg.patch_size

    @property
    def model_fingerprint(self) -> str:
        return self._cfg.model_fingerprint

    @property
    def entropy_coding(self) -> bool:
        return self._cfg.entropy_coding

    @property
    def shard_bytes(self) -> int:
        """Shard roll-over size in bytes."""
        return self._cfg.shard_bytes

    @property
    def config(self) -> dict[str, Any]:
        """A copy of ``store.json``."""
        return json.loads(json.dumps(self._config))

    @property
    def store_config(self) -> StoreConfig:
        """``store.json`` parsed (immutable): the one copy of the store's configuration; the properties
        above read it."""
        return self._cfg

    def __repr__(self) -> str:
        return (
            f"CodeStore({str(self._path)!r}, mode={self._mode!r}, images={len(self)}, shards={len(self._idx.shards)}, "
            f"levels={self._cfg.levels}, codec={self._config['codec']!r})"
        )

    # ---- index ----------------------------------------------------------------------------

    def refresh(self) -> None:
        """Re-list the shards: pick up shards that writers finalised since open / the last refresh.

        Cheap (one directory listing and a ``stat`` per shard index): the compact index
        (:mod:`viq.store.index`) is only opened, or built, when first needed, and only again when the
        list of shard indexes changed.
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
        entries: list[tuple[str, tuple[int, int]]] = []
        for _writer, _seq, index_name in found:
            bin_name = ShardName.parse(index_name).bin
            if bin_name not in names:
                problems.append(f"{index_name}: shard file {bin_name} is missing; its records are unavailable")
                continue
            try:
                st = os.stat(shard_dir / index_name)
            except OSError as exc:
                problems.append(f"{index_name}: cannot stat: {exc}")
                continue
            entries.append((index_name, (st.st_mtime_ns, st.st_size)))
        for p in problems:
            if p not in self._list_problems:
                log.warning("%s: %s", self._path, p)
        self._list_problems = problems
        key = store_key(entries)
        if key != self._key:
            self._entries, self._key, self._index = entries, key, None
            # Shard files are immutable, but drop mappings of shards that left the index.
            live = {ShardName.parse(n).bin for n, _ in entries}
            for name in [n for n in self._maps if n not in live]:
                self._maps.pop(name).close()

    @property
    def _idx(self) -> StoreIndex:
        """The compact index of the listed shards, opened (or built) on first use."""
        ix = self._index
        if ix is None:
            ix = self._index = self._load_index()
        return ix

    def _segment(
        self, index_name: str, stat_key: tuple[int, int], *, write: bool = True, trust_file: bool = True
    ) -> dict[str, np.ndarray]:
        """One shard's columns (:func:`viq.store.derived.shard_columns`)."""
        return shard_columns(self._path, self._cfg, index_name, stat_key, write=write, trust_file=trust_file)

    def _load_index(self, *, rebuild: bool = False) -> StoreIndex:
        """The merged index of the listed shards (:func:`viq.store.derived.open_merged_index`)."""
        return open_merged_index(self._path, self._cfg, self._entries, self._key, rebuild=rebuild)

    @property
    def _problems(self) -> list[str]:
        return self._list_problems + self._idx.problems

    def __len__(self) -> int:
        """Number of distinct sample ids."""
        return len(self._idx)

    def ids(self) -> StoreIds:
        """All distinct sample ids, in index order (shard order, then record order).

        A lazy, read-only sequence over the memory-mapped index (``len``, indexing, slicing, iteration,
        ``==`` with a list): no list of 10 M strings is built unless you ask for one (``list(...)``).
        """
        return StoreIds(self)

    def id_at(self, position: int) -> str:
        """The id at ``position`` in index order (``ids()[position]``)."""
        n = len(self._idx)
        if not -n <= position < n:
            raise IndexError(position)
        return self._idx.id_at(position % n)

    def __contains__(self, sample_id: object) -> bool:
        return isinstance(sample_id, str) and self._idx.find(sample_id) >= 0

    def has_hash(self, content_hash: str) -> str | None:
        """The sample id first stored with this content hash (sha256 of the image bytes), or None."""
        if not content_hash or len(content_hash) != 64:
            return None
        try:
            digest = bytes.fromhex(content_hash)
        except ValueError:
            return None
        p = self._idx.find_content(digest)
        return self._idx.id_at(p) if p >= 0 else None

    def _locate(self, sample_id: str) -> int:
        p = self._idx.find(sample_id) if isinstance(sample_id, str) else -1
        if p < 0:
            raise KeyError(sample_id)
        return p

    def entry(self, sample_id: str) -> IndexEntry:
        """Index entry of ``sample_id`` (raises KeyError if absent)."""
        return self._entry(self._locate(sample_id))

    def _entry(self, p: int) -> IndexEntry:
        ix = self._idx
        return IndexEntry(
            sample_id=ix.id_at(p),
            source=ix.source_at(p),
            content_hash=ix.content_hash_at(p),
            grid=(ix.grid[2 * p], ix.grid[2 * p + 1]),
            image_size=ix.image_size_at(p),
            shard=ix.shards[ix.shard_no[p]],
            offset=ix.offset[p],
            length=ix.length[p],
            crc32=ix.crc[p],
            model_fingerprint=self._cfg.model_fingerprint,
            levels=self._cfg.levels,
            codes_per_patch=self._cfg.codes_per_patch,
            patch_size=self._cfg.patch_size,
        )

    # ---- reading --------------------------------------------------------------------------

    def _map(self, shard: str) -> mmap.mmap:
        """The shard's read-only memory map, opened lazily, per process, LRU-bounded."""
        if self._maps_pid != os.getpid():
            # Forked DataLoader worker: never share the parent's mappings / descriptors.
            self._maps = collections.OrderedDict()
            self._maps_pid = os.getpid()
        m = self._maps.get(shard)
        if m is not None:
            self._maps.move_to_end(shard)
            return m
        path = self._path / SHARD_DIR / shard
        try:
            with open(path, "rb") as fh:
                m = mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ)
        except (OSError, ValueError) as exc:  # ValueError: empty file
            raise StoreError(path, f"cannot map shard: {exc}") from None
        self._maps[shard] = m
        while len(self._maps) > _MAX_OPEN_SHARDS:
            self._maps.popitem(last=False)[1].close()
        return m

    def _record(self, p: int) -> bytes:
        """Record bytes of position ``p``, bounds- and CRC-checked (raises StoreError)."""
        ix = self._idx
        shard = ix.shards[ix.shard_no[p]]
        m = self._map(shard)
        off, length = ix.offset[p], ix.length[p]
        if off < SHARD_HEADER_SIZE or off + length > len(m):
            raise StoreError(
                self._path / SHARD_DIR / shard,
                f"record {ix.id_at(p)!r} at [{off}, {off + length}) lies outside the shard ({len(m)} bytes)",
            )
        data = m[off : off + length]
        if zlib.crc32(data) != ix.crc[p]:
            raise StoreError(self._path / SHARD_DIR / shard, f"record {ix.id_at(p)!r}: CRC-32 mismatch (corrupt)")
        return data

    def _codes(self, p: int, data: bytes) -> Codes:
        ix, cfg = self._idx, self._cfg
        h, w = ix.grid[2 * p], ix.grid[2 * p + 1]
        try:
            values = decode_record(
                data, h * w * cfg.codes_per_patch, cfg.bits_per_code, cfg.codebook_size, cfg.entropy_coding
            )
            meta = {"model": cfg.model_fingerprint}
            source = ix.source_at(p)
            if source:
                meta["source"] = source
            return Codes(
                torch.from_numpy(values.view(np.int32).reshape(h, w, cfg.codes_per_patch)),
                cfg.levels,
                image_size=ix.image_size_at(p),
                patch_size=cfg.patch_size,
                metadata=meta,
            )
        except ValueError as exc:
            raise StoreError(
                self._path / SHARD_DIR / ix.shards[ix.shard_no[p]], f"record {ix.id_at(p)!r}: {exc}"
            ) from None

    def get(self, sample_id: str) -> Codes:
        """The codes of ``sample_id``, read from the memory-mapped shard.

        The returned :class:`~viq.formats.codes.Codes` carry ``metadata = {"model": <fingerprint>,
        "source": <source>}`` (source only if given), like the files ``viq encode`` writes.

        Raises:
            KeyError: unknown sample id.
            StoreError: the record is corrupt (CRC, bounds, decoding, out-of-range code).
        """
        p = self._locate(sample_id)
        return self._codes(p, self._record(p))

    __getitem__ = get

    def get_at(self, position: int) -> Codes:
        """The codes of the id at ``position`` in index order (no id lookup)."""
        n = len(self._idx)
        if not -n <= position < n:
            raise IndexError(position)
        p = position % n
        return self._codes(p, self._record(p))

    def __iter__(self) -> Iterator[tuple[str, Codes]]:
        """``(sample_id, Codes)`` for every distinct id, in index order (sequential reads)."""
        for p, sid in enumerate(self._idx.iter_ids()):
            yield sid, self._codes(p, self._record(p))

    def _records(self) -> Iterator[tuple[str, str, tuple[int, int], tuple[int, int] | None, bytes]]:
        """``(id, shard, grid, image_size, record bytes)`` of every distinct id, in index order
        (checked like :meth:`get`)."""
        ix = self._idx
        for p, sid in enumerate(ix.iter_ids()):
            yield (
                sid,
                ix.shards[ix.shard_no[p]],
                (ix.grid[2 * p], ix.grid[2 * p + 1]),
                ix.image_size_at(p),
                self._record(p),
            )

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
        for index_name, stat_key in self._entries:
            m = INDEX_FILE.fullmatch(index_name)
            if m is None or m["writer"] != name:  # _entries holds index names only
                continue
            try:
                seg = self._segment(index_name, stat_key)
            except ValueError:
                continue  # unusable index: its shard is skipped by readers too
            off = seg["id_off"].astype(np.int64).tolist()
            blob = seg["id_blob"].tobytes()
            flags = seg["flags"]
            chash = seg["chash"]
            for row in range(len(off) - 1):
                sid = blob[off[row] : off[row + 1]].decode("utf-8", "surrogatepass")
                yield sid, chash[row].tobytes().hex() if flags[row] & FLAG_HASH else ""

    # ---- pickling -------------------------------------------------------------------------

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_maps"] = None  # memory maps are per process: re-opened lazily after unpickling
        state["_index"] = None  # the index file of the same key is mapped again (or rebuilt) on first use
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

    def verify(self, progress: Callable[[int], object] | None = None) -> VerifyReport:
        """Check everything; return a report listing problems (never raises for store damage).
        ``progress(n)`` is called as records are checked (n at a time; they add up to ``len(self)``).

        Re-reads the index first, then checks: index files that failed to load or whose shard
        is missing; each finalised shard's size, header and sha256; every record's bounds,
        contiguity, CRC-32 and decoding (length, padding bits, every code < K, image size vs
        grid); sample ids claimed more than once; the derived index files, rebuilt when damaged
        (listed in ``report.repaired``). Reads every byte of the store.
        """
        self.refresh()
        shard_dir = self._path / SHARD_DIR
        problems = list(self._list_problems)
        shards: list[ShardIndex] = []
        repaired: list[str] = []
        for index_name, stat_key in self._entries:
            name = ShardName.parse(index_name)
            try:
                shard = parse_shard_index(shard_dir / index_name, name.writer, name.seq, stat_key, self._cfg)
            except ValueError as exc:
                problems.append(f"{index_name}: {exc}; shard skipped")
                continue
            shards.append(shard)
            repaired += repair_lookup(self._path, shard, stat_key)
        if repaired:  # a lookup file was rewritten: the merged index (same key) must be derived again
            self._index = self._load_index(rebuild=True)
        found = repair_merged_index(self._idx, shards)
        if found:
            self._index = self._load_index(rebuild=True)
        report = verify_shards(self._path, self._cfg, shards, problems, progress)
        report.repaired.extend(repaired + found)
        return report

    def stats(
        self, progress: Callable[[int], object] | None = None, each: Callable[[np.ndarray], object] | None = None
    ) -> dict[str, Any]:
        """Size and code-usage statistics (reads and decodes every record; ``progress(n)`` is called as
        records are read, n at a time; ``each(codes)`` with every record's decoded codes, flat, in official
        order): the dict of :func:`viq.store.scan.code_stats` (images, bits per pixel, the code histogram,
        entropy, perplexity, codebook use, ...). Raises StoreError for a corrupt record."""
        files = [(name, ShardName.parse(name).index) for name in self._idx.shards]
        try:
            return code_stats(self._path, self._cfg, files, self._records(), progress, each)
        except IndexError as exc:  # an index that names a shard or record that is not there
            raise StoreError(
                self._path,
                f"its index does not match its shards ({exc}); `viq store verify` checks every entry and rebuilds it",
            ) from None
