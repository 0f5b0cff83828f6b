"""The LLM side of ViQ training: chat tokenisation with label masks, image splicing, packing, loss.

Training feeds projected image features (:mod:`viq.mllm.projector`) into a causal LM and supervises the
assistant answers with cross-entropy. Pipeline for one sample::

    chat = ChatTokenizer(tokenizer)
    conv = chat.encode(messages)                              # ids with IMAGE_PLACEHOLDER_ID, labels
    embeds, labels = splice_image_features(model.get_input_embeddings(), conv.input_ids,
                                           conv.labels, projector(features, grids))
    batch = pack_sequences([(embeds, labels), ...], max_length=4096)
    logits = model(**batch.model_inputs()).logits
    loss = causal_lm_loss(logits, batch.labels).loss

Everything runs offline: models load from local directories only, and :func:`build_tiny_llm` makes
a small random Qwen2 model with a freshly trained byte-level BPE tokenizer for tests and CPU demos.

Differences from the official recipe (``official-viq-training.md`` §9.3-§9.4), all deliberate:

* Labels: official supervises the role header tokens ``assistant`` and ``\\n`` (a legacy LLaVA ``-2``
  offset meant for Llama's BOS) and the ``\\n`` after ``<|im_end|>``. Here only the reply text and the
  end-of-turn marker the template writes after it (``<|im_end|>`` for ChatML) are supervised.
* Official truncates after splicing, which can silently push answer tokens (or half an image) out.
  :func:`truncate` refuses to cut an image and reports samples that would lose every answer token.
* Official never packs. :func:`pack_sequences` packs several conversations per row with attention
  kept inside each conversation (see :class:`PackedBatch` for how that works in transformers 5).
"""

from __future__ import annotations

import itertools
import logging
import math
import os
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

logger = logging.getLogger(__name__)

__all__ = [
    "IMAGE_TOKEN",
    "IGNORE_INDEX",
    "IMAGE_PLACEHOLDER_ID",
    "CHATML_TEMPLATE",
    "DEFAULT_SYSTEM_PROMPT",
    "load_causal_lm",
    "ChatTokenizer",
    "TokenizedConversation",
    "messages_from_llava",
    "truncate",
    "splice_image_features",
    "PackedBatch",
    "pack_sequences",
    "LossOutput",
    "causal_lm_loss",
    "prepare_llm",
    "linear_leaf_names",
    "trainable_parameter_count",
    "build_tiny_llm",
    "generate_answer",
]

#: The image marker in message text. Each occurrence becomes one image's projected tokens.
IMAGE_TOKEN = "<image>"
#: Label value ignored by the loss (PyTorch's ``cross_entropy`` default).
IGNORE_INDEX = -100
#: Token id standing in for one image in ``input_ids`` until :func:`splice_image_features`.
IMAGE_PLACEHOLDER_ID = -200

#: Default system prompt of the official ``v1_qwen2`` template (and Qwen2-Instruct).
DEFAULT_SYSTEM_PROMPT = "You are a helpful assistant."

#: ChatML as used by Qwen2/2.5 (without tools) and the official ``v1_qwen2`` conversation template:
#: a default system prompt unless the first message is a system message, then
#: ``<|im_start|>{role}\n{content}<|im_end|>\n`` per message, and ``<|im_start|>assistant\n`` as the
#: generation prompt. Used by :func:`build_tiny_llm` and as the fallback for tokenizers without one.
CHATML_TEMPLATE = (
    "{%- if messages and messages[0]['role'] == 'system' -%}"
    "{{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' -}}"
    "{%- else -%}"
    "{{- '<|im_start|>system\\n" + DEFAULT_SYSTEM_PROMPT + "<|im_end|>\\n' -}}"
    "{%- endif -%}"
    "{%- for message in messages -%}"
    "{%- if not (loop.first and message['role'] == 'system') -%}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' -}}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\\n' -}}{%- endif -%}"
)

_ROLES = ("system", "user", "assistant")
_GENERATION_TAG = re.compile(r"\{%-?\s*generation\s*-?%\}")


# --------------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------------


