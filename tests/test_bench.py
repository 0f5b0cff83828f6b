"""The benchmark scripts run (tiny settings; no timing is asserted -- figures live in docs/benchmarks.md)."""

from __future__ import annotations

import importlib
import json

import pytest


@pytest.mark.parametrize(
    "script, argv",
    [
        (
            "encode_throughput",
            ["--num-images", "2", "--min-side", "32", "--max-side", "64", "--fixed-size", "32", "--repeats", "1"],
        ),
        ("train_efficiency", ["--seq-len", "256", "--repeats", "1"]),
        ("extract_throughput", ["--num-images", "4", "--min-side", "32", "--max-side", "64", "--workers", "0"]),
        (
            "train_step",
            [
                "--samples",
                "2",
                "--min-side",
                "32",
                "--max-side",
                "48",
                "--prompt-len",
                "4",
                "8",
                "--answer-len",
                "4",
                "8",
                "--max-length",
                "128",
                "--teacher-size",
                "32",
                "--repeats",
                "1",
            ],
        ),
    ],
)
def test_benchmark_runs(script, argv, tmp_path):
    import json
    import math

    module = importlib.import_module(f"bench.{script}")
    record = module.main([*argv, "--out", str(tmp_path / "r.json")])
    written = json.loads((tmp_path / "r.json").read_text())
    for key in ("benchmark", "date", "command", "device", "torch"):
        assert written[key], key
    assert json.loads(json.dumps(record["figures"], default=str)) == written["figures"]
    figures = record["figures"]
    # What each measures, checked where it holds by construction (never a timing).
    if script == "encode_throughput":
        assert {"packed", "padded"} <= set(figures)
        assert figures["packed"]["gflops"] <= figures["padded"]["gflops"]  # padding only adds work
        assert all(f["images_per_s"] > 0 for f in figures.values() if "images_per_s" in f)
    elif script == "train_efficiency":
        for point in figures.values():
            online, offline = point["online"], point["offline"]
            assert online["images"] == offline["images"] > 0
            assert offline["trainable_params"] < online["trainable_params"]  # no encoder in the loop
    elif script == "extract_throughput":
        assert figures and all(f["encoded"] == 4 and f["failed"] == 0 for f in figures.values())
    else:
        packed, padded = figures["packed"], figures["padded"]
        assert math.isfinite(packed["loss"]) and math.isfinite(padded["loss"])
        assert packed["patch_tokens"] <= padded["patch_tokens"]  # padding only adds patches
        assert 0 <= record["ratios"]["patch_padding_waste"] < 1


def test_load_memory_quick_mode(tmp_path, official_dir):
    """bench/load_memory.py --layout tiny (the golden fixture's shapes): each load in a fresh process."""
    import json

    from bench import load_memory as module

    work, out = tmp_path / "work", tmp_path / "load_memory.json"
    work.mkdir()
    returned = module.main(
        ["--layout", "tiny", "--loads", "official:float32", "viq:bfloat16", "--workdir", str(work), "--out", str(out)]
    )
    record = json.loads(out.read_text())
    assert record["benchmark"] == "load_memory" and record["figures"] == returned["figures"]
    assert record["config"]["layout"] == "tiny" and record["config"]["loads"] == ["official:float32", "viq:bfloat16"]
    assert record["config"]["parameters"] > 0 and "official/model_viq_fsq_16k.pth" in record["config"]["files_bytes"]
    official, converted = record["figures"]
    assert (official["format"], official["dtype"]) == ("official", "float32")
    assert (converted["format"], converted["dtype"]) == ("viq", "bfloat16")
    for fig in record["figures"]:
        size = 4 if fig["dtype"] == "float32" else 2
        assert fig["model_bytes"] >= size * fig["model_parameters"] > 0
        assert fig["peak_rss"] >= fig["baseline_rss"] > 0
        assert fig["peak_over_model"] == pytest.approx(fig["peak_rss"] / fig["model_bytes"], rel=1e-3)
        assert isinstance(fig["fingerprint"], str) and fig["fingerprint"]
    # the same architecture in both formats
    assert official["model_parameters"] == converted["model_parameters"]
    assert list(work.iterdir()) == []  # the written weights are deleted


