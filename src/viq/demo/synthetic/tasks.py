"""The synthetic QA tasks: one generator per task, the registry :data:`TASKS`, the text-only task.

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

The *simple* tasks (:data:`SIMPLE_TASKS`: one or a few big objects, one fixed question each,
one-word answers; what a tiny model learns to read from an image first). They are not in the
default :data:`ALL_TASKS` mix; pass them in ``tasks`` (:data:`KNOWN_TASKS` lists every task):

===============  ==========================  ==============================================
task             question                    answer
===============  ==========================  ==============================================
``shape_color``  What color is the shape?    one of :data:`SIMPLE_COLORS` (one big shape)
``shape``        What shape is this?         circle / square / triangle (one big shape)
``where``        Where is the shape?         one of :data:`EDGE_NAMES` (shape in that band)
``count_big``    How many shapes are there?  ``"1"`` .. ``"4"`` (large shapes)
``digit``        What digit is shown?        ``"0"`` .. ``"9"`` (one big glyph)
===============  ==========================  ==============================================

Plus the text-only task :data:`TEXT_TASK` (``"arithmetic"``, e.g. "What is 12 + 30?" -> "42"),
about 3 % of every split, so training code also sees samples without an image.
"""

from __future__ import annotations

import math
import random
import string
from collections.abc import Callable, Sequence
from typing import Any

from PIL import Image, ImageDraw

from viq.demo.synthetic.document import task_document
from viq.demo.synthetic.draw import (
    CELL_NAMES,
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
    random_rgb,
    shape_rotation,
    text_wh,
)
from viq.demo.synthetic.simple import (
    SIMPLE_TASKS,
    task_count_big,
    task_digit,
    task_shape,
    task_shape_color,
    task_where,
)

ALL_TASKS = ("ocr", "count", "locate", "color", "chart", "document")
#: Every image task ``generate`` accepts, in canonical order.
KNOWN_TASKS = ALL_TASKS + SIMPLE_TASKS
#: Name of the text-only task (not in :data:`ALL_TASKS`: it is controlled by ``text_only_fraction``).
TEXT_TASK = "arithmetic"

QA = tuple[str, str]


# --------------------------------------------------------------------------------------------
# Task: ocr
# --------------------------------------------------------------------------------------------

#: Random strings avoid glyphs that are ambiguous in small sans fonts (I/l/1, O/0/o).
OCR_ALPHABET = "".join(c for c in string.ascii_letters + string.digits if c not in "Il1O0o")
_WORDS = tuple(
    """
    apple river garden window silver planet rocket marble forest pencil harbor candle violet jacket
    bridge copper meadow castle puzzle lantern thunder compass blanket falcon harvest quartz zebra
    yogurt kettle waffle basket tunnel museum nectar orbit pixel vector token matrix sketch glacier
    volcano saffron cobalt emerald ginger hammock igloo jigsaw kayak lemon mosaic noodle oyster
    parrot quiver radish sphinx tundra umbrella walnut xylophone yonder zipper ember fjord gravel
    horizon inkwell juniper keystone lighthouse mango nebula outpost pepper riddle sunset trumpet
    velvet whisper
    """.split()
)


def task_ocr(
    rng: random.Random, size: tuple[int, int], fonts: Sequence[str] | None = None
) -> tuple[Image.Image, list[QA]]:
    """Short word or random alphanumeric string (3-12 chars), often in a small 10-14 px font.

    The font shrinks (down to 8 px) and then the string is shortened (down to 3 chars) until the
    text fits inside the image with a 2 px margin, so the answer is always fully visible.
    """
    w, h = size
    font_path = rng.choice(list(fonts_or_default(fonts)))
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
        font = load_font(font_path, px)
        tw, th = text_wh(font, text)
        if tw <= w - 2 * margin and th <= h - 2 * margin:
            break
        if px > 8:
            px = max(8, int(px * 0.85))
        elif len(text) > 3:
            text = text[:-1]
        else:
            raise ValueError(f"image {w}x{h} too small for OCR text")
    bg = random_rgb(rng)
    gradient = rng.choice((0, 0, 30, 60))
    # The gradient can move the background towards the text colour: demand extra contrast.
    fg = contrasting_rgb(rng, bg, 80.0 + gradient)
    img = background(rng, size, bg, gradient=gradient)
    draw = ImageDraw.Draw(img)
    x = rng.randint(margin, w - margin - tw)
    y = rng.randint(margin, h - margin - th)
    draw_text(draw, (x, y), text, font, fg)
    img = add_noise(img, rng, rng.uniform(1.0, 8.0))
    return img, [("What is written in the image?", text), ("How many characters are in the text?", str(len(text)))]


# --------------------------------------------------------------------------------------------
# Task: count
# --------------------------------------------------------------------------------------------


