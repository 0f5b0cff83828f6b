"""The code head: packed trunk tokens -> 4 FSQ codes per patch (position-aware head-wise FSQ).

Quantize path, for packed tokens x (T, C) of patch grids (h_i, w_i):

1. LayerNorm without affine (eps 1e-5).
2. ``num_blocks`` ViT blocks (attention within each image).
3. Expansion: Mlp(C -> 4C -> 4C), viewed as (4T, C): row 4n+j holds channels [jC, (j+1)C) of token n.
   The four sub-tokens j of a patch are not a spatial 2x2 sub-grid; they act as 4 attention heads.
   Then Mlp(C -> C -> C) per row.
4. ``code_blocks`` RoPE blocks: LN -> Linear C->a -> qkv, sub-token j is head j, 2D RoPE on q and k,
   attention over the patches of the same image (sub-token j only sees sub-token j), proj, Linear a->C,
   residual; then LN -> Mlp(C -> 4C -> C), residual. The 4 streams never mix.
5. Linear C -> d (d = the quantizer's dimension: the number of FSQ levels), the quantizer (FSQ in
   float32) -> indices (4T,), order 4*(y*w+x)+j. With ``fsq_on_bottleneck`` (the paper's layout):
   Linear C -> D, the bottleneck's limit (L-inf), Linear D -> d, the quantizer; the stage 2-1
   bottleneck (``project_in``) is kept and only ``fsq_in`` is new. The quantizer is any registered
   kind (:mod:`viq.model.quantizer`); the head only calls its ``quantize``.

The dequantize path (codes -> continuous features) is :class:`viq.model.decoders.CodeEmbedder`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from viq.model.attention import Segments, attention
from viq.model.config import HeadConfig
from viq.model.encoder import Packed
from viq.model.layers import Block, Mlp
from viq.model.quantizer import FSQ, Bottleneck, Quantized, Quantizer
from viq.model.rope import GoldenGateRoPE2d, apply_rotary

__all__ = ["CodeHead", "RoPEAttention", "RoPEBlock"]


class RoPEAttention(nn.Module):
    """Attention in which the ``heads`` consecutive rows of a patch are the heads (official
    ``RoPEAttentionHeadless``). Input (heads*T, C) -> output (heads*T, C)."""

    def __init__(self, dim: int, attn_dim: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        # The official block projects down only when the width exceeds the attention width.
        self.attn_dim = min(dim, attn_dim)
        self.decrease_dim = nn.Linear(dim, self.attn_dim) if dim > attn_dim else nn.Identity()
        self.qkv = nn.Linear(self.attn_dim, 3 * self.attn_dim)
        self.proj = nn.Linear(self.attn_dim, self.attn_dim)
        self.increase_dim = nn.Linear(self.attn_dim, dim) if dim > attn_dim else nn.Identity()
        self.backend = "auto"

    def forward(
        self, x: torch.Tensor, segments: Segments, theta: torch.Tensor | None, angle_dtype: torch.dtype | None
    ) -> torch.Tensor:
        """x: (heads*T, C); segments over the T patches; theta: (T, heads, a/2) angles or None."""
        a = self.attn_dim
        t = x.shape[0] // self.heads
        q, k, v = self.qkv(self.decrease_dim(x)).view(t, self.heads, 3, a).unbind(2)  # (T, heads, a)
        if theta is not None:
            q = apply_rotary(q, theta, angle_dtype)
            k = apply_rotary(k, theta, angle_dtype)
        o = attention(q, k, v, segments, self.backend)  # (T, heads, a)
        return self.increase_dim(self.proj(o.reshape(t * self.heads, a)))


class RoPEBlock(nn.Module):
    """Pre-norm block around :class:`RoPEAttention` (official ``RoPEBlockHeadless``)."""

    def __init__(self, dim: int, attn_dim: int, heads: int, mlp_hidden: int, eps: float) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=eps)
        self.attn = RoPEAttention(dim, attn_dim, heads)
        self.norm2 = nn.LayerNorm(dim, eps=eps)
        self.mlp = Mlp(dim, mlp_hidden)

    def forward(
        self, x: torch.Tensor, segments: Segments, theta: torch.Tensor | None, angle_dtype: torch.dtype | None
    ) -> torch.Tensor:
        x = x + self.attn(self.norm1(x), segments, theta, angle_dtype)
        return x + self.mlp(self.norm2(x))


class CodeHead(nn.Module):
    """Packed trunk tokens -> FSQ codes. See the module docstring for the layer order."""

    def __init__(self, width: int, cfg: HeadConfig) -> None:
        super().__init__()
        self.cfg = cfg
        e = cfg.codes_per_patch
        self.pre_norm_eps = cfg.pre_norm_eps
        self.blocks = nn.ModuleList(
            Block(width, cfg.num_heads, int(width * cfg.mlp_ratio), cfg.norm_eps) for _ in range(cfg.num_blocks)
        )
        self.expand = Mlp(width, e * width, e * width)
        self.expand_post = Mlp(width, width, width)
        self.code_blocks = nn.ModuleList(
            RoPEBlock(width, cfg.attn_dim, e, int(width * cfg.mlp_ratio), cfg.norm_eps) for _ in range(cfg.code_blocks)
        )
        self.project_in = nn.Linear(width, cfg.code_dim)
        self.limit: nn.Module | None = None
        self.fsq_in: nn.Linear | None = None
        if cfg.quantizes_on_bottleneck:
            self.limit = Bottleneck(cfg.bottleneck_limit)
            self.fsq_in = nn.Linear(cfg.bottleneck_dim, cfg.quantizer_dim)
        self.quantizer = cfg.quantizer_kind.build(cfg)
        if not isinstance(self.quantizer, Quantizer):
            raise TypeError(f"quantizer {cfg.quantizer!r} built a {type(self.quantizer).__name__}, not a Quantizer")
        attn_dim = min(width, cfg.attn_dim)
        self.rope = (
            GoldenGateRoPE2d(attn_dim, e, cfg.rope_min_freq, cfg.rope_max_freq, cfg.rope_zero_fraction)
            if cfg.rope
            else None
        )
        self.gradient_checkpointing = False

    def _run(self, block: nn.Module, *args):
        if self.gradient_checkpointing and torch.is_grad_enabled():
            return torch.utils.checkpoint.checkpoint(block, *args, use_reentrant=False)
        return block(*args)

    @property
    def quantizer_projection(self) -> nn.Linear:
        """The last linear map before the quantizer: ``fsq_in`` (D -> d) in the paper's layout, else
        ``project_in`` (C -> d). Data-dependent initialisation (:mod:`viq.train.fsq_init`) sets it."""
        return self.fsq_in if self.fsq_in is not None else self.project_in

    def projection_input(self, x: torch.Tensor, packed: Packed) -> torch.Tensor:
        """Packed trunk tokens (T, C) -> what :attr:`quantizer_projection` maps, (e*T, k) in the compute
        dtype: the limited bottleneck (k = D) in the paper's layout, else the code blocks' output (k = C)."""
        segments = packed.segments
        x = F.layer_norm(x, x.shape[-1:], eps=self.pre_norm_eps)
        for block in self.blocks:
            x = self._run(block, x, segments)
        t, c = x.shape
        x = self.expand(x).view(t * self.cfg.codes_per_patch, c)
        x = self.expand_post(x)
        theta = None
        if self.rope is not None:
            grids = list(packed.grids)
            if packed.filler:
                grids.append((1, packed.filler))  # the filler's angles are irrelevant but must exist
            theta = self.rope.packed_angles(grids, x.device)
        angle_dtype = x.dtype if self.cfg.rope_angle_dtype == "compute" else None
        for block in self.code_blocks:
            x = self._run(block, x, segments, theta, angle_dtype)
        if self.fsq_in is not None and self.limit is not None:  # built together (the paper's layout)
            return self.limit(self.project_in(x))
        return x

    def pre_quantize(self, x: torch.Tensor, packed: Packed) -> torch.Tensor:
        """Packed trunk tokens (T, C) -> pre-quantization values (e*T, d) in the compute dtype
        (d = FSQ levels, or the bottleneck / SimVQ width for those quantizers)."""
        return self.quantizer_projection(self.projection_input(x, packed))

    @property
    def fsq(self) -> FSQ:
        if not isinstance(self.quantizer, FSQ):
            raise AttributeError(f"this head quantizes with {type(self.quantizer).__name__}, not FSQ")
        return self.quantizer

    def forward(self, x: torch.Tensor, packed: Packed) -> Quantized:
        """Packed trunk tokens (T, C) -> :class:`~viq.model.quantizer.Quantized`: values (e*T, d) float32
        with the quantizer's gradient, indices (e*T,) int32 (None for a continuous quantizer), auxiliary
        loss (scalar). Values and indices include the filler rows; split with ``packed.split(..., e)``."""
        return self.quantizer.quantize(self.pre_quantize(x, packed))

    def quantize(self, x: torch.Tensor, packed: Packed) -> Quantized:
        """The same as calling the head (kept as the name the model's paths use)."""
        return self(x, packed)
