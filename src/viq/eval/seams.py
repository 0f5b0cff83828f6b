"""Block seams as a number: :func:`seam_ratio`.

A reconstruction drawn block by block (a pixel codec's 8x8 blocks, one code per 8x8 cell) can be right on
average and still show the grid: each block's error is smooth inside and jumps at its edges. PSNR and
SSIM barely see it; the eye does. :func:`seam_ratio` compares the error's jumps across the grid's lines
with its jumps elsewhere.
"""

from __future__ import annotations

import math

import torch

from viq.eval.image_check import check_image

__all__ = ["seam_ratio"]


def seam_ratio(reference: torch.Tensor, reconstruction: torch.Tensor, period: int) -> float:
    """How much the reconstruction's error jumps across the lines of a ``period``-pixel grid (the
    blocks of a pixel codec, the patches of the encoder) compared with everywhere else: visible seams
    as a number.

    With ``e = reconstruction - reference`` (both ``(3, H, W)``, any range, same scale), the absolute
    differences of ``e`` between horizontally and vertically neighbouring pixels are split into those
    that straddle a grid line (between pixel ``k * period - 1`` and ``k * period``) and the rest; the
    result is the mean of the first over the mean of the second (means per direction, then summed, so
    that an error changing along one direction only weighs the same on and off the lines). An error
    without a grid (a blur, bicubic upsampling, noise) gives about 1; a blockwise error -- each block off
    by its own amount, smooth inside -- gives well above 1. Taking differences of the error, not of the image, keeps the
    image's own edges out of it. ``nan`` when the image has no grid line (or nothing but);
    1.0 for an error that never changes; ``inf`` for one that changes only on grid lines.
    """
    reference = check_image("reference", reference)
    reconstruction = check_image("reconstruction", reconstruction)
    if reference.shape != reconstruction.shape:
        raise ValueError(
            f"shapes differ: reference {tuple(reference.shape)}, reconstruction {tuple(reconstruction.shape)}"
        )
    if period < 2:
        raise ValueError(f"period must be >= 2 pixels, got {period}")
    e = reconstruction.double() - reference.double()
    dx = (e[:, :, 1:] - e[:, :, :-1]).abs()  # (3, H, W-1): pair (j, j+1)
    dy = (e[:, 1:, :] - e[:, :-1, :]).abs()  # (3, H-1, W)
    line_x = torch.arange(1, e.shape[2]) % period == 0  # the pair's right pixel starts a block
    line_y = torch.arange(1, e.shape[1]) % period == 0
    # per direction (rows and columns hold different numbers of lines), each direction that has pairs
    # both on and off the lines, then summed
    pairs = ((dx[:, :, line_x], dx[:, :, ~line_x]), (dy[:, line_y, :], dy[:, ~line_y, :]))
    used = [(on, off) for on, off in pairs if on.numel() and off.numel()]
    if not used:
        return math.nan
    on_mean = sum(float(on.mean()) for on, _ in used)
    off_mean = sum(float(off.mean()) for _, off in used)
    if off_mean == 0.0:
        return 1.0 if on_mean == 0.0 else math.inf
    return on_mean / off_mean
