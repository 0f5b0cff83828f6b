"""Deterministic synthetic multimodal QA data (LLaVA format) for ViQ demos, CI and benchmarks.

The generator draws small images with PIL (no matplotlib: fast and bit-reproducible) and asks
questions whose answers depend on fine detail (small text, small shapes, exact bar values), so a
tokenizer that loses detail measurably hurts answer accuracy.

Tasks
-----
Each task is a function ``task(rng, size, fonts=None) -> (image, qa)`` with ``rng`` a
:class:`random.Random`, ``size = (width, height)`` in pixels, ``image`` an RGB
:class:`PIL.Image.Image` of exactly that size and ``qa`` a non-empty list of
``(question, answer)`` string pairs about that image. ``qa[0]`` is the task's main question; the
rest are other valid questions (used for multi-turn samples). Registry: :data:`TASKS`.

=============  ==================================================  ===============================
task           main question                                       answer
=============  ==================================================  ===============================
``ocr``        What is written in the image?                       the string (3-12 letters/digits)
``count``      How many <shape>s are there?                        ``"0"`` .. ``"9"`` (digits)
``locate``     Where is the <color> <shape>?                       one of :data:`CELL_NAMES`
``color``      What color is the <shape>?                          a :data:`PALETTE` name
``chart``      What is the value of <label>? / Which bar is ...    integer / bar label
``document``   What is the <key>?                                  the field's value
=============  ==================================================  ===============================

Plus the text-only task :data:`TEXT_TASK` (``"arithmetic"``, e.g. "What is 12 + 30?" -> "42"),
about 3 % of every split, so training code also sees samples without an image.

Output layout (:func:`generate`)
--------------------------------
::

    out_dir/
      meta.json                 seed, generator version, fonts, arguments, counts per split/task
      train.jsonl val.jsonl test.jsonl
      images/<split>/<id>.png   RGB PNG at native size (sides in [min_side, max_side], 1:4..4:1)

One JSON object per line (LLaVA conversation format)::

    {"id": "train-000012", "image": "images/train/train-000012.png",
     "conversations": [{"from": "human", "value": "<image>\\nWhat is written in the image?"},
                       {"from": "gpt", "value": "Kx7pQ"}],
     "task": "ocr", "question": "What is written in the image?", "answer": "Kx7pQ"}

* ``image`` is relative to ``out_dir``; text-only samples have no ``image`` key and no
  ``<image>`` token. Image samples have exactly one ``<image>`` token, at the start of the first
  human turn.
* Multi-turn samples (about 10 %) have two human/gpt rounds about the same image.
* ``question``/``answer`` are the *last* round (without ``<image>``): the reference for scoring
  a model's reply to the final turn given the earlier turns. Compare with :func:`score`.

Determinism
-----------
Every sample uses its own ``random.Random`` seeded from a SHA-256 of ``(version, seed, split,
index, attempt)``; the order of tasks within a split comes from a similar per-split RNG. Nothing
depends on the global RNGs, hash randomisation, time or dict ordering, PNGs are written with fixed
zlib parameters and JSON with fixed formatting, so re-running with the same arguments (and the
same Pillow/FreeType/zlib/numpy) reproduces every file byte for byte. Splits never share an image
(nor a text-only question): a sample that collides with an earlier one is redrawn with
``attempt + 1``; splits are generated in the order train, val, test.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import math
import os
import random
import string
import time
import unicodedata
from collections import Counter
from collections.abc import Callable, Sequence
from functools import lru_cache
from pathlib import Path
from statistics import NormalDist
from typing import Any

import numpy as np
import PIL
from PIL import Image, ImageDraw, ImageFont, features

logger = logging.getLogger(__name__)

__all__ = [
    "ALL_TASKS",
    "CELL_NAMES",
    "DEFAULT_FONTS",
    "GENERATOR_VERSION",
    "PALETTE",
    "SHAPES",
    "SPLITS",
    "TASKS",
    "TEXT_TASK",
    "generate",
    "load_split",
    "normalize_answer",
    "resolve_fonts",
    "score",
]

#: Bump whenever the output for given arguments changes (it is also mixed into every seed).
GENERATOR_VERSION = "1.0"
SPLITS = ("train", "val", "test")
ALL_TASKS = ("ocr", "count", "locate", "color", "chart", "document")
#: Name of the text-only task (not in :data:`ALL_TASKS`: it is controlled by ``text_only_fraction``).
TEXT_TASK = "arithmetic"
#: Fixed zlib level so the PNG bytes never depend on Pillow's default. Level 1: the noisy images
#: compress only ~13 % worse than at level 6 but encode ~3x faster (encoding dominates run time).
PNG_COMPRESS_LEVEL = 1

QA = tuple[str, str]
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
def _load_font(font: str, size: int) -> ImageFont.FreeTypeFont | ImageFont.ImageFont:
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
            _load_font(found, 12)
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


def _fonts_or_default(fonts: Sequence[str] | None) -> Sequence[str]:
    return fonts if fonts else _default_fonts()


def _font_label(font: str) -> str:
    """Machine-independent name of a resolved font for ``meta.json`` (the file name)."""
    return font if font == PIL_DEFAULT_FONT else Path(font).name


def _bbox(font: Any, text: str) -> tuple[int, int, int, int]:
    """``(left, top, right, bottom)`` of ``text`` drawn at the origin with anchor "la", in px."""
    l, t, r, b = font.getbbox(text)
    return int(l), int(t), int(r), int(b)


def _text_wh(font: Any, text: str) -> tuple[int, int]:
    l, t, r, b = _bbox(font, text)
    return r - l, b - t


def _draw_text(draw: ImageDraw.ImageDraw, xy: tuple[float, float], text: str, font: Any, fill: RGB) -> None:
    """Draw ``text`` so that its ink bounding box starts exactly at ``xy`` (top-left, px)."""
    l, t, _, _ = _bbox(font, text)
    draw.text((round(xy[0]) - l, round(xy[1]) - t), text, font=font, fill=fill)


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
_NEUTRALS: tuple[RGB, ...] = ((236, 236, 232), (205, 200, 188), (175, 180, 185), (60, 62, 68), (38, 38, 42))


def _luma(c: Sequence[float]) -> float:
    return 0.299 * c[0] + 0.587 * c[1] + 0.114 * c[2]


def _dist(a: Sequence[float], b: Sequence[float]) -> float:
    return math.sqrt(sum((float(x) - float(y)) ** 2 for x, y in zip(a, b)))


def _jitter(rng: random.Random, c: RGB, amount: int) -> RGB:
    return tuple(min(255, max(0, v + rng.randint(-amount, amount))) for v in c)  # type: ignore[return-value]


def _random_rgb(rng: random.Random) -> RGB:
    return (rng.randint(0, 255), rng.randint(0, 255), rng.randint(0, 255))


def _contrasting_rgb(rng: random.Random, bg: RGB, min_luma_diff: float = 90.0) -> RGB:
    """A random colour whose luma differs from ``bg`` by at least ``min_luma_diff`` (0..255)."""
    for _ in range(100):
        c = _random_rgb(rng)
        if abs(_luma(c) - _luma(bg)) >= min_luma_diff:
            return c
    return (0, 0, 0) if _luma(bg) > 127 else (255, 255, 255)


def _colors_far_from(bg: RGB, min_dist: float) -> list[str]:
    return [n for n in COLOR_NAMES if _dist(PALETTE[n], bg) >= min_dist]


def _background(rng: random.Random, size: tuple[int, int], base: RGB, gradient: int = 0) -> Image.Image:
    """``size`` RGB image filled with ``base``, optionally with a linear gradient whose far end
    differs from ``base`` by up to ``gradient`` per channel in a random direction."""
    w, h = size
    if gradient <= 0:
        return Image.new("RGB", size, base)
    other = np.array(_jitter(rng, base, gradient), dtype=np.float32)
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


def _add_noise(img: Image.Image, rng: random.Random, sigma: float) -> Image.Image:
    """Add i.i.d. per-channel Gaussian-like noise (std ~``sigma`` 8-bit levels), seeded by ``rng``."""
    if sigma <= 0:
        return img
    gen = np.random.default_rng(rng.getrandbits(64))
    lut = np.rint(_NORMAL_QUANTILES * np.float32(sigma)).astype(np.int16)
    arr = np.asarray(img, dtype=np.int16)
    arr = arr + lut[gen.integers(0, 256, size=arr.shape, dtype=np.uint8)]
    return Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8), "RGB")


def _draw_shape(
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


def _shape_rotation(rng: random.Random, kind: str) -> float:
    # Squares stay within +-20 deg so they never look like diamonds; triangles turn freely.
    if kind == "square":
        return rng.uniform(-20.0, 20.0)
    if kind == "triangle":
        return rng.uniform(0.0, 360.0)
    return 0.0


def _place(
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


# --------------------------------------------------------------------------------------------
# Task: ocr
# --------------------------------------------------------------------------------------------

#: Random strings avoid glyphs that are ambiguous in small sans fonts (I/l/1, O/0/o).
OCR_ALPHABET = "".join(c for c in string.ascii_letters + string.digits if c not in "Il1O0o")
_WORDS = (
    "apple", "river", "garden", "window", "silver", "planet", "rocket", "marble", "forest",
    "pencil", "harbor", "candle", "violet", "jacket", "bridge", "copper", "meadow", "castle",
    "puzzle", "lantern", "thunder", "compass", "blanket", "falcon", "harvest", "quartz", "zebra",
    "yogurt", "kettle", "waffle", "basket", "tunnel", "museum", "nectar", "orbit", "pixel",
    "vector", "token", "matrix", "sketch", "glacier", "volcano", "saffron", "cobalt", "emerald",
    "ginger", "hammock", "igloo", "jigsaw", "kayak", "lemon", "mosaic", "noodle", "oyster",
    "parrot", "quiver", "radish", "sphinx", "tundra", "umbrella", "walnut", "xylophone", "yonder",
    "zipper", "ember", "fjord", "gravel", "horizon", "inkwell", "juniper", "keystone", "lighthouse",
    "mango", "nebula", "outpost", "pepper", "riddle", "sunset", "trumpet", "velvet", "whisper",
)


def task_ocr(rng: random.Random, size: tuple[int, int], fonts: Sequence[str] | None = None) -> tuple[Image.Image, list[QA]]:
    """Short word or random alphanumeric string (3-12 chars), often in a small 10-14 px font.

    The font shrinks (down to 8 px) and then the string is shortened (down to 3 chars) until the
    text fits inside the image with a 2 px margin, so the answer is always fully visible.
    """
    w, h = size
    font_path = rng.choice(list(_fonts_or_default(fonts)))
    if rng.random() < 0.5:
        text = rng.choice(_WORDS)
        case = rng.random()
        text = text.upper() if case < 0.25 else text.capitalize() if case < 0.5 else text
    else:
        text = "".join(rng.choice(OCR_ALPHABET) for _ in range(rng.randint(3, 12)))
    u = rng.random()
    px = rng.randint(10, 14) if u < 0.5 else rng.randint(15, 28) if u < 0.85 else rng.randint(29, 56)
    px = max(8, min(px, int(h * 0.8)))
    margin = 2
    while True:
        font = _load_font(font_path, px)
        tw, th = _text_wh(font, text)
        if tw <= w - 2 * margin and th <= h - 2 * margin:
            break
        if px > 8:
            px = max(8, int(px * 0.85))
        elif len(text) > 3:
            text = text[:-1]
        else:
            raise ValueError(f"image {w}x{h} too small for OCR text")
    bg = _random_rgb(rng)
    gradient = rng.choice((0, 0, 30, 60))
    # The gradient can move the background towards the text colour: demand extra contrast.
    fg = _contrasting_rgb(rng, bg, 80.0 + gradient)
    img = _background(rng, size, bg, gradient=gradient)
    draw = ImageDraw.Draw(img)
    x = rng.randint(margin, w - margin - tw)
    y = rng.randint(margin, h - margin - th)
    _draw_text(draw, (x, y), text, font, fg)
    img = _add_noise(img, rng, rng.uniform(1.0, 8.0))
    return img, [("What is written in the image?", text), ("How many characters are in the text?", str(len(text)))]


# --------------------------------------------------------------------------------------------
# Task: count
# --------------------------------------------------------------------------------------------


def task_count(rng: random.Random, size: tuple[int, int], fonts: Sequence[str] | None = None) -> tuple[Image.Image, list[QA]]:
    """1-9 shapes of one kind plus (60 % of the time) 1-4 distractors of another kind."""
    w, h = size
    kind, other = rng.sample(SHAPES, 2)
    n = rng.randint(1, 9)
    m = 0 if rng.random() < 0.4 else rng.randint(1, 4)
    bg = _jitter(rng, rng.choice(_NEUTRALS), 12)
    names = _colors_far_from(bg, 110.0)
    same = rng.random() < 0.5
    target_color = rng.choice(names)
    kinds = [kind] * n + [other] * m
    rng.shuffle(kinds)
    img = _background(rng, size, bg, gradient=rng.choice((0, 20)))
    draw = ImageDraw.Draw(img)
    for k, (cx, cy, r) in zip(kinds, _place(rng, w, h, len(kinds))):
        name = target_color if (same and k == kind) else rng.choice(names)
        _draw_shape(draw, k, cx, cy, r, _jitter(rng, PALETTE[name], 12), _shape_rotation(rng, k))
    img = _add_noise(img, rng, rng.uniform(1.0, 5.0))
    return img, [(f"How many {kind}s are there?", str(n)), (f"How many {other}s are there?", str(m))]


# --------------------------------------------------------------------------------------------
# Task: locate
# --------------------------------------------------------------------------------------------


def cell_name(x: float, y: float, w: int, h: int) -> str:
    """Name of the 3x3 grid cell of a ``w x h`` image (px) that contains point ``(x, y)``."""
    col = min(2, max(0, int(3 * x / w)))
    row = min(2, max(0, int(3 * y / h)))
    return CELL_NAMES[row][col]


def task_locate(rng: random.Random, size: tuple[int, int], fonts: Sequence[str] | None = None) -> tuple[Image.Image, list[QA]]:
    """A target ``<color> <shape>`` plus 0-3 distractors, each well inside its own grid cell.

    Centres lie in the middle half of their cell and shapes are smaller than 0.22 of a cell, so
    every shape lies entirely inside one cell and the answer is unambiguous. Distractors differ
    from the target in colour or kind (the ``<color> <shape>`` phrase is unique).
    """
    w, h = size
    bg = _jitter(rng, rng.choice(_NEUTRALS), 12)
    names = _colors_far_from(bg, 110.0)
    cells = rng.sample([(r, c) for r in range(3) for c in range(3)], rng.randint(1, 4))
    target = (rng.choice(names), rng.choice(SHAPES))
    objects = [target]
    while len(objects) < len(cells):
        cand = (rng.choice(names), rng.choice(SHAPES))
        if cand != target:
            objects.append(cand)
    cw, ch = w / 3.0, h / 3.0
    r_hi = max(3.0, 0.22 * min(cw, ch))
    img = _background(rng, size, bg, gradient=rng.choice((0, 20)))
    draw = ImageDraw.Draw(img)
    for (color, kind), (row, col) in zip(objects, cells):
        r = rng.uniform(max(3.0, 0.5 * r_hi), r_hi)
        cx = rng.uniform(col * cw + 0.25 * cw, col * cw + 0.75 * cw)
        cy = rng.uniform(row * ch + 0.25 * ch, row * ch + 0.75 * ch)
        _draw_shape(draw, kind, cx, cy, r, _jitter(rng, PALETTE[color], 12), _shape_rotation(rng, kind))
    img = _add_noise(img, rng, rng.uniform(1.0, 5.0))
    where = CELL_NAMES[cells[0][0]][cells[0][1]]
    extra = [
        (f"What shape is at the {where} of the image?", target[1]),
        (f"What color is the shape at the {where} of the image?", target[0]),
    ]
    rng.shuffle(extra)
    return img, [(f"Where is the {target[0]} {target[1]}?", where), *extra]


# --------------------------------------------------------------------------------------------
# Task: color
# --------------------------------------------------------------------------------------------


def task_color(rng: random.Random, size: tuple[int, int], fonts: Sequence[str] | None = None) -> tuple[Image.Image, list[QA]]:
    """1-3 shapes of distinct kinds and distinct palette colours on a neutral background."""
    w, h = size
    bg = _jitter(rng, rng.choice(_NEUTRALS), 10)
    k = rng.randint(1, 3)
    kinds = rng.sample(SHAPES, k)
    colors = rng.sample(_colors_far_from(bg, 120.0), k)
    img = _background(rng, size, bg, gradient=rng.choice((0, 15)))
    draw = ImageDraw.Draw(img)
    for kind, color, (cx, cy, r) in zip(kinds, colors, _place(rng, w, h, k, r_cap=60.0)):
        _draw_shape(draw, kind, cx, cy, r, _jitter(rng, PALETTE[color], 10), _shape_rotation(rng, kind))
    img = _add_noise(img, rng, rng.uniform(1.0, 4.0))
    qa = [(f"What color is the {kind}?", color) for kind, color in zip(kinds, colors)]
    rng.shuffle(qa)
    if k == 1:
        qa.append(("What shape is in the image?", kinds[0]))
    else:
        i = rng.randrange(k)
        qa.append((f"Which shape is {colors[i]}?", kinds[i]))
    return img, qa


# --------------------------------------------------------------------------------------------
# Task: chart
# --------------------------------------------------------------------------------------------

_CHART_THEMES: tuple[tuple[str, ...], ...] = (
    ("Mon", "Tue", "Wed", "Thu", "Fri", "Sat", "Sun"),
    ("Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec"),
    ("apple", "banana", "cherry", "grape", "lemon", "mango", "peach", "pear", "plum", "kiwi"),
    ("north", "south", "east", "west", "central"),
    ("cats", "dogs", "birds", "fish", "horses", "rabbits"),
    ("alpha", "beta", "gamma", "delta", "omega", "sigma", "theta"),
    ("Paris", "Tokyo", "Lima", "Oslo", "Cairo", "Delhi", "Quito", "Rome"),
)
_LETTER_LABELS = tuple("ABCDEFGH")
_CHART_TITLES = ("Sales", "Visitors", "Revenue", "Scores", "Orders", "Votes", "Rainfall", "Downloads")


def _chart_values(rng: random.Random, n: int, mode: str) -> tuple[list[int], int, int]:
    """Bar values, axis top and tick step (``mode="ticks"``: values on gridlines only).

    The maximum and the minimum are unique and separated from the runner-up by >= 5 % of the
    axis, so "tallest"/"shortest" questions are answerable by eye.
    """
    while True:
        if mode == "ticks":
            step = rng.choice((1, 2, 5, 10, 20, 25, 50, 100))
            nticks = rng.randint(4, 6)
            top = step * nticks
            values = [step * rng.randint(1, nticks) for _ in range(n)]
        else:
            step = 0
            vmax = rng.choice((10, 20, 50, 100, 100, 200, 500, 1000))
            values = [rng.randint(1, vmax) for _ in range(n)]
            top = max(values)
        s = sorted(values)
        if s[-1] - s[-2] >= 0.05 * top and s[1] - s[0] >= 0.05 * top:
            return values, top, step


def task_chart(rng: random.Random, size: tuple[int, int], fonts: Sequence[str] | None = None) -> tuple[Image.Image, list[QA]]:
    """Bar chart (vertical or horizontal) with 3-6 labelled bars and value labels or axis ticks."""
    w, h = size
    fonts = _fonts_or_default(fonts)
    font_path = rng.choice(list(fonts))
    mode = "labels" if rng.random() < 0.6 else "ticks"
    aspect = w / h
    vertical = True if aspect >= 1.3 else False if aspect <= 1 / 1.3 else rng.random() < 0.5
    theme = rng.choice(_CHART_THEMES)
    label_pool = theme if rng.random() < 0.85 else _LETTER_LABELS
    n_want = min(rng.randint(3, 6), len(label_pool))
    px = rng.randint(9, 12)
    title = rng.choice(_CHART_TITLES) if rng.random() < 0.5 else None
    bg = _jitter(rng, (250, 250, 250), 6) if rng.random() < 0.7 else _jitter(rng, (225, 230, 240), 10)
    ink = (30, 30, 30)
    values, top, step = _chart_values(rng, n_want, mode)
    bar_colors = (
        [rng.choice(_colors_far_from(bg, 140.0))] * n_want
        if rng.random() < 0.6
        else [rng.choice(_colors_far_from(bg, 140.0)) for _ in range(n_want)]
    )
    idx = sorted(rng.sample(range(len(label_pool)), min(n_want, len(label_pool))))

    # Layout: try the preferred labels/font, then fewer bars, then letters, then smaller fonts.
    layout = None
    for pool in (label_pool, _LETTER_LABELS):
        for size_px in range(px, 7, -1):
            font = _load_font(font_path, size_px)
            for n in range(n_want, 2, -1):
                labels = [pool[i] for i in (idx if pool is label_pool else range(len(pool)))][:n]
                vals = values[:n]
                s = sorted(vals)
                if s[-1] - s[-2] < 0.05 * top or s[1] - s[0] < 0.05 * top:
                    continue  # truncation broke uniqueness of max/min
                layout = _chart_layout(w, h, font, labels, vals, top, step, mode, vertical, title)
                if layout is not None:
                    break
            if layout is not None:
                break
        if layout is not None:
            break
    if layout is None:
        raise ValueError(f"image {w}x{h} too small for a bar chart")
    font, labels, vals = layout["font"], layout["labels"], layout["values"]
    n = len(labels)
    img = Image.new("RGB", size, bg)
    draw = ImageDraw.Draw(img)
    left, top_y, right, bottom = layout["plot"]
    if title is not None:
        tw, _ = _text_wh(font, title)
        _draw_text(draw, ((w - tw) / 2, 3), title, font, ink)
    plot_len = (bottom - top_y) if vertical else (right - left)
    if mode == "ticks":
        # Every gridline is drawn; labels are thinned (every 2nd, 3rd, ...) until they no longer
        # overlap. Values always sit on a gridline, so they stay exactly readable.
        spacing = plot_len * step / top
        need = (_text_wh(font, "0Ag")[1] + 2) if vertical else (max(_text_wh(font, str(top))[0], 1) + 4)
        every = max(1, math.ceil(need / max(spacing, 1e-6)))
        for k, t in enumerate(range(0, top + 1, step)):
            frac = t / top
            tick = str(t)
            tw, th = _text_wh(font, tick)
            if vertical:
                y = bottom - frac * plot_len
                draw.line((left, y, right, y), fill=(215, 215, 215))
                if k % every == 0:
                    _draw_text(draw, (left - 4 - tw, y - th / 2), tick, font, ink)
            else:
                x = left + frac * plot_len
                draw.line((x, top_y, x, bottom), fill=(215, 215, 215))
                if k % every == 0:
                    _draw_text(draw, (x - tw / 2, bottom + 4), tick, font, ink)
    slot = ((right - left) if vertical else (bottom - top_y)) / n
    thick = slot * rng.uniform(0.5, 0.8)
    for i, (label, v) in enumerate(zip(labels, vals)):
        length = max(1.0, v / top * plot_len)
        c = slot * (i + 0.5) + (left if vertical else top_y)
        color = _jitter(rng, PALETTE[bar_colors[i]], 8)
        lw, lh = _text_wh(font, label)
        vw, vh = _text_wh(font, str(v))
        if vertical:
            draw.rectangle((c - thick / 2, bottom - length, c + thick / 2, bottom), fill=color)
            _draw_text(draw, (c - lw / 2, bottom + 4), label, font, ink)
            if mode == "labels":
                _draw_text(draw, (c - vw / 2, bottom - length - 3 - vh), str(v), font, ink)
        else:
            draw.rectangle((left, c - thick / 2, left + length, c + thick / 2), fill=color)
            _draw_text(draw, (left - 4 - lw, c - lh / 2), label, font, ink)
            if mode == "labels":
                _draw_text(draw, (left + length + 3, c - vh / 2), str(v), font, ink)
    draw.line((left, top_y, left, bottom), fill=ink)
    draw.line((left, bottom, right, bottom), fill=ink)
    img = _add_noise(img, rng, rng.uniform(0.0, 3.0))

    i = rng.randrange(n)
    big, small = ("tallest", "shortest") if vertical else ("longest", "shortest")
    hi = labels[max(range(n), key=lambda j: vals[j])]
    lo = labels[min(range(n), key=lambda j: vals[j])]
    value_q = (f"What is the value of {labels[i]}?", str(vals[i]))
    rest = [(f"Which bar is the {big}?", hi), (f"Which bar is the {small}?", lo)]
    u = rng.random()
    if u < 0.6:
        qa = [value_q, *rest]
    elif u < 0.85:
        qa = [rest[0], value_q, rest[1]]
    else:
        qa = [rest[1], value_q, rest[0]]
    return img, qa


def _chart_layout(
    w: int, h: int, font: Any, labels: list[str], vals: list[int], top: int, step: int,
    mode: str, vertical: bool, title: str | None,
) -> dict[str, Any] | None:
    """Plot rectangle ``(left, top, right, bottom)`` in px if everything fits, else ``None``."""
    fh = _text_wh(font, "0Ag")[1]
    title_h = fh + 5 if title is not None else 0
    if title is not None and _text_wh(font, title)[0] > w - 6:
        return None
    n = len(labels)
    label_w = max(_text_wh(font, s)[0] for s in labels)
    value_w = max(_text_wh(font, str(v))[0] for v in vals)
    tick_w = max(_text_wh(font, str(t))[0] for t in range(0, top + 1, step)) if mode == "ticks" else 0
    if vertical:
        left = 6 + (tick_w + 5 if mode == "ticks" else 0)
        right = w - 6
        top_y = 4 + title_h + (fh + 4 if mode == "labels" else fh // 2 + 1)
        bottom = h - (fh + 7)
        slot = (right - left) / n
        if slot < max(label_w, value_w if mode == "labels" else 0) + 3 or slot < 6:
            return None
    else:
        left = 6 + label_w + 5
        right = w - 6 - (value_w + 4 if mode == "labels" else tick_w // 2 + 1)
        top_y = 4 + title_h
        bottom = h - 6 - (fh + 5 if mode == "ticks" else 0)
        slot = (bottom - top_y) / n
        if slot < fh + 3:
            return None
    if right - left < 30 or bottom - top_y < 30:
        return None
    return {"font": font, "labels": labels, "values": vals, "plot": (left, top_y, right, bottom)}


# --------------------------------------------------------------------------------------------
# Task: document
# --------------------------------------------------------------------------------------------

_FIRST = ("Maria", "James", "Aiko", "Omar", "Lena", "Carlos", "Priya", "Tomas", "Fatima", "Ivan",
          "Grace", "Noah", "Chen", "Sofia", "Kwame", "Elena", "Yusuf", "Hana", "Lucas", "Nadia")
_LAST = ("Garcia", "Smith", "Tanaka", "Haddad", "Novak", "Silva", "Patel", "Berg", "Okafor", "Ivanova",
         "Kim", "Muller", "Rossi", "Dubois", "Mensah", "Larsen", "Cohen", "Sato", "Lopez", "Khan")
_CITIES = ("Lisbon", "Nairobi", "Osaka", "Denver", "Krakow", "Lyon", "Austin", "Porto", "Seoul", "Bergen",
           "Quebec", "Cusco", "Tunis", "Perth", "Hanoi", "Leeds")
_COUNTRIES = ("Portugal", "Kenya", "Japan", "Canada", "Poland", "France", "Peru", "Norway", "Chile", "Ghana",
              "Spain", "India", "Brazil", "Egypt")
_STATUSES = ("Paid", "Pending", "Shipped", "Cancelled", "Approved", "On hold", "Delivered")
_DEPARTMENTS = ("Sales", "Finance", "Research", "Support", "Logistics", "Legal", "Marketing")
_MONTHS = ("Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec")
_UPPER_DIGITS = "".join(c for c in string.ascii_uppercase + string.digits if c not in "IO01")


def _date(r: random.Random) -> str:
    y, m, d = r.randint(1998, 2029), r.randint(1, 12), r.randint(1, 28)
    return f"{y}-{m:02d}-{d:02d}" if r.random() < 0.5 else f"{d} {_MONTHS[m - 1]} {y}"


def _code(r: random.Random, lo: int = 5, hi: int = 8) -> str:
    return "".join(r.choice(_UPPER_DIGITS) for _ in range(r.randint(lo, hi)))


#: (key, value generator). Questions are "What is the <key lower-cased>?".
_DOC_FIELDS: tuple[tuple[str, Callable[[random.Random], str]], ...] = (
    ("Name", lambda r: f"{r.choice(_FIRST)} {r.choice(_LAST)}"),
    ("Date", _date),
    ("Due date", _date),
    ("Invoice number", lambda r: f"INV-{r.randint(10000, 99999)}"),
    ("Order ID", _code),
    ("Total", lambda r: f"${r.randint(1, 9999)}.{r.randint(0, 99):02d}"),
    ("City", lambda r: r.choice(_CITIES)),
    ("Country", lambda r: r.choice(_COUNTRIES)),
    ("Phone", lambda r: f"{r.randint(200, 999)}-{r.randint(200, 999)}-{r.randint(1000, 9999)}"),
    ("Account", lambda r: str(r.randint(10_000_000, 99_999_999))),
    ("Reference", lambda r: f"REF{r.randint(100, 999)}{r.choice(string.ascii_uppercase)}"),
    ("Quantity", lambda r: str(r.randint(1, 500))),
    ("Status", lambda r: r.choice(_STATUSES)),
    ("Department", lambda r: r.choice(_DEPARTMENTS)),
    ("Code", lambda r: _code(r, 4, 6)),
    ("Weight", lambda r: f"{r.randint(1, 99)} kg"),
    ("Email", lambda r: f"{r.choice(_FIRST).lower()}.{r.choice(_LAST).lower()}@example.com"),
)
_DOC_TITLES = ("INVOICE", "RECEIPT", "PACKING SLIP", "ORDER FORM", "STATEMENT", "SHIPPING LABEL",
               "REGISTRATION", "DELIVERY NOTE")


def task_document(rng: random.Random, size: tuple[int, int], fonts: Sequence[str] | None = None) -> tuple[Image.Image, list[QA]]:
    """Off-white page with an optional title and up to 10 lines of ``Key: Value`` in 9-13 px text.

    Only fields that fit on the page are drawn (and asked about); keys are unique per page.
    """
    w, h = size
    fonts = _fonts_or_default(fonts)
    font_path = rng.choice(list(fonts))
    px = rng.randint(9, 13)
    font = _load_font(font_path, px)
    ink = _jitter(rng, (25, 25, 35), 15)
    img = Image.new("RGB", size, _jitter(rng, (250, 249, 244), 5))
    draw = ImageDraw.Draw(img)
    x0 = rng.randint(4, max(4, w // 12))
    y = rng.randint(3, max(3, h // 20))
    title = None
    if rng.random() < 0.7:
        tfont = _load_font(rng.choice(list(fonts)), px + rng.randint(3, 8))
        cand = rng.choice(_DOC_TITLES)
        tw, th = _text_wh(tfont, cand)
        if tw <= w - x0 - 3 and y + th + 6 < h:
            title = cand
            tx = x0 if rng.random() < 0.5 else (w - tw) // 2
            _draw_text(draw, (tx, y), title, tfont, ink)
            y += th + 4
            draw.line((x0, y, w - x0, y), fill=(150, 150, 150))
            y += 5
    fh = _text_wh(font, "0Ag")[1]
    line_h = fh + rng.randint(3, 7)
    aligned = rng.random() < 0.4  # values in a column instead of right after "Key: "
    fields = list(_DOC_FIELDS)
    rng.shuffle(fields)
    want = rng.randint(3, 10)
    chosen: list[tuple[str, str]] = []
    for key, make in fields:
        if len(chosen) >= want or y + len(chosen) * line_h + fh > h - 3:
            break
        value = make(rng)
        chosen_line = f"{key}: {value}"
        if _text_wh(font, chosen_line)[0] > w - x0 - 3:
            continue
        chosen.append((key, value))
    key_w = max((_text_wh(font, f"{k}:")[0] for k, _ in chosen), default=0)
    for key, value in chosen:
        value_x = x0 + key_w + 8
        if aligned and value_x + _text_wh(font, value)[0] <= w - 3:
            _draw_text(draw, (x0, y), f"{key}:", font, ink)
            # Align on the ink box top of the key line so both parts share a baseline band.
            draw.text((value_x - _bbox(font, value)[0], y - _bbox(font, f"{key}:")[1]), value, font=font, fill=ink)
        else:
            _draw_text(draw, (x0, y), f"{key}: {value}", font, ink)
        y += line_h
    if y + fh + 4 < h and rng.random() < 0.5:
        footer = f"Page 1 of {rng.randint(1, 3)}"
        if _text_wh(font, footer)[0] <= w - x0 - 3:
            _draw_text(draw, (x0, h - fh - 4), footer, font, (120, 120, 120))
    img = _add_noise(img, rng, rng.uniform(0.0, 4.0))
    qa = [(f"What is the {key.lower()}?", value) for key, value in chosen]
    rng.shuffle(qa)
    if title is not None:
        qa.append(("What is the title of the document?", title))
    if not qa:
        raise ValueError(f"image {w}x{h} too small for a document")
    return img, qa


# --------------------------------------------------------------------------------------------
# Text-only task
# --------------------------------------------------------------------------------------------


def task_arithmetic(rng: random.Random) -> QA:
    """Text-only question: addition/subtraction of numbers < 1000 or a small product."""
    op = rng.choice("+-*")
    if op == "+":
        a, b = rng.randint(0, 999), rng.randint(0, 999)
        return f"What is {a} + {b}?", str(a + b)
    if op == "-":
        a, b = sorted((rng.randint(0, 999), rng.randint(0, 999)), reverse=True)
        return f"What is {a} - {b}?", str(a - b)
    a, b = rng.randint(2, 99), rng.randint(2, 12)
    return f"What is {a} * {b}?", str(a * b)


TaskFn = Callable[..., tuple[Image.Image, list[QA]]]
#: Image task registry: name -> ``fn(rng, size, fonts=None) -> (image, [(question, answer), ...])``.
TASKS: dict[str, TaskFn] = {
    "ocr": task_ocr,
    "count": task_count,
    "locate": task_locate,
    "color": task_color,
    "chart": task_chart,
    "document": task_document,
}
#: Smallest side (px) a task is given (capped at ``max_side``); charts/documents need room.
TASK_MIN_SIDE = {"ocr": 32, "count": 64, "locate": 64, "color": 32, "chart": 112, "document": 112}


# --------------------------------------------------------------------------------------------
# Scoring
# --------------------------------------------------------------------------------------------


def normalize_answer(text: str) -> str:
    """NFKC, case-folded, with everything but letters and digits (spaces, punctuation) removed."""
    return "".join(ch for ch in unicodedata.normalize("NFKC", text).casefold() if ch.isalnum())


def score(prediction: str, answer: str) -> bool:
    """Exact match after :func:`normalize_answer` (case/whitespace/punctuation-insensitive).

    ``"Top-Left."`` matches ``"top left"``; ``"3"`` does not match ``"three"``. Since separators
    are dropped, ``"$12.50"`` also matches ``"1250"`` (harmless for this dataset's answers).
    """
    return normalize_answer(prediction) == normalize_answer(answer)


# --------------------------------------------------------------------------------------------
# Generation
# --------------------------------------------------------------------------------------------


def _derive_seed(*parts: object) -> int:
    """64-bit seed from a SHA-256 of the parts (stable across processes, unlike ``hash``)."""
    text = "/".join(str(p) for p in ("viq-synthetic", GENERATOR_VERSION, *parts))
    return int.from_bytes(hashlib.sha256(text.encode("utf-8")).digest()[:8], "little")


def _sample_size(rng: random.Random, min_side: int, max_side: int, floor: int = 0) -> tuple[int, int]:
    """Random ``(width, height)`` with both sides in ``[max(min_side, floor), max_side]`` (floor
    capped at ``max_side``): long side uniform, aspect ratio log-uniform up to 4:1, random
    orientation."""
    lo = min(max(min_side, floor), max_side)
    long_side = rng.randint(lo, max_side)
    max_aspect = min(4.0, long_side / lo)
    aspect = math.exp(rng.uniform(0.0, math.log(max_aspect))) if max_aspect > 1.0 else 1.0
    short_side = min(long_side, max(lo, round(long_side / aspect)))
    return (long_side, short_side) if rng.random() < 0.5 else (short_side, long_side)


def _schedule(n: int, seed: int, split: str, tasks: Sequence[str], text_fraction: float) -> list[str]:
    """Task of every index of a split: ``round(n * text_fraction)`` text-only samples at random
    positions, image tasks balanced (counts differ by at most one) in shuffled order."""
    rng = random.Random(_derive_seed(seed, split, "schedule"))
    n_text = min(n, math.floor(n * text_fraction + 0.5))
    plan = [tasks[j % len(tasks)] for j in range(n - n_text)] + [TEXT_TASK] * n_text
    rng.shuffle(plan)
    return plan


def _png_bytes(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG", compress_level=PNG_COMPRESS_LEVEL, optimize=False)
    return buf.getvalue()


def _atomic_write(path: Path, data: bytes) -> None:
    """Write ``data`` to a temporary sibling and ``os.replace`` it onto ``path``."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _conversation(turns: Sequence[QA], with_image: bool) -> list[dict[str, str]]:
    conv: list[dict[str, str]] = []
    for t, (q, a) in enumerate(turns):
        conv.append({"from": "human", "value": f"<image>\n{q}" if with_image and t == 0 else q})
        conv.append({"from": "gpt", "value": a})
    return conv


def _make_sample(
    split: str, index: int, task: str, seed: int, attempt: int, *, min_side: int, max_side: int,
    fonts: Sequence[str], multi_turn_fraction: float,
) -> tuple[dict[str, Any], Image.Image | None, str]:
    """One record (+ image) and its uniqueness key, from the RNG of ``(seed, split, index, attempt)``."""
    rng = random.Random(_derive_seed(seed, split, index, attempt))
    sample_id = f"{split}-{index:06d}"
    if task == TEXT_TASK:
        q, a = task_arithmetic(rng)
        record = {"id": sample_id, "conversations": _conversation([(q, a)], False), "task": task, "question": q, "answer": a}
        return record, None, "text:" + q
    size = _sample_size(rng, min_side, max_side, TASK_MIN_SIDE.get(task, 0))
    img, qa = TASKS[task](rng, size, fonts=fonts)
    if img.size != size or img.mode != "RGB" or not qa:
        raise AssertionError(f"task {task} returned {img.mode} {img.size} with {len(qa)} QA for size {size}")
    turns = qa[:2] if (len(qa) >= 2 and rng.random() < multi_turn_fraction) else qa[:1]
    record = {
        "id": sample_id,
        "image": f"images/{split}/{sample_id}.png",
        "conversations": _conversation(turns, True),
        "task": task,
        "question": turns[-1][0],
        "answer": turns[-1][1],
    }
    key = "image:" + hashlib.sha256(f"{size}".encode() + img.tobytes()).hexdigest()
    return record, img, key


def generate(
    out_dir: str | os.PathLike[str],
    *,
    num_train: int = 2000,
    num_val: int = 200,
    num_test: int = 200,
    seed: int = 0,
    tasks: Sequence[str] = ALL_TASKS,
    min_side: int = 64,
    max_side: int = 384,
    fonts: Sequence[str | os.PathLike[str]] | None = None,
    overwrite: bool = False,
    text_only_fraction: float = 0.03,
    multi_turn_fraction: float = 0.1,
) -> dict[str, Any]:
    """Write the synthetic dataset to ``out_dir`` (layout in the module docstring); return its meta.

    Args:
        out_dir: output directory; created if missing. Must be empty unless ``overwrite``.
        num_train, num_val, num_test: samples per split (text-only samples included).
        seed: dataset seed (any int); every sample is derived from ``(seed, split, index)``.
        tasks: image tasks to use (subset of :data:`ALL_TASKS`; stored in canonical order).
        min_side, max_side: bounds in px for both image sides (``32 <= min_side <= max_side``);
            chart/document/count/locate images use a larger lower bound (:data:`TASK_MIN_SIDE`)
            when ``max_side`` allows. Aspect ratios are at most 4:1.
        fonts: font files or names (see :func:`resolve_fonts`); ``None`` = DejaVu defaults.
        overwrite: allow a non-empty ``out_dir``; files this function writes are replaced and
            stale ``images/<split>/*.png`` not referenced any more are removed. Nothing else is.
        text_only_fraction: share of text-only (arithmetic) samples per split (rounded).
        multi_turn_fraction: probability that an image sample gets two QA rounds.

    Returns:
        The dict also written to ``meta.json``.

    Raises:
        FileExistsError: ``out_dir`` is non-empty and ``overwrite`` is false.
        ValueError: invalid arguments or fonts.
    """
    counts = {"train": num_train, "val": num_val, "test": num_test}
    for split, n in counts.items():
        if not isinstance(n, int) or n < 0:
            raise ValueError(f"num_{split} must be a non-negative int, got {n!r}")
    if isinstance(tasks, str):
        tasks = [tasks]
    unknown = sorted(set(tasks) - set(ALL_TASKS))
    if unknown or not tasks:
        raise ValueError(f"tasks must be a non-empty subset of {ALL_TASKS}, got {list(tasks)}")
    task_list = tuple(t for t in ALL_TASKS if t in set(tasks))
    if not (32 <= min_side <= max_side):
        raise ValueError(f"need 32 <= min_side <= max_side, got min_side={min_side}, max_side={max_side}")
    for name, frac in (("text_only_fraction", text_only_fraction), ("multi_turn_fraction", multi_turn_fraction)):
        if not 0.0 <= frac <= 1.0:
            raise ValueError(f"{name} must be in [0, 1], got {frac}")
    too_small = [t for t in task_list if max_side < TASK_MIN_SIDE[t]]
    if too_small:
        raise ValueError(
            f"max_side={max_side} is too small for tasks {too_small} (need {[TASK_MIN_SIDE[t] for t in too_small]})"
        )
    font_paths = resolve_fonts(fonts)

    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise NotADirectoryError(f"{out} exists and is not a directory")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise FileExistsError(f"{out} is not empty (pass overwrite=True to replace the dataset)")
    out.mkdir(parents=True, exist_ok=True)

    t0 = time.perf_counter()
    seen: set[str] = set()
    split_meta: dict[str, Any] = {}
    for split in SPLITS:
        n = counts[split]
        img_dir = out / "images" / split
        img_dir.mkdir(parents=True, exist_ok=True)
        lines: list[str] = []
        written: set[str] = set()
        task_counts: Counter[str] = Counter()
        multi = 0
        for index, task in enumerate(_schedule(n, seed, split, task_list, text_only_fraction)):
            for attempt in range(1000):
                record, img, key = _make_sample(
                    split, index, task, seed, attempt, min_side=min_side, max_side=max_side,
                    fonts=font_paths, multi_turn_fraction=multi_turn_fraction,
                )
                if key not in seen:
                    break
            else:  # pragma: no cover - would need ~1000 consecutive collisions
                raise RuntimeError(f"cannot draw a unique sample for {split}[{index}] ({task})")
            seen.add(key)
            if img is not None:
                name = Path(record["image"]).name
                _atomic_write(img_dir / name, _png_bytes(img))
                written.add(name)
            multi += len(record["conversations"]) > 2
            task_counts[task] += 1
            lines.append(json.dumps(record, ensure_ascii=False, sort_keys=False) + "\n")
        _atomic_write(out / f"{split}.jsonl", "".join(lines).encode("utf-8"))
        if overwrite:
            for stale in sorted(img_dir.glob("*.png")):
                if stale.name not in written:
                    stale.unlink()
        split_meta[split] = {
            "num_samples": n,
            "num_images": len(written),
            "text_only": task_counts[TEXT_TASK],
            "multi_turn": multi,
            "tasks": {t: task_counts[t] for t in (*task_list, TEXT_TASK)},
        }
        logger.info("synthetic %s: %d samples (%d images) in %s", split, n, len(written), img_dir)

    meta: dict[str, Any] = {
        "generator": "viq.demo.synthetic",
        "version": GENERATOR_VERSION,
        "seed": seed,
        "tasks": list(task_list),
        "text_task": TEXT_TASK,
        "fonts": [_font_label(f) for f in font_paths],
        "splits": split_meta,
        "args": {
            "num_train": num_train,
            "num_val": num_val,
            "num_test": num_test,
            "seed": seed,
            "tasks": list(task_list),
            "min_side": min_side,
            "max_side": max_side,
            "fonts": None if fonts is None else [_font_label(f) for f in font_paths],
            "text_only_fraction": text_only_fraction,
            "multi_turn_fraction": multi_turn_fraction,
        },
        # Rendering/noise/PNG bytes depend on these; recorded so differences can be explained.
        "environment": {
            "pillow": PIL.__version__,
            "freetype": features.version("freetype2"),
            "zlib": features.version("zlib"),
            "numpy": np.__version__,
        },
    }
    _atomic_write(out / "meta.json", (json.dumps(meta, indent=2, sort_keys=True) + "\n").encode("utf-8"))
    logger.info("synthetic dataset written to %s in %.1f s", out, time.perf_counter() - t0)
    return meta


def load_split(out_dir: str | os.PathLike[str], split: str) -> list[dict[str, Any]]:
    """Records of ``out_dir/<split>.jsonl`` in file order (``image`` paths relative to ``out_dir``).

    Raises:
        FileNotFoundError: the split file does not exist.
    """
    path = Path(out_dir) / f"{split}.jsonl"
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]
