"""``viq show`` and ``viq store stats --page``: the page's figures equal ``viq eval-recon``'s, its code maps
equal ``model.encode``'s indices, it references nothing outside itself, and in a real browser every
picture decodes and the hover names the code under the pointer."""

from __future__ import annotations

import base64
import io
import json
import os
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from train_helpers import texture
from viq.cli.main import main
from viq.eval.codebook import CodebookCounter, code_colours, code_values, slot_grid

pytest.importorskip("torchmetrics")

SIZES = {"a.png": (40, 72), "sub/b.png": (52, 60), "tall.png": (100, 30)}  # none a multiple of 16


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("show-images")
    for i, (name, (h, w)) in enumerate(SIZES.items()):
        (d / name).parent.mkdir(parents=True, exist_ok=True)
        texture(h, w, i, noise=0.05).save(d / name)
    return d


@pytest.fixture(scope="module")
def lively(tmp_path_factory):
    """The tiny random model with its pre-quantizer projection scaled up, so that its codes vary from patch to
    patch and head to head (the plain random model sends nearly every patch to one code, which would let a
    wrong code map pass): ``(directory, model)``."""
    import torch

    import viq
    from viq import ViQModel

    model = ViQModel.from_config("viq-test", seed=0)
    last = model.head.fsq_in if model.head.fsq_in is not None else model.head.project_in
    with torch.no_grad():
        last.weight.mul_(40.0)
    path = tmp_path_factory.mktemp("lively") / "viq-lively"
    model.save_pretrained(path)
    return path, viq.load(path)


@pytest.fixture(scope="module")
def model_dir(lively) -> Path:
    return lively[0]


@pytest.fixture(scope="module")
def test_model(lively):
    return lively[1]


