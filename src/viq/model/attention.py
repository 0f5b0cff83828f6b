"""Attention over packed sequences: many images concatenated along the token axis.

Every attention call in ViQ sees ``q, k, v`` of shape (T, H, Dh): the tokens of several images laid end
to end (NaViT-style packing), and a :class:`Segments` describing where each image starts and ends.
Attention is restricted to each image's own segment, so an image's result never depends on what else
is packed with it.

Backends (``backend=`` argument, or :func:`default_backend`):

* ``"sdpa"``: one ``F.scaled_dot_product_attention`` call per group of equal-length segments. Exact,
  supports backward, the fastest path on CPU, and a good GPU path when images share sizes.
* ``"flex"``: PyTorch FlexAttention over the whole pack with a document (block-diagonal) mask.
  Forward and backward on GPU (compiled); forward only on CPU.
* ``"flash"``: ``flash_attn.flash_attn_varlen_func`` (the official kernel), when the package is
  installed, on CUDA with fp16/bf16 tensors.
* ``"sdpa-per-image"``: one ``F.scaled_dot_product_attention`` call per segment, so the attention
  kernels see only that image's own shape, never its companions' (no batching of equal lengths).
  The batch-invariant encoding mode uses it (:meth:`viq.ViQModel.encode_stream`).
* ``"auto"``: ``flash`` if usable, else ``sdpa``.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from functools import lru_cache

import torch
import torch.nn.functional as F

__all__ = ["Segments", "attention", "available_backends", "default_backend", "BACKENDS"]

BACKENDS = ("auto", "sdpa", "sdpa-per-image", "flex", "flash")


@dataclass(frozen=True)
class Segments:
    """Lengths of the packed sequences. ``lengths[i]`` tokens of sequence i follow those of i-1."""

    lengths: tuple[int, ...]

    def __post_init__(self) -> None:
        if not self.lengths or any(n <= 0 for n in self.lengths):
            raise ValueError(f"segment lengths must be positive, got {self.lengths}")

    @property
    def total(self) -> int:
        return sum(self.lengths)

    @property
    def max_length(self) -> int:
        return max(self.lengths)

    @property
    def offsets(self) -> list[int]:
        """Cumulative starts, [0, n0, n0+n1, ..., total] (flash-attn's ``cu_seqlens``)."""
        out = [0]
        for n in self.lengths:
            out.append(out[-1] + n)
        return out

    def scaled(self, factor: int) -> Segments:
        """The same segments with every length multiplied (e.g. 4 codes per patch)."""
        return Segments(tuple(n * factor for n in self.lengths))

    def cu_seqlens(self, device: torch.device) -> torch.Tensor:
        return torch.tensor(self.offsets, dtype=torch.int32, device=device)

    def segment_ids(self, device: torch.device) -> torch.Tensor:
        """(T,) int32: the segment index of every token."""
        return torch.repeat_interleave(
            torch.arange(len(self.lengths), device=device, dtype=torch.int32),
            torch.tensor(self.lengths, device=device),
        )


def _flash_importable() -> bool:
    return importlib.util.find_spec("flash_attn") is not None


def available_backends(device: torch.device | str = "cpu") -> list[str]:
    """Backends that can run on ``device`` in this environment (forward pass)."""
    device = torch.device(device)
    out = ["sdpa", "sdpa-per-image"]
    if hasattr(torch.nn.attention, "flex_attention") or importlib.util.find_spec("torch.nn.attention.flex_attention"):
        out.append("flex")
    if device.type == "cuda" and _flash_importable():
        out.append("flash")
    return out


def default_backend(device: torch.device | str, dtype: torch.dtype) -> str:
    device = torch.device(device)
    if device.type == "cuda" and dtype in (torch.float16, torch.bfloat16) and _flash_importable():
        return "flash"
    return "sdpa"


def attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, segments: Segments, backend: str = "auto"
) -> torch.Tensor:
    """Softmax attention ``softmax(q k^T / sqrt(Dh)) v`` within each segment, non-causal.

    Args:
        q, k, v: (T, H, Dh) packed tokens, T = ``segments.total``.
        segments: lengths of the packed sequences.
        backend: one of :data:`BACKENDS`.

    Returns:
        (T, H, Dh), same dtype as ``q``.
    """
    if q.shape[0] != segments.total:
        raise ValueError(f"packed length {q.shape[0]} != sum of segment lengths {segments.total}")
    if backend == "auto":
        backend = default_backend(q.device, q.dtype)
    if backend == "sdpa":
        return _sdpa(q, k, v, segments)
    if backend == "sdpa-per-image":
        return _sdpa_per_segment(q, k, v, segments)
    if backend == "flex":
        return _flex(q, k, v, segments)
    if backend == "flash":
        return _flash(q, k, v, segments)
    raise ValueError(f"unknown attention backend {backend!r}; choose from {BACKENDS}")


