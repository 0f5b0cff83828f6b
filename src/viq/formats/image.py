"""Image loading and preprocessing for ViQ: any input -> exact official pixels at native resolution.

ViQ tokenises an image at (close to) its native resolution with a ViT of patch size ``p = 16``.
This module turns a file path, encoded bytes, a PIL image or a numpy array into the float32
``(3, H, W)`` tensor the encoder expects, with the *official* normalisation, and reports the patch
grid the model will see.

This module is one contract, stated in full: every input kind (files, bytes,
arrays of every dtype and layout, PIL modes with and without alpha) mapped bit-exactly to the
official normalisation, each with the error a user sees when it cannot be.

Pipeline (:func:`preprocess`)
-----------------------------
1. :func:`load_image`: decode (bomb guard first, then a full decode so truncation is detected
   now), first frame only for multi-frame files (GIF/TIFF/APNG/WebP), EXIF orientation applied,
   any mode -> 8-bit RGB, alpha composited over ``background`` (white by default).
2. Resize the content according to THE rule below (:func:`target_size`); if the size does not
   change, the pixels are not resampled at all (bit-exact native pixels).
3. :func:`to_pixels`: ``v = torch.tensor(x).float() / 255; pixel = (v - 0.5) / 0.5`` in float32,
   exactly as the authors' code (bit-for-bit), values in [-1, 1].
4. The model later zero-pads right/bottom to a multiple of ``p``; :func:`padded_grid` reports the
   resulting ``(ceil(H/p), ceil(W/p))`` grid. That padding is *not* done here.

THE resize rule (``target_size``)
---------------------------------
Let ``W, H`` be the (EXIF-upright) source size, ``A = W*H``, ``p = patch_size``,
``max = max_pixels``, ``min = min_pixels``. All floors/ceils below are evaluated *exactly* on the
real numbers (integer square roots, no floating point), so e.g. a 2000x2000 image with
``max = 1024**2`` gives exactly 1024x1024 and never 1023 (a naive ``floor(W * sqrt(max / A))`` in
float64 gets ``W*s = 1023.9999999999999`` for many sizes).

``multiple="pad"`` (default; the official policy: keep the area-scaled size, the model pads)::

    if A > max:  s = sqrt(max / A);  W' = max(1, floor(W*s)),  H' = max(1, floor(H*s))
    elif A < min: s = sqrt(min / A); W' = ceil(W*s),            H' = ceil(H*s)
    else:         W', H' = W, H      (no resampling)
    tokens = ceil(H'/p) * ceil(W'/p)

Guarantees: downscaled content has ``W'*H' <= max`` and neither side grows; upscaled content has
``W'*H' >= min`` and neither side shrinks; the aspect ratio is preserved to within one pixel (each
side is the exactly scaled side ``W*s``, ``H*s`` rounded down, resp. up).
Only for absurd aspect ratios, where a side would round to 0 and is clamped to 1, is the other
side additionally capped to ``max // 1`` so that the area bound still holds (the aspect ratio
cannot be kept there anyway).

``multiple="resize"`` (Qwen2-VL "smart resize" style; both sides become multiples of ``p``, no
padding needed)::

    rhu(n) = floor(n/p + 1/2)                       # round half UP (Qwen2-VL uses half-even)
    Hb = max(p, rhu(H)*p);  Wb = max(p, rhu(W)*p)
    if Hb*Wb > max:  b = sqrt(A / max);  Hb = max(p, floor(H/b/p)*p);  Wb = max(p, floor(W/b/p)*p)
    elif Hb*Wb < min: b = sqrt(min / A); Hb = ceil(H*b/p)*p;           Wb = ceil(W*b/p)*p

Guarantees: ``Hb, Wb`` are multiples of ``p`` and ``Hb*Wb <= max`` (``max >= p*p`` is enforced
for this mode; if the ``max(p, ...)`` clamp fires on one side the other side is capped), and
``Hb*Wb >= min`` after the upscale branch (when the downscale branch fires, ``min`` is not
re-checked; it can only be violated if ``min`` is within a few patch rows of ``max``).

``square=T`` (the official *demo* path, ``resize_and_center_crop``): shorter side -> ``T`` with
``int((T/w)*h)`` float arithmetic (truncating), resize, then ``crop(((w-T)/2, (h-T)/2, (w+T)/2,
(h+T)/2))`` with Pillow's own (round-half-to-even) box rounding -> ``T x T``. No other rule
applies. Reproduced bit-for-bit, quirks included: for some square sources (e.g. 49x49 with
T = 1024) ``(T/h)*w`` evaluates to ``T - 1e-13`` and truncates to ``T - 1``, so the crop box
reaches one pixel past the resized image and Pillow fills that column with black. ``T`` must be
even (for odd ``T`` Pillow's half-to-even rounding can produce a ``T + 1`` wide crop).

Worked example (defaults: p = 16, min = 256, max = 1024*1024 = 1048576), a 4032x3024 photo:

* ``A = 12192768 > max``, ``s = sqrt(1048576/12192768) = 0.29325...``;
  ``W' = floor(4032*s) = floor(1182.4) = 1182``, ``H' = floor(3024*s) = floor(886.8) = 886``;
  area ``1047252 <= 1048576``; grid ``(ceil(886/16), ceil(1182/16)) = (56, 74)`` = 4144 tokens
  (the model zero-pads the 886x1182 content to 896x1184).
* ``multiple="resize"``: ``Hb*Wb = 3024*4032 > max`` -> ``Hb = floor(886.8/16)*16 = 880``,
  ``Wb = floor(1182.4/16)*16 = 1168``; grid (55, 73) = 4015 tokens, no padding.
* A 10x10 icon: ``A = 100 < 256`` -> ``s = 1.6`` -> 16x16, grid (1, 1).
* A 20000x8 strip: ``A = 160000`` is within [256, 1048576] -> kept native, grid (1, 1250).

Decoding any input to upright RGB (EXIF, alpha, wide and palette modes, decompression bombs) is
:mod:`viq.formats.decode`.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from PIL import Image

from viq.formats.decode import (
    DEFAULT_MAX_IMAGE_PIXELS,
    ImageError,
    ImageSource,
    as_int,
    check_background,
    load_image,
    source_name,
)
from viq.formats.resize import OfficialResize, parse_resize

__all__ = [
    "IMAGE_EXTENSIONS",
    "ImageError",
    "PreprocessConfig",
    "PreparedImage",
    "ImageSource",
    "DEFAULT_MAX_IMAGE_PIXELS",
    "load_image",
    "target_size",
    "padded_grid",
    "to_pixels",
    "to_pil",
    "resize_and_center_crop",
    "preprocess",
    "scheduled_max_pixels",
]

#: File name extensions (lower case) that viq treats as images when it lists folders and shards.
IMAGE_EXTENSIONS: tuple[str, ...] = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff")


_RESAMPLE: dict[str, Image.Resampling] = {
    "nearest": Image.Resampling.NEAREST,
    "bilinear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC,
    "lanczos": Image.Resampling.LANCZOS,
}
_MULTIPLE = ("pad", "resize")


# ----------------------------------------------------------------------------------------------
# configuration
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PreprocessConfig:
    """How :func:`preprocess` sizes an image (see the module docstring for THE rule).

    Attributes:
        patch_size: ViT patch size ``p`` (16 for ViQ).
        min_pixels: content-area lower bound; smaller images are upscaled to at least this area.
        max_pixels: content-area upper bound; larger images are downscaled to at most this area.
            ``1024 * 1024`` is the official demo's budget.
        multiple: ``"pad"`` (official): keep the area-scaled size, the model zero-pads to a
            multiple of ``patch_size``; ``"resize"``: resize so both sides are multiples of
            ``patch_size`` (Qwen2-VL smart-resize style, requires ``max_pixels >= patch_size**2``).
        resample: Pillow filter for resizing: ``"bicubic"`` (Pillow's default, as the official
            demo), ``"bilinear"``, ``"lanczos"`` or ``"nearest"``. Pillow antialiases on downscale.
        square: if set, the official demo path: shorter side -> ``square``, centre crop
            ``square x square``; ``min_pixels``/``max_pixels``/``multiple`` are then ignored.
            Must be a positive even int.
        max_image_pixels: decompression-bomb guard on the decoded source size (width * height,
            read from the header before decoding). Pillow's own limit also applies.
        background: RGB colour that alpha is composited over.
        resize: the authors' per-image rule of their LLaVA data (:class:`viq.formats.resize.OfficialResize`,
            or its text ``"384x16"`` / ``[w, h]``): when set, it alone sizes the image (PIL bilinear, as
            the authors' loader), and ``min_pixels`` / ``max_pixels`` / ``multiple`` / ``resample`` /
            ``square`` do not apply. A LLaVA record's ``"resize"`` arrives here, for training and
            extraction alike.
    """

    patch_size: int = 16
    min_pixels: int = 256
    max_pixels: int = 1024 * 1024
    multiple: str = "pad"
    resample: str = "bicubic"
    square: int | None = None
    max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS
    background: tuple[int, int, int] = (255, 255, 255)
    resize: Any = None

    def __post_init__(self) -> None:
        owner = type(self).__name__
        if self.resize is not None and not isinstance(self.resize, OfficialResize):
            object.__setattr__(self, "resize", parse_resize(self.resize))
        # Normalise numpy ints / JSON lists to plain Python values (frozen -> object.__setattr__).
        for name in ("patch_size", "min_pixels", "max_pixels", "max_image_pixels"):
            value = as_int(owner, name, getattr(self, name))
            if value < 1:
                raise ValueError(f"{owner}.{name} must be >= 1, got {value}")
            object.__setattr__(self, name, value)
        if self.max_pixels < self.min_pixels:
            raise ValueError(f"{owner}.max_pixels ({self.max_pixels}) must be >= min_pixels ({self.min_pixels})")
        if self.multiple not in _MULTIPLE:
            raise ValueError(f"{owner}.multiple must be one of {_MULTIPLE}, got {self.multiple!r}")
        if self.multiple == "resize" and self.max_pixels < self.patch_size**2:
            raise ValueError(
                f"{owner}.max_pixels ({self.max_pixels}) must be >= patch_size**2 "
                f"({self.patch_size**2}) with multiple='resize' (the smallest possible content is one patch)"
            )
        if self.resample not in _RESAMPLE:
            raise ValueError(f"{owner}.resample must be one of {tuple(_RESAMPLE)}, got {self.resample!r}")
        if self.square is not None:
            square = as_int(owner, "square", self.square)
            if square < 2 or square % 2:
                raise ValueError(
                    f"{owner}.square must be a positive even int, got {square} (with an odd size the "
                    "official centre-crop box rounds, half to even, to a (square+1)-wide crop)"
                )
            object.__setattr__(self, "square", square)
        object.__setattr__(self, "background", check_background(self.background, f"{owner}.background"))

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict (``background`` as a list)."""
        d = dataclasses.asdict(self)
        d["background"] = list(self.background)
        r = self.resize
        d["resize"] = None if r is None else str(r) if r.kind == "area" else [r.a, r.b]
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> PreprocessConfig:
        """Inverse of :meth:`to_dict`; missing keys take defaults, unknown keys are an error."""
        from viq.model.config import dataclass_from_dict

        if not isinstance(d, dict):
            raise TypeError(f"{cls.__name__}.from_dict expects a dict, got {type(d).__name__}")
        return dataclass_from_dict(cls, d, cls.__name__)


# ----------------------------------------------------------------------------------------------
# size arithmetic (exact integer maths: no float floor/ceil pitfalls)
# ----------------------------------------------------------------------------------------------


def _floor_sqrt(num: int, den: int) -> int:
    """``floor(sqrt(num / den))`` exactly, for ints ``num >= 0``, ``den > 0``."""
    # floor(sqrt(x)) == isqrt(floor(x)) for real x >= 0: k <= sqrt(x) <=> k*k <= x <=> k*k <= floor(x).
    return math.isqrt(num // den)


def _ceil_sqrt(num: int, den: int) -> int:
    """``ceil(sqrt(num / den))`` exactly, for ints ``num >= 0``, ``den > 0``."""
    k = math.isqrt(num // den)  # floor(sqrt(num/den)); the ceiling is k or k + 1
    if k * k * den < num:
        k += 1
    return k


def _check_size(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    return int(value)


def target_size(width: int, height: int, cfg: PreprocessConfig = PreprocessConfig()) -> tuple[int, int]:
    """Content size ``(new_width, new_height)`` for a ``width x height`` source under ``cfg``.

    Pure integer arithmetic implementing THE rule of the module docstring (``multiple="pad"`` or
    ``"resize"``); with ``cfg.square = T`` the result is ``(T, T)``. Returns the input size when
    no resize is needed.
    """
    w = _check_size("width", width)
    h = _check_size("height", height)
    if cfg.resize is not None:
        return cfg.resize.target_size(w, h)
    if cfg.square is not None:
        return (cfg.square, cfg.square)
    lo, hi, p = cfg.min_pixels, cfg.max_pixels, cfg.patch_size
    area = w * h

    if cfg.multiple == "pad":
        if area > hi:
            # W*sqrt(hi/A) = sqrt(W*hi/H): exact floor via integer square root.
            nw = max(1, _floor_sqrt(w * hi, h))
            nh = max(1, _floor_sqrt(h * hi, w))
            if nw * nh > hi:
                # Only when a side was clamped from 0 to 1 (aspect > hi:1): cap the other side.
                if nh == 1:
                    nw = hi
                else:
                    nh = hi
            return (nw, nh)
        if area < lo:
            return (_ceil_sqrt(w * lo, h), _ceil_sqrt(h * lo, w))
        return (w, h)

    # multiple == "resize"
    def round_half_up(n: int) -> int:  # floor(n/p + 1/2)
        return (2 * n + p) // (2 * p)

    hb = max(p, round_half_up(h) * p)
    wb = max(p, round_half_up(w) * p)
    if hb * wb > hi:
        # H / sqrt(A/hi) = sqrt(H*hi/W); floor(y/p) = floor(floor(y)/p) for integer p.
        hb = max(p, _floor_sqrt(h * hi, w) // p * p)
        wb = max(p, _floor_sqrt(w * hi, h) // p * p)
        if hb * wb > hi:
            # Only when one side was clamped up to p (extreme aspect): cap the other side.
            if hb == p:
                wb = max(p, hi // p // p * p)
            else:
                hb = max(p, hi // p // p * p)
    elif hb * wb < lo:
        # H * sqrt(lo/A) = sqrt(H*lo/W); ceil(y/p) = ceil(ceil(y)/p) for integer p.
        hb = -(-_ceil_sqrt(h * lo, w) // p) * p
        wb = -(-_ceil_sqrt(w * lo, h) // p) * p
    return (wb, hb)


def padded_grid(height: int, width: int, patch_size: int = 16) -> tuple[int, int]:
    """Patch grid ``(ceil(height/p), ceil(width/p))`` the model sees after zero-padding."""
    h = _check_size("height", height)
    w = _check_size("width", width)
    p = _check_size("patch_size", patch_size)
    return (-(-h // p), -(-w // p))


# ----------------------------------------------------------------------------------------------
# pixels
# ----------------------------------------------------------------------------------------------


def to_pixels(image: Image.Image | np.ndarray) -> torch.Tensor:
    """Official normalisation: RGB uint8 ``(H, W, 3)`` -> float32 ``(3, H, W)`` in [-1, 1].

    Computes ``v = torch.tensor(x).float() / 255; (v - 0.5) / 0.5`` exactly as the authors' code.
    The true division by 255 is required: ``x * (1/255)`` rounds twice (the reciprocal, then the
    product) and differs by one ulp for some values, which would break bit-exactness.

    Args:
        image: a PIL image of mode ``"RGB"`` or a ``uint8`` array of shape ``(H, W, 3)``. Use
            :func:`load_image` to get there from anything else (it handles alpha, 16-bit, ...).
    """
    if isinstance(image, Image.Image):
        if image.mode != "RGB":
            raise ImageError(
                f"<PIL image>: to_pixels needs mode 'RGB', got {image.mode!r} (use load_image() to convert, "
                "which composites alpha and scales 16-bit data)"
            )
        x = np.asarray(image)
    elif isinstance(image, np.ndarray):
        if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
            raise ImageError(
                f"<array>: to_pixels needs a uint8 array of shape (H, W, 3), got {image.dtype} {image.shape} "
                "(use load_image() to convert other arrays)"
            )
        x = image
    else:
        raise ImageError(f"<{type(image).__name__}>: to_pixels needs a PIL RGB image or a uint8 (H, W, 3) array")
    if x.shape[0] == 0 or x.shape[1] == 0:
        raise ImageError(f"<array>: to_pixels got an empty image of shape {x.shape}")
    # torch.tensor copies, so read-only arrays (np.asarray of a PIL image) are fine.
    v = torch.tensor(x).float() / 255
    pixel = (v - 0.5) / 0.5
    return pixel.permute(2, 0, 1).contiguous()


# ----------------------------------------------------------------------------------------------
# loading
# ----------------------------------------------------------------------------------------------


def to_pil(pixels: torch.Tensor) -> Image.Image:
    """The inverse of :func:`to_pixels`: (3, H, W) values in [-1, 1] -> RGB image, rounded to the
    nearest 8-bit level (exact for pixels that came from :func:`to_pixels`)."""
    if pixels.ndim != 3 or pixels.shape[0] != 3:
        raise ValueError(f"expected (3, H, W) pixels, got {tuple(pixels.shape)}")
    arr = ((pixels.detach().float().cpu() * 0.5 + 0.5).clamp(0, 1) * 255).round().to(torch.uint8)
    return Image.fromarray(arr.permute(1, 2, 0).numpy())


# ----------------------------------------------------------------------------------------------
# preprocessing
# ----------------------------------------------------------------------------------------------


def resize_and_center_crop(
    image: Image.Image, size: int, resample: Image.Resampling = Image.Resampling.BICUBIC
) -> Image.Image:
    """The official demo's ``resize_and_center_crop`` (bit-for-bit, including its quirks).

    Shorter side -> ``size`` (the other side ``int((size/short)*long)``, truncating), resize with
    ``resample`` (Pillow's default BICUBIC in the demo), then centre crop with the float box
    ``((w-T)/2, (h-T)/2, (w+T)/2, (h+T)/2)`` that Pillow rounds half-to-even. See the module
    docstring for the square-source quirk.
    """
    w, h = image.size
    if w < h:
        new_w = size
        new_h = int((size / w) * h)
    else:
        new_h = size
        new_w = int((size / h) * w)
    image = image.resize((new_w, new_h), resample=resample)
    w, h = image.size
    return image.crop(((w - size) / 2, (h - size) / 2, (w + size) / 2, (h + size) / 2))


def scheduled_max_pixels(max_pixels: int, schedule: Sequence[tuple[int, int] | list[int]], step: int) -> int:
    """A progressive-resolution schedule (``[[start_step, max_pixels], ...]``, as recipes write
    ``data.resolution_schedule``): the ``max_pixels`` of the last phase started by ``step``, else
    ``max_pixels``."""
    value = max_pixels
    for start, pixels in sorted(schedule):
        if step >= start:
            value = pixels
    return value


@dataclass(frozen=True, eq=False)
class PreparedImage:
    """One preprocessed image.

    Attributes:
        pixels: float32 ``(3, H, W)`` in [-1, 1] (official normalisation), unpadded content.
        source_size: ``(width, height)`` of the decoded, EXIF-upright source.
        content_size: ``(height, width)`` of ``pixels`` (``H, W``).
        grid: ``(ceil(H/p), ceil(W/p))``, the patch grid after the model's zero-padding.
        source: the source name (path, ``<bytes>``, ``<PIL image>`` or ``<array>``).
    """

    pixels: torch.Tensor
    source_size: tuple[int, int]
    content_size: tuple[int, int]
    grid: tuple[int, int]
    source: str

    @property
    def num_tokens(self) -> int:
        """Number of patches the encoder sees: ``grid[0] * grid[1]``."""
        return self.grid[0] * self.grid[1]


def preprocess(src: ImageSource, cfg: PreprocessConfig = PreprocessConfig()) -> PreparedImage:
    """Load ``src`` and turn it into model-ready pixels following ``cfg`` (module docstring).

    Returns:
        :class:`PreparedImage` with float32 ``(3, H, W)`` pixels in [-1, 1].

    Raises:
        ImageError: for any unreadable, unsupported or oversized input.
    """
    source = source_name(src)
    image = load_image(src, max_image_pixels=cfg.max_image_pixels, background=cfg.background)
    src_w, src_h = image.size
    resample = _RESAMPLE[cfg.resample]
    if cfg.resize is not None:
        size = cfg.resize.target_size(src_w, src_h)
        content = image if size == (src_w, src_h) else image.resize(size, resample=Image.Resampling.BILINEAR)
    elif cfg.square is not None:
        content = resize_and_center_crop(image, cfg.square, resample)
    else:
        new_w, new_h = target_size(src_w, src_h, cfg)
        # Unchanged size: no resampling at all, so native pixels stay bit-exact.
        content = image if (new_w, new_h) == (src_w, src_h) else image.resize((new_w, new_h), resample=resample)
    pixels = to_pixels(content)
    h, w = int(pixels.shape[1]), int(pixels.shape[2])
    return PreparedImage(
        pixels=pixels,
        source_size=(src_w, src_h),
        content_size=(h, w),
        grid=padded_grid(h, w, cfg.patch_size),
        source=source,
    )
