"""Evaluation of trained tokenizers: reconstruction metrics and baselines, QA accuracy."""
