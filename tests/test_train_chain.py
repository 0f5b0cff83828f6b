"""A chain of stages: one fixed distillation teacher, and the paper's head keeping the 2-1 bottleneck."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from train_helpers import make_start, recipe
from viq.train.build import build_model
from viq.train.config import TrainConfig
from viq.train.engine import train

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def chain(tmp_path_factory):
    """stage1 -> stage2_1 -> stage2_2 (FSQ on the bottleneck), each a few steps, from a saved start."""
    root = tmp_path_factory.mktemp("chain")
    data, llm, start = make_start(root)
    runs = {}
    init = f"viq:{start}"
    head = {"bottleneck_dim": 16, "bottleneck_limit": "linf"}
    for stage, head_cfg in (
        ("stage1", None),
        ("stage2_1", {**head, "quantizer": "bottleneck", "code_blocks": 0}),
        ("stage2_2", {**head, "quantizer": "fsq", "fsq_on_bottleneck": True, "code_blocks": 1}),
    ):
        r = recipe(
            stage,
            root / stage,
            data,
            llm,
            train={"max_steps": 4, "batch_size": 2},
            loss={"teacher_size": 32},
            llm={"mode": "full"},
        )
        r["model"] = {"init": init, "config": {"head": head_cfg} if head_cfg else {}}
        runs[stage] = {"cfg": TrainConfig.from_dict(r), "summary": train(TrainConfig.from_dict(r))}
        init = f"viq:{runs[stage]['summary']['final']}"
    return {"root": root, "runs": runs}


def _encoder_state(path: Path) -> dict[str, torch.Tensor]:
    return {k[len("encoder.") :]: v for k, v in load_file(str(path)).items() if k.startswith("encoder.")}


def test_every_stage_distils_towards_the_stage1_starting_encoder(chain):
    start = _encoder_state(chain["root"] / "init" / "model.safetensors")
    stage1_final = Path(chain["runs"]["stage1"]["summary"]["final"])
    teacher_file = stage1_final / "teacher.safetensors"
    assert teacher_file.is_file()
    written = load_file(str(teacher_file))
    assert set(written) == set(start) and all(torch.equal(written[k], start[k]) for k in start)
    trained = _encoder_state(stage1_final / "model.safetensors")
    assert any(not torch.equal(trained[k], start[k]) for k in start)  # stage 1 did move the encoder
    for stage in ("stage2_1", "stage2_2"):
        record = json.loads((Path(chain["runs"][stage]["summary"]["final"]) / "stage.json").read_text())["teacher"]
        assert record["weights"] == str(teacher_file.resolve()), stage
        model, _ = build_model(chain["runs"][stage]["cfg"], device=CPU)
        teacher = model.teacher.state_dict()
        assert all(torch.equal(teacher[k], start[k]) for k in start), f"{stage} distils towards another encoder"


def test_explicit_teacher_and_missing_teacher_weights(chain, tmp_path):
    cfg = chain["runs"]["stage2_1"]["cfg"]
    explicit = TrainConfig.from_dict(
        {**cfg.to_dict(), "loss": {**cfg.to_dict()["loss"], "teacher": f"viq:{chain['root'] / 'stage1' / 'final'}"}}
    )
    model, _ = build_model(explicit, device=CPU)
    trained = _encoder_state(chain["root"] / "stage1" / "final" / "model.safetensors")
    assert all(torch.equal(model.teacher.state_dict()[k], trained[k]) for k in trained)
    with pytest.raises(ValueError, match="trained weights"):
        build_model(
            TrainConfig.from_dict({**cfg.to_dict(), "loss": {**cfg.to_dict()["loss"], "teacher": "preset:viq-test"}}),
            device=CPU,
        )
    # A chain whose recorded teacher file has gone says which file and how to name another.
    moved = tmp_path / "stage1-final"
    stage1 = Path(chain["runs"]["stage1"]["summary"]["final"])
    shutil.copytree(stage1, moved)
    record = json.loads((moved / "stage.json").read_text())
    record["teacher"] = {**record["teacher"], "weights": str(tmp_path / "gone.safetensors")}
    (moved / "stage.json").write_text(json.dumps(record))
    again = TrainConfig.from_dict({**cfg.to_dict(), "model": {**cfg.to_dict()["model"], "init": f"viq:{moved}"}})
    with pytest.raises(FileNotFoundError, match="gone.safetensors"):
        build_model(again, device=CPU)


def test_paper_head_hand_over_keeps_the_bottleneck(chain):
    s21 = load_file(str(Path(chain["runs"]["stage2_1"]["summary"]["final"]) / "model.safetensors"))
    model, _ = build_model(chain["runs"]["stage2_2"]["cfg"], device=CPU)
    state = model.state_dict()
    for name in ("head.project_in.weight", "head.project_in.bias", "dequant.project_out.weight"):
        assert torch.equal(state[name], s21[name]), f"{name} was not handed over"
    assert "head.fsq_in.weight" not in s21  # new in 2-2: the D -> d projection
    # The loss jump at the first 2-2 step is recorded next to the 2-1 losses (the demo reports it).
    first = chain["runs"]["stage2_2"]["summary"]["history"][0]
    last = chain["runs"]["stage2_1"]["summary"]["history"][-1]
    assert {"distill", "recon"} <= set(first) and {"distill", "recon"} <= set(last)


def test_pca_fsq_init_through_the_engine(chain, tmp_path):
    """A stage 2-2 run with model.fsq_init: pca starts its D -> d map from the measured principal
    directions (the head's step size made negligible, so one step leaves them in place); the drawer,
    which reads a frozen head, refuses the option."""
    from viq.train.data import build_dataset, dataset_images, max_pixels_at
    from viq.train.engine import seed_everything
    from viq.train.fsq_init import pca_init

    base = chain["runs"]["stage2_2"]["cfg"].to_dict()
    r = {
        **base,
        "model": {**base["model"], "fsq_init": "pca", "fsq_init_images": 3},
        "optim": {**base["optim"], "group_lr": {"head": 1e-12}},
        "train": {**base["train"], "output_dir": str(tmp_path / "pca"), "max_steps": 1},
    }
    cfg = TrainConfig.from_dict(r)
    final = Path(train(cfg)["final"])
    trained = load_file(str(final / "model.safetensors"))["head.fsq_in.weight"]

    seed_everything(cfg.train.seed)  # the engine's seed before building: the same fresh 2-2 blocks
    expected, _ = build_model(cfg, device=CPU)
    images = dataset_images(build_dataset(cfg.data.train, cfg, max_pixels_at(cfg, 0)), 3)
    measured = pca_init(expected, images)
    assert measured.images == 3
    assert torch.allclose(trained, expected.head.fsq_in.weight, rtol=1e-4, atol=1e-5)
    seed_everything(cfg.train.seed)
    random_start, _ = build_model(cfg, device=CPU)  # the same build without the init
    assert not torch.allclose(trained, random_start.head.fsq_in.weight, atol=1e-2)

    with pytest.raises(ValueError, match="model.fsq_init must be random or pca"):
        TrainConfig.from_dict({**r, "model": {**r["model"], "fsq_init": "kmeans"}})
    with pytest.raises(ValueError, match="does not train the code head"):
        TrainConfig.from_dict({**r, "optim": {**r["optim"], "trainable": ["recon", "dequant"]}})


def test_head_warmup_through_the_engine(chain, tmp_path):
    """A stage 2-1 run with model.head_warmup_steps starts from the warmed head and dequantiser (their
    step size made negligible, so one step leaves them in place); a stage that does not train them refuses."""
    from viq.train.data import build_dataset, dataset_images, max_pixels_at
    from viq.train.engine import seed_everything
    from viq.train.head_warmup import warm_up_head

    base = chain["runs"]["stage2_1"]["cfg"].to_dict()
    r = {
        **base,
        "model": {**base["model"], "head_warmup_steps": 4, "head_warmup_lr": 3e-3},
        "optim": {**base["optim"], "group_lr": {"head": 1e-12, "dequant": 1e-12}},
        "train": {**base["train"], "output_dir": str(tmp_path / "warm"), "max_steps": 1},
    }
    cfg = TrainConfig.from_dict(r)
    trained = load_file(str(Path(train(cfg)["final"]) / "model.safetensors"))

    seed_everything(cfg.train.seed)
    expected, _ = build_model(cfg, device=CPU)
    cold = {k: v.clone() for k, v in expected.state_dict().items()}
    pool = dataset_images(build_dataset(cfg.data.train, cfg, max_pixels_at(cfg, 0)), cfg.model.head_warmup_images)
    warm_up_head(expected, pool, steps=4, lr=3e-3, batch_size=cfg.train.batch_size, seed=cfg.train.seed)
    state = expected.state_dict()
    names = [k for k in state if k.startswith(("head.", "dequant.")) and k in trained]
    assert names and any(not torch.equal(state[k], cold[k]) for k in names)
    for k in names:
        assert torch.allclose(trained[k], state[k], rtol=1e-4, atol=1e-6), k

    with pytest.raises(ValueError, match="model.head_warmup_steps must be an integer >= 0"):
        TrainConfig.from_dict({**r, "model": {**r["model"], "head_warmup_steps": -1}})
    with pytest.raises(ValueError, match="does not train the code head and dequantiser"):
        TrainConfig.from_dict({**r, "optim": {**r["optim"], "trainable": ["head", "recon"]}})
