"""2D rotary position embedding with "golden gate" frequency directions (the official GoldenGateRoPE2d).

Each (head h, frequency f) pair rotates by an angle theta = omega_f * (cos(phi) x + sin(phi) y), where
the direction phi = (h F + f) * pi (sqrt(5) - 1) / 2 walks around the circle by the golden angle, and the
positions (x, y) are *aspect-normalised*: x in linspace(-sqrt(W/H), sqrt(W/H), W) and y in
linspace(-sqrt(H/W), sqrt(H/W), H) for an H x W patch grid. The angle range therefore depends on the
aspect ratio only, not on the resolution; a single row or column sits at -lim (linspace with one step).

Everything is computed in float32 exactly as the official code does, so angles match bit for bit.
"""

from __future__ import annotations

import math

import torch

__all__ = ["GoldenGateRoPE2d", "apply_rotary"]

GOLDEN_ANGLE = math.pi * (math.sqrt(5) - 1) / 2  # 1.9416110387254666 rad


class GoldenGateRoPE2d:
    """Angles for 2D RoPE. Not an ``nn.Module``: it has no parameters and nothing to save.

    Args:
        head_dim: rotary dimension a of each head; F = a // 2 frequency pairs.
        num_heads: number of heads (the 4 code sub-tokens of a patch).
        min_freq, max_freq: range of the log-spaced non-zero frequencies.
        zero_fraction: share of frequencies set to 0 (channels left unrotated).
    """

    def __init__(
        self,
        head_dim: int,
        num_heads: int,
        min_freq: float = 0.2,
        max_freq: float = 20.0,
        zero_fraction: float = 0.25,
    ) -> None:
        self.head_dim = head_dim
        self.num_heads = num_heads
        n_freq = head_dim // 2
        n_zero = round(zero_fraction * n_freq)
        # Always on the CPU (also when modules are built under a meta/CUDA device context): the
        # angles are a few KB, computed once per grid and cached.
        cpu = torch.device("cpu")
        linspace = torch.linspace(0, 1, n_freq - n_zero, device=cpu)
        omega = torch.cat([torch.zeros(n_zero, device=cpu), min_freq * (max_freq / min_freq) ** linspace])
        phi = (torch.arange(num_heads * n_freq, device=cpu) * GOLDEN_ANGLE).reshape(num_heads, n_freq)
        # (heads, F, 2): weight of x and of y in the angle of each (head, frequency).
        self.freqs = omega[None, :, None] * torch.stack([phi.cos(), phi.sin()], dim=-1)
        self._cache: dict[tuple[int, int], torch.Tensor] = {}

    def angles(self, grid: tuple[int, int]) -> torch.Tensor:
        """Angles for one image's patch grid (h, w): (h*w, heads, F) float32 on CPU, row-major."""
        if grid not in self._cache:
            h, w = grid
            x = torch.linspace(-math.sqrt(w / h), math.sqrt(w / h), w, device="cpu")
            y = torch.linspace(-math.sqrt(h / w), math.sqrt(h / w), h, device="cpu")
            yy, xx = torch.meshgrid(y, x, indexing="ij")
            pos = torch.stack([xx, yy], dim=-1)  # (h, w, 2), [x, y]
            theta = (self.freqs[None, None] * pos[:, :, None, None, :]).sum(-1)
            if len(self._cache) > 256:
                self._cache.clear()
            self._cache[grid] = theta.reshape(h * w, self.num_heads, -1)
        return self._cache[grid]

    def packed_angles(self, grids: list[tuple[int, int]], device: torch.device) -> torch.Tensor:
        """Angles of several images concatenated: (sum h*w, heads, F) float32 on ``device``."""
        return torch.cat([self.angles(g) for g in grids]).to(device)


def apply_rotary(x: torch.Tensor, theta: torch.Tensor, angle_dtype: torch.dtype | None = None) -> torch.Tensor:
    """Rotate channel pairs (i, i + F) of x: the half-split layout, not interleaved pairs.

    Args:
        x: (T, heads, 2F).
        theta: (T, heads, F) float32 angles.
        angle_dtype: dtype the angles are cast to before cos/sin (the official code uses x's dtype,
            which quantizes angles coarsely in bf16); None keeps them in float32.
    """
    if angle_dtype is not None:
        theta = theta.to(angle_dtype)
    cos, sin = theta.cos().to(x.dtype), theta.sin().to(x.dtype)
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1)
