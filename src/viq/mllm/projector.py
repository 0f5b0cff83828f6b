"""MM projector: ViQ image features -> LLM input embeddings (the official ``oryx_mlp_v2`` layout).

One image's features are ``(h*w, in_dim)``, one vector per 16x16 patch in row-major order over its
``(h, w)`` patch grid. The projector turns them into ``num_tokens((h, w))`` LLM embeddings:

    proj1 (in -> D) -> regional 2x2 pooling -> GELU -> proj2 (D -> D)
    -> image_newline after every pooled row -> image_begin ... image_end

Regional pooling (official ``NormalizedDwPooler``): for each non-overlapping 2x2 window with vectors
``v_k`` and mean ``m``, a predictor MLP scores ``s_k = predictor([v_k ; m])`` (2D -> D); a softmax over
the window positions, separately per channel, weights the sum ``sum_k softmax(s)_k * v_k``.

Difference from official: official reshapes the grid into 2x2 windows and crashes on an odd ``h`` or
``w`` (its §15.9). Here a window that hangs off the right/bottom border holds only its valid vectors:
the mean is over valid vectors and the softmax over valid positions (the others get score -inf). On an
even grid every window is full and the result is the official one.

Parameter names follow official (``proj1``, ``pooler.predictor.{0,2}``, ``proj2``, ``image_newline``,
``image_begin``, ``image_end``) so official projector weights load with a plain ``load_state_dict``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["MMProjector", "RegionalPooler", "POOL_MODES"]

#: Supported pooling modes: official 2x2 regional pooling, or none (official ``REGIONAL_POOL=1x``,
#: whose one-element softmax makes the pooler an identity, so it is skipped entirely).
POOL_MODES = ("2x2", "none")


class RegionalPooler(nn.Module):
    """Learned 2x2 regional pooling (official ``NormalizedDwPooler``), safe on odd grids."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.dim = dim
        # Sequential indices 0 and 2 match the official state-dict names.
        self.predictor = nn.Sequential(nn.Linear(2 * dim, dim), nn.GELU(), nn.Linear(dim, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Pool one image, or a batch of images of the same grid.

        Args:
            x: (h, w, D) features of one image, or (B, h, w, D) of B images.

        Returns:
            (ceil(h/2), ceil(w/2), D) pooled features (with the leading B when given).
        """
        if x.ndim == 4:
            return self._pool(x)
        return self._pool(x[None])[0]

    def _pool(self, x: torch.Tensor) -> torch.Tensor:
        b, h, w, d = x.shape
        h2, w2 = math.ceil(h / 2), math.ceil(w / 2)
        ph, pw = 2 * h2 - h, 2 * w2 - w
        # Zero-pad odd grids to even; a validity mask keeps padded slots out of the mean and softmax.
        valid = torch.ones(h, w, dtype=torch.bool, device=x.device)
        if ph or pw:
            x = F.pad(x, (0, 0, 0, pw, 0, ph))
            valid = F.pad(valid, (0, pw, 0, ph), value=False)
        # (B, h2, 2, w2, 2, D) -> (B, h2, w2, 4, D); window position k = 2*dy + dx (row-major in the window).
        v = x.reshape(b, h2, 2, w2, 2, d).permute(0, 1, 3, 2, 4, 5).reshape(b, h2, w2, 4, d)
        valid = valid.reshape(h2, 2, w2, 2).permute(0, 2, 1, 3).reshape(h2, w2, 4, 1)
        if ph or pw:
            count = valid.sum(dim=2, keepdim=True).to(v.dtype)  # >= 1: every window has its top-left
            mean = (v * valid).sum(dim=3, keepdim=True) / count
        else:
            mean = v.mean(dim=3, keepdim=True)  # the official formula, bit for bit on even grids
        scores = self.predictor(torch.cat([v, mean.expand_as(v)], dim=-1))  # (B, h2, w2, 4, D)
        if ph or pw:
            scores = scores.masked_fill(~valid, float("-inf"))
        weights = scores.softmax(dim=3)  # over the window positions, per channel
        return (weights * v).sum(dim=3)


class MMProjector(nn.Module):
    """Official ``oryx_mlp_v2`` projector (single view) with odd-grid-safe pooling.

    Args:
        in_dim: image feature width C (1536 for ViQ ``x_low``).
        out_dim: LLM hidden size D.
        pool: ``"2x2"`` (official regional pooling) or ``"none"``.
    """

    def __init__(self, in_dim: int, out_dim: int, pool: str = "2x2") -> None:
        super().__init__()
        if pool not in POOL_MODES:
            raise ValueError(f"pool must be one of {POOL_MODES}, got {pool!r}")
        self.in_dim, self.out_dim, self.pool = in_dim, out_dim, pool
        self.proj1 = nn.Linear(in_dim, out_dim)
        # No pooler parameters in "none" mode: they would get no gradient (DDP complains about that).
        self.pooler = RegionalPooler(out_dim) if pool == "2x2" else None
        self.proj2 = nn.Linear(out_dim, out_dim)
        std = 1.0 / math.sqrt(out_dim)  # official: N(0, 1/D)
        self.image_newline = nn.Parameter(torch.randn(out_dim) * std)
        self.image_begin = nn.Parameter(torch.randn(out_dim) * std)
        self.image_end = nn.Parameter(torch.randn(out_dim) * std)

    def pooled_grid(self, grid: tuple[int, int]) -> tuple[int, int]:
        """(rows, cols) of the pooled grid for an (h, w) patch grid."""
        h, w = grid
        if self.pool == "2x2":
            return math.ceil(h / 2), math.ceil(w / 2)
        return h, w

    def num_tokens(self, grid: tuple[int, int]) -> int:
        """LLM tokens for one image: rows * (cols + 1 newline) + begin + end."""
        rows, cols = self.pooled_grid(grid)
        return rows * (cols + 1) + 2

    def forward(self, features: Sequence[torch.Tensor], grids: Sequence[tuple[int, int]]) -> list[torch.Tensor]:
        """Project images.

        Args:
            features: per image (h*w, in_dim), row-major over the patch grid.
            grids: per image (h, w).

        Returns:
            per image (num_tokens((h, w)), out_dim).
        """
        if len(features) != len(grids):
            raise ValueError(f"{len(features)} feature tensors but {len(grids)} grids")
        for i, (f, (h, w)) in enumerate(zip(features, grids)):
            if h < 1 or w < 1 or f.shape != (h * w, self.in_dim):
                raise ValueError(f"image {i}: features {tuple(f.shape)} do not match grid ({h}, {w}) x {self.in_dim}")
        if not features:
            return []
        # proj1 and proj2 are per-token, so each runs once over all images; images of the same grid
        # are pooled together.
        x_all = self.proj1(torch.cat(list(features)))
        per_image = x_all.split([h * w for h, w in grids])
        by_grid: dict[tuple[int, int], list[int]] = {}
        for i, grid in enumerate(grids):
            by_grid.setdefault(tuple(grid), []).append(i)
        pooled: list[torch.Tensor | None] = [None] * len(grids)
        for (h, w), members in by_grid.items():
            x = torch.stack([per_image[i] for i in members]).reshape(len(members), h, w, self.out_dim)
            if self.pooler is not None:
                x = self.pooler(x)
            for i, y in zip(members, x.unbind(0)):
                pooled[i] = y
        sizes = [y.shape[0] * y.shape[1] for y in pooled]
        x_all = self.proj2(F.gelu(torch.cat([y.reshape(-1, self.out_dim) for y in pooled])))
        out = []
        for x, y in zip(x_all.split(sizes), pooled):
            rows, cols = y.shape[:2]
            d = self.out_dim
            x = torch.cat([x.reshape(rows, cols, d), self.image_newline.to(x.dtype).expand(rows, 1, d)], dim=1)
            out.append(
                torch.cat(
                    [
                        self.image_begin.to(x.dtype)[None],
                        x.reshape(rows * (cols + 1), d),
                        self.image_end.to(x.dtype)[None],
                    ]
                )
            )
        return out
