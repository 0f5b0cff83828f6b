"""The two code-head layouts: the released one (FSQ on the features, C -> d) and the paper's
(FSQ on the L-infinity bottleneck, C -> D -> limit -> d), which keeps stage 2-1's bottleneck."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from conftest import random_pixels
from viq.model.config import get_preset
from viq.model.viq import ViQModel


def _config(on_bottleneck: bool, dim: int = 24):
    cfg = get_preset("viq-test")
    return dataclasses.replace(
        cfg, head=dataclasses.replace(cfg.head, fsq_on_bottleneck=on_bottleneck, bottleneck_dim=dim)
    )


def test_paper_layout_shapes_and_parameters():
    cfg = _config(True)
    model = ViQModel.from_config(cfg, seed=0)
    width, d, dim = cfg.encoder.width, len(cfg.head.levels), cfg.head.bottleneck_dim
    assert model.head.project_in.weight.shape == (dim, width)  # C -> D: the stage 2-1 bottleneck
    assert model.head.fsq_in.weight.shape == (d, dim)  # D -> d: new in stage 2-2
    assert model.embedder.fsq_out.weight.shape == (dim, d)
    assert model.embedder.project_out.weight.shape == (width, dim)
    released = ViQModel.from_config(_config(False), seed=0)
    assert released.head.fsq_in is None and released.embedder.fsq_out is None
    assert released.head.project_in.weight.shape == (d, width)


def test_paper_layout_quantizes_the_limited_bottleneck():
    """The FSQ input is fsq_in applied to the L-inf-limited bottleneck: its values lie on the unit
    hypercube's surface before the D -> d projection."""
    model = ViQModel.from_config(_config(True), seed=0).eval()
    seen = []
    model.head.fsq_in.register_forward_hook(lambda m, args, out: seen.append(args[0]))
    pixels = [random_pixels(32, 48, seed=1)]
    codes = model.encode_pixels(pixels)[0]
    limited = seen[0]
    assert torch.allclose(limited.abs().amax(-1), torch.ones(limited.shape[0]), atol=1e-6)
    assert codes.indices.shape == (2, 3, 4)


def test_paper_layout_round_trips_and_decodes(tmp_path):
    model = ViQModel.from_config(_config(True), seed=0).eval()
    pixels = [random_pixels(32, 48, seed=2), random_pixels(48, 16, seed=3)]
    codes = model.encode_pixels(pixels)
    model.save_pretrained(tmp_path / "m")
    loaded = ViQModel.from_pretrained(tmp_path / "m")
    assert loaded.config.head.fsq_on_bottleneck
    for a, b in zip(codes, loaded.encode_pixels(pixels)):
        assert torch.equal(a.indices, b.indices)
    for a, b in zip(model.embed(codes), loaded.embed(codes)):
        assert a.shape == (a.shape[0], model.config.encoder.width) and torch.equal(a, b)
    assert model.fingerprint() != ViQModel.from_config(_config(False), seed=0).fingerprint()


@pytest.mark.parametrize("on_bottleneck", [False, True])
def test_batch_invariance_in_both_layouts(on_bottleneck):
    model = ViQModel.from_config(_config(on_bottleneck), seed=0).eval()
    pixels = [random_pixels(h, w, seed=i) for i, (h, w) in enumerate([(16, 16), (37, 100), (64, 48)])]
    together = model.encode_pixels(pixels)
    for p, c in zip(pixels, together):
        assert torch.equal(model.encode_pixels([p])[0].indices, c.indices)