def test_latent_probe(tmp_path):
    """bench/latent_probe.py on a fabricated demo folder: an exactly linear target is found, and the
    record names every model it probed."""
    import torch

    from bench import latent_probe
    from viq.formats.image import to_pil
    from viq.model.viq import ViQModel

    g = torch.Generator().manual_seed(0)
    x = torch.randn(200, 5, generator=g, dtype=torch.float64).float()
    w = torch.randn(5, 3, generator=g)
    assert latent_probe.ridge_nmse(x[:150], x[:150] @ w, x[150:], x[150:] @ w, alpha=1e-8) < 1e-6
    noise = torch.randn(200, 3, generator=g)
    assert latent_probe.ridge_nmse(x[:150], noise[:150], x[150:], noise[150:]) > 0.8

    run = tmp_path / "run"
    ViQModel.from_config("viq-test", seed=0).save_pretrained(run / "init")
    for split, n in (("train", 6), ("test", 3)):
        folder = run / "data" / "images" / split
        folder.mkdir(parents=True)
        for i in range(n):
            to_pil(torch.rand(3, 32, 48, generator=g) * 2 - 1).save(folder / f"{i}.png")
    record = latent_probe.main([str(run), "--out", str(tmp_path / "r.json")])
    assert set(record["unexplained_variance"]) == {"pixels", "init"}
    assert record["train_patches"] == 6 * 2 * 3 and record["test_patches"] == 3 * 2 * 3
    assert (tmp_path / "r.json").is_file()


def test_recon_chain(tmp_path):
    """bench/recon_chain.py on a fabricated demo folder: one row per stage output with a latent
    decoder, and the drawer / codec rows score exactly what the demo's report scores."""
    import json

    import torch

    import viq
    from bench import recon_chain
    from viq.demo.evaluation import evaluate_reconstruction
    from viq.formats.image import to_pil
    from viq.model.viq import ViQModel

    g = torch.Generator().manual_seed(0)
    run = tmp_path / "run"
    ViQModel.from_config("viq-test", seed=0).save_pretrained(run / "init")
    ViQModel.from_config("viq-test", seed=1).save_pretrained(run / "runs" / "drawer" / "final")
    for stage, parts in (("stage1", ("encoder", "recon")), ("stage2_2", ("encoder", "head", "dequant", "recon"))):
        final = run / "runs" / stage / "final"
        final.mkdir(parents=True)
        config = viq.load(run / "init").config
        ViQModel(config, parts=parts).save_pretrained(final)
    images = run / "data" / "images" / "test"
    images.mkdir(parents=True)
    lines = []
    for i in range(3):
        to_pil(torch.rand(3, 40, 56, generator=g) * 2 - 1).save(images / f"{i}.png")
        lines.append(json.dumps({"image": f"images/test/{i}.png", "conversations": []}))
    (run / "data" / "test.jsonl").write_text("\n".join(lines) + "\n")

    record = recon_chain.main([str(run), "--out", str(tmp_path / "r.json")])
    summary = record["summary"]
    assert list(summary) == ["stage1", "stage2_2", "drawer", "codec"]  # no stage 2-1 output here
    assert all(0 < s["latent_error"] for name, s in summary.items() if name != "codec")
    drawer = viq.load(run / "runs" / "drawer" / "final")
    sources = [(f"{i}", str(images / f"{i}.png")) for i in range(3)]
    demo, _, _ = evaluate_reconstruction(drawer, sources, tmp_path / "recon", max_pixels=96 * 96, kind="test")
    assert summary["drawer"]["psnr"] == pytest.approx(demo["psnr"], abs=1e-9)
    assert summary["codec"]["psnr"] == pytest.approx(demo["psnr_codec"], abs=1e-9)
    assert (tmp_path / "r.json").is_file()

    # --refit: each stage's decoder trained a few steps more on its frozen representation of training images.
    train_images = run / "data" / "images" / "train"
    train_images.mkdir(parents=True)
    for i in range(4):
        to_pil(torch.rand(3, 48, 48, generator=g) * 2 - 1).save(train_images / f"train-{i}.png")
    argv = [str(run), "--refit", "3", "--refit-images", "4", "--out", str(tmp_path / "refit.json")]
    refit = recon_chain.main(argv)["summary"]
    assert list(refit) == ["stage1", "stage1+refit", "stage2_2", "stage2_2+refit", "drawer", "codec"]
    for stage in ("stage1", "stage2_2"):
        assert refit[stage] == summary[stage]  # the stage's own decoder is scored as before
        assert refit[f"{stage}+refit"]["latent_error"] != summary[stage]["latent_error"]


