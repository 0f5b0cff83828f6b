"""The compact, memory-mapped index of a code store: lookup by sample id without a per-id Python object.

A store of 10 M images used to hold one dict entry per id in every process (~1 GB, copied into every
DataLoader worker). Instead, two kinds of binary files (same container format, below) are derived from
the shard indexes (``*.idx.json``, which stay the format's source of truth):

* ``shards/<writer>-<seq>.lookup``: one shard's records as columns (id hashes, ids, sources, content
  hashes, grids, image sizes, offsets, lengths, CRCs). Written by the writer when it finalises the
  shard, or by the first reader that finds it missing or stale (old stores). It records the
  ``(mtime_ns, size)`` of the ``.idx.json`` it was derived from and is ignored when they differ.
* ``index/<key>.viqx``: the merged index of all finalised shards, in index order (shard order, then
  record order; duplicate ids dropped, the first claim wins), plus the id hashes sorted with a bucket
  table (lookup in O(1) page touches) and the content hashes sorted (``has_hash``). ``<key>`` is a
  digest of the list of shard indexes and their ``(mtime_ns, size)``, so a new or changed shard means
  a new file; it is built once by the first reader that needs it (atomically, :func:`viq._io.atomic_write`)
  and then memory-mapped by every process: DataLoader workers share its pages. Processes that open a
  changed store at once take turns on ``index/.build.lock`` (``flock``): the first builds, the others
  find its file and map it. When the store directory is not writable, the file (and the lock) go to
  ``$VIQ_STORE_INDEX_DIR`` or ``~/.cache/viq/store-index``.

Lookup: ``h = id_hash(id)`` (:mod:`viq.store.ids`); the bucket ``h >> shift`` gives a range of the
sorted hashes (a few entries), ``bisect`` finds ``h`` in it, and every entry with that hash is checked
against the stored id string, so hash collisions never return the wrong record.

Container format (little-endian): ``b"VIQINDX1"``, u64 header length, the header (UTF-8 JSON:
``format``, ``version``, ``kind`` ``"shard"``/``"store"``, ``id_hash``, ``count``, ``arrays``: name
-> ``[dtype, shape, offset, crc32]``, plus kind-specific fields), then the arrays, each at a 64-byte
aligned offset. Opening checks the header, the array bounds and a few invariants, and the CRCs of
every array -- for the merged index once per version of the file: a verified file gets a stamp beside
it (``<key>.viqx.ok``: its size, mtime and inode), and an open that finds the stamp matching the file
skips the full read, so opening 10 M ids stays a matter of milliseconds while any rewrite of the file
(a flipped bit written by anyone) is checked again. Lookup files are checked whole each time they are
read (when a merged index is built). A file that fails any check is rebuilt, never trusted.
"""

from __future__ import annotations

import bisect
import hashlib
import json
import logging
import mmap
import os
import struct
import tempfile
import zlib
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from viq._io import atomic_write
from viq._untrusted import loads_json
from viq.store import ids as _ids

__all__ = [
    "IndexCorrupt",
    "IndexFile",
    "StoreIndex",
    "build_store_index",
    "columns_to_arrays",
    "read_lookup",
    "store_key",
]

log = logging.getLogger(__name__)

MAGIC = b"VIQINDX1"
INDEX_FORMAT = "viq-code-store-index"
INDEX_VERSION = 1
INDEX_DIR = "index"
INDEX_SUFFIX = ".viqx"
#: lock file, in the index directory, held while a process builds the merged index
BUILD_LOCK = ".build.lock"
LOOKUP_SUFFIX = ".lookup"
_ALIGN = 64
_HEAD = struct.Struct("<8sQ")
_ZERO32 = bytes(32)
FLAG_HASH = 1  # the record has a content hash
FLAG_SIZE = 2  # the record has an image size


class IndexCorrupt(ValueError):
    """An index file is unreadable, of another version, or fails a consistency check."""


# ------------------------------------------------------------------------------------ container


