"""Finite Scalar Quantization (Mentzer et al. 2023) with the official ViQ arithmetic.

Each of the d = ``len(levels)`` channels is bounded with a shifted tanh and rounded to one of
``levels[k]`` integer values; the tuple of rounded values is the code and its mixed-radix number
(dim 0 least significant) the index. The codebook is implicit: ``indices_to_codes`` computes it.

Quantization always runs in float32, whatever the input dtype: in bfloat16 the bounded values cannot
be rounded reliably and whole codebooks collapse (the failure reported in vector-quantize-pytorch
#114). The float32 formulas reproduce the official ones bit for bit.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["FSQ", "Bottleneck", "SimVQ"]


class FSQ(nn.Module):
    """FSQ with an implicit codebook; no learned parameters (the state dict is empty).

    Args:
        levels: number of values per channel, e.g. (8, 8, 8, 6, 5) -> K = 15360 codes.
        eps: the official bound margin (values are bounded to +-(L-1)(1+eps)/2 before rounding).
    """

    def __init__(self, levels: Sequence[int], eps: float = 1e-3) -> None:
        super().__init__()
        self.levels = tuple(int(v) for v in levels)
        self.eps = eps
        levels_t = torch.tensor(self.levels, dtype=torch.int32)
        basis = torch.cumprod(torch.tensor((1,) + self.levels[:-1], dtype=torch.int64), dim=0)
        # Buffers are non-persistent: they are a function of `levels`, which the config carries.
        self.register_buffer("_levels", levels_t, persistent=False)
        self.register_buffer("_basis", basis, persistent=False)

    @property
    def codebook_size(self) -> int:
        return math.prod(self.levels)

    @property
    def dim(self) -> int:
        return len(self.levels)

    def _constants(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        # Same expressions, dtypes and order of operations as the official code, so the float32
        # results are bit-identical: int32 levels * python float -> float32.
        levels = self._levels
        half_l = (levels - 1) * (1 + self.eps) / 2
        offset = torch.where(levels % 2 == 0, 0.5, 0.0)
        shift = (offset / half_l).atanh()
        return half_l, offset, shift, levels // 2

    def bound(self, z: torch.Tensor) -> torch.Tensor:
        """(..., d) any float dtype -> (..., d) float32 bounded values in (-L/2, L/2)."""
        half_l, offset, shift, _ = self._constants()
        return (z.float() + shift).tanh() * half_l - offset

    def quantize(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Quantize continuous values.

        Args:
            z: (..., d) pre-quantization values (output of the projection), any float dtype.

        Returns:
            codes: (..., d) float32 code values in [-1, 1] (q / (L // 2)), with a straight-through
                gradient to ``z``.
            indices: (...) int32 codebook indices in [0, K).
        """
        bounded = self.bound(z)
        rounded = bounded.round()
        # Straight-through estimator: forward value round(b), gradient of b.
        quantized = bounded + (rounded - bounded).detach()
        half_width = self._levels // 2
        codes = quantized / half_width
        indices = self._level_indices_to_indices(rounded.to(torch.int64) + half_width)
        return codes, indices

    def forward(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.quantize(z)

    def _level_indices_to_indices(self, level_indices: torch.Tensor) -> torch.Tensor:
        return (level_indices.to(torch.int64) * self._basis).sum(-1).to(torch.int32)

    def codes_to_indices(self, codes: torch.Tensor) -> torch.Tensor:
        """(..., d) code values (q / (L // 2)) -> (...) int32 indices."""
        if codes.shape[-1] != self.dim:
            raise ValueError(f"codes have {codes.shape[-1]} channels, FSQ has {self.dim} levels")
        half_width = self._levels // 2
        level_indices = (codes.float() * half_width).round().to(torch.int64) + half_width
        return self._level_indices_to_indices(level_indices)

    def indices_to_level_indices(self, indices: torch.Tensor) -> torch.Tensor:
        """(...) indices -> (..., d) int64 per-channel level indices in [0, L_k)."""
        return (indices.to(torch.int64)[..., None] // self._basis) % self._levels

    def indices_to_codes(self, indices: torch.Tensor) -> torch.Tensor:
        """(...) int indices -> (..., d) float32 code values."""
        if indices.numel() and indices.device.type != "meta":
            if int(indices.min()) < 0 or int(indices.max()) >= self.codebook_size:
                raise ValueError(f"indices out of range [0, {self.codebook_size})")
        half_width = self._levels // 2
        return (self.indices_to_level_indices(indices) - half_width) / half_width

    def implicit_codebook(self) -> torch.Tensor:
        """(K, d) float32: the code value of every index."""
        return self.indices_to_codes(torch.arange(self.codebook_size, device=self._levels.device))

    def extra_repr(self) -> str:
        return f"levels={self.levels}, codebook_size={self.codebook_size}"


class Bottleneck(nn.Module):
    """Stage 2-1 "proximal representation": a continuous bottleneck with a norm limit, no rounding.

    The values are the projected features mapped onto a constraint set, so that the later FSQ stage
    starts from a compact space:

    * ``"linf"``: f / max(max_i |f_i|, 1e-6): onto the surface of the unit hypercube (the paper's
      L-infinity projection),
    * ``"l2"``: f / max(||f||_2, 1e-6): onto the unit sphere,
    * ``"tanh"``: elementwise tanh, into the open cube,
    * ``"none"``: the plain linear bottleneck.
    """

    def __init__(self, limit: str = "linf", eps: float = 1e-6) -> None:
        super().__init__()
        if limit not in ("none", "l2", "linf", "tanh"):
            raise ValueError(f"unknown bottleneck limit {limit!r}")
        self.limit = limit
        self.eps = eps

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        """(..., D) -> (..., D) limited values, same dtype."""
        if self.limit == "linf":
            return z / z.abs().amax(-1, keepdim=True).clamp_min(self.eps)
        if self.limit == "l2":
            return z / z.norm(dim=-1, keepdim=True).clamp_min(self.eps)
        if self.limit == "tanh":
            return z.tanh()
        return z

    def extra_repr(self) -> str:
        return f"limit={self.limit!r}"


class SimVQ(nn.Module):
    """SimVQ (Zhu et al. 2024), the learned-codebook alternative in the paper's ablation.

    A frozen Gaussian codebook E (K, d) ~ N(0, 1/d) is reparameterised by a learned linear map W,
    codebook = E W^T; each vector takes its nearest code (Euclidean). Gradients reach the input through
    the rotation trick (Fifty et al. 2024), and the loss is MSE(sg x, q) + beta MSE(x, sg q).
    Distances and the search run in float32.
    """

    def __init__(self, codebook_size: int, dim: int, beta: float = 0.25) -> None:
        super().__init__()
        self.beta = beta
        self.register_buffer("frozen_codebook", torch.randn(codebook_size, dim) * dim**-0.5)
        self.proj = nn.Linear(dim, dim, bias=False)

    @property
    def codebook_size(self) -> int:
        return self.frozen_codebook.shape[0]

    def codebook(self) -> torch.Tensor:
        """(K, d) float32 effective codebook."""
        return self.proj(self.frozen_codebook.to(self.proj.weight.dtype)).float()

    def forward(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(N, d) -> (quantized (N, d) float32 with rotation-trick gradient, indices (N,) int32, loss)."""
        x = z.float()
        codebook = self.codebook()
        with torch.no_grad():
            indices = torch.cdist(x, codebook).argmin(-1)
        q = codebook[indices]
        loss = F.mse_loss(x.detach(), q) + self.beta * F.mse_loss(x, q.detach())
        return _rotation_trick(x, q), indices.to(torch.int32), loss

    def extra_repr(self) -> str:
        return f"codebook_size={self.codebook_size}, dim={self.frozen_codebook.shape[1]}"


def _rotation_trick(x: torch.Tensor, q: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """Value q, gradient through the rotation that maps x's direction to q's, scaled by |q|/|x|.

    With r = (x_hat + q_hat)/|x_hat + q_hat| the rotation is R = I - 2 r r^T + 2 q_hat x_hat^T;
    all factors are detached, so d(out)/dx = (|q|/|x|) R.
    """
    x_norm = x.norm(dim=-1, keepdim=True).clamp_min(eps)
    q_norm = q.norm(dim=-1, keepdim=True).clamp_min(eps)
    x_hat, q_hat = (x / x_norm).detach(), (q / q_norm).detach()
    r = x_hat + q_hat
    r = (r / r.norm(dim=-1, keepdim=True).clamp_min(eps)).detach()
    rotated = x - 2 * (x * r).sum(-1, keepdim=True) * r + 2 * (x * x_hat).sum(-1, keepdim=True) * q_hat
    return rotated * (q_norm / x_norm).detach()
