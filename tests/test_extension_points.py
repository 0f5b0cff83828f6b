"""The extension points are where docs/architecture.md says they are: a quantizer and a loss added from
this file alone (no viq module edited) train, and every discrete quantizer -- FSQ, SimVQ and the toy one
-- encodes, decodes and trains every stage: 2-2, the drawer, extraction into a code store, the MLLM."""

from __future__ import annotations

import contextlib
import dataclasses
import math
import re
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

import viq
from train_helpers import make_llm, make_qa, recipe
from viq.extract import extract
from viq.model.config import HeadConfig, get_preset
from viq.model.quantizer import QUANTIZERS, Quantized, QuantizerKind, radix_levels, register_quantizer
from viq.store import CodeStore
from viq.train.config import TrainConfig
from viq.train.engine import train
from viq.train.losses import LOSS_TABLE, Loss, register_loss
from viq.train.stages import TABLE as STAGE_TABLE

BITS = 6


class SignQuantizer(nn.Module):
    """A toy binary quantizer: each of 6 channels becomes -1 or +1 (straight-through gradient); the index
    is the bits, channel 0 least significant: 64 codes."""

    dim = BITS
    codebook_size = 2**BITS

    def quantize(self, z: torch.Tensor) -> Quantized:
        x = z.float()
        signs = torch.where(x >= 0, 1.0, -1.0)
        bits = (signs > 0).long()
        indices = (bits << torch.arange(BITS, device=x.device)).sum(-1).to(torch.int32)
        return Quantized(x + (signs - x).detach(), indices, x.new_zeros(()))

    def dequantize(self, indices: torch.Tensor) -> torch.Tensor:
        bits = (indices.long()[..., None] >> torch.arange(BITS, device=indices.device)) & 1
        return bits.float() * 2 - 1

    def codebook(self) -> torch.Tensor:
        return self.dequantize(torch.arange(self.codebook_size))


TOY = QuantizerKind("toy-sign", build=lambda cfg: SignQuantizer(), dim=lambda cfg: BITS, codebook_size=lambda cfg: 64)


def feature_energy(model, batch, inputs) -> torch.Tensor:
    """A toy loss: the mean squared feature of each image, summed over the micro-batch's images."""
    if not inputs.features:
        return inputs.anchor
    return torch.stack([f.float().pow(2).mean() for f in inputs.features]).sum()


@contextlib.contextmanager
def _restored(*tables: dict):
    """The registries ``tables`` as they were before the block, whatever it registered."""
    saved = [dict(t) for t in tables]
    try:
        yield
    finally:
        for table, before in zip(tables, saved):
            table.clear()
            table.update(before)


@pytest.fixture(scope="module")
def toy_quantizer():
    with pytest.MonkeyPatch.context() as mp:
        mp.setitem(QUANTIZERS, TOY.name, TOY)  # registered for this module's tests only
        yield TOY


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    root = tmp_path_factory.mktemp("ext")
    return {"root": root, "data": make_qa(root / "qa", n=4), "llm": make_llm(root / "llm")}


def _config(stage, out, assets, *, init, head=None, use_llm=True, **sections) -> TrainConfig:
    r = recipe(stage, out, assets["data"], assets["llm"] if use_llm else None, **sections)
    r["model"] = {"init": init, "config": {"head": head} if head else {}}
    r["train"].update(max_steps=2, batch_size=2)
    r["loss"] = {"teacher_size": 32, **r.get("loss", {})}
    return TrainConfig.from_dict(r)


def _stage(*args, **kwargs) -> dict:
    return train(_config(*args, **kwargs))


@pytest.mark.parametrize("kind", ["fsq", "simvq", "toy-sign"])
def test_every_quantizer_encodes_decodes_and_trains_every_stage(kind, toy_quantizer, assets, tmp_path):
    head = {"quantizer": kind, "code_blocks": 1, "simvq_codebook_size": 512, "simvq_dim": 8}
    s22 = _stage("stage2_2", tmp_path / "s22", assets, init="preset:viq-test", head=head)
    assert all(math.isfinite(h["loss"]) for h in s22["history"])
    if kind == "simvq":  # the quantizer's own loss reaches training
        assert all(h["commit"] > 0 for h in s22["history"])
    model = viq.load(s22["final"])
    cfg = model.config.head
    assert type(model.head.quantizer).__name__ == {"fsq": "FSQ", "simvq": "SimVQ", "toy-sign": "SignQuantizer"}[kind]
    assert model.levels == cfg.code_levels and math.prod(model.levels) == cfg.codebook_size

    # Encode -> .viq file -> back: the codes keep the quantizer's alphabet.
    images = [str(p) for p in sorted((assets["data"].parent / "images").glob("*.png"))]
    codes = model.encode(images)
    path = tmp_path / "0.viq"
    codes[0].save(path)
    loaded = viq.Codes.load(path)
    assert loaded.same_codes(codes[0]) and loaded.levels == model.levels

    # Decode: the embedder and the drawer read the values the head's quantizer gives those indices (a
    # learned codebook was copied from the head when the stage output was written).
    values = model.head.quantizer.dequantize(codes[0].flat())
    assert torch.equal(model.embed(codes[:1])[0], model.embedder.from_code_values(values))
    assert torch.equal(model.drawer.features.codebook, model.head.quantizer.codebook())
    picture = model.reconstruct(codes[:1])[0]
    assert picture.size == (56, 40)

    # The drawer stage on the frozen model, then the codes into a store and an MLLM trained on them.
    drawer = _stage(
        "drawer",
        tmp_path / "drawer",
        assets,
        init=f"viq:{s22['final']}",
        use_llm=False,
        data={"train": str(assets["data"].parent / "images")},
    )
    assert all(math.isfinite(h["recon"]) for h in drawer["history"])
    counts = extract(drawer["final"], assets["data"], tmp_path / "store", num_workers=0, progress=False)
    assert counts["encoded"] == 4
    store = CodeStore.open(tmp_path / "store")
    assert tuple(store.levels) == model.levels
    mllm = _stage(
        "mllm",
        tmp_path / "mllm",
        assets,
        init=f"viq:{drawer['final']}",
        data={"codes": str(tmp_path / "store")},
        llm={"mode": "full"},
    )
    assert all(math.isfinite(h["text"]) for h in mllm["history"])


