"""The stage table: one record per training stage, the only place stage behaviour is written down.

A recipe names its stage (``stage: stage2_2``); everything that differs between stages is read
from that stage's :class:`Stage` record here -- which ViQ parts the training model builds, which
module groups train by default, which losses it computes, what data it reads, whether it has an
LLM and a frozen VAE, and what it takes over from its initial weights. Adding a stage means adding
one record to :data:`TABLE`.

=========  ===================================================================================
stage1     text-aligned any-resolution pre-training of the continuous encoder: text CE +
           distill * (1 - cos) against a frozen fixed-resolution teacher (+ optionally a VAE-latent
           loss on the trunk features, for encoders that start from scratch)
stage2_1   proximal representation learning: code head with a continuous bottleneck (+ limit),
           + VAE-latent reconstruction loss
stage2_2   quantisation training: position-aware head-wise FSQ (or SimVQ), same losses
drawer     reconstruction decoder: codes -> VAE latents on a frozen ViQ (latent MSE, optional
           pixel loss through the frozen VAE decoder)
mllm       an LLM trained on codes read from a code store (viq extract): embedder -> projector
           -> LLM, no image decoding and no encoder in the loop
=========  ===================================================================================
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

__all__ = ["Stage", "Handover", "TABLE", "STAGES", "get_stage", "DATA_KINDS", "PATHS"]

#: What a stage reads: LLaVA conversations with images, bare images (a folder), or conversations
#: whose images are stored codes (a code store made by ``viq extract``).
DATA_KINDS = ("conversations", "images", "codes")
#: Where a stage's features come from: ``trunk`` (pixels -> encoder), ``dequant`` (pixels -> encoder ->
#: code head -> dequantiser: ``x_low``), ``drawer`` (pixels -> frozen encoder and head -> codes ->
#: drawer), ``codes`` (stored codes -> embedder).
PATHS = ("trunk", "dequant", "drawer", "codes")


@dataclass(frozen=True)
class Handover:
    """What a stage takes from its initial weights (``model.init``) and passes on unchanged.

    Weights are matched by state-dict name (see :func:`viq.train.matching.load_matching`).
    """

    #: state-dict prefixes never loaded into the stage's model: the frozen VAE is rebuilt on its
    #: own, the embedder is re-derived from the dequantizer when the output is exported
    skip: tuple[str, ...] = ("vae.", "embedder.")
    #: if set, only these prefixes are loaded (after ``skip``)
    only: tuple[str, ...] = ()
    #: (source prefix, target prefix): copies that initialise a part the init weights do not have
    #: yet (made only when no loaded tensor starts with the target's first name component)
    seed: tuple[tuple[str, str], ...] = ()
    #: prefixes of the init weights written unchanged into the stage's output (not in the live
    #: model): parts a later stage needs but this one does not train
    carry: tuple[str, ...] = ()


@dataclass(frozen=True)
class Stage:
    """One training stage (see the module docstring for what each does)."""

    name: str
    #: ViQ parts the training model builds (``encoder`` includes the MAP pool; ``head`` is the
    #: code head; ``dequant``/``recon`` the encoder-side decoder; ``drawer``; ``embedder``)
    parts: tuple[str, ...]
    #: module groups trained when the recipe's ``optim.trainable`` is not set
    trainable: tuple[str, ...]
    #: losses the stage computes, by name in the loss table (:mod:`viq.train.losses`; the recipe's
    #: weights select among them)
    losses: tuple[str, ...]
    #: one of :data:`DATA_KINDS`
    data: str
    #: the stage has a projector + LLM (when the recipe gives ``llm.path``)
    llm: bool
    #: the stage needs the frozen VAE (latent targets, pixel loss, PSNR)
    vae: bool
    #: the stage whose ``final/`` output this one usually starts from (None: a pre-trained encoder)
    follows: str | None
    #: where its features come from (one of :data:`PATHS`)
    path: str = "dequant"
    handover: Handover = field(default_factory=Handover)
    #: (loss, part): parts built only when the recipe gives that loss a positive weight; such a
    #: part brings the frozen VAE with it
    optional: tuple[tuple[str, str], ...] = ()

    def active_parts(self, weights: Mapping[str, float]) -> tuple[str, ...]:
        """The parts built for a recipe with these loss weights: ``parts`` + the switched-on optional ones."""
        return self.parts + tuple(part for loss, part in self.optional if weights.get(loss, 0) > 0)

    def computed_losses(self, weights: Mapping[str, float]) -> tuple[str, ...]:
        """The losses a model of this stage computes for a recipe with these weights: the stage's own,
        those with a positive weight (a loss with weight 0 is never computed)."""
        return tuple(loss for loss in self.losses if weights.get(loss, 0) > 0)

    def needs_vae(self, weights: Mapping[str, float]) -> bool:
        """Whether a recipe with these loss weights needs the frozen VAE."""
        return self.vae or any(weights.get(loss, 0) > 0 for loss, _ in self.optional)


TABLE: dict[str, Stage] = {
    s.name: s
    for s in (
        Stage(
            "stage1",
            parts=("encoder",),
            # The trunk, the MAP head, the projector and the LLM adapter (official defaults).
            trainable=("encoder", "pool", "projector", "llm", "recon"),
            losses=("text", "distill", "recon"),
            data="conversations",
            llm=True,
            vae=False,
            follows=None,
            path="trunk",
            # Not in the paper's stage 1 (its trunk starts from SigLIP2, whose features already carry
            # detail): a latent decoder on the trunk features, for encoders trained from scratch.
            optional=(("recon", "recon"),),
            # No use for the VAE (unless loss.recon is on), but the output must hand it on to stage 2.
            handover=Handover(carry=("vae.",)),
        ),
        Stage(
            "stage2_1",
            parts=("encoder", "head", "dequant", "recon"),
            # Everything but the frozen teacher/VAE (the released example also trains the trunk).
            trainable=("encoder", "pool", "head", "dequant", "recon", "projector", "llm"),
            losses=("text", "distill", "recon", "commit", "pixel"),
            data="conversations",
            llm=True,
            vae=True,
            follows="stage1",
        ),
        Stage(
            "stage2_2",
            parts=("encoder", "head", "dequant", "recon"),
            trainable=("encoder", "pool", "head", "dequant", "recon", "projector", "llm"),
            losses=("text", "distill", "recon", "commit", "pixel"),
            data="conversations",
            llm=True,
            vae=True,
            follows="stage2_1",
        ),
        Stage(
            "drawer",
            parts=("encoder", "head", "drawer"),
            trainable=("drawer",),
            losses=("recon", "pixel"),
            data="images",
            llm=False,
            vae=True,
            follows="stage2_2",
            path="drawer",
            handover=Handover(
                # A drawer starts from the encoder-side decoder when none was trained yet.
                seed=(("dequant.", "drawer.features."), ("recon.", "drawer.latent.")),
                # Only the drawer trains; the rest of the ViQ model is carried over into the output.
                carry=("dequant.", "recon.", "embedder."),
            ),
        ),
        Stage(
            "mllm",
            parts=("embedder",),
            # The embedder stays frozen unless optim.trainable lists it.
            trainable=("projector", "llm"),
            losses=("text",),
            data="codes",
            llm=True,
            vae=False,
            follows="stage2_2",
            path="codes",
            handover=Handover(skip=("vae.",), only=("embedder.",)),
        ),
    )
}

#: Stage names, in training order.
STAGES: tuple[str, ...] = tuple(TABLE)


def get_stage(name: str) -> Stage:
    """The record of stage ``name``; ValueError naming the known stages otherwise."""
    try:
        return TABLE[name]
    except KeyError:
        raise ValueError(f"stage must be one of {STAGES}, got {name!r}") from None