def task_count(
    rng: random.Random, size: tuple[int, int], fonts: Sequence[str] | None = None
) -> tuple[Image.Image, list[QA]]:
    """1-9 shapes of one kind plus (60 % of the time) 1-4 distractors of another kind."""
    w, h = size
    kind, other = rng.sample(SHAPES, 2)
    n = rng.randint(1, 9)
    m = 0 if rng.random() < 0.4 else rng.randint(1, 4)
    bg = jitter(rng, rng.choice(NEUTRALS), 12)
    names = colors_far_from(bg, 110.0)
    same = rng.random() < 0.5
    target_color = rng.choice(names)
    kinds = [kind] * n + [other] * m
    rng.shuffle(kinds)
    img = background(rng, size, bg, gradient=rng.choice((0, 20)))
    draw = ImageDraw.Draw(img)
    for k, (cx, cy, r) in zip(kinds, place(rng, w, h, len(kinds))):
        name = target_color if (same and k == kind) else rng.choice(names)
        draw_shape(draw, k, cx, cy, r, jitter(rng, PALETTE[name], 12), shape_rotation(rng, k))
    img = add_noise(img, rng, rng.uniform(1.0, 5.0))
    return img, [(f"How many {kind}s are there?", str(n)), (f"How many {other}s are there?", str(m))]


# --------------------------------------------------------------------------------------------
# Task: locate
# --------------------------------------------------------------------------------------------


def cell_name(x: float, y: float, w: int, h: int) -> str:
    """Name of the 3x3 grid cell of a ``w x h`` image (px) that contains point ``(x, y)``."""
    col = min(2, max(0, int(3 * x / w)))
    row = min(2, max(0, int(3 * y / h)))
    return CELL_NAMES[row][col]


def task_locate(
    rng: random.Random, size: tuple[int, int], fonts: Sequence[str] | None = None
) -> tuple[Image.Image, list[QA]]:
    """A target ``<color> <shape>`` plus 0-3 distractors, each well inside its own grid cell.

    Centres lie in the middle half of their cell and shapes are smaller than 0.22 of a cell, so
    every shape lies entirely inside one cell and the answer is unambiguous. Distractors differ
    from the target in colour or kind (the ``<color> <shape>`` phrase is unique).
    """
    w, h = size
    bg = jitter(rng, rng.choice(NEUTRALS), 12)
    names = colors_far_from(bg, 110.0)
    cells = rng.sample([(r, c) for r in range(3) for c in range(3)], rng.randint(1, 4))
    target = (rng.choice(names), rng.choice(SHAPES))
    objects = [target]
    while len(objects) < len(cells):
        cand = (rng.choice(names), rng.choice(SHAPES))
        if cand != target:
            objects.append(cand)
    cw, ch = w / 3.0, h / 3.0
    r_hi = max(3.0, 0.22 * min(cw, ch))
    img = background(rng, size, bg, gradient=rng.choice((0, 20)))
    draw = ImageDraw.Draw(img)
    for (color, kind), (row, col) in zip(objects, cells):
        r = rng.uniform(max(3.0, 0.5 * r_hi), r_hi)
        cx = rng.uniform(col * cw + 0.25 * cw, col * cw + 0.75 * cw)
        cy = rng.uniform(row * ch + 0.25 * ch, row * ch + 0.75 * ch)
        draw_shape(draw, kind, cx, cy, r, jitter(rng, PALETTE[color], 12), shape_rotation(rng, kind))
    img = add_noise(img, rng, rng.uniform(1.0, 5.0))
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


def task_color(
    rng: random.Random, size: tuple[int, int], fonts: Sequence[str] | None = None
) -> tuple[Image.Image, list[QA]]:
    """1-3 shapes of distinct kinds and distinct palette colours on a neutral background."""
    w, h = size
    bg = jitter(rng, rng.choice(NEUTRALS), 10)
    k = rng.randint(1, 3)
    kinds = rng.sample(SHAPES, k)
    colors = rng.sample(colors_far_from(bg, 120.0), k)
    img = background(rng, size, bg, gradient=rng.choice((0, 15)))
    draw = ImageDraw.Draw(img)
    for kind, color, (cx, cy, r) in zip(kinds, colors, place(rng, w, h, k, r_cap=60.0)):
        draw_shape(draw, kind, cx, cy, r, jitter(rng, PALETTE[color], 10), shape_rotation(rng, kind))
    img = add_noise(img, rng, rng.uniform(1.0, 4.0))
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


