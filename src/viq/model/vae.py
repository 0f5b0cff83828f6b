"""The latent codec: pixels <-> VAE latents, one interface for every kind of pixel decoder.

ViQ's drawer predicts the latents of a frozen image autoencoder, and pixels come from that
autoencoder's decoder. Two kinds implement the same contract (pixels (3, H, W) in [-1, 1], H and W
multiples of 8 <-> latents (16, H/8, W/8)), chosen by ``VAEConfig.kind``:

* ``"qwen-image"``: diffusers' ``AutoencoderKLQwenImage``, the released models' decoder (a video VAE
  used on single frames; the latent is the posterior mean);
* ``"pixel-codec"``: :class:`viq.model.pixel_codec.PixelCodec`, a small autoencoder that trains in a
  minute on a CPU, for places without the Qwen-Image weights (the demo, CI).

The rest of viq calls only :func:`build_vae`, :func:`encode_latents`, :func:`decode_latents` and
:func:`latent_statistics`; a trained codec is read from a folder by :func:`load_vae` (a diffusers
``save_pretrained`` folder such as ``Qwen/Qwen-Image``'s ``vae/``, or a pixel-codec folder written by
:func:`save_vae`).
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import cast

import torch
from torch import nn

from viq._untrusted import read_json
from viq.model.config import VAEConfig, dataclass_from_dict
from viq.model.pixel_codec import PixelCodec

__all__ = [
    "build_vae",
    "load_vae",
    "save_vae",
    "encode_latents",
    "encode_latents_grouped",
    "decode_latents",
    "latent_statistics",
]

#: The diffusers class of the Qwen-Image VAE (``_class_name`` in its ``config.json``).
QWEN_IMAGE_CLASS = "AutoencoderKLQwenImage"
#: The weights file of a pixel-codec folder (beside its ``config.json``).
PIXEL_CODEC_WEIGHTS = "model.safetensors"


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
    return cast(nn.Module, AutoencoderKLQwenImage(**cfg.diffusers_kwargs()))  # a diffusers ModelMixin


def load_vae(directory: str | os.PathLike) -> tuple[VAEConfig, nn.Module]:
    """A trained latent codec and its config, from a folder, in float32 and eval mode:

    * a diffusers folder (``config.json`` with ``"_class_name": "AutoencoderKLQwenImage"`` and its
      ``diffusion_pytorch_model.safetensors``), as ``save_pretrained`` writes it and as the
      ``vae/`` subfolder of ``Qwen/Qwen-Image`` is published;
    * a pixel-codec folder written by :func:`save_vae` (``config.json`` with ``"kind": "pixel-codec"``
      and ``model.safetensors``).

    Raises:
        FileNotFoundError: no such folder, or no ``config.json`` in it.
        ValueError: a ``config.json`` of another model class, or weights that do not fit it.
    """
    path = Path(directory)
    config_file = path / "config.json"
    if not config_file.is_file():
        what = "no such folder" if not path.exists() else "no config.json in it"
        raise FileNotFoundError(
            f"{path}: not a VAE folder ({what}); expected a diffusers {QWEN_IMAGE_CLASS} "
            f"folder (e.g. the vae/ subfolder of Qwen/Qwen-Image) or a pixel-codec folder"
        )
    raw = read_json(config_file)
    if "_class_name" in raw:
        if raw["_class_name"] != QWEN_IMAGE_CLASS:
            raise ValueError(
                f"{config_file}: a diffusers {raw['_class_name']}, but viq's latent codec is the "
                f"Qwen-Image VAE ({QWEN_IMAGE_CLASS})"
            )
        try:
            from diffusers import AutoencoderKLQwenImage
        except ImportError as e:  # pragma: no cover - depends on the environment
            raise ImportError("loading the Qwen-Image VAE needs diffusers: pip install 'viq[vae]'") from e
        vae = AutoencoderKLQwenImage.from_pretrained(path, torch_dtype=torch.float32)
        c = vae.config
        if int(c.get("input_channels", 3)) != 3:
            raise ValueError(f"{config_file}: a VAE with {c['input_channels']} input channels; ViQ draws RGB images")
        cfg = VAEConfig(
            kind="qwen-image",
            base_dim=c.base_dim,
            z_dim=c.z_dim,
            dim_mult=tuple(c.dim_mult),
            num_res_blocks=c.num_res_blocks,
            attn_scales=tuple(c.attn_scales),
            temperal_downsample=tuple(c.temperal_downsample),
        )
        return cfg, vae.eval()
    if raw.get("kind") != "pixel-codec":
        raise ValueError(
            f"{config_file}: neither a diffusers VAE (no _class_name) nor a pixel-codec folder "
            f"(kind is {raw.get('kind')!r})"
        )
    from safetensors.torch import load_file

    cfg = dataclass_from_dict(VAEConfig, raw, str(config_file))
    weights = path / PIXEL_CODEC_WEIGHTS
    if not weights.is_file():
        raise FileNotFoundError(f"{path}: a pixel-codec folder without its {PIXEL_CODEC_WEIGHTS}")
    codec = PixelCodec(cfg)
    try:
        codec.load_state_dict(load_file(str(weights)))
    except RuntimeError as e:
        raise ValueError(f"{weights}: does not fit {config_file} ({str(e).splitlines()[0]})") from None
    return cfg, codec.eval()


def save_vae(vae: nn.Module, directory: str | os.PathLike) -> Path:
    """Write a latent codec so that :func:`load_vae` reads it back: diffusers ``save_pretrained`` for
    the Qwen-Image VAE, ``config.json`` + ``model.safetensors`` for the pixel codec."""
    import dataclasses

    from safetensors.torch import save_file

    from viq._io import atomic_write

    path = Path(directory)
    path.mkdir(parents=True, exist_ok=True)
    if not isinstance(vae, PixelCodec):
        vae.save_pretrained(path)
        return path
    save_file({k: v.detach().cpu().contiguous() for k, v in vae.state_dict().items()}, str(path / PIXEL_CODEC_WEIGHTS))
    atomic_write(path / "config.json", json.dumps(dataclasses.asdict(vae.cfg), indent=2).encode())
    return path


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
