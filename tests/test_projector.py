"""MM projector: shapes, the official 2x2 regional pooling formula, odd-grid masking, gradients."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from viq.mllm.projector import MMProjector

IN, D = 12, 16


def make(pool: str = "2x2", seed: int = 0) -> MMProjector:
    torch.manual_seed(seed)
    return MMProjector(IN, D, pool=pool).double()


def feats(h: int, w: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(h * w, IN, generator=g, dtype=torch.float64)


def reference(proj: MMProjector, x: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """Window-by-window loop: the official formula, with border windows using valid vectors only."""
    y = proj.proj1(x).reshape(h, w, D)
    rows = []
    for i in range(0, h, 2):
        row = []
        for j in range(0, w, 2):
            vs = [y[a, b] for a in (i, i + 1) for b in (j, j + 1) if a < h and b < w]
            m = torch.stack(vs).mean(0)
            s = torch.stack([proj.pooler.predictor(torch.cat([v, m])) for v in vs])  # (k, D)
            p = s.softmax(0)  # over positions, per channel
            row.append((p * torch.stack(vs)).sum(0))
        rows.append(torch.stack(row))
    pooled = proj.proj2(F.gelu(torch.stack(rows)))  # (h2, w2, D)
    toks = [proj.image_begin]
    for r in pooled:
        toks += list(r) + [proj.image_newline]
    toks.append(proj.image_end)
    return torch.stack(toks)


@pytest.mark.parametrize("grid", [(1, 1), (1, 7), (3, 5), (2, 2), (4, 6), (32, 32), (7, 1)])
@pytest.mark.parametrize("pool", ["2x2", "none"])
def test_shapes_and_token_count(grid, pool):
    proj = make(pool)
    h, w = grid
    (out,) = proj([feats(h, w, 0)], [grid])
    if pool == "2x2":
        expected = math.ceil(h / 2) * (math.ceil(w / 2) + 1) + 2
    else:
        expected = h * (w + 1) + 2
    assert out.shape == (expected, D) == (proj.num_tokens(grid), D)
    assert torch.isfinite(out).all()


def test_official_token_count_384():
    # 384x384 px = 24x24 patches -> 12*13+2 = 158 tokens (reference §10).
    assert MMProjector(IN, D).num_tokens((24, 24)) == 158


@pytest.mark.parametrize("grid", [(2, 2), (4, 6), (8, 8)])
def test_even_grid_matches_official_formula(grid):
    proj = make()
    x = feats(*grid, 1)
    (out,) = proj([x], [grid])
    torch.testing.assert_close(out, reference(proj, x, *grid), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("grid", [(1, 1), (1, 7), (3, 5), (5, 2), (7, 7)])
def test_odd_grid_border_windows_use_valid_vectors_only(grid):
    proj = make()
    x = feats(*grid, 2)
    (out,) = proj([x], [grid])
    torch.testing.assert_close(out, reference(proj, x, *grid), rtol=1e-12, atol=1e-12)


def test_odd_grid_ignores_padding_value():
    # A window with a single valid vector must return exactly that vector (softmax weight 1), so
    # the zero padding of the other three slots cannot leak into it.
    proj = make()
    x = feats(1, 1, 3)
    (out,) = proj([x], [(1, 1)])
    v = proj.proj1(x)[0]
    torch.testing.assert_close(out[1], proj.proj2(F.gelu(v)))


def test_none_pool_is_identity_pooling():
    proj = make("none")
    x = feats(3, 2, 4)
    (out,) = proj([x], [(3, 2)])
    y = proj.proj2(F.gelu(proj.proj1(x))).reshape(3, 2, D)
    torch.testing.assert_close(out[1:3], y[0])
    torch.testing.assert_close(out[3], proj.image_newline)
    torch.testing.assert_close(out[0], proj.image_begin)
    torch.testing.assert_close(out[-1], proj.image_end)


def test_several_images_independent():
    proj = make()
    grids = [(3, 5), (2, 2), (1, 7)]
    xs = [feats(h, w, i) for i, (h, w) in enumerate(grids)]
    outs = proj(xs, grids)
    for x, g, o in zip(xs, grids, outs):
        torch.testing.assert_close(o, proj([x], [g])[0])
    assert proj([], []) == []


@pytest.mark.parametrize("grid", [(3, 5), (4, 4)])
def test_gradient_reaches_every_parameter(grid):
    proj = make()
    x = feats(*grid, 5).requires_grad_()
    (out,) = proj([x], [grid])
    out.square().sum().backward()
    for name, p in proj.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
        assert torch.isfinite(p.grad).all(), name
    assert torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0


def test_parameter_names_and_init():
    torch.manual_seed(0)
    proj = MMProjector(8, 256)
    names = set(dict(proj.named_parameters()))
    assert {
        "proj1.weight",
        "pooler.predictor.0.weight",
        "pooler.predictor.2.weight",
        "proj2.weight",
        "image_newline",
        "image_begin",
        "image_end",
    } <= names
    assert proj.pooler.predictor[0].in_features == 512
    # N(0, 1/D): std ~ 1/16
    assert abs(proj.image_newline.std().item() - 1 / 16) < 0.02


def test_bad_input_raises():
    proj = make()
    with pytest.raises(ValueError, match="grid"):
        proj([feats(2, 3, 0)], [(3, 3)])
    with pytest.raises(ValueError, match="pool"):
        MMProjector(IN, D, pool="3x3")
