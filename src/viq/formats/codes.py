"""Discrete ViQ codes: the :class:`Codes` value class and the ``.viq`` file format.

An image whose padded patch grid is ``(h, w)`` is tokenized into ``codes_per_patch``
(normally 4) FSQ codes per patch. Every code is an integer in ``[0, K)`` where
``K = prod(levels)`` is the size of the implicit FSQ codebook, e.g.

=====================  ======  ===============
levels                 K       bits per code
=====================  ======  ===============
(8, 8, 4, 3, 3)          2304  12
(8, 8, 4, 4, 4)          4096  12
(8, 8, 8, 4, 4)          8192  13
(8, 8, 8, 6, 5)         15360  14
(8, 8, 8, 5, 5, 5)      64000  16
=====================  ======  ===============

The *official flat order* of the codes of one image is row-major over
``(y, x, j)``: code ``j`` of the patch in row ``y`` / column ``x`` sits at flat position
``codes_per_patch * (y * w + x) + j``. This is exactly ``indices.reshape(-1)`` for the
``(h, w, codes_per_patch)`` tensor held by :class:`Codes`.

``.viq`` file format, version 1
===============================

All integers are unsigned and little-endian. ``L`` = number of levels, ``M`` = length of
the metadata block, ``N = h * w * C`` = number of codes, ``B`` = bits per code.

======================  ===========  =========================================================
offset                  type         field
======================  ===========  =========================================================
0                       4 bytes      magic ``b"VIQC"``
4                       u16          format version, ``1``
6                       u16          flags; reserved, must be ``0`` in version 1
8                       u8           ``L``, number of FSQ levels (>= 1)
9                       u8           ``B``, bits per code; must equal
                                     ``max(1, ceil(log2(prod(levels))))``
10                      u16          ``C``, codes per patch (>= 1)
12                      u16          patch size in pixels (>= 1)
14                      u32          grid height ``h`` in patches (>= 1)
18                      u32          grid width ``w`` in patches (>= 1)
22                      u32          image height in pixels before padding, 0 = unknown
26                      u32          image width in pixels before padding, 0 = unknown
30                      u32          ``M``, metadata length in bytes
34                      u8[L]        the levels, each in ``[2, 255]``; ``prod(levels) <= 2**31``
34 + L                  u8[M]        metadata: UTF-8 JSON object (``M == 0`` means ``{}``)
34 + L + M              u8[P]        payload, ``P = ceil(N * B / 8)``: all codes in official
                                     flat order, bit-packed at exactly ``B`` bits each,
                                     LSB-first (see :func:`pack_bits`); unused high bits of the
                                     last byte must be 0
34 + L + M + P          u32          CRC-32 (``zlib.crc32``) of all preceding bytes
======================  ===========  =========================================================

Total size is ``38 + L + M + ceil(N * B / 8)`` bytes, so with 64000 levels and 4 codes per
16x16 patch the payload costs exactly ``16 * 4 / 256 = 0.25`` bits per (padded) pixel.
Image height/width are either both 0 or both non-zero, and when given they must satisfy
``ceil(height / patch_size) == h`` and ``ceil(width / patch_size) == w``.

Readers (:meth:`Codes.from_bytes`, :meth:`Codes.load`) validate everything independently of
the checksum (magic, version, flags, levels, lengths, metadata, every code ``< K``, zero
padding bits), so a hand-crafted file with a valid CRC still cannot smuggle in out-of-range
codes; any problem raises :class:`CodesFormatError` naming the file and the problem.
"""

from __future__ import annotations

import dataclasses
import json
import math
import operator
import os
import struct
import zlib
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Union

import numpy as np
import torch

from viq._io import atomic_write
from viq._untrusted import loads_json
from viq.formats.bits import bits_for_levels, normalize_levels, pack_bits, unpack_bits
from viq.formats.image import padded_grid

__all__ = [
    "Codes",
    "CodesFormatError",
    "FORMAT_VERSION",
    "MAGIC",
    "bits_for_levels",
    "pack_bits",
    "unpack_bits",
]

MAGIC = b"VIQC"
FORMAT_VERSION = 1

# Fixed-size part of the header (everything up to the variable-length levels array).
_HEADER = struct.Struct("<4sHHBBHHIIIII")
assert _HEADER.size == 34
_CRC = struct.Struct("<I")

_U16_MAX = 0xFFFF
_U32_MAX = 0xFFFFFFFF
PathLike = Union[str, "os.PathLike[str]"]
ArrayLike = torch.Tensor | np.ndarray | Sequence[Any]


