"""Tests for viq.data: LLaVA-style conversation data (llava.py) and image folders (folder.py).

Every dataset is built in tmp_path from tiny PIL images; nothing here needs a model.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from viq.data.folder import ImageFolderDataset, ImageItem, collate_items
from viq.data.llava import (
    DataError,
    LlavaDataset,
    OfficialResize,
    Sample,
    collate_samples,
    parse_resize,
)
from viq.formats.image import PreprocessConfig, load_image, preprocess, to_pixels

RNG = np.random.default_rng(0)


def make_image(path: Path, w: int, h: int, fmt: str | None = None) -> Path:
    """Write a random RGB ``w x h`` image (content random so resampling is actually exercised)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(RNG.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(path, format=fmt)
    return path


def conv(*turns: tuple[str, str]) -> list[dict[str, str]]:
    """``conv(("human", "hi"), ("gpt", "yo"))`` -> official ``conversations`` list."""
    return [{"from": r, "value": v} for r, v in turns]


def qa(question: str = "<image>\nWhat is this?", answer: str = "A test.") -> list[dict[str, str]]:
    return conv(("human", question), ("gpt", answer))


def write_jsonl(path: Path, records: list[Any], raw_lines: dict[int, str] | None = None) -> Path:
    """One record per line; ``raw_lines`` {line_no: text} injects literal lines (1-based)."""
    lines = [json.dumps(r) for r in records]
    for no, text in sorted((raw_lines or {}).items()):
        lines.insert(no - 1, text)
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


@pytest.fixture()
def images(tmp_path: Path) -> dict[str, Path]:
    """The three worked sizes of the official "384x16" rule plus a small one, in tmp/img/."""
    return {
        "wide": make_image(tmp_path / "img" / "wide.png", 512, 320),
        "sq448": make_image(tmp_path / "img" / "sq448.png", 448, 448),
        "sq384": make_image(tmp_path / "img" / "sq384.png", 384, 384),
        "small": make_image(tmp_path / "img" / "small.jpg", 40, 24),
    }


# ----------------------------------------------------------------------------------------------
# the official resize rule
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("size", "expected"),
    [
        ((512, 320), (480, 288)),
        ((448, 448), (384, 384)),
        ((384, 384), (384, 384)),
        # small images are up-scaled toward base**2 too; a tiny side is clamped to one patch
        ((100, 100), (384, 384)),
        ((4000, 10), (7680, 16)),
    ],
)
def test_official_area_resize_examples(size: tuple[int, int], expected: tuple[int, int]) -> None:
    assert parse_resize("384x16").target_size(*size) == expected


def test_official_resize_variants() -> None:
    # p <= 0: square base x base whatever the source.
    assert parse_resize("256x0").target_size(512, 320) == (256, 256)
    assert parse_resize("256x-1").target_size(10, 999) == (256, 256)
    # List form: (width, height) with a 64-pixel floor, independent of the source.
    assert parse_resize([100, 40]).target_size(7, 7) == (100, 64)
    assert parse_resize([30, 200]).target_size(7, 7) == (64, 200)
    assert parse_resize(None) is None
    assert parse_resize(" 384 X 32 ") == OfficialResize("area", 384, 32)
    # Exactness: floor(W*s/p) where W*s/p is an exact integer must not drop a patch.
    for side in range(17, 3000, 37):
        w, h = parse_resize("512x16").target_size(side * 4, side)
        assert (w, h) == (1024, 256), side
    for bad in ("384", "x16", "0x16", "384x16x2", [1, 2, 3], [1.5, 2], [True, 2], 384, {"a": 1}):
        with pytest.raises(ValueError, match="invalid resize"):
            parse_resize(bad)


# ----------------------------------------------------------------------------------------------
# LlavaDataset: formats and image specs
# ----------------------------------------------------------------------------------------------


