"""Any-resolution ViT trunk: per-image patch embedding + resized position table, packed blocks.

Images of different sizes are patchified one by one, their token sequences concatenated (NaViT-style
packing) and run through the transformer blocks together; attention stays within each image.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from viq.model.attention import Segments
from viq.model.config import EncoderConfig
from viq.model.layers import MIN_ROWS, Block, Mlp, pad_rows

__all__ = ["Packed", "ViTEncoder", "AttentionPool", "pad_to_patches", "resize_pos_embed", "FILLER_SEGMENT"]

#: Longest attention segment a filler is cut into (see :attr:`Packed.segments`).
FILLER_SEGMENT = 256


@dataclass(frozen=True)
class Packed:
    """Layout of a pack: the patch grid (h, w) of each image, in order. A trailing filler segment
    (``filler`` tokens, not an image) may follow the images."""

    grids: tuple[tuple[int, int], ...]
    filler: int = 0

    @property
    def lengths(self) -> list[int]:
        return [h * w for h, w in self.grids]

    @property
    def segments(self) -> Segments:
        # A long filler is cut into short segments: attention over one filler segment of thousands
        # of tokens would cost more than the images it pads.
        chunks = (FILLER_SEGMENT,) * (self.filler // FILLER_SEGMENT)
        rest = self.filler % FILLER_SEGMENT
        return Segments(tuple(self.lengths) + chunks + ((rest,) if rest else ()))

    @property
    def num_tokens(self) -> int:
        return sum(self.lengths) + self.filler

    def split(self, x: torch.Tensor, per_token: int = 1) -> list[torch.Tensor]:
        """Split a packed (T * per_token, ...) tensor into per-image tensors (filler dropped)."""
        sizes = [n * per_token for n in self.lengths]
        return list(x[: sum(sizes)].split(sizes))


def pad_to_patches(pixels: torch.Tensor, patch_size: int) -> torch.Tensor:
    """Zero-pad (C, H, W) on the right and bottom to multiples of ``patch_size``.

    Zero in normalised [-1, 1] space is mid-grey: this is the official behaviour.
    """
    h, w = pixels.shape[-2:]
    pad_h, pad_w = (-h) % patch_size, (-w) % patch_size
    if pad_h or pad_w:
        pixels = F.pad(pixels, (0, pad_w, 0, pad_h))
    return pixels


def resize_pos_embed(pos_embed: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """Resize a (1, G*G, C) row-major position table to an (h, w) grid: (h*w, C).

    Bilinear, align_corners=False, no antialiasing, in the table's dtype (the official rule). The
    table is used unchanged when (h, w) == (G, G).
    """
    n, c = pos_embed.shape[1:]
    g = int(n**0.5)
    if grid == (g, g):
        return pos_embed[0]
    table = pos_embed[0].T.reshape(1, c, g, g)
    table = F.interpolate(table, size=grid, mode="bilinear", align_corners=False)
    return table.reshape(c, -1).T


class ViTEncoder(nn.Module):
    """SigLIP2-style ViT without class token; returns packed last-block tokens (no final norm).

    Parameter names follow timm (``patch_embed.proj``, ``pos_embed``, ``blocks.i``, ``norm``,
    ``attn_pool``) so official and timm/open_clip state dicts load with a plain prefix map.
    """

    def __init__(self, cfg: EncoderConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.patch_embed = nn.Module()
        self.patch_embed.proj = nn.Conv2d(3, cfg.width, cfg.patch_size, cfg.patch_size)
        self.pos_embed = nn.Parameter(torch.randn(1, cfg.pos_grid**2, cfg.width) * 0.02)
        approximate = "tanh" if cfg.mlp_act == "gelu_tanh" else "none"
        self.blocks = nn.ModuleList(
            Block(cfg.width, cfg.num_heads, cfg.mlp_hidden, cfg.norm_eps, cfg.qkv_bias, approximate)
            for _ in range(cfg.depth)
        )
        self.pool = (
            AttentionPool(cfg.width, cfg.num_heads, cfg.mlp_hidden, cfg.norm_eps, approximate)
            if cfg.pool_head
            else None
        )
        self.gradient_checkpointing = False
        self._pos_cache: dict[tuple, torch.Tensor] = {}

    def position_table(self, grid: tuple[int, int]) -> torch.Tensor:
        """The position table resized to ``grid``: (h*w, C). Cached when no gradient is needed; the
        cache key includes the table's version counter, so in-place weight updates invalidate it."""
        table = self.pos_embed
        if torch.is_grad_enabled():
            return resize_pos_embed(table, grid)
        key = (grid, table.dtype, table.device, table._version, table.data_ptr())
        cached = self._pos_cache.get(key)
        if cached is None:
            if len(self._pos_cache) >= 64:
                self._pos_cache.clear()
            cached = self._pos_cache[key] = resize_pos_embed(table, grid)
        return cached

    def embed(self, images: list[torch.Tensor], min_rows: int = MIN_ROWS) -> tuple[torch.Tensor, Packed]:
        """Patchify and add positions.

        Args:
            images: list of (3, H, W) normalised pixels; H and W multiples of the patch size.
            min_rows: a pack with fewer tokens gets a filler segment up to this many (batch-invariant
                encoding passes its token budget, so every pack has the same shape).

        Returns:
            tokens: (T, C) packed, T = sum of h*w (+ filler); layout: the :class:`Packed` pack.

        The patch embedding (a conv with stride = kernel = patch size) is one matrix product over the
        patches of all images: (T, 3*p*p) x (3*p*p, C). Each row is one patch, so an image's tokens do not
        depend on its companions (GEMM rows are independent; see viq.model.layers.MIN_ROWS), and a batch
        of small images costs one kernel instead of one convolution each. Each distinct grid's position
        table is resized once per call.
        """
        p = self.cfg.patch_size
        weight = self.patch_embed.proj.weight  # (C, 3, p, p)
        patches, grids = [], []
        for img in images:
            if img.ndim != 3 or img.shape[0] != 3 or img.shape[1] % p or img.shape[2] % p:
                raise ValueError(f"expected (3, H, W) pixels padded to multiples of {p}, got {tuple(img.shape)}")
            h, w = img.shape[1] // p, img.shape[2] // p
            # (3, h*p, w*p) -> (h, w, 3, p, p) -> (h*w, 3*p*p): row-major patches, channels-first inside
            patches.append(img.reshape(3, h, p, w, p).permute(1, 3, 0, 2, 4).reshape(h * w, 3 * p * p))
            grids.append((h, w))
        total = sum(h * w for h, w in grids)
        # A pack shorter than MIN_ROWS gets a filler segment (its own attention segment, so it
        # touches no image), keeping every GEMM on the same kernel path (see viq.model.layers.MIN_ROWS).
        filler = max(0, max(min_rows, MIN_ROWS) - total)
        x = torch.cat(patches).to(weight.dtype)
        x = F.linear(pad_rows(x, total + filler), weight.flatten(1), self.patch_embed.proj.bias)
        tables = {grid: self.position_table(grid) for grid in dict.fromkeys(grids)}
        positions = [tables[grid] for grid in grids]
        if filler:
            positions.append(x.new_zeros(filler, x.shape[1]))
        return x + torch.cat(positions), Packed(tuple(grids), filler)

    def forward(self, images: list[torch.Tensor], min_rows: int = MIN_ROWS) -> tuple[torch.Tensor, Packed]:
        """list of (3, H, W) -> packed (T, C) last-block tokens (no final norm), and the layout
        (``min_rows``: see :meth:`embed`)."""
        x, packed = self.embed(images, min_rows)
        segments = packed.segments
        for block in self.blocks:
            if self.gradient_checkpointing and torch.is_grad_enabled():
                x = torch.utils.checkpoint.checkpoint(block, x, segments, use_reentrant=False)
            else:
                x = block(x, segments)
        return x, packed


