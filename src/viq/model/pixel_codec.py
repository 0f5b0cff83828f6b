"""A small deterministic pixel autoencoder with the Qwen-Image VAE's latent contract.

Where the Qwen-Image VAE weights cannot be had (the CPU demo, CI: no model hub), a ViQ still needs
pixels <-> latents to train its reconstruction loss and to draw images. :class:`PixelCodec` keeps the
contract the rest of viq relies on -- 16 latent channels at 1/8 of the resolution, pixels in [-1, 1] --
and trains in under a minute on a CPU (see :mod:`viq.demo.pixel_codec`). Released models keep the
Qwen-Image VAE; this codec is selected by ``VAEConfig(kind="pixel-codec")``.

Architecture (per 8x8 patch; fully convolutional, any H and W that are multiples of 8):

* a linear path: Conv 8x8/8 (3 -> 16) and Conv 1x1 (16 -> 3*64) + pixel shuffle, which training
  initialises with the principal components of the training patches (a PCA codec is the start);
* a non-linear encoder branch (Conv 8x8/8 -> GELU residual -> 3x3 residual blocks -> 1x1, zero-init)
  and decoder branch (3x3 -> residual blocks -> 1x1 to 3*64, zero-init) added to the linear path;
* with ``cfg.pixel_refine_channels`` > 0, a residual refinement of the decoded pixels (Conv 3x3 3 -> r,
  GELU, Conv 3x3 r -> 3, zero-init): each 8x8 block above is drawn from its own latent position, so
  an error in one latent ends at the block's edge; this lets it fade across (a grid of seams otherwise);
* per-channel ``latent_mean`` / ``latent_std`` buffers (set after training) so that :meth:`encode`
  returns latents of about unit scale, the range the drawer regresses.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from viq.model.config import VAEConfig

__all__ = ["PixelCodec"]


class _ResBlock(nn.Module):
    """x + Conv3x3(GELU(Conv3x3(GELU(x)))), the second conv zero-initialised: (B, C, h, w) -> same."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(channels, channels, 3, padding=1)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1)
        nn.init.zeros_(self.conv2.weight)
        nn.init.zeros_(self.conv2.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv2(F.gelu(self.conv1(F.gelu(x))))


class PixelCodec(nn.Module):
    """Pixels (B, 3, H, W) in [-1, 1] <-> latents (B, z_dim, H/f, W/f), f = ``cfg.scale_factor`` (8)."""

    latent_mean: torch.Tensor
    latent_std: torch.Tensor

    def __init__(self, cfg: VAEConfig) -> None:
        super().__init__()
        self.cfg = cfg
        f, c, h = cfg.scale_factor, cfg.z_dim, cfg.base_dim
        self.enc_linear = nn.Conv2d(3, c, f, stride=f)
        self.dec_linear = nn.Conv2d(c, 3 * f * f, 1)
        self.enc_in = nn.Conv2d(3, h, f, stride=f)
        self.enc_mid = nn.Conv2d(h, h, 1)
        self.enc_blocks = nn.ModuleList(_ResBlock(h) for _ in range(cfg.num_res_blocks))
        self.enc_out = nn.Conv2d(h, c, 1)
        self.dec_in = nn.Conv2d(c, h, 3, padding=1)
        self.dec_mid = nn.Conv2d(h, h, 1)
        self.dec_blocks = nn.ModuleList(_ResBlock(h) for _ in range(cfg.decoder_res_blocks))
        self.dec_out = nn.Conv2d(h, 3 * f * f, 1)
        r = cfg.pixel_refine_channels
        self.pixel_in = nn.Conv2d(3, r, 3, padding=1) if r else None
        self.pixel_out = nn.Conv2d(r, 3, 3, padding=1) if r else None
        for conv in (self.enc_out, self.dec_out, self.pixel_out):  # the non-linear branches start as no-ops
            if conv is None:
                continue
            nn.init.zeros_(conv.weight)
            nn.init.zeros_(conv.bias)
        self.register_buffer("latent_mean", torch.zeros(c))
        self.register_buffer("latent_std", torch.ones(c))

    # ---- raw halves (training works on these; the buffers are calibrated afterwards)
    def encode_raw(self, pixels: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) -> un-normalised latents (B, z_dim, H/f, W/f)."""
        y = self.enc_in(pixels)
        y = y + self.enc_mid(F.gelu(y))
        for block in self.enc_blocks:
            y = block(y)
        return self.enc_linear(pixels) + self.enc_out(F.gelu(y))

    def decode_raw(self, latents: torch.Tensor) -> torch.Tensor:
        """Un-normalised latents (B, z_dim, h, w) -> pixels (B, 3, f*h, f*w), not clamped."""
        y = self.dec_in(latents)
        y = y + self.dec_mid(F.gelu(y))
        for block in self.dec_blocks:
            y = block(y)
        y = self.dec_linear(latents) + self.dec_out(F.gelu(y))
        pixels = F.pixel_shuffle(y, self.cfg.scale_factor)
        if self.pixel_in is not None and self.pixel_out is not None:
            pixels = pixels + self.pixel_out(F.gelu(self.pixel_in(pixels)))
        return pixels

    # ---- the latent contract
    def encode(self, pixels: torch.Tensor) -> torch.Tensor:
        """Pixels (B, 3, H, W) in [-1, 1], H and W multiples of f -> latents (B, z_dim, H/f, W/f)."""
        f = self.cfg.scale_factor
        if pixels.dim() != 4 or pixels.shape[1] != 3 or pixels.shape[2] % f or pixels.shape[3] % f:
            raise ValueError(
                f"pixel codec: expected (B, 3, H, W) with H and W multiples of {f}, got {tuple(pixels.shape)}"
            )
        z = self.encode_raw(pixels)
        return (z - self.latent_mean[:, None, None]) / self.latent_std[:, None, None]

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Latents (B, z_dim, h, w) -> pixels (B, 3, f*h, f*w) clamped to [-1, 1]."""
        if latents.dim() != 4 or latents.shape[1] != self.cfg.z_dim:
            raise ValueError(f"pixel codec: expected (B, {self.cfg.z_dim}, h, w) latents, got {tuple(latents.shape)}")
        z = latents * self.latent_std[:, None, None] + self.latent_mean[:, None, None]
        return self.decode_raw(z).clamp(-1.0, 1.0)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        """Reconstruction (B, 3, H, W) -> (B, 3, H, W)."""
        return self.decode(self.encode(pixels))
