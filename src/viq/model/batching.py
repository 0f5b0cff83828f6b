"""How :meth:`~viq.model.viq.ViQModel.encode_stream` groups images into forward passes, and the
contexts that keep an image's codes independent of that grouping: packing by a token budget, input
checks, per-item errors, exact float32 on CUDA and per-image attention."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from typing import Any

import torch
from torch import nn

from viq.formats.codes import Codes
from viq.formats.image import padded_grid
from viq.model.attention import BACKENDS as ATTENTION_BACKENDS
from viq.model.attention import default_backend

__all__ = [
    "pack_by_budget",
    "EncodeError",
    "check_pixels",
    "num_tokens",
    "all_or_raise",
    "exact_float32",
    "per_image_attention",
]


def pack_by_budget(lengths: Sequence[int], budget: int) -> list[list[int]]:
    """Group item indices, in order, into packs of at most ``budget`` tokens (an item longer than the
    budget gets a pack of its own). Packing never changes an image's codes; it only sets how much
    work one forward pass does."""
    packs: list[list[int]] = []
    current: list[int] = []
    used = 0
    for i, n in enumerate(lengths):
        if current and used + n > budget:
            packs.append(current)
            current, used = [], 0
        current.append(i)
        used += n
    if current:
        packs.append(current)
    return packs


class EncodeError(RuntimeError):
    """The forward pass failed for one item of :meth:`ViQModel.encode_stream` (the message names it;
    ``__cause__`` is the original error)."""

    def __init__(self, message: str, *, index: int, source: str) -> None:
        super().__init__(message)
        self.index = index  # position in the stream
        self.source = source  # the item's name: a path, PreparedImage.source or "item <index>"


def check_pixels(p: Any, what: str) -> torch.Tensor:
    """A float (3, H, W) or (1, 3, H, W) tensor -> (3, H, W); anything else is a TypeError/ValueError."""
    if not isinstance(p, torch.Tensor) or not p.is_floating_point():
        raise TypeError(f"{what}: expected a float tensor, got {type(p).__name__}")
    if p.ndim == 4 and p.shape[0] == 1:
        p = p[0]
    if p.ndim != 3 or p.shape[0] != 3 or p.shape[1] < 1 or p.shape[2] < 1:
        raise ValueError(f"{what}: expected shape (3, H, W) or (1, 3, H, W), got {tuple(p.shape)}")
    return p


def num_tokens(pixels: torch.Tensor, patch_size: int) -> int:
    """Patch tokens of (3, H, W) pixels after zero-padding to multiples of ``patch_size``."""
    h, w = padded_grid(pixels.shape[1], pixels.shape[2], patch_size)
    return h * w


def all_or_raise(stream: Iterator[Codes | Exception]) -> list[Codes]:
    """Drain an :meth:`ViQModel.encode_stream`; raise the first error as the list API always has
    (the original exception, not its :class:`EncodeError` wrapper)."""
    out: list[Codes] = []
    try:
        for result in stream:
            if isinstance(result, EncodeError) and isinstance(result.__cause__, Exception):
                raise result.__cause__
            if isinstance(result, Exception):
                raise result
            out.append(result)
    finally:
        stream.close()  # type: ignore[attr-defined]
    return out


@contextlib.contextmanager
def exact_float32(device: torch.device, dtype: torch.dtype) -> Iterator[None]:
    """Disable TF32 for float32 work on CUDA: TF32 matmuls/convs move values by ~1e-3, enough to flip
    codes whose rounding margin is small. No effect elsewhere."""
    if device.type != "cuda" or dtype != torch.float32:
        yield
        return
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


@contextlib.contextmanager
def per_image_attention(model: nn.Module, enabled: bool) -> Iterator[None]:
    """Within the block, attention layers that would batch images together run one image per call
    (``flash`` varlen already computes each sequence on its own and is kept)."""
    if not enabled:
        yield
        return
    saved = {}
    for m in model.modules():
        backend = getattr(m, "backend", None)
        if isinstance(backend, str) and backend in ATTENTION_BACKENDS:
            saved[m] = backend
            weight = next(m.parameters(), None)
            resolved = backend if backend != "auto" or weight is None else default_backend(weight.device, weight.dtype)
            if resolved != "flash":
                m.backend = "sdpa-per-image"
    try:
        yield
    finally:
        for m, backend in saved.items():
            m.backend = backend
