"""A store's derived index files: deriving them from the shard indexes, opening them, repairing them.

The ``.idx.json`` of each shard is the truth (:mod:`viq.store.format`); two kinds of files are derived
from it (their format: :mod:`viq.store.index`):

* per shard, ``<writer>-<seq>.lookup``: its records as binary columns (:func:`shard_columns` reads it,
  or parses the ``.idx.json`` and writes it when it is missing, stale or damaged);
* per list of shards, ``index/<key>.viqx``: the merged index every reader maps (:func:`open_merged_index`
  opens it, or builds it under ``index/.build.lock`` so that the processes of one job build it once).

:func:`repair_lookup` and :func:`repair_merged_index` are ``viq store verify``'s checks of both.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from viq._io import first_lock
from viq.store.format import (
    SHARD_DIR,
    ShardName,
    StoreConfig,
    StoreError,
)
from viq.store.index import (
    BUILD_LOCK,
    INDEX_SUFFIX,
    STAMP_SUFFIX,
    IndexCorrupt,
    StoreIndex,
    build_store_index,
    columns_to_arrays,
    index_dirs,
    read_lookup,
    write_lookup,
)
from viq.store.shard import ShardIndex, parse_shard_index

__all__ = ["shard_columns", "open_merged_index", "repair_lookup", "repair_merged_index"]

log = logging.getLogger(__name__)

#: (index file name, (mtime_ns, size) of it): a shard as the store lists it
Entry = tuple[str, tuple[int, int]]


def shard_columns(
    store: Path,
    cfg: StoreConfig,
    index_name: str,
    stat_key: tuple[int, int],
    *,
    write: bool = True,
    trust_file: bool = True,
) -> dict[str, np.ndarray]:
    """One shard's columns: its ``.lookup`` file, else parsed from its ``.idx.json`` (and the
    ``.lookup`` file written for next time). Raises ValueError for an unusable shard index."""
    shard_dir = store / SHARD_DIR
    name = ShardName.parse(index_name)
    lookup = shard_dir / name.lookup
    if trust_file:
        try:
            return read_lookup(lookup, name.bin, stat_key)
        except IndexCorrupt as exc:
            if lookup.exists():
                log.info("%s: rebuilding %s (%s)", store, lookup.name, exc)
    shard = parse_shard_index(shard_dir / index_name, name.writer, name.seq, stat_key, cfg)
    arrays = columns_to_arrays(
        shard.ids, shard.sources, shard.hashes, shard.grids, shard.image_sizes, shard.offsets, shard.lengths, shard.crcs
    )
    if write:
        try:
            write_lookup(lookup, shard.name, stat_key, arrays)
        except OSError as exc:
            log.debug("%s: cannot write %s: %s", store, lookup, exc)
    return arrays


def open_merged_index(
    store: Path, cfg: StoreConfig, entries: Sequence[Entry], key: str, *, rebuild: bool = False
) -> StoreIndex:
    """The merged index of ``entries``, built if missing, stale or corrupt.

    The build runs under a lock (``.build.lock`` in the first index directory that takes one), so that
    processes opening a changed store at once (the ranks of a job) build it once: the others wait, then
    map the file the first one wrote."""
    dirs = index_dirs(store)
    fname = f"{key}{INDEX_SUFFIX}"
    if not rebuild and (ix := _open_existing(store, dirs, fname, key)) is not None:
        return ix
    with first_lock([d / BUILD_LOCK for d in dirs]):
        if not rebuild and (ix := _open_existing(store, dirs, fname, key)) is not None:
            return ix  # built by another process while this one waited
        return _build(store, cfg, entries, key, dirs, fname)


def _open_existing(store: Path, dirs: list[Path], fname: str, key: str) -> StoreIndex | None:
    """The first usable ``fname`` in ``dirs`` (an unusable one is deleted), or None."""
    for d in dirs:
        path = d / fname
        if not path.exists():
            continue
        try:
            ix = StoreIndex(path, key)
        except IndexCorrupt as exc:
            log.warning("%s: index file %s is unusable (%s); rebuilding it", store, path, exc)
            with contextlib.suppress(OSError):
                path.unlink()
            continue
        # Shards skipped when the index was built are named by every command that reads the store,
        # not only the one that built it (a damaged store never reads as a quietly smaller one).
        for problem in ix.problems:
            log.warning("%s: %s", store, problem)
        return ix
    return None


def _build(
    store: Path, cfg: StoreConfig, entries: Sequence[Entry], key: str, dirs: list[Path], fname: str
) -> StoreIndex:
    """Build ``fname`` from the shards' lookup columns into the first writable of ``dirs``."""
    t0 = time.perf_counter()
    shards: list[str] = []
    segments: list[dict[str, np.ndarray]] = []
    problems: list[str] = []
    for index_name, stat_key in entries:
        try:
            segments.append(shard_columns(store, cfg, index_name, stat_key))
        except ValueError as exc:
            problems.append(f"{index_name}: {exc}; shard skipped")
            continue
        shards.append(ShardName.parse(index_name).bin)
    for p in problems:
        log.warning("%s: %s", store, p)
    errors = []
    for d in dirs:
        path = d / fname
        try:
            d.mkdir(parents=True, exist_ok=True)
            build_store_index(path, key, shards, entries, segments, problems)
            ix = StoreIndex(path, key)
        except (OSError, IndexCorrupt) as exc:
            errors.append(f"{path}: {exc}")
            continue
        # Superseded indexes of this store (processes that mapped one keep their mapping).
        for old in [*d.glob(f"*{INDEX_SUFFIX}"), *d.glob(f"*{INDEX_SUFFIX}{STAMP_SUFFIX}")]:
            if not old.name.startswith(fname):
                with contextlib.suppress(OSError):
                    old.unlink()
        log.info(
            "%s: built index %s (%d ids, %d shards) in %.2f s",
            store,
            path,
            len(ix),
            len(shards),
            time.perf_counter() - t0,
        )
        return ix
    raise StoreError(store, "cannot write the store index anywhere: " + "; ".join(errors))