@pytest.fixture(scope="module")
def page(model_dir, images, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("show-page") / "page.html"
    # docs/show.md's command (paths substituted)
    assert (
        main(
            [
                "show",
                str(model_dir),
                str(images),
                "--limit",
                "4",
                "--top-codes",
                "6",
                "-o",
                str(out),
                "-q",
                "--device",
                "cpu",
            ]
        )
        == 0
    )
    return out


def _sections(html_text: str) -> list[dict[str, str]]:
    """The data-* attributes of every image card, in page order."""
    out = []
    for m in re.finditer(r'<section class="card" id="img(\d+)"([^>]*)>', html_text):
        out.append(dict(re.findall(r'data-([a-z]+)="([^"]*)"', m.group(2))) | {"i": m.group(1)})
    return out


def _card_html(html_text: str, i: int) -> str:
    start = html_text.index(f'<section class="card" id="img{i}"')
    return html_text[start : html_text.index("</section>", start)]


def _codes_of(section: dict[str, str]) -> np.ndarray:
    raw = base64.b64decode(section["codes"])
    flat = np.frombuffer(raw, dtype=f"<u{section['bytes']}")
    return flat.reshape(int(section["h"]), int(section["w"]), int(section["c"]))


def test_page_figures_equal_eval_recon(page, model_dir, images, tmp_path):
    result_path = tmp_path / "r.json"
    assert (
        main(
            [
                "eval-recon",
                str(model_dir),
                str(images),
                "--json",
                str(result_path),
                "-q",
                "--device",
                "cpu",
                "--qualities",
                "50",
            ]
        )
        == 0
    )
    records = json.loads(result_path.read_text())["images"]
    text = page.read_text()
    sections = _sections(text)
    assert len(sections) == len(records) == len(SIZES)
    assert text.count('<div class="code">') == 6  # --top-codes 6
    for section, record in zip(sections, records):
        assert float(section["psnr"]) == record["psnr"]
        assert float(section["ssim"]) == record["ssim"]
        assert float(section["bpp"]) == record["bpp"]
        assert [int(section["h"]), int(section["w"])] == record["grid"]


def test_code_maps_equal_model_encode(page, test_model, images):
    """The hover data is the model's indices, and the drawn map colours every code by its FSQ values."""
    import viq

    text = page.read_text()
    files = sorted(p for p in images.rglob("*.png"))
    by_name = {str(p): p for p in files}
    for section in _sections(text):
        card = _card_html(text, int(section["i"]))
        source = re.search(r"<h3>\d+\. ([^<]*)</h3>", card).group(1)
        expected = test_model.encode([viq.formats.image.load_image(by_name[source])])[0].indices.numpy()
        codes = _codes_of(section)
        np.testing.assert_array_equal(codes, expected)
        assert len(np.unique(codes)) > 4  # a map of one colour would prove nothing
        # the combined map: patch (y, x) is a rows x cols block, slot j at (j // cols, j % cols)
        uri = re.search(r'class="codemap px" data-slot="-1" src="data:image/png;base64,([^"]+)"', card).group(1)
        drawn = np.asarray(Image.open(io.BytesIO(base64.b64decode(uri))).convert("RGB"))
        h, w, c = codes.shape
        rows, cols = slot_grid(c)
        assert drawn.shape == (h * rows, w * cols, 3)
        colours = code_colours(codes, test_model.levels)
        for j in range(c):
            np.testing.assert_array_equal(drawn[j // cols :: rows, j % cols :: cols], colours[:, :, j])


def test_page_shows_the_baselines_beside_the_figures(page, test_model, images):
    """Each image's PSNR stands beside bicubic at equal bits (a thumbnail worth the codes' payload bits) and
    the mean colour, scored by the same function; the page's summary has their means."""
    import viq
    from viq.eval.baselines import bicubic_at_bits
    from viq.eval.recon import psnr_ssim
    from viq.formats.image import PreprocessConfig, preprocess

    text = page.read_text()
    by_name = {str(p): p for p in images.rglob("*.png")}
    for section in _sections(text):
        card = _card_html(text, int(section["i"]))
        source = re.search(r"<h3>\d+\. ([^<]*)</h3>", card).group(1)
        reference = preprocess(by_name[source], PreprocessConfig(patch_size=test_model.patch_size)).pixels
        codes = test_model.encode([viq.formats.image.load_image(by_name[source])])[0]
        bits = codes.num_codes * codes.bits_per_code
        assert float(section["bicubic"]) == psnr_ssim(reference, bicubic_at_bits(reference, bits))[0]
        assert "bicubic at equal bits:" in card and "mean colour:" in card
    assert "PSNR dB, bicubic at equal bits" in text and "PSNR dB, mean colour" in text


def test_python_example_of_the_docs(model_dir, images, tmp_path, monkeypatch):
    """docs/show.md's "From Python" block, as written (file names substituted)."""
    import viq
    from viq.eval.show import render_page, show_images

    monkeypatch.chdir(tmp_path)
    model = viq.load(model_dir)
    views = show_images(model, [images / "a.png", images / "tall.png"])
    open("page.html", "w").write(render_page(views, title="my images"))
    text = (tmp_path / "page.html").read_text()
    assert len(_sections(text)) == 2 and "<title>my images</title>" in text
    assert [v.size for v in views] == [SIZES["a.png"], SIZES["tall.png"]]


def test_page_is_self_contained(page):
    text = page.read_text()
    refs = re.findall(r'(?:src|href)="([^"]*)"', text)
    assert refs and all(r.startswith("data:") or r.startswith("#") for r in refs), [r[:40] for r in refs]
    assert "url(" not in text and "@import" not in text and "fetch(" not in text
    assert "default-src 'none'" in text  # the browser itself refuses anything else


def test_code_colours_follow_fsq_values():
    levels = (8, 8, 8, 5, 5, 5)
    k = int(np.prod(levels))
    idx = np.arange(k)
    values = code_values(idx, levels)
    assert values.min() == -1 and values.max() <= 1 and values.shape == (k, 6)
    colours = code_colours(idx, levels).astype(int)
    # equal codes, equal colours; one level step in one channel moves one colour channel a little
    assert (code_colours(np.array([123, 123]), levels)[0] == code_colours(np.array([123]), levels)[0]).all()
    step = np.abs(colours[1] - colours[0])
    assert step.sum() > 0 and step.max() <= 64
    import torch

    from viq.model.quantizer import FSQ

    np.testing.assert_allclose(values, FSQ(levels).indices_to_codes(torch.arange(k)).numpy(), atol=1e-6)


def test_codebook_counter_per_head():
    from viq.formats.codes import Codes

    levels = (4, 4)
    c = Codes(np.array([[[0, 1, 2, 3], [0, 1, 2, 2]]]), levels=levels)
    counter = CodebookCounter(levels, 4)
    counter.add(c)
    s = counter.summary(top=3)
    assert s["codes"] == 8 and s["overall"]["used"] == 4 and s["overall"]["dead"] == 12
    assert [h["used"] for h in s["heads"]] == [1, 1, 1, 2]
    assert s["heads"][0]["entropy_bits"] == 0 and s["heads"][3]["entropy_bits"] == pytest.approx(1.0)
    assert [t["index"] for t in s["top"]] == [2, 0, 1] and s["top"][0]["count"] == 3
    with pytest.raises(ValueError, match="do not match"):
        counter.add(Codes(np.zeros((1, 1, 4), dtype=np.int64), levels=(8, 8)))


def test_show_failures_and_store(model_dir, images, tmp_path, capsys):
    broken = tmp_path / "in"
    shutil.copytree(images, broken)
    (broken / "broken.png").write_text("not a PNG\n")
    out = tmp_path / "p.html"
    assert main(["show", str(model_dir), str(broken), "-o", str(out), "-q", "--device", "cpu"]) == 1
    err = capsys.readouterr().err
    assert "broken.png" in err and len(_sections(out.read_text())) == len(SIZES)
    # nothing to show: a clear error, no page
    empty = tmp_path / "empty"
    empty.mkdir()
    assert main(["show", str(model_dir), str(empty), "-o", str(tmp_path / "none.html"), "-q", "--device", "cpu"]) == 1
    assert "no images to show" in capsys.readouterr().err and not (tmp_path / "none.html").exists()

    # a code store: the reconstructions and code maps of its records, and its codebook page
    store = tmp_path / "codes.store"
    assert main(["extract", str(model_dir), str(images), "-o", str(store), "-q", "--device", "cpu"]) == 0
    capsys.readouterr()
    assert main(["show", str(model_dir), str(store), "-o", str(out), "--limit", "2", "-q", "--device", "cpu"]) == 0
    sections = _sections(out.read_text())
    assert len(sections) == 2 and all(s["psnr"] == "None" for s in sections)
    cb = tmp_path / "codebook.html"
    assert main(["store", "stats", str(store), "--page", str(cb), "-q"]) == 0
    assert f"page:        {cb}" in capsys.readouterr().out
    text = cb.read_text()
    assert "head 3" in text and "dead" in text and "<img" not in text
    # the page's histograms are counted in the statistics' one pass: the same as decoding every record again
    from viq.eval.codebook import CodebookCounter
    from viq.store import CodeStore

    st = CodeStore.open(store)
    one_pass, by_record = (CodebookCounter(st.levels, st.codes_per_patch) for _ in range(2))
    st.stats(each=one_pass.add_indices)
    for i in range(len(st)):
        by_record.add(st.get_at(i))
    assert one_pass.images == by_record.images == len(st) > 0
    assert np.array_equal(one_pass.counts, by_record.counts) and one_pass.counts.sum() > 0


def _chromium() -> str | None:
    for name in (os.environ.get("VIQ_CHROMIUM"), "chromium", "chromium-browser", "google-chrome", "chrome"):
        if name and (path := shutil.which(name)):
            return path
    return None


def test_page_in_a_real_browser(page, test_model, images, tmp_path):
    """Headless Chromium (the system's, driven by playwright): every picture decodes, nothing is fetched but
    the page itself, no script error, and hovering a cell of a code map names that patch's code."""
    chromium = _chromium()
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        sync_playwright = None
    if chromium is None or sync_playwright is None:
        missing = "Chromium (apt-get install chromium)" if chromium is None else "playwright (pip install playwright)"
        if os.environ.get("CI"):
            pytest.fail(f"the browser test must run in CI: {missing} is not installed")
        pytest.skip(f"browser test: install {missing}")
    text = page.read_text()
    sections = _sections(text)
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium, args=["--no-sandbox"])
        try:
            tab = browser.new_page(viewport={"width": 1200, "height": 900})
            requests, errors = [], []
            tab.on("request", lambda r: requests.append(r.url))
            tab.on("pageerror", lambda e: errors.append(str(e)))
            tab.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
            tab.goto(page.as_uri())
            widths = tab.evaluate("Promise.all([...document.images].map(i => i.decode().then(() => i.naturalWidth)))")
            assert len(widths) == text.count("<img ") and all(w > 0 for w in widths)
            for section in sections:
                codes = _codes_of(section)
                h, w, c = codes.shape
                rows, cols = slot_grid(c)
                for slot, (y, x, j) in (
                    (-1, (h - 1, w // 2, c - 1)),
                    (-1, (0, 0, 1 % c)),
                    (c - 1, (h // 2, w - 1, c - 1)),
                ):
                    image = tab.locator(f'#img{section["i"]} img.codemap[data-slot="{slot}"]')
                    image.scroll_into_view_if_needed()
                    box = image.bounding_box()
                    if slot < 0:  # the centre of cell (y * rows + j // cols, x * cols + j % cols)
                        fy, fx = (y * rows + j // cols + 0.5) / (h * rows), (x * cols + j % cols + 0.5) / (w * cols)
                    else:
                        fy, fx = (y + 0.5) / h, (x + 0.5) / w
                    tab.mouse.move(box["x"] + fx * box["width"], box["y"] + fy * box["height"])
                    tip = tab.locator("#tip")
                    assert tip.is_visible()
                    assert tip.get_attribute("data-patch") == f"{y},{x},{j}"
                    assert int(tip.get_attribute("data-code")) == int(codes[y, x, j])
                    assert f"code {int(codes[y, x, j])} · patch ({y}, {x}) · head {j}" in tip.text_content()
            tab.mouse.move(2, 2)
            assert not tab.locator("#tip").is_visible()
            shot = tmp_path / "page.png"
            tab.screenshot(path=str(shot), full_page=True)
            assert Image.open(shot).size[0] == 1200
            print(f"screenshot: {shot}")
        finally:
            browser.close()
    assert all(u == page.as_uri() or u.startswith("data:") for u in requests), requests
    assert not errors, errors


def test_show_a_release_in_the_official_format(tmp_path):
    """A released model as the authors publish it (the official .pth layout; the golden fixture at tiny
    width): the page of its own test images, every image with its code maps and finite figures, the codes
    the model's own."""
    import viq
    from conftest import require_official_fixture

    official = require_official_fixture()
    images = tmp_path / "images"
    images.mkdir()
    for path in sorted(official.glob("img*.png")):
        shutil.copy(path, images / path.name)
    out = tmp_path / "page.html"
    assert main(["show", str(official), str(images), "-o", str(out), "--num-heads", "4", "-q", "--device", "cpu"]) == 0
    text = out.read_text()
    sections = _sections(text)
    assert len(sections) == len(list(images.iterdir())) == 5
    assert all(float(s["psnr"]) > 0 and 0 < float(s["ssim"]) <= 1 and float(s["bpp"]) > 0 for s in sections)
    model = viq.load(official, num_heads=4, components=["encoder"])
    first = sorted(images.iterdir())[0]
    expected = model.encode([viq.formats.image.load_image(first)])[0].indices.numpy()
    np.testing.assert_array_equal(_codes_of(sections[0]), expected)
