"""viq: ViQ text-aligned visual quantized representations at any resolution.

Public API::

    model = viq.load(path, device="cpu", dtype=torch.float32)   # official or viq directory, or owner/name
    codes = model.encode(images)          # list[viq.Codes], native resolution
    feats = model.embed(codes)            # list of (h*w, C) features for an LLM
    latents = model.draw(codes)           # list of (16, 2h, 2w) Qwen-Image VAE latents
    images = model.reconstruct(codes)     # list of PIL images
"""

from __future__ import annotations

import os
from collections.abc import Iterable

import torch

from viq.formats.codes import Codes, CodesFormatError
from viq.model.config import PRESETS, ViQConfig, get_preset
from viq.model.viq import ViQModel

__version__ = "0.1.0"

__all__ = ["load", "Codes", "CodesFormatError", "ViQModel", "ViQConfig", "get_preset", "PRESETS", "__version__"]


def load(
    path: str | os.PathLike,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    *,
    components: Iterable[str] | None = None,
    revision: str | None = None,
    subfolder: str | None = None,
    **official_kwargs,
) -> ViQModel:
    """Load a ViQ model from a local directory or the Hugging Face Hub.

    Args:
        path: a viq directory (``config.json`` + ``model.safetensors``, written by
            :meth:`ViQModel.save_pretrained` or ``viq convert``), an official release directory
            (``model_viq_fsq_<size>.pth`` [+ ``embedder.pth``, ``index_drawer.pth``]), or a Hub id
            ``owner/name[@revision][/subfolder]`` of a repository holding either (fetched into the
            Hugging Face cache; ``HF_HUB_OFFLINE=1`` uses the cache only). A local path that exists
            always wins. See :mod:`viq.model.hub`.
        device: where to put the weights.
        dtype: float dtype of the weights and activations (FSQ arithmetic is always float32). Weights
            are converted one tensor at a time, so the peak memory is about the loaded model's.
        components: subset of ``viq.model.viq.COMPONENTS`` to load (default: all stored).
        revision, subfolder: Hub branch/tag/commit and folder inside the repository.
        **official_kwargs: for official directories only: ``num_heads``, ``levels``, ``config``
            (see :func:`viq.model.official.load_official`).

    Raises:
        viq.model.hub.HubNotCachedError: a Hub id, offline, and not in the cache (the message says how
            to download it).
    """
    from viq.model.hub import resolve_model
    from viq.model.official import is_official_dir, load_official

    path = resolve_model(path, revision=revision, subfolder=subfolder)
    if (path / "model.safetensors").is_file():
        if official_kwargs:
            raise TypeError(f"{sorted(official_kwargs)} only apply to official directories")
        return ViQModel.from_pretrained(path, device=device, dtype=dtype, components=components)
    if is_official_dir(path):
        return load_official(path, device=device, dtype=dtype, components=components, **official_kwargs)
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such directory")
    raise FileNotFoundError(
        f"{path}: neither a viq model directory (config.json + model.safetensors) nor an official ViQ "
        f"directory (model_viq_fsq_<size>.pth)"
    )
