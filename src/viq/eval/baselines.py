"""The reference images a reconstruction is scored beside, each a ``(3, H, W)`` image in ``[-1, 1]``
scored like a reconstruction (:func:`viq.eval.recon.psnr_ssim`):

* :func:`mean_colour`: every pixel is the image's per-channel mean -- what a model that only
  knows the average colour gets.
* :func:`bicubic_at_bits`: "bicubic at equal bits" -- the largest aspect-preserving thumbnail
  whose raw 8-bit RGB pixels (24 bits each) fit the tokenizer's bit budget, upsampled back with
  Pillow's bicubic filter.
"""

from __future__ import annotations

import math

import torch
from PIL import Image

from viq.eval.image_check import check_image
from viq.formats.image import to_pil, to_pixels

__all__ = ["BITS_PER_PIXEL_RGB8", "mean_colour", "bicubic_size_at_bits", "bicubic_at_bits"]

#: Raw cost of one 8-bit RGB pixel, the currency of :func:`bicubic_at_bits`.
BITS_PER_PIXEL_RGB8 = 24


def mean_colour(reference: torch.Tensor) -> torch.Tensor:
    """Baseline: a ``(3, H, W)`` image whose every pixel is the reference's per-channel mean.

    The mean is taken in float64 as ``x0 + mean(x - x0)`` with ``x0`` the top-left pixel, then
    cast back to the reference's dtype, so a constant image is returned exactly (float32 and
    float64 alike). Values stay in ``[-1, 1]``; not quantised to 8 bits.
    """
    reference = check_image("reference", reference)
    x = reference.to(torch.float64)
    x0 = x[:, :1, :1]
    mean = (x0 + (x - x0).mean(dim=(1, 2), keepdim=True)).to(reference.dtype)
    return mean.expand_as(reference).clone()


def bicubic_size_at_bits(height: int, width: int, bits: float) -> tuple[int, int]:
    """The thumbnail size ``(h', w')`` :func:`bicubic_at_bits` uses for an ``height x width`` image.

    Sizes are ``h' = max(1, round(H * s))``, ``w' = max(1, round(W * s))`` for one scale factor
    ``0 < s <= 1`` (so the aspect ratio is kept; rounding is half-up, evaluated exactly with
    fractions). The result is the largest such size with ``h' * w' * 24 <= bits``: the pixel
    count grows monotonically with ``s`` and changes only where ``H*s`` or ``W*s`` crosses a
    half-integer, so those breakpoints are binary-searched exactly (integer arithmetic). If the budget holds the
    whole image, ``(H, W)`` is returned. If even 1x1 (24 bits) does not fit, ``(1, 1)`` is
    returned anyway (the budget is then exceeded; a one-pixel image is the floor).
    """
    height, width = int(height), int(width)
    if height < 1 or width < 1:
        raise ValueError(f"image size must be positive, got {height}x{width}")
    if isinstance(bits, bool) or not isinstance(bits, (int, float)) or math.isnan(bits) or bits < 0:
        raise ValueError(f"bits must be a non-negative number, got {bits!r}")
    # Work in integers: s = n / (2*H*W). Then round_half_up(H*s) = floor(n/(2W) + 1/2)
    # = (n + W) // (2W), and likewise for W. Breakpoints (the smallest s at which H*s, resp.
    # W*s, reaches k + 1/2) are n = (2k+1)*W, resp. (2k+1)*H; n = 0 stands for "below every
    # breakpoint", where both sides clamp to 1. n = 2*H*W is s = 1.
    points = sorted({0} | {(2 * k + 1) * width for k in range(height)} | {(2 * k + 1) * height for k in range(width)})

    def size(n: int) -> tuple[int, int]:
        return max(1, (n + width) // (2 * width)), max(1, (n + height) // (2 * height))

    def fits(n: int) -> bool:
        h, w = size(n)
        return h * w * BITS_PER_PIXEL_RGB8 <= bits

    if not fits(points[0]):
        return 1, 1
    lo, hi = 0, len(points) - 1  # invariant: points[lo] fits; every index above hi does not
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if fits(points[mid]):
            lo = mid
        else:
            hi = mid - 1
    return size(points[lo])


def bicubic_at_bits(reference: torch.Tensor, bits: float) -> torch.Tensor:
    """Baseline "bicubic at equal bits": a thumbnail worth ``bits`` of raw 8-bit RGB, scaled back.

    Args:
        reference: ``(3, H, W)`` float tensor in ``[-1, 1]``.
        bits: the budget in bits (e.g. the tokenizer's ``tokens * bits_per_token``).

    The reference is converted to 8-bit RGB (:func:`viq.formats.image.to_pil`), downsampled to
    :func:`bicubic_size_at_bits` with Pillow ``BICUBIC`` (``reducing_gap=None``: Pillow's
    antialiased resize, the filter support scaled by the reduction factor), then upsampled back
    to ``(H, W)`` with Pillow ``BICUBIC``, and returned as a ``(3, H, W)`` float32 tensor in
    ``[-1, 1]`` (:func:`viq.formats.image.to_pixels`). When the whole image fits the budget the
    result is the 8-bit quantised reference; when not even 1x1 fits, 1x1 is used.
    """
    reference = check_image("reference", reference)
    _, height, width = reference.shape
    h, w = bicubic_size_at_bits(height, width, bits)
    image = to_pil(reference)
    small = image.resize((w, h), Image.Resampling.BICUBIC, reducing_gap=None)
    back = small.resize((width, height), Image.Resampling.BICUBIC, reducing_gap=None)
    return to_pixels(back)
