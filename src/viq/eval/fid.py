"""rFID: the Fréchet distance between features of the inputs and of their reconstructions.

The features come from a *passed-in* extractor -- an ``nn.Module`` mapping a ``(N, 3, H, W)``
float32 batch with values in ``[0, 1]`` to ``(N, D)`` features -- because the usual Inception-v3
weights (torch-fidelity) are not something viq can fetch. The distance itself is torchmetrics'
:class:`~torchmetrics.image.fid.FrechetInceptionDistance` with that module as ``feature`` (it
accepts any module and runs offline): means and covariances accumulated in float64,
``|mu_1 - mu_2|^2 + Tr(S_1 + S_2 - 2 (S_1 S_2)^{1/2})``. Each image goes through the extractor
on its own (a ``(1, 3, H, W)`` batch), since images keep their native sizes. A set compared with
itself gives ~0 (float rounding); with fewer than 2 images per side FID is undefined.

rFID numbers are only comparable between runs with the same extractor and comparable image sets;
with a handful of images and ``D`` in the hundreds the covariances are rank-deficient and the
value mostly measures the means. Extractors (:func:`load_feature_extractor`, ``spec``):

* ``viq``: the ViQ encoder's own features: last-block tokens of the trunk, mean-pooled over the
  image's patches (input zero-padded to a multiple of 16 as for encoding).
* ``hf:<dir or hub id>``: a ``transformers`` vision model (``AutoModel``; CLIP / SigLIP models
  through ``get_image_features``, others through ``pooler_output`` or the mean of
  ``last_hidden_state``), with the size / mean / std of its ``AutoImageProcessor``.
* ``timm:<hub id>`` or ``timm:<architecture>=<checkpoint file>``: a ``timm`` model without its
  classifier (``num_classes=0``, pooled features), with its pretrained data config.
* ``open_clip:<hub id>`` or ``open_clip:<architecture>=<checkpoint file>``: an ``open_clip``
  model's ``encode_image``.

Nothing is downloaded: local paths are read as they are; a hub id must already be in the
Hugging Face cache (checked with ``local_files_only=True`` first), else a ``FileNotFoundError``
says how to fetch it. For ``hf``/``timm``/``open_clip`` each image is resized (bicubic,
antialiased) to the model's square input size and normalised with its mean / std.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from viq.model.encoder import pad_to_patches

__all__ = ["FEATURE_KINDS", "ViQFeatures", "ResizedBackbone", "load_feature_extractor", "RFID", "rfid"]

#: The ``spec`` prefixes :func:`load_feature_extractor` understands.
FEATURE_KINDS = ("viq", "hf", "timm", "open_clip")


class ViQFeatures(nn.Module):
    """The ViQ encoder's pooled features: ``(N, 3, H, W)`` in ``[0, 1]`` -> ``(N, width)`` float32 (CPU).

    Pixels are mapped to the encoder's ``[-1, 1]``, zero-padded (mid-grey) to multiples of the patch
    size, run through the trunk (``model.encoder``) and the last-block tokens are averaged.
    """

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        if getattr(model, "encoder", None) is None:
            raise ValueError("the 'viq' feature extractor needs a model loaded with its encoder")
        self.model = model
        self.num_features = int(model.config.encoder.width)  # read by torchmetrics instead of a dummy pass

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:

        weight = next(self.model.encoder.parameters())
        p = self.model.patch_size
        padded = [pad_to_patches((x * 2 - 1).to(device=weight.device, dtype=weight.dtype), p) for x in images]
        tokens, packed = self.model.encoder(padded)
        return torch.stack([t.float().mean(0) for t in packed.split(tokens)]).cpu()


class ResizedBackbone(nn.Module):
    """A pretrained backbone behind its own input convention.

    ``(N, 3, H, W)`` in ``[0, 1]`` -> resized to ``size`` (bicubic, antialiased, clamped back to
    ``[0, 1]``), normalised with ``mean`` / ``std`` -> ``forward_features`` -> ``(N, D)`` float32 (CPU).
    """

    def __init__(
        self,
        backbone: nn.Module,
        forward_features: Any,
        size: tuple[int, int],
        mean: Sequence[float],
        std: Sequence[float],
    ) -> None:
        super().__init__()
        self.backbone = backbone.eval()
        self.forward_features = forward_features
        self.size = (int(size[0]), int(size[1]))
        self.register_buffer("mean", torch.tensor(list(mean), dtype=torch.float32).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(list(std), dtype=torch.float32).view(1, 3, 1, 1), persistent=False)

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        param = next(self.backbone.parameters())
        x = images.to(device=param.device, dtype=torch.float32)
        x = F.interpolate(x, size=self.size, mode="bicubic", antialias=True, align_corners=False).clamp(0, 1)
        x = (x - self.mean.to(x.device)) / self.std.to(x.device)
        out = self.forward_features(x.to(param.dtype))
        return out.reshape(out.shape[0], -1).float().cpu()


def _cached_hub_dir(repo_id: str, kind: str) -> Path:
    """The local snapshot of hub repo ``repo_id`` (never downloads; ``FileNotFoundError`` if absent)."""
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(repo_id, local_files_only=True))
    except Exception as e:  # LocalEntryNotFoundError, an invalid id, ...
        raise FileNotFoundError(
            f"{kind}:{repo_id}: not a local path and not in the Hugging Face cache ({type(e).__name__}); viq never "
            f"downloads feature models: fetch it first (e.g. `hf download {repo_id}`) or pass a local path"
        ) from None


def _square(size: Any) -> tuple[int, int]:
    """``(height, width)`` from an int, an ``(..., H, W)`` sequence or a processor's size (a dict or
    transformers' ``SizeDict``: height/width, else shortest_edge / longest_edge as a square)."""
    if isinstance(size, int):
        return size, size
    if isinstance(size, (list, tuple)):
        return int(size[-2]), int(size[-1])

    def get(key: str) -> Any:
        return size.get(key) if isinstance(size, dict) else getattr(size, key, None)

    if get("height") and get("width"):
        return int(get("height")), int(get("width"))
    edge = get("shortest_edge") or get("longest_edge")
    if edge:
        return int(edge), int(edge)
    raise ValueError(f"cannot read an input size from {size!r}")


