"""Nothing lost, nothing silently wrong: real processes killed at chosen moments, a full disk, two jobs
on one folder, damaged files and bad recipe values.

Kills and pauses come from the fault points of the writers (``VIQ_FAULTS``, :mod:`viq._faults`): a
process started with ``VIQ_FAULTS=checkpoint.swap=kill`` is SIGKILLed exactly between the two renames
that replace a checkpoint. What is checked after each: the run resumes to the same losses as an
uninterrupted one, or stops with one ``viq: error:`` line -- never a traceback, never a silent restart.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import viq
from train_helpers import make_llm, make_qa, recipe
from viq.cli.main import main
from viq.store.reader import CodeStore

STEPS = 4
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    root = tmp_path_factory.mktemp("faults")
    return {"data": make_qa(root / "qa", n=8), "llm": make_llm(root / "llm")}


def _recipe(tmp_path: Path, assets, name: str = "run", **train) -> Path:
    r = recipe(
        "stage2_2",
        tmp_path / name,
        assets["data"],
        assets["llm"],
        train={"max_steps": STEPS, "save_every": 2, "keep_checkpoints": 5, **train},
    )
    path = tmp_path / f"{name}.json"
    path.write_text(json.dumps(r))
    return path


def _viq(*args: str, faults: str | None = None, cwd: Path | None = None) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "VIQ_FAULTS")}
    env.update(PYTHONWARNINGS="ignore")  # the threads of this process: the same float sums as the reference
    if faults:
        env["VIQ_FAULTS"] = faults
    return subprocess.run(
        [sys.executable, "-m", "viq", *args], env=env, capture_output=True, text=True, timeout=300, cwd=cwd
    )


def _errors(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("viq: error:")]


def _one_clear_line(proc: subprocess.CompletedProcess, *needles: str) -> str:
    assert proc.returncode not in (0, -9), proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    errors = _errors(proc.stderr)
    assert len(errors) == 1, proc.stderr[-2000:]
    for needle in needles:
        assert needle in errors[0], errors[0]
    return errors[0]


def _losses(run: Path) -> list[float]:
    return [
        r["loss"] for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if r["kind"] == "train"
    ]


@pytest.fixture(scope="module")
def reference(assets, tmp_path_factory):
    """An uninterrupted run: the losses every interrupted one must end with."""
    tmp = tmp_path_factory.mktemp("reference")
    assert main(["train", "--config", str(_recipe(tmp, assets))]) == 0
    return _losses(tmp / "run")


# ------------------------------------------------------------------------------------------ checkpoints


def test_kill_while_resume_saves_the_last_step_again(assets, reference, tmp_path):
    config = _recipe(tmp_path, assets)
    assert main(["train", "--config", str(config)]) == 0
    # --resume of a finished run saves step 4 again; kill it between setting the old copy aside and
    # putting the new one in place: the only complete copy of step 4 is the one set aside.
    killed = _viq("train", "--config", str(config), "--resume", faults="checkpoint.swap=kill")
    assert killed.returncode == -9
    ckpts = tmp_path / "run" / "checkpoints"
    assert not (ckpts / f"step-{STEPS:08d}").exists() and (ckpts / f".step-{STEPS:08d}.old").is_dir()
    again = _viq("train", "--config", str(config), "--resume")
    assert again.returncode == 0, again.stderr[-3000:]
    assert (ckpts / f"step-{STEPS:08d}").is_dir() and not (ckpts / f".step-{STEPS:08d}.old").exists()
    assert _losses(tmp_path / "run") == reference


@pytest.mark.parametrize("pointer", ["dangling", "empty", "missing"])
def test_a_broken_latest_pointer_never_restarts_from_zero(assets, reference, tmp_path, pointer, caplog):
    config = _recipe(tmp_path, assets)
    assert main(["train", "--config", str(config), "--stop-after", "2"]) == 0
    latest = tmp_path / "run" / "checkpoints" / "latest"
    if pointer == "dangling":
        latest.write_text("step-00000099\n")
    elif pointer == "empty":
        latest.write_text("")
    else:
        latest.unlink()
    assert main(["train", "--config", str(config), "--resume"]) == 0
    assert _losses(tmp_path / "run") == reference  # continued at step 2, metrics kept


@pytest.mark.parametrize("damage", ["shard", "progress", "scheduler"])
def test_a_damaged_checkpoint_falls_back_to_the_one_before(assets, reference, tmp_path, damage, caplog):
    config = _recipe(tmp_path, assets, save_every=1)
    assert main(["train", "--config", str(config), "--stop-after", "3"]) == 0
    step3 = tmp_path / "run" / "checkpoints" / "step-00000003"
    victim = {
        "shard": step3 / "__0_0.distcp",
        "progress": step3 / "progress.json",
        "scheduler": step3 / "scheduler.pt",
    }[damage]
    victim.write_bytes(victim.read_bytes()[: victim.stat().st_size // 2])
    caplog.set_level(logging.WARNING)
    assert main(["train", "--config", str(config), "--resume"]) == 0
    warned = [
        r.getMessage() for r in caplog.records if r.levelno == logging.WARNING and "step-00000003" in r.getMessage()
    ]
    assert warned and victim.name in warned[0], warned
    assert _losses(tmp_path / "run") == reference


def test_no_usable_checkpoint_is_one_line_not_a_restart(assets, tmp_path):
    config = _recipe(tmp_path, assets)
    assert main(["train", "--config", str(config), "--stop-after", "2"]) == 0
    run = tmp_path / "run"
    shard = run / "checkpoints" / "step-00000002" / "__0_0.distcp"
    shard.write_bytes(b"")
    metrics = (run / "metrics.jsonl").read_text()
    proc = _viq("train", "--config", str(config), "--resume")
    _one_clear_line(proc, str(run), "refusing to start again from step 0")
    assert (run / "metrics.jsonl").read_text() == metrics  # nothing truncated
    # And a fresh start over the existing run is refused too (its checkpoints would mix with the new ones).
    _one_clear_line(_viq("train", "--config", str(config)), str(run), "--resume")


def test_kill_while_writing_final_then_resume(assets, reference, tmp_path):
    config = _recipe(tmp_path, assets)
    killed = _viq("train", "--config", str(config), faults="final.written=kill")
    assert killed.returncode == -9
    run = tmp_path / "run"
    assert not (run / "final").exists()  # the output is complete or absent: here absent
    again = _viq("train", "--config", str(config), "--resume")
    assert again.returncode == 0, again.stderr[-3000:]
    assert (run / "final" / "stage.json").is_file() and not list(run.glob(".final*"))
    assert _losses(run) == reference
    # A stage started from an output missing a file stops before training, naming the file.
    (run / "final" / "llm" / "adapter_model.safetensors").unlink()
    nxt = recipe("stage2_2", tmp_path / "next", assets["data"], assets["llm"])
    nxt["model"] = {"init": f"viq:{run / 'final'}"}
    (tmp_path / "next.json").write_text(json.dumps(nxt))
    _one_clear_line(_viq("train", "--config", str(tmp_path / "next.json")), "adapter_model.safetensors", "incomplete")
    assert not (tmp_path / "next" / "checkpoints").exists()


def test_disk_full_while_checkpointing(assets, tmp_path):
    config = _recipe(tmp_path, assets)
    proc = _viq("train", "--config", str(config), faults="checkpoint.write=enospc")
    line = _one_clear_line(proc, "No space left on device", ".step-00000002.tmp")
    ckpts = tmp_path / "run" / "checkpoints"
    assert not list(ckpts.glob(".step-*")), line  # the half-written checkpoint is removed


def test_two_training_jobs_on_one_folder(assets, tmp_path):
    config = _recipe(tmp_path, assets)
    first = subprocess.Popen(
        [sys.executable, "-m", "viq", "train", "--config", str(config)],
        env={**os.environ, "VIQ_FAULTS": "checkpoint.written=sleep:20", "OMP_NUM_THREADS": "1"},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        lock = tmp_path / "run" / ".train.lock"
        deadline = time.time() + 120
        while not (lock.is_file() and f"pid {first.pid}" in lock.read_text()):
            assert time.time() < deadline and first.poll() is None
            time.sleep(0.2)
        _one_clear_line(_viq("train", "--config", str(config), "--resume"), "another training job", f"pid {first.pid}")
    finally:
        first.kill()
        first.wait()


# ------------------------------------------------------------------------------------------ recipes, data


@pytest.mark.parametrize(
    ("override", "key"),
    [
        ("optim.betas=abc", "optim.betas"),
        ("train.batch_size=0", "train.batch_size"),
        ("train.save_every=[1,2]", "train.save_every"),
        ("train=3", "train"),
        ("model.init=preset:nope", "model.init"),
        ("train.max_steps=0", "train.max_steps"),
        ("train.max_steps=-5", "train.max_steps"),
        ("train.max_steps=1.5", "train.max_steps"),
        ("train.progress=maybe", "train.progress"),
        ("optim.lr=fast", "optim.lr"),
        ("loss.distill=-1", "loss.distill"),
    ],
)
def test_bad_recipe_values_are_one_line_naming_the_key(assets, tmp_path, caplog, override, key):
    config = _recipe(tmp_path, assets)
    assert main(["train", "--config", str(config), override]) != 0
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(errors) == 1 and key in errors[0], errors
    assert not (tmp_path / "run" / "final").exists()


def test_a_missing_image_fails_before_the_first_step(assets, tmp_path, caplog):
    data = make_qa(tmp_path / "qa", n=6)
    missing = tmp_path / "qa" / "images" / "4.png"
    missing.unlink()
    r = recipe("stage2_2", tmp_path / "run", data, assets["llm"], train={"max_steps": 100})
    (tmp_path / "r.json").write_text(json.dumps(r))
    assert main(["train", "--config", str(tmp_path / "r.json")]) != 0
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(errors) == 1 and str(missing) in errors[0], errors
    assert not (tmp_path / "run" / "metrics.jsonl").exists()  # not one step ran
    # With on_error: skip, the sample is dropped before training and the run completes.
    r["data"]["on_error"] = "skip"
    r["train"]["max_steps"] = 2
    (tmp_path / "r.json").write_text(json.dumps(r))
    assert main(["train", "--config", str(tmp_path / "r.json")]) == 0


# ------------------------------------------------------------------------------------------ extraction


def _images(folder: Path, n: int, seed: int) -> None:
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True)
    for i in range(n):
        Image.fromarray(rng.integers(0, 256, (24 + i % 5, 40, 3), dtype=np.uint8)).save(folder / f"{seed}-{i:03d}.png")


def test_two_extractions_on_one_store(model_dir, tmp_path):
    _images(tmp_path / "a", 12, seed=1)
    _images(tmp_path / "b", 12, seed=2)
    store = tmp_path / "codes.store"
    common = ["--workers", "0", "--flush-every", "4", "-q"]
    # The first holds rank 0 of the store (pausing after its 3rd record); the second, also rank 0,
    # is refused with one line naming the store, the writer and the holder; the first is unaffected.
    first = subprocess.Popen(
        [sys.executable, "-m", "viq", "extract", str(model_dir), str(tmp_path / "a"), "-o", str(store), *common],
        env={**os.environ, "VIQ_FAULTS": "store.record@3=sleep:8", "OMP_NUM_THREADS": "1"},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    lock = store / "shards" / ".rank0.lock"
    deadline = time.time() + 120
    while not (lock.is_file() and f"pid {first.pid}" in lock.read_text()):
        assert time.time() < deadline and first.poll() is None, first.stderr.read() if first.poll() else ""
        time.sleep(0.2)
    second = _viq("extract", str(model_dir), str(tmp_path / "b"), "-o", str(store), *common)
    _one_clear_line(second, str(store), "rank0", f"pid {first.pid}")
    assert first.wait(timeout=300) == 0
    assert _viq("store", "verify", str(store), "-q").returncode == 0
    # Then the second's images, as rank 0 again: every image stored once, the store sound.
    assert _viq("extract", str(model_dir), str(tmp_path / "b"), "-o", str(store), *common).returncode == 0
    assert _viq("store", "verify", str(store), "-q").returncode == 0
    assert len(CodeStore.open(store)) == 24


def test_disk_full_and_kill_during_extraction_lose_nothing(model_dir, tmp_path):
    _images(tmp_path / "imgs", 20, seed=3)
    store = tmp_path / "codes.store"
    args = [
        "extract",
        str(model_dir),
        str(tmp_path / "imgs"),
        "-o",
        str(store),
        "--workers",
        "0",
        "--flush-every",
        "5",
        "--batch-tokens",
        "16",
        "-q",
    ]
    full = _viq(*args, faults="store.record@8=enospc")
    _one_clear_line(full, "No space left on device", "rank0-")
    assert not list((store / "shards").glob("*.tmp"))  # the unfinished shard is gone
    stored = len(CodeStore.open(store))
    assert stored >= 5  # the first shard of 5 was finalised before the disk filled
    # A kill after the 7th record of the next run: at most flush-every (5) plus the pack in flight redone.
    killed = _viq(*args, faults="store.record@7=kill")
    assert killed.returncode == -9
    assert len(CodeStore.open(store)) >= stored + 5
    assert _viq(*args).returncode == 0
    assert _viq("store", "verify", str(store), "-q").returncode == 0
    final = CodeStore.open(store)
    assert len(final) == 20 and sorted(final.ids()) == sorted(p.name for p in (tmp_path / "imgs").iterdir())
    model = viq.load(model_dir, components=["encoder"])
    for name in ("3-000.png", "3-019.png"):
        assert final.get(name).same_codes(model.encode([str(tmp_path / "imgs" / name)])[0])