def test_official_entries_jsonl_shapes_and_pixels(tmp_path: Path, images: dict[str, Path]) -> None:
    records = [
        {"id": f"s{k}", "image": {"img_path": f"img/{name}.png", "resize": "384x16"}, "conversations": qa()}
        for k, name in enumerate(["wide", "sq448", "sq384"])
    ]
    ds = LlavaDataset(write_jsonl(tmp_path / "data.jsonl", records))
    shapes = [tuple(ds[i].images[0].shape) for i in range(3)]
    assert shapes == [(3, 288, 480), (3, 384, 384), (3, 384, 384)]
    # Pixels: PIL bilinear to the rule's size, official normalisation; unchanged size = native.
    ref = to_pixels(load_image(images["wide"]).resize((480, 288), resample=Image.Resampling.BILINEAR))
    assert torch.equal(ds[0].images[0], ref)
    assert torch.equal(ds[2].images[0], to_pixels(load_image(images["sq384"])))
    s = ds[1]
    assert isinstance(s, Sample) and s.id == "s1" and s.index == 1
    assert s.where.endswith("data.jsonl:2")
    assert s.messages == [
        {"role": "user", "content": "<image>\nWhat is this?"},
        {"role": "assistant", "content": "A test."},
    ]
    assert s.images[0].dtype == torch.float32 and float(s.images[0].abs().max()) <= 1.0


def test_json_list_path_forms_and_text_only(tmp_path: Path, images: dict[str, Path]) -> None:
    records = [
        # single path string: the dataset's PreprocessConfig (native policy) applies
        {"id": 7, "image": "img/small.jpg", "conversations": qa()},
        # list of paths, mixed with an official entry and a list resize
        {
            "image": [
                "img/sq384.png",
                {"img_path": "img/wide.png", "resize": [100, 40]},
                {"img_path": "img/small.jpg"},
            ],
            "conversations": qa("Compare <image> and <image>.", "Similar.") + qa("And <image>?", "Small."),
        },
        # text-only: no image key, no placeholder
        {"conversations": qa("Hello?", "Hi!")},
    ]
    path = tmp_path / "data.json"
    path.write_text(json.dumps(records, indent=2), encoding="utf-8")
    ds = LlavaDataset(path)
    assert len(ds) == 3
    s0, s1, s2 = ds[0], ds[1], ds[2]
    assert s0.id == "7" and len(s0.images) == 1
    # 40x24 = 960 pixels >= min_pixels: native size kept, pixels identical to viq.formats.image.preprocess
    assert torch.equal(s0.images[0], preprocess(images["small"], PreprocessConfig()).pixels)
    assert [tuple(t.shape) for t in s1.images] == [(3, 384, 384), (3, 64, 100), (3, 24, 40)]
    assert [m["role"] for m in s1.messages] == ["user", "assistant", "user", "assistant"]
    assert s2.images == [] and s2.messages[0]["content"] == "Hello?"
    # Records know the line they start on (json.dumps(indent=2): "[" then one record per block).
    text_lines = path.read_text().splitlines()
    for s in (s0, s1, s2):
        line = int(s.where.rsplit(":", 1)[1])
        assert text_lines[line - 1].strip() == "{", (s.where, text_lines[line - 1])
    assert s2.id == f"data.json:{s2.where.rsplit(':', 1)[1]}"  # no id: file name + line


def test_messages_format_system_and_custom_preprocess(tmp_path: Path, images: dict[str, Path]) -> None:
    rec = {
        "image": ["img/sq448.png"],
        "messages": [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "Describe <image> please."},
            {"role": "assistant", "content": "Noise."},
        ],
    }
    cfg = PreprocessConfig(max_pixels=128 * 128)  # applies to images without an official resize
    ds = LlavaDataset(write_jsonl(tmp_path / "m.jsonl", [rec]), preprocess=cfg)
    s = ds[0]
    assert [m["role"] for m in s.messages] == ["system", "user", "assistant"]
    assert s.messages[1]["content"] == "Describe <image> please."  # placeholder kept in place
    assert tuple(s.images[0].shape) == (3, 128, 128)


def test_image_root_and_absolute_paths(tmp_path: Path, images: dict[str, Path]) -> None:
    data_dir = tmp_path / "meta"
    data_dir.mkdir()
    recs = [
        {"image": "sq384.png", "conversations": qa()},
        {"image": str(images["small"].resolve()), "conversations": qa()},  # absolute: root ignored
    ]
    path = write_jsonl(data_dir / "d.jsonl", recs)
    ds = LlavaDataset(path, image_root=tmp_path / "img")
    assert tuple(ds[0].images[0].shape) == (3, 384, 384)
    assert tuple(ds[1].images[0].shape) == (3, 24, 40)
    # Default root is the data file's folder, where sq384.png is not.
    with pytest.raises(DataError, match=r"d\.jsonl:1: image 1 of 1 \(.*meta.sq384\.png\): file not found"):
        LlavaDataset(path)[0]


