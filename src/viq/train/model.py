"""The model being trained, for every stage: the ViQ network + MM projector + LLM, with frozen teacher and VAE.

:class:`TrainModel` *is* a :class:`viq.model.viq.ViQModel` (a subclass: the same parts, built by the
same builder, under the same names), holding the parts its stage trains or needs
(:meth:`viq.train.stages.Stage.active_parts`), and adds only what training needs: the projector and
LLM (``projector.`` / ``llm.`` in the state dict), the frozen distillation teacher and VAE (kept out of
the state dict), and the losses. Its images go through the network's own paths
(:meth:`~viq.model.viq.ViQModel.encode_features`, :meth:`~viq.model.viq.ViQModel.embed_codes`,
:meth:`~viq.model.viq.ViQModel.draw_codes`); which path a stage takes is its record's ``path``, and
which losses it computes are its record's ``losses`` with a positive weight. Export is
:meth:`inference_model` (:func:`viq.train.output.save_stage_output`), a plain ``ViQModel`` that
``viq.load`` reads back as it was.

Losses are returned as *sums* (:class:`StepLosses`), so the engine can normalise by the global counts
of a whole optimizer step (supervised tokens for text, images for the rest: each loss's ``unit`` in
:mod:`viq.train.losses`):
the gradient is then the same whatever the split over processes and micro-batches.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from viq.mllm.chat import IGNORE_INDEX
from viq.mllm.packing import pack_sequences, splice_image_features, supervised_lm_loss
from viq.model.config import ViQConfig, get_preset
from viq.model.parts import parts_in
from viq.model.vae import encode_latents_grouped
from viq.model.viq import ViQModel
from viq.model.weights import check_state
from viq.train.losses import LOSS_TABLE, LossInputs
from viq.train.stages import get_stage

log = logging.getLogger(__name__)

__all__ = ["TrainModel", "TrainBatch", "StepLosses", "GROUPS", "LLM_ROWS"]

#: Module groups for learning rates and freezing: group -> state-dict prefixes.
GROUPS: dict[str, tuple[str, ...]] = {
    "encoder": ("encoder.patch_embed.", "encoder.pos_embed", "encoder.blocks."),
    "pool": ("encoder.pool.",),
    "head": ("head.",),
    "dequant": ("dequant.",),
    "recon": ("recon.",),
    "drawer": ("drawer.",),
    "embedder": ("embedder.",),
    "projector": ("projector.",),
    "llm": ("llm.",),
}

#: How conversations are laid out for the LLM: ``packed`` (first-fit into rows of ``max_length``,
#: attention kept inside each conversation: what training uses) or ``padded`` (one conversation
#: per row, right-padded to the longest, with a padding mask: the LLaVA-style baseline that
#: ``bench/train_step.py`` compares against).
LLM_ROWS = ("packed", "padded")


@dataclass
class TrainBatch:
    """One micro-batch on one process.

    images: all images of the batch, in sample order, each (3, H, W) normalised pixels.
    conversations: per sample (input_ids (L,), labels (L,)) with one placeholder id per image
        (viq.mllm.chat.IMAGE_PLACEHOLDER_ID), or empty for image-only stages.
    images_per_sample: number of images of each sample (sums to len(images)).
    ids: sample ids (for error messages).
    """

    images: list[torch.Tensor]
    #: stages that read stored codes instead of pixels: one viq.Codes per image
    codes: list = field(default_factory=list)
    conversations: list[tuple[torch.Tensor, torch.Tensor]] = field(default_factory=list)
    images_per_sample: list[int] = field(default_factory=list)
    ids: list[str] = field(default_factory=list)

    @property
    def num_images(self) -> int:
        return len(self.images) + len(self.codes)

    def to(self, device: torch.device) -> TrainBatch:
        return dataclasses.replace(self, images=[x.to(device, non_blocking=True) for x in self.images])

    @property
    def num_supervised_tokens(self) -> int:
        # Shifted labels: token t is predicted from position t-1, so the first label never counts.
        return sum(int((labels[1:] != -100).sum()) for _, labels in self.conversations)


@dataclass
class StepLosses:
    """One micro-batch's losses, as sums over their units (each loss's ``unit``, :mod:`viq.train.losses`).

    sums: loss name -> sum (a scalar tensor with its graph), for the losses the model computes.
    images: images in the micro-batch.
    indices: every code index of the micro-batch (quantizing stages), detached, for code-usage statistics.
    """

    sums: dict[str, torch.Tensor]
    images: int
    indices: torch.Tensor | None = None


class TrainModel(ViQModel):
    """The stage's network (see the module docstring).

    Args:
        stage: the stage's name (its record in :mod:`viq.train.stages`).
        config: the ViQ architecture.
        parts: ViQ parts to build (default: the stage's, with the optional ones its losses switch on).
        llm, projector: the language side (stages with an LLM).
        vae: the frozen latent codec of the reconstruction loss.
        losses: the losses to compute (default: the stage's with a positive weight in ``loss_weights``).
        loss_weights: the recipe's weights (:meth:`viq.train.config.TrainConfig.loss_weights`).
        teacher_resize, teacher_size: the teacher's fixed-resolution view.
        max_length: LLM row length (packed conversations).
        llm_rows: one of :data:`LLM_ROWS`.
        carry: tensors of the init weights written unchanged into the stage output.
        llm_identity: which LLM the projector and adapter are made for (recorded in the output).
    """

    def __init__(
        self,
        stage: str,
        config: ViQConfig,
        *,
        parts: tuple[str, ...] | None = None,
        llm: nn.Module | None = None,
        projector: nn.Module | None = None,
        vae: nn.Module | None = None,
        losses: tuple[str, ...] | None = None,
        loss_weights: Mapping[str, float] | None = None,
        teacher_resize: str = "bilinear",
        teacher_size: int = 384,
        max_length: int = 4096,
        llm_rows: str = "packed",
        carry: dict[str, torch.Tensor] | None = None,
        llm_identity: dict[str, Any] | None = None,
    ) -> None:
        if llm_rows not in LLM_ROWS:
            raise ValueError(f"llm_rows must be one of {LLM_ROWS}, got {llm_rows!r}")
        spec = get_stage(stage)
        weights = dict(loss_weights) if loss_weights is not None else {loss: 1.0 for loss in spec.losses}
        parts = spec.active_parts(weights) if parts is None else tuple(parts)
        super().__init__(config, parts=tuple(p for p in parts if p != "vae"))
        self.stage = stage
        self.spec = spec
        computed = spec.computed_losses(weights) if losses is None else tuple(losses)
        #: the losses this model computes (the stage's, with a weight; text only with an LLM)
        self.losses = tuple(loss for loss in computed if loss != "text" or llm is not None)
        self.projector = projector
        self.llm = llm
        self.max_length = max_length
        #: one of :data:`LLM_ROWS` (may be switched between steps)
        self.llm_rows = llm_rows
        self.teacher_resize = teacher_resize
        self.teacher_size = teacher_size
        self.carry = dict(carry or {})
        self.llm_identity = llm_identity
        #: where the teacher came from, written into the stage output (see viq.train.build.setup_teacher)
        self.teacher_record: dict | None = None
        self.set_vae(vae)

    # ------------------------------------------------------------------ construction
    # ViQModel's constructors build by components; a training model is built by stage (the parts, losses
    # and frozen helpers follow from it), so both take the stage first.
    @classmethod
    def from_config(  # type: ignore[override]
        cls, config: ViQConfig | str, *, stage: str, seed: int | None = None, **kwargs: Any
    ) -> TrainModel:
        """A randomly initialised training model of ``stage`` (``config``: a ViQConfig or a preset name);
        ``kwargs`` go to the constructor (``llm``, ``projector``, ``vae``, ``loss_weights``, ...)."""

        if isinstance(config, str):
            config = get_preset(config)
        if seed is not None:
            torch.manual_seed(seed)
        return cls(stage, config, **kwargs)

    @classmethod
    def from_state_dict(  # type: ignore[override]
        cls,
        config: ViQConfig,
        state: dict[str, torch.Tensor],
        *,
        stage: str,
        source: str = "<state dict>",
        **kwargs: Any,
    ) -> TrainModel:
        """A training model of ``stage`` whose weights are exactly ``state`` (every key checked, as
        :meth:`ViQModel.from_state_dict` does); ``kwargs`` go to the constructor."""

        with torch.device("meta"):
            expected = cls(stage, config, **kwargs).state_dict()
        check_state(expected, state, source)
        model = cls(stage, config, **kwargs)
        model.load_state_dict(state, strict=True)
        return model

    # ------------------------------------------------------------------ frozen helpers
    @property
    def _frozen(self) -> dict[str, nn.Module]:
        """The frozen helpers by name, kept out of the state dict and the optimizer (in ``__dict__``,
        not submodules; created on first use, since ViQModel's constructor already sets ``vae``)."""
        return self.__dict__.setdefault("_frozen_helpers", {})

    @property
    def teacher(self) -> nn.Module | None:
        return self._frozen.get("teacher")

    @property
    def vae(self) -> nn.Module | None:  # ViQModel's "vae" part is, in training, the frozen codec
        return self._frozen.get("vae")

    @vae.setter
    def vae(self, module: nn.Module | None) -> None:
        self.set_vae(module)

    def set_vae(self, vae: nn.Module | None) -> None:
        if vae is not None:
            vae.requires_grad_(False).eval()
        self._frozen["vae"] = vae

    def snapshot_teacher(self) -> None:
        """Freeze a copy of the current encoder (trunk + MAP head) as the distillation teacher."""
        self.set_teacher(copy.deepcopy(self.encoder))

    def set_teacher(self, encoder: nn.Module) -> None:
        """Use ``encoder`` (a :class:`ViTEncoder` with its MAP head), frozen, as the distillation teacher."""
        teacher = encoder.requires_grad_(False).eval()
        teacher.gradient_checkpointing = False
        self._frozen["teacher"] = teacher

    def _apply(self, fn, recurse=True):  # keep frozen helpers on the model's device/dtype
        super()._apply(fn, recurse)
        for module in self._frozen.values():
            if module is not None:
                module._apply(fn, recurse)
        return self

    # ------------------------------------------------------------------ export
    def inference_model(self) -> ViQModel:
        """The network this model trains, as ``viq.load`` will read it: its parts' weights, those carried
        unchanged from the init weights, the frozen VAE, and -- as the official converter does -- an
        embedder (and, until one is trained, a drawer) derived from the encoder's own dequantiser (and
        latent decoder). A plain :class:`ViQModel` on the CPU; nothing of the LLM side."""
        own = {k: v.detach().cpu().contiguous() for k, v in self.state_dict().items() if parts_in([k])}
        # A VAE given by vae.path replaces the one the init weights carried (their architectures may differ).
        own.update({k: v for k, v in self.carry.items() if not (self.vae is not None and k.startswith("vae."))})
        state = dict(own)
        present = parts_in(own)
        if "dequant" in present and "embedder" not in present and self.config.head.codebook_size:
            state.update({"embedder." + k[len("dequant.") :]: v for k, v in own.items() if k.startswith("dequant.")})
            if "drawer" not in present and "recon" in present:
                state.update(
                    {"drawer.features." + k[len("dequant.") :]: v for k, v in own.items() if k.startswith("dequant.")}
                )
                state.update(
                    {"drawer.latent." + k[len("recon.") :]: v for k, v in own.items() if k.startswith("recon.")}
                )
        if self.vae is not None:
            state.update({"vae." + k: v.detach().cpu().contiguous() for k, v in self.vae.state_dict().items()})
        model = ViQModel.from_state_dict(self.config, state, parts=parts_in(state), source=f"stage {self.stage}")
        model.sync_codebooks()  # a learned codebook: the embedder and drawer read the head's
        return model

    # ------------------------------------------------------------------ forward
    def forward(self, batch: TrainBatch) -> StepLosses:
        """The loss sums of one micro-batch (see the module docstring), in loss-table order."""
        inputs = self.loss_inputs(batch)
        sums = {name: loss.compute(self, batch, inputs) for name, loss in LOSS_TABLE.items() if name in self.losses}
        # (patches, slots): official order puts a patch's codes_per_patch codes side by side.
        slots = self.config.head.codes_per_patch if self.head is not None else 1
        indices = torch.cat([i.reshape(-1, slots) for i in inputs.indices]).detach() if inputs.indices else None
        return StepLosses(sums, batch.num_images, indices)

    def loss_inputs(self, batch: TrainBatch) -> LossInputs:
        """The micro-batch through the stage's path (``Stage.path``)."""
        path = self.spec.path
        if path == "codes":
            if batch.codes:
                features, grids = self.embed_codes(batch.codes)
                return LossInputs(features, grids, anchor=features[0].new_zeros(()))
            anchor = sum(p.sum() for p in self.projector.parameters()) * 0  # type: ignore[misc]  # sum of tensors
            return LossInputs([], [], anchor=anchor)
        if path == "drawer":
            with torch.no_grad():  # the encoder and its head are frozen: only the drawer trains
                self.sync_codebooks()  # a learned codebook: the drawer reads indices through the head's
                encoded = self.encode_features(batch.images, dequantize=False)
            features, latents = self.draw_codes(encoded.indices, encoded.grids)
            return LossInputs(
                features,
                encoded.grids,
                encoded.padded,
                latents,
                indices=encoded.indices,
                anchor=latents[0].new_zeros(()),
            )
        if batch.images:
            encoded = self.encode_features(batch.images)
            assert encoded.features is not None  # the trunk's, or the dequantiser's: every such stage has one
            anchor = encoded.features[0].new_zeros(())
        else:
            # A batch of text-only samples still runs the vision side once, on a grey dummy patch,
            # with zero weight: every process must run the same modules (DDP/FSDP collectives).
            p = self.config.encoder.patch_size
            dummy = self.encode_features([self.encoder.pos_embed.new_zeros(3, p, p)])
            anchor = sum(f.sum() for f in dummy.features) * 0  # type: ignore[misc]  # sum of tensors
            return LossInputs([], [], aux=anchor, anchor=anchor)
        return LossInputs(encoded.features, encoded.grids, encoded.padded, None, encoded.aux, encoded.indices, anchor)

    # ------------------------------------------------------------------ what the losses use
    def teacher_views(self, images: list[torch.Tensor]) -> list[torch.Tensor]:
        """The teacher's fixed-resolution view of each (3, H, W) image; images of one size are resized
        together (one call instead of one per image; each result is the same)."""
        views: dict[int, torch.Tensor] = {}
        by_size: dict[tuple[int, int], list[int]] = {}
        for i, img in enumerate(images):
            by_size.setdefault(tuple(img.shape[-2:]), []).append(i)
        for members in by_size.values():
            batch = torch.stack([images[i] for i in members])
            views.update(zip(members, self._teacher_view(batch).unbind(0)))
        return [views[i] for i in range(len(images))]

    def _teacher_view(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) images of one size -> (B, 3, h, w) teacher views."""
        s = self.teacher_size
        if self.teacher_resize == "bilinear":
            # Official: any image -> s x s, bilinear, no antialias, aspect ratio not kept, in float32.
            return F.interpolate(x.float(), size=(s, s), mode="bilinear", align_corners=False).to(x.dtype)
        h, w = x.shape[-2:]
        scale = math.sqrt(s * s / (h * w))
        p = self.config.encoder.patch_size
        size = (max(p, round(h * scale / p) * p), max(p, round(w * scale / p) * p))
        return F.interpolate(x.float(), size=size, mode="bilinear", align_corners=False, antialias=True).to(x.dtype)

    @torch.no_grad()
    def vae_target(self, x: torch.Tensor) -> torch.Tensor:
        """(3, H, W) padded pixels -> (16, H/8, W/8) latent target: the frozen VAE's latent (posterior
        mean), in the latent decoders' space (normalised when ``config.decoder.latent_mean`` is set)."""
        return self.vae_targets([x])[0]

    @torch.no_grad()
    def vae_targets(self, images: list[torch.Tensor]) -> list[torch.Tensor]:
        """:meth:`vae_target` of each image, encoding same-sized images in one VAE call."""

        decoder = self.drawer.latent if self.drawer is not None else self.recon
        raws = encode_latents_grouped(self.vae, images)
        return [decoder.from_raw(raw) for raw in raws] if decoder is not None else raws

    def text_loss(self, batch: TrainBatch, features, grids) -> tuple[torch.Tensor, torch.Tensor]:
        """(cross-entropy sum over the supervised tokens, their count) of the micro-batch's conversations,
        with the projector's tokens of ``features`` (per image (h*w, C), ``grids``) spliced in."""

        assert self.projector is not None and self.llm is not None  # the text loss is computed with an LLM only
        image_embeds = self.projector(features, grids) if features else []
        embed = self.llm.get_input_embeddings()
        items = []
        start = 0
        for (input_ids, labels), k in zip(batch.conversations, batch.images_per_sample):
            device = embed.weight.device
            items.append(
                splice_image_features(embed, input_ids.to(device), labels.to(device), image_embeds[start : start + k])
            )
            start += k
        if features:
            # Keep every image in the graph even when its tokens were truncated away (DDP needs
            # every trainable parameter to receive a gradient each step).
            anchor = sum(e.sum() for e in image_embeds) * 0
            items[0] = (items[0][0] + anchor, items[0][1])
        if self.llm_rows == "padded":
            inputs, labels = self._padded_rows(items)
        else:
            packed = pack_sequences(items, self.max_length)
            inputs, labels = packed.model_inputs(), packed.labels
        _, ce_sum, count = supervised_lm_loss(self.llm, inputs, labels)
        return ce_sum, count.float()

    def _padded_rows(self, items: list[tuple[torch.Tensor, torch.Tensor]]) -> tuple[dict[str, Any], torch.Tensor]:
        """LLaVA-style layout: one conversation per row, right-padded to the longest with zero
        embeddings and IGNORE_INDEX labels, and a 2-D padding attention mask. Returns the LLM's
        inputs and the labels (N, T)."""

        device = items[0][0].device
        T = max(emb.shape[0] for emb, _ in items)
        embeds = torch.stack([F.pad(emb, (0, 0, 0, T - emb.shape[0])) for emb, _ in items])
        labels = torch.stack([F.pad(lab, (0, T - lab.shape[0]), value=IGNORE_INDEX) for _, lab in items])
        mask = torch.stack([torch.arange(T, device=device) < emb.shape[0] for emb, _ in items]).long()
        return {"inputs_embeds": embeds, "attention_mask": mask, "use_cache": False}, labels
