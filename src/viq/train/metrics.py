"""What a run measures: code usage of the quantizer, and answer scoring (:mod:`viq.eval.answers`, named
here too); records go to :mod:`viq.train.logger`."""

from __future__ import annotations

import math

import torch

from viq.eval.answers import answer_matches, normalize_answer
from viq.eval.codebook import slot_counts  # scoring lives with evaluation; named here too
from viq.formats.bits import usage_stats
from viq.train.parallel import Dist

__all__ = ["CodeUsage", "code_usage_metrics", "normalize_answer", "answer_matches"]


# ---------------------------------------------------------------------------------- code usage


def code_usage_metrics(hist: torch.Tensor) -> dict[str, float]:
    """``code_usage`` (share of the codebook seen), ``code_perplexity`` and ``code_entropy_bits`` of
    a code histogram (length K), as the run logs them; all 0 for an empty histogram."""
    stats = usage_stats(hist)
    return {
        "code_usage": stats["usage"],
        "code_perplexity": stats["perplexity"],
        "code_entropy_bits": stats["entropy_bits"],
    }


class CodeUsage:
    """Code histograms over a window of steps, per code slot: share of the codebook used, perplexity
    and entropy, overall and for each of the ``codes_per_patch`` slots (the 2x2 sub-positions of a
    patch, which are the head's attention heads), and a warning when the codebook collapses.

    ``size``: codebook size K (0: the stage has no codes, nothing is counted). Indices come as
    ``(N, slots)`` (one row per patch, official slot order) or any shape (one slot).
    """

    def __init__(self, size: int, device: torch.device, window: int = 20, *, collapse_usage: float = 0.0) -> None:
        self.size, self.window, self.device = size, window, device
        self.collapse_usage = collapse_usage
        self.collapsed_at: int | None = None
        self.counts: list[torch.Tensor] = []
        self.current: torch.Tensor | None = None  # (slots, K), made at the first add

    def add(self, indices: torch.Tensor) -> None:
        """Count code indices: ``(N, slots)``, or any other shape as one slot; values in [0, K)."""
        if not self.size:
            return
        rows = indices.long().reshape(-1, indices.shape[-1]) if indices.dim() == 2 else indices.long().reshape(-1, 1)
        slots = rows.shape[1]
        if self.current is None or self.current.shape[0] != slots:
            self.current = torch.zeros(slots, self.size, dtype=torch.float64, device=self.device)
            self.counts = [c for c in self.counts if c.shape == self.current.shape]
        self.current += slot_counts(rows, self.size).to(self.current)

    def summary(self, dist_info: Dist) -> dict[str, float]:
        """Close the current step (summed over ranks: a collective) and report the last ``window``
        steps: ``code_usage``, ``code_perplexity``, ``code_entropy_bits`` and, with several slots,
        ``code_usage_slot<j>`` / ``code_entropy_bits_slot<j>`` / ``code_perplexity_slot<j>`` (slot j = head j:
        the head's streams never mix)."""
        if self.current is None:
            return {}
        dist_info.all_reduce(self.current)
        self.counts = (self.counts + [self.current.clone()])[-self.window :]
        self.current.zero_()
        per_slot = torch.stack(self.counts).sum(0)
        out = code_usage_metrics(per_slot.sum(0))
        if per_slot.shape[0] > 1:
            for j, hist in enumerate(per_slot):
                stats = code_usage_metrics(hist)
                out[f"code_usage_slot{j}"] = stats["code_usage"]
                out[f"code_entropy_bits_slot{j}"] = stats["code_entropy_bits"]
                out[f"code_perplexity_slot{j}"] = stats["code_perplexity"]
        return out

    def collapse(self, step: int, metrics: dict[str, float]) -> str | None:
        """A plain-words warning, the first time the window is full and the codebook share used falls
        below ``collapse_usage`` (None otherwise, and every time after)."""
        if (
            self.collapsed_at is not None
            or not self.collapse_usage
            or len(self.counts) < self.window
            or metrics.get("code_usage", 1.0) >= self.collapse_usage
        ):
            return None
        self.collapsed_at = step
        used = round(metrics["code_usage"] * self.size)
        return (
            f"step {step}: the codebook is collapsing: {used} of {self.size} codes "
            f"({100 * metrics['code_usage']:.2f} %, below train.collapse_usage {100 * self.collapse_usage:g} %) were "
            f"used over the last {self.window} steps, {metrics['code_entropy_bits']:.2f} of "
            f"{math.log2(self.size):.2f} bits of entropy; a lower learning rate for the head, or a smaller "
            f"codebook, usually helps"
        )

    def state_dict(self) -> dict:
        """The window's per-step histograms (summed over ranks, so the same on every rank): kept in
        checkpoints so a resumed run reports what an uninterrupted one reports."""
        return {"counts": [c.cpu() for c in self.counts], "collapsed_at": self.collapsed_at}

    def load_state_dict(self, state: dict) -> None:
        # Histograms of checkpoints written before per-slot counting are (K,): the window restarts.
        self.counts = [c.to(self.device) for c in state["counts"] if c.dim() == 2] if self.size else []
        if self.counts:
            self.current = torch.zeros_like(self.counts[0])
        self.collapsed_at = state.get("collapsed_at")
