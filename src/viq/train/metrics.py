"""What a run measures: code usage of the quantizer, answer scoring, and the progress bar (records
go to :mod:`viq.train.logger`)."""

from __future__ import annotations

import unicodedata

import torch

from viq.formats.bits import usage_stats
from viq.train.config import TrainConfig
from viq.train.parallel import Dist

__all__ = ["CodeUsage", "code_usage_metrics", "normalize_answer", "answer_matches", "progress_bar"]


# ---------------------------------------------------------------------------------- code usage

def code_usage_metrics(hist: torch.Tensor) -> dict[str, float]:
    """``code_usage`` (share of the codebook seen), ``code_perplexity`` and ``code_entropy_bits`` of
    a code histogram (length K), as the run logs them; all 0 for an empty histogram."""
    stats = usage_stats(hist)
    return {"code_usage": stats["usage"], "code_perplexity": stats["perplexity"],
            "code_entropy_bits": stats["entropy_bits"]}


class CodeUsage:
    """Code histogram over a window of steps: share of the codebook used and perplexity.

    ``size``: codebook size K (0: the stage has no codes, nothing is counted).
    """

    def __init__(self, size: int, device: torch.device, window: int = 20) -> None:
        self.size, self.window = size, window
        self.counts: list[torch.Tensor] = []
        self.current = torch.zeros(size, dtype=torch.float64, device=device) if size else None

    def add(self, indices: torch.Tensor) -> None:
        """Count code indices (any shape, values in [0, K))."""
        if self.size:
            self.current += torch.bincount(indices.long().flatten(), minlength=self.size).to(self.current)

    def summary(self, dist_info: Dist) -> dict[str, float]:
        """Close the current step (summed over ranks: a collective) and report the last ``window``
        steps."""
        dist_info.all_reduce(self.current)
        self.counts = (self.counts + [self.current.clone()])[-self.window:]
        self.current.zero_()
        return code_usage_metrics(torch.stack(self.counts).sum(0))

    def state_dict(self) -> dict:
        """The window's per-step histograms (summed over ranks, so the same on every rank): kept in
        checkpoints so a resumed run reports what an uninterrupted one reports."""
        return {"counts": [c.cpu() for c in self.counts]}

    def load_state_dict(self, state: dict) -> None:
        self.counts = [c.to(self.current) for c in state["counts"]] if self.size else []


# ------------------------------------------------------------------------------ answer scoring

def normalize_answer(text: str) -> str:
    """NFKC, case-folded, with everything but letters and digits (spaces, punctuation) removed."""
    return "".join(ch for ch in unicodedata.normalize("NFKC", text).casefold() if ch.isalnum())


def answer_matches(prediction: str, answer: str) -> bool:
    """Exact match after :func:`normalize_answer` (case/whitespace/punctuation-insensitive).

    ``"Top-Left."`` matches ``"top left"``; ``"3"`` does not match ``"three"``. Since separators
    are dropped, ``"$12.50"`` also matches ``"1250"``.
    """
    return normalize_answer(prediction) == normalize_answer(answer)


# ------------------------------------------------------------------------------- progress

def progress_bar(cfg: TrainConfig, dist_info: Dist, total: int, initial: int):
    """A tqdm bar over optimizer steps, shown on rank 0 when ``train.progress`` is set."""
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, desc=f"train {cfg.stage}", unit="step",
                disable=not (cfg.train.progress and dist_info.main))
