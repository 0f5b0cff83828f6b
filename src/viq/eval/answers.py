"""Scoring a generated answer against the reference: normalised exact match, the rule of training's
validation and ``viq eval-qa`` alike."""

from __future__ import annotations

import unicodedata

__all__ = ["normalize_answer", "answer_matches"]


def normalize_answer(text: str) -> str:
    """NFKC, case-folded, with everything but letters and digits (spaces, punctuation) removed."""
    return "".join(ch for ch in unicodedata.normalize("NFKC", text).casefold() if ch.isalnum())


def answer_matches(prediction: str, answer: str) -> bool:
    """Exact match after :func:`normalize_answer` (case/whitespace/punctuation-insensitive).

    ``"Top-Left."`` matches ``"top left"``; ``"3"`` does not match ``"three"``. Since separators
    are dropped, ``"$12.50"`` also matches ``"1250"``.
    """
    return normalize_answer(prediction) == normalize_answer(answer)