def load_causal_lm(
    path: str | os.PathLike,
    *,
    dtype: torch.dtype = torch.float32,
    attn_implementation: str = "sdpa",
) -> tuple[nn.Module, Any]:
    """Load a causal LM and its tokenizer from a local Hugging Face model directory.

    Nothing is downloaded (``local_files_only=True``). If the tokenizer has no pad token, an
    existing special token (eos, else bos/unk) becomes the pad token; the embedding matrix is never
    resized. Padding never reaches the loss here anyway (labels are explicit), so any existing token
    is fine as pad.

    Args:
        path: directory with ``config.json``, weights and tokenizer files.
        dtype: parameter dtype.
        attn_implementation: ``"sdpa"`` or ``"eager"`` (both support :func:`pack_sequences`), or
            ``"flash_attention_2"`` where installed.

    Returns:
        (model in eval mode, tokenizer).
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"LLM directory not found: {path} (models are loaded from local directories only)")
    if not (path / "config.json").is_file():
        raise ValueError(f"{path} is not a Hugging Face model directory: it has no config.json")
    tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    model = AutoModelForCausalLM.from_pretrained(
        path, dtype=dtype, attn_implementation=attn_implementation, local_files_only=True
    )
    if tokenizer.pad_token is None:
        for name in ("eos_token", "bos_token", "unk_token"):
            token = getattr(tokenizer, name)
            if token is not None:
                tokenizer.pad_token = token
                logger.info("tokenizer has no pad token; using its %s %r as pad", name, token)
                break
        else:
            raise ValueError(f"tokenizer in {path} has no pad, eos, bos or unk token to pad with")
    if getattr(model.config, "pad_token_id", None) is None:
        model.config.pad_token_id = tokenizer.pad_token_id
    if model.generation_config is not None and model.generation_config.pad_token_id is None:
        model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.eval()
    return model, tokenizer


# --------------------------------------------------------------------------------------------------
# Chat tokenisation and label masks
# --------------------------------------------------------------------------------------------------


@dataclass
class TokenizedConversation:
    """One tokenised conversation.

    Attributes:
        input_ids: (L,) int64 token ids; each image is a single ``IMAGE_PLACEHOLDER_ID``.
        labels: (L,) int64, ``input_ids`` on supervised (answer) tokens, ``IGNORE_INDEX`` elsewhere.
            Unshifted: ``labels[t]`` is the target of the logits at ``t - 1``.
        num_images: number of placeholders in ``input_ids``.
    """

    input_ids: torch.Tensor
    labels: torch.Tensor
    num_images: int

    def __len__(self) -> int:
        return int(self.input_ids.shape[0])


def messages_from_llava(conversations: Sequence[Mapping[str, str]]) -> list[dict[str, str]]:
    """Convert official/LLaVA ``[{"from": "human"|"gpt"|"system", "value": ...}]`` to chat messages."""
    roles = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}
    out = []
    for turn in conversations:
        if turn.get("from") not in roles:
            raise ValueError(f"unknown LLaVA speaker {turn.get('from')!r}")
        out.append({"role": roles[turn["from"]], "content": turn["value"]})
    return out


class ChatTokenizer:
    """Tokenises chat conversations with image placeholders and answer-only labels.

    How it works: the conversation is rendered to one string with the chat template; the character
    spans of the answers are found (below); the string is then cut at every ``<image>`` and at every
    answer boundary, each piece is tokenised on its own (``add_special_tokens=False``), an
    ``IMAGE_PLACEHOLDER_ID`` goes where each ``<image>`` was, and exactly the answer pieces are
    labelled. Cutting at answer starts means the tokens before an answer are the same tokens that
    :meth:`encode_prompt` gives at inference time (no BPE merge across the header/answer boundary).
    Cutting at images matches official (``mm_utils.py``: chunks are tokenised separately).

    An answer span is the assistant message as the template renders it: the reply text plus the
    end-of-turn marker written after it (``<|im_end|>`` in ChatML), without trailing whitespace
    (the ``\\n`` after ``<|im_end|>`` is not supervised; the model stops at ``<|im_end|>``) and without
    the role header ``<|im_start|>assistant\\n``. Official also supervises the header tokens
    ``assistant`` and ``\\n`` (legacy LLaVA ``-2`` offset, reference §9.3 / §15.17); we do not.

    Finding answer spans (``span_method``):

    * ``"generation"``: the template marks answers with ``{% generation %}`` blocks; their spans come
      from transformers' renderer (as in ``return_assistant_tokens_mask``).
    * ``"prefix"``: for the k-th message (an assistant turn), the answer starts where the rendering of
      ``messages[:k]`` with the generation prompt ends, and ends where the rendering of
      ``messages[:k+1]`` ends. This needs a "prefix-stable" template (each rendering a prefix of the
      full rendering), true for ChatML/Qwen2/Qwen2.5 and most templates; it is checked, and a
      template that rewrites history (e.g. strips reasoning from earlier turns) raises.
    * ``"auto"`` (default): ``"generation"`` if the template has generation blocks, else ``"prefix"``.

    Limitation: like official, pieces are tokenised separately, which is exact for byte-level BPE
    tokenizers (Qwen, Llama 3) but adds a prefix space per piece for SentencePiece ones with a dummy
    prefix. Special-token strings typed inside message text are tokenised as special tokens.

    Args:
        tokenizer: a Hugging Face (fast) tokenizer.
        system_prompt: system prompt put first when the conversation has none. ``None`` leaves it to
            the template (Qwen-style templates add their default one).
        chat_template: overrides the tokenizer's template.
        span_method: ``"auto"``, ``"generation"`` or ``"prefix"`` (above).
    """

    def __init__(
        self,
        tokenizer: Any,
        *,
        system_prompt: str | None = None,
        chat_template: str | None = None,
        span_method: str = "auto",
    ) -> None:
        self.tokenizer = tokenizer
        self.system_prompt = system_prompt
        template = chat_template or getattr(tokenizer, "chat_template", None)
        if isinstance(template, dict):  # several named templates: take the default one
            template = template.get("default")
        if not template:
            logger.warning(
                "tokenizer %s has no chat template; falling back to ChatML with system prompt %r",
                type(tokenizer).__name__,
                DEFAULT_SYSTEM_PROMPT,
            )
            template = CHATML_TEMPLATE
        self.chat_template: str = template
        if span_method == "auto":
            span_method = "generation" if _GENERATION_TAG.search(template) else "prefix"
        if span_method not in ("generation", "prefix"):
            raise ValueError(f"span_method must be 'auto', 'generation' or 'prefix', got {span_method!r}")
        self.span_method = span_method

    # -- rendering ----------------------------------------------------------------------------------

    def _check(self, messages: Sequence[Mapping[str, str]]) -> list[dict[str, str]]:
        """Validate roles and add the explicit system prompt if asked."""
        msgs = []
        for i, m in enumerate(messages):
            role, content = m.get("role"), m.get("content")
            if role not in _ROLES:
                raise ValueError(f"message {i}: role must be one of {_ROLES}, got {role!r}")
            if not isinstance(content, str):
                raise TypeError(f"message {i}: content must be a string, got {type(content).__name__}")
            msgs.append({"role": role, "content": content})
        if self.system_prompt is not None and (not msgs or msgs[0]["role"] != "system"):
            msgs.insert(0, {"role": "system", "content": self.system_prompt})
        for i, m in enumerate(msgs):
            if m["role"] == "assistant":
                if not any(p["role"] == "user" for p in msgs[:i]):
                    raise ValueError("an assistant message must come after a user message")
                break
        return msgs

    def render(self, messages: Sequence[Mapping[str, str]], add_generation_prompt: bool = False) -> str:
        """The chat template's text for ``messages`` (validated, explicit system prompt added)."""
        return self.tokenizer.apply_chat_template(
            self._check(messages),
            chat_template=self.chat_template,
            tokenize=False,
            add_generation_prompt=add_generation_prompt,
        )

    def _answer_spans(
        self, msgs: list[dict[str, str]], add_generation_prompt: bool
    ) -> tuple[str, list[tuple[int, int]]]:
        """Render and return (text, character spans [start, end) of every answer, in order)."""
        if self.span_method == "generation":
            from transformers.utils.chat_template_utils import render_jinja_template

            rendered, indices = render_jinja_template(
                conversations=[msgs],
                chat_template=self.chat_template,
                return_assistant_tokens_mask=True,
                add_generation_prompt=add_generation_prompt,
                **self.tokenizer.special_tokens_map,
            )
            text = rendered[0]
            spans = [(s, s + len(text[s:e].rstrip())) for s, e in indices[0]]
            return text, [(s, e) for s, e in spans if e > s]

        text = self.render(msgs, add_generation_prompt)
        spans = []
        for k, m in enumerate(msgs):
            if m["role"] != "assistant":
                continue
            before = self.render(msgs[:k], add_generation_prompt=True)
            upto = self.render(msgs[: k + 1], add_generation_prompt=False)
            if not (text.startswith(before) and text.startswith(upto) and len(upto) > len(before)):
                raise ValueError(
                    "the chat template is not prefix-stable (rendering the first messages is not a prefix "
                    "of rendering them all), so answer spans cannot be located; use a template with "
                    "{% generation %} blocks and span_method='generation'"
                )
            start = len(before)
            spans.append((start, start + len(upto[start:].rstrip())))
        return text, spans

    def _tokenize(self, text: str, spans: list[tuple[int, int]]) -> TokenizedConversation:
        """Cut ``text`` at images and answer boundaries, tokenise the pieces, build labels."""
        cuts = {0, len(text)}
        for s, e in spans:
            cuts.update((s, e))
        images = [(m.start(), m.end()) for m in re.finditer(re.escape(IMAGE_TOKEN), text)]
        for s, e in images:
            cuts.update((s, e))
        image_starts = {s for s, _ in images}
        bounds = sorted(cuts)
        pieces: list[tuple[int, int]] = [(a, b) for a, b in itertools.pairwise(bounds) if b > a]
        text_pieces = [(a, b) for a, b in pieces if a not in image_starts]
        # One batched tokenizer call for all text pieces.
        encoded = []
        if text_pieces:
            encoded = self.tokenizer([text[a:b] for a, b in text_pieces], add_special_tokens=False)["input_ids"]
        by_start = dict(zip((a for a, _ in text_pieces), encoded))
        ids: list[int] = []
        labels: list[int] = []
        for a, b in pieces:
            if a in image_starts:
                if b - a != len(IMAGE_TOKEN):
                    raise ValueError("an answer boundary falls inside an <image> marker")
                ids.append(IMAGE_PLACEHOLDER_ID)
                labels.append(IGNORE_INDEX)
                continue
            toks = by_start[a]
            supervised = any(s <= a and b <= e for s, e in spans)
            ids.extend(toks)
            labels.extend(toks if supervised else [IGNORE_INDEX] * len(toks))
        return TokenizedConversation(
            input_ids=torch.tensor(ids, dtype=torch.long),
            labels=torch.tensor(labels, dtype=torch.long),
            num_images=len(images),
        )

    # -- public -------------------------------------------------------------------------------------

    def encode(self, messages: Sequence[Mapping[str, str]]) -> TokenizedConversation:
        """Tokenise a whole conversation for training.

        Args:
            messages: ``[{"role": "system"|"user"|"assistant", "content": str}, ...]``; ``<image>`` in
                any content marks an image.

        Returns:
            :class:`TokenizedConversation` with labels on every answer (reply + end-of-turn marker).
        """
        msgs = self._check(messages)
        text, spans = self._answer_spans(msgs, add_generation_prompt=False)
        return self._tokenize(text, spans)

    def encode_prompt(self, messages: Sequence[Mapping[str, str]]) -> torch.Tensor:
        """Tokenise an inference prompt: messages up to the last user turn plus the generation prompt.

        Trailing assistant messages (e.g. the reference answer of an eval sample) are dropped.
        Earlier answers are cut out as pieces like in :meth:`encode`, so the prompt tokens equal the
        training tokens that precede the answer.

        Returns:
            (L,) int64 ids with ``IMAGE_PLACEHOLDER_ID`` per image.
        """
        msgs = self._check(messages)
        last_user = max((i for i, m in enumerate(msgs) if m["role"] == "user"), default=None)
        if last_user is None:
            raise ValueError("a prompt needs at least one user message")
        text, spans = self._answer_spans(msgs[: last_user + 1], add_generation_prompt=True)
        return self._tokenize(text, spans).input_ids


