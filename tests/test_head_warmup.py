"""model.head_warmup_steps: the code head and dequantiser learn alone to give the trunk's features back."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from conftest import random_pixels
from viq.model.config import get_preset
from viq.model.viq import ViQModel
from viq.train.head_warmup import warm_up_head


def _stage2_1_model() -> ViQModel:
    cfg = get_preset("viq-test")
    head = dataclasses.replace(cfg.head, quantizer="bottleneck", bottleneck_dim=16, code_blocks=0)
    return ViQModel.from_config(dataclasses.replace(cfg, head=head), seed=0)


def _images(n: int) -> list[torch.Tensor]:
    sizes = [(32, 48), (48, 32), (64, 64), (16, 80)]
    return [random_pixels(*sizes[i % 4], seed=20 + i) for i in range(n)]


def test_warm_up_trains_only_head_and_dequant_and_lowers_the_feature_error():
    model = _stage2_1_model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    rng = torch.get_rng_state()
    warmed = warm_up_head(model, _images(8), steps=40, lr=3e-3, batch_size=4, seed=0)
    assert torch.equal(torch.get_rng_state(), rng)  # batches come from the warm-up's own generator
    after = model.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and all(k.startswith(("head.", "dequant.")) for k in changed), sorted(changed)[:5]
    assert any(k.startswith("head.") for k in changed) and any(k.startswith("dequant.") for k in changed)
    assert warmed.steps == 40 and warmed.seconds > 0
    assert warmed.last_error < 0.8 * warmed.first_error, warmed
    # Same seed, same data, same start: the same result (every rank of a run computes this).
    again = _stage2_1_model()
    warm_up_head(again, _images(8), steps=40, lr=3e-3, batch_size=4, seed=0)
    assert all(torch.equal(again.state_dict()[k], after[k]) for k in changed)


def test_warm_up_refusals():
    model = _stage2_1_model()
    with pytest.raises(ValueError, match="steps must be >= 1"):
        warm_up_head(model, _images(2), steps=0, lr=1e-3, batch_size=2, seed=0)
    with pytest.raises(ValueError, match="no training image"):
        warm_up_head(model, [], steps=1, lr=1e-3, batch_size=2, seed=0)
    model.head = None
    with pytest.raises(ValueError, match="no code head"):
        warm_up_head(model, _images(2), steps=1, lr=1e-3, batch_size=2, seed=0)


def test_a_stage_with_both_starts_decodes_its_images_once():
    """fsq_init: pca and the warm-up read one pool, decoded once, each taking images spread over it."""
    from types import SimpleNamespace

    from viq.train.engine import _spread, _start_images

    class Counting:
        def __init__(self, n: int):
            self.n, self.reads = n, []

        def __len__(self) -> int:
            return self.n

        def __getitem__(self, i: int):
            self.reads.append(i)
            return SimpleNamespace(pixels=torch.full((3, 1, 1), float(i)))

    data = Counting(40)
    model = SimpleNamespace(fsq_init_images=4, head_warmup_images=10)
    pool = _start_images(data, SimpleNamespace(model=model), True, True)
    assert len(pool) == 10 and len(data.reads) == len(set(data.reads)) == 10
    picked = [int(x[0, 0, 0]) for x in _spread(pool, 4)]
    assert picked == [0, 8, 20, 28] and _spread(pool, 10) is pool  # the whole dataset's spread, not its head
    assert _start_images(data, SimpleNamespace(model=model), False, False) == []
    assert [int(x[0, 0, 0]) for x in _start_images(Counting(40), SimpleNamespace(model=model), True, False)] == [
        0,
        10,
        20,
        30,
    ]
