"""The model being trained, for every stage: ViQ parts + MM projector + LLM, with frozen teacher and VAE.

Parameter names match :class:`viq.model.viq.ViQModel` (``encoder.``, ``head.``, ``dequant.``,
``recon.``, ``drawer.``) so a stage's output loads into the next stage, and into ``viq.load`` after
export, by name. ``projector.`` and ``llm.`` hold the language side. The teacher and the VAE are
frozen helpers and never part of the state dict.

Which parts exist is the stage's ``parts`` in the stage table (:mod:`viq.train.stages`). The data
path follows from them:

* an encoder without a head: encoder (+ MAP head) -> trunk features -> projector -> LLM;
* encoder + head + dequant: encoder -> head (bottleneck / FSQ / SimVQ) -> dequant -> x_low ->
  projector -> LLM, and recon -> VAE latents;
* encoder + head + drawer: frozen encoder + head -> codes -> drawer -> latents;
* embedder only: stored codes -> embedder -> projector -> LLM.

Losses are returned as *sums* with their unit counts (supervised tokens, images, latent elements),
so the engine can normalise by the global counts of a whole optimizer step: the gradient is then the
same whatever the split over processes and micro-batches.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import math
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from viq.model.config import ViQConfig
from viq.model.decoders import CodeDrawer, CodeEmbedder, LatentDecoder
from viq.model.encoder import ViTEncoder, pad_to_patches
from viq.model.head import CodeHead
from viq.train.stages import get_stage

log = logging.getLogger(__name__)

__all__ = ["TrainModel", "TrainBatch", "GROUPS", "LLM_ROWS"]

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

    def to(self, device: torch.device) -> "TrainBatch":
        return dataclasses.replace(self, images=[x.to(device, non_blocking=True) for x in self.images])

    @property
    def num_supervised_tokens(self) -> int:
        # Shifted labels: token t is predicted from position t-1, so the first label never counts.
        return sum(int((labels[1:] != -100).sum()) for _, labels in self.conversations)


class TrainModel(nn.Module):
    def __init__(
        self,
        stage: str,
        config: ViQConfig,
        *,
        llm: nn.Module | None = None,
        projector: nn.Module | None = None,
        vae: nn.Module | None = None,
        teacher_resize: str = "bilinear",
        teacher_size: int = 384,
        max_length: int = 4096,
        llm_rows: str = "packed",
        parts: tuple[str, ...] | None = None,
    ) -> None:
        super().__init__()
        if llm_rows not in LLM_ROWS:
            raise ValueError(f"llm_rows must be one of {LLM_ROWS}, got {llm_rows!r}")
        self.stage = stage
        self.spec = get_stage(stage)
        self.config = config
        width = config.width
        # The ViQ parts built: the stage's, or those given (viq.train.stages.Stage.active_parts).
        parts = self.spec.parts if parts is None else tuple(parts)
        # Without an encoder (stored codes), the embedder turns codes into features: the offline
        # path whose speed-up the paper reports.
        self.encoder = ViTEncoder(config.encoder) if "encoder" in parts else None
        self.embedder = CodeEmbedder(width, config.head) if "embedder" in parts else None
        self.head = CodeHead(width, config.head) if "head" in parts else None
        self.dequant = CodeEmbedder(width, config.head) if "dequant" in parts else None
        self.recon = LatentDecoder(width, config.decoder) if "recon" in parts else None
        self.drawer = CodeDrawer(width, config.head, config.decoder) if "drawer" in parts else None
        self.projector = projector
        self.llm = llm
        self.max_length = max_length
        #: one of :data:`LLM_ROWS` (may be switched between steps)
        self.llm_rows = llm_rows
        # Frozen helpers, kept out of the state dict (plain attributes in a list, not submodules).
        self._frozen: dict[str, nn.Module | None] = {"teacher": None, "vae": None}
        #: where the teacher came from, written into the stage output (see viq.train.build.setup_teacher)
        self.teacher_record: dict | None = None
        self.set_vae(vae)
        self.teacher_resize = teacher_resize
        self.teacher_size = teacher_size

    # ------------------------------------------------------------------ frozen helpers
    @property
    def teacher(self) -> nn.Module | None:
        return self._frozen["teacher"]

    @property
    def vae(self) -> nn.Module | None:
        return self._frozen["vae"]

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

    # ------------------------------------------------------------------ forward
    def features(self, images: list[torch.Tensor]) -> dict[str, Any]:
        """Pixels -> per-image continuous features (x_low, or trunk output in stage 1), grids,
        code indices and the quantizer's auxiliary loss."""
        p = self.config.encoder.patch_size
        padded = [pad_to_patches(x, p) for x in images]
        tokens, packed = self.encoder(padded)
        out: dict[str, Any] = {"padded": padded, "grids": list(packed.grids), "aux": tokens.new_zeros(())}
        if self.head is None:
            out["features"] = packed.split(tokens)
            out["indices"] = None
            return out
        values, indices, aux = self.head.quantize(tokens, packed)
        e = self.config.head.codes_per_patch
        out["aux"] = aux
        out["indices"] = None if indices is None else packed.split(indices, e)
        if self.dequant is not None:
            out["features"] = packed.split(self.dequant.from_code_values(values))
        return out

    def forward(self, batch: TrainBatch) -> dict[str, torch.Tensor]:
        """Loss sums and counts for one micro-batch (see the module docstring)."""
        if self.drawer is not None:
            return self._drawer_forward(batch)
        if self.encoder is None:
            return self._codes_forward(batch)
        out: dict[str, torch.Tensor] = {}
        n_images = len(batch.images)
        if n_images:
            feats = self.features(batch.images)
            features, grids = feats["features"], feats["grids"]
            zero = features[0].new_zeros(())
        else:
            # A batch of text-only samples still runs the vision side once, on a grey dummy patch,
            # with zero weight: every process must run the same modules (DDP/FSDP collectives).
            dummy = self.features([self.encoder.pos_embed.new_zeros(3, self.config.encoder.patch_size,
                                                                    self.config.encoder.patch_size)])
            zero = sum(f.sum() for f in dummy["features"]) * 0
            feats, features, grids = {**dummy, "indices": None, "aux": zero}, [], []
        out["images"] = torch.tensor(float(n_images))

        # Self-distillation: student MAP(LN(features)) vs frozen teacher on a fixed-resolution view.
        if self.teacher is not None and self.encoder.pool is not None and n_images:
            student = self.encoder.pool(features)
            with torch.no_grad():
                views = [self._teacher_view(x) for x in feats["padded"]]
                t_tokens, t_packed = self.teacher(views)
                target = self.teacher.pool(t_packed.split(t_tokens))
            out["distill_sum"] = (1 - F.cosine_similarity(student.float(), target.float(), dim=-1)).sum()
        else:
            out["distill_sum"] = zero

        # VAE-latent reconstruction (stage 2): predicted latent vs frozen VAE posterior mean.
        if self.recon is not None and self.vae is not None and n_images:
            latents = self.recon(features, grids)
            targets = self.vae_targets(feats["padded"])
            errors = [F.mse_loss(z.float(), t.float()) for z, t in zip(latents, targets)]
            out["recon_sum"] = torch.stack(errors).sum()
        else:
            out["recon_sum"] = zero

        out["commit_sum"] = feats["aux"] * n_images
        if feats["indices"] is not None:
            out["indices"] = torch.cat(feats["indices"]).detach()

        # Text: projector tokens spliced into each conversation, packed rows, CE on answer tokens.
        if self.llm is not None and batch.conversations and self.text_loss:
            ce_sum, ce_count = self._text_loss(batch, features, grids)
            out["text_sum"], out["text_count"] = ce_sum + zero, ce_count
        else:
            out["text_sum"], out["text_count"] = zero, torch.tensor(0.0)
        return out

    def code_features(self, codes: list) -> tuple[list[torch.Tensor], list[tuple[int, int]]]:
        """Stored codes -> per-image embedder features (h*w, C) and grids (the offline path)."""
        device = self.embedder.project_out.weight.device
        flat = torch.cat([c.flat() for c in codes]).to(device)
        feats = self.embedder(flat)
        return list(feats.split([c.grid[0] * c.grid[1] for c in codes])), [c.grid for c in codes]

    def _codes_forward(self, batch: TrainBatch) -> dict[str, torch.Tensor]:
        if batch.codes:
            features, grids = self.code_features(batch.codes)
            zero = features[0].new_zeros(())
        else:
            features, grids = [], []
            zero = sum(p.sum() for p in self.projector.parameters()) * 0
        out: dict[str, torch.Tensor] = {"images": torch.tensor(float(len(batch.codes))),
                                        "distill_sum": zero, "recon_sum": zero, "commit_sum": zero}
        ce_sum, ce_count = self._text_loss(batch, features, grids)
        out["text_sum"], out["text_count"] = ce_sum + zero, ce_count
        return out

    def _teacher_view(self, x: torch.Tensor) -> torch.Tensor:
        s = self.teacher_size
        if self.teacher_resize == "bilinear":
            # Official: any image -> s x s, bilinear, no antialias, aspect ratio not kept, in float32.
            return F.interpolate(x[None].float(), size=(s, s), mode="bilinear", align_corners=False)[0].to(x.dtype)
        h, w = x.shape[-2:]
        scale = math.sqrt(s * s / (h * w))
        p = self.config.encoder.patch_size
        size = (max(p, round(h * scale / p) * p), max(p, round(w * scale / p) * p))
        return F.interpolate(x[None].float(), size=size, mode="bilinear", align_corners=False, antialias=True)[0].to(x.dtype)

    @torch.no_grad()
    def vae_target(self, x: torch.Tensor) -> torch.Tensor:
        """(3, H, W) padded pixels -> (16, H/8, W/8) latent target: the frozen VAE's latent (posterior
        mean), in the latent decoders' space (normalised when ``config.decoder.latent_mean`` is set)."""
        return self.vae_targets([x])[0]

    @torch.no_grad()
    def vae_targets(self, images: list[torch.Tensor]) -> list[torch.Tensor]:
        """:meth:`vae_target` of each image, encoding same-sized images in one VAE call."""
        from viq.model.vae import encode_latents_grouped

        decoder = self.drawer.latent if self.drawer is not None else self.recon
        raws = encode_latents_grouped(self.vae, images)
        return [decoder.from_raw(raw) for raw in raws] if decoder is not None else raws

    def _text_loss(self, batch: TrainBatch, features, grids) -> tuple[torch.Tensor, torch.Tensor]:
        from viq.mllm.packing import causal_lm_loss, pack_sequences, splice_image_features

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
            logits, labels = self._padded_rows(items)
        else:
            packed = pack_sequences(items, self.max_length)
            logits, labels = self.llm(**packed.model_inputs()).logits, packed.labels
        _, ce_sum, count = causal_lm_loss(logits, labels)
        return ce_sum, count.float()

    def _padded_rows(self, items: list[tuple[torch.Tensor, torch.Tensor]]) -> tuple[torch.Tensor, torch.Tensor]:
        """LLaVA-style layout: one conversation per row, right-padded to the longest with zero
        embeddings and IGNORE_INDEX labels, and a 2-D padding attention mask. Returns logits
        (N, T, V) and labels (N, T)."""
        from viq.mllm.chat import IGNORE_INDEX

        device = items[0][0].device
        T = max(emb.shape[0] for emb, _ in items)
        embeds = torch.stack([F.pad(emb, (0, 0, 0, T - emb.shape[0])) for emb, _ in items])
        labels = torch.stack([F.pad(lab, (0, T - lab.shape[0]), value=IGNORE_INDEX) for _, lab in items])
        mask = torch.stack([torch.arange(T, device=device) < emb.shape[0] for emb, _ in items]).long()
        return self.llm(inputs_embeds=embeds, attention_mask=mask, use_cache=False).logits, labels

    def _drawer_forward(self, batch: TrainBatch) -> dict[str, torch.Tensor]:
        with torch.no_grad():
            p = self.config.encoder.patch_size
            padded = [pad_to_patches(x, p) for x in batch.images]
            tokens, packed = self.encoder(padded)
            _, indices = self.head(tokens, packed)
            indices = packed.split(indices, self.config.head.codes_per_patch)
        _, latents = self.drawer(list(indices), list(packed.grids))
        errors, pixel_errors = [], []
        for z, x, target in zip(latents, padded, self.vae_targets(padded)):
            errors.append(F.mse_loss(z.float(), target.float()))
            if self.pixel_loss_weight:
                from viq.model.vae import decode_latents

                raw = self.drawer.latent.to_raw(z)
                pixel_errors.append(F.mse_loss(decode_latents(self.vae, raw).float(), x.float()))
        zero = latents[0].new_zeros(())
        return {
            "images": torch.tensor(float(len(latents))),
            "recon_sum": torch.stack(errors).sum(),
            "pixel_sum": torch.stack(pixel_errors).sum() if pixel_errors else zero,
            "indices": torch.cat(indices).detach(),
        }

    pixel_loss_weight: float = 0.0
    #: whether :meth:`forward` runs the LLM for the text loss (the build turns it off when the recipe
    #: gives ``loss.text`` no weight: the LLM is still carried to the stage output, not run)
    text_loss: bool = True