def truncate(
    input_ids: torch.Tensor,
    labels: torch.Tensor,
    max_length: int,
    image_tokens: Sequence[int] | None = None,
) -> tuple[torch.Tensor, torch.Tensor] | None:
    """Drop trailing tokens so the spliced sequence fits ``max_length``; ``None`` means skip the sample.

    Lengths are counted after splicing: the i-th placeholder counts ``image_tokens[i]`` tokens
    (projector's ``num_tokens``; default 1 each, i.e. count ids). Returns ``None`` when the cut would
    drop or split an image (the images list would no longer match; official truncates blindly after
    splicing instead), or when no supervised token is left (the sample would only cost compute).

    Args:
        input_ids: (L,) ids with placeholders.
        labels: (L,) labels.
        max_length: maximum spliced length.
        image_tokens: tokens per image, in placeholder order.

    Returns:
        (input_ids (L',), labels (L')) with L' <= L, or ``None``.
    """
    is_image = input_ids == IMAGE_PLACEHOLDER_ID
    n_images = int(is_image.sum())
    if image_tokens is None:
        image_tokens = [1] * n_images
    if len(image_tokens) != n_images:
        raise ValueError(f"{n_images} image placeholders but {len(image_tokens)} image token counts")
    sizes = torch.ones_like(input_ids)
    sizes[is_image] = torch.as_tensor(list(image_tokens), dtype=sizes.dtype)
    ends = sizes.cumsum(0)  # spliced length up to and including each id
    keep = int((ends <= max_length).sum())
    if keep < int(input_ids.shape[0]) and bool(is_image[keep:].any()):
        return None
    input_ids, labels = input_ids[:keep], labels[:keep]
    if not bool((labels[1:] != IGNORE_INDEX).any()):
        return None
    return input_ids, labels


