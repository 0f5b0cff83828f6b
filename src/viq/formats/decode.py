"""Decoding any image input to upright 8-bit RGB: :func:`load_image`, the loading policy of
:mod:`viq.formats.image` (which sizes and normalises what this returns).

Loading policy (:func:`load_image`)
-----------------------------------
* Errors: every failure (missing file, directory, empty file, unknown format, truncated or corrupt
  data, decompression bomb, unsupported array dtype/shape, ...) raises :class:`ImageError`, whose
  message starts with the source (the file path, ``<bytes>``, ``<PIL image>`` or ``<array>``) and
  states the problem. Pillow's global state (``Image.MAX_IMAGE_PIXELS``,
  ``ImageFile.LOAD_TRUNCATED_IMAGES``, warning filters) is never modified. If the *caller* has set
  ``ImageFile.LOAD_TRUNCATED_IMAGES = True``, Pillow silently accepts truncated files; that is
  their choice and is respected.
* Decompression bombs: ``width*height`` from the header is checked against ``max_image_pixels``
  before any pixel is decoded. Pillow runs its own check inside ``Image.open`` (error above
  ``2 * Image.MAX_IMAGE_PIXELS`` = 178956970 by default, the same as our default); that error is
  turned into an :class:`ImageError` too, so the effective limit is the smaller of the two (raise
  ``PIL.Image.MAX_IMAGE_PIXELS`` yourself to go beyond Pillow's). Pillow's
  ``DecompressionBombWarning`` (above ``Image.MAX_IMAGE_PIXELS``) is left alone (our check is
  authoritative); if the caller's warning filters escalate it to an exception it becomes an
  :class:`ImageError`.
* Colour: no ICC colour management (stored values are used as they are, like the official
  ``convert("RGB")``). Mode conversions to 8-bit RGB:

  ======================  ========================================================================
  mode                    conversion
  ======================  ========================================================================
  RGB, L, 1, P, CMYK,     Pillow ``convert("RGB")`` (CMYK: Pillow's naive formula; YCbCr/LAB/HSV:
  YCbCr, LAB, HSV, RGBX   Pillow's converters; 1: 0/255)
  RGBA, LA, PA, P or any  straight alpha, composited over ``background``:
  mode with transparency  ``out = (c*a + bg*(255-a) + 127) // 255`` (exact for a = 0 and a = 255)
  RGBa, La                premultiplied alpha: ``out = c + (bg*(255-a) + 127) // 255``
  I;16, I;16L/B/N         16-bit grey: ``round(v*255/65535) = (v + 128) // 257`` (65535 -> 255,
                          32896 -> 128; scaled, never clipped)
  I (int32)               treated as 16-bit grey (Pillow's historic mode for 16-bit PNG/TIFF);
                          values outside [0, 65535] are an error
  F (float32)             Pillow's 0..255 float convention: clipped to [0, 255], rounded to nearest
                          (Pillow's own ``convert("L")`` truncates); NaN/inf is an error
  ======================  ========================================================================

  16-bit-per-channel colour PNGs (RGB/RGBA, and 16-bit grey+alpha) are reduced to 8 bits *by
  Pillow's decoder* (Pillow 13 opens them as mode RGB/RGBA keeping the most significant byte,
  ``v >> 8``, which differs from ``round(v/257)`` by at most one code); the 16-bit data is not
  reachable through Pillow, so that reduction is accepted as is. 16-bit grey PNGs open as
  ``I;16`` and keep full precision until the scaling above.
* Numpy arrays: ``(H, W)`` grey, ``(H, W, 1)`` grey, ``(H, W, 2)`` grey+alpha, ``(H, W, 3)`` RGB,
  ``(H, W, 4)`` RGBA (straight alpha). dtypes: ``uint8`` (as is), ``bool`` (0/255), ``uint16``
  (``(v + 128) // 257``), ``float16/32/64`` with all values in [0, 1] (``floor(v*255 + 0.5)``;
  values outside [0, 1] or non-finite are an error). Anything else (int64, channels-first
  ``(3, H, W)``, 4-D batches, empty arrays, ...) is an error that says what to do. Arrays carry no
  EXIF and are not subject to the bomb guard (they are already decoded).
* PIL images passed in are not modified (apart from Pillow's lazy ``load()``); their EXIF
  orientation is applied like for files, so a path, its bytes and the opened image give the same
  result.
"""

