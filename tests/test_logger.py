"""The training log (viq.train.logger): metrics.jsonl every train.log_every steps with the means of the
steps it covers, evaluation records, reconstructions as images, TensorBoard and W&B (offline) when the
recipe asks, only on rank 0, and resuming without duplicated steps."""

from __future__ import annotations

import math
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from train_helpers import make_llm, make_qa, recipe
from viq.model.config import get_preset
from viq.train.config import TrainConfig
from viq.train.engine import train
from viq.train.logger import RunLogger, read_metrics

WINDOW_MEANS = ("loss", "text", "distill", "recon", "commit", "grad_norm")


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    root = tmp_path_factory.mktemp("logger-assets")
    return {"data": make_qa(root / "qa"), "llm": make_llm(root / "llm"), "root": root}


@pytest.fixture(scope="module")
def wandb_offline(tmp_path_factory):
    """W&B's own files (settings, cache, artifacts) in a temporary folder; quiet."""
    home = tmp_path_factory.mktemp("wandb-home")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("WANDB_SILENT", "true")
        for var in ("WANDB_CONFIG_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR", "WANDB_ARTIFACT_DIR"):
            mp.setenv(var, str(home / var.lower()))
        yield


def _cfg(assets, out: Path, stage: str = "stage2_2", **train_section) -> TrainConfig:
    r = recipe(
        stage,
        out,
        assets["data"],
        assets["llm"],
        data={"val": str(assets["data"])},
        train={"eval_samples": 2, **train_section},
    )
    return TrainConfig.from_dict(r)