def _hf(ref: str, device: torch.device) -> ResizedBackbone:
    from transformers import AutoImageProcessor, AutoModel

    location = ref if Path(ref).exists() else str(_cached_hub_dir(ref, "hf"))
    model = AutoModel.from_pretrained(location, local_files_only=True).to(device)
    proc = AutoImageProcessor.from_pretrained(location, local_files_only=True)
    size = _square(getattr(proc, "crop_size", None) or proc.size)

    def features(x: torch.Tensor) -> torch.Tensor:
        if hasattr(model, "get_image_features"):  # CLIP / SigLIP: the embedding the model was trained with
            out = model.get_image_features(pixel_values=x)
            return out if isinstance(out, torch.Tensor) else out.pooler_output
        out = model(pixel_values=x)
        pooled = getattr(out, "pooler_output", None)
        if pooled is not None:
            return pooled
        return out.last_hidden_state.mean(1)

    return ResizedBackbone(model, features, size, proc.image_mean, proc.image_std)


def _arch_and_file(ref: str, kind: str) -> tuple[str, Path] | None:
    """``<architecture>=<file>`` -> (architecture, file), checking the file exists; else None."""
    if "=" not in ref:
        return None
    arch, _, file = ref.partition("=")
    if not Path(file).is_file():
        raise FileNotFoundError(f"{kind}:{ref}: checkpoint file {file} not found")
    return arch, Path(file)


def _timm(ref: str, device: torch.device) -> ResizedBackbone:
    import timm
    from timm.data import resolve_model_data_config

    local = _arch_and_file(ref, "timm")
    if local is not None:
        model = timm.create_model(
            local[0], pretrained=True, num_classes=0, pretrained_cfg_overlay={"file": str(local[1])}
        )
    else:
        _cached_hub_dir(ref, "timm")  # present in the cache: timm's hub loader reads it from there
        model = timm.create_model(f"hf-hub:{ref}", pretrained=True, num_classes=0)
    cfg = resolve_model_data_config(model)
    return ResizedBackbone(model.to(device), model, _square(tuple(cfg["input_size"])), cfg["mean"], cfg["std"])


def _open_clip(ref: str, device: torch.device) -> ResizedBackbone:
    import open_clip

    local = _arch_and_file(ref, "open_clip")
    if local is not None:
        model = open_clip.create_model(local[0], pretrained=str(local[1]))
    else:
        _cached_hub_dir(ref, "open_clip")
        model = open_clip.create_model(f"hf-hub:{ref}")
    visual = model.visual
    size = _square(getattr(visual, "image_size", 224))
    mean = getattr(visual, "image_mean", None) or open_clip.OPENAI_DATASET_MEAN
    std = getattr(visual, "image_std", None) or open_clip.OPENAI_DATASET_STD
    return ResizedBackbone(model.to(device), model.encode_image, size, mean, std)


