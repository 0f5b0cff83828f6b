"""From codes back to features and pixels.

* :class:`CodeEmbedder` (official ``IndexEmbeder``): codes -> continuous features, one vector per
  patch (the "LLM features" that an MM projector consumes). The same module is the dequantize path of
  the code head during training.
* :class:`LatentDecoder`: features -> Qwen-Image VAE latent, 2x2 latent pixels per patch.
* :class:`CodeDrawer` (official ``IndexDrawer``): CodeEmbedder + LatentDecoder.

Latents become pixels through the latent codec (:mod:`viq.model.vae`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from viq.model.attention import Segments
from viq.model.config import DecoderConfig, HeadConfig
from viq.model.layers import MIN_ROWS, Block, Mlp, ResidualMlp, pad_rows

__all__ = ["CodeEmbedder", "LatentDecoder", "CodeDrawer"]


class CodeEmbedder(nn.Module):
    """Codes -> per-patch features.

    codes (e*N, d) -> Linear d->C (with ``fsq_on_bottleneck``: Linear d->D, then D->C) -> concatenate the e codes of each patch (N, e*C) ->
    Mlp(eC -> eC -> C) -> Mlp(C -> C -> C) -> ``res_blocks`` x ResidualMlp -> x * out_weight + out_bias.

    ``codebook`` (K, d) is a stored buffer rather than recomputed: the released embedder carries a
    bf16-rounded copy of the implicit codebook (the 16k level-6 thirds are rounded), and using the
    stored table is what reproduces the official features. The copy is what lets the embedder read the
    indices of any discrete quantizer: a fixed codebook (FSQ) is computed here, a learned one (SimVQ)
    starts at zeros and is copied from the head (:meth:`viq.model.viq.ViQModel.sync_codebooks`); a
    continuous quantizer has none (only :meth:`from_code_values` then).
    """

    codebook: torch.Tensor | None

    def __init__(self, width: int, cfg: HeadConfig) -> None:
        super().__init__()
        e = cfg.codes_per_patch
        self.codes_per_patch = e
        kind = cfg.quantizer_kind
        codebook = None
        if cfg.codebook_size and kind.learned_codebook:
            codebook = torch.zeros(cfg.codebook_size, cfg.quantizer_dim)
        elif cfg.codebook_size:  # a fixed codebook: computed from the config (building draws no random numbers)
            codebook = kind.build(cfg).codebook()
        self.register_buffer("codebook", codebook)
        self.fsq_out = nn.Linear(cfg.quantizer_dim, cfg.bottleneck_dim) if cfg.quantizes_on_bottleneck else None
        self.project_out = nn.Linear(cfg.code_dim, width)
        self.merge = Mlp(e * width, e * width, width)
        self.post_mlp = Mlp(width, width, width)
        self.res_blocks = nn.ModuleList(
            ResidualMlp(width, int(width * cfg.res_mlp_ratio), cfg.res_norm_eps) for _ in range(cfg.res_blocks)
        )
        self.out_weight = nn.Parameter(torch.ones(width))
        self.out_bias = nn.Parameter(torch.zeros(width))

    def from_code_values(self, codes: torch.Tensor) -> torch.Tensor:
        """(e*N, d) code values (any float dtype) -> (N, C) features in the module's dtype.

        Every operation is per patch, so features do not depend on what else is in the batch.
        """
        n = codes.shape[0] // self.codes_per_patch
        codes = pad_rows(codes.to(self.project_out.weight.dtype), MIN_ROWS * self.codes_per_patch)
        x = self.project_out(codes if self.fsq_out is None else self.fsq_out(codes))
        x = x.view(-1, self.codes_per_patch * x.shape[-1])
        x = self.post_mlp(self.merge(x))
        for block in self.res_blocks:
            x = block(x)
        return (x * self.out_weight + self.out_bias)[:n]

    def forward(self, indices: torch.Tensor) -> torch.Tensor:
        """(e*N,) int indices in official order -> (N, C) features."""
        if self.codebook is None:
            raise RuntimeError("this embedder has no codebook (its head's quantizer is continuous)")
        k = self.codebook.shape[0]
        if indices.numel() and (int(indices.min()) < 0 or int(indices.max()) >= k):
            raise ValueError(f"code indices out of range [0, {k})")
        return self.from_code_values(self.codebook[indices.long()])


class LatentDecoder(nn.Module):
    """Per-patch features -> VAE latents: raw (the released models), or normalised per channel when
    ``cfg.latent_mean`` / ``latent_std`` are set (:meth:`to_raw` undoes it).

    Mlp(C->C->C) -> LayerNorm -> ``latent_blocks`` ViT blocks (attention within each image) ->
    (C, h, w) -> GroupNorm -> SiLU -> Conv3x3 C -> channels*u*u -> pixel shuffle u: (channels, u*h, u*w).
    """

    def __init__(self, width: int, cfg: DecoderConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.mlp = Mlp(width, width, width)
        self.norm = nn.LayerNorm(width, eps=cfg.norm_eps)
        self.blocks = nn.ModuleList(
            Block(width, cfg.latent_heads, int(width * cfg.latent_mlp_ratio), cfg.norm_eps)
            for _ in range(cfg.latent_blocks)
        )
        self.norm_out = nn.GroupNorm(cfg.groupnorm_groups, width, eps=cfg.norm_eps)
        u = cfg.latent_upscale
        self.conv_out = nn.Conv2d(width, cfg.latent_channels * u * u, 3, padding=1)
        self.gradient_checkpointing = False

    def _statistics(self, latent: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``cfg.latent_mean`` / ``latent_std`` as (channels, 1, 1) tensors on ``latent``'s device and dtype."""
        as_tensor = lambda v: torch.tensor(v, device=latent.device, dtype=latent.dtype)[:, None, None]  # noqa: E731
        return as_tensor(self.cfg.latent_mean), as_tensor(self.cfg.latent_std)

    def to_raw(self, latent: torch.Tensor) -> torch.Tensor:
        """An output of :meth:`forward` (channels, h, w) -> the VAE's raw latent (same shape and dtype):
        ``latent * latent_std + latent_mean`` per channel, or unchanged for raw-latent decoders."""
        if self.cfg.latent_mean is None:
            return latent
        mean, std = self._statistics(latent)
        return latent * std + mean

    def from_raw(self, latent: torch.Tensor) -> torch.Tensor:
        """The VAE's raw latent (channels, h, w) -> this decoder's output space (the training target)."""
        if self.cfg.latent_mean is None:
            return latent
        mean, std = self._statistics(latent)
        return (latent - mean) / std

    def forward(self, features: list[torch.Tensor], grids: list[tuple[int, int]]) -> list[torch.Tensor]:
        """features: per image (h*w, C), row-major; grids: per image (h, w).

        Returns: per image (latent_channels, u*h, u*w) latents.
        """
        for f, (h, w) in zip(features, grids, strict=True):
            if f.shape[0] != h * w:
                raise ValueError(f"{f.shape[0]} feature vectors do not fill a {h}x{w} grid")
        lengths = tuple(h * w for h, w in grids)
        total = sum(lengths)
        # A filler segment keeps tiny packs on the same GEMM path (see viq.model.layers.MIN_ROWS).
        segments = Segments(lengths + ((MIN_ROWS - total,) if total < MIN_ROWS else ()))
        x = self.norm(self.mlp(pad_rows(torch.cat(features))))
        for block in self.blocks:
            if self.gradient_checkpointing and torch.is_grad_enabled():
                x = torch.utils.checkpoint.checkpoint(block, x, segments, use_reentrant=False)
            else:
                x = block(x, segments)
        # The output convolution runs once per distinct grid, on all images of that grid.
        per_image = x[:total].split(list(lengths))
        by_grid: dict[tuple[int, int], list[int]] = {}
        for i, grid in enumerate(grids):
            by_grid.setdefault(tuple(grid), []).append(i)
        out: dict[int, torch.Tensor] = {}
        for (h, w), members in by_grid.items():
            batch = torch.stack([per_image[i].T.reshape(-1, h, w) for i in members])
            y = F.pixel_shuffle(self.conv_out(F.silu(self.norm_out(batch))), self.cfg.latent_upscale)
            out.update(zip(members, y.unbind(0)))
        return [out[i] for i in range(len(grids))]


class CodeDrawer(nn.Module):
    """Codes -> VAE latents: a :class:`CodeEmbedder` followed by a :class:`LatentDecoder`."""

    def __init__(self, width: int, head_cfg: HeadConfig, cfg: DecoderConfig) -> None:
        super().__init__()
        self.features = CodeEmbedder(width, head_cfg)
        self.latent = LatentDecoder(width, cfg)

    def forward(
        self, indices: list[torch.Tensor], grids: list[tuple[int, int]]
    ) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """indices: per image (e*h*w,) official order; returns (features (h*w, C), latents) per image."""
        sizes = [i.numel() // self.features.codes_per_patch for i in indices]
        features = list(self.features(torch.cat(indices)).split(sizes))
        return features, self.latent(features, grids)
