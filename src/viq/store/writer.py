"""Appending to a code store: :class:`ShardWriter`, one per process, lock-free (the durability
protocol is described in :mod:`viq.store.format`)."""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Protocol

from viq._faults import fault_point
from viq._io import LockHeld, OwnerLock, fsync_dir, writing
from viq.formats.codes import Codes
from viq.store.format import (
    FLAG_ENTROPY,
    FORMAT_VERSION,
    HEX64,
    INDEX_FILE,
    LOOKUP_FILE,
    LOOKUP_TMP,
    SHARD_DIR,
    SHARD_FILE,
    SHARD_HEADER,
    SHARD_INDEX_FORMAT,
    SHARD_MAGIC,
    TMP_SUFFIX,
    WRITER_NAME,
    ShardName,
    StoreConfig,
    StoreError,
    json_bytes,
    writer_lock_name,
)
from viq.store.index import columns_to_arrays, write_lookup
from viq.store.shard import encode_record

__all__ = ["ShardWriter"]

log = logging.getLogger(__name__)


class AppendableStore(Protocol):
    """What a writer needs of its store (:class:`~viq.store.reader.CodeStore`, opened with mode ``"a"``).

    A protocol rather than an import: the reader creates writers (``CodeStore.writer``), so the writer
    must not import the reader.
    """

    @property
    def path(self) -> Path: ...

    @property
    def store_config(self) -> StoreConfig: ...

    def refresh(self) -> None: ...

    def writer_records(self, name: str) -> Iterator[tuple[str, str]]: ...


