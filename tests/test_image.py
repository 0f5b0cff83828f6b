"""Tests for viq.formats.image: loading policy, THE resize rule, exact official normalisation.

All test images are built in tmp_path with PIL/numpy (plus scikit-image's bundled photographs).
"""

from __future__ import annotations

import io
import json
import math
import struct
import zlib
from decimal import ROUND_CEILING, ROUND_FLOOR, Decimal, localcontext
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageFile

from viq.formats.image import (
    DEFAULT_MAX_IMAGE_PIXELS,
    ImageError,
    PreparedImage,
    PreprocessConfig,
    load_image,
    padded_grid,
    preprocess,
    resize_and_center_crop,
    target_size,
    to_pixels,
)

RNG = np.random.default_rng(0)


# ----------------------------------------------------------------------------------------------
# references: the official code, transcribed
# ----------------------------------------------------------------------------------------------


def official_pixels(image: Image.Image) -> torch.Tensor:
    """The authors' preprocessing: convert("RGB") -> uint8 HWC -> /255 -> (v-0.5)/0.5, as (3,H,W)."""
    x = np.array(image.convert("RGB"))
    v = torch.tensor(x).float() / 255
    pixel = (v - 0.5) / 0.5
    return pixel.permute(2, 0, 1)


def official_resize_and_center_crop(image: Image.Image, T: int) -> Image.Image:
    """The official demo's resize_and_center_crop, verbatim (PIL default filter)."""
    width, height = image.size
    if width < height:
        new_w = T
        new_h = int((T / width) * height)
    else:
        new_h = T
        new_w = int((T / height) * width)
    image = image.resize((new_w, new_h))
    w, h = image.size
    return image.crop(((w - T) / 2, (h - T) / 2, (w + T) / 2, (h + T) / 2))


def noise(h: int, w: int, c: int = 3) -> np.ndarray:
    shape = (h, w) if c == 1 else (h, w, c)
    return RNG.integers(0, 256, size=shape, dtype=np.uint8)


def png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def png_with_claimed_size(width: int, height: int) -> bytes:
    """A real 16x16 grey PNG whose IHDR is patched to claim width x height (CRC recomputed).

    Tiny on disk and in memory; decoding it would need width*height bytes and then fail as truncated,
    so a decompression-bomb message proves the size was refused from the header alone.
    """
    buf = io.BytesIO()
    Image.fromarray(noise(16, 16, 1)).save(buf, "PNG")
    data = buf.getvalue()
    assert data[12:16] == b"IHDR"
    ihdr = bytearray(data[16:29])
    ihdr[0:8] = struct.pack(">II", width, height)
    return data[:8] + png_chunk(b"IHDR", bytes(ihdr)) + data[33:]


def png16(arr: np.ndarray, color_type: int) -> bytes:
    """Hand-written 16-bit PNG (Pillow cannot write 16-bit RGB): color_type 0 grey, 2 RGB, 6 RGBA."""
    h, w = arr.shape[:2]
    raw = b"".join(b"\x00" + arr[i].astype(">u2").tobytes() for i in range(h))
    ihdr = struct.pack(">IIBBBBB", w, h, 16, color_type, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + png_chunk(b"IHDR", ihdr)
        + png_chunk(b"IDAT", zlib.compress(raw))
        + png_chunk(b"IEND", b"")
    )


def save(image: Image.Image, path: Path, **kw) -> Path:
    image.save(path, **kw)
    return path


def rgb(image: Image.Image) -> np.ndarray:
    assert image.mode == "RGB"
    return np.asarray(image)


# ----------------------------------------------------------------------------------------------
# normalisation
# ----------------------------------------------------------------------------------------------


def test_to_pixels_exact_for_all_256_values():
    x = np.stack([np.arange(256, dtype=np.uint8)] * 3, axis=-1)[None]  # (1, 256, 3)
    pixels = to_pixels(x)
    assert pixels.dtype == torch.float32 and pixels.shape == (3, 1, 256)
    expected = (torch.arange(256).float() / 255 - 0.5) / 0.5
    for c in range(3):
        assert torch.equal(pixels[c, 0], expected)
    # ... which is the correctly rounded IEEE float32 quotient (torch really divides).
    ieee = (np.arange(256, dtype=np.float32) / np.float32(255) - np.float32(0.5)) / np.float32(0.5)
    assert np.array_equal(pixels[0, 0].numpy(), ieee)
    assert pixels.min() == -1.0 and pixels.max() == 1.0


