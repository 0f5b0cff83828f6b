"""model.fsq_init: pca -- the projection into FSQ set from its input's principal directions, whitened."""

from __future__ import annotations

import dataclasses
from types import SimpleNamespace

import pytest
import torch

from conftest import random_pixels
from viq.model.config import get_preset
from viq.model.encoder import pad_to_patches
from viq.model.viq import ViQModel
from viq.train.data import dataset_images
from viq.train.fsq_init import pca_init


def _model(on_bottleneck: bool, quantizer: str = "fsq") -> ViQModel:
    cfg = get_preset("viq-test")
    head = dataclasses.replace(cfg.head, quantizer=quantizer, fsq_on_bottleneck=on_bottleneck, bottleneck_dim=24)
    return ViQModel.from_config(dataclasses.replace(cfg, head=head), seed=0).eval()


def _images(n: int) -> list[torch.Tensor]:
    sizes = [(32, 48), (48, 32), (64, 64), (16, 80)]
    return [random_pixels(*sizes[i % 4], seed=10 + i) for i in range(n)]


@torch.no_grad()
def _fsq_inputs(model: ViQModel, images: list[torch.Tensor]) -> torch.Tensor:
    """(N, d) the FSQ inputs of every code position of ``images``, each image encoded alone."""
    rows = []
    for x in images:
        tokens, packed = model.encoder([pad_to_patches(x, model.patch_size)])
        rows.append(packed.split(model.head.pre_quantize(tokens, packed), 4)[0])
    return torch.cat(rows).double()


@pytest.mark.parametrize("on_bottleneck", [True, False], ids=["paper-layout", "released-layout"])
def test_fsq_inputs_start_centred_uncorrelated_unit_variance(on_bottleneck):
    model = _model(on_bottleneck)
    images = _images(12)
    before = _fsq_inputs(model, images)
    measured = pca_init(model, images, images_per_pass=5)
    z = _fsq_inputs(model, images)
    d = z.shape[1]
    assert measured.images == 12 and measured.vectors == z.shape[0]
    assert measured.input_dim == (24 if on_bottleneck else model.config.width)
    assert measured.variances == sorted(measured.variances, reverse=True) and 0 < measured.explained <= 1
    # By construction on the images it measured (float32 forward passes, float64 statistics):
    assert torch.allclose(z.mean(0), torch.zeros(d, dtype=torch.float64), atol=1e-3)
    covariance = torch.cov(z.T, correction=0)
    assert torch.allclose(covariance, torch.eye(d, dtype=torch.float64), atol=1e-3)
    # ... which the layer's random initialisation does not give (it is what the option changes).
    assert not torch.allclose(torch.cov(before.T, correction=0), torch.eye(d, dtype=torch.float64), atol=0.1)


def test_refuses_a_head_without_fsq_and_images_without_directions():
    with pytest.raises(ValueError, match="Bottleneck head"):
        pca_init(_model(False, quantizer="bottleneck"), _images(2))
    model = _model(True)
    weight = model.head.fsq_in.weight.clone()
    one_patch = [torch.zeros(3, 16, 16)]  # 4 code positions span at most 3 directions, FSQ has 5
    with pytest.raises(ValueError, match="fewer than 5 directions"):
        pca_init(model, one_patch)
    with pytest.raises(ValueError, match="needs training images"):
        pca_init(model, [])
    assert torch.equal(model.head.fsq_in.weight, weight)  # a refused init leaves the layer as it was


def test_dataset_images_are_spread_over_the_dataset_and_skip_missing_samples():
    pixels = [torch.full((3, 16, 16), float(i)) for i in range(10)]
    folder = [SimpleNamespace(pixels=p) for p in pixels]
    assert [int(x[0, 0, 0]) for x in dataset_images(folder, 3)] == [0, 3, 6]
    assert len(dataset_images(folder, 50)) == 10
    conversations = [None, SimpleNamespace(images=[pixels[1], pixels[2]]), SimpleNamespace(images=[pixels[3]])]
    assert [int(x[0, 0, 0]) for x in dataset_images(conversations, 2)] == [1, 2]
    with pytest.raises(ValueError, match="count"):
        dataset_images(folder, 0)
