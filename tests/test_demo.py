"""viq demo end to end at a tiny scale: every stage runs, the report is written."""

from __future__ import annotations

import json

import viq
from viq.demo.run import run_demo


def test_demo_end_to_end(tmp_path, monkeypatch):
    report = run_demo(tmp_path / "demo", scale=0.02, seed=1)
    assert report.is_file()
    text = report.read_text()
    for section in (
        "Training stages",
        "Loss curves",
        "input | reconstruction",
        "Held-out questions",
        "blank image",
        "bicubic at equal bits",
    ):
        assert section in text
    results = json.loads((tmp_path / "demo" / "results.json").read_text())
    assert set(results["stages"]) == {"stage1", "stage2_1", "stage2_2", "drawer"}
    # The documented results.json keys, with every figure beside its baselines.
    for name in ("stage1", "final"):
        qa = results["qa"][name]
        assert qa["n"] >= 24 and all(0 <= qa[k] <= 1 for k in ("real", "blank", "shuffled", "majority"))
        assert qa["per_task"] and all(lo <= hi for lo, hi in qa["ci95"].values())
    for name in ("synthetic", "photos"):
        recon = results["recon"][name]
        assert recon["n"] > 0
        for key in ("psnr", "ssim", "psnr_mean_colour", "psnr_bicubic_equal_bits", "psnr_codec"):
            assert recon[key] is not None and recon[key] > 0, key
        # seams beside bicubic's and the codec's (the tiny demo's images all hold a grid line)
        assert recon["seam_period"] == 8
        assert all(recon[k] > 0 for k in ("seams", "seams_bicubic_equal_bits", "seams_codec"))
    codes = results["codes"]
    assert 0 <= codes["entropy_bits"] <= codes["log2_codebook"] == 12 and 0 < codes["usage"] <= 1
    assert results["time_s"] > 0
    assert any(r["kind"] == "photo" for r in results["reconstructions"])
    model = viq.load(tmp_path / "demo" / "runs" / "drawer" / "final")
    assert {"encoder", "embedder", "drawer", "vae"} <= set(model.components)
    # Re-running reuses every finished stage: no stage trains again, their outputs stay as they were,
    # and the report is rebuilt from them with the same figures.
    finals = {
        stage: (tmp_path / "demo" / "runs" / stage / "final" / "model.safetensors").stat().st_mtime_ns
        for stage in results["stages"]
    }
    calls = []
    from viq.train import engine

    monkeypatch.setattr(engine, "train", lambda *a, **k: calls.append(a))
    run_demo(tmp_path / "demo", scale=0.02, seed=1)
    assert calls == []
    assert {
        stage: (tmp_path / "demo" / "runs" / stage / "final" / "model.safetensors").stat().st_mtime_ns
        for stage in results["stages"]
    } == finals
    again = json.loads((tmp_path / "demo" / "results.json").read_text())
    assert again["qa"] == results["qa"] and again["recon"] == results["recon"] and again["codes"] == results["codes"]


def test_synth_demo_makes_fresh_sets_with_the_demos_mix(tmp_path):
    """``viq synth --demo``: the demo's task mix at another seed (the fresh-seed test set of docs/training.md)."""
    from viq.cli.main import main
    from viq.demo.run import TASK_WEIGHTS
    from viq.demo.synthetic import load_split

    out = tmp_path / "fresh"
    assert main(["synth", str(out), "--demo", "--seed", "1", "--train", "0", "--val", "0", "--test", "40"]) == 0
    test = load_split(out, "test")
    assert len(test) == 40 and {r["task"] for r in test} == set(TASK_WEIGHTS)
    from PIL import Image

    assert all(
        48 <= min(Image.open(out / r["image"]).size) and max(Image.open(out / r["image"]).size) <= 64 for r in test
    )
    assert all(len(r["conversations"]) == 2 and "image" in r for r in test)
    # Another seed, other images; the same seed again, the same set (and no overwrite without the flag).
    assert main(["synth", str(out), "--demo", "--seed", "1", "--train", "0", "--val", "0", "--test", "40"]) == 1
    again = tmp_path / "again"
    assert main(["synth", str(again), "--demo", "--seed", "1", "--train", "0", "--val", "0", "--test", "40"]) == 0
    assert (again / "test.jsonl").read_text() == (out / "test.jsonl").read_text()


def test_demo_without_standin(tmp_path):
    """bench/demo_without_standin.py: the same demo with a random encoder in place of the SigLIP stand-in
    (everything else copied), both runs' figures in one record."""
    import torch
    from safetensors.torch import load_file

    from bench import demo_without_standin
    from viq.model.config import get_preset
    from viq.model.viq import ViQModel

    run_demo(tmp_path / "demo", scale=0.02, seed=1)
    work = tmp_path / "variant"
    record = demo_without_standin.main(
        [
            str(tmp_path / "demo"),
            "--work",
            str(work),
            "--scale",
            "0.02",
            "--seed",
            "1",
            "--out",
            str(tmp_path / "r.json"),
        ]
    )
    fresh = ViQModel.from_config(get_preset("viq-demo"), seed=1).encoder.state_dict()
    standin, variant = (load_file(p / "init" / "model.safetensors") for p in (tmp_path / "demo", work))
    key = (
        "encoder.patch_embed.proj.weight"
        if "encoder.patch_embed.proj.weight" in variant
        else next(k for k in variant if k.startswith("encoder."))
    )
    assert torch.equal(variant[key], fresh[key.removeprefix("encoder.")])
    assert not torch.equal(variant[key], standin[key])
    assert all(torch.equal(variant[k], standin[k]) for k in variant if not k.startswith("encoder."))
    for label in ("with_standin", "without_standin"):
        final = record[label]["final"]
        assert 0 <= final["all"] <= 1 and final["per_task"] and record[label]["recon_psnr"]["synthetic"] > 0
    assert (work / "results.json").is_file() and (tmp_path / "r.json").is_file()
