"""The loss table: one record per training loss, the only place a loss is written down.

A loss is a function of the model, the micro-batch and what the stage's path made of it
(:class:`LossInputs`) that returns a *sum* over its unit (supervised tokens or images), so that a step
can divide by the step's global count (:func:`viq.train.engine.combine_losses`). Which losses a stage
computes is its record's ``losses`` (:mod:`viq.train.stages`), weighted by the recipe's ``loss``
section; the losses are computed in table order (the order of the graph's nodes, hence of the float
sums of the backward pass: kept, so a run reproduces the runs before it bit for bit).

=========  ======  =============================================================================
loss       unit    what it is
=========  ======  =============================================================================
distill    images  self-distillation: 1 - cos(student MAP(features), frozen teacher on a
                   fixed-resolution view)
recon      images  VAE-latent reconstruction: MSE(predicted latent, frozen VAE posterior mean)
commit     images  the quantizer's auxiliary loss (SimVQ's commitment; 0 for FSQ, the bottleneck)
text       tokens  LLM cross-entropy on the answer tokens, image tokens spliced in
pixel      images  pixel MSE of the decoded latents through the frozen VAE decoder
=========  ======  =============================================================================

Adding a loss is one :func:`register_loss` call (a record and the stages that compute it); its weight
is ``loss.extra.<name>`` in a recipe (default: the record's ``default_weight``).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

from viq.model.vae import decode_latents
from viq.train.stages import TABLE as STAGE_TABLE
from viq.train.stages import get_stage

# The model and the micro-batch are a viq.train.model.TrainModel and TrainBatch (not imported: that
# module imports this one, and the layout test forbids import cycles, type-only ones included).
TrainModel = Any
TrainBatch = Any

__all__ = ["Loss", "LossInputs", "LOSS_TABLE", "UNITS", "register_loss", "loss_names"]

#: What a loss can be summed over (a step divides each sum by the step's global count of its unit).
UNITS = ("tokens", "images")


@dataclass
class LossInputs:
    """What a micro-batch gives the losses (made by the stage's path, ``TrainModel.loss_inputs``):
    per image features and grids, the padded pixels, the latents of the stage's decoder (when it
    reconstructs), the quantizer's auxiliary loss and the code indices."""

    features: list[torch.Tensor]
    grids: list[tuple[int, int]]
    padded: list[torch.Tensor] = field(default_factory=list)
    latents: list[torch.Tensor] | None = None
    aux: torch.Tensor | None = None
    indices: list[torch.Tensor] | None = None
    #: 0 * (something of the graph): added to every loss so that each process runs the same modules
    #: (every path sets it; the default is a plain zero)
    anchor: torch.Tensor = field(default_factory=lambda: torch.zeros(()))


@dataclass(frozen=True)
class Loss:
    """One training loss (see the module docstring)."""

    name: str
    #: one of :data:`UNITS`
    unit: str
    #: (model, micro-batch, inputs) -> the loss summed over the micro-batch's units (a scalar tensor
    #: with its graph); return ``inputs.anchor`` when the micro-batch has nothing to compute it on
    compute: Callable[[TrainModel, TrainBatch, LossInputs], torch.Tensor]
    #: the weight of a registered loss when the recipe's ``loss.extra`` does not name it (the built-in
    #: losses have their fields in :class:`viq.train.config.LossSection`)
    default_weight: float = 1.0


def _distill(model: TrainModel, batch: TrainBatch, x: LossInputs) -> torch.Tensor:
    """Self-distillation: student MAP(LN(features)) vs the frozen teacher on a fixed-resolution view."""
    if not x.features:
        return x.anchor
    assert model.encoder.pool is not None and model.teacher is not None  # distillation builds both
    student = model.encoder.pool(x.features)
    with torch.no_grad():
        views = model.teacher_views(x.padded)
        t_tokens, t_packed = model.teacher(views)
        target = model.teacher.pool(t_packed.split(t_tokens))
    return (1 - F.cosine_similarity(student.float(), target.float(), dim=-1)).sum()


def _recon(model: TrainModel, batch: TrainBatch, x: LossInputs) -> torch.Tensor:
    """VAE-latent reconstruction: predicted latent vs the frozen VAE's posterior mean."""
    if not x.features:
        return x.anchor
    if x.latents is None:  # the encoder-side latent decoder (the drawer's path brings its own)
        x.latents = model.recon(x.features, x.grids)
    targets = model.vae_targets(x.padded)
    return torch.stack([F.mse_loss(z.float(), t.float()) for z, t in zip(x.latents, targets)]).sum()


def _commit(model: TrainModel, batch: TrainBatch, x: LossInputs) -> torch.Tensor:
    """The quantizer's auxiliary loss (SimVQ commitment; 0 for FSQ and the bottleneck), per image."""
    return x.aux * len(batch.images) if x.aux is not None else x.anchor


def _text(model: TrainModel, batch: TrainBatch, x: LossInputs) -> torch.Tensor:
    """Projector tokens spliced into each conversation, packed rows, cross-entropy on answer tokens."""
    if not batch.conversations:
        return x.anchor
    return model.text_loss(batch, x.features, x.grids)[0] + x.anchor


def _pixel(model: TrainModel, batch: TrainBatch, x: LossInputs) -> torch.Tensor:
    """Pixel MSE of the decoded latents through the frozen VAE decoder: the drawer's, or in stage 2 the
    encoder-side latent decoder's (the paper's "MSE" reconstruction loss of its Table 4)."""

    if not x.features:
        return x.anchor
    decoder = model.drawer.latent if model.drawer is not None else model.recon
    if x.latents is None:
        x.latents = model.recon(x.features, x.grids)
    errors = [
        F.mse_loss(decode_latents(model.vae, decoder.to_raw(z)).float(), img.float())
        for z, img in zip(x.latents, x.padded)
    ]
    return torch.stack(errors).sum()


#: Every loss by name, in the order they are computed (see the module docstring).
LOSS_TABLE: dict[str, Loss] = {
    loss.name: loss
    for loss in (
        Loss("distill", "images", _distill),
        Loss("recon", "images", _recon),
        Loss("commit", "images", _commit),
        Loss("text", "tokens", _text),
        Loss("pixel", "images", _pixel),
    )
}


def loss_names() -> tuple[str, ...]:
    """Every loss name, in table order (read when needed: :func:`register_loss` may add one)."""
    return tuple(LOSS_TABLE)


def register_loss(loss: Loss, *, stages: Iterable[str]) -> Loss:
    """Add ``loss`` to the table (computed after the losses already there) and to the ``losses`` of the
    stages named in ``stages`` (their records in :data:`viq.train.stages.TABLE` are replaced). A recipe
    then weighs it with ``loss.extra.<name>``. ValueError for a taken name, an unknown unit or stage."""
    if loss.name in LOSS_TABLE:
        raise ValueError(f"a loss named {loss.name!r} is already registered")
    if loss.unit not in UNITS:
        raise ValueError(f"loss {loss.name!r}: unit must be one of {UNITS}, got {loss.unit!r}")
    records = [get_stage(name) for name in stages]  # ValueError naming the known stages
    LOSS_TABLE[loss.name] = loss
    for record in records:
        STAGE_TABLE[record.name] = dataclasses.replace(record, losses=record.losses + (loss.name,))
    return loss
