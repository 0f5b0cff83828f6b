"""The document task: a form or invoice-like page of key-value rows, with questions about one value
(the synthetic set's text-heavy task; names, places and codes drawn from the tables here)."""

from __future__ import annotations

import random
import string
from collections.abc import Callable, Sequence

from PIL import Image, ImageDraw

from viq.demo.synthetic.draw import (
    add_noise,
    bbox,
    draw_text,
    fonts_or_default,
    jitter,
    load_font,
    text_wh,
)

QA = tuple[str, str]


# --------------------------------------------------------------------------------------------
# Task: document
# --------------------------------------------------------------------------------------------

_FIRST = (
    "Maria",
    "James",
    "Aiko",
    "Omar",
    "Lena",
    "Carlos",
    "Priya",
    "Tomas",
    "Fatima",
    "Ivan",
    "Grace",
    "Noah",
    "Chen",
    "Sofia",
    "Kwame",
    "Elena",
    "Yusuf",
    "Hana",
    "Lucas",
    "Nadia",
)
_LAST = (
    "Garcia",
    "Smith",
    "Tanaka",
    "Haddad",
    "Novak",
    "Silva",
    "Patel",
    "Berg",
    "Okafor",
    "Ivanova",
    "Kim",
    "Muller",
    "Rossi",
    "Dubois",
    "Mensah",
    "Larsen",
    "Cohen",
    "Sato",
    "Lopez",
    "Khan",
)
_CITIES = (
    "Lisbon",
    "Nairobi",
    "Osaka",
    "Denver",
    "Krakow",
    "Lyon",
    "Austin",
    "Porto",
    "Seoul",
    "Bergen",
    "Quebec",
    "Cusco",
    "Tunis",
    "Perth",
    "Hanoi",
    "Leeds",
)
_COUNTRIES = (
    "Portugal",
    "Kenya",
    "Japan",
    "Canada",
    "Poland",
    "France",
    "Peru",
    "Norway",
    "Chile",
    "Ghana",
    "Spain",
    "India",
    "Brazil",
    "Egypt",
)
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
_DOC_TITLES = (
    "INVOICE",
    "RECEIPT",
    "PACKING SLIP",
    "ORDER FORM",
    "STATEMENT",
    "SHIPPING LABEL",
    "REGISTRATION",
    "DELIVERY NOTE",
)


def task_document(
    rng: random.Random, size: tuple[int, int], fonts: Sequence[str] | None = None
) -> tuple[Image.Image, list[QA]]:
    """Off-white page with an optional title and up to 10 lines of ``Key: Value`` in 9-13 px text.

    Only fields that fit on the page are drawn (and asked about); keys are unique per page.
    """
    w, h = size
    fonts = fonts_or_default(fonts)
    font_path = rng.choice(list(fonts))
    px = rng.randint(9, 13)
    font = load_font(font_path, px)
    ink = jitter(rng, (25, 25, 35), 15)
    img = Image.new("RGB", size, jitter(rng, (250, 249, 244), 5))
    draw = ImageDraw.Draw(img)
    x0 = rng.randint(4, max(4, w // 12))
    y = rng.randint(3, max(3, h // 20))
    title = None
    if rng.random() < 0.7:
        tfont = load_font(rng.choice(list(fonts)), px + rng.randint(3, 8))
        cand = rng.choice(_DOC_TITLES)
        tw, th = text_wh(tfont, cand)
        if tw <= w - x0 - 3 and y + th + 6 < h:
            title = cand
            tx = x0 if rng.random() < 0.5 else (w - tw) // 2
            draw_text(draw, (tx, y), title, tfont, ink)
            y += th + 4
            draw.line((x0, y, w - x0, y), fill=(150, 150, 150))
            y += 5
    fh = text_wh(font, "0Ag")[1]
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
        if text_wh(font, chosen_line)[0] > w - x0 - 3:
            continue
        chosen.append((key, value))
    key_w = max((text_wh(font, f"{k}:")[0] for k, _ in chosen), default=0)
    for key, value in chosen:
        value_x = x0 + key_w + 8
        if aligned and value_x + text_wh(font, value)[0] <= w - 3:
            draw_text(draw, (x0, y), f"{key}:", font, ink)
            # Align on the ink box top of the key line so both parts share a baseline band.
            draw.text((value_x - bbox(font, value)[0], y - bbox(font, f"{key}:")[1]), value, font=font, fill=ink)
        else:
            draw_text(draw, (x0, y), f"{key}: {value}", font, ink)
        y += line_h
    if y + fh + 4 < h and rng.random() < 0.5:
        footer = f"Page 1 of {rng.randint(1, 3)}"
        if text_wh(font, footer)[0] <= w - x0 - 3:
            draw_text(draw, (x0, h - fh - 4), footer, font, (120, 120, 120))
    img = add_noise(img, rng, rng.uniform(0.0, 4.0))
    qa = [(f"What is the {key.lower()}?", value) for key, value in chosen]
    rng.shuffle(qa)
    if title is not None:
        qa.append(("What is the title of the document?", title))
    if not qa:
        raise ValueError(f"image {w}x{h} too small for a document")
    return img, qa