class AttentionPool(nn.Module):
    """Final LayerNorm + MAP head (timm ``AttentionPoolLatent``, one latent query): one vector per image.

    Used by the self-distillation loss; not on the code path.
    """

    def __init__(self, dim: int, num_heads: int, mlp_hidden: int, eps: float = 1e-6, approximate: str = "none") -> None:
        super().__init__()
        self.num_heads = num_heads
        self.norm_in = nn.LayerNorm(dim, eps=eps)  # the trunk's final `norm`
        self.latent = nn.Parameter(torch.randn(1, 1, dim) * dim**-0.5)
        self.q = nn.Linear(dim, dim)
        self.kv = nn.Linear(dim, 2 * dim)
        self.proj = nn.Linear(dim, dim)
        self.norm = nn.LayerNorm(dim, eps=eps)
        self.mlp = Mlp(dim, mlp_hidden, approximate=approximate)

    def forward(self, features: list[torch.Tensor]) -> torch.Tensor:
        """list of (N_i, C) per-image features -> (B, C) pooled embeddings.

        Per-token work (norm, key/value projection) runs once over all images; images with the same
        number of tokens share one attention call (one query each), like the packed trunk attention.
        """
        c = self.latent.shape[-1]
        dh = c // self.num_heads
        lengths = [f.shape[0] for f in features]
        q = self.q(self.latent[0]).view(1, self.num_heads, dh).transpose(0, 1)  # (H, 1, dh)
        kv = self.kv(self.norm_in(torch.cat(features)))
        pooled = kv.new_empty(len(features), c)
        offsets = [0]
        for n in lengths:
            offsets.append(offsets[-1] + n)
        by_length: dict[int, list[int]] = {}
        for i, n in enumerate(lengths):
            by_length.setdefault(n, []).append(i)
        for n, members in by_length.items():
            rows = torch.cat([torch.arange(offsets[i], offsets[i] + n, device=kv.device) for i in members])
            k, v = kv[rows].view(len(members), n, 2, self.num_heads, dh).permute(2, 0, 3, 1, 4)  # (B, H, n, dh)
            o = F.scaled_dot_product_attention(q[None].expand(len(members), -1, -1, -1), k, v)  # (B, H, 1, dh)
            pooled = pooled.index_copy(0, torch.tensor(members, device=kv.device), o.reshape(len(members), c))
        o = self.proj(pooled)
        return o + self.mlp(self.norm(o))
