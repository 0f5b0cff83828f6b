"""Codebook health of a set of codes: usage, entropy, perplexity and dead codes, overall and per head,
the most used codes, and the colour a code is drawn in.

A code index ``i`` of an FSQ codebook with levels ``(L_0, ..., L_{d-1})`` is the mixed-radix number of
its per-channel level digits, the first channel fastest (:class:`viq.model.quantizer.FSQ`): digit
``k = (i // prod(L_0..L_{k-1})) % L_k``, value ``(digit - L_k // 2) / (L_k // 2)`` in ``[-1, 1]``.

The ``codes_per_patch`` codes of a patch (4 in the paper's head) are its *heads*: the head's attention
runs one stream per sub-token and the streams never mix (:mod:`viq.model.head`), so "per head" and "per
2x2 slot" are the same split; slot ``j`` of patch ``(y, x)`` sits at flat position ``4 * (y * w + x) + j``.

:func:`code_colours` draws a code by its FSQ values, so equal codes share a colour and codes with close
values look alike: channel ``k`` adds to red, green or blue by ``k % 3`` (the mean of its group's values,
mapped from ``[-1, 1]`` to ``[0, 255]``). Codes that differ only within a group can share a colour; the
page's hover names the index.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from viq.formats.bits import usage_stats
from viq.formats.codes import Codes
from viq.model.quantizer import FSQ

__all__ = ["code_values", "code_colours", "CodebookCounter", "slot_counts", "slot_grid"]


def code_values(indices: np.ndarray, levels: Sequence[int]) -> np.ndarray:
    """``(...)`` integer code indices -> ``(..., d)`` float32 FSQ values in ``[-1, 1]``
    (:meth:`viq.model.quantizer.FSQ.indices_to_codes`, the model's own mapping)."""

    return FSQ(levels).indices_to_codes(torch.as_tensor(np.asarray(indices, dtype=np.int64))).numpy()


def slot_counts(rows: torch.Tensor, size: int) -> torch.Tensor:
    """``(N, slots)`` code indices in ``[0, size)`` -> ``(slots, size)`` int64 counts: one histogram per
    slot (head), in one ``bincount``. Shared by this counter and training's code usage."""
    slots = rows.shape[1]
    offsets = torch.arange(slots, device=rows.device) * size
    return torch.bincount((rows.long() + offsets).flatten(), minlength=slots * size).view(slots, size)


def code_colours(indices: np.ndarray, levels: Sequence[int]) -> np.ndarray:
    """``(...)`` code indices -> ``(..., 3)`` uint8 RGB, a function of the FSQ values (module docstring)."""
    values = code_values(indices, levels)
    d = values.shape[-1]
    channels = [
        values[..., [k for k in range(d) if k % 3 == c]].mean(-1) if c < d else np.zeros(values.shape[:-1])
        for c in range(3)
    ]
    rgb = (np.stack(channels, -1) * 0.5 + 0.5).clip(0, 1)
    return np.round(rgb * 255).astype(np.uint8)


def slot_grid(codes_per_patch: int) -> tuple[int, int]:
    """How the ``codes_per_patch`` codes of a patch are laid out when drawn: ``(rows, cols)`` of cells,
    slot ``j`` at ``(j // cols, j % cols)`` (4 -> 2x2, 1 -> 1x1, 2 -> 1x2)."""
    cols = math.ceil(math.sqrt(codes_per_patch))
    return math.ceil(codes_per_patch / cols), cols


class CodebookCounter:
    """Code histograms per slot (head) over many images.

    ``add(codes)`` counts one image's ``(h, w, codes_per_patch)`` indices; ``summary()`` reports the
    health figures. Memory: ``codes_per_patch * K`` int64 counts.
    """

    def __init__(self, levels: Sequence[int], codes_per_patch: int) -> None:
        self.levels = tuple(int(v) for v in levels)
        self.codebook_size = math.prod(self.levels)
        self.codes_per_patch = int(codes_per_patch)
        self.counts = np.zeros((self.codes_per_patch, self.codebook_size), dtype=np.int64)
        self.images = 0

    def add(self, codes: Codes) -> None:
        if tuple(codes.levels) != self.levels or codes.codes_per_patch != self.codes_per_patch:
            raise ValueError(
                f"codes with levels {codes.levels} x {codes.codes_per_patch} per patch do not match the "
                f"counter's {self.levels} x {self.codes_per_patch}"
            )
        self.add_indices(codes.indices)

    def add_indices(self, indices: torch.Tensor | np.ndarray) -> None:
        """Count one image's code indices, any shape whose last ``codes_per_patch`` values in official
        order belong to one patch (``(h, w, c)`` or flat ``(h*w*c,)``)."""
        if isinstance(indices, np.ndarray):
            indices = torch.from_numpy(indices.astype(np.int64, copy=False))
        self.counts += slot_counts(indices.reshape(-1, self.codes_per_patch), self.codebook_size).numpy()
        self.images += 1

    def add_histogram(self, histogram: np.ndarray, slot: int | None = None) -> None:
        """Add a ready histogram of length K, to one slot or (``None``) spread as an all-slot total."""
        histogram = np.asarray(histogram, dtype=np.int64)
        if histogram.shape != (self.codebook_size,):
            raise ValueError(f"a histogram of {histogram.shape} for a codebook of {self.codebook_size}")
        self.counts[0 if slot is None else slot] += histogram

    def summary(self, top: int = 16) -> dict[str, Any]:
        """``{"images", "codes", "codebook_size", "log2_codebook", "levels", "overall": {usage, entropy_bits,
        perplexity, used, dead}, "heads": [the same per slot], "top": [{index, count, share, values,
        colour}]}``; ``usage`` is the share of the K codes seen, ``dead`` the number never seen."""
        total = self.counts.sum(0)

        def health(hist: np.ndarray) -> dict[str, Any]:
            used = int((hist > 0).sum())
            return {**usage_stats(hist), "used": used, "dead": self.codebook_size - used, "codes": int(hist.sum())}

        order = np.argsort(-total, kind="stable")[:top]
        order = order[total[order] > 0]
        n = max(int(total.sum()), 1)
        values = code_values(order, self.levels)
        colours = code_colours(order, self.levels)
        return {
            "images": self.images,
            "codes": int(total.sum()),
            "codebook_size": self.codebook_size,
            "log2_codebook": math.log2(self.codebook_size),
            "levels": list(self.levels),
            "overall": health(total),
            "heads": [health(h) for h in self.counts] if self.codes_per_patch > 1 else [],
            "top": [
                {
                    "index": int(i),
                    "count": int(total[i]),
                    "share": float(total[i]) / n,
                    "values": [round(float(v), 4) for v in values[r]],
                    "colour": "#" + "".join(f"{int(c):02x}" for c in colours[r]),
                }
                for r, i in enumerate(order)
            ],
        }
