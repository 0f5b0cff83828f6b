"""Tests for the ``viq`` command line (viq.cli): encode, decode, info, convert, synth, store, train-mllm."""

from __future__ import annotations

import json
import logging
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import viq
from viq.cli.main import main
from viq.formats.codes import Codes

# name -> (height, width) of the good images written by the ``images`` fixture
GOOD = {"a.png": (1, 1), "b.jpg": (17, 300), "sub/c.png": (50, 40), "sub/deeper/D.BMP": (20, 33)}
BAD = ("empty.png", "text.png", "trunc.jpg")


def _noise(h: int, w: int, seed: int) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8))


@pytest.fixture(scope="module")
def encoder(model_dir):
    return viq.load(model_dir, components=("encoder",))


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("images")
    for i, (name, (h, w)) in enumerate(GOOD.items()):
        (d / name).parent.mkdir(parents=True, exist_ok=True)
        _noise(h, w, i).save(d / name)
    (d / "empty.png").write_bytes(b"")
    (d / "text.png").write_text("this is not a PNG file\n")
    jpeg = d / "trunc.jpg"
    _noise(64, 64, 99).save(jpeg, quality=90)
    data = jpeg.read_bytes()
    jpeg.write_bytes(data[: len(data) // 2])
    (d / "notes.txt").write_text("ignored: not an image extension")
    (d / ".hidden.png").write_text("ignored: hidden")
    return d


@pytest.fixture(scope="module")
def encoded(tmp_path_factory, model_dir, images) -> Path:
    """``viq encode -r`` of the image folder (asserted in test_encode_folder)."""
    out = tmp_path_factory.mktemp("codes")
    assert main(["encode", str(model_dir), str(images), "-o", str(out), "-r"]) == 1
    return out


def _viq_files(folder: Path) -> list[str]:
    return sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*.viq"))


def _stem_viq(name: str) -> str:
    return str(Path(name).with_suffix(".viq").as_posix())


# ------------------------------------------------------------------------------------------ general


def test_version_subprocess():
    r = subprocess.run([sys.executable, "-m", "viq", "--version"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == f"viq {viq.__version__}"


def test_help_and_usage_errors(capsys, tmp_path):
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    assert "examples:" in out and "encode" in out and "convert" in out
    for cmd in ("encode", "decode", "info", "convert"):
        assert main([cmd, "--help"]) == 0
        assert "examples:" in capsys.readouterr().out
    assert main([]) == 2
    assert main(["encode", "m", "x.png"]) == 2  # -o missing
    assert main(["encode", "m", "x.png", "-o", str(tmp_path), "--batch-tokens", "0"]) == 2
    assert main(["convert", "a", "b", "--levels", "8,x"]) == 2
    assert "usage:" in capsys.readouterr().err


def test_unloadable_model_is_a_usage_error(capsys, tmp_path, images):
    missing = tmp_path / "no-such-model"
    assert main(["encode", str(missing), str(images / "a.png"), "-o", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "cannot load model" in err and str(missing) in err
    assert not (tmp_path / "out").exists()


# ------------------------------------------------------------------------------------------ encode


def test_encode_folder(capsys, caplog, tmp_path, model_dir, images, encoder):
    out = tmp_path / "codes"
    caplog.set_level(logging.INFO, logger="viq")
    assert main(["encode", str(model_dir), str(images), "-o", str(out), "-r"]) == 1
    err = capsys.readouterr().err
    assert _viq_files(out) == sorted(_stem_viq(n) for n in GOOD)
    assert "encoded 4, skipped 0 (exist), failed 3" in err
    for bad in BAD:
        # once when it happens, once in the final list
        assert err.count(str(images / bad)) == 2, err
        assert any(r.levelno == logging.ERROR and str(images / bad) in r.getMessage() for r in caplog.records)
    assert "notes.txt" not in err and ".hidden" not in err

    fingerprint = encoder.fingerprint()
    for name, (h, w) in GOOD.items():
        codes = Codes.load(out / _stem_viq(name))
        expected = encoder.encode([images / name])[0]
        assert codes.same_codes(expected), name
        assert codes.metadata == {"model": fingerprint, "source": str(images / name), "source_size": [w, h]}
    assert Codes.load(out / "a.viq").image_size == (16, 16)  # 1x1 is upscaled to the 256-pixel minimum
    assert Codes.load(out / "b.viq").image_size == (17, 300)

    # a rerun skips what exists and still reports the bad files
    mtimes = {p: p.stat().st_mtime_ns for p in out.rglob("*.viq")}
    assert main(["encode", str(model_dir), str(images), "-o", str(out), "-r"]) == 1
    assert "encoded 0, skipped 4 (exist), failed 3" in capsys.readouterr().err
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*.viq")} == mtimes

    # --overwrite re-encodes (same codes); --quiet hides the summary but not the errors
    (out / "b.viq").write_bytes(b"junk")
    assert main(["encode", str(model_dir), str(images), "-o", str(out), "-r", "--overwrite", "--quiet"]) == 1
    err = capsys.readouterr().err
    assert "encoded" not in err and str(images / "empty.png") in err
    assert Codes.load(out / "b.viq").same_codes(encoder.encode([images / "b.jpg"])[0])
    assert main(["encode", str(model_dir), str(images), "-o", str(out), "-r", "--overwrite"]) == 1
    assert "encoded 4, skipped 0 (exist), failed 3" in capsys.readouterr().err


def test_encode_files_batching_and_options(capsys, tmp_path, model_dir, images, encoder):
    good = [str(images / n) for n in GOOD]
    # non-recursive folder: only the top-level images; --batch-tokens 1: one image per forward pass
    out = tmp_path / "top"
    assert main(["encode", str(model_dir), str(images), "-o", str(out), "--batch-tokens", "1"]) == 1
    assert _viq_files(out) == ["a.viq", "b.viq"]
    assert Codes.load(out / "b.viq").same_codes(encoder.encode([images / "b.jpg"])[0])
    capsys.readouterr()

    # plain files go to OUTDIR/<stem>.viq; only good files -> exit 0
    out = tmp_path / "files"
    assert main(["encode", str(model_dir), *good, "-o", str(out), "--attention", "sdpa", "--dtype", "float32"]) == 0
    assert _viq_files(out) == ["D.viq", "a.viq", "b.viq", "c.viq"]
    assert "encoded 4, skipped 0 (exist), failed 0" in capsys.readouterr().err

    # preprocessing options are applied
    out = tmp_path / "square"
    assert main(["encode", str(model_dir), good[1], "-o", str(out), "--square", "32"]) == 0
    assert Codes.load(out / "b.viq").image_size == (32, 32)
    assert main(["encode", str(model_dir), good[1], "-o", str(out), "--square", "31", "--overwrite"]) == 2
    assert "square" in capsys.readouterr().err


def test_encode_output_collisions(capsys, tmp_path, model_dir):
    d1, d2 = tmp_path / "d1", tmp_path / "d2"
    d1.mkdir()
    d2.mkdir()
    _noise(20, 20, 1).save(d1 / "x.png")
    _noise(20, 20, 2).save(d2 / "x.png")
    _noise(20, 20, 3).save(d1 / "x.jpg")
    out = tmp_path / "out"
    # d1/x.jpg and d1/x.png (same folder) and d2/x.png (another input) all want out/x.viq
    argv = ["encode", str(model_dir), str(d1), str(d2 / "x.png"), str(d1 / "x.jpg"), "-o", str(out)]
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert "encoded 1, skipped 0 (exist), failed 2" in err
    assert f"{d1 / 'x.png'}: output {out / 'x.viq'} would also be written for {d1 / 'x.jpg'}" in err
    assert f"{d2 / 'x.png'}: output" in err
    assert Codes.load(out / "x.viq").metadata["source"] == str(d1 / "x.jpg")  # the first one, not overwritten
    # the same file named twice is simply encoded once
    out2 = tmp_path / "out2"
    assert main(["encode", str(model_dir), str(d2 / "x.png"), str(d2), "-o", str(out2)]) == 0
    assert "encoded 1, skipped 0 (exist), failed 0" in capsys.readouterr().err
    # a missing input is a failure, the rest is still done
    assert main(["encode", str(model_dir), str(tmp_path / "nope.png"), str(d2), "-o", str(tmp_path / "out3")]) == 1
    err = capsys.readouterr().err
    assert f"{tmp_path / 'nope.png'}: no such file or folder" in err and "encoded 1," in err


# ------------------------------------------------------------------------------------------ decode


def test_decode(capsys, tmp_path, model_dir, encoded):
    out = tmp_path / "png"
    assert main(["decode", str(model_dir), str(encoded), "-o", str(out), "-r"]) == 0
    err = capsys.readouterr().err
    assert "decoded 4, skipped 0 (exist), failed 0" in err
    assert "different model" not in err  # a drawer-only load must still recognise its own codes
    for name in GOOD:
        codes = Codes.load(encoded / _stem_viq(name))
        with Image.open(out / Path(name).with_suffix(".png")) as im:
            assert im.format == "PNG" and im.mode == "RGB"
            assert im.size == (codes.image_size[1], codes.image_size[0]), name

    assert main(["decode", str(model_dir), str(encoded), "-o", str(out), "-r"]) == 0
    assert "decoded 0, skipped 4 (exist), failed 0" in capsys.readouterr().err

    # --no-crop: the padded canvas, a multiple of the patch size
    assert main(["decode", str(model_dir), str(encoded / "b.viq"), "-o", str(out), "--no-crop", "--overwrite"]) == 0
    with Image.open(out / "b.png") as im:
        assert im.size == (304, 32)


def test_decode_corrupt_file(capsys, tmp_path, model_dir, encoded):
    src = tmp_path / "codes"
    shutil.copytree(encoded, src)
    data = bytearray((src / "b.viq").read_bytes())
    data[-8] ^= 0xFF  # a payload byte: CRC mismatch
    (src / "b.viq").write_bytes(bytes(data))
    (src / "sub" / "zero.viq").write_bytes(b"")
    out = tmp_path / "png"
    assert main(["decode", str(model_dir), str(src), "-o", str(out), "-r"]) == 1
    err = capsys.readouterr().err
    assert f"{src / 'b.viq'}: checksum mismatch" in err
    assert str(src / "sub" / "zero.viq") in err
    assert "decoded 3, skipped 0 (exist), failed 2" in err
    assert sorted(p.relative_to(out).as_posix() for p in out.rglob("*.png")) == [
        "a.png",
        "sub/c.png",
        "sub/deeper/D.png",
    ]


def test_decode_codes_from_another_model_warns(capsys, tmp_path, encoded):
    other = tmp_path / "other"
    # (a stored model without its encoder cannot tell which encoder its codes should come from)
    viq.ViQModel.from_config("viq-test", seed=1).save_pretrained(other)
    assert main(["decode", str(other), str(encoded / "a.viq"), str(encoded / "b.viq"), "-o", str(tmp_path / "o")]) == 0
    err = capsys.readouterr().err
    assert f"{encoded / 'a.viq'}: codes come from a different model" in err
    assert "2 files come from a different model" in err
    assert (tmp_path / "o" / "b.png").is_file()


def test_decode_needs_drawer(capsys, tmp_path, encoded):
    enc_only = tmp_path / "enc"
    viq.ViQModel.from_config("viq-test", seed=0, components=("encoder",)).save_pretrained(enc_only)
    assert main(["decode", str(enc_only), str(encoded), "-o", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert "cannot load model" in err and str(enc_only) in err and "drawer" in err


# ------------------------------------------------------------------------------------------ info


def test_info_codes(capsys, encoded, encoder):
    path = encoded / "b.viq"
    assert main(["info", str(path)]) == 0
    out = capsys.readouterr().out
    for text in ("8,8,4,4,4", "4096", "2 x 19", "152", "17 x 300", encoder.fingerprint(), "bits per pixel"):
        assert text in out, text

    assert main(["info", str(path), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    size = path.stat().st_size
    assert info["levels"] == [8, 8, 4, 4, 4] and info["codebook_size"] == 4096 and info["bits_per_code"] == 12
    assert info["grid"] == [2, 19] and info["num_codes"] == 152 and info["image_size"] == [17, 300]
    assert info["file_size"] == size
    assert info["bpp_file"] == pytest.approx(size * 8 / (17 * 300))
    assert info["bpp_payload"] == pytest.approx(152 * 12 / (17 * 300))
    assert info["metadata"]["model"] == encoder.fingerprint()


def test_info_errors(capsys, tmp_path):
    bad = tmp_path / "bad.viq"
    bad.write_bytes(b"VIQC\x01\x00")
    assert main(["info", str(bad)]) == 1
    assert str(bad) in capsys.readouterr().err
    assert main(["info", str(tmp_path / "missing")]) == 2
    assert main(["info", str(tmp_path)]) == 2  # a folder that is no model
    assert "neither" in capsys.readouterr().err


def test_info_model(capsys, model_dir, encoder):
    assert main(["info", str(model_dir)]) == 0
    out = capsys.readouterr().out
    for text in ("viq-test", "8,8,4,4,4", "encoder, dequant, recon, embedder, drawer, vae", encoder.fingerprint()):
        assert text in out, text

    assert main(["info", str(model_dir), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    full = viq.load(model_dir)
    assert info["format"] == "viq" and info["name"] == "viq-test"
    assert (info["width"], info["depth"], info["num_heads"]) == (32, 2, 2)
    assert info["components"] == list(full.components)
    assert info["fingerprint"] == full.fingerprint()
    assert info["parameters"]["encoder"] == sum(
        t.numel() for k, t in full.state_dict().items() if k.startswith(("encoder.", "head."))
    )
    assert info["total_parameters"] == sum(t.numel() for t in full.state_dict().values())


# ------------------------------------------------------------------------------------------ convert


def test_convert_official_then_encode_identically(capsys, tmp_path, official_dir):
    # official_dir (conftest): skipped without the golden fixture, a failure in CI
    out = tmp_path / "converted"
    # the fixture's width (64) is not an official one: the head count must be given
    assert main(["convert", str(official_dir), str(out)]) == 2
    assert "--num-heads" in capsys.readouterr().err
    assert main(["convert", str(official_dir), str(out), "--num-heads", "4"]) == 0
    stdout = capsys.readouterr().out
    assert str(out) in stdout and "encoder, dequant, recon, embedder, drawer, vae" in stdout
    assert (out / "config.json").is_file() and (out / "model.safetensors").is_file()
    # no silent overwrite of a non-empty folder
    assert main(["convert", str(official_dir), str(out), "--num-heads", "4"]) == 1
    assert "--overwrite" in capsys.readouterr().err

    # info on the official directory and on the converted one agree
    assert main(["info", str(official_dir), "--num-heads", "4", "--json"]) == 0
    info_official = json.loads(capsys.readouterr().out)
    assert main(["info", str(out), "--json"]) == 0
    info_converted = json.loads(capsys.readouterr().out)
    assert info_official["format"] == "official" and info_converted["format"] == "viq"
    assert info_official["levels"] == [8, 8, 8, 6, 5] and info_official["num_heads"] == 4
    for key in ("fingerprint", "components", "parameters", "config"):
        assert info_official[key] == info_converted[key], key

    images = sorted(str(p) for p in official_dir.glob("img*.png"))
    assert main(["encode", str(official_dir), *images, "-o", str(tmp_path / "a"), "--num-heads", "4"]) == 0
    assert main(["encode", str(out), *images, "-o", str(tmp_path / "b")]) == 0
    assert _viq_files(tmp_path / "a") == _viq_files(tmp_path / "b") != []
    for name in _viq_files(tmp_path / "a"):
        a, b = Codes.load(tmp_path / "a" / name), Codes.load(tmp_path / "b" / name)
        assert a == b, name  # codes and metadata (same model fingerprint)
    assert a.metadata["model"] == info_official["fingerprint"]


def test_synth_store_and_stage_check_commands(tmp_path, capsys):
    """viq synth writes the QA set; viq store verify/stats read a store; train-mllm insists on stage mllm."""
    from viq.cli.main import main as cli_main

    assert (
        cli_main(["synth", str(tmp_path / "qa"), "--train", "6", "--val", "2", "--test", "2", "--max-side", "128"]) == 0
    )
    assert (tmp_path / "qa" / "train.jsonl").is_file()
    assert cli_main(["synth", str(tmp_path / "qa"), "--train", "6"]) == 1  # refuses a non-empty folder

    import torch

    from viq.formats.codes import Codes
    from viq.store.reader import CodeStore

    store = CodeStore.create(tmp_path / "store", levels=(8, 8, 4, 4, 4), model_fingerprint="f")
    with store.writer(name="w") as w:
        w.add("a", Codes(torch.zeros(2, 2, 4, dtype=torch.int32), (8, 8, 4, 4, 4), metadata={"model": "f"}))
    assert cli_main(["store", "verify", str(tmp_path / "store")]) == 0
    capsys.readouterr()
    assert cli_main(["store", "stats", str(tmp_path / "store"), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["images"] == 1
    assert cli_main(["store", "verify", str(tmp_path / "nope")]) == 2

    recipe = tmp_path / "r.yaml"
    recipe.write_text("stage: stage1\n")
    assert cli_main(["train-mllm", "--config", str(recipe)]) == 1