class CodesFormatError(ValueError):
    """A ``.viq`` file (or byte string) is malformed, corrupt or unsupported.

    Attributes:
        source: the file path or source label (e.g. ``"<bytes>"``) that failed to parse.
        problem: human-readable description of what is wrong.
    """

    def __init__(self, source: str, problem: str) -> None:
        super().__init__(f"{source}: {problem}")
        self.source = source
        self.problem = problem

    def __reduce__(self):  # keep the exception picklable despite the custom __init__
        return (type(self), (self.source, self.problem))


# --------------------------------------------------------------------------------------
# Codes
# --------------------------------------------------------------------------------------


def _to_int32_indices(indices: ArrayLike, k: int) -> torch.Tensor:
    """Return an owned, contiguous ``(h, w, c)`` int32 CPU tensor of codes in ``[0, k)``.

    The range is checked on the *original* dtype, before narrowing to int32, so that e.g.
    int64 values >= 2**32 are rejected instead of silently wrapping into range.
    """
    if isinstance(indices, torch.Tensor):
        t = indices.detach().cpu()
        if t.dtype == torch.bool or t.is_floating_point() or t.is_complex():
            raise ValueError(f"indices must have an integer dtype, got {t.dtype}")
        if t.dtype in (torch.uint16, torch.uint32, torch.uint64):
            # Widen: min/max are not implemented for these dtypes on all builds. A uint64 value
            # >= 2**63 becomes negative here and is therefore still rejected below.
            t = t.to(torch.int64)
        shape = tuple(t.shape)
    else:
        arr = np.asarray(indices)
        if arr.dtype.kind not in "iu":
            raise ValueError(f"indices must have an integer dtype, got {arr.dtype}")
        shape = arr.shape
    if len(shape) != 3:
        raise ValueError(f"indices must be 3-D (h, w, codes_per_patch), got shape {shape}")
    if min(shape) < 1:
        raise ValueError(f"indices must have h, w, codes_per_patch >= 1, got shape {shape}")
    src = t if isinstance(indices, torch.Tensor) else arr
    lo, hi = int(src.min()), int(src.max())
    if lo < 0 or hi >= k:
        raise ValueError(f"indices must be in [0, {k}) for codebook size {k}, got range [{lo}, {hi}]")
    if isinstance(indices, torch.Tensor):
        # clone(): never alias the caller's buffer, so the value cannot change behind our back.
        return t.to(torch.int32).contiguous().clone()
    return torch.from_numpy(np.array(arr, dtype=np.int32, order="C", copy=True))


def _normalize_metadata(metadata: Mapping[str, Any] | None) -> dict[str, Any]:
    if metadata is None:
        return {}
    if not isinstance(metadata, Mapping):
        raise ValueError(f"metadata must be a mapping, got {type(metadata).__name__}")
    if not all(isinstance(key, str) for key in metadata):
        raise ValueError("metadata keys must be strings")
    try:
        text = json.dumps(dict(metadata), allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"metadata must be JSON-serialisable: {exc}") from None
    # Round-trip through JSON so the stored value equals what a reader gets back (tuples ->
    # lists, etc.) and so later mutation of the caller's dict cannot leak in.
    return json.loads(text)


def _encode_metadata(metadata: dict[str, Any]) -> bytes:
    if not metadata:
        return b""
    # Canonical form: identical metadata always yields identical bytes.
    return json.dumps(metadata, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False).encode(
        "utf-8"
    )


def _reject_constant(name: str) -> Any:
    raise ValueError(f"non-standard JSON constant {name}")