def test_blank_lines_and_max_samples(tmp_path: Path, images: dict[str, Path]) -> None:
    recs = [{"id": k, "conversations": qa("q", "a")} for k in range(5)]
    path = write_jsonl(tmp_path / "b.jsonl", recs, raw_lines={2: "", 4: "   "})
    ds = LlavaDataset(path)
    assert len(ds) == 5 and ds[1].where.endswith("b.jsonl:3")
    ds = LlavaDataset(path, max_samples=2)
    assert [ds[i].id for i in range(len(ds))] == ["0", "1"]
    with pytest.raises(IndexError):
        ds[2]


# ----------------------------------------------------------------------------------------------
# LlavaDataset: errors (raise) and skip mode
# ----------------------------------------------------------------------------------------------


def test_malformed_jsonl_line(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    recs = [{"id": k, "conversations": qa("q", "a")} for k in range(3)]
    path = write_jsonl(tmp_path / "file.jsonl", recs, raw_lines={3: '{"id": 9, "conversations": [}'})
    with pytest.raises(DataError, match=r"file\.jsonl:3: invalid JSON: Expecting value \(column 29\)"):
        LlavaDataset(path)
    with caplog.at_level(logging.WARNING, logger="viq.data.llava"):
        ds = LlavaDataset(path, on_error="skip")
    assert len(ds) == 3 and [w for w, _ in ds.skipped] == [f"{path}:3"]
    assert "skipped 1 invalid record(s) of 4" in caplog.text


def test_json_syntax_errors(tmp_path: Path) -> None:
    path = tmp_path / "bad.json"
    path.write_text('[\n {"conversations": []},\n {"conversations": [}\n]\n', encoding="utf-8")
    with pytest.raises(DataError, match=r"bad\.json:3: invalid JSON"):
        LlavaDataset(path, on_error="skip")  # a broken .json list cannot be skipped around
    good = json.dumps({"conversations": qa("q", "a")})
    path.write_text(f"[{good}\n {good}]", encoding="utf-8")
    with pytest.raises(DataError, match=r"bad\.json:2: invalid JSON: expected ',' or '\]'"):
        LlavaDataset(path)
    path.write_text('{"conversations": []}\n', encoding="utf-8")
    with pytest.raises(DataError, match="must be a list of records .*jsonl"):
        LlavaDataset(path)
    path.write_text("[]", encoding="utf-8")
    with pytest.raises(DataError, match="no records"):
        LlavaDataset(path)
    (tmp_path / "x.txt").write_text("[]")
    with pytest.raises(DataError, match="unsupported data file extension '.txt'"):
        LlavaDataset(tmp_path / "x.txt")
    with pytest.raises(DataError, match="data file not found"):
        LlavaDataset(tmp_path / "nope.jsonl")


BAD_RECORDS: list[tuple[dict[str, Any], str]] = [
    (
        {"id": "cnt", "image": "img/small.jpg", "conversations": qa("no placeholder", "a")},
        r"0 '<image>' placeholder\(s\) in the text but 1 image\(s\)",
    ),
    ({"id": "cnt2", "conversations": qa("<image> and <image>", "a")}, r"2 '<image>' placeholder\(s\).* but 0"),
    (
        {"id": "order", "conversations": conv(("gpt", "a"), ("human", "q"))},
        "the first non-system turn must be user, got assistant",
    ),
    (
        {"id": "alt", "conversations": conv(("human", "q"), ("human", "q2"), ("gpt", "a"))},
        r"turns must alternate user/assistant; conversations\[1\] must be assistant, got user",
    ),
    (
        {"id": "last", "conversations": conv(("human", "q"), ("gpt", "a"), ("human", "q2"))},
        "the last turn must be assistant",
    ),
    (
        {"id": "sys", "conversations": conv(("human", "q"), ("system", "s"), ("gpt", "a"))},
        r"conversations\[1\]: a system turn is only allowed as the first turn",
    ),
    ({"id": "empty", "conversations": []}, "empty 'conversations'"),
    ({"id": "none", "image": "img/small.jpg"}, "record has no 'conversations' \\(or 'messages'\\)"),
    ({"id": "role", "conversations": conv(("human", "q"), ("bot", "a"))}, r"conversations\[1\]: unknown role 'bot'"),
    (
        {"id": "type", "conversations": [{"from": "human", "value": ["q"]}, {"from": "gpt", "value": "a"}]},
        r"conversations\[0\]: 'value' must be a string, got list",
    ),
    ({"id": "blank", "conversations": qa("q", "  ")}, r"conversations\[1\]: empty assistant turn"),
    (
        {"id": "rs", "image": {"img_path": "img/small.jpg", "resize": "big"}, "conversations": qa()},
        r"image\[0\]: invalid resize 'big'",
    ),
    (
        {"id": "packed", "image": {"patch": "p.bin", "start_num": 0}, "conversations": qa()},
        r"image\[0\]: packed image entries",
    ),
]


@pytest.mark.parametrize(("record", "problem"), BAD_RECORDS, ids=[r["id"] for r, _ in BAD_RECORDS])
def test_invalid_record_raises_naming_sample(
    tmp_path: Path, images: dict[str, Path], record: dict, problem: str
) -> None:
    good = {"id": "good", "conversations": qa("q", "a")}
    path = write_jsonl(tmp_path / "d.jsonl", [good, record])
    with pytest.raises(DataError, match=rf"d\.jsonl:2 \(id={record['id']}\): {problem}"):
        LlavaDataset(path)


def test_skip_mode_counts_invalid_records(
    tmp_path: Path, images: dict[str, Path], caplog: pytest.LogCaptureFixture
) -> None:
    good = [{"id": f"g{k}", "image": "img/small.jpg", "conversations": qa()} for k in range(2)]
    bad = [r for r, _ in BAD_RECORDS]
    path = write_jsonl(tmp_path / "d.jsonl", good[:1] + bad + good[1:] + ["not an object"])
    with caplog.at_level(logging.WARNING, logger="viq.data.llava"):
        ds = LlavaDataset(path, on_error="skip")
    assert [ds[i].id for i in range(len(ds))] == ["g0", "g1"]
    assert len(ds.skipped) == len(bad) + 1
    assert ds.skipped[0][0] == f"{path}:2" and "(id=cnt)" in ds.skipped[0][1]
    assert "a record must be a JSON object, got str" in ds.skipped[-1][1]
    assert f"skipped {len(bad) + 1} invalid record(s) of {len(bad) + 3}" in caplog.text
    # Nothing valid at all is an error even in skip mode.
    with pytest.raises(DataError, match="all 2 record"):
        LlavaDataset(write_jsonl(tmp_path / "e.jsonl", bad[:2]), on_error="skip")


def test_missing_and_corrupt_images(tmp_path: Path, images: dict[str, Path], caplog: pytest.LogCaptureFixture) -> None:
    corrupt = tmp_path / "img" / "corrupt.png"
    corrupt.write_bytes(images["sq384"].read_bytes()[:300])  # truncated PNG: header fine, data cut
    recs = [
        {"id": "ok", "image": "img/small.jpg", "conversations": qa()},
        {"id": "miss", "image": ["img/small.jpg", "img/nope.png"], "conversations": qa("<image><image>", "a")},
        {"id": "bad", "image": {"img_path": "img/corrupt.png", "resize": "384x16"}, "conversations": qa()},
    ]
    path = write_jsonl(tmp_path / "d.jsonl", recs)
    ds = LlavaDataset(path)  # construction does not touch images
    with pytest.raises(DataError, match=r"d\.jsonl:2 \(id=miss\): image 2 of 2 \(.*nope\.png\): file not found") as ei:
        ds[1]
    assert str(tmp_path / "img" / "nope.png") in str(ei.value)
    with pytest.raises(DataError, match=r"d\.jsonl:3 \(id=bad\): image 1 of 1 \(.*corrupt\.png\): cannot decode"):
        ds[2]

    skip = LlavaDataset(path, on_error="skip")
    with caplog.at_level(logging.WARNING, logger="viq.data.llava"):
        assert skip[1] is None and skip[2] is None
    assert "(id=miss)" in caplog.text and "(id=bad)" in caplog.text
    batch = collate_samples([skip[0], skip[1], skip[2]])
    assert [s.id for s in batch] == ["ok"]


def test_dataloader_with_collate(tmp_path: Path, images: dict[str, Path]) -> None:
    recs = [
        {"id": "a", "image": "img/small.jpg", "conversations": qa()},
        {"id": "b", "image": "img/missing.png", "conversations": qa()},
        {"id": "c", "conversations": qa("q", "a")},
        {"id": "d", "image": {"img_path": "img/wide.png", "resize": "128x16"}, "conversations": qa()},
    ]
    ds = LlavaDataset(write_jsonl(tmp_path / "d.jsonl", recs), on_error="skip")
    loader = DataLoader(ds, batch_size=3, shuffle=False, num_workers=0, collate_fn=collate_samples)
    batches = list(loader)
    assert [[s.id for s in b] for b in batches] == [["a", "c"], ["d"]]
    # 512x320 toward 128**2: isqrt(512*128^2 // (320*16^2)) = isqrt(102) = 10 -> 160 wide,
    # isqrt(320*128^2 // (512*16^2)) = isqrt(40) = 6 -> 96 high
    assert tuple(batches[1][0].images[0].shape) == (3, 96, 160)


def test_approx_lengths(tmp_path: Path, images: dict[str, Path]) -> None:
    # EXIF-rotated JPEG (orientation 6 = 90 degrees): upright size is 24x40, not 40x24.
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.open(images["small"]).save(tmp_path / "img" / "rot.jpg", exif=exif)
    recs = [
        {
            "image": {"img_path": "img/wide.png", "resize": "384x16"},
            "conversations": qa("<image>" + "x" * 30, "y" * 30),
        },
        {"conversations": qa("q" * 10, "a" * 5)},
        {
            "image": ["img/sq448.png", "img/small.jpg", "img/rot.jpg"],
            "conversations": qa("<image><image><image>", "ok"),
        },
    ]
    ds = LlavaDataset(write_jsonl(tmp_path / "d.jsonl", recs))
    # 480x288 -> 30*18 patches; 448x448 native -> 28*28; 40x24 -> 3*2; rotated 24x40 -> 2*3
    assert ds.approx_lengths() == [60 // 3 + 540, 15 // 3, 2 // 3 + 784 + 6 + 6]
    assert ds.approx_lengths(num_threads=1) == ds.approx_lengths()  # cached
    assert tuple(ds[2].images[2].shape) == (3, 40, 24)  # the decoder agrees on the orientation

    bad = LlavaDataset(write_jsonl(tmp_path / "m.jsonl", [{"id": "m", "image": "nope.png", "conversations": qa()}]))
    with pytest.raises(DataError, match=r"m\.jsonl:1 \(id=m\): image 1 of 1 .*nope\.png.*cannot read image header"):
        bad.approx_lengths()
    skip = LlavaDataset(tmp_path / "m.jsonl", on_error="skip")
    assert skip.approx_lengths() == [len("\nWhat is this?A test.") // 3]  # unreadable image: 0 tokens


# ----------------------------------------------------------------------------------------------
# ImageFolderDataset
# ----------------------------------------------------------------------------------------------


def test_image_folder(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    root = tmp_path / "photos"
    make_image(root / "b.png", 32, 16)
    make_image(root / "a" / "z.JPG", 16, 16, fmt="JPEG")
    make_image(root / "a" / "y.webp", 30, 12)
    make_image(root / ".hidden.png", 8, 8)
    make_image(root / ".cache" / "c.png", 8, 8)
    (root / "notes.txt").write_text("not an image")
    (root / "a" / "broken.gif").write_bytes(b"GIF89a not really")
    ds = ImageFolderDataset(root)
    rel = [Path(f).relative_to(root).as_posix() for f in ds.files]
    assert rel == ["a/broken.gif", "a/y.webp", "a/z.JPG", "b.png"]
    item = ds[3]
    assert isinstance(item, ImageItem) and item.index == 3 and item.path == ds.files[3]
    assert tuple(item.pixels.shape) == (3, 16, 32) and item.pixels.dtype == torch.float32
    with pytest.raises(DataError, match=r"broken\.gif \(index 0\): "):
        ds[0]

    skip = ImageFolderDataset(root, on_error="skip")
    with caplog.at_level(logging.WARNING, logger="viq.data.folder"):
        batches = list(DataLoader(skip, batch_size=2, num_workers=0, collate_fn=collate_items))
    assert [[i.index for i in b] for b in batches] == [[1], [2, 3]]
    assert "broken.gif" in caplog.text

    (tmp_path / "empty" / "sub").mkdir(parents=True)
    with pytest.raises(DataError, match="no image files found"):
        ImageFolderDataset(tmp_path / "empty")
    with pytest.raises(DataError, match="does not exist"):
        ImageFolderDataset(tmp_path / "nowhere")