def task_chart(
    rng: random.Random, size: tuple[int, int], fonts: Sequence[str] | None = None
) -> tuple[Image.Image, list[QA]]:
    """Bar chart (vertical or horizontal) with 3-6 labelled bars and value labels or axis ticks."""
    w, h = size
    fonts = fonts_or_default(fonts)
    font_path = rng.choice(list(fonts))
    mode = "labels" if rng.random() < 0.6 else "ticks"
    aspect = w / h
    vertical = True if aspect >= 1.3 else False if aspect <= 1 / 1.3 else rng.random() < 0.5
    theme = rng.choice(_CHART_THEMES)
    label_pool = theme if rng.random() < 0.85 else _LETTER_LABELS
    n_want = min(rng.randint(3, 6), len(label_pool))
    px = rng.randint(9, 12)
    title = rng.choice(_CHART_TITLES) if rng.random() < 0.5 else None
    bg = jitter(rng, (250, 250, 250), 6) if rng.random() < 0.7 else jitter(rng, (225, 230, 240), 10)
    ink = (30, 30, 30)
    values, top, step = _chart_values(rng, n_want, mode)
    bar_colors = (
        [rng.choice(colors_far_from(bg, 140.0))] * n_want
        if rng.random() < 0.6
        else [rng.choice(colors_far_from(bg, 140.0)) for _ in range(n_want)]
    )
    idx = sorted(rng.sample(range(len(label_pool)), min(n_want, len(label_pool))))

    # Layout: try the preferred labels/font, then fewer bars, then letters, then smaller fonts.
    layout = None
    for pool in (label_pool, _LETTER_LABELS):
        for size_px in range(px, 7, -1):
            font = load_font(font_path, size_px)
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
        tw, _ = text_wh(font, title)
        draw_text(draw, ((w - tw) / 2, 3), title, font, ink)
    plot_len = (bottom - top_y) if vertical else (right - left)
    if mode == "ticks":
        # Every gridline is drawn; labels are thinned (every 2nd, 3rd, ...) until they no longer
        # overlap. Values always sit on a gridline, so they stay exactly readable.
        spacing = plot_len * step / top
        need = (text_wh(font, "0Ag")[1] + 2) if vertical else (max(text_wh(font, str(top))[0], 1) + 4)
        every = max(1, math.ceil(need / max(spacing, 1e-6)))
        for k, t in enumerate(range(0, top + 1, step)):
            frac = t / top
            tick = str(t)
            tw, th = text_wh(font, tick)
            if vertical:
                y = bottom - frac * plot_len
                draw.line((left, y, right, y), fill=(215, 215, 215))
                if k % every == 0:
                    draw_text(draw, (left - 4 - tw, y - th / 2), tick, font, ink)
            else:
                x = left + frac * plot_len
                draw.line((x, top_y, x, bottom), fill=(215, 215, 215))
                if k % every == 0:
                    draw_text(draw, (x - tw / 2, bottom + 4), tick, font, ink)
    slot = ((right - left) if vertical else (bottom - top_y)) / n
    thick = slot * rng.uniform(0.5, 0.8)
    for i, (label, v) in enumerate(zip(labels, vals)):
        length = max(1.0, v / top * plot_len)
        c = slot * (i + 0.5) + (left if vertical else top_y)
        color = jitter(rng, PALETTE[bar_colors[i]], 8)
        lw, lh = text_wh(font, label)
        vw, vh = text_wh(font, str(v))
        if vertical:
            draw.rectangle((c - thick / 2, bottom - length, c + thick / 2, bottom), fill=color)
            draw_text(draw, (c - lw / 2, bottom + 4), label, font, ink)
            if mode == "labels":
                draw_text(draw, (c - vw / 2, bottom - length - 3 - vh), str(v), font, ink)
        else:
            draw.rectangle((left, c - thick / 2, left + length, c + thick / 2), fill=color)
            draw_text(draw, (left - 4 - lw, c - lh / 2), label, font, ink)
            if mode == "labels":
                draw_text(draw, (left + length + 3, c - vh / 2), str(v), font, ink)
    draw.line((left, top_y, left, bottom), fill=ink)
    draw.line((left, bottom, right, bottom), fill=ink)
    img = add_noise(img, rng, rng.uniform(0.0, 3.0))

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
    w: int,
    h: int,
    font: Any,
    labels: list[str],
    vals: list[int],
    top: int,
    step: int,
    mode: str,
    vertical: bool,
    title: str | None,
) -> dict[str, Any] | None:
    """Plot rectangle ``(left, top, right, bottom)`` in px if everything fits, else ``None``."""
    fh = text_wh(font, "0Ag")[1]
    title_h = fh + 5 if title is not None else 0
    if title is not None and text_wh(font, title)[0] > w - 6:
        return None
    n = len(labels)
    label_w = max(text_wh(font, s)[0] for s in labels)
    value_w = max(text_wh(font, str(v))[0] for v in vals)
    tick_w = max(text_wh(font, str(t))[0] for t in range(0, top + 1, step)) if mode == "ticks" else 0
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


# --------------------------------------------------------------------------------------------


TaskFn = Callable[..., tuple[Image.Image, list[QA]]]

#: Image task registry: name -> ``fn(rng, size, fonts=None) -> (image, [(question, answer), ...])``.
TASKS: dict[str, TaskFn] = {
    "ocr": task_ocr,
    "count": task_count,
    "locate": task_locate,
    "color": task_color,
    "chart": task_chart,
    "document": task_document,
    "shape_color": task_shape_color,
    "shape": task_shape,
    "where": task_where,
    "count_big": task_count_big,
    "digit": task_digit,
}
#: Smallest side (px) a task is given (capped at ``max_side``); charts/documents need room.
TASK_MIN_SIDE = {
    "ocr": 32,
    "count": 64,
    "locate": 64,
    "color": 32,
    "chart": 112,
    "document": 112,
    "shape_color": 32,
    "shape": 32,
    "where": 32,
    "count_big": 32,
    "digit": 32,
}
