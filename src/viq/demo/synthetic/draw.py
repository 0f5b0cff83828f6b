"""Drawing helpers for the synthetic tasks: fonts, text placement, colours, backgrounds, noise, shapes.

Everything draws with PIL and numpy from an explicit :class:`random.Random`, never a global RNG, so
an image depends only on the RNG it is given (plus the Pillow/FreeType/numpy versions). Sizes and
coordinates are in pixels, colours are sRGB ``(r, g, b)`` tuples of 0..255.
"""

from __future__ import annotations

import logging
import math
import os
import random
from collections.abc import Sequence
from functools import lru_cache
from pathlib import Path
from statistics import NormalDist
from typing import Any

import numpy as np
from PIL import Image, ImageDraw, ImageFont

logger = logging.getLogger(__name__)

RGB = tuple[int, int, int]

# --------------------------------------------------------------------------------------------
# Fonts
# --------------------------------------------------------------------------------------------

FONT_DIRS = (Path("/usr/share/fonts"), Path("/usr/local/share/fonts"))
#: Default font files (DejaVu, shipped by fonts-dejavu-core/-extra); the ones found are used.
DEFAULT_FONTS = (
    "DejaVuSans.ttf",
    "DejaVuSans-Bold.ttf",
    "DejaVuSans-Oblique.ttf",
    "DejaVuSansCondensed.ttf",
    "DejaVuSerif.ttf",
    "DejaVuSerif-Bold.ttf",
    "DejaVuSerif-Italic.ttf",
    "DejaVuSansMono.ttf",
    "DejaVuSansMono-Bold.ttf",
)
#: Stand-in for Pillow's built-in font, used only when no font file can be found.
PIL_DEFAULT_FONT = "<pillow-default>"
_FONT_SUFFIXES = (".ttf", ".otf", ".ttc")


@lru_cache(maxsize=1)
def _font_index() -> dict[str, str]:
    """File name -> path of every font file under :data:`FONT_DIRS` (first in sorted order)."""
    index: dict[str, str] = {}
    for root in FONT_DIRS:
        if not root.is_dir():
            continue
        for path in sorted(root.rglob("*")):
            if path.suffix.lower() in _FONT_SUFFIXES and path.name not in index:
                index[path.name] = str(path)
    return index


@lru_cache(maxsize=1024)
def load_font(font: str, size: int) -> ImageFont.FreeTypeFont | ImageFont.ImageFont:
    """Cached font object: ``font`` is a file path or :data:`PIL_DEFAULT_FONT`; ``size`` in px."""
    if font == PIL_DEFAULT_FONT:
        return ImageFont.load_default(size)
    return ImageFont.truetype(font, size)


def resolve_fonts(fonts: Sequence[str | os.PathLike[str]] | None = None) -> tuple[str, ...]:
    """Resolve font names/paths to loadable font file paths, in the given order.

    ``fonts=None`` means :data:`DEFAULT_FONTS`: missing ones are skipped, and if none is found
    Pillow's built-in font is used (with a warning) so that generation still works anywhere.
    Explicit entries are paths or bare file names searched under :data:`FONT_DIRS`; an explicit
    entry that cannot be found or loaded raises :class:`ValueError`.
    """
    explicit = fonts is not None
    names = list(fonts) if fonts is not None else list(DEFAULT_FONTS)
    out: list[str] = []
    for name in names:
        path = Path(name)
        found = str(path) if path.is_file() else _font_index().get(path.name)
        if found is None:
            if explicit:
                raise ValueError(f"font not found: {name!s} (searched {[str(d) for d in FONT_DIRS]})")
            continue
        try:
            load_font(found, 12)
        except OSError as e:
            if explicit:
                raise ValueError(f"font cannot be loaded: {found}: {e}") from e
            logger.warning("skipping unloadable font %s: %s", found, e)
            continue
        if found not in out:
            out.append(found)
    if not out:
        if explicit:
            raise ValueError("fonts is empty")
        logger.warning("no DejaVu fonts found under %s; using Pillow's built-in font", FONT_DIRS)
        out.append(PIL_DEFAULT_FONT)
    return tuple(out)


@lru_cache(maxsize=1)
def _default_fonts() -> tuple[str, ...]:
    return resolve_fonts(None)


