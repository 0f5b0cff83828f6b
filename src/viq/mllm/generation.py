"""Greedy answers of a chat model about images: the one generation path of training's validation,
``viq eval-qa``, ``viq ask`` and :class:`viq.mllm.model.ViQForConditionalGeneration`.

``model`` is anything with the vision side's ``encode_features(pixels)`` / ``embed_codes(codes)``, a
``projector`` and an ``llm``: the chat model, or a training stage's model while it trains.
"""

from __future__ import annotations

from typing import Any

import torch

from viq.formats.image import preprocess as prepare
from viq.mllm.adapters import generate_answers
from viq.mllm.chat import IMAGE_TOKEN

__all__ = [
    "answer_budget",
    "answer_last_question",
    "answer_last_questions",
    "answer_question",
    "generate_reply",
    "generate_replies",
    "question_messages",
]


@torch.no_grad()
def generate_reply(
    model,
    tokenizer,
    messages: list[dict],
    images: list[torch.Tensor],
    device: torch.device,
    *,
    codes: list | None = None,
    max_new_tokens: int = 64,
) -> str:
    """Greedy reply of a stage model to the last user turn of ``messages`` (chat messages, one
    ``<image>`` placeholder per image; earlier turns are context, trailing assistant turns are
    ignored), seeing ``images`` (``(3, H, W)`` pixels in [-1, 1]) or, for the stages that read stored
    codes, ``codes``. The one generation path of validation, ``viq eval-qa`` and ``viq ask``
    (:func:`generate_replies` with one conversation)."""
    return generate_replies(
        model, tokenizer, [messages], [images], device, codes=[codes or []], max_new_tokens=[max_new_tokens]
    )[0]


@torch.no_grad()
def generate_replies(
    model,
    tokenizer,
    conversations: list[list[dict]],
    images: list[list[torch.Tensor]],
    device: torch.device,
    *,
    codes: list[list] | None = None,
    max_new_tokens: list[int] | None = None,
) -> list[str]:
    """:func:`generate_reply` for several conversations at once: their images go through the vision
    side in one pass (per image, the same features as alone) and the answers are generated together
    (:func:`viq.mllm.adapters.generate_answers`). ``codes``: per conversation, its stored codes (stages
    that read codes); ``max_new_tokens``: per conversation (default 64 each)."""

    n = len(conversations)
    codes = codes if codes is not None else [[] for _ in range(n)]
    budgets = max_new_tokens if max_new_tokens is not None else [64] * n
    if not (len(images) == len(codes) == len(budgets) == n):
        raise ValueError(f"{n} conversations need as many image lists, code lists and budgets")
    prompts = [tokenizer.encode_prompt(messages).to(device) for messages in conversations]
    counts = [len(c) if c else len(x) for x, c in zip(images, codes)]
    flat_codes = [c for cs in codes for c in cs]
    flat_images = [x.to(device) for xs in images for x in xs]
    features, grids = [], []
    if flat_codes:
        features, grids = model.embed_codes(flat_codes)
    elif flat_images:
        encoded = model.encode_features(flat_images)
        features, grids = encoded.features, encoded.grids
    embeds = model.projector(features, grids) if features else []
    per_prompt, start = [], 0
    for k in counts:
        per_prompt.append(embeds[start : start + k])
        start += k
    return generate_answers(model.llm, tokenizer, prompts, per_prompt, max_new_tokens=budgets)


def answer_budget(tokenizer, answer: str) -> int:
    """The generation budget of a question with reference ``answer``: its token count + 4."""
    return len(tokenizer.tokenizer(answer, add_special_tokens=False)["input_ids"]) + 4


def _split_last_answer(messages: list[dict]) -> tuple[list[dict], str]:
    last_answer = max(i for i, m in enumerate(messages) if m["role"] == "assistant")
    return messages[:last_answer], messages[last_answer]["content"]


@torch.no_grad()
def answer_last_question(
    model,
    tokenizer,
    messages: list[dict],
    images: list[torch.Tensor],
    device: torch.device,
    *,
    codes: list | None = None,
) -> tuple[str, str]:
    """Greedy answer of a stage model to the last question of ``messages`` (chat messages ending
    with the reference answer; the turns before the last question are context), seeing ``images``
    (``(3, H, W)`` pixels in [-1, 1]) or, for the stages that read stored codes, ``codes``
    (:func:`generate_reply`).

    Returns:
        ``(prediction, reference answer)``; the generation budget is :func:`answer_budget`.
    """
    return answer_last_questions(model, tokenizer, [messages], [images], device, codes=[codes or []])[0]


@torch.no_grad()
def answer_last_questions(
    model,
    tokenizer,
    conversations: list[list[dict]],
    images: list[list[torch.Tensor]],
    device: torch.device,
    *,
    codes: list[list] | None = None,
) -> list[tuple[str, str]]:
    """:func:`answer_last_question` for several conversations, answered together
    (:func:`generate_replies`); each keeps its own budget."""
    split = [_split_last_answer(messages) for messages in conversations]
    predictions = generate_replies(
        model,
        tokenizer,
        [m for m, _ in split],
        images,
        device,
        codes=codes,
        max_new_tokens=[answer_budget(tokenizer, a) for _, a in split],
    )
    return [(p, a) for p, (_, a) in zip(predictions, split)]


def question_messages(question: str, num_images: int = 1) -> list[dict[str, str]]:
    """The chat of one question: a user turn with ``num_images`` ``<image>`` placeholders in front of the
    question (the LLaVA convention: ``"<image>\\nquestion"``), unless the question places them itself.
    ValueError for an empty question or placeholders that do not match the images."""

    if not isinstance(question, str) or not question.strip():
        raise ValueError("the question is empty")
    placed = question.count(IMAGE_TOKEN)
    if placed and placed != num_images:
        raise ValueError(f"the question has {placed} {IMAGE_TOKEN} placeholder(s) for {num_images} image(s)")
    content = question if placed else "\n".join([IMAGE_TOKEN] * num_images + [question.strip()])
    return [{"role": "user", "content": content}]


@torch.no_grad()
def answer_question(
    model,
    tokenizer,
    image: Any,
    question: str,
    *,
    preprocess: Any,
    device: torch.device,
    encoder: Any = None,
    max_new_tokens: int = 64,
) -> str:
    """The greedy answer to ``question`` about ``image`` (a source :func:`viq.formats.image.preprocess`
    reads, or a list of them), sized by ``preprocess``: :func:`question_messages`, then
    :func:`generate_reply`; a model that reads codes (no ``encoder`` of its own) sees the codes ``encoder``
    gives. ValueError for an empty question, placeholders that do not match, no image or a budget < 1."""

    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    sources = list(image) if isinstance(image, (list, tuple)) else [image]
    if not sources:
        raise ValueError("no image to ask about")
    messages = question_messages(question, len(sources))
    pixels = [prepare(src, preprocess).pixels for src in sources]
    codes = None
    if getattr(model, "encoder", None) is None:  # a model that reads codes
        if encoder is None:
            raise ValueError("this model reads codes: it needs an encoder (a ViQ model) to encode images")
        codes = encoder.encode_pixels([x.to(device) for x in pixels])
    return generate_reply(model, tokenizer, messages, pixels, device, codes=codes, max_new_tokens=max_new_tokens)