def test_reciprocal_multiplication_is_not_equivalent():
    # float32(1/255) is itself rounded, so x * float32(1/255) rounds twice and lands one ulp away
    # from the correctly rounded x / 255 for some x: using it would break bit-exactness.
    x = torch.arange(256).float()
    by_div = x / 255
    by_mul = x * torch.tensor(1 / 255, dtype=torch.float32)
    differing = int((by_div != by_mul).sum())
    assert differing > 0
    assert torch.equal((by_div - 0.5) / 0.5, to_pixels(np.stack([np.arange(256, dtype=np.uint8)] * 3, -1)[None])[0, 0])
    assert not torch.equal((by_mul - 0.5) / 0.5, (by_div - 0.5) / 0.5)


def test_to_pixels_pil_matches_official_and_layout():
    arr = noise(5, 7)
    pixels = to_pixels(Image.fromarray(arr))
    assert pixels.shape == (3, 5, 7) and pixels.is_contiguous()
    assert torch.equal(pixels, official_pixels(Image.fromarray(arr)))
    assert torch.equal(pixels, to_pixels(arr))
    # channel c of pixel (i, j) is arr[i, j, c]
    assert pixels[1, 2, 3].item() == (torch.tensor(float(arr[2, 3, 1])) / 255 - 0.5).item() / 0.5


def test_to_pixels_rejects_non_rgb():
    with pytest.raises(ImageError, match="<PIL image>.*'RGBA'"):
        to_pixels(Image.new("RGBA", (2, 2)))
    with pytest.raises(ImageError, match="<array>.*uint8"):
        to_pixels(np.zeros((2, 2, 3), np.float32))
    with pytest.raises(ImageError, match="<array>"):
        to_pixels(np.zeros((2, 2), np.uint8))


# ----------------------------------------------------------------------------------------------
# THE resize rule
# ----------------------------------------------------------------------------------------------


def test_target_size_documented_examples():
    cfg = PreprocessConfig()
    assert target_size(4032, 3024, cfg) == (1182, 886)
    assert padded_grid(886, 1182) == (56, 74)
    assert target_size(4032, 3024, PreprocessConfig(multiple="resize")) == (1168, 880)
    assert target_size(10, 10, cfg) == (16, 16)
    assert target_size(1, 1, cfg) == (16, 16)
    assert target_size(20000, 8, cfg) == (20000, 8)
    assert target_size(512, 512, cfg) == (512, 512)
    assert target_size(1024, 1024, cfg) == (1024, 1024)  # exactly at the budget: unchanged
    assert target_size(100, 100, PreprocessConfig(square=48)) == (48, 48)


def test_target_size_is_exact_where_float_is_not():
    # W*sqrt(max/A) is exactly 1024 for every N x N source; naive float64 gives 1023.999... for many N.
    naive_wrong = [n for n in range(1025, 4000) if math.floor(n * math.sqrt(1024 * 1024 / (n * n))) != 1024]
    assert naive_wrong, "expected naive float floor to fail somewhere (motivates the exact arithmetic)"
    for n in range(1025, 4000):
        assert target_size(n, n) == (1024, 1024)
    # upscale side: N x N below 256 px -> exactly 16 x 16
    for n in range(1, 16):
        assert target_size(n, n) == (16, 16)


def _dec_floor_sqrt(num: int, den: int) -> int:
    with localcontext() as ctx:
        ctx.prec = 80
        return int((Decimal(num) / Decimal(den)).sqrt().to_integral_value(ROUND_FLOOR))


def _dec_ceil_sqrt(num: int, den: int) -> int:
    with localcontext() as ctx:
        ctx.prec = 80
        return int((Decimal(num) / Decimal(den)).sqrt().to_integral_value(ROUND_CEILING))


@pytest.mark.parametrize(
    "cfg",
    [PreprocessConfig(), PreprocessConfig(min_pixels=4096, max_pixels=256 * 256), PreprocessConfig(max_pixels=1000)],
    ids=["default", "64k", "tiny-max"],
)
def test_pad_rule_property(cfg):
    sizes = RNG.integers(1, 20001, size=(2000, 2))
    # also log-uniform sizes so small images (the upscale branch) are well represented
    sizes = np.concatenate([sizes, np.exp(RNG.uniform(0, math.log(20000), size=(2000, 2))).astype(int).clip(1, 20000)])
    for w, h in sizes.tolist():
        nw, nh = target_size(w, h, cfg)
        area = w * h
        if area > cfg.max_pixels:
            assert nw * nh <= cfg.max_pixels
            assert nw <= w and nh <= h
            exp_w = max(1, _dec_floor_sqrt(w * cfg.max_pixels, h))
            exp_h = max(1, _dec_floor_sqrt(h * cfg.max_pixels, w))
            if exp_w * exp_h <= cfg.max_pixels:  # no extreme-aspect cap involved
                assert (nw, nh) == (exp_w, exp_h)
                # aspect ratio preserved to within one pixel: each side is the exactly scaled side, floored
                s = math.sqrt(cfg.max_pixels / area)
                assert -1e-6 <= w * s - nw < 1 + 1e-6 and -1e-6 <= h * s - nh < 1 + 1e-6
        elif area < cfg.min_pixels:
            assert nw * nh >= cfg.min_pixels
            assert nw >= w and nh >= h
            assert (nw, nh) == (_dec_ceil_sqrt(w * cfg.min_pixels, h), _dec_ceil_sqrt(h * cfg.min_pixels, w))
        else:
            assert (nw, nh) == (w, h)


