"""``viq eval-recon``: the table, --json / --plot / --grid files, folders, failures and exit codes."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from train_helpers import texture
from viq.cli.main import main

pytest.importorskip("torchmetrics")
pytest.importorskip("matplotlib")

# name -> (height, width); none a multiple of 16, so every image is padded before encoding
GOOD = {"a.png": (40, 72), "sub/b.jpg": (52, 60)}


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("images")
    for i, (name, (h, w)) in enumerate(GOOD.items()):
        (d / name).parent.mkdir(parents=True, exist_ok=True)
        texture(h, w, i).save(d / name)
    (d / "sub" / "broken.png").write_text("this is not a PNG file\n")
    (d / ".hidden.png").write_text("ignored: hidden")
    (d / "notes.txt").write_text("ignored: not an image")
    return d


def test_eval_recon_folder_outputs_and_failures(capsys, model_dir, images, tmp_path):
    out = tmp_path / "results"  # created by the command
    code = main(
        [
            "eval-recon",
            str(model_dir),
            str(images),
            "--json",
            str(out / "r.json"),
            "--plot",
            str(out / "rd.png"),
            "--grid",
            str(out / "grid.png"),
            "--qualities",
            "5,40",
            "--fid-features",
            "viq",
            "-q",
            "--device",
            "cpu",
        ]
    )
    captured = capsys.readouterr()
    assert code == 1  # the broken file
    assert "broken.png" in captured.err and "not a recognised image format" in captured.err
    assert ".hidden" not in captured.err and "notes.txt" not in captured.err
    table = captured.out
    assert table.splitlines()[0].split()[:6] == ["method", "bpp", "PSNR", "dB", "SSIM", "seams"]
    assert [line.split()[0] for line in table.splitlines()[1:4]] == ["ViQ", "JPEG", "WebP"]
    assert "rFID (viq features):" in table

    result = json.loads((out / "r.json").read_text())
    for key in ("n", "bpp", "psnr", "ssim", "rfid", "jpeg", "webp", "usage", "curves", "images", "failed"):
        assert key in result, key
    for codec in ("jpeg", "webp"):
        assert {"bpp", "psnr", "ssim", "seams", "quality", "matched", "status"} <= set(result[codec])
        assert [p["quality"] for p in result["curves"][codec]] == [5, 40]
    assert result["n"] == 2 and len(result["images"]) == 2
    assert sorted(Path(r["source"]).name for r in result["images"]) == ["a.png", "b.jpg"]
    assert [Path(f["source"]).name for f in result["failed"]] == ["broken.png"]
    assert result["rfid"] is not None and result["rfid"] >= 0
    for r in result["images"]:
        h, w = r["size"]
        assert (h, w) in GOOD.values()
        assert r["bpp"] == pytest.approx(8 * r["bytes"] / (h * w))  # over the encoded pixels, not the canvas
        assert r["grid"] == [-(-h // 16), -(-w // 16)]
    assert result["bpp"] == pytest.approx(np.mean([r["bpp"] for r in result["images"]]))
    assert result["psnr"] == pytest.approx(np.mean([r["psnr"] for r in result["images"]]))
    # the printed table shows the same means as the JSON
    viq_row = table.splitlines()[1].split()
    assert float(viq_row[2]) == pytest.approx(result["bpp"], abs=1e-4)
    assert float(viq_row[3]) == pytest.approx(result["psnr"], abs=0.01)

    for name in ("rd.png", "grid.png"):
        with Image.open(out / name) as im:
            assert im.format == "PNG" and im.width > 100 and im.height > 50
    with Image.open(out / "grid.png") as im:  # two rows: input | reconstruction | JPEG
        assert im.height == 2 * (192 + 14 + 4)


def test_eval_recon_single_file_succeeds_without_fid(capsys, model_dir, images, tmp_path):
    code = main(
        [
            "eval-recon",
            str(model_dir),
            str(images / "a.png"),
            "--qualities",
            "10",
            "--max-pixels",
            "1024",
            "--json",
            str(tmp_path / "r.json"),
            "-q",
        ]
    )
    captured = capsys.readouterr()
    assert code == 0, captured.err
    result = json.loads((tmp_path / "r.json").read_text())
    assert result["n"] == 1 and result["rfid"] is None and result["fid_features"] is None
    # --max-pixels 1024: 40x72 (2880 px) is downscaled to at most 1024 px, aspect kept
    h, w = result["images"][0]["size"]
    assert h * w <= 1024 and abs(w / h - 72 / 40) < 0.1
    assert "rFID" not in captured.out


def test_eval_recon_usage_errors(capsys, model_dir, images, tmp_path):
    assert main(["eval-recon", str(model_dir), str(images), "--fid-features", "inception"]) == 2
    assert "--fid-features inception: unknown feature extractor" in capsys.readouterr().err
    assert main(["eval-recon", str(model_dir), str(images), "--fid-features", "hf:no-such-org/no-model-viq"]) == 2
    assert "never downloads" in capsys.readouterr().err
    assert main(["eval-recon", str(tmp_path / "missing-model"), str(images)]) == 2
    assert "cannot load model" in capsys.readouterr().err
    assert main(["eval-recon", str(model_dir), str(images), "--qualities", "0,50"]) == 2
    assert main(["eval-recon", str(model_dir), str(tmp_path / "nothing.png"), "-q"]) == 1
    assert "nothing.png: no such file or folder" in capsys.readouterr().err
