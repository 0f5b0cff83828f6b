"""Building blocks shared by the encoder, the code head and the decoders (timm naming and layout).

All blocks work on packed tokens: x is (T, C), the tokens of several images end to end, with a
:class:`~viq.model.attention.Segments` telling attention where each image starts and ends. Parameter names
match timm's ``VisionTransformer`` (``norm1``, ``attn.qkv``, ``attn.proj``, ``norm2``, ``mlp.fc1``,
``mlp.fc2``) so official and timm state dicts map one to one.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from viq.model.attention import Segments, attention

__all__ = ["Mlp", "Attention", "Block", "ResidualMlp", "MIN_ROWS", "pad_rows"]

#: Smallest number of rows given to a matrix multiply. CPU GEMM kernels take a different code path
#: for a handful of rows (results differ in the last bits), so a 1-patch image would get slightly
#: different numbers alone than packed with others. Padding every packed input to at least this many
#: rows keeps each image's numbers identical, whoever shares its batch.
MIN_ROWS = 16


def pad_rows(x: torch.Tensor, rows: int = MIN_ROWS) -> torch.Tensor:
    """Append zero rows to (N, ...) so it has at least ``rows`` rows."""
    if x.shape[0] >= rows:
        return x
    return torch.cat([x, x.new_zeros(rows - x.shape[0], *x.shape[1:])])


class Mlp(nn.Module):
    """fc1 -> GELU -> fc2. GELU is exact (erf) unless ``approximate="tanh"``."""

    def __init__(
        self, in_features: int, hidden_features: int, out_features: int | None = None, approximate: str = "none"
    ) -> None:
        super().__init__()
        self.fc1 = nn.Linear(in_features, hidden_features)
        self.fc2 = nn.Linear(hidden_features, out_features or in_features)
        self.approximate = approximate

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x), approximate=self.approximate))


class Attention(nn.Module):
    """Multi-head self-attention restricted to each packed segment.

    ``qkv`` output channels are [q | k | v], each split into contiguous per-head chunks.
    """

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool = True) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"dim {dim} not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)
        self.backend = "auto"

    def forward(self, x: torch.Tensor, segments: Segments) -> torch.Tensor:
        """x: (T, C) -> (T, C)."""
        t, c = x.shape
        q, k, v = self.qkv(x).view(t, 3, self.num_heads, c // self.num_heads).unbind(1)
        return self.proj(attention(q, k, v, segments, self.backend).reshape(t, c))


class Block(nn.Module):
    """Pre-norm ViT block: x + attn(LN(x)), then x + mlp(LN(x)). No layer-scale, no dropout."""

    def __init__(
        self,
        dim: int,
        num_heads: int,
        mlp_hidden: int,
        eps: float = 1e-6,
        qkv_bias: bool = True,
        approximate: str = "none",
    ) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=eps)
        self.attn = Attention(dim, num_heads, qkv_bias)
        self.norm2 = nn.LayerNorm(dim, eps=eps)
        self.mlp = Mlp(dim, mlp_hidden, approximate=approximate)

    def forward(self, x: torch.Tensor, segments: Segments) -> torch.Tensor:
        x = x + self.attn(self.norm1(x), segments)
        return x + self.mlp(self.norm2(x))


class ResidualMlp(nn.Module):
    """x + Mlp(LayerNorm(x)) (the official ``ResualMLP``; note its LayerNorm eps is 1e-5)."""

    def __init__(self, dim: int, hidden: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim, eps=eps)
        self.mlp = Mlp(dim, hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.mlp(self.norm(x))


def set_attention_backend(module: nn.Module, backend: str) -> None:
    """Set the attention backend of every attention layer under ``module``."""
    for m in module.modules():
        if hasattr(m, "backend") and isinstance(m.backend, str):
            m.backend = backend
