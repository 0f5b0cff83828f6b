"""A small pixel autoencoder for places where the Qwen-Image VAE weights are not available.

ViQ's reconstruction loss and pixel decoding use a frozen Qwen-Image VAE. With no model hub (the CPU
demo, CI), a randomly initialised VAE would make every reconstruction noise, so the demo first fits
a small VAE of the same architecture (``diffusers.AutoencoderKLQwenImage``, tiny width) to its own
images as a deterministic autoencoder (posterior mean, the same latent ViQ's loss targets): pixel MSE
plus a small L2 penalty that keeps the latents near unit scale, on random crops. This is a demo
utility and a weak one -- the Qwen-Image architecture trains slowly from scratch on a CPU, so demo
reconstructions are blurry (PSNR in the low teens of dB). Real training uses the released
Qwen-Image VAE.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import torch
import torch.nn.functional as F

from viq.model.config import VAEConfig
from viq.model.decoders import build_vae

log = logging.getLogger(__name__)

__all__ = ["train_pixel_vae"]


def _crop(x: torch.Tensor, size: int, g: torch.Generator) -> torch.Tensor:
    """Random size x size crop of (3, H, W), zero (grey) padded when the image is smaller."""
    h, w = x.shape[-2:]
    x = F.pad(x, (0, max(0, size - w), 0, max(0, size - h)))
    h, w = x.shape[-2:]
    y0 = int(torch.randint(0, h - size + 1, (1,), generator=g))
    x0 = int(torch.randint(0, w - size + 1, (1,), generator=g))
    return x[:, y0 : y0 + size, x0 : x0 + size]


def train_pixel_vae(
    images: Sequence[torch.Tensor],
    config: VAEConfig,
    *,
    steps: int = 200,
    batch_size: int = 8,
    crop: int = 64,
    lr: float = 5e-4,
    latent_weight: float = 1e-4,
    seed: int = 0,
    progress: bool = True,
):
    """Fit an ``AutoencoderKLQwenImage`` of ``config``'s architecture to ``images``.

    Args:
        images: (3, H, W) float pixels in [-1, 1].
        steps, batch_size, crop: optimisation length, crops per step, crop side in pixels (a
            multiple of the VAE's factor 8).

    Returns:
        the trained VAE, in eval mode, with a ``history`` attribute (loss per step).
    """
    if not images:
        raise ValueError("no images to train the pixel VAE on")
    g = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        vae = build_vae(config)
    vae.train()
    opt = torch.optim.AdamW(vae.parameters(), lr=lr, weight_decay=0.0)
    from viq.train.optim import lr_multiplier

    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_multiplier(s, steps, 0.1, 0.1))
    history: list[float] = []
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=steps, desc="pixel VAE", unit="step")
    for _ in range(steps):
        idx = torch.randint(0, len(images), (batch_size,), generator=g).tolist()
        x = torch.stack([_crop(images[i], crop, g) for i in idx])[:, :, None]  # (B, 3, 1, s, s)
        z = vae.encode(x).latent_dist.mode()
        recon = vae.decode(z).sample
        loss = F.mse_loss(recon, x) + latent_weight * z.pow(2).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        history.append(float(loss))
        if bar is not None:
            bar.update(1)
            bar.set_postfix(loss=f"{history[-1]:.4f}")
    if bar is not None:
        bar.close()
    vae.eval().requires_grad_(False)
    vae.history = history
    log.info("pixel VAE: loss %.4f -> %.4f over %d steps", history[0], history[-1], steps)
    return vae
