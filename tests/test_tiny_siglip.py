"""The demo's SigLIP stand-in (viq.demo.tiny_siglip): its loss, its determinism, that it learns."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from viq.demo.tiny_siglip import POSITION_INIT_STD, TinySiglip, contrastive_text, train_tiny_siglip
from viq.model.config import get_preset

ENCODER = dataclasses.replace(get_preset("viq-test").encoder, pos_grid=4)
WORDS = {"What": 1, "color": 2, "is": 3, "it?": 4, "red": 5, "blue": 6}


def tokenize(text: str) -> list[int]:
    return [WORDS[w] for w in text.split()]


def square(rng: np.random.Generator, rgb: tuple[int, int, int], size: int = 32) -> np.ndarray:
    """A ``size`` x ``size`` uint8 image of one colour with a little noise."""
    noise = rng.integers(-12, 13, size=(size, size, 3))
    return np.clip(np.array(rgb)[None, None] + noise, 0, 255).astype(np.uint8)


def colour_set(n: int, seed: int) -> tuple[list[np.ndarray], list[str]]:
    rng = np.random.default_rng(seed)
    colours = {"red": (200, 30, 30), "blue": (30, 40, 210)}
    names = [("red", "blue")[i % 2] for i in range(n)]
    return [square(rng, colours[c]) for c in names], [contrastive_text("What color is it?", c) for c in names]


def test_loss_counts_equal_texts_as_positives():
    model = TinySiglip(ENCODER, vocab_size=8)
    image = F.normalize(torch.randn(3, ENCODER.width), dim=-1)
    text = F.normalize(torch.randn(3, ENCODER.width), dim=-1)
    ids = torch.tensor([0, 0, 1])  # the first two images share their text
    logits = image @ text.T * math.exp(model.log_scale.detach().item()) + model.bias.detach().item()
    labels = torch.tensor([[1, 1, -1], [1, 1, -1], [-1, -1, 1]], dtype=torch.float32)
    expected = -F.logsigmoid(labels * logits).sum() / 3
    torch.testing.assert_close(model.loss(image, text, ids), expected)
    assert model.log_scale.detach().exp().item() == pytest.approx(10.0) and model.bias.detach().item() == -10.0


def test_position_table_starts_at_the_patch_embeddings_scale():
    table = TinySiglip(ENCODER, vocab_size=8).image.pos_embed
    assert table.detach().std().item() == pytest.approx(POSITION_INIT_STD, rel=0.2)


def test_training_is_deterministic_and_learns_an_easy_task():
    images, texts = colour_set(64, seed=0)
    kwargs = dict(vocab_size=8, steps=60, batch_size=16, lr=3e-3, seed=3, progress=False)
    a = train_tiny_siglip(images, texts, tokenize, ENCODER, **kwargs)
    b = train_tiny_siglip(images, texts, tokenize, ENCODER, **kwargs)
    assert a.history == b.history and len(a.history) == 60
    for (k, x), (_, y) in zip(a.model.state_dict().items(), b.model.state_dict().items()):
        assert torch.equal(x, y), k
    assert not a.model.training and not any(p.requires_grad for p in a.model.parameters())
    # Held-out squares of the two colours: the stand-in, used as a classifier, tells them apart.
    test_images, test_texts = colour_set(20, seed=1)
    from viq.formats.image import to_pixels

    candidates = [[torch.tensor(tokenize(contrastive_text("What color is it?", c))) for c in ("red", "blue")]] * 20
    picks = a.zero_shot([to_pixels(x) for x in test_images], candidates)
    assert picks == [i % 2 for i in range(20)]
    assert np.mean(a.history[-10:]) < np.mean(a.history[:10])


def test_bad_inputs():
    images, texts = colour_set(4, seed=0)
    with pytest.raises(ValueError, match="as many texts as images"):
        train_tiny_siglip(images, texts[:3], tokenize, ENCODER, vocab_size=8, steps=1, progress=False)
    with pytest.raises(ValueError, match="batch_size"):
        train_tiny_siglip(images, texts, tokenize, ENCODER, vocab_size=8, steps=1, batch_size=1, progress=False)
    with pytest.raises(ValueError, match="MAP head"):
        TinySiglip(dataclasses.replace(ENCODER, pool_head=False), vocab_size=8)