from __future__ import annotations

import io
import os
import re
from typing import Any, Union

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

__all__ = [
    "DEFAULT_MAX_IMAGE_PIXELS",
    "ImageError",
    "ImageSource",
    "as_int",
    "check_background",
    "load_image",
    "source_name",
]


def as_int(owner: str, name: str, value: Any) -> int:
    """``value`` as an int, or a TypeError naming ``owner.name`` (a bool is refused)."""
    # bool is an int subclass; True as a patch size is a bug, not a 1.
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"{owner}.{name} must be an int, got {type(value).__name__} {value!r}")
    return int(value)


def check_background(value: Any, owner: str = "background") -> tuple[int, int, int]:
    """``value`` as an RGB triple of ints in [0, 255], or a ValueError naming ``owner``."""
    try:
        items = tuple(value)
    except TypeError:
        items = ()
    if len(items) != 3 or any(
        isinstance(c, bool) or not isinstance(c, (int, np.integer)) or not 0 <= int(c) <= 255 for c in items
    ):
        raise ValueError(f"{owner} must be 3 ints in [0, 255] (an RGB colour), got {value!r}")
    return (int(items[0]), int(items[1]), int(items[2]))


#: Same as Pillow's own hard limit (``2 * Image.MAX_IMAGE_PIXELS`` with Pillow's default).
DEFAULT_MAX_IMAGE_PIXELS = 178_956_970


#: Anything :func:`load_image` / :func:`preprocess` accept.
ImageSource = Union[str, "os.PathLike[str]", bytes, bytearray, memoryview, Image.Image, np.ndarray]


_WIDE_GREY_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I", "F")


_STRAIGHT_ALPHA_MODES = ("RGBA", "LA", "PA")


_PREMULTIPLIED_MODES = ("RGBa", "La")


class ImageError(ValueError):
    """An image could not be loaded or converted.

    The message always starts with the source (file path, ``<bytes>``, ``<PIL image>`` or
    ``<array>``) followed by the problem.
    """


def source_name(src: Any) -> str:
    """How errors name an input: its path, or ``<bytes>`` / ``<PIL image>`` / ``<array>``."""
    if isinstance(src, (str, os.PathLike)):
        return os.fsdecode(os.fspath(src))
    if isinstance(src, (bytes, bytearray, memoryview)):
        return "<bytes>"
    if isinstance(src, Image.Image):
        return "<PIL image>"
    if isinstance(src, np.ndarray):
        return "<array>"
    return f"<{type(src).__name__}>"


def _check_bomb(size: tuple[int, int], limit: int, source: str) -> None:
    w, h = size
    if w * h > limit:
        raise ImageError(
            f"{source}: {w}x{h} = {w * h} pixels exceeds max_image_pixels={limit}, refusing to decode "
            "(decompression bomb guard)"
        )


_PIL_BOMB_PIXELS = re.compile(r"\((\d+) pixels\)")


def _pil_bomb_error(exc: Exception, limit: int, source: str) -> ImageError:
    """Pillow refused first (inside Image.open, before we could read the size): say so clearly."""
    found = _PIL_BOMB_PIXELS.search(str(exc))
    what = f"{found.group(1)} pixels" if found else "the image size"
    pil_limit = Image.MAX_IMAGE_PIXELS
    hint = ""
    if pil_limit is not None and limit > 2 * pil_limit:
        hint = (
            f"; Pillow's own limit (2 * PIL.Image.MAX_IMAGE_PIXELS = {2 * pil_limit}) is below "
            f"max_image_pixels={limit}: raise PIL.Image.MAX_IMAGE_PIXELS to allow it"
        )
    return ImageError(
        f"{source}: {what} exceeds Pillow's decompression-bomb limit, refusing to decode "
        f"(decompression bomb guard, max_image_pixels={limit}; Pillow: {exc}){hint}"
    )