def _sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, segments: Segments) -> torch.Tensor:
    if len(segments.lengths) == 1:
        return _sdpa_batch(q[None], k[None], v[None])[0]
    offsets = segments.offsets
    out = torch.empty_like(q)
    # Segments of equal length are stacked into one batched call: many same-size images (the common
    # fixed-resolution case) then cost one kernel launch, and per-element results are unchanged.
    by_length: dict[int, list[int]] = {}
    for i, n in enumerate(segments.lengths):
        by_length.setdefault(n, []).append(i)
    for n, members in by_length.items():
        starts = [offsets[i] for i in members]
        b = len(members)
        if starts[-1] - starts[0] == (b - 1) * n:
            # Consecutive equal-length segments (e.g. a batch of same-size images): a view, no copy.
            s = slice(starts[0], starts[0] + b * n)
            shape = (b, n, *q.shape[1:])
            out[s] = _sdpa_batch(q[s].view(shape), k[s].view(shape), v[s].view(shape)).reshape(b * n, *q.shape[1:])
            continue
        index = (torch.tensor(starts, device=q.device)[:, None] + torch.arange(n, device=q.device)).reshape(-1)
        shape = (b, n, *q.shape[1:])
        o = _sdpa_batch(q[index].view(shape), k[index].view(shape), v[index].view(shape))
        out[index] = o.reshape(-1, *q.shape[1:])
    return out


def _sdpa_per_segment(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, segments: Segments) -> torch.Tensor:
    out = torch.empty_like(q)
    offsets = segments.offsets
    for start, end in zip(offsets[:-1], offsets[1:]):
        out[start:end] = _sdpa_batch(q[None, start:end], k[None, start:end], v[None, start:end])[0]
    return out


def _sdpa_batch(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """(B, N, H, Dh) -> (B, N, H, Dh) full attention per batch element."""
    o = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
    return o.transpose(1, 2)


@lru_cache(maxsize=64)
def _document_block_mask(lengths: tuple[int, ...], device: str):
    from torch.nn.attention.flex_attention import create_block_mask

    seg = Segments(lengths).segment_ids(torch.device(device))

    def same_image(b, h, q_idx, kv_idx):
        return seg[q_idx] == seg[kv_idx]

    total = len(seg)
    return create_block_mask(same_image, B=None, H=None, Q_LEN=total, KV_LEN=total, device=device)


@lru_cache(maxsize=1)
def _compiled_flex():
    from torch.nn.attention.flex_attention import flex_attention

    return torch.compile(flex_attention, dynamic=True)


def _flex(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, segments: Segments) -> torch.Tensor:
    from torch.nn.attention.flex_attention import flex_attention

    mask = _document_block_mask(segments.lengths, str(q.device))
    # On CUDA the compiled kernel is the point of FlexAttention; on CPU the eager path is used
    # (forward only: PyTorch has no CPU backward for it).
    fn = _compiled_flex() if q.device.type == "cuda" else flex_attention
    o = fn(q.transpose(0, 1)[None], k.transpose(0, 1)[None], v.transpose(0, 1)[None], block_mask=mask)
    return o[0].transpose(0, 1)


def _flash(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, segments: Segments) -> torch.Tensor:
    if not _flash_importable():
        raise RuntimeError("attention backend 'flash' needs the flash-attn package (pip install flash-attn)")
    if q.device.type != "cuda" or q.dtype not in (torch.float16, torch.bfloat16):
        raise RuntimeError(f"attention backend 'flash' needs CUDA fp16/bf16 tensors, got {q.device} {q.dtype}")
    from flash_attn import flash_attn_varlen_func

    cu = segments.cu_seqlens(q.device)
    n = segments.max_length
    return flash_attn_varlen_func(q.contiguous(), k.contiguous(), v.contiguous(), cu, cu, n, n)
