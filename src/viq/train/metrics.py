"""What a run reports: code usage of the quantizer, answer scoring, and where records go
(``metrics.jsonl`` / ``val.jsonl``, TensorBoard, the progress bar)."""

from __future__ import annotations

import json
import logging
import unicodedata
from pathlib import Path

import torch

from viq.formats.bits import usage_stats
from viq.train.config import TrainConfig
from viq.train.parallel import Dist

log = logging.getLogger(__name__)

__all__ = ["CodeUsage", "code_usage_metrics", "normalize_answer", "answer_matches", "RunLog", "progress_bar"]


# ---------------------------------------------------------------------------------- code usage

def code_usage_metrics(hist: torch.Tensor) -> dict[str, float]:
    """``code_usage`` (share of the codebook seen) and ``code_perplexity`` of a code histogram
    (length K), as the run logs them; both 0 for an empty histogram."""
    stats = usage_stats(hist)
    return {"code_usage": stats["usage"], "code_perplexity": stats["perplexity"]}


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


# ------------------------------------------------------------------------------------ records

class RunLog:
    """Rank 0's record of a run in ``out_dir``: one JSON line per record, ``train`` records in
    ``metrics.jsonl`` and ``val`` records in ``val.jsonl``, plus TensorBoard scalars
    (``<kind>/<key>``) when ``tensorboard`` is set. Other ranks write nothing."""

    FILES = {"train": "metrics.jsonl", "val": "val.jsonl"}

    def __init__(self, out_dir: Path, *, tensorboard: bool, main: bool) -> None:
        self.out_dir, self.main = out_dir, main
        self.tb = _tensorboard(out_dir) if main and tensorboard else None

    def write(self, kind: str, record: dict, step: int) -> None:
        if not self.main:
            return
        with open(self.out_dir / self.FILES[kind], "a") as f:
            f.write(json.dumps(record) + "\n")
        if self.tb is not None:
            for k, v in record.items():
                if k != "step" and isinstance(v, (int, float)):
                    self.tb.add_scalar(f"{kind}/{k}", v, step)


def _tensorboard(out_dir: Path):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        log.warning("train.tensorboard is set but tensorboard is not installed (pip install tensorboard)")
        return None
    return SummaryWriter(str(out_dir / "tensorboard"))


def progress_bar(cfg: TrainConfig, dist_info: Dist, total: int, initial: int):
    """A tqdm bar over optimizer steps, shown on rank 0 when ``train.progress`` is set."""
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, desc=f"train {cfg.stage}", unit="step",
                disable=not (cfg.train.progress and dist_info.main))
