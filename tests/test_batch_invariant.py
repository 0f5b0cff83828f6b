"""The batch-invariant encoding mode: every pack filled to the token budget, attention one image per call.

On CPU the default packing is already bitwise invariant (tests/test_model.py); these tests check the
mechanism that makes it so on accelerators too, whose libraries pick kernels by matrix shape: every
GEMM of the mode sees the same number of rows, and no attention call holds more than one image.
"""

from __future__ import annotations

import pytest
import torch

import viq.model.attention as attention_module
from conftest import random_pixels
from viq import ViQModel
from viq.model.attention import Segments, attention
from viq.model.encoder import FILLER_SEGMENT, Packed

SIZES = [(32, 48), (16, 16), (64, 32), (48, 48), (16, 80), (32, 32)]


def _images(seed: int = 0) -> list[torch.Tensor]:
    return [random_pixels(h, w, seed + i) for i, (h, w) in enumerate(SIZES)]


def test_per_image_backend_equals_grouped_sdpa():
    g = torch.Generator().manual_seed(0)
    segments = Segments((5, 7, 5, 16, 7))
    q, k, v = (torch.randn(segments.total, 2, 8, generator=g) for _ in range(3))
    torch.testing.assert_close(attention(q, k, v, segments, "sdpa-per-image"), attention(q, k, v, segments, "sdpa"))


def test_long_filler_is_cut_into_short_segments():
    packed = Packed(((2, 3),), filler=2 * FILLER_SEGMENT + 7)
    assert packed.segments.lengths == (6, FILLER_SEGMENT, FILLER_SEGMENT, 7)
    assert packed.num_tokens == 6 + 2 * FILLER_SEGMENT + 7
    assert Packed(((2, 3),), filler=10).segments.lengths == (6, 10)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_invariant_mode_codes_do_not_depend_on_companions(dtype):
    model = ViQModel.from_config("viq-test", seed=0, components=["encoder"]).to(dtype=dtype)
    images = _images()
    budget = 64  # tokens (patch 16): packs of several images, filled to 64 rows

    def codes(batch):
        return [c.indices for c in model.encode_stream(batch, batch_tokens=budget, batch_invariant=True)]

    alone = [codes([x])[0] for x in images]
    together = codes(images)
    reversed_ = codes(images[::-1])[::-1]
    for a, b, c in zip(alone, together, reversed_):
        assert torch.equal(a, b) and torch.equal(a, c)


def test_invariant_mode_fixes_shapes_and_attention_per_image(monkeypatch):
    model = ViQModel.from_config("viq-test", seed=0, components=["encoder"])
    images = _images()
    budget = 64
    rows_seen: list[int] = []
    original_embed = model.encoder.embed

    def spy_embed(imgs, min_rows=16):
        tokens, packed = original_embed(imgs, min_rows)
        rows_seen.append(tokens.shape[0])
        return tokens, packed

    monkeypatch.setattr(model.encoder, "embed", spy_embed)
    batch_sizes: list[int] = []
    original_sdpa = attention_module._sdpa_batch

    def spy_sdpa(q, k, v):
        batch_sizes.append(q.shape[0])
        return original_sdpa(q, k, v)

    monkeypatch.setattr(attention_module, "_sdpa_batch", spy_sdpa)
    list(model.encode_stream(images, batch_tokens=budget, batch_invariant=True))
    lengths = [(h // 16) * (w // 16) for h, w in SIZES]
    # every pack holds exactly the budget (no image here is larger than the budget alone)
    assert rows_seen and all(r == budget for r in rows_seen)
    assert len(rows_seen) >= sum(lengths) / budget
    assert set(batch_sizes) == {1}  # never two images in one attention call
    # the layers' own setting is restored afterwards
    assert all(m.backend == "auto" for m in model.modules() if isinstance(getattr(m, "backend", None), str))

    rows_seen.clear()
    batch_sizes.clear()
    list(model.encode_stream(images, batch_tokens=budget, batch_invariant=False))
    assert sum(rows_seen) == sum(lengths)  # default CPU mode: no filler (all packs >= 16 rows here)


def test_invariant_mode_equals_default_on_cpu(test_model):
    """On CPU both modes give the same codes (the default is already invariant here)."""
    images = _images(seed=10)
    a = [c.indices for c in test_model.encode_stream(images, batch_tokens=64, batch_invariant=True)]
    b = [c.indices for c in test_model.encode_stream(images, batch_tokens=64, batch_invariant=False)]
    assert all(torch.equal(x, y) for x, y in zip(a, b))


def test_default_is_off_on_cpu(test_model, monkeypatch):
    seen = []
    original = test_model.indices_packed

    def spy(pixels, *, min_rows=0):
        seen.append(min_rows)
        return original(pixels, min_rows=min_rows)

    monkeypatch.setattr(test_model, "indices_packed", spy)
    list(test_model.encode_stream(_images(), batch_tokens=64))
    assert seen and set(seen) == {0}