class ShardWriter:
    """Appends records to shards ``shards/<name>-<seq>.bin`` of one store (one per process).

    Records go to a temporary shard file; :meth:`flush` (automatic when the shard would
    exceed the store's ``shard_bytes``) finalises it atomically, after which everything added
    so far is durable and visible to readers (after their ``CodeStore.refresh()``).
    Creating a writer deletes the leftovers (``.tmp`` files, shards without index) of a
    previous writer with the same name, which must therefore not be running anymore, and
    continues its numbering. Use as a context manager, or call :meth:`close`.

    Not thread-safe; use one writer per thread or process, each with its own name.
    """

    def __init__(self, store: AppendableStore, name: str) -> None:
        if not isinstance(name, str) or not WRITER_NAME.fullmatch(name) or name.endswith(TMP_SUFFIX):
            raise ValueError(
                f"writer name must match [A-Za-z0-9][A-Za-z0-9._-]* (at most 128 characters), got {name!r}"
            )
        self._store = store
        self._cfg = store.store_config
        self._name = name
        self._dir = store.path / SHARD_DIR
        self._closed = False
        # One process per writer name, before anything is touched: a second writer of the same name would
        # delete this one's unfinished shard as a leftover and number its shards over this one's.
        try:
            self._lock = OwnerLock(self._dir / writer_lock_name(name))
        except LockHeld as e:
            raise StoreError(
                store.path,
                f"writer {name!r} is already writing to this store ({e.holder}); "
                f"two writers of one name would corrupt it: wait for it to finish, or give "
                f"this one another rank / name",
            ) from None
        self._seq = self._clean_up_and_number()
        store.refresh()
        # Ids (and hashes) this writer already finalised in earlier runs: re-adding one is a
        # duplicate within the writer, which add() refuses.
        self._ids: set[str] = set()
        self._hashes: dict[str, str] = {}
        for sid, h in store.writer_records(name):
            self._ids.add(sid)
            if h:
                self._hashes.setdefault(h, sid)
        self._fh: Any = None  # open temporary shard file
        self._reset_shard()
        self.records_written = 0  # records finalised by this writer object
        self.shards_written = 0

    @property
    def name(self) -> str:
        return self._name

    def _shard(self, seq: int) -> ShardName:
        return ShardName(self._name, seq)

    def _clean_up_and_number(self) -> int:
        """Delete own leftovers; return the next shard number (after the last finalised one)."""
        last = -1
        entries = sorted(e.name for e in os.scandir(self._dir))
        indexes = set()
        for fname in entries:
            m = INDEX_FILE.fullmatch(fname)
            if m and m["writer"] == self._name:
                indexes.add(fname)
                last = max(last, int(m["seq"]))
        for fname in entries:
            m = LOOKUP_TMP.fullmatch(fname) or LOOKUP_FILE.fullmatch(fname)
            if (
                m
                and m["writer"] == self._name
                and (fname.startswith(".") or ShardName.parse(fname).index not in indexes)
            ):
                log.info("%s: removing leftover %s", self._dir, fname)
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(self._dir / fname)
                continue
            target = fname[: -len(TMP_SUFFIX)] if fname.endswith(TMP_SUFFIX) else None
            m = SHARD_FILE.fullmatch(target or fname) or INDEX_FILE.fullmatch(target or fname)
            if not m or m["writer"] != self._name:
                continue
            orphan = target is None and fname.endswith(".bin") and ShardName.parse(fname).index not in indexes
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
            content_hash: sha256 hex digest of the image file bytes
                (:func:`~viq.store.format.file_sha256`), for ``CodeStore.has_hash`` de-duplication;
                ``""`` if unknown.

        Raises:
            ValueError: empty/duplicate id (already added by this writer name), bad hash.
            StoreError: codes from another code space (levels, layout or model fingerprint),
                or the writer is closed.
        """
        cfg = self._cfg
        if self._closed:
            raise StoreError(self._store.path, f"writer {self._name!r} is closed")
        if not isinstance(sample_id, str) or not sample_id:
            raise ValueError(f"sample_id must be a non-empty string, got {sample_id!r}")
        if sample_id in self._ids:
            raise ValueError(f"duplicate sample id {sample_id!r}: writer {self._name!r} already stored it")
        if not isinstance(codes, Codes):
            raise TypeError(f"codes must be viq.Codes, got {type(codes).__name__}")
        if not isinstance(source, str):
            raise TypeError(f"source must be a string, got {type(source).__name__}")
        if not isinstance(content_hash, str) or (content_hash and not HEX64.fullmatch(content_hash.lower())):
            raise ValueError(f"content_hash must be a sha256 hex digest or '', got {content_hash!r}")
        content_hash = content_hash.lower()
        problems = []
        if codes.levels != cfg.levels:
            problems.append(f"levels {codes.levels} (store: {cfg.levels})")
        if codes.codes_per_patch != cfg.codes_per_patch:
            problems.append(f"codes_per_patch {codes.codes_per_patch} (store: {cfg.codes_per_patch})")
        if codes.patch_size != cfg.patch_size:
            problems.append(f"patch_size {codes.patch_size} (store: {cfg.patch_size})")
        model = codes.metadata.get("model")
        if isinstance(model, str) and model != cfg.model_fingerprint:
            problems.append(f"model fingerprint {model} (store: {cfg.model_fingerprint})")
        if problems:
            raise StoreError(
                self._store.path,
                f"refusing codes of sample {sample_id!r} from another code space: " + ", ".join(problems),
            )

        record = encode_record(codes.indices.numpy().reshape(-1), cfg.bits_per_code, cfg.entropy_coding)
        if self._fh is not None and self._size + len(record) > cfg.shard_bytes:
            self.flush()  # roll over before the shard would exceed shard_bytes
        with self._failing_stops():
            if self._fh is None:
                self._open_shard()
            self._fh.write(record)
            fault_point("store.record")
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
        if self._size >= cfg.shard_bytes:
            self.flush()

    def _open_shard(self) -> None:
        tmp = self._dir / (self._shard(self._seq).bin + TMP_SUFFIX)
        # "xb": never silently reuse a temp file, e.g. of a concurrent writer given the same name.
        self._fh = open(tmp, "xb")  # noqa: SIM115  # stays open across add() calls until flush()
        header = SHARD_HEADER.pack(SHARD_MAGIC, FORMAT_VERSION, FLAG_ENTROPY if self._cfg.entropy_coding else 0)
        self._fh.write(header)
        self._hasher.update(header)
        self._size = len(header)

    @contextlib.contextmanager
    def _failing_stops(self):
        """A write that fails (a full disk) ends the writer: its unfinished shard, never visible to
        readers, is deleted (its samples are redone by the next run), the lock is released, and the
        error names the shard file."""
        try:
            with writing(self._dir / (self._shard(self._seq).bin + TMP_SUFFIX)):
                yield
        except OSError:
            self._abort()
            raise

    def _abort(self) -> None:
        if self._fh is not None:
            with contextlib.suppress(OSError):
                self._fh.close()
        shard = self._shard(self._seq)
        leftovers = [shard.bin + TMP_SUFFIX, shard.index + TMP_SUFFIX]
        if not (self._dir / shard.index).exists():
            leftovers.append(shard.bin)  # renamed, but its index never made it visible
        for name in leftovers:
            with contextlib.suppress(OSError):
                os.unlink(self._dir / name)
        self._fh = None
        self._closed = True
        self._lock.release()
        log.warning(
            "%s: writer %r stopped after a failed write; its unfinished shard %s was removed",
            self._store.path,
            self._name,
            shard.base,
        )

    def flush(self) -> None:
        """Finalise the current shard (atomic, durable); no-op if nothing was added since."""
        if self._fh is None:
            return
        with self._failing_stops():
            self._flush()

    def _flush(self) -> None:
        cfg = self._cfg
        shard = self._shard(self._seq)
        bin_tmp = self._dir / (shard.bin + TMP_SUFFIX)
        idx_tmp = self._dir / (shard.index + TMP_SUFFIX)
        n = len(self._cols["id"])
        index = {
            "format": SHARD_INDEX_FORMAT,
            "format_version": FORMAT_VERSION,
            "writer": self._name,
            "seq": self._seq,
            "shard": shard.bin,
            "shard_size": self._size,
            "sha256": self._hasher.hexdigest(),
            "levels": list(cfg.levels),
            "codes_per_patch": cfg.codes_per_patch,
            "patch_size": cfg.patch_size,
            "bits_per_code": cfg.bits_per_code,
            "model_fingerprint": cfg.model_fingerprint,
            "entropy_coding": cfg.entropy_coding,
            "count": n,
            "records": self._cols,
        }
        with open(idx_tmp, "wb") as fh:
            fh.write(json_bytes(index))
            fh.flush()
            os.fsync(fh.fileno())
        self._fh.flush()
        os.fsync(self._fh.fileno())
        self._fh.close()
        # Shard first, index last: the index's appearance is the commit point for readers.
        os.replace(bin_tmp, self._dir / shard.bin)
        fault_point("store.flush")
        os.replace(idx_tmp, self._dir / shard.index)
        fsync_dir(self._dir)
        self._write_lookup(shard)
        log.debug("%s: finalised shard %s (%d records, %d bytes)", self._store.path, shard.bin, n, self._size)
        self.records_written += n
        self.shards_written += 1
        self._seq += 1
        self._reset_shard()

    def _write_lookup(self, shard: ShardName) -> None:
        """The shard's binary lookup file (a cache of its index for the compact store index: if this
        fails, the first reader derives it from the ``.idx.json``)."""
        cols = self._cols
        try:
            st = os.stat(self._dir / shard.index)
            arrays = columns_to_arrays(
                cols["id"],
                cols["source"],
                cols["content_hash"],
                cols["grid"],
                cols["image_size"],
                cols["offset"],
                cols["length"],
                cols["crc32"],
            )
            write_lookup(self._dir / shard.lookup, shard.bin, (st.st_mtime_ns, st.st_size), arrays)
        except (OSError, ValueError) as exc:
            log.warning(
                "%s: could not write the lookup file of %s (readers will derive it): %s",
                self._store.path,
                shard.base,
                exc,
            )

    def close(self) -> None:
        """Flush, mark the writer closed (further :meth:`add` calls raise) and refresh the store
        it came from, so that its reads see this writer's samples."""
        if self._closed:
            return
        try:
            self.flush()
        finally:
            self._closed = True
            self._lock.release()
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
