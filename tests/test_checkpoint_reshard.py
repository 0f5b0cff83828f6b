"""Reshardable checkpoints: a run saved on N processes resumes on M (DDP and FSDP2, gloo on CPU),
older checkpoints still load, a changed global batch is refused, per-step seeding."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from train_helpers import make_llm, make_qa, recipe
from train_helpers import run_recipe as _run
from viq.train.checkpoint import latest_checkpoint, seed_step
from viq.train.config import TrainConfig
from viq.train.engine import train

STEPS, STOP = 4, 2
#: Runs on different numbers of processes differ only in the order of float32 sums (the gradient
#: all-reduce over ranks against one process's sum over its batch); the same tolerance as the
#: 1-process / 2-process comparison in test_train.py.
REL = 1e-4


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    root = tmp_path_factory.mktemp("reshard-assets")
    # 8 samples: a multiple of the global batch (4), so both layouts have the same epochs.
    return {"data": make_qa(root / "qa", n=8), "llm": make_llm(root / "llm")}


def _recipe(out: Path, assets, world: int, parallel: str = "ddp", **train_keys) -> dict:
    # The same global batch on any number of processes: 4 samples per step.
    return recipe(
        "stage2_2",
        out,
        assets["data"],
        assets["llm"],
        optim={"lr": 1e-3},
        train={"max_steps": STEPS, "parallel": parallel, "batch_size": 4 // world, "log_samples": True, **train_keys},
    )


def _samples(out: Path) -> dict[int, set]:
    """Step -> the ids read at that step, over all ranks (and all the launches of the run)."""
    seen: dict[int, set] = {}
    for f in out.glob("samples-rank*.jsonl"):
        for line in f.read_text().splitlines():
            record = json.loads(line)
            seen.setdefault(record["step"], set()).update(record["ids"])
    return seen


def _tensors(checkpoint: Path, tmp: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a DCP checkpoint, unsharded, by flat name (read without a process group)."""
    flat: dict[str, torch.Tensor] = {}

    def walk(prefix: str, value) -> None:
        if isinstance(value, dict):
            for k, v in value.items():
                walk(f"{prefix}.{k}", v)
        elif isinstance(value, torch.Tensor):
            flat[prefix] = value

    walk("", _nested(checkpoint, tmp))
    return flat


def _assert_continues(resumed: list[dict], before: list[dict], after: list[dict]) -> None:
    """``resumed`` keeps the history of ``before`` up to the checkpoint and follows ``after`` from there."""
    assert [h["step"] for h in resumed] == list(range(1, STEPS + 1))
    assert [h["loss"] for h in resumed[:STOP]] == [h["loss"] for h in before[:STOP]]
    for a, b in zip(resumed[STOP:], after[STOP:]):
        assert a["loss"] == pytest.approx(b["loss"], rel=REL), (a, b)


@pytest.mark.parametrize("parallel", ["ddp", "fsdp"])
def test_resume_on_another_number_of_processes(parallel, tmp_path, assets):
    ref1 = _run(_recipe(tmp_path / "ref1", assets, 1, parallel), 1)
    ref2 = _run(_recipe(tmp_path / "ref2", assets, 2, parallel), 2)
    for a, b in zip(ref1, ref2):
        assert a["loss"] == pytest.approx(b["loss"], rel=REL)

    # 2 -> 1. Loading on one process and saving at once gives the 2-process state bit for bit.
    _run(_recipe(tmp_path / "a", assets, 2, parallel), 2, stop_after=STOP, launcher="slurm")
    name = f"step-{STOP:08d}"
    written = _tensors(tmp_path / "a" / "checkpoints" / name, tmp_path / "written.pt")
    assert any(k.startswith(".optimizer.state.") for k in written) and any(k.startswith(".model.") for k in written)
    _run(_recipe(tmp_path / "a", assets, 1, parallel), 1, resume=True, stop_after=STOP)
    again = _tensors(tmp_path / "a" / "checkpoints" / name, tmp_path / "again.pt")
    assert written.keys() == again.keys()
    assert all(torch.equal(written[k], again[k]) for k in written), [
        k for k in written if not torch.equal(written[k], again[k])
    ]
    resumed = _run(_recipe(tmp_path / "a", assets, 1, parallel), 1, resume=True)
    _assert_continues(resumed, ref2, ref2)
    _assert_continues(resumed, ref2, ref1)

    # 1 -> 2
    _run(_recipe(tmp_path / "b", assets, 1, parallel), 1, stop_after=STOP)
    resumed = _run(_recipe(tmp_path / "b", assets, 2, parallel), 2, resume=True, launcher="flags")
    _assert_continues(resumed, ref1, ref1)
    _assert_continues(resumed, ref1, ref2)

    # Every step read the same global batch as the uninterrupted runs, however it was dealt to ranks.
    expected = _samples(tmp_path / "ref1")
    assert expected == _samples(tmp_path / "ref2") == _samples(tmp_path / "a") == _samples(tmp_path / "b")
    assert sorted(expected) == list(range(1, STEPS + 1))


