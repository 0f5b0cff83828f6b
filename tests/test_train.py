"""Training: every stage learns, hand-over between stages, resume, distributed, data errors."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import viq
from train_helpers import make_llm, make_qa, recipe
from viq.train.config import TrainConfig, apply_overrides, load_recipe
from viq.train.data import ShardedBatchOrder
from viq.train.engine import train
from viq.train.optim import lr_multiplier


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    root = tmp_path_factory.mktemp("train-assets")
    return {"data": make_qa(root / "qa"), "llm": make_llm(root / "llm"), "root": root}


def run(stage, tmp_path, assets, *, use_llm=True, **sections):
    cfg = TrainConfig.from_dict(
        recipe(stage, tmp_path / stage, assets["data"], assets["llm"] if use_llm else None, **sections)
    )
    return train(cfg)


@pytest.mark.parametrize("mode", ["lora", "full"])
@pytest.mark.parametrize("stage", ["stage1", "stage2_1", "stage2_2"])
def test_stage_overfits_one_batch(stage, mode, tmp_path, assets):
    """On a fixed batch (the whole set is one batch), the stage's total loss falls."""
    summary = run(stage, tmp_path, assets, llm={"mode": mode}, train={"max_steps": 25, "batch_size": 4})
    losses = [h["loss"] for h in summary["history"]]
    assert len(losses) == 25
    assert min(losses[-3:]) < 0.6 * losses[0], losses
    if stage != "stage1":
        assert summary["history"][-1]["recon"] < summary["history"][0]["recon"]
    final = Path(summary["final"])
    assert (final / "config.json").is_file() and (final / "projector.safetensors").is_file()
    assert (final / "llm" / ("adapter_config.json" if mode == "lora" else "model.safetensors")).is_file()


def test_zero_text_weight_does_not_run_the_llm(tmp_path, assets, monkeypatch):
    """A stage whose recipe gives the text loss no weight (e.g. a stage 2-1 that trains only the code
    head on the latent loss) never runs the LLM for it, and still hands the LLM on to the next stage."""
    from viq.train.model import TrainModel

    calls = []
    text_loss = TrainModel.text_loss
    monkeypatch.setattr(TrainModel, "text_loss", lambda self, *a: calls.append(1) or text_loss(self, *a))
    summary = run(
        "stage2_1", tmp_path / "off", assets, loss={"text": 0.0}, optim={"trainable": ["head", "dequant", "recon"]}
    )
    assert calls == []
    assert all("text" not in h and h["recon"] > 0 for h in summary["history"])
    assert (Path(summary["final"]) / "llm").is_dir()
    run("stage2_1", tmp_path / "on", assets, optim={"trainable": ["head", "dequant", "recon"]})
    assert len(calls) == 3  # one per step with the default weight