def _composite_straight(rgba: np.ndarray, background: tuple[int, int, int]) -> np.ndarray:
    """uint8 ``(H, W, 4)`` straight alpha over ``background`` -> uint8 ``(H, W, 3)``."""
    alpha = rgba[..., 3:4]
    if np.all(alpha == 255):  # opaque: skip the arithmetic (and be obviously exact)
        return np.ascontiguousarray(rgba[..., :3])
    a = alpha.astype(np.uint16)
    fg = rgba[..., :3].astype(np.uint16)
    bg = np.asarray(background, dtype=np.uint16)
    # Max value 255*a + 255*(255-a) + 127 = 65152 fits uint16; +127 rounds to nearest.
    return ((fg * a + bg * (255 - a) + 127) // 255).astype(np.uint8)


def _composite_premultiplied(rgba: np.ndarray, background: tuple[int, int, int]) -> np.ndarray:
    """uint8 ``(H, W, 4)`` premultiplied alpha over ``background`` -> uint8 ``(H, W, 3)``."""
    a = rgba[..., 3:4].astype(np.uint16)
    c = rgba[..., :3].astype(np.uint16)
    bg = np.asarray(background, dtype=np.uint16)
    # Premultiplied "over": c + bg*(1 - a). Clip guards against invalid data (c > a).
    return np.minimum(c + (bg * (255 - a) + 127) // 255, 255).astype(np.uint8)


def _wide_grey_to_uint8(arr: np.ndarray, mode: str, source: str) -> np.ndarray:
    """16-bit / int32 / float32 grey ``(H, W)`` -> uint8 ``(H, W)`` (see the module table)."""
    if mode == "F":
        v = arr.astype(np.float64)
        if not np.all(np.isfinite(v)):
            raise ImageError(f"{source}: mode 'F' (float) image contains NaN or infinite values")
        return np.floor(np.clip(v, 0.0, 255.0) + 0.5).astype(np.uint8)
    v = arr.astype(np.int64)
    if mode == "I":
        lo, hi = int(v.min()), int(v.max())
        if lo < 0 or hi > 65535:
            raise ImageError(
                f"{source}: mode 'I' (32-bit int) image has values in [{lo}, {hi}]; it is read as 16-bit grey, "
                "so values must lie in [0, 65535]"
            )
    # round(v * 255 / 65535) = round(v / 257); 257 is odd so there are no ties.
    return ((v + 128) // 257).astype(np.uint8)


def _to_rgb(im: Image.Image, background: tuple[int, int, int], source: str) -> Image.Image:
    """Any Pillow mode -> a new, independent 8-bit ``RGB`` image (module table)."""
    mode = im.mode
    try:
        if mode in _WIDE_GREY_MODES:
            raw = np.asarray(im)
            grey = _wide_grey_to_uint8(raw, mode, source)
            rgb = np.repeat(grey[..., None], 3, axis=2)
            transparency = im.info.get("transparency")
            if isinstance(transparency, (int, float)) and not isinstance(transparency, bool):
                # Grey colour key (PNG tRNS): matching samples are fully transparent.
                alpha = np.where(raw == transparency, 0, 255).astype(np.uint8)
                rgb = _composite_straight(np.concatenate([rgb, alpha[..., None]], axis=2), background)
            return Image.fromarray(np.ascontiguousarray(rgb))
        if mode in _PREMULTIPLIED_MODES:
            arr = np.asarray(im)
            if mode == "La":
                arr = np.concatenate([np.repeat(arr[..., :1], 3, axis=2), arr[..., 1:2]], axis=2)
            return Image.fromarray(_composite_premultiplied(arr, background))
        if mode in _STRAIGHT_ALPHA_MODES or im.has_transparency_data:
            # P/L/RGB/1 with a tRNS colour key or palette alpha also go through RGBA.
            rgba = np.asarray(im.convert("RGBA"))
            return Image.fromarray(_composite_straight(rgba, background))
        return im.convert("RGB")  # RGB (copy), L, 1, P, CMYK, YCbCr, LAB, HSV, RGBX
    except ImageError:
        raise
    except Exception as e:
        raise ImageError(f"{source}: cannot convert image mode {mode!r} to RGB ({type(e).__name__}: {e})") from e


def _array_to_rgb(arr: np.ndarray, background: tuple[int, int, int], source: str = "<array>") -> Image.Image:
    """numpy image (see module docstring for shapes/dtypes) -> 8-bit ``RGB`` PIL image."""
    shape = arr.shape
    if arr.ndim == 2:
        arr = arr[..., None]
    elif arr.ndim == 3:
        if shape[2] not in (1, 2, 3, 4):
            hint = ""
            if shape[0] in (1, 2, 3, 4):
                hint = " (looks channels-first: use arr.transpose(1, 2, 0))"
            raise ImageError(
                f"{source}: unsupported array shape {shape}: expected (H, W) or (H, W, C) with C in 1..4{hint}"
            )
    else:
        raise ImageError(
            f"{source}: unsupported array shape {shape}: expected (H, W) or (H, W, C) with C in 1..4 "
            "(one image, not a batch)"
        )
    if arr.shape[0] == 0 or arr.shape[1] == 0:
        raise ImageError(f"{source}: empty image array of shape {shape}")

    dt = arr.dtype
    if dt == np.uint8:
        x = arr
    elif dt == np.bool_:
        x = arr.astype(np.uint8) * np.uint8(255)
    elif dt == np.uint16:
        x = ((arr.astype(np.uint32) + 128) // 257).astype(np.uint8)  # round(v*255/65535)
    elif dt.kind == "f":
        v = arr.astype(np.float64)
        if not np.all(np.isfinite(v)):
            raise ImageError(f"{source}: float image array contains NaN or infinite values")
        lo, hi = float(v.min()), float(v.max())
        if lo < 0.0 or hi > 1.0:
            raise ImageError(
                f"{source}: float image arrays must have values in [0, 1], got [{lo:g}, {hi:g}] "
                "(for 0..255 data use arr.astype(np.uint8))"
            )
        x = np.floor(v * 255.0 + 0.5).astype(np.uint8)
    else:
        raise ImageError(
            f"{source}: unsupported array dtype {dt}: use uint8 (0..255), uint16 (0..65535), bool, or float "
            "in [0, 1] (for 0..255 integers use arr.astype(np.uint8))"
        )

    c = x.shape[2]
    if c == 1:
        rgb = np.repeat(x, 3, axis=2)
    elif c == 2:
        rgb = _composite_straight(np.concatenate([np.repeat(x[..., :1], 3, axis=2), x[..., 1:2]], axis=2), background)
    elif c == 3:
        rgb = x
    else:
        rgb = _composite_straight(x, background)
    return Image.fromarray(np.ascontiguousarray(rgb))


def _decode_stream(
    fp: str | io.BytesIO, source: str, max_image_pixels: int, background: tuple[int, int, int]
) -> Image.Image:
    """Open, guard, fully decode, orient and convert an encoded image (path or bytes)."""
    stage = "open"
    try:
        with Image.open(fp) as im:
            # The header is parsed, nothing is decoded yet: check the size first.
            _check_bomb(im.size, max_image_pixels, source)
            stage = "decode"
            # Decode everything now so truncated/corrupt data fails here, not in a later .resize().
            im.load()
            stage = "orient"
            ImageOps.exif_transpose(im, in_place=True)
            stage = "convert"
            return _to_rgb(im, background, source)
    except ImageError:
        raise
    except Image.DecompressionBombError as e:
        raise _pil_bomb_error(e, max_image_pixels, source) from e
    except Image.DecompressionBombWarning as e:  # only raised if the caller escalated it
        raise _pil_bomb_error(e, max_image_pixels, source) from e
    except UnidentifiedImageError as e:
        raise ImageError(f"{source}: not a recognised image format (Pillow cannot identify it)") from e
    except Exception as e:
        what = {
            "open": "cannot open image",
            "decode": "cannot decode image data (truncated or corrupt file)",
            "orient": "cannot apply EXIF orientation (corrupt EXIF data)",
            "convert": "cannot convert image",
        }[stage]
        raise ImageError(f"{source}: {what}: {type(e).__name__}: {e}") from e


def load_image(
    src: ImageSource,
    *,
    max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS,
    background: tuple[int, int, int] = (255, 255, 255),
) -> Image.Image:
    """Load any supported source as an upright 8-bit RGB PIL image.

    Args:
        src: a path (``str`` / ``os.PathLike``), encoded file bytes (``bytes``, ``bytearray``,
            ``memoryview``), a PIL image, or a numpy array (shapes/dtypes in the module docstring).
        max_image_pixels: refuse sources with more than this many pixels (width * height, read from
            the header before decoding; Pillow's own limit also applies).
        background: RGB colour that alpha is composited over.

    Returns:
        A new mode-``"RGB"`` image (first frame, EXIF orientation applied), independent of any
        file; its size is the upright source size.

    Raises:
        ImageError: for any unreadable, unsupported, truncated, corrupt or oversized input.
    """
    limit = as_int("load_image", "max_image_pixels", max_image_pixels)
    if limit < 1:
        raise ValueError(f"load_image.max_image_pixels must be >= 1, got {limit}")
    bg = check_background(background)
    source = source_name(src)

    if isinstance(src, np.ndarray):
        return _array_to_rgb(src, bg, source)

    if isinstance(src, Image.Image):
        _check_bomb(src.size, limit, source)
        try:
            src.load()  # a lazily opened image may still hold undecoded (possibly truncated) data
            upright = ImageOps.exif_transpose(src)  # a copy: the caller's image is not modified
        except ImageError:
            raise
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
            raise _pil_bomb_error(e, limit, source) from e
        except Exception as e:
            raise ImageError(f"{source}: cannot decode image data: {type(e).__name__}: {e}") from e
        if upright is None:  # pragma: no cover - only with in_place=True
            upright = src
        return _to_rgb(upright, bg, source)

    if isinstance(src, (bytes, bytearray, memoryview)):
        data = bytes(src)
        if not data:
            raise ImageError(f"{source}: empty data (0 bytes)")
        return _decode_stream(io.BytesIO(data), source, limit, bg)

    if isinstance(src, (str, os.PathLike)):
        path = os.fspath(src)
        if isinstance(path, bytes):
            path = os.fsdecode(path)
        # Explicit checks give clearer messages than Pillow's/the OS's (e.g. "cannot identify").
        if not os.path.exists(path):
            raise ImageError(f"{source}: file not found")
        if os.path.isdir(path):
            raise ImageError(f"{source}: is a directory, not an image file")
        try:
            size = os.path.getsize(path)
        except OSError as e:
            raise ImageError(f"{source}: cannot read file: {e}") from e
        if size == 0:
            raise ImageError(f"{source}: file is empty (0 bytes)")
        return _decode_stream(path, source, limit, bg)

    raise ImageError(
        f"{source}: unsupported input type {type(src).__module__}.{type(src).__qualname__}; expected a path, "
        "encoded image bytes, a PIL image or a numpy array (for a torch tensor use .numpy())"
    )
