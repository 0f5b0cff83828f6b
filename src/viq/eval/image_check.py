"""The one check every image metric makes of its inputs: :func:`check_image`."""

from __future__ import annotations

from typing import Any

import torch

__all__ = ["check_image"]


def check_image(name: str, x: Any) -> torch.Tensor:
    """``x`` if it is a non-empty float ``(3, H, W)`` tensor, else TypeError / ValueError naming ``name``."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of shape (3, H, W), got {type(x).__name__}")
    if x.ndim != 3 or x.shape[0] != 3:
        raise ValueError(f"{name} must have shape (3, H, W), got {tuple(x.shape)}")
    if not x.is_floating_point():
        raise TypeError(f"{name} must be a float tensor with values in [-1, 1], got dtype {x.dtype}")
    if x.shape[1] == 0 or x.shape[2] == 0:
        raise ValueError(f"{name} is empty: shape {tuple(x.shape)}")
    return x
