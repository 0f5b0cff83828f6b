"""The encoding loop (:func:`encode_keyed`, behind every ``ViQModel.encode*``): how images are grouped
into forward passes, and the contexts that keep an image's codes independent of that grouping: packing
by a token budget, input checks, per-item errors, exact float32 on CUDA and per-image attention."""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

import torch
from torch import nn

from viq._progress import progress_bar
from viq.formats.codes import Codes
from viq.formats.image import PreparedImage, PreprocessConfig, padded_grid
from viq.formats.image import preprocess as prepare
from viq.model.attention import BACKENDS as ATTENTION_BACKENDS
from viq.model.attention import default_backend

__all__ = [
    "encode_keyed",
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


@dataclasses.dataclass
class _Slot:
    """One item waiting in :func:`encode_keyed`: its position, the caller's key, its name, and its
    pixels -- or the error that stopped it before encoding."""

    index: int
    key: Any
    name: str
    pixels: torch.Tensor | None
    error: Exception | None = None


def encode_keyed(
    model: Any,
    pairs: Iterable[tuple[Any, Any]],
    *,
    preprocess: PreprocessConfig,
    batch_tokens: int,
    progress: bool = False,
    batch_invariant: bool = False,
    total: int | None = None,
) -> Iterator[tuple[Any, Codes | Exception]]:
    """The encoding loop of ``model`` (a :class:`viq.model.viq.ViQModel` with its encoder; callers use
    its ``encode_keyed``): encode ``(key, item)`` pairs, yield ``(key, codes or error)`` in input order.

    Args:
        pairs: any iterable (read lazily, so it may be a generator) of (key, item); the key is anything,
            handed back with the item's result; an item is
            - an image source: a path, encoded bytes, a PIL image, a uint8 (H, W, 3) array, prepared
              with ``preprocess``;
            - a :class:`viq.formats.image.PreparedImage` (already prepared; its ``source`` names it);
            - a float tensor (3, H, W) or (1, 3, H, W) in [-1, 1], encoded as it is.
        preprocess: resolution policy for image sources.
        batch_tokens: packing budget. Items are collected until they hold at least this many patch
            tokens, then encoded in packs of at most this many (:func:`pack_by_budget`).
        progress: show a progress bar (one step per item; ``total`` items if given).
        batch_invariant: make every image's codes independent of its batch companions on any device.
            Every pack is filled to exactly ``batch_tokens`` rows (a filler segment), so each matrix
            multiply has the same shape whoever shares the pack, and attention runs one image per call
            (``sdpa-per-image``; ``flash`` varlen is kept, it is per image by construction). Wanted on
            accelerators, whose libraries choose kernels by shape; on CPU today's packing is already
            bitwise invariant (tested), so the filler would only cost time.

    Yields:
        for each pair, in input order, ``(key, result)``: its :class:`Codes`, or the exception that
        stopped it: the error raised while reading or checking it (``ImageError`` names the source), or
        an :class:`EncodeError` naming it if the forward pass failed. A failing pack is retried one item
        at a time, so one bad image never takes others down with it. Codes do not depend on how items
        are packed (each image attends only to itself).
    """
    min_rows = batch_tokens if batch_invariant else 0
    patch = model.patch_size
    slots: list[_Slot] = []  # the buffered items, in order
    tokens = 0
    bar = progress_bar(total, "encode", show=bool(progress))
    try:
        for i, (key, item) in enumerate(pairs):
            try:
                pixels = check_pixels(item, f"item {i}") if isinstance(item, torch.Tensor) else None
                if pixels is None:
                    prepared = item if isinstance(item, PreparedImage) else prepare(item, preprocess)
                    pixels, name = prepared.pixels, prepared.source
                else:
                    name = f"item {i}"
            except Exception as e:  # noqa: BLE001 - one bad image must not stop the stream
                slots.append(_Slot(i, key, "", None, e))
            else:
                slots.append(_Slot(i, key, name, pixels))
                tokens += num_tokens(pixels, patch)
            if tokens >= batch_tokens or tokens == 0:  # nothing waiting: errors go out at once
                yield from _encode_slots(model, slots, batch_tokens, min_rows)
                bar.update(len(slots))
                slots, tokens = [], 0
        yield from _encode_slots(model, slots, batch_tokens, min_rows)
        bar.update(len(slots))
    finally:
        bar.close()


def _encode_slots(
    model: Any, slots: list[_Slot], batch_tokens: int, min_rows: int
) -> list[tuple[Any, Codes | Exception]]:
    """Encode the buffered items of :func:`encode_keyed` (errors pass through), in order."""
    results: dict[int, Codes | Exception] = {k: s.error for k, s in enumerate(slots) if s.error is not None}
    waiting = [k for k, s in enumerate(slots) if s.pixels is not None]
    lengths = [num_tokens(slots[k].pixels, model.patch_size) for k in waiting]
    for pack in pack_by_budget(lengths, batch_tokens):
        ks = [waiting[j] for j in pack]
        for k, result in zip(ks, _encode_pack(model, [slots[k] for k in ks], min_rows)):
            results[k] = result
    return [(s.key, results[k]) for k, s in enumerate(slots)]


def _encode_pack(model: Any, pack: list[_Slot], min_rows: int) -> list[Codes | Exception]:
    """One forward pass over ``pack``; on failure, one item at a time."""
    try:
        indices = model.indices_packed([s.pixels for s in pack if s.pixels is not None], min_rows=min_rows)
    except (RuntimeError, ValueError) as e:  # includes CUDA out-of-memory
        if len(pack) > 1:
            return [r for slot in pack for r in _encode_pack(model, [slot], min_rows)]
        slot = pack[0]
        error = EncodeError(f"{slot.name}: encoding failed: {e}", index=slot.index, source=slot.name)
        error.__cause__ = e
        return [error]
    p = model.patch_size
    return [
        Codes(
            idx.view(*padded_grid(s.pixels.shape[1], s.pixels.shape[2], p), -1).cpu(),
            model.levels,
            image_size=tuple(s.pixels.shape[1:]),
            patch_size=p,
        )
        for s, idx in zip(pack, indices)
        if s.pixels is not None
    ]
