"""Loading weights by name: what fits is loaded, what does not is reported (never an exception).

Every hand-over between stages and every take-over of an earlier output's projector goes through
:func:`load_matching`, so the log always lists what was loaded, what starts fresh and what was dropped.
"""

from __future__ import annotations

import logging

import torch
from torch import nn

log = logging.getLogger(__name__)

__all__ = ["load_matching"]


def load_matching(module: nn.Module, state: dict[str, torch.Tensor], source: str) -> dict[str, list[str]]:
    """Load tensors whose name and shape match; report the rest (never raises on a mismatch)."""
    own = module.state_dict()
    loaded, mismatched, unexpected = [], [], []
    for k, v in state.items():
        if k not in own:
            unexpected.append(k)
        elif tuple(own[k].shape) != tuple(v.shape):
            mismatched.append(f"{k} {tuple(v.shape)} -> {tuple(own[k].shape)}")
        else:
            loaded.append(k)
    with torch.no_grad():
        for k in loaded:
            own[k].copy_(state[k].to(own[k].dtype))
    fresh = sorted(set(own) - set(loaded))
    report = {"loaded": loaded, "fresh": fresh, "mismatched": mismatched, "unexpected": unexpected}
    log.info(
        "%s: loaded %d tensors; %d start fresh; %d dropped (shape changed); %d not used",
        source,
        len(loaded),
        len(fresh),
        len(mismatched),
        len(unexpected),
    )
    for name, keys in (("fresh", _group(fresh)), ("shape changed", mismatched), ("not used", _group(unexpected))):
        if keys:
            log.info("  %s: %s", name, ", ".join(keys[:12]) + (" ..." if len(keys) > 12 else ""))
    return report


def _group(keys: list[str]) -> list[str]:
    """Collapse numbered layers for readable logs: head.code_blocks.{0,1,2}.* -> head.code_blocks.*"""
    out: list[str] = []
    for k in keys:
        parts = k.split(".")
        short = ".".join(parts[:2]) + ".*" if len(parts) > 2 else k
        if short not in out:
            out.append(short)
    return out