def test_single_process_checkpoints(tmp_path, assets):
    """Exact resume with dropout; a changed global batch is refused; an unfinished write is ignored;
    a checkpoint of the earlier format (one gathered state.pt) still resumes exactly."""
    lora = {"llm": {"lora_dropout": 0.1}}
    ref = recipe("stage2_2", tmp_path / "ref", assets["data"], assets["llm"], train={"max_steps": STEPS}, **lora)
    full = _run(ref, 1)
    r = recipe("stage2_2", tmp_path / "run", assets["data"], assets["llm"], train={"max_steps": STEPS}, **lora)
    _run(r, 1, stop_after=STOP)
    ckpts = tmp_path / "run" / "checkpoints"
    checkpoint = ckpts / f"step-{STOP:08d}"
    assert latest_checkpoint(tmp_path / "run") == checkpoint
    assert (checkpoint / ".metadata").is_file() and not list(checkpoint.glob("rng-*"))

    bigger = recipe(
        "stage2_2", tmp_path / "run", assets["data"], assets["llm"], train={"max_steps": STEPS, "batch_size": 4}
    )
    with pytest.raises(ValueError, match=r"global batch of 2 samples per step .* this run has 4"):
        train(TrainConfig.from_dict(bigger), resume=True)

    # A run killed while writing the next checkpoint leaves a hidden temporary directory, never read.
    (ckpts / f".step-{STOP + 1:08d}.tmp").mkdir()
    (ckpts / f".step-{STOP + 1:08d}.tmp" / "__0_0.distcp").write_bytes(b"partial")
    assert latest_checkpoint(tmp_path / "run") == checkpoint

    # The earlier format: model, optimizer and scheduler in one state.pt, RNG per rank (now unused).
    state = _nested(checkpoint, tmp_path / "nested.pt")
    state["scheduler"] = torch.load(checkpoint / "scheduler.pt", weights_only=True)
    for f in [*checkpoint.glob("*.distcp"), checkpoint / ".metadata", checkpoint / "scheduler.pt"]:
        f.unlink()
    torch.save(state, checkpoint / "state.pt")
    progress = json.loads((checkpoint / "progress.json").read_text())
    del progress["format"]
    (checkpoint / "progress.json").write_text(json.dumps(progress))
    resumed = _run(r, 1, resume=True)
    assert [h["step"] for h in resumed] == list(range(1, STEPS + 1))
    for a, b in zip(full, resumed):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-6, abs=1e-7), (a, b)


def _nested(checkpoint: Path, tmp: Path) -> dict:
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    dcp_to_torch_save(checkpoint, tmp)
    return torch.load(tmp, weights_only=False)


def test_seed_step_depends_on_seed_step_and_rank_only():
    def draw(seed, step, rank):
        seed_step(seed, step, rank)
        torch.rand(1)  # whatever came before does not matter
        seed_step(seed, step, rank)
        return torch.rand(4)

    assert torch.equal(draw(0, 3, 1), draw(0, 3, 1))
    assert not torch.equal(draw(0, 3, 1), draw(0, 3, 0))
    assert not torch.equal(draw(0, 3, 1), draw(0, 4, 1))
    assert not torch.equal(draw(0, 3, 1), draw(1, 3, 1))