def fonts_or_default(fonts: Sequence[str] | None) -> Sequence[str]:
    """``fonts``, or the fonts this machine has (:func:`resolve_fonts`) when none are given."""
    return fonts if fonts else _default_fonts()


def font_label(font: str) -> str:
    """Machine-independent name of a resolved font for ``meta.json`` (the file name)."""
    return font if font == PIL_DEFAULT_FONT else Path(font).name


def bbox(font: Any, text: str) -> tuple[int, int, int, int]:
    """``(left, top, right, bottom)`` of ``text`` drawn at the origin with anchor "la", in px."""
    left, top, right, bottom = font.getbbox(text)
    return int(left), int(top), int(right), int(bottom)


def text_wh(font: Any, text: str) -> tuple[int, int]:
    """Ink width and height of ``text`` in ``font``, px."""
    left, top, right, bottom = bbox(font, text)
    return right - left, bottom - top


def draw_text(draw: ImageDraw.ImageDraw, xy: tuple[float, float], text: str, font: Any, fill: RGB) -> None:
    """Draw ``text`` so that its ink bounding box starts exactly at ``xy`` (top-left, px)."""
    left, top, _, _ = bbox(font, text)
    draw.text((round(xy[0]) - left, round(xy[1]) - top), text, font=font, fill=fill)


# --------------------------------------------------------------------------------------------
# Colours, backgrounds, noise, shapes
# --------------------------------------------------------------------------------------------

#: Clearly distinct named colours (sRGB); shapes are drawn with small jitter around these.
PALETTE: dict[str, RGB] = {
    "red": (215, 35, 35),
    "orange": (245, 135, 20),
    "yellow": (240, 215, 25),
    "green": (35, 160, 55),
    "blue": (35, 75, 215),
    "purple": (125, 45, 175),
    "pink": (245, 125, 195),
    "brown": (120, 70, 30),
    "cyan": (25, 200, 220),
    "black": (15, 15, 15),
    "white": (245, 245, 245),
    "gray": (128, 128, 128),
}
COLOR_NAMES = tuple(PALETTE)
SHAPES = ("circle", "square", "triangle")
#: 3x3 grid cell names, row-major (row 0 = top).
CELL_NAMES = (
    ("top left", "top", "top right"),
    ("left", "center", "right"),
    ("bottom left", "bottom", "bottom right"),
)
#: Neutral backgrounds for the colour-sensitive tasks (far from most palette colours).
NEUTRALS: tuple[RGB, ...] = ((236, 236, 232), (205, 200, 188), (175, 180, 185), (60, 62, 68), (38, 38, 42))


def _luma(c: Sequence[float]) -> float:
    return 0.299 * c[0] + 0.587 * c[1] + 0.114 * c[2]


def _dist(a: Sequence[float], b: Sequence[float]) -> float:
    return math.sqrt(sum((float(x) - float(y)) ** 2 for x, y in zip(a, b)))


def jitter(rng: random.Random, c: RGB, amount: int) -> RGB:
    """``c`` with each channel moved by up to ``amount`` levels either way (clamped to 0..255)."""
    return tuple(min(255, max(0, v + rng.randint(-amount, amount))) for v in c)  # type: ignore[return-value]


def random_rgb(rng: random.Random) -> RGB:
    """A uniformly random 8-bit RGB colour."""
    return (rng.randint(0, 255), rng.randint(0, 255), rng.randint(0, 255))


def contrasting_rgb(rng: random.Random, bg: RGB, min_luma_diff: float = 90.0) -> RGB:
    """A random colour whose luma differs from ``bg`` by at least ``min_luma_diff`` (0..255)."""
    for _ in range(100):
        c = random_rgb(rng)
        if abs(_luma(c) - _luma(bg)) >= min_luma_diff:
            return c
    return (0, 0, 0) if _luma(bg) > 127 else (255, 255, 255)


def colors_far_from(bg: RGB, min_dist: float) -> list[str]:
    """Palette names whose colour is at least ``min_dist`` (Euclidean, 8-bit RGB) from ``bg``."""
    return [n for n in COLOR_NAMES if _dist(PALETTE[n], bg) >= min_dist]