def test_handover_2_1_to_2_2_and_inference_load(tmp_path, assets):
    s21 = run("stage2_1", tmp_path, assets)
    s22 = run(
        "stage2_2",
        tmp_path,
        assets,
        model={"init": f"viq:{s21['final']}", "config": {"head": {"quantizer": "fsq", "code_blocks": 2}}},
        data={"val": str(assets["data"])},
        train={"max_steps": 2},
    )
    # The 2-2 output is a complete viq model: it loads with viq.load and encodes.
    model = viq.load(s22["final"])
    assert set(model.components) >= {"encoder", "embedder", "drawer", "vae"}
    codes = model.encode([str(assets["data"].parent / "images" / "0.png")])
    assert codes[0].grid == (3, 4)
    assert model.reconstruct(codes)[0].size == (56, 40)
    assert "code_usage" in s22["val"] and "answer_accuracy" in s22["val"] and "psnr" in s22["val"]
    # Validation's code figures are over the codebook (all heads together): a perplexity can never exceed the
    # number of codes used (it did when the per-head histograms were scored as one 4K-long codebook).
    val, size = s22["val"], model.config.head.codebook_size
    assert val["code_perplexity"] <= val["code_usage"] * size + 1e-6
    assert val["code_perplexity"] == pytest.approx(2 ** val["code_entropy_bits"])
    # ... and its encoder/head came from stage 2-1 where shapes allow.
    from safetensors.torch import load_file

    before = load_file(str(Path(s21["final"]) / "model.safetensors"))
    assert "head.blocks.0.attn.qkv.weight" in before  # trained in 2-1, reused by 2-2
    # Drawer stage on the frozen 2-2 model: only the drawer changes.
    drawer = run(
        "drawer",
        tmp_path,
        assets,
        use_llm=False,
        model={"init": f"viq:{s22['final']}"},
        data={"train": str(assets["data"].parent / "images")},
        train={"max_steps": 8, "batch_size": 4},
    )
    trained = viq.load(drawer["final"])
    assert set(trained.components) >= {"encoder", "embedder", "drawer", "vae"}
    assert drawer["history"][-1]["recon"] < drawer["history"][0]["recon"]
    a, b = model.state_dict(), trained.state_dict()
    assert torch.equal(a["head.project_in.weight"], b["head.project_in.weight"])
    assert torch.equal(a["embedder.merge.fc1.weight"], b["embedder.merge.fc1.weight"])
    assert not torch.equal(a["drawer.latent.conv_out.weight"], b["drawer.latent.conv_out.weight"])
    # A drawer recipe that reshapes the decoder it shares with the carried recon.* fails before training.
    with pytest.raises(ValueError, match=r"recon\.\* weights.*model\.config\.decoder"):
        run(
            "drawer",
            tmp_path / "deeper",
            assets,
            use_llm=False,
            model={"init": f"viq:{s22['final']}", "config": {"decoder": {"latent_blocks": 2}}},
            data={"train": str(assets["data"].parent / "images")},
            train={"max_steps": 8, "batch_size": 4},
        )
    assert not any((tmp_path / "deeper").rglob("*.safetensors"))  # nothing was trained or written


def test_resume_matches_uninterrupted_run(tmp_path, assets):
    sections = {
        "train": {"max_steps": 6, "batch_size": 2, "save_every": 3},
        "optim": {"warmup_ratio": 0.3, "min_lr_ratio": 0.1},
        "llm": {"lora_dropout": 0.1},
    }
    full = run("stage2_2", tmp_path / "a", assets, **sections)
    cfg = TrainConfig.from_dict(recipe("stage2_2", tmp_path / "b", assets["data"], assets["llm"], **sections))
    first = train(cfg, stop_after=3)
    assert first["steps"] == 3 and (tmp_path / "b" / "checkpoints" / "latest").is_file()
    resumed = train(cfg, resume=True)
    assert [h["step"] for h in resumed["history"]] == list(range(1, 7))
    for a, b in zip(full["history"][3:], resumed["history"][3:]):
        assert a["step"] == b["step"]
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-6, abs=1e-7)


def test_lr_schedule():
    values = [lr_multiplier(s, 100, 0.05, 0.1) for s in range(100)]
    assert values[0] == pytest.approx(0.2) and values[4] == pytest.approx(1.0)
    assert values[-1] == pytest.approx(0.1, abs=1e-3)
    assert all(a >= b for a, b in zip(values[5:], values[6:]))


def test_sharded_order_is_disjoint_and_resumable():
    one = ShardedBatchOrder(10, 4, rank=0, world=1, seed=3)
    r0 = ShardedBatchOrder(10, 2, rank=0, world=2, seed=3)
    r1 = ShardedBatchOrder(10, 2, rank=1, world=2, seed=3)
    for i in range(4):
        assert set(r0.batch(i)).isdisjoint(r1.batch(i)) or i >= r0.batches_per_epoch
        assert sorted(r0.batch(i) + r1.batch(i)) == sorted(one.batch(i))
    resumed = ShardedBatchOrder(10, 2, rank=1, world=2, seed=3, start=3)
    assert next(iter(resumed)) == r1.batch(3)