def test_a_loss_added_from_this_file_trains(assets, tmp_path):
    with _restored(LOSS_TABLE, STAGE_TABLE):
        register_loss(Loss("feature_energy", "images", feature_energy, default_weight=0.0), stages=["stage2_1"])
        with pytest.raises(ValueError, match="already registered"):
            register_loss(Loss("feature_energy", "images", feature_energy), stages=["stage2_1"])
        assert list(LOSS_TABLE)[-1] == "feature_energy" and "feature_energy" in STAGE_TABLE["stage2_1"].losses
        cfg = _config(
            "stage2_1", tmp_path / "on", assets, init="preset:viq-test", loss={"extra": {"feature_energy": 3.0}}
        )
        weights = cfg.loss_weights()
        assert weights["feature_energy"] == 3.0
        run = train(cfg)
        for h in run["history"]:  # logged, and weighted into the step's loss
            weighted = sum(weights[k] * h[k] for k in LOSS_TABLE if weights[k])
            assert h["feature_energy"] > 0 and h["loss"] == pytest.approx(weighted, rel=1e-9)
        # Its default weight (0 here) leaves it out; a weight for a loss nobody registered is refused.
        off = _stage("stage2_1", tmp_path / "off", assets, init="preset:viq-test")
        assert all("feature_energy" not in h for h in off["history"])
        with pytest.raises(ValueError, match=r"loss\.extra.*'nonsense'"):
            _stage("stage2_1", tmp_path / "bad", assets, init="preset:viq-test", loss={"extra": {"nonsense": 1.0}})


def test_registry_errors_and_the_codes_alphabet():
    assert radix_levels(4096) == (128, 32) and math.prod(radix_levels(32768)) == 32768
    assert radix_levels(15360) and all(2 <= f <= 255 for f in radix_levels(15360))
    with pytest.raises(ValueError, match="prime factor 257"):
        HeadConfig(quantizer="simvq", simvq_codebook_size=257 * 2)
    with pytest.raises(ValueError, match=r"quantizer must be one of \['bottleneck', 'fsq', 'simvq'"):
        HeadConfig(quantizer="vq-nonsense")
    with pytest.raises(ValueError, match="already registered"):
        register_quantizer(dataclasses.replace(QUANTIZERS["fsq"]))
    # FSQ's alphabet is its levels; the continuous bottleneck has none and refuses to encode.
    assert HeadConfig(levels=(8, 5, 5)).code_levels == (8, 5, 5)
    config = get_preset("viq-test")
    bottleneck = viq.ViQModel(
        dataclasses.replace(config, head=dataclasses.replace(config.head, quantizer="bottleneck", code_blocks=0))
    )
    assert bottleneck.config.head.code_levels == ()
    with pytest.raises(RuntimeError, match="continuous quantizer: it has no codes"):
        bottleneck.encode_pixels([torch.zeros(3, 32, 32)])


def test_toy_quantizer_is_what_it_claims():
    q = SignQuantizer()
    z = torch.randn(100, BITS, requires_grad=True)
    out = q.quantize(z)
    assert torch.equal(q.dequantize(out.indices), out.values.detach())
    out.values.sum().backward()
    assert torch.equal(z.grad, torch.ones_like(z))
    assert torch.equal(q.codebook()[out.indices.long()], out.values.detach())


def test_the_documented_example_runs_as_written(tmp_path):
    """docs/architecture.md's block (a quantizer and a loss from the user's own module), run as written:
    the kind then builds a model that encodes and reconstructs, and the loss is in stage 2-2's record."""
    text = (Path(__file__).resolve().parents[1] / "docs" / "architecture.md").read_text()
    blocks = [textwrap.dedent(b) for b in re.findall(r"\n  ```python\n(.*?)\n  ```", text, re.S)]
    example = next(b for b in blocks if "register_quantizer(" in b and "register_loss(" in b)
    with _restored(QUANTIZERS, LOSS_TABLE, STAGE_TABLE):
        exec(compile(example, "docs/architecture.md", "exec"), {"__name__": "user_module"})
        assert "feature_energy" in STAGE_TABLE["stage2_2"].losses and LOSS_TABLE["feature_energy"].unit == "images"
        config = get_preset("viq-test")
        model = viq.ViQModel(dataclasses.replace(config, head=dataclasses.replace(config.head, quantizer="sign")))
        codes = model.encode([np.random.default_rng(0).integers(0, 256, (40, 56, 3), dtype=np.uint8)])
        assert codes[0].levels == (64,) and int(codes[0].indices.max()) < 64
        assert model.reconstruct(codes)[0].size == (56, 40)
