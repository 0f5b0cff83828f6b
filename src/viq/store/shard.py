"""One shard of a code store: its record codec (packed bits, or LZMA) and its index file (``.idx.json``),
read and checked. The layout itself is described in :mod:`viq.store.format`."""

from __future__ import annotations

import dataclasses
import lzma
from pathlib import Path
from typing import Any

import numpy as np

from viq._untrusted import LIMITS, loads_json
from viq.formats.bits import pack_bits, unpack_bits
from viq.store.format import (
    FORMAT_VERSION,
    HEX64,
    SHARD_HEADER_SIZE,
    SHARD_INDEX_FORMAT,
    ShardName,
    StoreConfig,
)

__all__ = ["LZMA_FILTERS", "encode_record", "decode_record", "ShardIndex", "parse_shard_index"]


#: The LZMA2 filter chain of entropy-coded records (part of format version 1: never change it).
#: lp=1/pb=1 align the literal/position contexts to the 2-byte code units; lc=0 because the
#: previous byte (the other half of a code) says little about the next.
LZMA_FILTERS: tuple[dict[str, int], ...] = (
    {"id": lzma.FILTER_LZMA2, "preset": 6, "dict_size": 1 << 20, "lc": 0, "lp": 1, "pb": 1},
)


_TAG_PACKED = 0


_TAG_LZMA = 1


def _aligned_dtype(bits: int) -> np.dtype:
    """Smallest little-endian unsigned dtype holding a ``bits``-bit code."""
    return np.dtype("<u1" if bits <= 8 else "<u2" if bits <= 16 else "<u4")


def encode_record(values: np.ndarray, bits: int, entropy_coding: bool) -> bytes:
    """Codes ``(N,)`` int32 in ``[0, 2**bits)`` -> record bytes (see the layout above)."""
    packed = pack_bits(values, bits)
    if not entropy_coding:
        return packed
    aligned = values.astype(_aligned_dtype(bits)).tobytes()
    compressed = lzma.compress(aligned, format=lzma.FORMAT_RAW, filters=list(LZMA_FILTERS))
    if len(compressed) < len(packed):
        return bytes((_TAG_LZMA,)) + compressed
    return bytes((_TAG_PACKED,)) + packed


def decode_record(data: bytes, num_codes: int, bits: int, k: int, entropy_coding: bool) -> np.ndarray:
    """Record bytes -> ``(num_codes,)`` uint32 codes, validated (length, padding, every code < K).

    Raises:
        ValueError: describing what is wrong with the record.
    """
    if num_codes > LIMITS.max_record_codes:  # the grid comes from an index file: bounded before decoding
        raise ValueError(
            f"the index declares {num_codes} codes for this record, more than {LIMITS.max_record_codes} "
            f"(VIQ_LIMITS=max_record_codes=N raises the limit)"
        )
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


@dataclasses.dataclass
class ShardIndex:
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


def parse_shard_index(
    index_path: Path, writer: str, seq: int, stat_key: tuple[int, int], config: StoreConfig
) -> ShardIndex:
    """Parse and structurally validate one ``.idx.json`` of a store with ``config``.

    ``writer`` and ``seq`` are what its file name says; ``stat_key`` is ``(mtime_ns, size)`` of the file.

    Raises:
        ValueError: describing what is wrong with the index.
    """
    try:
        obj = loads_json(index_path.read_bytes().decode("utf-8"), index_path.name)
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise ValueError(f"unreadable or corrupt index: {exc}") from None
    if not isinstance(obj, dict) or obj.get("format") != SHARD_INDEX_FORMAT:
        raise ValueError("not a shard index")
    if obj.get("format_version") != FORMAT_VERSION:
        raise ValueError(f"unsupported shard index version {obj.get('format_version')!r}")
    expect = {
        "writer": writer,
        "seq": seq,
        "shard": ShardName.parse(index_path.name).bin,
        "levels": list(config.levels),
        "codes_per_patch": config.codes_per_patch,
        "patch_size": config.patch_size,
        "bits_per_code": config.bits_per_code,
        "model_fingerprint": config.model_fingerprint,
        "entropy_coding": config.entropy_coding,
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
    if not isinstance(digest, str) or not HEX64.fullmatch(digest):
        raise ValueError("invalid sha256")
    return ShardIndex(
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
