"""Stage 1's optional VAE-latent loss on the trunk features (off unless the recipe sets loss.recon)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from train_helpers import make_start, recipe
from viq.model.vae import encode_latents, encode_latents_grouped
from viq.model.viq import ViQModel
from viq.train.build import build_model
from viq.train.config import TrainConfig
from viq.train.engine import train
from viq.train.stages import get_stage

CPU = torch.device("cpu")


def test_unset_recon_weight_is_off_in_stage1_and_on_in_stage2():
    assert TrainConfig.from_dict({"stage": "stage1"}).loss_weights()["recon"] == 0.0
    assert TrainConfig.from_dict({"stage": "stage1", "loss": {"recon": 0.5}}).loss_weights()["recon"] == 0.5
    for stage in ("stage2_1", "stage2_2", "drawer"):
        assert TrainConfig.from_dict({"stage": stage}).loss_weights()["recon"] == 1.0
        assert TrainConfig.from_dict({"stage": stage, "loss": {"recon": 0}}).loss_weights()["recon"] == 0.0
    spec = get_stage("stage1")
    assert spec.active_parts({"recon": 0.0}) == ("encoder",) and not spec.needs_vae({"recon": 0.0})
    assert spec.active_parts({"recon": 1.0}) == ("encoder", "recon") and spec.needs_vae({"recon": 1.0})


@pytest.fixture(scope="module")
def stage1_runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("s1recon")
    data, llm, start = make_start(root)
    runs = {}
    for name, weight in (("plain", None), ("recon", 1.0)):
        loss = {"teacher_size": 32, "distill": 0.0} | ({"recon": weight} if weight is not None else {})
        r = recipe(
            "stage1", root / name, data, llm, train={"max_steps": 3, "batch_size": 2}, loss=loss, llm={"mode": "full"}
        )
        r["model"] = {"init": f"viq:{start}"}
        runs[name] = (TrainConfig.from_dict(r), train(TrainConfig.from_dict(r)))
    return root, runs


def test_stage1_without_recon_builds_no_decoder(stage1_runs):
    _, runs = stage1_runs
    cfg, summary = runs["plain"]
    model, _ = build_model(cfg, device=CPU)
    assert model.recon is None and model.vae is None
    keys = load_file(str(Path(summary["final"]) / "model.safetensors"))
    assert not any(k.startswith("recon.") for k in keys)


def test_stage1_recon_trains_a_latent_decoder_that_stage2_starts_from(stage1_runs, tmp_path):
    root, runs = stage1_runs
    cfg, summary = runs["recon"]
    model, _ = build_model(cfg, device=CPU)
    assert model.recon is not None and model.vae is not None
    assert summary["history"][-1]["recon"] > 0
    final = Path(summary["final"])
    saved = load_file(str(final / "model.safetensors"))
    recon = {k: v for k, v in saved.items() if k.startswith("recon.")}
    start = ViQModel.from_pretrained(root / "init").state_dict()
    assert recon and any(not torch.equal(v, start[k]) for k, v in recon.items())  # it trained
    # The VAE still travels with the output, unchanged, and stage 2-1 takes the trained decoder.
    assert all(torch.equal(saved[k], start[k]) for k in start if k.startswith("vae."))
    r = cfg.to_dict()
    r.update(
        stage="stage2_1",
        model={"init": f"viq:{final}", "config": {"head": {"quantizer": "bottleneck", "code_blocks": 0}}},
    )
    r["train"] = {**r["train"], "output_dir": str(tmp_path / "s21")}
    r["loss"] = {**r["loss"], "recon": None}
    stage2, _ = build_model(TrainConfig.from_dict(r), device=CPU)
    for k, v in stage2.recon.state_dict().items():
        assert torch.equal(v, recon["recon." + k]), k


@pytest.mark.parametrize("kind", ["qwen-image", "pixel-codec"])
def test_grouped_latents_match_one_image_at_a_time(kind):
    from viq.model.config import VAEConfig
    from viq.model.vae import build_vae

    torch.manual_seed(0)
    vae = build_vae(VAEConfig(kind=kind, base_dim=8)).eval()
    g = torch.Generator().manual_seed(0)
    images = [torch.rand(3, h, w, generator=g) * 2 - 1 for h, w in ((16, 24), (32, 16), (16, 24), (8, 8))]
    with torch.no_grad():
        grouped = encode_latents_grouped(vae, images)
        for x, z in zip(images, grouped):
            one = encode_latents(vae, x)
            assert z.shape == one.shape
            # Batched and single-image kernels may round differently; both are float32 convolutions.
            torch.testing.assert_close(z, one, rtol=1e-4, atol=1e-4)


def test_stage2_pixel_loss_alone_trains_the_latent_decoder(stage1_runs, tmp_path):
    """loss.pixel in stage 2 (with loss.recon=0): the paper's pixel-MSE reconstruction loss, through the
    frozen VAE decoder; it is the only loss that reaches the encoder-side latent decoder."""
    import json

    root, runs = stage1_runs
    cfg, summary = runs["recon"]
    r = recipe(
        "stage2_1",
        tmp_path / "s21",
        Path(cfg.data.train),
        Path(cfg.llm.path),
        train={"max_steps": 2, "batch_size": 2},
        optim={"trainable": ["recon"]},
        loss={"teacher_size": 32, "recon": 0.0, "pixel": 1.0, "text": 0.0, "distill": 0.0},
    )
    r["model"] = {"init": f"viq:{summary['final']}", "config": {"head": {"quantizer": "bottleneck"}}}
    s21 = TrainConfig.from_dict(r)
    model, _ = build_model(s21, device=CPU)
    assert model.losses == ("commit", "pixel")  # commit: 0 for the continuous bottleneck
    result = train(s21)
    logged = [json.loads(line) for line in (tmp_path / "s21" / "metrics.jsonl").read_text().splitlines()]
    assert all(rec["pixel"] > 0 and "recon" not in rec for rec in logged if rec["kind"] == "train")
    before = load_file(str(Path(summary["final"]) / "model.safetensors"))
    after = load_file(str(Path(result["final"]) / "model.safetensors"))
    changed = [k for k in after if k.startswith("recon.") and not torch.equal(after[k], before[k])]
    assert changed and all(torch.equal(after[k], before[k]) for k in after if k.startswith("encoder.blocks."))
