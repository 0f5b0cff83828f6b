"""Splicing image features into token sequences, packing conversations into rows, and the LM loss.

Pipeline for one batch (ids and labels from :class:`viq.mllm.chat.ChatTokenizer`)::

    embeds, labels = splice_image_features(model.get_input_embeddings(), conv.input_ids,
                                           conv.labels, projector(features, grids))
    batch = pack_sequences([(embeds, labels), ...], max_length=4096)
    logits = model(**batch.model_inputs()).logits
    loss = causal_lm_loss(logits, batch.labels).loss

Official never packs. :func:`pack_sequences` packs several conversations per row with attention kept
inside each conversation (see :class:`PackedBatch` for how that works in transformers 5).
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from viq.mllm.chat import IGNORE_INDEX, IMAGE_PLACEHOLDER_ID

__all__ = [
    "splice_image_features",
    "PackedBatch",
    "pack_sequences",
    "LossOutput",
    "causal_lm_loss",
    "supervised_lm_loss",
    "answer_log_likelihoods",
]


def splice_image_features(
    embed_tokens: nn.Module,
    input_ids: torch.Tensor,
    labels: torch.Tensor | None,
    image_embeds: Sequence[torch.Tensor],
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Replace each image placeholder by that image's projected tokens.

    Args:
        embed_tokens: the LLM's input embedding (``model.get_input_embeddings()``).
        input_ids: (L,) ids; the i-th ``IMAGE_PLACEHOLDER_ID`` stands for ``image_embeds[i]``.
        labels: (L,) labels, or ``None`` (inference).
        image_embeds: per image (n_i, H) projector outputs.

    Returns:
        (inputs_embeds (L', H), labels (L',) or None), L' = L - #images + sum n_i; labels are
        ``IGNORE_INDEX`` on image tokens. Gradients flow into ``image_embeds``.
    """
    if input_ids.ndim != 1:
        raise ValueError(f"input_ids must be 1-D (L,), got shape {tuple(input_ids.shape)}")
    if labels is not None and labels.shape != input_ids.shape:
        raise ValueError(f"labels {tuple(labels.shape)} and input_ids {tuple(input_ids.shape)} differ in shape")
    is_image = input_ids == IMAGE_PLACEHOLDER_ID
    if bool((input_ids[~is_image] < 0).any()):
        raise ValueError("input_ids contain negative ids other than IMAGE_PLACEHOLDER_ID")
    positions = is_image.nonzero().flatten().tolist()
    if len(positions) != len(image_embeds):
        raise ValueError(
            f"image count mismatch: {len(positions)} image placeholders in input_ids but "
            f"{len(image_embeds)} image embeddings"
        )
    text = embed_tokens(input_ids.masked_fill(is_image, 0))  # (L, H); placeholder rows are dropped below
    hidden = text.shape[-1]
    pieces, label_pieces, prev = [], [], 0
    for p, img in zip(positions, image_embeds):
        if img.ndim != 2 or img.shape[-1] != hidden:
            raise ValueError(f"image embeddings must be (n, {hidden}), got {tuple(img.shape)}")
        pieces += [text[prev:p], img.to(device=text.device, dtype=text.dtype)]
        if labels is not None:
            label_pieces += [labels[prev:p], labels.new_full((img.shape[0],), IGNORE_INDEX)]
        prev = p + 1
    pieces.append(text[prev:])
    if labels is not None:
        label_pieces.append(labels[prev:])
        return torch.cat(pieces), torch.cat(label_pieces)
    return torch.cat(pieces), None


