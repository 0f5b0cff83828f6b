"""What trains and how fast: module groups to freeze, AdamW with per-group learning rates, and the
learning-rate schedule (linear warmup, then cosine)."""

from __future__ import annotations

import math

import torch
from torch import nn

from viq.train.config import TrainConfig
from viq.train.model import GROUPS, TrainModel
from viq.train.parallel import strip_wrapper_prefix

__all__ = ["group_of", "set_trainable", "build_optimizer", "lr_multiplier", "build_scheduler"]


def group_of(name: str) -> str:
    """The module group (a key of :data:`viq.train.model.GROUPS`) of parameter ``name``."""
    for group, prefixes in GROUPS.items():
        if name.startswith(prefixes):
            return group
    raise ValueError(f"parameter {name} belongs to no module group")


def set_trainable(model: TrainModel, groups: list[str]) -> None:
    """Train the parameters of ``groups``, freeze the rest."""
    unknown = set(groups) - set(GROUPS)
    if unknown:
        raise ValueError(f"optim.trainable: unknown groups {sorted(unknown)}; known: {sorted(GROUPS)}")
    for name, p in model.named_parameters():
        group = group_of(name)
        if group == "llm":
            # prepare_llm decided which LLM parameters train (frozen / LoRA / full)
            p.requires_grad_(p.requires_grad and "llm" in groups)
        else:
            p.requires_grad_(group in groups)


def build_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    """AdamW; no weight decay on norms, biases and other vectors (ndim < 2); per-group LRs."""
    buckets: dict[tuple[str, bool], list[nn.Parameter]] = {}
    for name, p in model.named_parameters():
        if p.requires_grad:
            buckets.setdefault((group_of(strip_wrapper_prefix(name)), p.ndim >= 2), []).append(p)
    if not buckets:
        raise ValueError("nothing to train: every parameter is frozen (check optim.trainable and llm.mode)")
    param_groups = [
        {
            "params": params,
            "lr": cfg.optim.group_lr.get(group, cfg.optim.lr),
            "weight_decay": cfg.optim.weight_decay if decay else 0.0,
            "name": f"{group}{'' if decay else '.no_decay'}",
        }
        for (group, decay), params in sorted(buckets.items())
    ]
    return torch.optim.AdamW(
        param_groups,
        betas=cfg.optim.betas,
        eps=cfg.optim.eps,
        **_fastest_implementation([p for ps in buckets.values() for p in ps]),
    )


def _fastest_implementation(params: list[nn.Parameter]) -> dict[str, bool]:
    """AdamW's fused kernel (one kernel over all parameters, CPU and CUDA since torch 2.4) for plain
    float tensors on one device; sharded (FSDP2 DTensor) or mixed parameters keep torch's default
    (multi-tensor on CUDA). Left to itself torch takes the per-parameter loop on the CPU, a few Python
    operations per tensor, which costs small models more than their matrix products do."""
    from torch.distributed.tensor import DTensor

    devices = {p.device.type for p in params}
    plain = all(type(p.data) is torch.Tensor and not isinstance(p, DTensor) and p.is_floating_point() for p in params)
    return {"fused": True} if plain and len(devices) == 1 and devices <= {"cpu", "cuda"} else {}


def lr_multiplier(step: int, total: int, warmup_ratio: float, min_ratio: float) -> float:
    """Linear warmup from 0 over ceil(warmup_ratio * total) steps, then cosine down to min_ratio."""
    warmup = math.ceil(warmup_ratio * total)
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: TrainConfig) -> torch.optim.lr_scheduler.LambdaLR:
    """The recipe's schedule over ``train.max_steps`` optimizer steps (stepped once per step)."""
    total = cfg.train.max_steps
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_multiplier(s, total, cfg.optim.warmup_ratio, cfg.optim.min_lr_ratio)
    )