def load_feature_extractor(
    spec: str, model: nn.Module | None = None, device: torch.device | str | None = None
) -> nn.Module:
    """The feature extractor named by ``spec`` (module docstring), in eval mode.

    Args:
        spec: ``"viq"``, ``"hf:<dir or hub id>"``, ``"timm:<hub id>"``, ``"timm:<arch>=<file>"``,
            ``"open_clip:<hub id>"`` or ``"open_clip:<arch>=<file>"``.
        model: the :class:`viq.ViQModel` (``"viq"`` only).
        device: where a pretrained backbone runs (default: CPU; ``"viq"`` runs where the model is).

    Returns:
        an ``nn.Module``: ``(N, 3, H, W)`` float in ``[0, 1]`` -> ``(N, D)`` float32 on the CPU.

    Raises:
        ValueError: unknown spec; FileNotFoundError: the weights are neither local nor cached;
        ImportError: the library the spec names is not installed.
    """
    kind, _, ref = spec.partition(":")
    if kind == "viq" and not ref:
        if model is None:
            raise ValueError("the 'viq' feature extractor needs the ViQ model")
        return ViQFeatures(model).eval()
    if kind not in FEATURE_KINDS or not ref:
        raise ValueError(
            f"unknown feature extractor {spec!r}: use viq, hf:<dir or hub id>, timm:<hub id or arch=file> "
            f"or open_clip:<hub id or arch=file>"
        )
    device = torch.device(device or "cpu")
    loader = {"hf": _hf, "timm": _timm, "open_clip": _open_clip}[kind]
    try:
        return loader(ref, device).eval()
    except ImportError as e:
        package = {"hf": "transformers", "timm": "timm", "open_clip": "open-clip-torch"}[kind]
        raise ImportError(f"feature extractor {spec!r} needs {package}: pip install {package} ({e})") from e


class RFID:
    """Accumulates features of reference / reconstruction pairs; :meth:`compute` gives rFID.

    Example::

        fid = RFID(load_feature_extractor("viq", model))
        fid.add(reference, reconstruction)   # (3, H, W) in [-1, 1] each, any H, W
        fid.compute()                          # float, or None with fewer than 2 pairs
    """

    def __init__(self, extractor: nn.Module) -> None:
        try:
            from torchmetrics.image.fid import FrechetInceptionDistance
        except ImportError as exc:  # pragma: no cover - depends on the environment
            raise ImportError("rFID needs torchmetrics: pip install 'viq[eval]'") from exc
        # normalize=True: images are float in [0, 1]; a custom module receives them unchanged.
        self.metric = FrechetInceptionDistance(feature=extractor, normalize=True, reset_real_features=True)
        self.n = 0

    @staticmethod
    def _unit(x: torch.Tensor) -> torch.Tensor:
        return (x.detach().float().cpu() * 0.5 + 0.5).clamp(0, 1).unsqueeze(0)

    def add(self, reference: torch.Tensor, reconstruction: torch.Tensor) -> None:
        """Add one pair of ``(3, H, W)`` images in ``[-1, 1]`` (sizes may differ between pairs)."""
        self.metric.update(self._unit(reference), real=True)
        self.metric.update(self._unit(reconstruction), real=False)
        self.n += 1

    def compute(self) -> float | None:
        """The Fréchet distance (>= 0 up to float rounding, clamped at 0), or None with < 2 pairs."""
        if self.n < 2:
            return None
        value = float(self.metric.compute())
        return max(0.0, value) if math.isfinite(value) else value


def rfid(
    references: Sequence[torch.Tensor], reconstructions: Sequence[torch.Tensor], extractor: nn.Module
) -> float | None:
    """rFID of two equally long lists of ``(3, H, W)`` images in ``[-1, 1]`` (see :class:`RFID`)."""
    if len(references) != len(reconstructions):
        raise ValueError(f"{len(references)} references but {len(reconstructions)} reconstructions")
    acc = RFID(extractor)
    for ref, rec in zip(references, reconstructions):
        acc.add(ref, rec)
    return acc.compute()
