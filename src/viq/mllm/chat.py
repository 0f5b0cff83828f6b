"""Chat tokenisation with answer-only labels: the ``<image>`` marker, roles, ChatML, label masks.

Pipeline for one training sample::

    chat = ChatTokenizer(tokenizer)
    conv = chat.encode(messages)     # (L,) ids with one IMAGE_PLACEHOLDER_ID per image, (L,) labels
    ids, labels = truncate(conv.input_ids, conv.labels, max_length, image_tokens)

The placeholders are replaced by projected image features in :mod:`viq.mllm.packing`.

Differences from the official recipe (``official-viq-training.md`` §9.3-§9.4), all deliberate:

* Labels: official supervises the role header tokens ``assistant`` and ``\\n`` (a legacy LLaVA ``-2``
  offset meant for Llama's BOS) and the ``\\n`` after ``<|im_end|>``. Here only the reply text and the
  end-of-turn marker the template writes after it (``<|im_end|>`` for ChatML) are supervised.
* Official truncates after splicing, which can silently push answer tokens (or half an image) out.
  :func:`truncate` refuses to cut an image and reports samples that would lose every answer token.
"""

from __future__ import annotations

import collections
import functools
import itertools
import logging
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

logger = logging.getLogger(__name__)

__all__ = [
    "IMAGE_TOKEN",
    "IGNORE_INDEX",
    "IMAGE_PLACEHOLDER_ID",
    "LLAVA_ROLES",
    "CHATML_TEMPLATE",
    "DEFAULT_SYSTEM_PROMPT",
    "ChatTokenizer",
    "TokenizedConversation",
    "messages_from_llava",
    "truncate",
]

#: The image marker in message text. Each occurrence becomes one image's projected tokens.
IMAGE_TOKEN = "<image>"
#: Label value ignored by the loss (PyTorch's ``cross_entropy`` default).
IGNORE_INDEX = -100
#: Token id standing in for one image in ``input_ids`` until
#: :func:`viq.mllm.packing.splice_image_features` replaces it by the image's tokens.
IMAGE_PLACEHOLDER_ID = -200

#: Default system prompt of the official ``v1_qwen2`` template (and Qwen2-Instruct).
DEFAULT_SYSTEM_PROMPT = "You are a helpful assistant."

#: ChatML as used by Qwen2/2.5 (without tools) and the official ``v1_qwen2`` conversation template:
#: a default system prompt unless the first message is a system message, then
#: ``<|im_start|>{role}\n{content}<|im_end|>\n`` per message, and ``<|im_start|>assistant\n`` as the
#: generation prompt. Used by :func:`viq.demo.tiny_llm.build_tiny_llm` and as the fallback for
#: tokenizers without one.
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
#: conversations whose encoding :meth:`ChatTokenizer.encode` keeps (least recently used dropped first)
ENCODE_CACHE_SIZE = 65536
_GENERATION_TAG = re.compile(r"\{%-?\s*generation\s*-?%\}")


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


#: Role names of LLaVA data (``"from"`` of official records, or chat-API ``"role"``) -> chat role.
LLAVA_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}


def messages_from_llava(conversations: Sequence[Mapping[str, str]]) -> list[dict[str, str]]:
    """Convert official/LLaVA ``[{"from": "human"|"gpt"|"system", "value": ...}]`` to chat messages."""
    out = []
    for turn in conversations:
        if turn.get("from") not in LLAVA_ROLES:
            raise ValueError(f"unknown LLaVA speaker {turn.get('from')!r}")
        out.append({"role": LLAVA_ROLES[turn["from"]], "content": turn["value"]})
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
        #: conversation (its (role, content) pairs) -> its encoding; see :meth:`encode`
        self._encoded: collections.OrderedDict[tuple, TokenizedConversation] = collections.OrderedDict()

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

            # Any: transformers types the result as one string, it is (texts, assistant index spans) here
            out: Any = render_jinja_template(
                conversations=[msgs],
                chat_template=self.chat_template,
                return_assistant_tokens_mask=True,
                add_generation_prompt=add_generation_prompt,
                **self.tokenizer.special_tokens_map,
            )
            rendered, indices = out
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

    @functools.cached_property
    def end_of_turn(self) -> str:
        """The text the chat template writes right after an assistant reply (ChatML: ``<|im_end|>``;
        ``""`` if it writes nothing there): where a generated answer ends. Found by rendering a reply
        with a marker, so it holds for any template."""
        marker = "viq-end-of-turn-probe"
        msgs = self._check([{"role": "user", "content": "q"}, {"role": "assistant", "content": marker}])
        text, spans = self._answer_spans(msgs, add_generation_prompt=False)
        if not spans:
            return ""
        start, end = spans[-1]
        return text[start:end].partition(marker)[2].strip()

    @functools.cached_property
    def end_of_turn_ids(self) -> list[int]:
        """Token ids that end an answer: the template's end-of-turn marker when it is one token (ChatML's
        ``<|im_end|>``, Llama 3's ``<|eot_id|>``), and the tokenizer's eos. Generation stops at any of
        them, so a base model whose eos is ``<|endoftext|>`` still stops at the end of its turn."""
        ids = []
        if self.end_of_turn:
            encoded = self.tokenizer(self.end_of_turn, add_special_tokens=False)["input_ids"]
            if len(encoded) == 1:
                ids.append(int(encoded[0]))
        eos = getattr(self.tokenizer, "eos_token_id", None)
        if eos is not None and eos not in ids:
            ids.append(int(eos))
        return ids

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
        # Training reads the same conversations every epoch, and synthetic or templated data repeats
        # whole conversations; rendering the template and tokenising costs about a millisecond each.
        # The result is a pure function of the messages, so the last ENCODE_CACHE_SIZE are kept. The
        # returned tensors are shared: callers must not modify them in place.
        key = tuple((m["role"], m["content"]) for m in msgs)
        cached = self._encoded.get(key)
        if cached is not None:
            self._encoded.move_to_end(key)
            return cached
        text, spans = self._answer_spans(msgs, add_generation_prompt=False)
        encoded = self._encoded[key] = self._tokenize(text, spans)
        if len(self._encoded) > ENCODE_CACHE_SIZE:
            self._encoded.popitem(last=False)
        return encoded

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