@pytest.mark.parametrize(
    "cfg",
    [
        PreprocessConfig(multiple="resize"),
        PreprocessConfig(multiple="resize", min_pixels=4096, max_pixels=256 * 256),
        PreprocessConfig(multiple="resize", patch_size=14, min_pixels=3136, max_pixels=12845056),
    ],
    ids=["default", "64k", "qwen2vl-p14"],
)
def test_resize_rule_property(cfg):
    p = cfg.patch_size
    sizes = np.concatenate(
        [
            RNG.integers(1, 20001, size=(2000, 2)),
            np.exp(RNG.uniform(0, math.log(20000), size=(2000, 2))).astype(int).clip(1, 20000),
        ]
    )
    for w, h in sizes.tolist():
        wb, hb = target_size(w, h, cfg)
        assert wb % p == 0 and hb % p == 0 and wb >= p and hb >= p
        assert wb * hb <= cfg.max_pixels
        rw, rh = (2 * w + p) // (2 * p) * p, (2 * h + p) // (2 * p) * p  # round half up
        if max(p, rw) * max(p, rh) < cfg.min_pixels:
            assert wb * hb >= cfg.min_pixels
        elif max(p, rw) * max(p, rh) <= cfg.max_pixels:
            assert (wb, hb) == (max(p, rw), max(p, rh))
        else:
            exp_h = max(p, _dec_floor_sqrt(h * cfg.max_pixels, w) // p * p)
            exp_w = max(p, _dec_floor_sqrt(w * cfg.max_pixels, h) // p * p)
            if exp_w * exp_h <= cfg.max_pixels:
                assert (wb, hb) == (exp_w, exp_h)


def test_extreme_aspect_ratios_keep_area_bounds():
    cfg = PreprocessConfig(max_pixels=1024, min_pixels=16)
    assert target_size(20000, 8, cfg) == (1024, 1)
    assert target_size(8, 20000, cfg) == (1, 1024)
    rcfg = PreprocessConfig(multiple="resize", max_pixels=65536)
    wb, hb = target_size(20000, 8, rcfg)
    assert (hb, wb) == (16, 4096) and wb * hb <= 65536
    # round half UP: 40/16 = 2.5 -> 3 patches (Qwen2-VL's Python round() is half-even: 2 -> 32)
    assert target_size(40, 40, PreprocessConfig(multiple="resize", min_pixels=1)) == (48, 48)


def test_padded_grid():
    assert padded_grid(512, 512) == (32, 32)
    assert padded_grid(8, 20000) == (1, 1250)
    assert padded_grid(17, 15) == (2, 1)
    assert padded_grid(1, 1, 14) == (1, 1)
    with pytest.raises(ValueError):
        padded_grid(0, 4)


# ----------------------------------------------------------------------------------------------
# config
# ----------------------------------------------------------------------------------------------


def test_config_json_roundtrip_and_validation():
    cfg = PreprocessConfig(max_pixels=512 * 512, multiple="resize", resample="lanczos", background=(0, 0, 0))
    d = json.loads(json.dumps(cfg.to_dict()))
    assert PreprocessConfig.from_dict(d) == cfg
    assert PreprocessConfig.from_dict({}) == PreprocessConfig()
    assert PreprocessConfig(background=[1, 2, 3]).background == (1, 2, 3)
    with pytest.raises(ValueError, match="unknown"):
        PreprocessConfig.from_dict({"patch": 16})
    bad = [
        dict(patch_size=0),
        dict(min_pixels=0),
        dict(max_pixels=100, min_pixels=200),
        dict(multiple="crop"),
        dict(resample="box"),
        dict(square=0),
        dict(square=47),
        dict(max_image_pixels=0),
        dict(background=(0, 0)),
        dict(background=(0, 0, 256)),
        dict(multiple="resize", max_pixels=255, min_pixels=1),
    ]
    for kw in bad:
        with pytest.raises(ValueError):
            PreprocessConfig(**kw)
    with pytest.raises(TypeError):
        PreprocessConfig(patch_size=16.0)
    with pytest.raises(TypeError):
        PreprocessConfig(patch_size=True)


# ----------------------------------------------------------------------------------------------
# the official demo path (square=T)
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "size,T",
    [((83, 61), 48), ((61, 83), 48), ((48, 48), 48), ((1500, 1000), 1024), ((700, 900), 1024), ((49, 49), 1024)],
)
def test_square_reproduces_official_demo(tmp_path, size, T):
    w, h = size
    path = save(Image.fromarray(noise(h, w)), tmp_path / "img.png")
    got = preprocess(path, PreprocessConfig(square=T))
    expected = official_pixels(official_resize_and_center_crop(Image.open(path).convert("RGB"), T))
    assert got.pixels.shape == (3, T, T) and got.content_size == (T, T)
    assert torch.equal(got.pixels, expected)
    assert got.grid == padded_grid(T, T) and got.source_size == (w, h)


def test_square_arithmetic_details():
    im = Image.fromarray(noise(61, 83))  # w=83, h=61: new_w = int((48/61)*83) = 65, crop x: round(8.5)=8
    out = resize_and_center_crop(im, 48)
    assert out.size == (48, 48)
    assert np.array_equal(np.asarray(out), np.asarray(im.resize((65, 48), Image.Resampling.BICUBIC))[:, 8:56])
    # the faithfully reproduced quirk: 49x49 -> (1024/49)*49 = 1023.99.. -> 1023 wide -> black last column
    assert int((1024 / 49) * 49) == 1023
    sq = resize_and_center_crop(Image.new("RGB", (49, 49), (200, 100, 50)), 1024)
    assert sq.size == (1024, 1024)
    a = np.asarray(sq)
    assert (a[:, -1] == 0).all() and (a[:, :-1] != 0).all()


# ----------------------------------------------------------------------------------------------
# bad inputs
# ----------------------------------------------------------------------------------------------


def _raises_naming(src, name: str, *patterns: str, **kw) -> str:
    with pytest.raises(ImageError) as info:
        preprocess(src, **kw)
    msg = str(info.value)
    assert name in msg, msg
    for pat in patterns:
        assert pat in msg, msg
    return msg


def test_missing_directory_empty_text(tmp_path):
    _raises_naming(tmp_path / "nope.png", "nope.png", "not found")
    (tmp_path / "adir.png").mkdir()
    _raises_naming(tmp_path / "adir.png", "adir.png", "directory")
    (tmp_path / "empty.jpg").write_bytes(b"")
    _raises_naming(tmp_path / "empty.jpg", "empty.jpg", "empty")
    (tmp_path / "notes.png").write_text("this is not an image\n" * 10)
    _raises_naming(tmp_path / "notes.png", "notes.png", "not a recognised image")
    _raises_naming(str(tmp_path / "notes.png"), "notes.png")  # str paths too


@pytest.mark.parametrize("fmt,ext", [("PNG", "png"), ("JPEG", "jpg")])
def test_truncated_files(tmp_path, fmt, ext):
    full = tmp_path / f"full.{ext}"
    Image.fromarray(noise(96, 128)).save(full, fmt)
    data = full.read_bytes()
    cut = tmp_path / f"cut.{ext}"
    cut.write_bytes(data[: len(data) // 2])
    msg = _raises_naming(cut, f"cut.{ext}", "truncated")
    assert "cannot decode" in msg
    _raises_naming(data[: len(data) // 2], "<bytes>", "truncated")
    assert not ImageFile.LOAD_TRUNCATED_IMAGES  # global state untouched
    preprocess(full)  # the intact file is fine


def test_corrupt_png(tmp_path):
    path = tmp_path / "ok.png"
    Image.fromarray(noise(64, 64)).save(path)
    data = bytearray(path.read_bytes())
    start = data.index(b"IDAT") + 4
    data[start + 10 : start + 200] = bytes(190)  # clobber compressed data (CRC now wrong too)
    bad = tmp_path / "corrupt.png"
    bad.write_bytes(bytes(data))
    _raises_naming(bad, "corrupt.png")
    _raises_naming(b"\x89PNG\r\n\x1a\n" + b"garbage" * 10, "<bytes>")
    _raises_naming(b"", "<bytes>", "empty")


def test_decompression_bomb_refused_from_header(tmp_path, monkeypatch):
    bomb = tmp_path / "bomb.png"
    bomb.write_bytes(png_with_claimed_size(40000, 40000))
    assert bomb.stat().st_size < 2000
    pil_limit = Image.MAX_IMAGE_PIXELS

    # Proof that nothing is decoded: make decoding blow up loudly.
    def no_decode(self):
        raise AssertionError("pixel data was decoded")

    monkeypatch.setattr(ImageFile.ImageFile, "load", no_decode)
    # Pillow's own guard fires inside Image.open (before our header check can); still an ImageError.
    msg = _raises_naming(bomb, "bomb.png", "1600000000 pixels", "decompression bomb")
    assert str(DEFAULT_MAX_IMAGE_PIXELS) in msg
    # Our guard: below Pillow's limit but above ours.
    medium = tmp_path / "medium.png"
    medium.write_bytes(png_with_claimed_size(3000, 3000))
    _raises_naming(
        medium,
        "medium.png",
        "3000x3000 = 9000000 pixels exceeds max_image_pixels=1000000",
        "decompression bomb",
        cfg=PreprocessConfig(max_image_pixels=1_000_000),
    )
    with pytest.raises(ImageError, match="<bytes>: 3000x3000"):
        load_image(medium.read_bytes(), max_image_pixels=1_000_000)
    # a lazily opened PIL image is checked before load() too
    with Image.open(medium) as lazy:
        with pytest.raises(ImageError, match=r"<PIL image>: 3000x3000 = 9000000 pixels"):
            load_image(lazy, max_image_pixels=1_000_000)
    monkeypatch.undo()
    assert Image.MAX_IMAGE_PIXELS == pil_limit
    # within our limit the (fake) file is decoded -> truncated data, reported as such
    _raises_naming(medium, "medium.png", "cannot decode")


def test_unsupported_types():
    with pytest.raises(ImageError, match="<list>: unsupported input type"):
        preprocess([[1, 2], [3, 4]])
    with pytest.raises(ImageError, match="torch"):
        preprocess(torch.zeros(3, 4, 4))


# ----------------------------------------------------------------------------------------------
# modes
# ----------------------------------------------------------------------------------------------


def test_cmyk_jpeg(tmp_path):
    path = save(Image.new("CMYK", (40, 32), (0, 0, 0, 0)), tmp_path / "cmyk.jpg")
    with Image.open(path) as im:
        assert im.mode == "CMYK"
        expected = np.asarray(im.convert("RGB"))
    got = load_image(path)
    assert np.array_equal(rgb(got), expected)
    assert rgb(got).min() >= 250  # no ink -> white
    out = preprocess(path)
    assert out.content_size == (32, 40) and out.pixels.shape == (3, 32, 40)


def test_palette_with_transparency(tmp_path):
    idx = np.zeros((8, 10), np.uint8)
    idx[:, 5:] = 1
    im = Image.fromarray(idx, mode="L").convert("P")
    im.putpalette([10, 20, 30, 200, 0, 0] + [0] * 762)
    im.info["transparency"] = 0
    path = tmp_path / "pal.png"
    im.save(path, transparency=0)
    got = rgb(load_image(path))
    assert (got[:, :5] == 255).all()  # transparent -> white background
    assert (got[:, 5:] == [200, 0, 0]).all()
    black = rgb(load_image(path, background=(0, 0, 0)))
    assert (black[:, :5] == 0).all()
    # also as a GIF (multi-frame: the first frame is used)
    frames = [im, Image.fromarray(np.full((8, 10), 1, np.uint8), mode="L").convert("P")]
    frames[1].putpalette([10, 20, 30, 200, 0, 0] + [0] * 762)
    gif = tmp_path / "anim.gif"
    frames[0].save(gif, save_all=True, append_images=frames[1:], transparency=0, duration=50)
    with Image.open(gif) as g:
        assert g.n_frames == 2
    got_gif = rgb(load_image(gif))
    assert (got_gif[:, :5] == 255).all() and (got_gif[:, 5:] == [200, 0, 0]).all()
    # multi-page TIFF: first page
    tif = tmp_path / "pages.tif"
    Image.new("RGB", (4, 3), (1, 2, 3)).save(tif, save_all=True, append_images=[Image.new("RGB", (5, 5), (9, 9, 9))])
    first = load_image(tif)
    assert first.size == (4, 3) and first.getpixel((0, 0)) == (1, 2, 3)


def test_la_and_rgba_alpha_formula(tmp_path):
    grey = np.array([[0, 100, 200, 255]], np.uint8)
    alpha = np.array([[0, 128, 255, 64]], np.uint8)
    path = save(Image.fromarray(np.stack([grey, alpha], -1), mode="LA"), tmp_path / "la.png")
    got = rgb(load_image(path, background=(255, 0, 10)))
    bg = np.array([255, 0, 10])
    g, a = grey[0].astype(int)[:, None], alpha[0].astype(int)[:, None]
    expected = (g * a + bg * (255 - a) + 127) // 255
    assert np.array_equal(got[0], expected)
    assert np.array_equal(got[0, 0], bg) and np.array_equal(got[0, 2], [200, 200, 200])
    rgba = np.concatenate([noise(4, 5), noise(4, 5, 1)[..., None]], -1)
    got = rgb(load_image(Image.fromarray(rgba)))
    f, a = rgba[..., :3].astype(int), rgba[..., 3:].astype(int)
    assert np.array_equal(got, (f * a + 255 * (255 - a) + 127) // 255)


def test_premultiplied_modes():
    rgba = np.array([[[200, 100, 50, 255], [100, 50, 0, 128], [0, 0, 0, 0]]], np.uint8)
    # premultiply: c_pm = c*a/255
    pm = rgba.copy()
    pm[..., :3] = (rgba[..., :3].astype(int) * rgba[..., 3:].astype(int) + 127) // 255
    got = rgb(load_image(Image.frombytes("RGBa", (3, 1), pm.tobytes())))
    assert np.array_equal(got[0, 0], [200, 100, 50])
    assert np.array_equal(got[0, 2], [255, 255, 255])
    assert np.abs(got[0, 1].astype(int) - [178, 152, 127]).max() <= 1  # c*a + 255*(1-a)
    la = Image.frombytes("La", (2, 1), bytes([50, 128, 0, 0]))
    got = rgb(load_image(la))
    assert np.array_equal(got[0, 1], [255, 255, 255]) and abs(int(got[0, 0, 0]) - (50 + 127)) <= 1


def test_16bit_grey_png(tmp_path):
    values = np.array([[65535, 32896, 0, 257, 128, 129, 33023]], np.uint16)
    path = save(Image.fromarray(values), tmp_path / "grey16.png")
    with Image.open(path) as im:
        assert im.mode == "I;16"
    got = rgb(load_image(path))
    assert got[0, :, 0].tolist() == [255, 128, 0, 1, 0, 1, 128]
    assert (got[..., 0] == got[..., 1]).all() and (got[..., 0] == got[..., 2]).all()
    # big-endian and 32-bit variants of the same data
    be = Image.frombytes("I;16B", (7, 1), values.astype(">u2").tobytes())
    assert rgb(load_image(be))[0, :, 0].tolist() == [255, 128, 0, 1, 0, 1, 128]
    i32 = Image.fromarray(values.astype(np.int32))
    assert i32.mode == "I"
    assert rgb(load_image(i32))[0, :, 0].tolist() == [255, 128, 0, 1, 0, 1, 128]
    # 16-bit grey colour key (tRNS): keyed samples become background
    keyed = save(Image.fromarray(values), tmp_path / "keyed16.png", transparency=32896)
    assert rgb(load_image(keyed, background=(0, 0, 0)))[0, :, 0].tolist() == [255, 0, 0, 1, 0, 1, 128]
    with pytest.raises(ImageError, match=r"<PIL image>: mode 'I'.*\[-5, 70000\]"):
        load_image(Image.fromarray(np.array([[-5, 70000]], np.int32)))


def test_16bit_rgb_png_pillow_behaviour(tmp_path):
    # Pillow 13 decodes 16-bit RGB(A) PNGs straight to 8-bit mode RGB(A) keeping the high byte (v >> 8).
    arr = np.array([[[0xFFFF, 0x8080, 0x00FF], [0x80FF, 0x0100, 0x0000]]], np.uint16)
    path = tmp_path / "rgb16.png"
    path.write_bytes(png16(arr, 2))
    with Image.open(path) as im:
        assert im.mode == "RGB"
    got = rgb(load_image(path))
    assert np.array_equal(got, (arr >> 8).astype(np.uint8))
    assert np.abs(got.astype(int) - (arr.astype(int) + 128) // 257).max() <= 1
    rgba = np.array([[[0xFFFF, 0, 0, 0xFFFF], [0, 0xFFFF, 0, 0]]], np.uint16)
    path4 = tmp_path / "rgba16.png"
    path4.write_bytes(png16(rgba, 6))
    got = rgb(load_image(path4))
    assert got[0, 0].tolist() == [255, 0, 0] and got[0, 1].tolist() == [255, 255, 255]


def test_float_and_bilevel_and_other_modes():
    f = Image.fromarray(np.array([[1.7, -3.0, 300.0, 127.5, 128.4]], np.float32))
    assert f.mode == "F"
    assert rgb(load_image(f))[0, :, 0].tolist() == [2, 0, 255, 128, 128]
    with pytest.raises(ImageError, match="NaN"):
        load_image(Image.fromarray(np.array([[np.nan, 1.0]], np.float32)))
    bilevel = Image.fromarray(np.array([[True, False]]))
    assert bilevel.mode == "1"
    assert rgb(load_image(bilevel))[0].tolist() == [[255, 255, 255], [0, 0, 0]]
    ycc = Image.fromarray(noise(4, 4)).convert("YCbCr")
    assert np.array_equal(rgb(load_image(ycc)), np.asarray(ycc.convert("RGB")))
    grey = Image.fromarray(np.array([[0, 7, 9]], np.uint8))
    grey.info["transparency"] = 7  # colour key (PNG tRNS)
    assert rgb(load_image(grey))[0].tolist() == [[0, 0, 0], [255, 255, 255], [9, 9, 9]]


@pytest.mark.parametrize("orientation,k", [(6, -1), (8, 1), (3, 2), (1, 0)])
def test_exif_orientation(tmp_path, orientation, k):
    # 64 wide x 32 high, flat blocks so JPEG noise does not matter; a red marker top-left.
    arr = np.zeros((32, 64, 3), np.uint8)
    arr[..., 2] = 255
    arr[:16, :16] = [255, 0, 0]
    exif = Image.Exif()
    exif[274] = orientation
    path = save(Image.fromarray(arr), tmp_path / f"o{orientation}.jpg", exif=exif, quality=95)
    with Image.open(path) as raw:
        stored = np.asarray(raw.convert("RGB"))  # what a non-EXIF-aware loader gives
    got = rgb(load_image(path))
    # exact: the transpose is lossless on the decoded pixels (np.rot90 k=-1 is clockwise)
    assert np.array_equal(got, np.rot90(stored, k))
    out = preprocess(path)
    if orientation in (6, 8):
        assert out.source_size == (32, 64) and out.content_size == (64, 32)
    # where the stored top-left marker ends up once upright: 6 = rotate clockwise -> top-right, ...
    row, col = {6: (0, -1), 8: (-1, 0), 3: (-1, -1), 1: (0, 0)}[orientation]
    corner = got[row, col]
    assert corner[0] > 200 and corner[2] < 60
    # same result when the opened PIL image or the bytes are passed
    with Image.open(path) as im:
        assert np.array_equal(rgb(load_image(im)), got)
        assert im.size == (64, 32)  # the caller's image is not modified
    assert np.array_equal(rgb(load_image(path.read_bytes())), got)


# ----------------------------------------------------------------------------------------------
# sizes
# ----------------------------------------------------------------------------------------------


def test_one_pixel_image(tmp_path):
    path = save(Image.new("RGB", (1, 1), (10, 20, 30)), tmp_path / "dot.png")
    out = preprocess(path)
    assert isinstance(out, PreparedImage)
    assert out.source_size == (1, 1) and out.content_size == (16, 16) and out.grid == (1, 1)
    assert out.num_tokens == 1
    expected = (torch.tensor([10.0, 20.0, 30.0]) / 255 - 0.5) / 0.5
    assert torch.equal(out.pixels, expected[:, None, None].expand(3, 16, 16))


def test_long_strip_native(tmp_path):
    arr = noise(8, 20000)
    path = save(Image.fromarray(arr), tmp_path / "strip.png")
    out = preprocess(path)
    assert out.source_size == (20000, 8) and out.content_size == (8, 20000) and out.grid == (1, 1250)
    assert torch.equal(out.pixels, official_pixels(Image.fromarray(arr)))  # untouched native pixels


def test_downscale_and_resize_modes(tmp_path):
    arr = noise(300, 500)
    out = preprocess(arr, PreprocessConfig(max_pixels=100 * 100))
    h, w = out.content_size
    assert (w, h) == target_size(500, 300, PreprocessConfig(max_pixels=100 * 100)) == (129, 77)
    assert out.pixels.shape == (3, 77, 129) and out.grid == (5, 9)
    expected = official_pixels(Image.fromarray(arr).resize((129, 77), Image.Resampling.BICUBIC))
    assert torch.equal(out.pixels, expected)
    out = preprocess(arr, PreprocessConfig(multiple="resize", resample="lanczos"))
    assert out.content_size == (304, 496) and out.grid == (19, 31)
    assert out.pixels.min() >= -1 and out.pixels.max() <= 1


# ----------------------------------------------------------------------------------------------
# numpy, bytes and PIL inputs
# ----------------------------------------------------------------------------------------------


def test_numpy_inputs():
    base = noise(6, 7)
    ref = preprocess(Image.fromarray(base))
    assert ref.source == "<PIL image>"
    out = preprocess(base)
    assert out.source == "<array>" and torch.equal(out.pixels, ref.pixels)
    grey = noise(6, 7, 1)
    g3 = np.repeat(grey[..., None], 3, -1)
    assert np.array_equal(rgb(load_image(grey)), g3)
    assert np.array_equal(rgb(load_image(grey[..., None])), g3)
    opaque = np.concatenate([base, np.full((6, 7, 1), 255, np.uint8)], -1)
    assert np.array_equal(rgb(load_image(opaque)), base)
    clear = np.concatenate([base, np.zeros((6, 7, 1), np.uint8)], -1)
    assert (rgb(load_image(clear)) == 255).all()
    ga = np.stack([grey, np.zeros_like(grey)], -1)
    assert (rgb(load_image(ga, background=(1, 2, 3))) == [1, 2, 3]).all()
    assert rgb(load_image(np.array([[True, False]])))[0].tolist() == [[255] * 3, [0] * 3]
    u16 = np.array([[65535, 32896, 0]], np.uint16)
    assert rgb(load_image(u16))[0, :, 0].tolist() == [255, 128, 0]
    fl = np.array([[0.0, 0.5, 1.0, 0.2]], np.float32)
    assert rgb(load_image(fl))[0, :, 0].tolist() == [0, 128, 255, 51]
    assert np.array_equal(rgb(load_image(base.astype(np.float64) / 255)), base)
    # non-contiguous views are fine
    assert np.array_equal(rgb(load_image(base[:, ::-1])), base[:, ::-1])

    bad = [
        (np.zeros((3, 6, 7), np.uint8), "channels-first"),
        (np.zeros((6, 7, 5), np.uint8), "unsupported array shape"),
        (np.zeros((2, 6, 7, 3), np.uint8), "batch"),
        (np.zeros((0, 7, 3), np.uint8), "empty"),
        (np.zeros((6, 7, 3), np.int64), "unsupported array dtype int64"),
        (np.zeros((6, 7, 3), np.complex64), "unsupported array dtype"),
        (np.full((6, 7, 3), 2.0, np.float32), "[0, 1]"),
        (np.full((6, 7), np.nan, np.float32), "NaN"),
        (np.zeros(5, np.uint8), "unsupported array shape"),
    ]
    for arr, pattern in bad:
        with pytest.raises(ImageError) as info:
            preprocess(arr)
        assert str(info.value).startswith("<array>: ") and pattern in str(info.value), str(info.value)


def test_bytes_inputs_match_path(tmp_path):
    path = save(Image.fromarray(noise(20, 30)), tmp_path / "b.png")
    ref = preprocess(path)
    assert ref.source == str(path)
    data = path.read_bytes()
    for src in (data, bytearray(data), memoryview(data)):
        out = preprocess(src)
        assert out.source == "<bytes>" and torch.equal(out.pixels, ref.pixels)
    assert torch.equal(preprocess(str(path)).pixels, ref.pixels)


# ----------------------------------------------------------------------------------------------
# real photographs (bundled with scikit-image, no download)
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["astronaut", "coffee", "rocket", "chelsea"])
def test_real_photographs(name):
    data = pytest.importorskip("skimage.data")
    arr = getattr(data, name)()
    assert arr.dtype == np.uint8 and arr.ndim == 3 and arr.shape[2] == 3
    h, w = arr.shape[:2]
    out = preprocess(arr)
    # all four are between 256 and 1024^2 pixels: native size, pixels bit-exact to the official path
    assert out.source_size == (w, h) and out.content_size == (h, w)
    assert out.grid == (math.ceil(h / 16), math.ceil(w / 16))
    assert torch.equal(out.pixels, official_pixels(Image.fromarray(arr)))
    if name == "astronaut":
        assert out.grid == (32, 32)

    cfg = PreprocessConfig(max_pixels=256 * 256)
    small = preprocess(arr, cfg)
    sh, sw = small.content_size
    assert sw * sh <= 256 * 256 and sw < w and sh < h
    # aspect ratio preserved within one pixel: both sides are w*s, h*s (s = sqrt(max/A)) rounded down
    s = math.sqrt(256 * 256 / (w * h))
    assert 0 <= w * s - sw < 1 and 0 <= h * s - sh < 1
    assert abs(sw / sh - w / h) < 0.03
    assert (sw, sh) == target_size(w, h, cfg)
    assert small.grid == padded_grid(sh, sw)
    assert small.pixels.dtype == torch.float32 and small.pixels.min() >= -1 and small.pixels.max() <= 1

    resized = preprocess(arr, PreprocessConfig(max_pixels=256 * 256, multiple="resize"))
    rh, rw = resized.content_size
    assert rh % 16 == 0 and rw % 16 == 0 and rh * rw <= 256 * 256
    assert resized.grid == (rh // 16, rw // 16)
