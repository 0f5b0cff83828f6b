"""The latent codec: pixels <-> VAE latents, one interface for every kind of pixel decoder.

ViQ's drawer predicts the latents of a frozen image autoencoder, and pixels come from that
autoencoder's decoder. Two kinds implement the same contract (pixels (3, H, W) in [-1, 1], H and W
multiples of 8 <-> latents (16, H/8, W/8)), chosen by ``VAEConfig.kind``:

* ``"qwen-image"``: diffusers' ``AutoencoderKLQwenImage``, the released models' decoder (a video VAE
  used on single frames; the latent is the posterior mean);
* ``"pixel-codec"``: :class:`viq.model.pixel_codec.PixelCodec`, a small autoencoder that trains in a
  minute on a CPU, for places without the Qwen-Image weights (the demo, CI).

The rest of viq calls only :func:`build_vae`, :func:`encode_latents`, :func:`decode_latents` and
:func:`latent_statistics`.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from viq.model.config import VAEConfig
from viq.model.pixel_codec import PixelCodec

__all__ = ["build_vae", "encode_latents", "encode_latents_grouped", "decode_latents", "latent_statistics"]


def build_vae(cfg: VAEConfig) -> nn.Module:
    """An untrained latent codec of ``cfg``'s kind and architecture."""
    if cfg.kind == "pixel-codec":
        return PixelCodec(cfg)
    try:
        from diffusers import AutoencoderKLQwenImage
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError(
            "decoding codes to pixels needs diffusers with AutoencoderKLQwenImage: pip install 'viq[vae]'"
        ) from e
    return AutoencoderKLQwenImage(**cfg.diffusers_kwargs())


def _param(vae: nn.Module) -> torch.Tensor:
    return next(vae.parameters())


def encode_latents(vae: nn.Module, pixels: torch.Tensor) -> torch.Tensor:
    """One image (3, H, W) in [-1, 1] -> its latent (channels, H/8, W/8) in the codec's dtype (for the
    Qwen-Image VAE: the posterior mean, the official reconstruction target)."""
    return _encode_batch(vae, pixels[None])[0]


def _encode_batch(vae: nn.Module, pixels: torch.Tensor) -> torch.Tensor:
    """(B, 3, H, W) -> (B, channels, H/8, W/8) latents in the codec's dtype."""
    param = _param(vae)
    x = pixels.to(device=param.device, dtype=param.dtype)
    if isinstance(vae, PixelCodec):
        return vae.encode(x)
    return vae.encode(x[:, :, None]).latent_dist.mean[:, :, 0]  # single video frames


def encode_latents_grouped(vae: nn.Module, images: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """Images (3, H_i, W_i) in [-1, 1] -> their latents, as :func:`encode_latents` but one codec call
    per distinct image size (training targets: far fewer small calls; the values may differ from one
    image at a time in the last bits, as batched kernels do)."""
    out: list[torch.Tensor | None] = [None] * len(images)
    by_size: dict[tuple[int, int], list[int]] = {}
    for i, x in enumerate(images):
        by_size.setdefault(tuple(x.shape[-2:]), []).append(i)
    for indices in by_size.values():
        z = _encode_batch(vae, torch.stack([images[i] for i in indices]))
        for i, latent in zip(indices, z):
            out[i] = latent
    return out  # type: ignore[return-value]


def decode_latents(vae: nn.Module, latent: torch.Tensor) -> torch.Tensor:
    """One latent (channels, h, w) -> pixels (3, 8h, 8w) in [-1, 1], in the codec's dtype."""
    param = _param(vae)
    z = latent.to(device=param.device, dtype=param.dtype)
    if isinstance(vae, PixelCodec):
        return vae.decode(z[None])[0]
    return vae.decode(z[None, :, None], return_dict=False)[0][0, :, 0]


def latent_statistics(vae: nn.Module) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel (mean, std) of the codec's latents, for ``mean_std`` normalisation of the drawer's
    target: the Qwen-Image VAE's published ``latents_mean`` / ``latents_std``; the pixel codec's
    latents are already normalised (zeros, ones)."""
    if isinstance(vae, PixelCodec):
        c = vae.cfg.z_dim
        return (0.0,) * c, (1.0,) * c
    config = vae.config
    return tuple(float(v) for v in config.latents_mean), tuple(float(v) for v in config.latents_std)