# --------------------------------------------------------------------------------------------------
# Splicing, packing, loss
# --------------------------------------------------------------------------------------------------


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
    rows: list[list[int]] = []  # item indices per row
    fill: list[int] = []
    for i, (emb, lab) in enumerate(items):
        n = int(emb.shape[0])
        if emb.ndim != 2 or emb.shape[1] != hidden or lab.shape != (n,):
            raise ValueError(f"item {i}: expected ((L, {hidden}), (L,)), got {tuple(emb.shape)}, {tuple(lab.shape)}")
        if n == 0 or n > max_length:
            raise ValueError(f"item {i} has length {n}, outside [1, max_length={max_length}]; truncate it first")
        for r, used in enumerate(fill):
            if used + n <= max_length:
                rows[r].append(i)
                fill[r] += n
                break
        else:
            rows.append([i])
            fill.append(n)
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


# --------------------------------------------------------------------------------------------------
# Trainable parts
# --------------------------------------------------------------------------------------------------


def linear_leaf_names(model: nn.Module) -> list[str]:
    """Sorted last-name components of every ``nn.Linear`` except the output head (LoRA targets)."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    names = {
        name.rsplit(".", 1)[-1]
        for name, mod in model.named_modules()
        if isinstance(mod, nn.Linear) and mod is not head
    }
    names.discard("lm_head")
    return sorted(names)


def prepare_llm(
    model: nn.Module,
    mode: str,
    *,
    r: int = 64,
    alpha: int = 16,
    dropout: float = 0.05,
    target_modules: Sequence[str] | None = None,
) -> nn.Module:
    """Set what of the LLM trains.

    Args:
        model: a causal LM.
        mode: ``"frozen"`` (nothing; gradients still flow through it to the image embeddings),
            ``"lora"``/``"dora"`` (peft adapters, base frozen; official uses DoRA r64 alpha16),
            ``"full"`` (everything).
        r, alpha, dropout: LoRA rank, alpha, dropout.
        target_modules: module names to adapt; default every linear layer except the output head
            (Qwen2: q/k/v/o_proj, gate/up/down_proj).

    Returns:
        the model (``peft.PeftModel`` wrapping it for lora/dora).
    """
    if mode == "frozen":
        model.requires_grad_(False)
        return model
    if mode == "full":
        model.requires_grad_(True)
        return model
    if mode not in ("lora", "dora"):
        raise ValueError(f"mode must be 'frozen', 'lora', 'dora' or 'full', got {mode!r}")
    from peft import LoraConfig, PeftModel, get_peft_model

    if isinstance(model, PeftModel):
        raise ValueError("model already has peft adapters")
    targets = list(target_modules) if target_modules is not None else linear_leaf_names(model)
    config = LoraConfig(
        r=r,
        lora_alpha=alpha,
        lora_dropout=dropout,
        target_modules=targets,
        use_dora=mode == "dora",
        bias="none",
        task_type="CAUSAL_LM",
    )
    model = get_peft_model(model, config)  # freezes the base model
    logger.info("%s on %s: %d trainable parameters", mode, targets, trainable_parameter_count(model))
    return model


def trainable_parameter_count(model: nn.Module) -> int:
    """Number of parameters with ``requires_grad`` (shared tensors counted once)."""
    seen: set[int] = set()
    total = 0
    for p in model.parameters():
        if p.requires_grad and id(p) not in seen:
            seen.add(id(p))
            total += p.numel()
    return total


# --------------------------------------------------------------------------------------------------
# A tiny offline LLM for tests and CPU demos
# --------------------------------------------------------------------------------------------------

#: Qwen2's pre-tokenizer split pattern (GPT-4 style; digits one by one).
_QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")


def build_tiny_llm(
    out_dir: str | os.PathLike,
    corpus: Iterable[str],
    *,
    vocab_size: int = 512,
    hidden_size: int = 64,
    num_layers: int = 2,
    num_heads: int = 4,
    num_kv_heads: int = 2,
    intermediate_size: int = 128,
    max_position_embeddings: int = 4096,
    initializer_range: float = 0.02,
    seed: int = 0,
) -> Path:
    """Write a small random-weight Qwen2 chat model with a freshly trained tokenizer to ``out_dir``.

    The tokenizer is a Qwen2-style byte-level BPE (same split regex, NFC) trained offline on
    ``corpus`` with at most ``vocab_size`` entries (fewer if the corpus has fewer merges), with the
    special tokens ``<|endoftext|>`` (pad), ``<|im_start|>``, ``<|im_end|>`` (eos) and the ChatML
    :data:`CHATML_TEMPLATE` (default system prompt "You are a helpful assistant."). The model is a
    ``Qwen2ForCausalLM`` with tied embeddings and the tokenizer's vocabulary size. Both are saved
    with ``save_pretrained`` (a normal HF directory for :func:`load_causal_lm`). Deterministic for
    the same corpus and seed; the global RNG state is left unchanged.

    Returns:
        ``Path(out_dir)``.
    """
    from tokenizers import (
        Regex,
        Tokenizer,
        decoders,
        models,
        normalizers,
        pre_tokenizers,
        trainers,
    )
    from transformers import PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    bpe = Tokenizer(models.BPE())
    bpe.normalizer = normalizers.NFC()
    bpe.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(_QWEN2_SPLIT), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(_SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    bpe.train_from_iterator(list(corpus), trainer=trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=bpe,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        extra_special_tokens=["<|im_start|>"],
        model_max_length=max_position_embeddings,
        clean_up_tokenization_spaces=False,
    )
    tokenizer.chat_template = CHATML_TEMPLATE
    n_vocab = len(tokenizer)
    config = Qwen2Config(
        vocab_size=n_vocab,
        hidden_size=hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_kv_heads,
        intermediate_size=intermediate_size,
        max_position_embeddings=max_position_embeddings,
        tie_word_embeddings=True,
        initializer_range=initializer_range,
        bos_token_id=tokenizer.pad_token_id,  # Qwen2: bos = <|endoftext|>, never prepended
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = Qwen2ForCausalLM(config)
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    logger.info("tiny LLM (vocab %d, hidden %d, %d layers) written to %s", n_vocab, hidden_size, num_layers, out_dir)
    return out_dir


# --------------------------------------------------------------------------------------------------
# Generation
# --------------------------------------------------------------------------------------------------


@torch.no_grad()
def generate_answer(
    model: nn.Module,
    tokenizer: ChatTokenizer,
    input_ids: torch.Tensor,
    image_embeds: Sequence[torch.Tensor] = (),
    *,
    max_new_tokens: int = 64,
) -> str:
    """Greedy answer to a prompt with images.

    Args:
        model: causal LM (optionally peft-wrapped); put it in eval mode first (dropout).
        tokenizer: the :class:`ChatTokenizer` that made ``input_ids``.
        input_ids: (L,) prompt ids from :meth:`ChatTokenizer.encode_prompt`.
        image_embeds: per image (n_i, H) projector outputs.
        max_new_tokens: generation budget.

    Returns:
        the decoded answer without special tokens.
    """
    from transformers import GenerationConfig

    embeds, _ = splice_image_features(model.get_input_embeddings(), input_ids, None, image_embeds)
    hf_tok = tokenizer.tokenizer
    eos = model.generation_config.eos_token_id if model.generation_config is not None else None
    eos_ids = set(eos if isinstance(eos, (list, tuple)) else [eos] if eos is not None else [])
    if hf_tok.eos_token_id is not None:
        eos_ids.add(hf_tok.eos_token_id)
    # A fresh config: the checkpoint's sampling defaults (temperature, top_p, ...) do not apply.
    config = GenerationConfig(
        max_new_tokens=max_new_tokens,
        do_sample=False,
        eos_token_id=sorted(eos_ids) or None,
        pad_token_id=hf_tok.pad_token_id,
    )
    out = model.generate(
        inputs_embeds=embeds[None],
        attention_mask=torch.ones(1, embeds.shape[0], dtype=torch.long, device=embeds.device),
        generation_config=config,
    )
    # With only inputs_embeds, decoder-only generate returns just the new tokens.
    return hf_tok.decode(out[0], skip_special_tokens=True)
