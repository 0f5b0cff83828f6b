"""The demo's stand-in for SigLIP2: its own ViT, trained with SigLIP's sigmoid image-text loss.

The paper's stage 1 starts from SigLIP2 and distils towards it at a fixed resolution: the encoder
already reads images and stays text-aligned while the LLM learns to read its features. Nothing
pretrained can be had offline, so the demo makes its stand-in here, as it makes one for the LLM
(:mod:`viq.demo.tiny_llm`) and for the VAE (:mod:`viq.demo.pixel_codec`):

* image tower: the ``viq-demo`` trunk and its MAP head (:class:`viq.model.encoder.ViTEncoder`), at
  native resolution, exactly the weights stage 1 starts from and distils towards;
* text tower: a bag of the demo tokenizer's token embeddings (summed) and a linear map, thrown away
  afterwards (SigLIP's is a transformer; the demo's texts are one question and a one-word answer);
* loss: SigLIP's pairwise sigmoid loss, ``-log sigmoid(y_ij (t <x_i, y_j> + b))`` over every image-text
  pair of a batch, with ``y_ij = +1`` when the two texts are the same (a batch holds many images of
  "What color is the shape? red"; counting them as negatives of each other would be label noise);
  ``t`` and ``b`` learned, initialised at 10 and -10 as in SigLIP.

Measured on the demo's data (seed 0, a 2-core CPU): without this stand-in, stage 1 trains the encoder
through the LLM alone and the models answer ``where`` / ``shape`` / ``count_big`` no better than with a
blank image (docs/training.md, "The SigLIP stand-in").

Deterministic for a given seed (batches come from a seeded generator; the schedule counts steps).
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from viq._progress import progress_bar
from viq.formats.image import to_pil, to_pixels
from viq.model.config import EncoderConfig
from viq.model.encoder import ViTEncoder, pad_to_patches

log = logging.getLogger(__name__)

__all__ = ["TinySiglip", "SiglipResult", "train_tiny_siglip", "contrastive_text", "POSITION_INIT_STD"]

#: Initial std of the image tower's position table (see :class:`TinySiglip`).
POSITION_INIT_STD = 0.2


def contrastive_text(question: str, answer: str) -> str:
    """The text paired with an image: its question and answer, ``"What color is the shape? red"``."""
    return f"{question.strip()} {answer.strip()}"


class TinySiglip(nn.Module):
    """Image tower (a :class:`ViTEncoder` with its MAP head) + a bag-of-tokens text tower.

    Args:
        encoder: the config of the image tower (``pool_head`` must be on).
        vocab_size: token ids of the texts are in ``[0, vocab_size)``.
    """

    def __init__(self, encoder: EncoderConfig, vocab_size: int) -> None:
        super().__init__()
        if not encoder.pool_head:
            raise ValueError("the SigLIP stand-in needs the encoder's MAP head (encoder.pool_head)")
        self.image = ViTEncoder(encoder)
        with torch.no_grad():
            # The position table at the scale of the patch embeddings (std 0.2, not ViT's 0.02): the demo's
            # ``where`` answers depend on it, and from 0.02 the model takes most of its budget to find
            # position (zero-shot ``where`` after 800 steps: 57 % at 0.02, 89 % at 0.2; docs/training.md).
            self.image.pos_embed.normal_(std=POSITION_INIT_STD)
        self.text = nn.EmbeddingBag(vocab_size, encoder.width, mode="sum")
        self.text_proj = nn.Linear(encoder.width, encoder.width)
        self.log_scale = nn.Parameter(torch.tensor(math.log(10.0)))
        self.bias = nn.Parameter(torch.tensor(-10.0))

    def embed_images(self, images: Sequence[torch.Tensor]) -> torch.Tensor:
        """list of (3, H, W) pixels -> (B, C) unit-norm embeddings (the MAP head's output, normalised)."""
        p = self.image.cfg.patch_size
        tokens, packed = self.image([pad_to_patches(x, p) for x in images])
        assert self.image.pool is not None  # built with its MAP head
        return F.normalize(self.image.pool(packed.split(tokens)), dim=-1)

    def embed_texts(self, token_ids: Sequence[torch.Tensor]) -> torch.Tensor:
        """list of (L_i,) token ids -> (B, C) unit-norm embeddings."""
        flat = torch.cat(list(token_ids))
        offsets = torch.tensor([0] + [len(t) for t in token_ids[:-1]]).cumsum(0)
        return F.normalize(self.text_proj(self.text(flat, offsets)), dim=-1)

    def loss(self, image_emb: torch.Tensor, text_emb: torch.Tensor, text_ids: torch.Tensor) -> torch.Tensor:
        """Sigmoid loss of a batch, summed over pairs and divided by the batch size (SigLIP's).

        text_ids: (B,) an id per distinct text: pairs with the same id are positives.
        """
        logits = image_emb @ text_emb.T * self.log_scale.exp() + self.bias
        labels = (text_ids[:, None] == text_ids[None, :]).to(logits.dtype) * 2 - 1
        return -F.logsigmoid(labels * logits).sum() / len(text_ids)


@dataclass
class SiglipResult:
    """What :func:`train_tiny_siglip` returns: the trained towers (eval mode), the loss per step and
    the training time (seconds)."""

    model: TinySiglip
    history: list[float] = field(default_factory=list)
    seconds: float = 0.0

    @torch.no_grad()
    def zero_shot(
        self, images: Sequence[torch.Tensor], candidates: Sequence[Sequence[torch.Tensor]], batch_size: int = 256
    ) -> list[int]:
        """For each image, the index of its best candidate text (token ids), by embedding similarity:
        the stand-in used directly as a classifier."""
        out = []
        for start in range(0, len(images), batch_size):
            emb = self.model.embed_images(images[start : start + batch_size])
            for e, texts in zip(emb, candidates[start : start + batch_size]):
                out.append(int((self.model.embed_texts(list(texts)) @ e).argmax()))
        return out


def _as_uint8(x: torch.Tensor | np.ndarray) -> np.ndarray:
    return x if isinstance(x, np.ndarray) else np.asarray(to_pil(x))


def train_tiny_siglip(
    images: Sequence[torch.Tensor | np.ndarray],
    texts: Sequence[str],
    tokenize,
    encoder: EncoderConfig,
    *,
    vocab_size: int,
    steps: int = 1000,
    batch_size: int = 128,
    lr: float = 1e-3,
    weight_decay: float = 1e-4,
    warmup_ratio: float = 0.05,
    min_lr_ratio: float = 0.1,
    seed: int = 0,
    progress: bool = True,
) -> SiglipResult:
    """Train the SigLIP stand-in on ``images`` ((3, H, W) pixels in [-1, 1], or the (H, W, 3) uint8 arrays
    they come from; native sizes) paired with ``texts`` (:func:`contrastive_text`),
    ``tokenize(text) -> list[int]``.

    AdamW, linear warm-up over ``warmup_ratio`` of the steps then cosine to ``min_lr_ratio``; batches of
    ``batch_size`` pairs drawn with replacement from a generator seeded with ``seed``. Images are kept
    as 8-bit arrays (the exact values they were normalised from) so the set costs 3 bytes a pixel.
    """
    if len(images) != len(texts) or not images:
        raise ValueError(f"need as many texts as images (at least one), got {len(images)} and {len(texts)}")
    if steps < 1 or batch_size < 2:
        raise ValueError(f"need steps >= 1 and batch_size >= 2, got {steps} and {batch_size}")
    stored = [_as_uint8(x) for x in images]
    token_ids = [torch.tensor(tokenize(t), dtype=torch.long) for t in texts]
    if any(len(t) == 0 for t in token_ids):
        raise ValueError("a text tokenised to no tokens")
    distinct: dict[str, int] = {}
    text_id = torch.tensor([distinct.setdefault(t, len(distinct)) for t in texts])
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = TinySiglip(encoder, vocab_size)
    decay = [p for p in model.parameters() if p.ndim >= 2]
    other = [p for p in model.parameters() if p.ndim < 2]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": weight_decay}, {"params": other, "weight_decay": 0.0}], lr=lr, fused=True
    )
    warmup = max(1, math.ceil(warmup_ratio * steps))

    def multiplier(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress_ = min(1.0, (step - warmup) / max(1, steps - warmup))
        return min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress_))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, multiplier)
    g = torch.Generator().manual_seed(seed)

    history: list[float] = []
    model.train()
    started = time.perf_counter()
    with progress_bar(steps, "SigLIP stand-in", unit="step", show=progress) as bar:
        for _ in range(steps):
            idx = torch.randint(len(stored), (batch_size,), generator=g).tolist()
            loss = model.loss(
                model.embed_images([to_pixels(stored[i]) for i in idx]),
                model.embed_texts([token_ids[i] for i in idx]),
                text_id[idx],
            )
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            history.append(loss.item())
            bar.update(1)
            bar.set_postfix(loss=f"{history[-1]:.3f}")
    seconds = time.perf_counter() - started
    model.eval().requires_grad_(False)
    log.info("SigLIP stand-in: loss %.3f -> %.3f over %d steps (%.0f s)", history[0], history[-1], steps, seconds)
    return SiglipResult(model, history, seconds)
