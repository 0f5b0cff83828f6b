"""A fresh code head warmed up on the trunk it reads (recipe key ``model.head_warmup_steps``).

Stage 2-1 puts a new code head and dequantiser (C -> bottleneck -> limit -> back to C) between a trained
trunk and everything that reads the trunk's features: the MAP head, the projector and LLM, and (when
stage 1 trained one) the latent decoder. Started at random, the pair hands those readers features they
were never trained on, and the stage's first few hundred steps go to rebuilding a path the trunk had
already given them. With a warm-up, before the stage's first step the head and dequantiser alone learn to
give the trunk's features back through the bottleneck,

    minimise  || dequant(head(trunk(x))) - trunk(x) ||^2 / Var(trunk(x))      (trunk frozen, no grad)

with Adam at a constant step size on batches drawn from a pool of training images (decoded once): an
autoencoder on features. The stage
then starts with ``x_low`` close to the features its readers know. The trunk, the readers, the losses,
the bottleneck and its limit stay the paper's; the warm-up's optimizer is thrown away, so the stage's
own optimizer and schedule start as they would without it.

Every rank draws the same batches (a generator seeded by ``train.seed``), and the engine broadcasts rank
0's result, so the warmed head is identical across processes. The global random state is not touched.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch

from viq.model.encoder import pad_to_patches

__all__ = ["HeadWarmup", "warm_up_head"]


@dataclass(frozen=True)
class HeadWarmup:
    """What :func:`warm_up_head` did: ``steps``, the feature error (MSE over the trunk features'
    variance, per step's batch) at the first and last step, and wall ``seconds``."""

    steps: int
    first_error: float
    last_error: float
    seconds: float

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def warm_up_head(
    model: Any,
    images: Sequence[torch.Tensor],
    *,
    steps: int,
    lr: float,
    batch_size: int,
    seed: int,
    autocast: Any = None,
) -> HeadWarmup:
    """Train ``model.head`` and ``model.dequant`` for ``steps`` Adam steps to give back the trunk's
    features (module docstring); everything else is left as it is.

    Args:
        model: a :class:`viq.ViQModel` / ``TrainModel`` with encoder, head and dequant.
        images: the pool the batches are drawn from, (3, H, W) in [-1, 1], any sizes
            (:func:`viq.train.data.dataset_images`).
        steps: optimizer steps (>= 1).
        lr: Adam's constant step size.
        batch_size: images per step.
        seed: seeds the batch draws (not the global random state).
        autocast: a context manager for the forward passes (the stage's precision), or None.
    """
    if model.head is None or model.dequant is None:
        raise ValueError("model.head_warmup_steps: the model has no code head and dequantiser to warm up")
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    if not images:
        raise ValueError("model.head_warmup_steps: no training image to warm the head on")
    params = [p for m in (model.head, model.dequant) for p in m.parameters()]
    optimizer = torch.optim.Adam(params, lr=lr)
    generator = torch.Generator().manual_seed(seed)
    device, dtype = model.device, model.dtype
    was_training = model.training
    model.train()
    errors: list[float] = []
    start = time.perf_counter()
    try:
        pool = [pad_to_patches(x, model.patch_size) for x in images]  # kept where they are (host memory)
        for _ in range(steps):
            draw = torch.randint(len(pool), (batch_size,), generator=generator).tolist()
            batch = [pool[i].to(device=device, dtype=dtype) for i in draw]
            with autocast if autocast is not None else contextlib.nullcontext():
                with torch.no_grad():
                    tokens, packed = model.encoder(batch)
                values = model.head.quantize(tokens, packed).values
                features = model.dequant.from_code_values(values)
            n = sum(packed.lengths)  # real patches; filler rows excluded
            target = tokens[:n].float()
            error = ((features[:n].float() - target) ** 2).mean() / target.var().clamp_min(1e-12)
            optimizer.zero_grad(set_to_none=True)
            error.backward()
            optimizer.step()
            errors.append(float(error.detach()))
    finally:
        optimizer.zero_grad(set_to_none=True)
        model.train(was_training)
    return HeadWarmup(steps, errors[0], errors[-1], time.perf_counter() - start)
