"""Tests for the synthetic QA generator (viq.demo.synthetic) and offline photos (viq.demo.photos)."""

from __future__ import annotations

import hashlib
import json
import random
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from viq.demo import photos as P
from viq.demo import synthetic as S
from viq.demo.synthetic import draw as D
from viq.demo.synthetic import writer as W

SMALL = {"num_train": 30, "num_val": 6, "num_test": 6, "seed": 0}


def _files(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def small_ds(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("syn") / "ds"
    meta = S.generate(out, **SMALL)
    return out, meta


def _all_records(root: Path) -> dict[str, list[dict]]:
    return {split: S.load_split(root, split) for split in S.SPLITS}


# ---------------------------------------------------------------------------------------------
# Determinism, layout, format
# ---------------------------------------------------------------------------------------------


def test_generate_is_deterministic(small_ds, tmp_path):
    root, _ = small_ds
    again = tmp_path / "again"
    S.generate(again, **SMALL)
    a, b = _files(root), _files(again)
    assert sorted(a) == sorted(b)
    assert all(a[k] == b[k] for k in a), [k for k in a if a[k] != b[k]][:5]
    assert not any(k.endswith(".tmp") for k in a)

    other = tmp_path / "other"
    S.generate(other, **{**SMALL, "seed": 1})
    c = _files(other)
    assert c["train.jsonl"] != a["train.jsonl"]
    pngs = [k for k in a if k.endswith(".png") and k in c]
    assert pngs and all(a[k] != c[k] for k in pngs)


def test_layout_and_meta(small_ds):
    root, meta = small_ds
    assert sorted(p.name for p in root.iterdir()) == ["images", "meta.json", "test.jsonl", "train.jsonl", "val.jsonl"]
    assert json.loads((root / "meta.json").read_text()) == meta
    assert meta["seed"] == 0 and meta["version"] == S.GENERATOR_VERSION
    assert meta["fonts"] and all(isinstance(f, str) for f in meta["fonts"])
    assert meta["args"]["num_train"] == 30 and "out_dir" not in meta["args"]
    for split, records in _all_records(root).items():
        m = meta["splits"][split]
        assert m["num_samples"] == len(records) == SMALL[f"num_{split}"]
        assert (
            m["num_images"] == sum("image" in r for r in records) == len(list((root / "images" / split).glob("*.png")))
        )
        assert sum(m["tasks"].values()) == len(records)
        for task, n in m["tasks"].items():
            assert n == sum(r["task"] == task for r in records)


def _check_record(root: Path, split: str, r: dict) -> None:
    assert r["id"].startswith(f"{split}-")
    conv = r["conversations"]
    assert len(conv) in (2, 4)
    assert [t["from"] for t in conv] == ["human", "gpt"] * (len(conv) // 2)
    text = "".join(t["value"] for t in conv)
    if "image" in r:
        assert r["task"] in S.ALL_TASKS
        assert r["image"] == f"images/{split}/{r['id']}.png"
        assert text.count("<image>") == 1 and conv[0]["value"].startswith("<image>\n")
        assert (root / r["image"]).is_file()
    else:
        assert r["task"] == S.TEXT_TASK
        assert "<image>" not in text and len(conv) == 2
    assert r["answer"] == conv[-1]["value"] and r["answer"].strip()
    assert conv[-2]["value"].endswith(r["question"])
    assert all(t["value"].strip() for t in conv)


def test_records_valid(small_ds):
    root, _ = small_ds
    sizes = set()
    for split, records in _all_records(root).items():
        assert len({r["id"] for r in records}) == len(records)
        for r in records:
            _check_record(root, split, r)
            if "image" in r:
                with Image.open(root / r["image"]) as im:
                    assert im.format == "PNG" and im.mode == "RGB"
                    w, h = im.size
                assert 64 <= w <= 384 and 64 <= h <= 384
                assert max(w, h) / min(w, h) <= 4.05
                sizes.add((w, h))
    assert len(sizes) > 20  # native, varied resolutions and aspect ratios
    assert any(w > h for w, h in sizes) and any(h > w for w, h in sizes)
    train = S.load_split(root, "train")
    assert {r["task"] for r in train} >= set(S.ALL_TASKS)
    assert sum(r["task"] == S.TEXT_TASK for r in train) == 1  # round(30 * 0.03)


def test_splits_disjoint(small_ds):
    root, _ = small_ds
    images, questions = {}, {}
    for split, records in _all_records(root).items():
        for r in records:
            if "image" in r:
                with Image.open(root / r["image"]) as im:
                    key = hashlib.sha256(im.convert("RGB").tobytes() + repr(im.size).encode()).hexdigest()
                assert key not in images, (split, images.get(key))
                images[key] = split
            else:
                assert r["question"] not in questions
                questions[r["question"]] = split


def test_text_only_and_multi_turn(tmp_path):
    out = tmp_path / "mt"
    meta = S.generate(
        out,
        num_train=16,
        num_val=4,
        num_test=0,
        tasks=("count", "ocr"),
        seed=3,
        text_only_fraction=0.25,
        multi_turn_fraction=1.0,
        max_side=160,
    )
    train = S.load_split(out, "train")
    assert meta["tasks"] == ["ocr", "count"]  # canonical order
    assert sum(r["task"] == S.TEXT_TASK for r in train) == 4
    assert {r["task"] for r in train} == {"ocr", "count", S.TEXT_TASK}
    for r in train:
        _check_record(out, "train", r)
        if "image" in r:
            assert len(r["conversations"]) == 4  # every image task offers >= 2 questions
            q1, q2 = r["conversations"][0]["value"], r["conversations"][2]["value"]
            assert "<image>" not in q2 and q1 != f"<image>\n{q2}"
        else:
            a, op, b = re.fullmatch(r"What is (\d+) ([-+*]) (\d+)\?", r["question"]).groups()
            assert int(r["answer"]) == {"+": int(a) + int(b), "-": int(a) - int(b), "*": int(a) * int(b)}[op]
    assert meta["splits"]["train"]["multi_turn"] == 12 and meta["splits"]["test"]["num_samples"] == 0
    assert S.load_split(out, "test") == []


def test_refuses_non_empty_dir_and_overwrite(tmp_path):
    out = tmp_path / "ds"
    out.mkdir()
    (out / "keep.txt").write_text("x")
    with pytest.raises(FileExistsError):
        S.generate(out, num_train=2, num_val=0, num_test=0)
    S.generate(out, num_train=8, num_val=1, num_test=1, overwrite=True)
    S.generate(out, num_train=3, num_val=1, num_test=1, overwrite=True)
    fresh = tmp_path / "fresh"
    S.generate(fresh, num_train=3, num_val=1, num_test=1)
    got, want = _files(out), _files(fresh)
    assert got.pop("keep.txt") == b"x"  # unrelated files are left alone
    assert got == want  # stale images of the larger run are gone


@pytest.mark.parametrize(
    "kwargs",
    [
        {"num_train": -1},
        {"tasks": ("ocr", "nope")},
        {"tasks": ()},
        {"min_side": 16},
        {"min_side": 200, "max_side": 100},
        {"max_side": 100},  # too small for chart/document
        {"text_only_fraction": 1.5},
        {"fonts": ["NoSuchFont-Regular.ttf"]},
    ],
)
def test_invalid_arguments(tmp_path, kwargs):
    with pytest.raises(ValueError):
        S.generate(tmp_path / "x", **{"num_train": 1, "num_val": 0, "num_test": 0, **kwargs})


# ---------------------------------------------------------------------------------------------
# Tasks
# ---------------------------------------------------------------------------------------------


def _render(task: str, seed: int, size: tuple[int, int]):
    img, qa = S.TASKS[task](random.Random(seed), size)
    img2, qa2 = S.TASKS[task](random.Random(seed), size)
    assert qa == qa2 and img.tobytes() == img2.tobytes()  # same rng -> same sample
    assert img.mode == "RGB" and img.size == size
    assert qa and all(q.strip() and a.strip() for q, a in qa)
    return img, qa


def _near(img: Image.Image, color: tuple[int, int, int], tol: float = 60.0) -> np.ndarray:
    """(H, W) bool mask of pixels within ``tol`` (RGB distance) of ``color``."""
    arr = np.asarray(img, dtype=np.float32)
    return np.linalg.norm(arr - np.array(color, dtype=np.float32), axis=-1) < tol


SIZES = [(64, 64), (256, 64), (64, 256), (384, 384), (200, 120)]


@pytest.mark.parametrize("size", SIZES)
def test_task_ocr(size):
    for seed in range(15):
        img, qa = _render("ocr", seed, size)
        (q, text), (_q2, n) = qa[0], qa[1]
        assert q == "What is written in the image?"
        assert re.fullmatch(r"[A-Za-z0-9]{3,12}", text)
        assert int(n) == len(text)
        assert np.asarray(img).std() > 3  # something is drawn


@pytest.mark.parametrize("size", SIZES)
def test_task_count(size):
    for seed in range(15):
        _, qa = _render("count", seed, size)
        (q, a), (q2, a2) = qa[0], qa[1]
        kind = re.fullmatch(r"How many (\w+)s are there\?", q).group(1)
        other = re.fullmatch(r"How many (\w+)s are there\?", q2).group(1)
        assert kind in S.SHAPES and other in S.SHAPES and kind != other
        assert 1 <= int(a) <= 9 and 0 <= int(a2) <= 4


@pytest.mark.parametrize("size", SIZES)
def test_task_locate(size):
    cells = [c for row in S.CELL_NAMES for c in row]
    w, h = size
    for seed in range(15):
        img, qa = _render("locate", seed, size)
        q, where = qa[0]
        color, kind = re.fullmatch(r"Where is the (\w+) (\w+)\?", q).groups()
        assert where in cells and kind in S.SHAPES and color in S.PALETTE
        assert dict(qa[1:]) == {
            f"What shape is at the {where} of the image?": kind,
            f"What color is the shape at the {where} of the image?": color,
        }
        # The target's colour is present inside the answer's grid cell.
        row = next(i for i, r in enumerate(S.CELL_NAMES) if where in r)
        col = S.CELL_NAMES[row].index(where)
        mask = _near(img, S.PALETTE[color])[row * h // 3 : (row + 1) * h // 3, col * w // 3 : (col + 1) * w // 3]
        assert mask.sum() >= 4
        assert S.cell_name((col + 0.5) * w / 3, (row + 0.5) * h / 3, w, h) == where


@pytest.mark.parametrize("size", SIZES)
def test_task_color(size):
    for seed in range(15):
        img, qa = _render("color", seed, size)
        for q, a in qa:
            m = re.fullmatch(r"What color is the (\w+)\?", q)
            if m:
                assert m.group(1) in S.SHAPES and a in S.PALETTE
                assert _near(img, S.PALETTE[a]).sum() >= 4
            else:
                assert a in S.SHAPES


@pytest.mark.parametrize("size", [(112, 112), (448 // 4, 384), (384, 112), (384, 384), (300, 200)])
def test_task_chart(size):
    for seed in range(15):
        _, qa = _render("chart", seed, size)
        answers = dict(qa)
        value_q = [q for q in answers if q.startswith("What is the value of ")]
        assert len(value_q) == 1 and 1 <= int(answers[value_q[0]]) <= 1000
        big = [a for q, a in qa if q in ("Which bar is the tallest?", "Which bar is the longest?")]
        small = answers["Which bar is the shortest?"]
        assert len(big) == 1 and big[0] != small
        assert len(qa) == 3


@pytest.mark.parametrize("size", [(112, 112), (112, 384), (384, 112), (384, 384)])
def test_task_document(size):
    for seed in range(15):
        _, qa = _render("document", seed, size)
        questions = [q for q, _ in qa]
        assert len(set(questions)) == len(questions)
        for q, a in qa:
            assert re.fullmatch(r"What is the [\w ]+\?", q) and a.isascii()


def test_sample_size_bounds():
    rng = random.Random(0)
    for lo, hi, floor in [(64, 384, 0), (32, 40, 0), (64, 384, 112), (100, 100, 0)]:
        for _ in range(300):
            w, h = W._sample_size(rng, lo, hi, floor)
            eff = min(max(lo, floor), hi)
            assert eff <= w <= hi and eff <= h <= hi
            assert max(w, h) / min(w, h) <= 4.05


def test_place_non_overlapping():
    rng = random.Random(1)
    for w, h, k in [(64, 64, 13), (384, 96, 5), (32, 32, 3)]:
        discs = D.place(rng, w, h, k)
        assert len(discs) == k
        for i, (x, y, r) in enumerate(discs):
            assert r <= x <= w - r and r <= y <= h - r
            for x2, y2, r2 in discs[:i]:
                assert (x - x2) ** 2 + (y - y2) ** 2 >= (r + r2) ** 2


def test_fallback_without_font_files(tmp_path, monkeypatch):
    monkeypatch.setattr(D, "FONT_DIRS", (tmp_path / "no-fonts",))
    D._font_index.cache_clear()
    D._default_fonts.cache_clear()
    try:
        assert S.resolve_fonts(None) == (S.PIL_DEFAULT_FONT,)
        meta = S.generate(tmp_path / "ds", num_train=7, num_val=0, num_test=0, tasks=("ocr", "document", "chart"))
        assert meta["fonts"] == [S.PIL_DEFAULT_FONT]
    finally:
        D._font_index.cache_clear()
        D._default_fonts.cache_clear()


def test_score():
    assert S.score("Top-Left.", "top left")
    assert S.score("  KX7pq ", "kx7PQ")
    assert S.score("3", "3") and not S.score("3", "4") and not S.score("three", "3")
    assert S.score("$1,234.50", "$1234.50")
    assert not S.score("", "a") and not S.score("INV-1234", "INV-1235")
    assert S.normalize_answer("Ｆｏｏ Bar!") == "foobar"  # NFKC full-width


# ---------------------------------------------------------------------------------------------
# Photos
# ---------------------------------------------------------------------------------------------


def test_list_and_load_photos():
    photos = P.list_photos()
    assert photos == sorted(photos, key=lambda p: (p.source, p.name))
    names = {p.name for p in photos if p.source == "scikit-image"}
    assert {"astronaut", "camera", "chelsea", "coffee", "rocket"} <= names
    assert len({(p.source, p.name) for p in photos}) == len(photos)
    for p in photos:
        if p.source == "scikit-image" and p.name in ("astronaut", "camera", "coffee") or p.source == "matplotlib":
            img = P.load_photo(p)
            assert img.mode == "RGB" and img.size == p.size
    camera = next(p for p in photos if p.name == "camera")
    arr = np.asarray(P.load_photo(camera))
    assert (arr[..., 0] == arr[..., 2]).all()  # greyscale replicated to RGB


def test_debian_wallpaper_scan(tmp_path):
    root = tmp_path / "backgrounds"
    (root / "mate" / "nature").mkdir(parents=True)
    Image.new("RGB", (300, 200), (10, 20, 30)).save(root / "mate" / "nature" / "Aqua.jpg")
    Image.new("RGB", (32, 32)).save(root / "mate" / "thumb.png")  # too small: a preview
    (root / "mate" / "mate-backgrounds.xml").write_text("<xml/>")
    (root / "mate" / "broken.jpg").write_bytes(b"not a jpeg")
    images = root / "Next" / "contents" / "images"
    images.mkdir(parents=True)
    for w, h in [(1280, 800), (1920, 1080), (3840, 2160)]:
        Image.new("RGB", (w, h)).save(images / f"{w}x{h}.png", compress_level=1)
    Image.new("RGB", (400, 300)).save(root / "Next" / "contents" / "screenshot.png")
    found = P._debian_photos([root])
    assert sorted(p.name for p in found) == [
        "backgrounds/Next/contents/images/1920x1080.png",
        "backgrounds/mate/nature/Aqua.jpg",
    ]
    assert all(p.source.startswith("debian:") for p in found)
    aqua = next(p for p in found if p.name.endswith("Aqua.jpg"))
    assert aqua.size == (300, 200) and P.load_photo(aqua).size == (300, 200)
    assert P._debian_photos([tmp_path / "missing"]) == []
    # Wallpaper names are paths: the file stem a demo writes next to its outputs is one safe name.
    assert aqua.file_stem == "backgrounds_mate_nature_Aqua.jpg"
    assert P.Photo(name="../x y", source="t", size=(1, 1)).file_stem == "_x_y"
    assert P.Photo(name="..", source="t", size=(1, 1)).file_stem == "photo"
    assert set(P.DEBIAN_PHOTO_PACKAGES) == {
        "mate-backgrounds",
        "lomiri-wallpapers-16.04",
        "plasma-workspace-wallpapers",
    }


def test_load_photo_alpha_and_loader():
    rgba = Image.new("RGBA", (5, 4), (255, 0, 0, 0))
    photo = P.Photo(name="x", source="test", size=(5, 4), loader=lambda: rgba)
    img = P.load_photo(photo)
    assert img.mode == "RGB" and img.getpixel((0, 0)) == (255, 255, 255)  # transparent -> white


# ---------------------------------------------------------------------------------------------
# Simple tasks, task weights, per-task sizes
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("task", S.SIMPLE_TASKS)
def test_simple_task_answers_and_questions(task):
    assert task in S.KNOWN_TASKS and task not in S.ALL_TASKS
    for seed in range(12):
        for size in ((32, 32), (64, 48), (48, 96)):
            _, qa = _render(task, seed, size)
            assert qa == [(S.SIMPLE_QUESTIONS[task], qa[0][1])]
            assert qa[0][1] in S.SIMPLE_ANSWERS[task]


def test_shape_color_draws_its_colour():
    for seed in range(10):
        img, [(_, color)] = _render("shape_color", seed, (64, 64))
        assert _near(img, S.PALETTE[color], 40.0).mean() > 0.1  # a big shape of that colour


def test_generate_simple_tasks_with_weights_and_sizes(tmp_path):
    weights = {"shape_color": 3, "where": 1, "digit": 0, "chart": 1}
    meta = S.generate(
        tmp_path / "ds",
        num_train=50,
        num_val=10,
        num_test=0,
        seed=2,
        min_side=32,
        max_side=48,
        tasks=("chart", *S.SIMPLE_TASKS),
        task_weights=weights,
        task_max_side={"chart": 112},
        text_only_fraction=0.0,
        multi_turn_fraction=0.0,
    )
    assert meta["tasks"] == ["chart", *S.SIMPLE_TASKS]  # canonical order
    assert meta["splits"]["train"]["tasks"] == {
        "chart": 10,
        "shape_color": 30,
        "shape": 0,
        "where": 10,
        "count_big": 0,
        "digit": 0,
        "arithmetic": 0,
    }
    assert meta["args"]["task_weights"]["shape_color"] == 3.0 and meta["args"]["task_max_side"] == {"chart": 112}
    for r in S.load_split(tmp_path / "ds", "train"):
        with Image.open(tmp_path / "ds" / r["image"]) as im:
            side = max(im.size)
        if r["task"] == "chart":
            assert 48 < side <= 112
        else:
            assert side <= 48
            assert r["question"] == S.SIMPLE_QUESTIONS[r["task"]]
            assert r["answer"] in S.SIMPLE_ANSWERS[r["task"]]
    with pytest.raises(ValueError):
        S.generate(tmp_path / "bad", num_train=2, num_val=0, num_test=0, tasks=("shape",), task_weights={"ocr": 1})
    with pytest.raises(ValueError):
        S.generate(tmp_path / "bad2", num_train=2, num_val=0, num_test=0, tasks=("shape",), task_weights={"shape": 0})
