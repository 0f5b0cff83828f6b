"""Integers at a fixed bit width: FSQ level rules, LSB-first bit packing, and code-usage statistics.

Shared by the ``.viq`` file (:mod:`viq.formats.codes`), the code store (:mod:`viq.store`) and
training metrics, so that every place packs bits and measures codebook use the same way.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

__all__ = ["bits_for_levels", "normalize_levels", "pack_bits", "unpack_bits", "usage_stats", "MAX_CODEBOOK"]

# Indices are stored as int32, so every valid code (< K) must fit in an int32.
MAX_CODEBOOK = 1 << 31

# Number of codes processed per vectorised step in the generic bit packers. It must be a
# multiple of 8 so that every chunk starts on a byte boundary whatever ``bits`` is; 64k
# codes keeps the (count, 32) uint8 temporaries at ~2 MiB.
_CHUNK = 1 << 16

ArrayLike = torch.Tensor | np.ndarray | Sequence[Any]


# --------------------------------------------------------------------------------------
# Bit packing
# --------------------------------------------------------------------------------------


def _check_bits(bits: int) -> int:
    if isinstance(bits, bool) or not isinstance(bits, (int, np.integer)):
        raise ValueError(f"bits must be an integer in [1, 32], got {bits!r}")
    bits = int(bits)
    if not 1 <= bits <= 32:
        raise ValueError(f"bits must be in [1, 32], got {bits}")
    return bits


def pack_bits(values: ArrayLike, bits: int) -> bytes:
    """Pack non-negative integers into a byte string at exactly ``bits`` bits each.

    Bit order is LSB-first: bit ``b`` of ``values[i]`` lands at global bit position
    ``i * bits + b``, i.e. in byte ``p // 8`` at bit ``p % 8`` (bit 0 = least significant).
    For ``bits`` in {8, 16, 32} this is identical to little-endian ``uint8/16/32`` arrays.

    Args:
        values: integer array of any shape (flattened in C order), each value in
            ``[0, 2**bits)``. Torch tensors are accepted too.
        bits: bits per value, ``1 <= bits <= 32``.

    Returns:
        ``ceil(values.size * bits / 8)`` bytes; unused high bits of the last byte are 0.

    Raises:
        ValueError: bad ``bits``, non-integer dtype, or a value outside ``[0, 2**bits)``.
    """
    bits = _check_bits(bits)
    if isinstance(values, torch.Tensor):
        values = values.detach().cpu().numpy()
    arr = np.asarray(values).reshape(-1)
    n = arr.size
    if n == 0:
        return b""
    if arr.dtype.kind not in "iu":
        raise ValueError(f"pack_bits needs an integer array, got dtype {arr.dtype}")
    lo, hi = int(arr.min()), int(arr.max())
    if lo < 0 or hi >= (1 << bits):
        raise ValueError(f"values must be in [0, 2**{bits}) for {bits}-bit packing, got range [{lo}, {hi}]")
    # Safe after the range check: every value fits in 32 bits.
    v = arr.astype("<u4", copy=False)
    if bits in (8, 16, 32):
        return v.astype(f"<u{bits // 8}", copy=False).tobytes()

    out = np.empty((n * bits + 7) // 8, dtype=np.uint8)
    for start in range(0, n, _CHUNK):
        chunk = np.ascontiguousarray(v[start : start + _CHUNK])
        # (m, 4) little-endian bytes -> (m, 32) bits LSB-first -> keep the low `bits`.
        bitmat = np.unpackbits(chunk.view(np.uint8).reshape(-1, 4), axis=1, bitorder="little")
        packed = np.packbits(bitmat[:, :bits].reshape(-1), bitorder="little")
        byte0 = start * bits // 8  # exact: start is a multiple of 8
        out[byte0 : byte0 + packed.size] = packed
    return out.tobytes()


def unpack_bits(data: bytes | bytearray | memoryview | np.ndarray, bits: int, count: int) -> np.ndarray:
    """Inverse of :func:`pack_bits`: read ``count`` values of ``bits`` bits each (LSB-first).

    Args:
        data: packed bytes (``bytes``, ``bytearray``, ``memoryview`` or a uint8 ndarray).
            Bytes beyond ``ceil(count * bits / 8)`` are ignored.
        bits: bits per value, ``1 <= bits <= 32``.
        count: number of values to decode, ``>= 0``.

    Returns:
        1-D ``np.uint32`` array of shape ``(count,)`` (a fresh, writable array).

    Raises:
        ValueError: bad ``bits``/``count``, unsupported ``data`` type, or ``data`` shorter than
            ``ceil(count * bits / 8)`` bytes.
    """
    bits = _check_bits(bits)
    if isinstance(count, bool) or not isinstance(count, (int, np.integer)) or count < 0:
        raise ValueError(f"count must be a non-negative integer, got {count!r}")
    count = int(count)
    if isinstance(data, np.ndarray):
        if data.dtype != np.uint8:
            raise ValueError(f"unpack_bits needs uint8 data, got ndarray of dtype {data.dtype}")
        buf = np.ascontiguousarray(data).reshape(-1)
    elif isinstance(data, (bytes, bytearray, memoryview)):
        buf = np.frombuffer(data, dtype=np.uint8)
    else:
        raise ValueError(f"unpack_bits needs bytes, bytearray, memoryview or uint8 ndarray, got {type(data).__name__}")
    need = (count * bits + 7) // 8
    if buf.size < need:
        raise ValueError(f"data too short: {count} values of {bits} bits need {need} bytes, got {buf.size}")
    if count == 0:
        return np.zeros(0, dtype=np.uint32)
    buf = buf[:need]
    if bits in (8, 16, 32):
        return np.frombuffer(buf.tobytes(), dtype=f"<u{bits // 8}").astype(np.uint32)

    out = np.empty(count, dtype=np.uint32)
    for start in range(0, count, _CHUNK):
        m = min(_CHUNK, count - start)
        byte0 = start * bits // 8  # exact: start is a multiple of 8
        nbytes = (m * bits + 7) // 8
        bitvec = np.unpackbits(buf[byte0 : byte0 + nbytes], bitorder="little", count=m * bits)
        # Widen each value's `bits` bits to 32 with zero high bits, then repack as bytes.
        bitmat = np.zeros((m, 32), dtype=np.uint8)
        bitmat[:, :bits] = bitvec.reshape(m, bits)
        out[start : start + m] = np.packbits(bitmat, axis=1, bitorder="little").view("<u4").reshape(-1)
    return out


def normalize_levels(levels: Sequence[int]) -> tuple[int, ...]:
    if isinstance(levels, torch.Tensor):
        levels = levels.tolist()
    try:
        items = list(levels)
    except TypeError:
        raise ValueError(f"levels must be a sequence of integers, got {levels!r}") from None
    out = []
    for lv in items:
        if isinstance(lv, bool) or not isinstance(lv, (int, np.integer)):
            raise ValueError(f"levels must be integers, got {levels!r}")
        out.append(int(lv))
    if not out:
        raise ValueError("levels must contain at least one level")
    bad = [lv for lv in out if not 2 <= lv <= 255]
    if bad:
        raise ValueError(f"every level must be in [2, 255], got {tuple(out)}")
    if math.prod(out) > MAX_CODEBOOK:
        raise ValueError(f"codebook size prod(levels) = {math.prod(out)} exceeds 2**31 (indices are int32)")
    return tuple(out)


def bits_for_levels(levels: Sequence[int]) -> int:
    """Bits needed per code for an FSQ codebook of ``K = prod(levels)`` entries.

    Returns ``max(1, ceil(log2(K)))``, computed exactly with integers, e.g. 12 for
    ``(8, 8, 4, 3, 3)`` (K = 2304) and 16 for ``(8, 8, 8, 5, 5, 5)`` (K = 64000).

    Raises:
        ValueError: empty levels, a level outside ``[2, 255]``, or ``K > 2**31``.
    """
    k = math.prod(normalize_levels(levels))
    return max(1, (k - 1).bit_length())


# --------------------------------------------------------------------------------------
# Code usage
# --------------------------------------------------------------------------------------


def usage_stats(counts: np.ndarray | torch.Tensor) -> dict[str, float]:
    """Codebook use from a histogram of code counts (length K).

    Returns ``{"usage": share of the K codes seen at least once, "entropy_bits": entropy of the
    empirical code distribution in bits per code (at most log2 K), "perplexity": 2**entropy_bits}``;
    all 0 for an empty histogram.
    """
    counts = np.asarray(counts.detach().cpu() if isinstance(counts, torch.Tensor) else counts, dtype=np.float64)
    total = float(counts.sum())
    if counts.size == 0 or total == 0:
        return {"usage": 0.0, "entropy_bits": 0.0, "perplexity": 0.0}
    p = counts[counts > 0] / total
    entropy = float(max(0.0, -(p * np.log2(p)).sum()))
    return {
        "usage": float((counts > 0).sum()) / counts.size,
        "entropy_bits": entropy,
        "perplexity": float(2.0**entropy),
    }
