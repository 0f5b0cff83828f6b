"""Packed attention backends against a dense per-segment reference."""

from __future__ import annotations

import pytest
import torch

from viq.model.attention import Segments, attention, available_backends


def reference(q, k, v, lengths):
    out, start = [], 0
    for n in lengths:
        s = slice(start, start + n)
        scores = torch.einsum("qhd,khd->hqk", q[s].double(), k[s].double()) / q.shape[-1] ** 0.5
        out.append(torch.einsum("hqk,khd->qhd", scores.softmax(-1), v[s].double()))
        start += n
    return torch.cat(out).to(q.dtype)


@pytest.mark.parametrize("backend", available_backends("cpu"))
@pytest.mark.parametrize("lengths", [(7,), (3, 3, 3), (1, 12, 5, 12, 40), (64, 1)])
def test_backends_match_reference(backend, lengths):
    torch.manual_seed(0)
    t = sum(lengths)
    q, k, v = (torch.randn(t, 4, 16) for _ in range(3))
    out = attention(q, k, v, Segments(lengths), backend)
    torch.testing.assert_close(out, reference(q, k, v, lengths), atol=1e-5, rtol=1e-5)


def test_sdpa_segment_result_independent_of_neighbours():
    torch.manual_seed(0)
    q, k, v = (torch.randn(50, 2, 8) for _ in range(3))
    alone = attention(q[10:30], k[10:30], v[10:30], Segments((20,)), "sdpa")
    packed = attention(q, k, v, Segments((10, 20, 20)), "sdpa")
    assert torch.equal(packed[10:30], alone)


def test_sdpa_backward():
    """Gradients equal those of the per-segment reference, and none crosses a segment boundary."""
    torch.manual_seed(1)
    base = [torch.randn(9, 2, 8) for _ in range(3)]
    weights = torch.randn(9, 2, 8)  # a loss that weighs every output differently
    grads = []
    for fn in (
        lambda q, k, v: attention(q, k, v, Segments((4, 5)), "sdpa"),
        lambda q, k, v: reference(q, k, v, [4, 5]),
    ):
        q, k, v = (t.clone().requires_grad_() for t in base)
        (fn(q, k, v) * weights).sum().backward()
        grads.append((q.grad, k.grad, v.grad))
    for got, want in zip(grads[0], grads[1]):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    q, k, v = (t.clone().requires_grad_() for t in base)
    attention(q, k, v, Segments((4, 5)), "sdpa")[:4].sum().backward()  # the first segment's outputs only
    assert q.grad[:4].abs().sum() > 0 and q.grad[4:].abs().sum() == 0 and k.grad[4:].abs().sum() == 0


def test_errors():
    q = torch.randn(5, 1, 4)
    with pytest.raises(ValueError, match="packed length"):
        attention(q, q, q, Segments((2, 2)), "sdpa")
    with pytest.raises(ValueError, match="unknown attention backend"):
        attention(q, q, q, Segments((5,)), "nope")
    with pytest.raises(ValueError, match="positive"):
        Segments((3, 0))
    if "flash" not in available_backends("cpu"):
        with pytest.raises(RuntimeError, match="flash"):
            attention(q, q, q, Segments((5,)), "flash")