@dataclasses.dataclass(frozen=True, eq=False)
class Codes:
    """Discrete ViQ codes of one image (immutable value object).

    Attributes:
        indices: ``torch.int32`` CPU contiguous tensor of shape ``(h, w, codes_per_patch)``;
            ``indices.reshape(-1)`` is the official flat order ``C * (y * w + x) + j``.
            The constructor accepts any integer tensor / ndarray / nested sequence and stores
            an owned copy; treat the stored tensor as read-only.
        levels: FSQ levels, each in ``[2, 255]``; ``K = prod(levels) <= 2**31``.
        image_size: ``(height, width)`` in pixels of the image content before padding to a
            multiple of ``patch_size``, or ``None`` if unknown. Must satisfy
            ``ceil(height / patch_size) == h`` and ``ceil(width / patch_size) == w``.
        patch_size: patch side in pixels (default 16), in ``[1, 65535]``.
        metadata: JSON-serialisable dict with string keys (e.g. ``{"model": ..., "source": ...}``).
            Stored as a JSON round-tripped copy.

    Equality (``==``) compares *everything that is serialised*: indices, levels, image_size,
    patch_size **and** metadata, so ``Codes.from_bytes(c.to_bytes()) == c`` always holds.
    Use :meth:`same_codes` to compare token content while ignoring metadata. Instances are
    unhashable (they hold a tensor).

    Raises:
        ValueError: on any invalid field (wrong ndim/empty dims, non-integer dtype, values
            outside ``[0, K)``, bad levels, inconsistent image_size, non-JSON metadata,
            sizes that do not fit the ``.viq`` header fields).
    """

    indices: torch.Tensor
    levels: tuple[int, ...]
    image_size: tuple[int, int] | None = None
    patch_size: int = 16
    metadata: dict[str, Any] = dataclasses.field(default_factory=dict)

    def __post_init__(self) -> None:
        levels = normalize_levels(self.levels)
        k = math.prod(levels)
        indices = _to_int32_indices(self.indices, k)
        h, w, c = indices.shape
        if h > _U32_MAX or w > _U32_MAX or c > _U16_MAX:
            raise ValueError(f"grid {(h, w)} / codes_per_patch {c} exceed the .viq header limits")

        ps = self.patch_size
        if isinstance(ps, bool) or not isinstance(ps, (int, np.integer)) or not 1 <= int(ps) <= _U16_MAX:
            raise ValueError(f"patch_size must be an integer in [1, 65535], got {ps!r}")
        ps = int(ps)

        image_size = self.image_size
        if image_size is not None:
            try:
                ih, iw = (_index(v) for v in image_size)
            except (TypeError, ValueError):
                raise ValueError(f"image_size must be (height, width) integers or None, got {image_size!r}") from None
            if not (1 <= ih <= _U32_MAX and 1 <= iw <= _U32_MAX):
                raise ValueError(f"image_size must be positive (height, width), got {(ih, iw)}")
            if padded_grid(ih, iw, ps) != (h, w):
                raise ValueError(
                    f"image_size {(ih, iw)} with patch_size {ps} needs grid "
                    f"{padded_grid(ih, iw, ps)}, but indices have grid {(h, w)}"
                )
            image_size = (ih, iw)

        object.__setattr__(self, "levels", levels)
        object.__setattr__(self, "indices", indices)
        object.__setattr__(self, "patch_size", ps)
        object.__setattr__(self, "image_size", image_size)
        object.__setattr__(self, "metadata", _normalize_metadata(self.metadata))

    # ---- derived properties --------------------------------------------------------------

    @property
    def grid(self) -> tuple[int, int]:
        """Patch grid ``(h, w)``."""
        return int(self.indices.shape[0]), int(self.indices.shape[1])

    @property
    def codes_per_patch(self) -> int:
        """Number of codes per patch (normally 4)."""
        return int(self.indices.shape[2])

    @property
    def codebook_size(self) -> int:
        """``K = prod(levels)``."""
        return math.prod(self.levels)

    @property
    def bits_per_code(self) -> int:
        """``max(1, ceil(log2(K)))``: bits each code occupies in a ``.viq`` payload."""
        return bits_for_levels(self.levels)

    @property
    def num_codes(self) -> int:
        """``h * w * codes_per_patch``."""
        return int(self.indices.numel())

    def flat(self) -> torch.Tensor:
        """Codes in official flat order: a new 1-D ``torch.int32`` tensor of shape ``(num_codes,)``."""
        return self.indices.reshape(-1).clone()

    def same_codes(self, other: Codes) -> bool:
        """True if ``other`` has equal indices, levels, image_size and patch_size (metadata ignored)."""
        return (
            isinstance(other, Codes)
            and self.levels == other.levels
            and self.patch_size == other.patch_size
            and self.image_size == other.image_size
            and self.indices.shape == other.indices.shape
            and bool(torch.equal(self.indices, other.indices))
        )

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Codes):
            return NotImplemented
        return self.same_codes(other) and self.metadata == other.metadata

    __hash__ = None  # type: ignore[assignment]  # mutable-by-nature tensor inside

    def __repr__(self) -> str:
        parts = [
            f"grid={self.grid}",
            f"codes_per_patch={self.codes_per_patch}",
            f"levels={self.levels}",
            f"K={self.codebook_size}",
        ]
        if self.image_size is not None:
            parts.append(f"image_size={self.image_size}")
        if self.patch_size != 16:
            parts.append(f"patch_size={self.patch_size}")
        if self.metadata:
            parts.append(f"metadata_keys={sorted(self.metadata)}")
        return f"Codes({', '.join(parts)})"

    # ---- constructors ----------------------------------------------------------------------

    @classmethod
    def from_flat(
        cls,
        flat: ArrayLike,
        grid: tuple[int, int],
        levels: Sequence[int],
        *,
        codes_per_patch: int = 4,
        image_size: tuple[int, int] | None = None,
        patch_size: int = 16,
        metadata: Mapping[str, Any] | None = None,
    ) -> Codes:
        """Build from codes in official flat order.

        Args:
            flat: integer tensor/array with ``h * w * codes_per_patch`` elements, shaped
                ``(N,)`` or with extra singleton dims such as the model's ``(1, N, 1)``.
            grid: ``(h, w)`` patch grid.
            levels, image_size, patch_size, metadata: as for :class:`Codes`.
            codes_per_patch: codes per patch (default 4).
        """
        h, w = (int(v) for v in grid)
        c = int(codes_per_patch)
        if h < 1 or w < 1 or c < 1:
            raise ValueError(f"grid and codes_per_patch must be >= 1, got grid {(h, w)}, codes_per_patch {c}")
        t = flat if isinstance(flat, torch.Tensor) else torch.as_tensor(np.asarray(flat))
        n = h * w * c
        if sum(1 for s in t.shape if s != 1) > 1 or t.numel() != n:
            raise ValueError(
                f"flat codes must have shape (N,) or singleton dims around N = {h}*{w}*{c} = {n}, "
                f"got shape {tuple(t.shape)}"
            )
        return cls(t.reshape(h, w, c), levels, image_size=image_size, patch_size=patch_size, metadata=metadata or {})

    # ---- serialisation ---------------------------------------------------------------------

    def to_bytes(self) -> bytes:
        """Serialise to the ``.viq`` version-1 format (see module docstring)."""
        h, w = self.grid
        ih, iw = self.image_size if self.image_size is not None else (0, 0)
        meta = _encode_metadata(self.metadata)
        if len(meta) > _U32_MAX:
            raise ValueError("metadata too large for a .viq file")
        bits = self.bits_per_code
        header = _HEADER.pack(
            MAGIC,
            FORMAT_VERSION,
            0,
            len(self.levels),
            bits,
            self.codes_per_patch,
            self.patch_size,
            h,
            w,
            ih,
            iw,
            len(meta),
        )
        body = b"".join((header, bytes(self.levels), meta, pack_bits(self.indices.numpy().reshape(-1), bits)))
        return body + _CRC.pack(zlib.crc32(body))

    @classmethod
    def from_bytes(cls, data: bytes | bytearray | memoryview, *, source: str = "<bytes>") -> Codes:
        """Parse a ``.viq`` byte string.

        Args:
            data: the complete file content.
            source: label used in error messages (a path for :meth:`load`).

        Raises:
            CodesFormatError: for any malformed, truncated, corrupt or unsupported input.
        """
        src = str(source)

        def fail(problem: str) -> CodesFormatError:
            return CodesFormatError(src, problem)

        try:
            mv = memoryview(data).cast("B")
        except TypeError:
            raise fail(f"expected bytes-like data, got {type(data).__name__}") from None
        n = len(mv)
        if n < len(MAGIC):
            if bytes(mv) == MAGIC[:n]:
                raise fail("truncated file (empty)" if n == 0 else f"truncated file ({n} bytes)")
            raise fail(f"not a .viq file (bad magic {bytes(mv)!r})")
        if bytes(mv[:4]) != MAGIC:
            raise fail(f"not a .viq file (bad magic {bytes(mv[:4])!r}, expected {MAGIC!r})")
        if n < 6:
            raise fail(f"truncated file ({n} bytes)")
        (version,) = struct.unpack_from("<H", mv, 4)
        if version != FORMAT_VERSION:
            raise fail(f"unsupported .viq format version {version} (this reader supports version {FORMAT_VERSION})")
        if n < _HEADER.size + _CRC.size:
            raise fail(f"truncated file ({n} bytes, header alone needs {_HEADER.size + _CRC.size})")
        (_, _, flags, n_levels, bits, cpp, patch, h, w, ih, iw, meta_len) = _HEADER.unpack_from(mv, 0)

        # Lengths first (pure integer arithmetic, nothing allocated), so truncation and trailing
        # garbage are reported as such and a corrupt size field cannot trigger a huge allocation.
        num_codes = h * w * cpp
        payload_len = (num_codes * bits + 7) // 8
        levels_off = _HEADER.size
        meta_off = levels_off + n_levels
        payload_off = meta_off + meta_len
        crc_off = payload_off + payload_len
        expected = crc_off + _CRC.size
        if n < expected:
            raise fail(f"truncated or corrupt file: header describes {expected} bytes, got {n}")
        if n > expected:
            raise fail(f"trailing garbage: {n - expected} unexpected bytes after the checksum ({expected}-byte file)")

        (stored_crc,) = _CRC.unpack_from(mv, crc_off)
        actual_crc = zlib.crc32(mv[:crc_off])
        if stored_crc != actual_crc:
            raise fail(
                f"checksum mismatch (stored CRC32 {stored_crc:#010x}, computed {actual_crc:#010x}): file is corrupt"
            )

        # Structural validation, independent of the CRC (a crafted file can have a valid CRC).
        if flags != 0:
            raise fail(f"unsupported flags {flags:#06x} (version {FORMAT_VERSION} requires 0)")
        levels = tuple(mv[levels_off:meta_off])
        try:
            levels = normalize_levels(levels)
        except ValueError as exc:
            raise fail(f"bad levels {levels}: {exc}") from None
        k = math.prod(levels)
        want_bits = max(1, (k - 1).bit_length())
        if bits != want_bits:
            raise fail(f"bits per code is {bits} but levels {levels} (K={k}) require {want_bits}")
        if cpp < 1 or patch < 1 or h < 1 or w < 1:
            raise fail(f"bad geometry: grid {(h, w)}, codes_per_patch {cpp}, patch_size {patch} (all must be >= 1)")
        if (ih == 0) != (iw == 0):
            raise fail(f"bad image size {(ih, iw)}: height and width must both be 0 (unknown) or both positive")
        image_size = None
        if ih:
            if padded_grid(ih, iw, patch) != (h, w):
                raise fail(f"image size {(ih, iw)} with patch size {patch} is inconsistent with grid {(h, w)}")
            image_size = (ih, iw)

        metadata: dict[str, Any] = {}
        if meta_len:
            try:
                metadata = loads_json(
                    bytes(mv[meta_off:payload_off]).decode("utf-8"), "metadata", parse_constant=_reject_constant
                )
            except (UnicodeDecodeError, ValueError) as exc:  # UntrustedFileError included: too deep
                raise fail(f"bad metadata JSON: {exc}") from None
            if not isinstance(metadata, dict):
                raise fail(f"bad metadata JSON: expected an object, got {type(metadata).__name__}")

        payload = mv[payload_off:crc_off]
        if len(payload) != payload_len:  # cannot happen after the length check; belt and braces
            raise fail(f"payload length mismatch: expected {payload_len} bytes, got {len(payload)}")
        tail_bits = (num_codes * bits) % 8
        if tail_bits and payload[-1] >> tail_bits:
            raise fail("non-zero padding bits after the last code")
        values = unpack_bits(payload, bits, num_codes)
        top = int(values.max())
        if top >= k:
            bad = int(np.count_nonzero(values >= k))
            raise fail(f"{bad} code(s) out of range: max code {top} >= codebook size {k}")

        indices = torch.from_numpy(values.view(np.int32).reshape(h, w, cpp))
        try:
            return cls(indices, levels, image_size=image_size, patch_size=patch, metadata=metadata)
        except ValueError as exc:  # any remaining inconsistency is still a format error
            raise fail(str(exc)) from None

    def save(self, path: PathLike) -> Path:
        """Write to ``path`` atomically and durably; returns the path as a :class:`~pathlib.Path`.

        The bytes go to a temporary file in the same directory, which is fsynced and then
        ``os.replace``-d over ``path``; on any failure the temp file is removed and an
        existing ``path`` is left untouched, so readers never observe a half-written file.
        """
        return atomic_write(path, self.to_bytes())

    @classmethod
    def load(cls, path: PathLike) -> Codes:
        """Read a ``.viq`` file. OS errors (e.g. missing file) propagate unchanged; format
        problems raise :class:`CodesFormatError` whose message names ``path``."""
        with open(path, "rb") as fh:
            data = fh.read()
        return cls.from_bytes(data, source=os.fspath(path))


def _index(value: Any) -> int:
    """``operator.index`` that also rejects bools (``True`` is not a pixel count)."""
    if isinstance(value, bool):
        raise TypeError("bool is not a valid size")
    return operator.index(value)
