"""Data-dependent initialisation of the projection into FSQ (recipe key ``model.fsq_init: pca``).

Stage 2-2 starts the map into FSQ fresh (``head.fsq_in``, D -> d, in the paper's layout; ``head.project_in``,
C -> d, in the released one). A random map sends the bottleneck's values to FSQ inputs that are small and
correlated: the bound (``tanh``) reaches a few of each dimension's levels, and the d dimensions repeat one
another, so the codes start with a fraction of their bits and training has to undo it. ``pca`` starts the
map instead from the values it receives on training images, y (N, k):

    z = W (y - mean),   W = diag(lambda_1 .. lambda_d)^(-1/2) U_d^T

with U_d the top-d principal directions of y and lambda their variances: the d FSQ inputs start centred,
uncorrelated and with unit variance, and keep as much of y's variance as any rank-d linear map does.
Initialising a quantizer from data is an old device for learned codebooks (k-means on the first batch:
SoundStream, Jukebox); here it sets FSQ's input map, and FSQ and the rest of the method are unchanged.

The statistics are accumulated in float64 over packed forward passes (no (N, k) matrix is kept), so the
cost is one forward of the trunk and head per image.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch

from viq.model.encoder import pad_to_patches
from viq.model.quantizer import FSQ

__all__ = ["FSQInit", "pca_init"]


@dataclass(frozen=True)
class FSQInit:
    """What :func:`pca_init` measured: ``images`` used, ``vectors`` (e*T code positions), the input width
    ``k``, ``variances`` of the d kept directions (before whitening, largest first) and ``explained``: their
    share of the input's total variance."""

    images: int
    vectors: int
    input_dim: int
    variances: list[float]
    explained: float

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@torch.no_grad()
def pca_init(model: Any, images: Sequence[torch.Tensor], *, images_per_pass: int = 16) -> FSQInit:
    """Set ``model.head.quantizer_projection`` (weight (d, k), bias (d,)) from ``images`` as the module
    docstring says; returns what was measured.

    Args:
        model: a :class:`viq.ViQModel` (or ``TrainModel``) with an FSQ code head.
        images: (3, H, W) normalised images in [-1, 1], any sizes.
        images_per_pass: images packed into one forward pass.

    Raises:
        ValueError: the head does not quantize with FSQ, or the images give fewer independent
            directions than FSQ has dimensions (too few images, or blank ones).
    """
    head = model.head
    if head is None or not isinstance(head.quantizer, FSQ):
        kind = "no code head" if head is None else f"a {type(head.quantizer).__name__} head"
        raise ValueError(f"model.fsq_init: pca sets the projection into FSQ; this model has {kind}")
    projection = head.quantizer_projection
    d, k = projection.weight.shape
    if not images:
        raise ValueError("model.fsq_init: pca needs training images, and none were found")
    device, dtype = model.device, model.dtype
    total = torch.zeros(k, dtype=torch.float64, device=device)
    outer = torch.zeros(k, k, dtype=torch.float64, device=device)
    vectors = 0
    was_training = model.training
    model.eval()
    try:
        for start in range(0, len(images), images_per_pass):
            chunk = [
                pad_to_patches(x.to(device=device, dtype=dtype), model.patch_size)
                for x in images[start : start + images_per_pass]
            ]
            tokens, packed = model.encoder(chunk)
            y = head.projection_input(tokens, packed)  # (e*T, k), filler rows included
            real = packed.split(y, head.cfg.codes_per_patch)  # per image (e*h*w, k): no filler
            y = torch.cat(real).double()
            total += y.sum(0)
            outer += y.T @ y
            vectors += y.shape[0]
    finally:
        model.train(was_training)
    mean = total / vectors
    covariance = outer / vectors - torch.outer(mean, mean)
    variances, directions = torch.linalg.eigh(covariance)  # ascending
    variances, directions = variances.flip(0), directions.flip(1)
    floor = max(float(variances[0]), 0.0) * 1e-6
    if vectors <= d or float(variances[d - 1]) <= floor:
        raise ValueError(
            f"model.fsq_init: pca found fewer than {d} directions with variance in {len(images)} images "
            f"({vectors} code positions); use more (model.fsq_init_images) or varied ones"
        )
    weight = directions[:, :d].T / variances[:d].sqrt()[:, None]  # (d, k)
    projection.weight.copy_(weight.to(projection.weight.dtype))
    projection.bias.copy_((-(weight @ mean)).to(projection.bias.dtype))
    explained = float(variances[:d].sum() / variances.clamp_min(0).sum())
    return FSQInit(len(images), vectors, k, [float(v) for v in variances[:d]], explained)