def test_recipe_overrides_and_errors(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text("stage: stage1\noptim:\n  lr: 0.1\n")
    cfg = load_recipe(path, ["optim.lr=3e-4", "train.max_steps=7", "optim.group_lr.head=1e-3"])
    assert cfg.optim.lr == 3e-4 and cfg.train.max_steps == 7 and cfg.optim.group_lr == {"head": 1e-3}
    with pytest.raises(ValueError, match="unknown keys"):
        load_recipe(path, ["optim.lrr=1"])
    with pytest.raises(ValueError, match="stage"):
        load_recipe(path, ["stage=stage9"])
    with pytest.raises(ValueError, match="key.path=value"):
        apply_overrides({}, ["nonsense"])


@pytest.mark.parametrize(
    "problem, message",
    [
        ("malformed", "train.jsonl:2"),
        ("missing-image", "nope.png"),
        ("image-count", "<image>"),
    ],
)
def test_data_errors_are_named(problem, message, tmp_path, assets):
    data = make_qa(tmp_path / "qa", n=2)
    lines = data.read_text().splitlines()
    record = json.loads(lines[1])
    if problem == "malformed":
        lines[1] = lines[1][:-5]
    elif problem == "missing-image":
        record["image"] = "images/nope.png"
        lines[1] = json.dumps(record)
    else:
        record["conversations"][0]["value"] = "<image> and <image>"
        lines[1] = json.dumps(record)
    data.write_text("\n".join(lines) + "\n")
    cfg = TrainConfig.from_dict(recipe("stage1", tmp_path / "out", data, assets["llm"]))
    with pytest.raises(ValueError, match=message):
        train(cfg)


def _torchrun(tmp_path: Path, recipe_dict: dict, nproc: int) -> list[dict]:
    tmp_path.mkdir(parents=True, exist_ok=True)
    path = tmp_path / "recipe.json"
    path.write_text(json.dumps(recipe_dict))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        str(nproc),
        "--master_port",
        str(29500 + os.getpid() % 1000),
        "-m",
        "viq",
        "train",
        "--config",
        str(path),
    ]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    out = Path(recipe_dict["train"]["output_dir"])
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("parallel", ["ddp", "fsdp"])
def test_two_process_run_matches_one_process(parallel, tmp_path, assets):
    data = make_qa(tmp_path / "qa", n=8)
    common = {"optim": {"lr": 1e-3}, "train": {"max_steps": 3, "parallel": parallel, "log_samples": True}}
    one = recipe("stage2_2", tmp_path / "one", data, assets["llm"], **common)
    one["train"]["batch_size"] = 4
    two = recipe("stage2_2", tmp_path / "two", data, assets["llm"], **common)
    two["train"]["batch_size"] = 2
    single = _torchrun(tmp_path / "1", one, 1)
    double = _torchrun(tmp_path / "2", two, 2)
    for a, b in zip(single, double):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-4), (a, b)
    seen = [
        json.loads(line)
        for r in (0, 1)
        for line in (tmp_path / "two" / f"samples-rank{r}.jsonl").read_text().splitlines()
    ]
    for step in range(1, 4):
        r0 = next(s["ids"] for s in seen if s["rank"] == 0 and s["step"] == step)
        r1 = next(s["ids"] for s in seen if s["rank"] == 1 and s["step"] == step)
        assert set(r0).isdisjoint(r1)


def test_train_model_builds_by_stage_through_the_inherited_constructors():
    """TrainModel.from_config / from_state_dict take the stage (a training model is built by stage, not by
    components): a random stage-2-2 model, the same weights again, and a state that does not fit refused."""
    import torch

    from viq.train.model import TrainModel

    model = TrainModel.from_config("viq-test", stage="stage2_2", seed=0)
    assert model.stage == "stage2_2" and model.parts == ("encoder", "head", "dequant", "recon")
    again = TrainModel.from_state_dict(model.config, model.state_dict(), stage="stage2_2")
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), again.state_dict().values()))
    assert TrainModel.from_config("viq-test", stage="stage2_2", seed=0).state_dict().keys() == model.state_dict().keys()
    partial = dict(list(model.state_dict().items())[1:])
    with pytest.raises(ValueError, match="missing 1 keys"):
        TrainModel.from_state_dict(model.config, partial, stage="stage2_2")
    with pytest.raises(ValueError, match="stage must be one of"):
        TrainModel.from_config("viq-test", stage="stage9", seed=0)
