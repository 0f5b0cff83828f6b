"""Tests for viq.formats.codes: bit packing, the Codes value class and the .viq file format."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import pickle
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch

from viq.formats.codes import (
    FORMAT_VERSION,
    MAGIC,
    Codes,
    CodesFormatError,
    bits_for_levels,
    pack_bits,
    unpack_bits,
)
from viq.model.config import FSQ_LEVELS

LEVEL_SETS = list(FSQ_LEVELS.values())  # the five released sizes
EXPECTED_BITS = {
    (8, 8, 4, 3, 3): 12,  # K = 2304
    (8, 8, 4, 4, 4): 12,  # K = 4096
    (8, 8, 8, 4, 4): 13,  # K = 8192
    (8, 8, 8, 6, 5): 14,  # K = 15360
    (8, 8, 8, 5, 5, 5): 16,  # K = 64000
}
GRIDS = [(1, 1), (1, 300), (37, 5), (7, 9)]

HEADER = struct.Struct("<4sHHBBHHIIIII")  # the documented fixed header, restated independently


def _reference_pack(values: np.ndarray, bits: int) -> bytes:
    """Obviously-correct (slow) LSB-first packer used as an oracle: one big Python int."""
    acc = 0
    for i, v in enumerate(values.tolist()):
        acc |= int(v) << (i * bits)
    return acc.to_bytes((len(values) * bits + 7) // 8, "little")


def _random_codes(levels: tuple[int, ...], grid: tuple[int, int], seed: int, cpp: int = 4, **kwargs) -> Codes:
    g = torch.Generator().manual_seed(seed)
    k = math.prod(levels)
    idx = torch.randint(0, k, (*grid, cpp), generator=g)
    idx.view(-1)[0] = k - 1  # make sure the largest valid code is exercised
    return Codes(idx, levels, **kwargs)


def _craft(
    levels: tuple[int, ...] = (8, 8, 4, 3, 3),
    codes: np.ndarray | None = None,
    *,
    grid: tuple[int, int] = (2, 3),
    cpp: int = 4,
    bits: int | None = None,
    patch: int = 16,
    image: tuple[int, int] = (0, 0),
    meta: bytes = b"",
    flags: int = 0,
    version: int = FORMAT_VERSION,
    payload: bytes | None = None,
    fix_crc: bool = True,
) -> bytes:
    """Assemble a .viq file by hand (from the documented layout) with a *correct* CRC."""
    bits = bits_for_levels(levels) if bits is None else bits
    n = grid[0] * grid[1] * cpp
    if payload is None:
        codes = np.zeros(n, dtype=np.uint32) if codes is None else codes
        payload = pack_bits(codes, bits)
    header = HEADER.pack(MAGIC, version, flags, len(levels), bits, cpp, patch, *grid, *image, len(meta))
    body = header + bytes(levels) + meta + payload
    return body + struct.pack("<I", zlib.crc32(body) if fix_crc else 0)


# --------------------------------------------------------------------------------------
# bit packing
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("bits", list(range(1, 21)) + [31, 32])
@pytest.mark.parametrize("count", [0, 1, 2, 7, 8, 9, 1000, 70_001])
def test_pack_unpack_roundtrip(bits: int, count: int) -> None:
    rng = np.random.default_rng(bits * 1000 + count)
    values = rng.integers(0, 2**bits, size=count, dtype=np.uint64)
    if count:
        values[0] = 2**bits - 1  # all-ones value: catches masking errors
    packed = pack_bits(values, bits)
    assert isinstance(packed, bytes)
    assert len(packed) == math.ceil(count * bits / 8)
    out = unpack_bits(packed, bits, count)
    assert out.dtype == np.uint32 and out.shape == (count,)
    np.testing.assert_array_equal(out, values)
    if count <= 1000:
        assert packed == _reference_pack(values, bits)


def test_pack_bits_known_layout() -> None:
    # 2-bit values 1, 2, 3 -> bits (LSB first) 10 01 11 -> 0b00111001
    assert pack_bits(np.array([1, 2, 3]), 2) == bytes([0b00111001])
    # 12-bit 0xABC, 0x123 -> little-endian 24-bit 0x123ABC
    assert pack_bits(np.array([0xABC, 0x123]), 12) == bytes([0xBC, 0x3A, 0x12])
    # bits in {8, 16, 32} coincide with little-endian arrays
    v = np.array([1, 0xBEEF, 65535])
    assert pack_bits(v, 16) == v.astype("<u2").tobytes()


def test_pack_unpack_inputs() -> None:
    v = np.arange(50) % 13
    packed = pack_bits(torch.from_numpy(v), 4)
    assert packed == pack_bits(v.reshape(5, 10), 4)  # any shape, flattened in C order
    for data in (packed, bytearray(packed), memoryview(packed), np.frombuffer(packed, np.uint8)):
        np.testing.assert_array_equal(unpack_bits(data, 4, 50), v)
    # extra trailing bytes are ignored (the caller decides whether that is an error)
    np.testing.assert_array_equal(unpack_bits(packed + b"\xff", 4, 50), v)


@pytest.mark.parametrize(
    "values, bits",
    [
        (np.array([4]), 2),
        (np.array([-1]), 8),
        (np.array([2**32], dtype=np.int64), 32),
        (np.array([0.5]), 8),
        (np.array([1]), 0),
        (np.array([1]), 33),
    ],
)
def test_pack_bits_rejects(values: np.ndarray, bits: int) -> None:
    with pytest.raises(ValueError):
        pack_bits(values, bits)


def test_unpack_bits_rejects() -> None:
    packed = pack_bits(np.arange(10), 4)
    with pytest.raises(ValueError, match="too short"):
        unpack_bits(packed[:-1], 4, 10)
    with pytest.raises(ValueError, match="too short"):
        unpack_bits(b"", 1, 1)
    with pytest.raises(ValueError):
        unpack_bits(packed, 4, -1)
    with pytest.raises(ValueError):
        unpack_bits(np.zeros(5, dtype=np.uint32), 4, 10)
    assert unpack_bits(b"", 7, 0).shape == (0,)


@pytest.mark.parametrize("levels", LEVEL_SETS)
def test_bits_for_levels(levels: tuple[int, ...]) -> None:
    assert bits_for_levels(levels) == EXPECTED_BITS[levels]
    assert 2 ** (bits_for_levels(levels) - 1) < math.prod(levels) <= 2 ** bits_for_levels(levels)


def test_bits_for_levels_edges() -> None:
    assert bits_for_levels((2,)) == 1
    assert bits_for_levels((3,)) == 2
    assert bits_for_levels((2, 2)) == 2
    for bad in [(), (1, 8), (256,), (8, 0), (255,) * 5]:
        with pytest.raises(ValueError):
            bits_for_levels(bad)


# --------------------------------------------------------------------------------------
# Codes: construction and properties
# --------------------------------------------------------------------------------------


def test_codes_properties_and_flat_order() -> None:
    levels = (8, 8, 8, 5, 5, 5)
    h, w, cpp = 3, 5, 4
    idx = np.arange(h * w * cpp).reshape(h, w, cpp) * 7
    c = Codes(idx, levels, image_size=(40, 70), metadata={"source": "a.jpg"})
    assert c.grid == (3, 5)
    assert c.codes_per_patch == 4
    assert c.codebook_size == 64000
    assert c.bits_per_code == 16
    assert c.num_codes == 60
    assert c.indices.dtype == torch.int32 and c.indices.is_contiguous() and c.indices.device.type == "cpu"
    flat = c.flat()
    assert flat.dtype == torch.int32 and flat.shape == (60,)
    for y in range(h):
        for x in range(w):
            for j in range(cpp):
                assert flat[cpp * (y * w + x) + j] == idx[y, x, j]
    assert "grid=(3, 5)" in repr(c) and "K=64000" in repr(c)


def test_codes_from_flat_layouts() -> None:
    levels = (8, 8, 4, 4, 4)
    flat = torch.randint(0, 4096, (4 * 6 * 7,))
    a = Codes.from_flat(flat, (6, 7), levels)
    b = Codes.from_flat(flat.view(1, -1, 1), (6, 7), levels)
    c = Codes.from_flat(flat.numpy(), (6, 7), levels, image_size=(90, 100))
    assert a == b
    assert torch.equal(a.flat(), flat.to(torch.int32))
    assert c.image_size == (90, 100) and c.same_codes(a) is False and torch.equal(c.indices, a.indices)
    with pytest.raises(ValueError):
        Codes.from_flat(flat, (6, 6), levels)  # wrong element count
    with pytest.raises(ValueError):
        Codes.from_flat(flat.view(2, -1), (6, 7), levels)  # not a flat layout


def test_codes_is_an_immutable_value() -> None:
    src = torch.zeros(2, 2, 4, dtype=torch.int32)
    meta = {"model": "abc"}
    c = Codes(src, (8, 8, 4, 3, 3), metadata=meta)
    src.fill_(5)  # mutating the input must not change the value
    meta["model"] = "changed"
    assert int(c.indices.sum()) == 0 and c.metadata == {"model": "abc"}
    with pytest.raises(dataclasses.FrozenInstanceError):
        c.levels = (2,)  # type: ignore[misc]
    c.flat().fill_(3)  # flat() is a copy
    assert int(c.indices.sum()) == 0
    d = dataclasses.replace(c, metadata={})
    assert d.same_codes(c) and d != c  # equality includes metadata, same_codes ignores it


@pytest.mark.parametrize(
    "indices, levels, kwargs",
    [
        (torch.full((2, 2, 4), 2304), (8, 8, 4, 3, 3), {}),  # == K
        (torch.full((2, 2, 4), -1), (8, 8, 4, 3, 3), {}),  # negative
        (torch.full((2, 2, 4), 2**32 + 3, dtype=torch.int64), (8, 8, 4, 3, 3), {}),  # would wrap in int32
        (np.full((2, 2, 4), 2**63, dtype=np.uint64), (8, 8, 4, 3, 3), {}),
        (torch.zeros(8, 4, dtype=torch.int64), (8, 8, 4, 3, 3), {}),  # 2-D
        (torch.zeros(1, 2, 2, 4, dtype=torch.int64), (8, 8, 4, 3, 3), {}),  # 4-D
        (torch.zeros(0, 2, 4, dtype=torch.int64), (8, 8, 4, 3, 3), {}),  # empty grid
        (torch.zeros(2, 2, 0, dtype=torch.int64), (8, 8, 4, 3, 3), {}),  # no codes per patch
        (torch.zeros(2, 2, 4), (8, 8, 4, 3, 3), {}),  # float dtype
        (torch.zeros(2, 2, 4, dtype=torch.bool), (8, 8, 4, 3, 3), {}),
        (torch.zeros(2, 2, 4, dtype=torch.int64), (), {}),
        (torch.zeros(2, 2, 4, dtype=torch.int64), (8, 1), {}),
        (torch.zeros(2, 2, 4, dtype=torch.int64), (8, 256), {}),
        (torch.zeros(2, 2, 4, dtype=torch.int64), (8.0, 8), {}),
        (torch.zeros(2, 2, 4, dtype=torch.int64), (8, 8), {"image_size": (33, 32)}),  # needs 3 rows
        (torch.zeros(2, 2, 4, dtype=torch.int64), (8, 8), {"image_size": (16, 32)}),  # needs 1 row
        (torch.zeros(2, 2, 4, dtype=torch.int64), (8, 8), {"image_size": (0, 32)}),
        (torch.zeros(2, 2, 4, dtype=torch.int64), (8, 8), {"image_size": (32,)}),
        (torch.zeros(2, 2, 4, dtype=torch.int64), (8, 8), {"patch_size": 0}),
        (torch.zeros(2, 2, 4, dtype=torch.int64), (8, 8), {"metadata": {"x": object()}}),
        (torch.zeros(2, 2, 4, dtype=torch.int64), (8, 8), {"metadata": {"x": float("nan")}}),
        (torch.zeros(2, 2, 4, dtype=torch.int64), (8, 8), {"metadata": {1: "non-str key"}}),
        (torch.zeros(2, 2, 4, dtype=torch.int64), (8, 8), {"metadata": ["not", "a", "dict"]}),
    ],
)
def test_codes_constructor_rejects(indices, levels, kwargs) -> None:
    with pytest.raises(ValueError):
        Codes(indices, levels, **kwargs)


def test_codes_accepts_integer_dtypes() -> None:
    ref = np.arange(24).reshape(2, 3, 4)
    for arr in (ref.astype(np.uint8), ref.astype(np.int16), ref.astype(np.uint64), ref.tolist()):
        assert torch.equal(Codes(arr, (8, 8)).indices, torch.from_numpy(ref.astype(np.int32)))
    for t in (torch.from_numpy(ref).to(torch.uint8), torch.from_numpy(ref).to(torch.int64)):
        assert torch.equal(Codes(t, (8, 8)).indices, torch.from_numpy(ref.astype(np.int32)))


# --------------------------------------------------------------------------------------
# .viq round trips and sizes
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("levels", LEVEL_SETS)
@pytest.mark.parametrize("grid", GRIDS)
@pytest.mark.parametrize("extras", ["plain", "image_size", "metadata", "both"])
def test_save_load_roundtrip(tmp_path: Path, levels, grid, extras: str) -> None:
    kwargs = {}
    if extras in ("image_size", "both"):
        kwargs["image_size"] = (grid[0] * 16 - 3, grid[1] * 16)  # partially padded last row
    if extras in ("metadata", "both"):
        kwargs["metadata"] = {"model": "fsq-abc123", "source": "dir/ü.jpg", "nested": {"a": [1, 2.5, None]}}
    c = _random_codes(levels, grid, seed=hash((levels, grid)) % 2**31, **kwargs)

    data = c.to_bytes()
    assert c.to_bytes() == data  # deterministic
    path = c.save(tmp_path / "x.viq")
    assert path.read_bytes() == data
    loaded = Codes.load(path)
    assert loaded == c
    assert torch.equal(loaded.indices, c.indices) and loaded.indices.dtype == torch.int32
    assert loaded.levels == levels and loaded.image_size == c.image_size and loaded.metadata == c.metadata
    assert Codes.from_bytes(data) == c
    assert Codes.from_bytes(data).to_bytes() == data

    compact = json.dumps(c.metadata, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    meta_len = len(compact.encode()) if c.metadata else 0
    payload = math.ceil(c.num_codes * EXPECTED_BITS[levels] / 8)
    assert len(data) == 34 + len(levels) + meta_len + payload + 4


def test_roundtrip_other_geometry(tmp_path: Path) -> None:
    # non-default codes_per_patch / patch_size, and a 1-bit codebook
    for c in (
        _random_codes((8, 8, 8, 6, 5), (5, 4), seed=1, cpp=3, patch_size=14, image_size=(70, 50)),
        _random_codes((2,), (3, 3), seed=2, cpp=1),
        _random_codes((3,), (1, 1), seed=3, cpp=1, patch_size=1, image_size=(1, 1)),
    ):
        assert Codes.from_bytes(c.to_bytes()) == c


def test_file_size_64k_levels_is_quarter_bit_per_pixel() -> None:
    levels = (8, 8, 8, 5, 5, 5)
    c = _random_codes(levels, (64, 64), seed=0)
    data = c.to_bytes()
    pixels = 64 * 16 * 64 * 16
    payload = 64 * 64 * 4 * 16 // 8
    assert payload * 8 / pixels == 0.25
    overhead = 34 + len(levels) + 4  # fixed header + levels + CRC, no metadata
    assert len(data) == payload + overhead
    assert (len(data) - overhead) * 8 / pixels == 0.25


def test_smaller_codebooks_use_fewer_bits() -> None:
    sizes = []
    for levels in sorted(LEVEL_SETS, key=math.prod):
        c = _random_codes(levels, (32, 32), seed=0)
        sizes.append((c.bits_per_code, len(c.to_bytes()) - len(levels)))
    assert sizes == sorted(sizes)
    assert sizes[0][0] == 12 and sizes[-1][0] == 16
    assert sizes[-1][1] - sizes[0][1] == 32 * 32 * 4 * (16 - 12) // 8


# --------------------------------------------------------------------------------------
# rejection of bad files
# --------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def small_file() -> bytes:
    # 13-bit codes so the payload ends mid-byte; metadata + image size exercise every field.
    c = _random_codes((8, 8, 8, 4, 4), (3, 2), seed=7, cpp=3, image_size=(40, 17), metadata={"m": "v"})
    return c.to_bytes()


def test_rejects_empty(tmp_path: Path) -> None:
    p = tmp_path / "empty.viq"
    p.write_bytes(b"")
    with pytest.raises(CodesFormatError, match="truncated") as exc:
        Codes.load(p)
    assert str(p) in str(exc.value) and exc.value.source == str(p)
    with pytest.raises(CodesFormatError, match="<bytes>"):
        Codes.from_bytes(b"")


def test_rejects_every_truncation(small_file: bytes) -> None:
    for n in range(len(small_file)):
        with pytest.raises(CodesFormatError) as exc:
            Codes.from_bytes(small_file[:n], source="clip.viq")
        assert "clip.viq" in str(exc.value)
    Codes.from_bytes(small_file)  # the full file is fine


def test_rejects_every_single_bit_flip(small_file: bytes) -> None:
    buf = bytearray(small_file)
    for pos in range(len(buf) * 8):
        buf[pos // 8] ^= 1 << (pos % 8)
        with pytest.raises(CodesFormatError):
            Codes.from_bytes(bytes(buf))
        buf[pos // 8] ^= 1 << (pos % 8)


def test_rejects_bit_flips_in_larger_file() -> None:
    data = _random_codes((8, 8, 8, 5, 5, 5), (20, 30), seed=3).to_bytes()
    rng = np.random.default_rng(0)
    for pos in rng.choice(len(data) * 8, size=300, replace=False):
        buf = bytearray(data)
        buf[pos // 8] ^= 1 << (pos % 8)
        with pytest.raises(CodesFormatError):
            Codes.from_bytes(bytes(buf))


@pytest.mark.parametrize(
    "data",
    [b"\x89PNG\r\n\x1a\n" + b"\x00" * 100, b"PK\x03\x04", b"\x89", b"VIQX" + b"\x00" * 60],
)
def test_rejects_wrong_magic(data: bytes) -> None:
    with pytest.raises(CodesFormatError, match="not a .viq file"):
        Codes.from_bytes(data, source="photo.png")


def test_rejects_future_version() -> None:
    with pytest.raises(CodesFormatError, match="unsupported .viq format version 2"):
        Codes.from_bytes(_craft(version=2))
    Codes.from_bytes(_craft())  # control: the crafted baseline is valid


def test_rejects_trailing_bytes(small_file: bytes) -> None:
    for extra in (b"\x00", b"garbage", small_file):
        with pytest.raises(CodesFormatError, match="trailing"):
            Codes.from_bytes(small_file + extra)


def test_rejects_checksum_mismatch() -> None:
    with pytest.raises(CodesFormatError, match="checksum"):
        Codes.from_bytes(_craft(fix_crc=False))


def test_rejects_out_of_range_code_with_valid_crc() -> None:
    levels = (8, 8, 4, 3, 3)  # K = 2304 but 12 bits can hold up to 4095
    codes = np.zeros(2 * 3 * 4, dtype=np.uint32)
    codes[5] = 2304
    data = _craft(levels, codes)
    with pytest.raises(CodesFormatError, match="out of range"):
        Codes.from_bytes(data, source="evil.viq")
    codes[5] = 2303
    assert int(Codes.from_bytes(_craft(levels, codes)).flat()[5]) == 2303


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"levels": (8, 1, 4), "bits": 5}, "bad levels"),
        ({"levels": (), "bits": 1}, "bad levels"),
        ({"levels": (255,) * 5, "bits": 32}, "bad levels"),  # K > 2**31
        ({"bits": 13}, "bits per code"),
        ({"flags": 1}, "flags"),
        ({"grid": (0, 3)}, "geometry"),
        ({"cpp": 0}, "geometry"),
        ({"patch": 0}, "geometry"),
        ({"image": (40, 0)}, "image size"),
        ({"image": (33, 48)}, "inconsistent"),  # 33 px needs 3 rows of 16, grid has 2
        ({"image": (32, 64)}, "inconsistent"),
        ({"meta": b"{not json"}, "metadata"),
        ({"meta": b"[1, 2]"}, "metadata"),
        ({"meta": b"\xff\xfe"}, "metadata"),
        ({"meta": b'{"x": NaN}'}, "metadata"),
        ({"payload": b"\x00" * 35}, "truncated"),  # 2*3*4 codes * 12 bits = 36 bytes
        ({"payload": b"\x00" * 37}, "trailing"),
    ],
)
def test_rejects_crafted_headers_with_valid_crc(kwargs, match: str) -> None:
    with pytest.raises(CodesFormatError, match=match):
        Codes.from_bytes(_craft(**kwargs))


def test_rejects_nonzero_padding_bits() -> None:
    # 3 codes * 13 bits = 39 bits -> 1 padding bit in the last byte
    payload = bytearray(pack_bits(np.array([1, 2, 3]), 13))
    payload[-1] |= 0x80
    data = _craft((8, 8, 8, 4, 4), grid=(1, 1), cpp=3, payload=bytes(payload))
    with pytest.raises(CodesFormatError, match="padding"):
        Codes.from_bytes(data)


def test_format_error_is_value_error_and_picklable() -> None:
    err = CodesFormatError("a.viq", "checksum mismatch")
    assert isinstance(err, ValueError)
    again = pickle.loads(pickle.dumps(err))
    assert str(again) == str(err) == "a.viq: checksum mismatch"
    assert again.source == "a.viq" and again.problem == "checksum mismatch"


def test_load_missing_file_is_os_error(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        Codes.load(tmp_path / "nope.viq")


# --------------------------------------------------------------------------------------
# atomic save
# --------------------------------------------------------------------------------------


def test_save_overwrites_atomically(tmp_path: Path) -> None:
    old = _random_codes((8, 8, 8, 4, 4), (4, 4), seed=1)
    new = _random_codes((8, 8, 8, 4, 4), (5, 6), seed=2)
    path = tmp_path / "img.viq"
    old.save(path)
    new.save(str(path))  # str paths work too
    assert Codes.load(path) == new
    assert sorted(os.listdir(tmp_path)) == ["img.viq"]


def test_save_failure_keeps_old_file_and_no_temp(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    old = _random_codes((8, 8, 8, 4, 4), (4, 4), seed=1)
    new = _random_codes((8, 8, 8, 5, 5, 5), (9, 9), seed=2)
    path = tmp_path / "img.viq"
    old.save(path)
    before = path.read_bytes()

    def boom(src, dst):
        raise OSError("simulated crash before rename")

    monkeypatch.setattr(os, "replace", boom)
    with pytest.raises(OSError, match="simulated"):
        new.save(path)
    assert path.read_bytes() == before
    assert Codes.load(path) == old
    assert sorted(os.listdir(tmp_path)) == ["img.viq"]  # temp file cleaned up

    # failure while writing (e.g. disk full during fsync) also leaves no debris
    monkeypatch.undo()
    monkeypatch.setattr(os, "fsync", lambda fd: (_ for _ in ()).throw(OSError("simulated fsync failure")))
    with pytest.raises(OSError, match="fsync"):
        new.save(path)
    assert path.read_bytes() == before
    assert sorted(os.listdir(tmp_path)) == ["img.viq"]


def test_save_to_new_file_has_normal_permissions(tmp_path: Path) -> None:
    path = _random_codes((8, 8), (1, 1), seed=0).save(tmp_path / "new.viq")
    umask = os.umask(0)
    os.umask(umask)
    if os.name == "posix":
        assert path.stat().st_mode & 0o777 == 0o666 & ~umask
