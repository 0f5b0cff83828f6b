"""Fit the demo's pixel codec (:class:`viq.model.pixel_codec.PixelCodec`) to the demo's images.

ViQ's reconstruction loss and pixel decoding need a frozen autoencoder; the released models use the
Qwen-Image VAE, which cannot be downloaded here. Training that architecture from scratch on a CPU
stalls at 13-16 dB (flat-colour and two-colour plateaus), so the demo fits a small codec with the same
latent contract instead: its linear path starts as the PCA of the training patches (a working codec
before the first step), and the non-linear branches then learn what PCA misses. Deterministic for a
given seed (crops and flips come from a seeded generator; the schedule counts steps, not seconds).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F

from viq._progress import progress_bar
from viq.model.config import VAEConfig, get_preset
from viq.model.encoder import pad_to_patches
from viq.model.pixel_codec import PixelCodec

log = logging.getLogger(__name__)

__all__ = ["train_pixel_codec", "DEMO_CODEC"]

#: The demo's codec (preset ``viq-demo``): 64 wide, one encoder and two decoder residual blocks.
DEMO_CODEC = get_preset("viq-demo").vae


@torch.no_grad()
def _init_pca(codec: PixelCodec, images: Sequence[torch.Tensor], max_patches: int = 200_000) -> None:
    """Set the linear path to the top ``z_dim`` principal components of the images' 8x8 patches."""
    f, c = codec.cfg.scale_factor, codec.cfg.z_dim
    patches = torch.cat([F.unfold(pad_to_patches(x, f)[None], f, stride=f)[0].T for x in images])[:max_patches].double()
    mean = patches.mean(0)
    centred = patches - mean
    _, vectors = torch.linalg.eigh(centred.T @ centred / len(patches))
    basis = vectors[:, -c:].flip(1).float()  # (3*f*f, c), largest component first
    codec.enc_linear.weight.copy_(basis.T.reshape(c, 3, f, f))
    codec.enc_linear.bias.copy_(-(basis.T @ mean.float()))
    codec.dec_linear.weight.copy_(basis.reshape(3 * f * f, c, 1, 1))
    codec.dec_linear.bias.copy_(mean.float())


@torch.no_grad()
def _calibrate(codec: PixelCodec, images: Sequence[torch.Tensor]) -> None:
    """Per-channel mean / std of the raw latents, so that ``encode`` returns unit-scale latents."""
    flat = torch.cat(
        [codec.encode_raw(pad_to_patches(x, codec.cfg.scale_factor)[None])[0].flatten(1) for x in images], dim=1
    )
    codec.latent_mean.copy_(flat.mean(1))
    codec.latent_std.copy_(flat.std(1).clamp_min(1e-6))


def _crops(images: Sequence[torch.Tensor], n: int, size: int, g: torch.Generator) -> torch.Tensor:
    """n random size x size crops (grey-padded when an image is smaller), randomly flipped/transposed."""
    out = []
    for i in torch.randint(len(images), (n,), generator=g).tolist():
        x = images[i]
        h, w = x.shape[-2:]
        x = F.pad(x, (0, max(0, size - w), 0, max(0, size - h)))
        h, w = x.shape[-2:]
        y0 = int(torch.randint(h - size + 1, (1,), generator=g))
        x0 = int(torch.randint(w - size + 1, (1,), generator=g))
        crop = x[:, y0 : y0 + size, x0 : x0 + size]
        flips = int(torch.randint(4, (1,), generator=g))
        crop = crop.flip(-1) if flips & 1 else crop
        out.append(crop.transpose(-1, -2) if flips & 2 else crop)
    return torch.stack(out)


def _latent_noise(z: torch.Tensor, strength: float, g: torch.Generator) -> torch.Tensor:
    """Gaussian noise for latents ``z`` (B, C, h, w): per sample a level drawn uniformly from
    [0, ``strength``], times each channel's standard deviation in the batch (detached, so that the encoder
    cannot outgrow the noise by scaling its latents up)."""
    scale = z.detach().std(dim=(0, 2, 3), keepdim=True)
    level = torch.rand(z.shape[0], 1, 1, 1, generator=g) * strength
    return level * scale * torch.randn(z.shape, generator=g)


def train_pixel_codec(
    images: Sequence[torch.Tensor],
    config: VAEConfig = DEMO_CODEC,
    *,
    steps: int = 1500,
    batch_size: int = 16,
    crop: int = 48,
    lr: float = 2e-3,
    latent_noise: float = 0.0,
    seed: int = 0,
    progress: bool = True,
) -> PixelCodec:
    """Fit a :class:`PixelCodec` to ``images`` ((3, H, W) float pixels in [-1, 1], any sizes).

    AdamW (betas 0.9/0.99), 50 warm-up steps then cosine decay, pixel MSE on random ``crop`` x ``crop``
    crops. With ``latent_noise`` > 0 the decoder decodes noisy latents (:func:`_latent_noise`), as a KL
    VAE's decoder (the Qwen-Image VAE's) decodes sampled ones: it then decodes latents that are close
    to, not equal to, the encoder's (the drawer's) into an image close to the original, at some cost
    to exact latents. Returns the codec in eval mode, its latent statistics calibrated on up to 256 of
    the images, with a ``history`` attribute (loss per step, noisy when ``latent_noise`` > 0).
    """
    if not images:
        raise ValueError("no images to train the pixel codec on")
    if steps < 1:
        raise ValueError(f"steps must be at least 1, got {steps}")
    if crop % config.scale_factor:
        raise ValueError(f"crop {crop} must be a multiple of {config.scale_factor}")
    if not 0 <= latent_noise <= 10:
        raise ValueError(f"latent_noise must be in [0, 10], got {latent_noise}")
    images = [x.float() for x in images]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        codec = PixelCodec(config)
    _init_pca(codec, images)
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(codec.parameters(), lr=lr, weight_decay=0.0, betas=(0.9, 0.99))
    warmup = min(50, max(1, steps // 10))
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(1.0, s / max(1, steps))))
    )

    history: list[float] = []
    codec.train()
    with progress_bar(steps, "pixel codec", unit="step", show=progress) as bar:
        for _ in range(steps):
            x = _crops(images, batch_size, crop, g)
            z = codec.encode_raw(x)
            if latent_noise > 0:
                z = z + _latent_noise(z, latent_noise, g)
            loss = F.mse_loss(codec.decode_raw(z), x)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            history.append(loss.item())
            bar.update(1)
            bar.set_postfix(psnr=f"{10 * math.log10(4 / max(history[-1], 1e-12)):.1f}")
    codec.eval().requires_grad_(False)
    _calibrate(codec, images[:256])
    codec.history = history
    log.info("pixel codec: loss %.5f -> %.5f over %d steps", history[0], history[-1], steps)
    return codec