@pytest.fixture(scope="module")
def tiny_demo(tmp_path_factory):
    """The data, LLM and init of a tiny demo (viq.demo.run.prepare_demo at 2 % scale)."""
    from viq.demo.run import prepare_demo

    out = tmp_path_factory.mktemp("demo")
    prepare_demo(out, scale=0.02, seed=0)
    return out


def test_demo_step(tiny_demo, tmp_path):
    """bench/demo_step.py measures a demo stage-1 step phase by phase (no timing asserted)."""
    from bench import demo_step

    record = demo_step.main([str(tiny_demo), "--batch-size", "4", "--steps", "2", "--out", str(tmp_path / "r.json")])
    current = record["variants"]["current"]
    assert set(current["phases_s"]) == {"data", "forward", "backward", "optimizer"}
    assert all(v > 0 for v in current["phases_s"].values()) and current["gflop_per_step"] > 0
    assert 0 < current["kernel_share"] <= 1 and record["matmul_gflop_s"]["float32"] > 0
    assert "baseline" not in record["variants"] and (tmp_path / "r.json").is_file()


def test_demo_step_baseline_and_compile(tiny_demo, tmp_path, monkeypatch):
    """The documented comparison (`--baseline REV --compile`) runs as written: the baseline tree is a
    git worktree of REV (here HEAD, the same code, so the same FLOPs), the compiled variant reports its
    compile time apart."""
    import shutil

    # A private inductor cache: the shared /tmp/torchinductor_<user> one is written by any other process
    # compiling at the same time, and a half-written kernel there failed this test once ("file too short").
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "inductor"))

    from bench import demo_step

    if shutil.which("git") is None or not (demo_step.REPO / ".git").exists():
        pytest.skip("needs a git checkout (the baseline is a git worktree)")
    # torch.compile on CPU needs a C++ compiler; without one the documented command runs without --compile.
    compile_flag = ["--compile"] if shutil.which("g++") or shutil.which("c++") else []
    record = demo_step.main(
        [
            str(tiny_demo),
            "--baseline",
            "HEAD",
            *compile_flag,
            "--batch-size",
            "4",
            "--steps",
            "2",
            "--out",
            str(tmp_path / "r.json"),
        ]
    )
    variants = record["variants"]
    assert set(variants) == {"baseline", "current"} | ({"compiled"} if compile_flag else set())
    assert variants["baseline"]["gflop_per_step"] == pytest.approx(variants["current"]["gflop_per_step"])
    if compile_flag:
        assert variants["compiled"]["compile"] and variants["compiled"]["warmup_s"] > 0
    assert record["speedup"] > 0


def test_plain_classifier(tiny_demo, tmp_path):
    """bench/plain_classifier.py: per budget and task an accuracy with its interval, for both classifiers."""
    from bench import plain_classifier

    record = plain_classifier.main([str(tiny_demo), "--budgets", "0.2", "--out", str(tmp_path / "r.json")])
    for model in ("cnn", "siglip"):
        (row,) = record["models"][model]
        assert row["seconds"] > 0 and row["steps"] >= 1
        for task, v in row["per_task"].items():
            assert v["n"] > 0 and 0 <= v["accuracy"] <= 1 and v["ci95"][0] <= v["accuracy"] <= v["ci95"][1], task