def _tensorboard_steps(folder: Path) -> dict[str, list[int]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    ea = EventAccumulator(str(folder), size_guidance={"images": 0, "scalars": 0})
    ea.Reload()
    tags = ea.Tags()
    steps = {t: [e.step for e in ea.Scalars(t)] for t in tags["scalars"]}
    steps.update({t: [e.step for e in ea.Images(t)] for t in tags["images"]})
    return steps


@pytest.fixture(scope="module")
def logged(assets, wandb_offline, tmp_path_factory):
    """A stage 2-2 run (LLM, codes, reconstructions) of 5 steps, logged every 2, validated every 2,
    with TensorBoard and W&B offline."""
    out = tmp_path_factory.mktemp("logged") / "run"
    cfg = _cfg(
        assets,
        out,
        max_steps=5,
        log_every=2,
        eval_every=2,
        log_images=2,
        trackers=["tensorboard", "wandb"],
        wandb_mode="offline",
        wandb_project="viq-test",
    )
    summary = train(cfg)
    return {"out": out, "summary": summary, "cfg": cfg}


def test_records_every_log_every_steps_with_window_means(logged):
    history = logged["summary"]["history"]
    assert [h["step"] for h in history] == [1, 2, 3, 4, 5]  # the exact history keeps every step
    codebook = get_preset("viq-test").head.codebook_size
    records = read_metrics(logged["out"], "train")
    assert [r["step"] for r in records] == [2, 4, 5]  # every 2 steps, and the last one
    assert [r["steps"] for r in records] == [2, 2, 1]
    for record in records:
        window = history[record["step"] - record["steps"] : record["step"]]
        for key in WINDOW_MEANS:
            assert record[key] == pytest.approx(sum(h[key] for h in window) / len(window), rel=1e-12), key
        last = window[-1]
        assert record["lr"] == last["lr"] and set(record["lr"]) >= {"encoder", "head", "projector", "llm"}
        assert not any(k.endswith(".no_decay") for k in record["lr"])
        assert record["time"] == last["time"] and record["samples_per_s"] > 0 and record["tokens_per_s"] > 0
        assert record["code_usage"] == last["code_usage"] and 0 < record["code_usage"] <= 1
        # entropy of the window's codes: at most log2 of the number of distinct codes seen
        assert 0 < record["code_entropy_bits"] <= math.log2(record["code_usage"] * codebook) + 1e-9
        assert record["code_perplexity"] == pytest.approx(2 ** record["code_entropy_bits"])
        # Per slot (the codes_per_patch sub-positions): each slot's usage at most the overall one.
        slots = get_preset("viq-test").head.codes_per_patch
        assert {f"code_usage_slot{j}" for j in range(slots)} <= set(record), sorted(record)
        assert all(0 < record[f"code_usage_slot{j}"] <= record["code_usage"] + 1e-12 for j in range(slots))
        assert all(record[f"code_entropy_bits_slot{j}"] <= math.log2(codebook) for j in range(slots))
        assert all(
            record[f"code_perplexity_slot{j}"] == pytest.approx(2 ** record[f"code_entropy_bits_slot{j}"])
            for j in range(slots)
        )
    assert records[0]["time"] < records[1]["time"] < records[2]["time"]
    assert records[0]["wall_time"] <= records[-1]["wall_time"]
    # The LR a step used: constant schedule here (warmup 0, min_lr_ratio 1) -> the recipe's rate.
    assert set(records[0]["lr"].values()) == {logged["cfg"].optim.lr}


def test_eval_records_and_reconstruction_images(logged, assets):
    out = logged["out"]
    evals = read_metrics(out, "eval")
    assert [r["step"] for r in evals] == [2, 4, 5]  # every eval_every steps, and the final validation
    assert all(r["kind"] == "eval" and {"psnr", "answer_accuracy", "val_text", "code_usage"} <= set(r) for r in evals)
    final = {k: v for k, v in evals[-1].items() if k != "kind"}
    assert final == logged["summary"]["val"]
    # Records are in step order, each validation after the training record of its step.
    kinds = [(r["kind"], r["step"]) for r in read_metrics(out)]
    assert kinds == [("train", 2), ("eval", 2), ("train", 4), ("eval", 4), ("train", 5), ("eval", 5)]
    folders = sorted(p.name for p in (out / "images").iterdir())
    assert folders == ["step-00000002", "step-00000004", "step-00000005"]
    original = np.asarray(Image.open(assets["data"].parent / "images" / "0.png").convert("RGB"))
    for folder in folders:
        assert sorted(p.name for p in (out / "images" / folder).iterdir()) == ["0.png", "1.png"]
        picture = np.asarray(Image.open(out / "images" / folder / "0.png"))
        h, w = original.shape[:2]
        assert picture.shape == (h, 2 * w + 2, 3)
        assert np.array_equal(picture[:, :w], original)  # the validation image itself, then its reconstruction
        assert not np.array_equal(picture[:, w + 2 :], original)


def test_tensorboard_events(logged):
    steps = _tensorboard_steps(logged["out"] / "tensorboard")
    assert steps["train/loss"] == [2, 4, 5] and steps["train/recon"] == [2, 4, 5]
    assert steps["lr/encoder"] == [2, 4, 5] and steps["train/code_usage"] == [2, 4, 5]
    assert steps["eval/psnr"] == [2, 4, 5] and steps["eval/answer_accuracy"] == [2, 4, 5]
    assert steps["eval/reconstruction_0"] == [2, 4, 5] and steps["eval/reconstruction_1"] == [2, 4, 5]


def test_wandb_offline_run(logged):
    out = logged["out"]
    run_id = (out / "wandb-run-id").read_text().strip()
    runs = list((out / "wandb").glob(f"offline-run-*-{run_id}"))
    assert len(runs) == 1, list((out / "wandb").iterdir())
    data = (runs[0] / f"run-{run_id}.wandb").read_bytes()
    for key in (b"train/loss", b"lr/encoder", b"train/code_usage", b"eval/psnr", b"eval/reconstructions"):
        assert key in data, key
    media = sorted(p.name for p in (runs[0] / "files" / "media" / "images" / "eval").iterdir())
    for step in (2, 4, 5):  # two images per validation, named by step
        assert sum(name.startswith(f"reconstructions_{step}_") for name in media) == 2, media


def test_curves_of_the_run(logged, tmp_path):
    from viq.cli.main import main

    out = tmp_path / "curves.png"
    assert main(["plot", str(logged["out"]), "-o", str(out)]) == 0
    assert Image.open(out).size == (1500, 420)


def test_resume_appends_without_duplicates(assets, tmp_path):
    """A run that logged past its last checkpoint, then resumed: the log reads as the uninterrupted
    run's (same records, same values: the window of step 2 spans the resume), TensorBoard included."""
    common = {
        "max_steps": 4,
        "log_every": 2,
        "save_every": 1,
        "keep_checkpoints": 5,
        "eval_every": 2,
        "eval_samples": 1,
        "log_images": 1,
    }
    train(_cfg(assets, tmp_path / "full", **common))
    assert not (tmp_path / "full" / "tensorboard").exists() and not (tmp_path / "full" / "wandb").exists()
    cfg = _cfg(assets, tmp_path / "cut", trackers=["tensorboard"], **common)
    train(cfg, stop_after=3)
    out = tmp_path / "cut"
    assert [(r["kind"], r["step"]) for r in read_metrics(out)] == [("train", 2), ("eval", 2)]
    # A crash after step 3: the newest complete checkpoint is step 1's; steps 2-3 are redone.
    for step in (2, 3):
        shutil.rmtree(out / "checkpoints" / f"step-{step:08d}")
    (out / "checkpoints" / "latest").write_text("step-00000001\n")
    resumed = train(cfg, resume=True)
    assert [h["step"] for h in resumed["history"]] == [1, 2, 3, 4]
    a, b = read_metrics(tmp_path / "full"), read_metrics(out)
    assert (
        [(r["kind"], r["step"]) for r in b]
        == [(r["kind"], r["step"]) for r in a]
        == [("train", 2), ("eval", 2), ("train", 4), ("eval", 4)]
    )
    for ra, rb in zip(a, b):
        assert ra.keys() == rb.keys()
        for key in ("loss", "text", "recon", "grad_norm", "code_usage", "val_text", "latent_mse", "psnr"):
            if key in ra:
                assert rb[key] == pytest.approx(ra[key], rel=1e-5, abs=1e-7), (ra["kind"], ra["step"], key)
    assert sorted(p.name for p in (out / "images").iterdir()) == ["step-00000002", "step-00000004"]
    steps = _tensorboard_steps(out / "tensorboard")
    assert steps["train/loss"] == [2, 4] and steps["eval/psnr"] == [2, 4]
    assert steps["eval/reconstruction_0"] == [2, 4]
    # "time" goes on from the checkpoint's: the run's clock is not restarted.
    assert resumed["history"][0]["time"] < b[0]["time"] < b[2]["time"]


def test_only_rank_zero_writes(assets, tmp_path):
    cfg = _cfg(assets, tmp_path / "run", trackers=["tensorboard"], log_every=1)
    quiet = RunLogger(tmp_path / "run", cfg, main=False)
    history = [{"step": 1, "loss": 1.0, "lr": {"encoder": 0.1}, "step_time": 0.5, "samples_per_s": 2.0, "time": 0.5}]
    assert quiet.log_step(history)["step"] == 1
    quiet.log_eval({"val_text": 1.0}, 1)
    quiet.close()
    assert not (tmp_path / "run").exists()


def test_window_arithmetic_and_truncation(assets, tmp_path):
    """Throughput over a window is work / time; the last step of the run is always logged; a logger
    started at step s keeps the records up to s (a fresh start, s = 0, keeps none)."""
    cfg = _cfg(assets, tmp_path / "run", max_steps=7, log_every=3)
    log = RunLogger(tmp_path / "run", cfg, main=True)
    history = []
    for step in range(1, 8):
        history.append(
            {
                "step": step,
                "loss": float(step),
                "lr": {"encoder": 0.1 * step},
                "step_time": float(step),
                "samples_per_s": 2.0 if step % 2 else 4.0,
                "time": float(step * step),
            }
        )
        log.log_step(history)
        if step % 3 == 0:
            log.log_eval({"val_text": float(step)}, step)
    log.close()
    records = read_metrics(tmp_path / "run", "train")
    assert [(r["step"], r["steps"]) for r in records] == [(3, 3), (6, 3), (7, 1)]
    assert records[0]["loss"] == 2.0 and records[1]["loss"] == 5.0 and records[2]["loss"] == 7.0
    # steps 1-3: samples 2*1 + 4*2 + 2*3 = 16 in 6 s
    assert records[0]["samples_per_s"] == pytest.approx(16 / 6) and records[0]["lr"] == {"encoder": 0.1 * 3}
    assert records[1]["time"] == 36.0
    with open(tmp_path / "run" / "metrics.jsonl", "a") as f:
        f.write('{"kind": "train", "st')  # a line cut by a crash
    RunLogger(tmp_path / "run", cfg, main=True, start_step=3).close()
    assert [(r["kind"], r["step"]) for r in read_metrics(tmp_path / "run")] == [("train", 3), ("eval", 3)]
    RunLogger(tmp_path / "run", cfg, main=True, start_step=0).close()
    assert read_metrics(tmp_path / "run") == []


def test_read_metrics_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such run directory"):
        read_metrics(tmp_path / "missing")
    with pytest.raises(FileNotFoundError, match="no metrics.jsonl"):
        read_metrics(tmp_path)
    (tmp_path / "metrics.jsonl").write_text('{"kind": "train", "step": 1}\n[1, 2]\n')
    with pytest.raises(ValueError, match=r"metrics.jsonl:2: expected a JSON object"):
        read_metrics(tmp_path)


@pytest.mark.parametrize(
    "train_section, message",
    [
        ({"trackers": ["tensorboard", "mlflow"]}, r"train.trackers: unknown \['mlflow'\]"),
        ({"log_every": 0}, "train.log_every must be >= 1"),
        ({"wandb_mode": "cloud"}, "train.wandb_mode must be offline, online or disabled"),
        ({"tensorboard": "yes", "trackers": ["neptune"]}, r"train.trackers: unknown \['neptune'\]"),
    ],
)
def test_logging_options_are_checked(train_section, message, tmp_path):
    with pytest.raises(ValueError, match=message):
        TrainConfig.from_dict({"train": train_section})
    assert TrainConfig.from_dict({"train": {"trackers": "wandb"}}).train.trackers == ["wandb"]


def test_missing_tracker_package_warns_and_jsonl_goes_on(assets, tmp_path, monkeypatch, caplog):
    import builtins

    real_import = builtins.__import__

    def no_tensorboard(name, *args, **kwargs):
        if name == "torch.utils.tensorboard":
            raise ImportError("No module named 'tensorboard'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_tensorboard)
    cfg = _cfg(assets, tmp_path / "run", trackers=["tensorboard"])
    log = RunLogger(tmp_path / "run", cfg, main=True)
    assert log.tb is None and "tensorboard but it is not installed" in caplog.text
    log.log_step([{"step": 1, "loss": 1.0, "lr": {}, "step_time": 1.0, "samples_per_s": 1.0, "time": 1.0}])
    assert read_metrics(tmp_path / "run")[0]["loss"] == 1.0
    assert os.listdir(tmp_path / "run") == ["metrics.jsonl"]


def test_code_usage_per_slot_and_the_collapse_warning():
    """CodeUsage counts each slot of a patch apart and warns once, naming the step, when the window's
    codebook share falls below the threshold."""
    import torch

    from viq.train.metrics import CodeUsage
    from viq.train.parallel import Dist

    single = Dist()
    usage = CodeUsage(16, torch.device("cpu"), window=3, collapse_usage=0.2)
    warnings = []
    for step in range(1, 6):
        if step <= 2:  # healthy: slot 0 uses 8 codes, slot 1 uses 4
            usage.add(torch.stack([torch.arange(8), torch.arange(8) % 4], dim=1))
        else:  # collapsed: one code everywhere
            usage.add(torch.zeros(8, 2, dtype=torch.long))
        metrics = usage.summary(single)
        warnings.append(usage.collapse(step, metrics))
        if step == 1:
            assert metrics["code_usage"] == 0.5 and metrics["code_usage_slot0"] == 0.5
            assert metrics["code_usage_slot1"] == 0.25 and metrics["code_entropy_bits_slot1"] == pytest.approx(2.0)
    # The window (3 steps) holds the healthy steps until step 4; from step 5 only one code is used.
    assert warnings[:4] == [None] * 4 and warnings[4] is not None
    assert warnings[4].startswith("step 5: the codebook is collapsing: 1 of 16 codes")
    assert usage.collapse(6, {"code_usage": 0.0, "code_entropy_bits": 0.0}) is None  # once
    again = CodeUsage(16, torch.device("cpu"), window=3, collapse_usage=0.2)
    again.load_state_dict(usage.state_dict())
    assert again.collapsed_at == 5 and len(again.counts) == 3