def repair_lookup(store: Path, shard: ShardIndex, stat_key: tuple[int, int]) -> list[str]:
    """Check a shard's ``.lookup`` file against its ``.idx.json``; rewrite it if it differs. Returns
    what was repaired."""
    lookup = store / SHARD_DIR / ShardName.parse(shard.name).lookup
    want = columns_to_arrays(
        shard.ids, shard.sources, shard.hashes, shard.grids, shard.image_sizes, shard.offsets, shard.lengths, shard.crcs
    )
    try:
        have = read_lookup(lookup, shard.name, stat_key)
        if all(np.array_equal(have[k], want[k]) for k in want):
            return []
        why = "its contents differ from the shard index"
    except IndexCorrupt as exc:
        why = str(exc) if lookup.exists() else ""
    try:
        write_lookup(lookup, shard.name, stat_key, want)
    except OSError:
        pass
    return [f"{lookup.name}: {why}; rewritten from {shard.index_name}"] if why else []


def repair_merged_index(ix: StoreIndex, shards: Sequence[ShardIndex] | None = None) -> list[str]:
    """Check every checksum of a merged index file (reads it whole) and, given the parsed ``shards``,
    every entry against them (shard number, offset, length, CRC of each record, in order): an index
    crafted with valid checksums is caught too. Delete it when anything fails, so that the next open
    rebuilds it from the shard indexes. Returns what was found."""
    bad = ix.file.check_crcs()
    why = f"checksum mismatch in {', '.join(bad)}" if bad else None
    if why is None and shards is not None:
        why = _entries_differ(ix, {s.name: s for s in shards})
    if why is None:
        return []
    with contextlib.suppress(OSError):
        ix.path.unlink()
    return [f"{ix.path}: {why}; index rebuilt"]


def _entries_differ(ix: StoreIndex, by_name: dict[str, ShardIndex]) -> str | None:
    """How the merged index's entries differ from the shard indexes they were derived from (None: equal)."""
    n = len(ix)
    shard_no = np.asarray(ix.shard_no, dtype=np.int64)
    if n and (shard_no.min() < 0 or shard_no.max() >= len(ix.shards)):
        return f"an entry names shard number {int(shard_no.max())} of {len(ix.shards)}"
    missing = [name for name in ix.shards if name not in by_name]
    if missing:
        return f"it lists shard(s) {', '.join(missing[:3])} that have no usable index"
    if n and np.any(np.diff(shard_no) < 0):
        return "its entries are not in shard order"
    have = {c: np.asarray(getattr(ix, c), dtype=np.int64) for c in ("offset", "length", "crc")}
    bounds = np.searchsorted(shard_no, np.arange(len(ix.shards) + 1))
    for i, name in enumerate(ix.shards):
        # Entry rows of shard i: its records in order, less the ids another shard claimed first.
        part, lo, hi = by_name[name], int(bounds[i]), int(bounds[i + 1])
        offsets = np.asarray(part.offsets, dtype=np.int64)
        at = np.searchsorted(offsets, have["offset"][lo:hi])
        at_ok = np.minimum(at, max(len(offsets) - 1, 0))
        good = (
            (at < len(offsets)) & (offsets[at_ok] == have["offset"][lo:hi])
            if len(offsets)
            else np.zeros(hi - lo, dtype=bool)
        )
        if good.all():
            good &= (np.asarray(part.lengths, dtype=np.int64)[at_ok] == have["length"][lo:hi]) & (
                np.asarray(part.crcs, dtype=np.int64)[at_ok] == have["crc"][lo:hi]
            )
        if hi > lo + 1 and good.all():
            good[1:] &= np.diff(at) > 0
        if not good.all():
            row = lo + int(np.flatnonzero(~good)[0])
            return (
                f"entry {row} (shard {name}: offset {int(have['offset'][row])}, length {int(have['length'][row])}) "
                f"is not a record of its shard index"
            )
    return None