def test_drawer_schedule(tiny_demo, tmp_path):
    """bench/drawer_schedule.py retrains the demo's drawer from a run's stage 2-2 output per schedule and
    scores it as the report does: a schedule run twice gives the same figures (the seed fixes them)."""
    import argparse
    import shutil

    import viq
    from bench import drawer_schedule
    from viq.model.viq import ViQModel

    run = tmp_path / "run"
    for folder in ("data", "init"):
        shutil.copytree(tiny_demo / folder, run / folder)
    init = viq.load(run / "init")
    stage2_2 = ViQModel(init.config, parts=("encoder", "head", "dequant", "recon", "vae"))
    stage2_2.load_state_dict(init.state_dict(), strict=False)
    stage2_2.save_pretrained(run / "runs" / "stage2_2" / "final")

    argv = [str(run), "--schedule", "2:1e-3", "2:1e-3", "3:2e-3:1", "--images", "2", "--out", str(tmp_path / "r.json")]
    with pytest.raises(SystemExit):  # two schedules of one name would overwrite each other's row
        drawer_schedule.main(argv)
    argv[2:5] = ["2:1e-3", "3:2e-3:1"]
    record = drawer_schedule.main(argv)
    rows = record["schedules"]
    assert list(rows) == ["2:1e-3", "3:2e-3:1"] and rows["3:2e-3:1"]["pixel"] == 1.0
    for row in rows.values():
        assert row["n"] == 2 and row["train_wall_s"] > 0
        assert 0 < row["psnr"] < 100 and row["psnr_bicubic_equal_bits"] > 0 and row["psnr_codec"] > 0
    again = drawer_schedule.main([str(run), "--schedule", "2:1e-3", "--images", "2", "--out", str(tmp_path / "s.json")])
    assert again["schedules"]["2:1e-3"]["psnr"] == rows["2:1e-3"]["psnr"]
    with pytest.raises(argparse.ArgumentTypeError):
        drawer_schedule.parse_schedule("1000")
    with pytest.raises(argparse.ArgumentTypeError):
        drawer_schedule.parse_schedule("0:1e-3")


def test_show_page_benchmark(tmp_path):
    """bench/show_page.py as docs/benchmarks.md runs it (sizes substituted): viq show vs eval-recon per
    image in one run, and the size of a many-image page."""
    from bench import show_page

    record = show_page.main(
        [
            "--images",
            "3",
            "--min-side",
            "32",
            "--max-side",
            "48",
            "--page-images",
            "7",
            "--thumb",
            "128",
            "--out",
            str(tmp_path / "r.json"),
        ]
    )
    assert record["images"] == 3 and record["thumb"] == 128
    assert record["show_s_per_image"] > 0 and record["eval_recon_s_per_image"] > 0
    assert record["show_vs_eval_recon"] == pytest.approx(record["show_s_per_image"] / record["eval_recon_s_per_image"])
    assert record["big_page"]["images"] == 7 and record["big_page"]["bytes"] > record["page_bytes"]
    assert json.loads((tmp_path / "r.json").read_text())["benchmark"] == "show_page"


def test_demo_codec(tmp_path):
    """bench/demo_codec.py runs the demo once per variant of the pixel codec: the variants of a seed share
    its synthetic set and LLM, each trains its own codec (the refinement only where asked), and the record
    pairs each variant with ``none`` on the same seed."""
    import json

    import viq
    from bench import demo_codec

    work = tmp_path / "work"
    argv = ["--seeds", "0", "--variants", "none", "refine", "--work", str(work), "--scale", "0.02"]
    record = demo_codec.main([*argv, "--out", str(tmp_path / "r.json")])
    none, refine = work / "seed0" / "none", work / "seed0" / "refine"
    assert (none / "data" / "train.jsonl").read_bytes() == (refine / "data" / "train.jsonl").read_bytes()
    assert (none / "llm" / "config.json").read_bytes() == (refine / "llm" / "config.json").read_bytes()
    assert viq.load(none / "init", components=("vae",)).vae.pixel_in is None
    assert viq.load(refine / "init", components=("vae",)).vae.pixel_in is not None
    runs = record["runs"]["0"]
    for variant in ("none", "refine"):
        assert (
            runs[variant]["psnr"]
            == json.loads((work / "seed0" / variant / "results.json").read_text())["recon"]["synthetic"]["psnr"]
        )
    paired = record["paired_vs_none"]["refine"]
    assert paired["seeds"] == [0]
    assert paired["psnr"]["mean"] == pytest.approx(runs["refine"]["psnr"] - runs["none"]["psnr"])
    assert paired["psnr"]["ci95_half"] is None  # one seed: no interval
    assert json.loads((tmp_path / "r.json").read_text())["benchmark"] == "demo_codec"
