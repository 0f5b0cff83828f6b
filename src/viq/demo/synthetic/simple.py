"""The simple synthetic tasks: one or a few big objects, one fixed question, one-word answers.

They are what a tiny model learns to read from an image first (colour, shape, position, a count, a
big digit), so the CPU demo can show within minutes whether a tokenizer carries the image to the LLM.
Table of questions and answers: :mod:`viq.demo.synthetic.tasks`.
"""

from __future__ import annotations

import random
from collections.abc import Sequence

from PIL import Image, ImageDraw

from viq.demo.synthetic.draw import (
    NEUTRALS,
    PALETTE,
    SHAPES,
    add_noise,
    background,
    colors_far_from,
    contrasting_rgb,
    draw_shape,
    draw_text,
    fonts_or_default,
    jitter,
    load_font,
    place,
    shape_rotation,
    text_wh,
)

QA = tuple[str, str]

#: Easy image tasks (one or a few big objects, one fixed question, one-word answers).
SIMPLE_TASKS = ("shape_color", "shape", "where", "count_big", "digit")

#: The 8 colours of ``shape_color``: far apart, none close to the neutral backgrounds.
SIMPLE_COLORS = ("red", "orange", "yellow", "green", "blue", "purple", "pink", "cyan")
#: Answers of ``where``: the shape sits in the middle of that edge's band.
EDGE_NAMES = ("left", "right", "top", "bottom")
#: Answers of ``digit``.
DIGITS = "0123456789"
#: The one question of each simple task.
SIMPLE_QUESTIONS = {
    "shape_color": "What color is the shape?",
    "shape": "What shape is this?",
    "where": "Where is the shape?",
    "count_big": "How many shapes are there?",
    "digit": "What digit is shown?",
}
#: The possible answers of each simple task.
SIMPLE_ANSWERS: dict[str, tuple[str, ...]] = {
    "shape_color": SIMPLE_COLORS,
    "shape": SHAPES,
    "where": EDGE_NAMES,
    "count_big": ("1", "2", "3", "4"),
    "digit": tuple(DIGITS),
}


def _neutral_background(rng: random.Random, size: tuple[int, int]) -> tuple[Image.Image, tuple[int, int, int]]:
    bg = jitter(rng, rng.choice(NEUTRALS), 10)
    return background(rng, size, bg, gradient=rng.choice((0, 15))), bg


def _one_big_shape(
    rng: random.Random,
    size: tuple[int, int],
    kind: str,
    rgb: tuple[int, int, int],
    img: Image.Image,
    lo: float,
    hi: float,
) -> Image.Image:
    w, h = size
    r = rng.uniform(lo, hi) * min(w, h)
    cx, cy = rng.uniform(r + 1, w - r - 1), rng.uniform(r + 1, h - r - 1)
    draw_shape(ImageDraw.Draw(img), kind, cx, cy, r, jitter(rng, rgb, 10), shape_rotation(rng, kind))
    return add_noise(img, rng, rng.uniform(1.0, 4.0))


def task_shape_color(
    rng: random.Random, size: tuple[int, int], fonts: Sequence[str] | None = None
) -> tuple[Image.Image, list[QA]]:
    """One big shape in one of :data:`SIMPLE_COLORS`, anywhere it fits."""
    img, _ = _neutral_background(rng, size)
    kind, color = rng.choice(SHAPES), rng.choice(SIMPLE_COLORS)
    img = _one_big_shape(rng, size, kind, PALETTE[color], img, 0.28, 0.42)
    return img, [(SIMPLE_QUESTIONS["shape_color"], color)]


def task_shape(
    rng: random.Random, size: tuple[int, int], fonts: Sequence[str] | None = None
) -> tuple[Image.Image, list[QA]]:
    """One big circle, square or triangle in a palette colour far from the background."""
    img, bg = _neutral_background(rng, size)
    kind, color = rng.choice(SHAPES), rng.choice(colors_far_from(bg, 120.0))
    img = _one_big_shape(rng, size, kind, PALETTE[color], img, 0.32, 0.45)
    return img, [(SIMPLE_QUESTIONS["shape"], kind)]


def task_where(
    rng: random.Random, size: tuple[int, int], fonts: Sequence[str] | None = None
) -> tuple[Image.Image, list[QA]]:
    """One shape centred in the outer band (28 %) of one edge, along the middle of that edge."""
    w, h = size
    img, bg = _neutral_background(rng, size)
    kind, color = rng.choice(SHAPES), rng.choice(colors_far_from(bg, 120.0))
    where = rng.choice(EDGE_NAMES)
    r = rng.uniform(0.12, 0.18) * min(w, h)
    along = rng.uniform(0.3, 0.7)
    depth = rng.uniform(r + 1, max(r + 1, 0.28 * (w if where in ("left", "right") else h)))
    cx, cy = {
        "left": (depth, along * h),
        "right": (w - depth, along * h),
        "top": (along * w, depth),
        "bottom": (along * w, h - depth),
    }[where]
    draw_shape(ImageDraw.Draw(img), kind, cx, cy, r, jitter(rng, PALETTE[color], 10), shape_rotation(rng, kind))
    img = add_noise(img, rng, rng.uniform(1.0, 4.0))
    return img, [(SIMPLE_QUESTIONS["where"], where)]


def task_count_big(
    rng: random.Random, size: tuple[int, int], fonts: Sequence[str] | None = None
) -> tuple[Image.Image, list[QA]]:
    """1-4 large non-overlapping shapes (any kinds and colours far from the background) to count."""
    w, h = size
    img, bg = _neutral_background(rng, size)
    names = colors_far_from(bg, 120.0)
    n = rng.randint(1, 4)
    draw = ImageDraw.Draw(img)
    for cx, cy, r in place(rng, w, h, n, gap=4.0):
        kind = rng.choice(SHAPES)
        draw_shape(draw, kind, cx, cy, r, jitter(rng, PALETTE[rng.choice(names)], 10), shape_rotation(rng, kind))
    img = add_noise(img, rng, rng.uniform(1.0, 4.0))
    return img, [(SIMPLE_QUESTIONS["count_big"], str(n))]


def task_digit(
    rng: random.Random, size: tuple[int, int], fonts: Sequence[str] | None = None
) -> tuple[Image.Image, list[QA]]:
    """One big digit, 55-80 % of the short side (shrunk until it fits), in a contrasting colour."""
    w, h = size
    font_path = rng.choice(list(fonts_or_default(fonts)))
    char = rng.choice(DIGITS)
    px = max(8, int(rng.uniform(0.55, 0.8) * min(w, h)))
    while True:
        font = load_font(font_path, px)
        tw, th = text_wh(font, char)
        if (tw <= w - 4 and th <= h - 4) or px <= 8:
            break
        px = max(8, int(px * 0.9))
    img, bg = _neutral_background(rng, size)
    fg = contrasting_rgb(rng, bg, 100.0)
    draw_text(
        ImageDraw.Draw(img), (rng.randint(2, max(2, w - 2 - tw)), rng.randint(2, max(2, h - 2 - th))), char, font, fg
    )
    img = add_noise(img, rng, rng.uniform(1.0, 4.0))
    return img, [(SIMPLE_QUESTIONS["digit"], char)]
