"""The code-space id of a model: which codes mean the same thing (written into ``.viq`` metadata and
code stores, compared when codes are decoded or appended)."""

from __future__ import annotations

import dataclasses
import hashlib
import json

import torch

from viq.model.config import ViQConfig

__all__ = ["code_fingerprint"]


def code_fingerprint(config: ViQConfig, project_in_weight: torch.Tensor, project_in_bias: torch.Tensor) -> str:
    """A short id of a code space: the encoder and head architecture plus the final code projection.

    Two models with the same id produce codes that mean the same thing. The weights are rounded to
    bf16 first, so loading the same files in any dtype gives the same id. (Not a cryptographic
    identity of all weights: it is cheap enough to compute when a model is loaded.)
    """
    arch = {"encoder": dataclasses.asdict(config.encoder), "head": dataclasses.asdict(config.head)}
    h = hashlib.sha256(json.dumps(arch, sort_keys=True).encode())
    for t in (project_in_weight, project_in_bias):
        h.update(t.detach().to("cpu", torch.bfloat16).contiguous().view(torch.int16).numpy().tobytes())
    return h.hexdigest()[:16]
