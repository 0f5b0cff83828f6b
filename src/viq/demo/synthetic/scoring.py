"""Scoring a model's reply against a synthetic sample's reference answer."""

from __future__ import annotations

from viq.train.metrics import answer_matches, normalize_answer

__all__ = ["normalize_answer", "score"]

#: A reply is right when it equals the reference after normalisation (case, whitespace and
#: punctuation ignored): the same match validation uses during training (one copy, in
#: :mod:`viq.train.metrics`). ``"Top-Left."`` matches ``"top left"``; ``"3"`` does not match
#: ``"three"``; ``"$12.50"`` also matches ``"1250"`` (harmless for this dataset's answers).
score = answer_matches