def background(rng: random.Random, size: tuple[int, int], base: RGB, gradient: int = 0) -> Image.Image:
    """``size`` RGB image filled with ``base``, optionally with a linear gradient whose far end
    differs from ``base`` by up to ``gradient`` per channel in a random direction."""
    w, h = size
    if gradient <= 0:
        return Image.new("RGB", size, base)
    other = np.array(jitter(rng, base, gradient), dtype=np.float32)
    angle = rng.uniform(0.0, 2.0 * math.pi)
    x = np.linspace(0.0, 1.0, w, dtype=np.float32) * math.cos(angle)
    y = np.linspace(0.0, 1.0, h, dtype=np.float32) * math.sin(angle)
    t = y[:, None] + x[None, :]
    t = (t - t.min()) / max(float(t.max() - t.min()), 1e-6)
    arr = np.array(base, dtype=np.float32) * (1.0 - t[..., None]) + other * t[..., None]
    return Image.fromarray(np.clip(np.rint(arr), 0, 255).astype(np.uint8), "RGB")


#: Standard normal quantiles at the 256 mid-points ``(i + 0.5) / 256``: indexing this table with
#: uniform random bytes gives (discretised) Gaussian noise several times faster than
#: ``Generator.standard_normal`` plus float rounding.
_NORMAL_QUANTILES = np.array([NormalDist().inv_cdf((i + 0.5) / 256) for i in range(256)], dtype=np.float32)


def add_noise(img: Image.Image, rng: random.Random, sigma: float) -> Image.Image:
    """Add i.i.d. per-channel Gaussian-like noise (std ~``sigma`` 8-bit levels), seeded by ``rng``."""
    if sigma <= 0:
        return img
    gen = np.random.default_rng(rng.getrandbits(64))
    lut = np.rint(_NORMAL_QUANTILES * np.float32(sigma)).astype(np.int16)
    arr = np.asarray(img, dtype=np.int16)
    arr = arr + lut[gen.integers(0, 256, size=arr.shape, dtype=np.uint8)]
    return Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8), "RGB")


def draw_shape(
    draw: ImageDraw.ImageDraw, kind: str, cx: float, cy: float, r: float, fill: RGB, rotation: float = 0.0
) -> None:
    """Draw a filled ``kind`` inscribed in the circle of radius ``r`` px centred at ``(cx, cy)``."""
    if kind == "circle":
        draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=fill)
    elif kind == "square":
        draw.regular_polygon((cx, cy, r), 4, rotation=rotation, fill=fill)
    elif kind == "triangle":
        draw.regular_polygon((cx, cy, r), 3, rotation=rotation, fill=fill)
    else:
        raise ValueError(f"unknown shape {kind!r}")


def shape_rotation(rng: random.Random, kind: str) -> float:
    """A random rotation in degrees for a ``kind`` shape (0 for circles)."""
    # Squares stay within +-20 deg so they never look like diamonds; triangles turn freely.
    if kind == "square":
        return rng.uniform(-20.0, 20.0)
    if kind == "triangle":
        return rng.uniform(0.0, 360.0)
    return 0.0


def place(
    rng: random.Random, w: int, h: int, k: int, *, r_cap: float = 40.0, gap: float = 3.0
) -> list[tuple[float, float, float]]:
    """``k`` non-overlapping discs ``(cx, cy, r)`` (px) fully inside a ``w x h`` image.

    Radii start at about the size where the discs cover ~30 % of the image and shrink until
    rejection sampling succeeds (down to 3 px, which always fits for k <= 16 in 32x32).
    """
    r_hi = min(r_cap, min(w, h) / 4.0, math.sqrt(0.3 * w * h / max(k, 1)) / 2.0)
    for _ in range(30):
        r_hi = max(3.0, r_hi)
        r_lo = max(3.0, 0.55 * r_hi)
        placed: list[tuple[float, float, float]] = []
        for _ in range(k):
            for _ in range(150):
                r = rng.uniform(r_lo, r_hi)
                cx = rng.uniform(r + 1.0, w - r - 1.0)
                cy = rng.uniform(r + 1.0, h - r - 1.0)
                if all((cx - x) ** 2 + (cy - y) ** 2 >= (r + rr + gap) ** 2 for x, y, rr in placed):
                    placed.append((cx, cy, r))
                    break
            else:
                break
        if len(placed) == k:
            return placed
        r_hi *= 0.8
    raise RuntimeError(f"cannot place {k} shapes in {w}x{h}")