@dataclass
class PackedBatch:
    """Several conversations per row, right-padded, attention kept inside each conversation.

    Masking in transformers 5.x (checked on 5.23, Qwen2, sdpa and eager): when the model gets
    ``attention_mask=None``, **no cache** and ``position_ids``, ``masking_utils.create_causal_mask``
    detects packed rows from position ids that do not increase by exactly 1
    (``find_packed_sequence_indices``) and builds a block-diagonal causal mask (sdpa, eager, flex;
    flash-attention derives its varlen boundaries from the same position ids). Two traps:

    * ``use_cache`` must be ``False``: with the config default ``use_cache=True`` the model creates
      a ``DynamicCache`` even in training mode, and packed detection is skipped silently, so
      conversations attend to each other. :meth:`model_inputs` passes ``use_cache=False``.
    * Passing a 2-D ``attention_mask`` also disables detection. Padding needs none here: pads sit at
      the end of a row (causal attention never looks forward) and get their own positions from 0,
      i.e. their own segment.

    ``model_inputs(mask="4d")`` instead passes an explicit additive block-diagonal causal mask
    (B, 1, T, T), which transformers uses as-is (sdpa and eager, not flash-attention); both give
    the same logits as running each conversation alone (tests).

    Attributes:
        inputs_embeds: (B, T, H).
        labels: (B, T), ``IGNORE_INDEX`` on padding and on the first token of every conversation
            (never a target in an unpacked run either; ignoring it stops the shifted loss from
            predicting one conversation's first token from the previous conversation's last).
        position_ids: (B, T) int64, restarting at 0 for each conversation and for the padding.
        segment_ids: (B, T) int64, index of the conversation in its row, -1 on padding.
        lengths: per row, the lengths of its conversations in order.
        placements: per input item, its (row, start) in the batch.
        attention_mask: always ``None`` (see above); kept for a familiar batch layout.
    """

    inputs_embeds: torch.Tensor
    labels: torch.Tensor
    position_ids: torch.Tensor
    segment_ids: torch.Tensor
    lengths: list[list[int]]
    placements: list[tuple[int, int]]
    attention_mask: torch.Tensor | None = field(default=None)

    @property
    def num_loss_tokens(self) -> int:
        """Supervised targets after the causal shift (the loss denominator)."""
        return int((self.labels[:, 1:] != IGNORE_INDEX).sum())

    def block_causal_mask(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """(B, 1, T, T) additive mask: 0 where query t may attend key s (same segment, s <= t), else min."""
        dtype = dtype or self.inputs_embeds.dtype
        T = self.segment_ids.shape[1]
        same = self.segment_ids[:, :, None] == self.segment_ids[:, None, :]
        causal = torch.ones(T, T, dtype=torch.bool, device=same.device).tril()
        allowed = (same & causal)[:, None]
        mask = torch.zeros(allowed.shape, dtype=dtype, device=same.device)
        return mask.masked_fill(~allowed, torch.finfo(dtype).min)

    def model_inputs(self, mask: str = "position_ids") -> dict[str, Any]:
        """Keyword arguments for ``model(**...)``.

        Args:
            mask: ``"position_ids"`` (transformers' packed-sequence detection, any attention
                implementation) or ``"4d"`` (explicit block mask; sdpa/eager).
        """
        if mask == "position_ids":
            attention_mask = None
        elif mask == "4d":
            attention_mask = self.block_causal_mask()
        else:
            raise ValueError(f"mask must be 'position_ids' or '4d', got {mask!r}")
        return {
            "inputs_embeds": self.inputs_embeds,
            "position_ids": self.position_ids,
            "attention_mask": attention_mask,
            "use_cache": False,
        }


def first_fit_rows(lengths: Sequence[int], max_length: int) -> list[list[int]]:
    """The rows :func:`pack_sequences` makes of items of these lengths: item indices per row, each item
    in the first row with room for it (in the given order). Every length must be in [1, max_length]."""
    rows: list[list[int]] = []
    fill: list[int] = []
    for i, n in enumerate(lengths):
        if n < 1 or n > max_length:
            raise ValueError(f"item {i} has length {n}, outside [1, max_length={max_length}]; truncate it first")
        for r, used in enumerate(fill):
            if used + n <= max_length:
                rows[r].append(i)
                fill[r] += n
                break
        else:
            rows.append([i])
            fill.append(n)
    return rows


def pack_sequences(
    items: Sequence[tuple[torch.Tensor, torch.Tensor]],
    max_length: int,
    *,
    pad_to_multiple_of: int | None = None,
) -> PackedBatch:
    """Pack conversations into rows of at most ``max_length`` tokens (first fit, in the given order).

    Args:
        items: per conversation (inputs_embeds (L_i, H), labels (L_i,)), e.g. from
            :func:`splice_image_features`. Every L_i must be in [1, max_length]; truncate first.
        max_length: row capacity.
        pad_to_multiple_of: round T up (still at most ``max_length`` if that is a multiple).

    Returns:
        :class:`PackedBatch` with T = longest row (rounded), right padding with zero embeddings.
    """
    if not items:
        raise ValueError("nothing to pack")
    hidden = items[0][0].shape[-1]
    for i, (emb, lab) in enumerate(items):
        n = int(emb.shape[0])
        if emb.ndim != 2 or emb.shape[1] != hidden or lab.shape != (n,):
            raise ValueError(f"item {i}: expected ((L, {hidden}), (L,)), got {tuple(emb.shape)}, {tuple(lab.shape)}")
    rows = first_fit_rows([int(emb.shape[0]) for emb, _ in items], max_length)
    fill = [sum(int(items[i][0].shape[0]) for i in row) for row in rows]
    T = max(fill)
    if pad_to_multiple_of:
        T = math.ceil(T / pad_to_multiple_of) * pad_to_multiple_of
    B = len(rows)
    ref = items[0][0]
    labels = torch.full((B, T), IGNORE_INDEX, dtype=torch.long, device=ref.device)
    position_ids = torch.zeros(B, T, dtype=torch.long, device=ref.device)
    segment_ids = torch.full((B, T), -1, dtype=torch.long, device=ref.device)
    placements: list[tuple[int, int]] = [(0, 0)] * len(items)
    row_embeds = []
    for r, members in enumerate(rows):
        start = 0
        parts = []
        for seg, i in enumerate(members):
            emb, lab = items[i]
            n = emb.shape[0]
            parts.append(emb)
            labels[r, start : start + n] = lab
            labels[r, start] = IGNORE_INDEX
            position_ids[r, start : start + n] = torch.arange(n, device=ref.device)
            segment_ids[r, start : start + n] = seg
            placements[i] = (r, start)
            start += n
        position_ids[r, start:] = torch.arange(T - start, device=ref.device)
        if start < T:
            parts.append(ref.new_zeros(T - start, hidden))
        row_embeds.append(torch.cat(parts))
    # Stack (not in-place writes) so the autograd graph back to each item stays simple.
    embeds = torch.stack(row_embeds)
    return PackedBatch(
        inputs_embeds=embeds,
        labels=labels,
        position_ids=position_ids,
        segment_ids=segment_ids,
        lengths=[[int(items[i][0].shape[0]) for i in members] for members in rows],
        placements=placements,
    )


class LossOutput(NamedTuple):
    """loss = loss_sum / max(num_tokens, 1). For gradient accumulation over micro-batches, backprop
    ``loss_sum / total_tokens`` with the token count of the whole accumulated batch."""

    loss: torch.Tensor
    loss_sum: torch.Tensor
    num_tokens: torch.Tensor


def causal_lm_loss(logits: torch.Tensor, labels: torch.Tensor) -> LossOutput:
    """Next-token cross-entropy on supervised tokens, in float32.

    Args:
        logits: (B, T, V) (any float dtype).
        labels: (B, T) unshifted labels (``labels[:, t]`` is predicted by ``logits[:, t-1]``).

    Returns:
        :class:`LossOutput` (mean, sum, count). With no supervised token the loss is a graph-connected 0.
    """
    if logits.shape[:-1] != labels.shape:
        raise ValueError(f"logits {tuple(logits.shape)} and labels {tuple(labels.shape)} do not match")
    targets = labels[:, 1:]
    keep = targets != IGNORE_INDEX
    # Select before upcasting: float32 logits of a whole batch with a 150k vocabulary would be huge.
    picked = logits[:, :-1][keep].float()
    loss_sum = F.cross_entropy(picked, targets[keep], reduction="sum") if picked.numel() else logits.sum() * 0.0
    count = keep.sum()
    return LossOutput(loss_sum / count.clamp_min(1), loss_sum, count)


def _takes_logits_to_keep(model: nn.Module) -> bool:
    """Whether ``model``'s forward (through a PEFT wrapper) accepts ``logits_to_keep``."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return "logits_to_keep" in inspect.signature(base.forward).parameters


def supervised_lm_loss(model: nn.Module, inputs: dict[str, Any], labels: torch.Tensor) -> LossOutput:
    """:func:`causal_lm_loss` of ``model(**inputs)``, with logits computed only where they are scored.

    A training row holds a few answer tokens among many prompt and image tokens; projecting every
    position onto the vocabulary (152k entries for Qwen2.5) is most of the LM head's time and memory
    and all of the zero-filled gradient of the full ``(B, T, V)`` logits. transformers' causal LMs take
    ``logits_to_keep``: a boolean ``(B, T)`` mask keeps exactly the positions whose next token is
    supervised, and the logits come back flattened, ``(N, V)``. Models without it (or a transformers
    that reads the mask otherwise) get the full logits and :func:`causal_lm_loss`; the loss is the same.

    Args:
        model: a causal LM (or a PEFT model around one).
        inputs: its keyword arguments (``PackedBatch.model_inputs()``, or padded rows with a mask).
        labels: (B, T) unshifted labels matching ``inputs_embeds``.
    """
    keep = F.pad(labels[:, 1:] != IGNORE_INDEX, (0, 1), value=False)  # position t predicts label t+1
    if _takes_logits_to_keep(model):
        logits = model(**inputs, logits_to_keep=keep).logits
        if logits.ndim == 2 and logits.shape[0] == int(keep.sum()):
            targets = labels[:, 1:][keep[:, :-1]]
            count = keep.sum()
            if not targets.numel():
                return LossOutput(logits.sum() * 0.0, logits.sum() * 0.0, count)
            loss_sum = F.cross_entropy(logits.float(), targets, reduction="sum")
            return LossOutput(loss_sum / count.clamp_min(1), loss_sum, count)
    return causal_lm_loss(model(**inputs).logits, labels)


@torch.no_grad()
def answer_log_likelihoods(
    model: nn.Module, items: Sequence[tuple[torch.Tensor, torch.Tensor]]
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per item, the summed negative log-likelihood (nats) of its supervised tokens and their count.

    Args:
        model: a causal LM (or a PEFT model around one), in eval mode.
        items: per conversation (inputs_embeds (L_i, H), labels (L_i,)), e.g. from
            :func:`splice_image_features`; each runs in its own right-padded row.

    Returns:
        (nll (N,) float64, tokens (N,) int64).
    """
    if not items:
        return torch.zeros(0, dtype=torch.float64), torch.zeros(0, dtype=torch.long)
    T = max(emb.shape[0] for emb, _ in items)
    device = items[0][0].device
    embeds = torch.stack([F.pad(emb, (0, 0, 0, T - emb.shape[0])) for emb, _ in items])
    labels = torch.stack([F.pad(lab, (0, T - lab.shape[0]), value=IGNORE_INDEX) for _, lab in items])
    mask = torch.stack([torch.arange(T, device=device) < emb.shape[0] for emb, _ in items]).long()
    keep = F.pad(labels[:, 1:] != IGNORE_INDEX, (0, 1), value=False)  # position t predicts label t+1
    inputs = {"inputs_embeds": embeds, "attention_mask": mask, "use_cache": False}
    if _takes_logits_to_keep(model):
        logits = model(**inputs, logits_to_keep=keep).logits
        if not (logits.ndim == 2 and logits.shape[0] == int(keep.sum())):
            logits = model(**inputs).logits[keep]
    else:
        logits = model(**inputs).logits[keep]
    targets = labels[:, 1:][keep[:, :-1]]
    per_token = F.cross_entropy(logits.float(), targets, reduction="none").double()
    rows = keep.nonzero()[:, 0]
    nll = torch.zeros(len(items), dtype=torch.float64, device=device).index_add_(0, rows, per_token)
    return nll.cpu(), keep.sum(1).cpu()