def _write_container(path: Path, header: dict[str, Any], arrays: dict[str, np.ndarray]) -> None:
    """Write ``arrays`` (C-contiguous, little-endian) with ``header`` atomically to ``path``."""
    arrays = {k: np.ascontiguousarray(v) for k, v in arrays.items()}
    table = {
        k: [v.dtype.str, list(v.shape), 0, zlib.crc32(memoryview(v).cast("B")) if v.size else 0]
        for k, v in arrays.items()
    }
    # The header holds the offsets, which depend on its length: reserve room for their digits.
    probe = json.dumps({**header, "arrays": table}).encode()
    start = -(-(_HEAD.size + len(probe) + 24 * len(arrays) + 64) // _ALIGN) * _ALIGN
    pos = start
    for k, v in arrays.items():
        table[k][2] = pos
        pos += -(-v.nbytes // _ALIGN) * _ALIGN
    head = json.dumps({**header, "arrays": table}).encode()
    assert _HEAD.size + len(head) <= start

    def write(tmp: str) -> None:
        with open(tmp, "wb") as fh:
            fh.write(_HEAD.pack(MAGIC, len(head)))
            fh.write(head)
            fh.write(bytes(start - _HEAD.size - len(head)))
            at = start
            for k, v in arrays.items():
                fh.write(memoryview(v).cast("B") if v.size else b"")
                at += v.nbytes
                pad = table[k][2] + (-(-v.nbytes // _ALIGN) * _ALIGN) - at
                fh.write(bytes(pad))
                at += pad

    atomic_write(path, write)


#: Suffix of the stamp of a verified merged index (beside the ``.viqx`` file).
STAMP_SUFFIX = ".ok"


def _stat_key(path: Path) -> list[int]:
    st = os.stat(path)
    return [st.st_size, st.st_mtime_ns, st.st_ino]


def _write_stamp(path: Path) -> None:
    """Record that ``path`` as it is now passed its CRC checks (best effort: a read-only folder just
    means the next open checks again)."""
    try:
        atomic_write(path.with_name(path.name + STAMP_SUFFIX), json.dumps(_stat_key(path)).encode())
    except OSError:
        pass


def _stamped(path: Path) -> bool:
    try:
        return json.loads(path.with_name(path.name + STAMP_SUFFIX).read_text()) == _stat_key(path)
    except (OSError, ValueError):
        return False


class IndexFile:
    """A memory-mapped container file: ``header`` (dict) and ``arrays`` (read-only numpy views).

    ``check``: verify every array's CRC-32 on open -- ``"always"``, ``"once"`` (unless the file's stamp
    says this version passed already; a pass writes the stamp) or ``"never"``."""

    def __init__(self, path: Path, kind: str, check: str = "never") -> None:
        self.path = Path(path)
        try:
            with open(self.path, "rb") as fh:
                self.size = os.fstat(fh.fileno()).st_size
                if self.size < _HEAD.size:
                    raise IndexCorrupt("too short")
                self.mm = mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ)
        except OSError as exc:
            raise IndexCorrupt(f"cannot read: {exc}") from None
        magic, hlen = _HEAD.unpack_from(self.mm, 0)
        if magic != MAGIC or hlen > self.size - _HEAD.size:
            raise IndexCorrupt("not a viq store index file (bad magic or header)")
        try:
            header = loads_json(self.mm[_HEAD.size : _HEAD.size + hlen].decode("utf-8"), "header")
        except (UnicodeDecodeError, ValueError) as exc:
            raise IndexCorrupt(f"corrupt header: {exc}") from None
        if not isinstance(header, dict) or header.get("format") != INDEX_FORMAT:
            raise IndexCorrupt("not a viq store index file")
        if header.get("version") != INDEX_VERSION or header.get("kind") != kind:
            raise IndexCorrupt(
                f"index version/kind {header.get('version')!r}/{header.get('kind')!r}, "
                f"expected {INDEX_VERSION}/{kind!r}"
            )
        if header.get("id_hash") != _ids.ID_HASH:
            raise IndexCorrupt(f"built with id hash {header.get('id_hash')!r}, this reader uses {_ids.ID_HASH!r}")
        self.header = header
        self.arrays: dict[str, np.ndarray] = {}
        self.crcs: dict[str, int] = {}
        self.offsets: dict[str, int] = {}
        try:
            for name, (dtype, shape, offset, crc) in header["arrays"].items():
                dt = np.dtype(dtype)
                count = int(np.prod(shape)) if shape else 1
                if offset < _HEAD.size + hlen or offset % _ALIGN or offset + count * dt.itemsize > self.size:
                    raise IndexCorrupt(f"array {name!r} lies outside the file")
                self.arrays[name] = np.frombuffer(self.mm, dtype=dt, count=count, offset=offset).reshape(shape)
                self.crcs[name] = int(crc)
                self.offsets[name] = int(offset)
        except (KeyError, TypeError, ValueError) as exc:
            if isinstance(exc, IndexCorrupt):
                raise
            raise IndexCorrupt(f"corrupt array table: {exc}") from None
        if check == "always" or (check == "once" and not _stamped(self.path)):
            bad = self.check_crcs()
            if bad:
                raise IndexCorrupt(f"checksum mismatch in {', '.join(bad)}")
            if check == "once":
                _write_stamp(self.path)

    def view(self, name: str, fmt: str) -> memoryview:
        """A flat memoryview of array ``name`` (Python ints on indexing: the fast path of lookups)."""
        off, nbytes = self.offsets[name], self.arrays[name].nbytes
        return memoryview(self.mm)[off : off + nbytes].cast(fmt)  # type: ignore[call-overload]  # fmt: a code

    def check_crcs(self) -> list[str]:
        """Names of the arrays whose bytes do not match their recorded CRC-32 (reads the whole file)."""
        return [
            name
            for name, a in self.arrays.items()
            if (zlib.crc32(memoryview(np.ascontiguousarray(a)).cast("B")) if a.size else 0) != self.crcs[name]
        ]


# ------------------------------------------------------------------------------------ per-shard columns


def _blob(strings: Sequence[str]) -> tuple[np.ndarray, np.ndarray, list[bytes]]:
    enc = [s.encode("utf-8", "surrogatepass") for s in strings]
    off = np.zeros(len(enc) + 1, dtype=np.uint64)
    if enc:
        np.cumsum(np.fromiter(map(len, enc), dtype=np.uint64, count=len(enc)), out=off[1:])
    return np.frombuffer(b"".join(enc), dtype=np.uint8).copy(), off, enc


def columns_to_arrays(
    ids: Sequence[str],
    sources: Sequence[str],
    content_hashes: Sequence[str],
    grids: Any,
    image_sizes: Any,
    offsets: Any,
    lengths: Any,
    crcs: Any,
) -> dict[str, np.ndarray]:
    """One shard's records (the columns of its ``.idx.json``) as the arrays of a ``.lookup`` file.

    ``grids`` / ``image_sizes``: ``(n, 2)`` (image size ``(0, 0)`` or ``None`` = unknown).
    """
    n = len(ids)
    id_blob, id_off, enc = _blob(ids)
    src_blob, src_off, _ = _blob(sources)
    chash = (
        np.frombuffer(b"".join(bytes.fromhex(h) if h else _ZERO32 for h in content_hashes), dtype=np.uint8)
        .reshape(n, 32)
        .copy()
    )
    sizes = np.array([(0, 0) if s is None else tuple(s) for s in image_sizes], dtype=np.uint32).reshape(n, 2)
    flags = (
        np.fromiter((bool(h) for h in content_hashes), dtype=np.uint8, count=n) * FLAG_HASH
        | (sizes[:, 0] > 0).astype(np.uint8) * FLAG_SIZE
    )
    return {
        "id_hash": np.fromiter(map(_ids.id_hash_bytes, enc), dtype=np.uint64, count=n),
        "id_off": id_off,
        "id_blob": id_blob,
        "src_off": src_off,
        "src_blob": src_blob,
        "chash": chash,
        "flags": flags.astype(np.uint8),
        "grid": np.asarray(grids, dtype=np.uint32).reshape(n, 2),
        "image_size": sizes,
        "offset": np.asarray(offsets, dtype=np.uint64).reshape(n),
        "length": np.asarray(lengths, dtype=np.uint64).reshape(n),
        "crc": np.asarray(crcs, dtype=np.uint32).reshape(n),
    }


_COLUMNS = (
    "id_hash",
    "id_off",
    "id_blob",
    "src_off",
    "src_blob",
    "chash",
    "flags",
    "grid",
    "image_size",
    "offset",
    "length",
    "crc",
)


def write_lookup(path: Path, shard: str, index_key: tuple[int, int], arrays: dict[str, np.ndarray]) -> None:
    """Write one shard's ``.lookup`` file (atomically)."""
    header = {
        "format": INDEX_FORMAT,
        "version": INDEX_VERSION,
        "kind": "shard",
        "id_hash": _ids.ID_HASH,
        "shard": shard,
        "index_key": list(index_key),
        "count": len(arrays["id_hash"]),
    }
    _write_container(path, header, {k: arrays[k] for k in _COLUMNS})


def read_lookup(path: Path, shard: str, index_key: tuple[int, int]) -> dict[str, np.ndarray]:
    """The arrays of a ``.lookup`` file derived from the current ``.idx.json`` (``index_key``).

    Raises:
        IndexCorrupt: missing, stale (another ``index_key``), or failing a consistency check.
    """
    f = IndexFile(path, "shard", check="always")
    h = f.header
    if h.get("shard") != shard or h.get("index_key") != list(index_key):
        raise IndexCorrupt("stale (derived from another version of the shard index)")
    a = f.arrays
    n = h.get("count")
    if set(a) != set(_COLUMNS) or not isinstance(n, int):
        raise IndexCorrupt("missing arrays")
    _check_columns(a, n)
    return a


def _check_columns(a: dict[str, np.ndarray], n: int) -> None:
    shapes = {
        "id_hash": (n,),
        "id_off": (n + 1,),
        "src_off": (n + 1,),
        "chash": (n, 32),
        "flags": (n,),
        "grid": (n, 2),
        "image_size": (n, 2),
        "offset": (n,),
        "length": (n,),
        "crc": (n,),
    }
    for k, shape in shapes.items():
        if a[k].shape != shape:
            raise IndexCorrupt(f"array {k} has shape {a[k].shape}, expected {shape}")
    for off, blob in (("id_off", "id_blob"), ("src_off", "src_blob")):
        if int(a[off][0]) != 0 or int(a[off][-1]) != a[blob].size:
            raise IndexCorrupt(f"{off} does not span {blob}")


# ------------------------------------------------------------------------------------ merged index


def store_key(entries: Sequence[tuple[str, tuple[int, int]]]) -> str:
    """Digest of the shard indexes ``(idx.json name, (mtime_ns, size))``: the merged index's name."""
    text = json.dumps([INDEX_VERSION, _ids.ID_HASH, [[n, list(k)] for n, k in entries]])
    return hashlib.sha256(text.encode()).hexdigest()[:32]


def _concat_blobs(parts: list[tuple[np.ndarray, np.ndarray]]) -> tuple[np.ndarray, np.ndarray]:
    offs, base = [], 0
    for blob, off in parts:
        offs.append(off[:-1] + np.uint64(base))
        base += blob.size
    offs.append(np.array([base], dtype=np.uint64))
    return (np.concatenate([b for b, _ in parts]) if parts else np.zeros(0, np.uint8)), np.concatenate(offs)


def _take_blob(blob: np.ndarray, off: np.ndarray, keep: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Rows ``keep`` (sorted positions) of a blob: contiguous runs are copied whole."""
    lengths = (off[1:] - off[:-1])[keep]
    new_off = np.zeros(keep.size + 1, dtype=np.uint64)
    np.cumsum(lengths, out=new_off[1:])
    breaks = np.flatnonzero(np.diff(keep) != 1) + 1
    runs = np.split(keep, breaks) if keep.size else []
    pieces = [blob[int(off[r[0]]) : int(off[r[-1] + 1])] for r in runs]
    return (np.concatenate(pieces) if pieces else np.zeros(0, np.uint8)), new_off


def build_store_index(
    path: Path,
    key: str,
    shards: Sequence[str],
    entries: Sequence[tuple[str, tuple[int, int]]],
    segments: Sequence[dict[str, np.ndarray]],
    problems: Sequence[str],
) -> None:
    """Merge per-shard columns (``segments``, in shard order; ``shards`` their ``.bin`` names) into
    the index file ``path``: first claim of an id wins, later duplicates are dropped."""
    counts = [len(s["id_hash"]) for s in segments]
    n_all = sum(counts)
    cat = {
        k: (np.concatenate([s[k] for s in segments]) if segments else np.zeros((0, *shape), dt))
        for k, shape, dt in (
            ("id_hash", (), np.uint64),
            ("chash", (32,), np.uint8),
            ("flags", (), np.uint8),
            ("grid", (2,), np.uint32),
            ("image_size", (2,), np.uint32),
            ("offset", (), np.uint64),
            ("length", (), np.uint64),
            ("crc", (), np.uint32),
        )
    }
    cat["shard_no"] = np.repeat(np.arange(len(segments), dtype=np.uint32), counts)
    cat["id_blob"], cat["id_off"] = _concat_blobs([(s["id_blob"], s["id_off"]) for s in segments])
    cat["src_blob"], cat["src_off"] = _concat_blobs([(s["src_blob"], s["src_off"]) for s in segments])

    # Duplicate ids: equal hashes (rare: duplicates or collisions) are compared as strings.
    order = np.argsort(cat["id_hash"], kind="stable")
    hs = cat["id_hash"][order]
    same = np.flatnonzero(hs[1:] == hs[:-1])
    drop = np.zeros(n_all, dtype=bool)
    if same.size:
        blob, off = cat["id_blob"], cat["id_off"]
        starts = same[np.r_[True, np.diff(same) != 1]]
        for s0 in starts.tolist():
            seen: set[bytes] = set()
            i = s0
            while i < n_all and hs[i] == hs[s0]:
                p = int(order[i])
                b = blob[int(off[p]) : int(off[p + 1])].tobytes()
                if b in seen:
                    drop[p] = True
                else:
                    seen.add(b)
                i += 1
    if drop.any():
        keep = np.flatnonzero(~drop)
        for k in ("id_hash", "chash", "flags", "grid", "image_size", "offset", "length", "crc", "shard_no"):
            cat[k] = cat[k][keep]
        cat["id_blob"], cat["id_off"] = _take_blob(cat["id_blob"], cat["id_off"], keep)
        cat["src_blob"], cat["src_off"] = _take_blob(cat["src_blob"], cat["src_off"], keep)
        order = np.argsort(cat["id_hash"], kind="stable")
    n = int(cat["id_hash"].size)
    pos_dt = np.uint32 if n < 2**32 else np.uint64
    cat["h_sorted"] = cat["id_hash"][order]
    cat["h_order"] = order.astype(pos_dt)
    bits = max(0, int(n).bit_length() - 3)  # about 4-8 hashes a bucket
    starts = (
        np.searchsorted(cat["h_sorted"] >> np.uint64(64 - bits), np.arange(2**bits + 1, dtype=np.uint64))
        if bits
        else np.array([0, n])
    )
    cat["buckets"] = starts.astype(pos_dt)
    has = np.flatnonzero(cat["flags"] & FLAG_HASH)
    ckey = cat["chash"][has, :8].copy().view(">u8").reshape(-1).astype(np.uint64)
    corder = np.argsort(ckey, kind="stable")
    cat["c_sorted"] = ckey[corder]
    cat["c_order"] = has[corder].astype(pos_dt)
    del cat["id_hash"]  # h_sorted + h_order hold it
    header = {
        "format": INDEX_FORMAT,
        "version": INDEX_VERSION,
        "kind": "store",
        "id_hash": _ids.ID_HASH,
        "key": key,
        "count": n,
        "records": n_all,
        "bucket_bits": bits,
        "shards": list(shards),
        "entries": [[name, list(k)] for name, k in entries],
        "problems": list(problems),
    }
    _write_container(path, header, cat)
    _write_stamp(path)  # its CRCs were just computed from these arrays


class StoreIndex:
    """A merged index file, memory-mapped: ``len``, :meth:`find`, per-position record fields.

    Nothing here grows with the number of ids except the mapped file, whose pages the kernel shares
    between processes (fork or not) and loads on demand.
    """

    def __init__(self, path: Path, key: str | None = None) -> None:
        f = self.file = IndexFile(path, "store", check="once")
        h = f.header
        if key is not None and h.get("key") != key:
            raise IndexCorrupt(f"index of another shard list (key {h.get('key')!r}, expected {key!r})")
        try:
            self.n = n = int(h["count"])
            self.bits = int(h["bucket_bits"])
            self.shards: list[str] = list(h["shards"])
            self.problems: list[str] = list(h["problems"])
            self.entries = [(str(name), (int(k[0]), int(k[1]))) for name, k in h["entries"]]
        except (KeyError, TypeError, ValueError, IndexError) as exc:
            raise IndexCorrupt(f"corrupt header: {exc}") from None
        a = f.arrays
        need = set(_COLUMNS) - {"id_hash"} | {"shard_no", "h_sorted", "h_order", "buckets", "c_sorted", "c_order"}
        if not need <= set(a) or not 0 <= self.bits < 40:
            raise IndexCorrupt("missing arrays")
        _check_columns({**a, "id_hash": a["h_sorted"]}, n)
        pos = "I" if a["h_order"].dtype == np.uint32 else "Q"
        if (
            a["h_order"].shape != (n,)
            or a["buckets"].shape != (2**self.bits + 1,)
            or a["c_sorted"].shape != a["c_order"].shape
            or a["shard_no"].shape != (n,)
        ):
            raise IndexCorrupt("inconsistent array shapes")
        b = a["buckets"]
        if int(b[0]) != 0 or int(b[-1]) != n or (n and int(a["shard_no"][-1]) >= len(self.shards)):
            raise IndexCorrupt("inconsistent bucket table or shard list")
        self._shift = 64 - self.bits
        self.h_sorted = f.view("h_sorted", "Q")
        self.h_order = f.view("h_order", pos)
        self.buckets = f.view("buckets", pos)
        self.c_sorted = f.view("c_sorted", "Q")
        self.c_order = f.view("c_order", pos)
        self.id_off = f.view("id_off", "Q")
        self.src_off = f.view("src_off", "Q")
        self.shard_no = f.view("shard_no", "I")
        self.offset = f.view("offset", "Q")
        self.length = f.view("length", "Q")
        self.crc = f.view("crc", "I")
        self.grid = f.view("grid", "I")
        self.image_size = f.view("image_size", "I")
        self.flags = f.view("flags", "B")
        self._id_base = f.offsets["id_blob"]
        self._src_base = f.offsets["src_blob"]
        self._chash_base = f.offsets["chash"]
        self.mm = f.mm
        self.path = f.path
        self.key = h.get("key")

    def __len__(self) -> int:
        return self.n

    def find(self, sample_id: str) -> int:
        """Position (index order) of ``sample_id``, or -1."""
        try:
            key = sample_id.encode("utf-8", "surrogatepass")
        except (AttributeError, UnicodeError):
            return -1
        h = _ids.id_hash_bytes(key)
        buckets = self.buckets
        b = h >> self._shift if self.bits else 0
        hs = self.h_sorted
        hi = buckets[b + 1]
        i = bisect.bisect_left(hs, h, buckets[b], hi)
        # All entries with hash h are in h's bucket (the buckets are cut from the same sorted array).
        if i < hi and hs[i] == h:
            order, off, mm, base = self.h_order, self.id_off, self.mm, self._id_base
            while i < hi and hs[i] == h:
                p = order[i]
                if mm[base + off[p] : base + off[p + 1]] == key:
                    return p
                i += 1
        return -1

    def find_content(self, digest: bytes) -> int:
        """Position of the first record (index order) whose content hash is ``digest`` (32 bytes), or -1."""
        k = int.from_bytes(digest[:8], "big")
        cs = self.c_sorted
        i = bisect.bisect_left(cs, k)
        while i < len(cs) and cs[i] == k:
            p = self.c_order[i]
            if self.chash(p) == digest:
                return p
            i += 1
        return -1

    def id_at(self, p: int) -> str:
        return self.mm[self._id_base + self.id_off[p] : self._id_base + self.id_off[p + 1]].decode(
            "utf-8", "surrogatepass"
        )

    def source_at(self, p: int) -> str:
        return self.mm[self._src_base + self.src_off[p] : self._src_base + self.src_off[p + 1]].decode(
            "utf-8", "surrogatepass"
        )

    def chash(self, p: int) -> bytes:
        return self.mm[self._chash_base + 32 * p : self._chash_base + 32 * p + 32]

    def content_hash_at(self, p: int) -> str:
        return self.chash(p).hex() if self.flags[p] & FLAG_HASH else ""

    def image_size_at(self, p: int) -> tuple[int, int] | None:
        return (self.image_size[2 * p], self.image_size[2 * p + 1]) if self.flags[p] & FLAG_SIZE else None

    def iter_ids(self, start: int = 0, stop: int | None = None) -> Iterator[str]:
        """Ids in index order, decoded from the mapped blob chunk by chunk."""
        stop = self.n if stop is None else stop
        off = self.file.arrays["id_off"]
        blob = self.file.arrays["id_blob"]
        for c0 in range(start, stop, 65536):
            c1 = min(stop, c0 + 65536)
            o = off[c0 : c1 + 1].astype(np.int64)
            chunk = blob[o[0] : o[-1]].tobytes()
            rel = (o - o[0]).tolist()
            for j in range(c1 - c0):
                yield chunk[rel[j] : rel[j + 1]].decode("utf-8", "surrogatepass")


def index_dirs(store_path: Path) -> list[Path]:
    """Where a store's merged index may live, in order of preference."""
    dirs = [store_path / INDEX_DIR]
    digest = hashlib.sha256(os.fsencode(os.path.abspath(store_path))).hexdigest()[:16]
    env = os.environ.get("VIQ_STORE_INDEX_DIR")
    if env:
        dirs.append(Path(env) / digest)
    cache = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    dirs.append(Path(cache) / "viq" / "store-index" / digest)
    dirs.append(Path(tempfile.gettempdir()) / f"viq-store-index-{os.getuid() if hasattr(os, 'getuid') else 0}" / digest)
    return dirs
