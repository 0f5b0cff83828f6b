"""Does a trained stage model read the image? Held-out QA accuracy with real, blank and shuffled
images, beside a blind baseline, with 95 % confidence intervals.

* :func:`load_run`: the chat model of a training run (:class:`viq.mllm.model.ViQForConditionalGeneration`:
  ViQ network from pixels or codes, projector, LLM) and its chat tokenizer, from the run's ``final/``
  output (stages ``stage1``, ``stage2_1``, ``stage2_2``, ``mllm``).
* :func:`evaluate_qa`: greedy answers to the last question of each image record, through the
  training code's path (the image preprocessing of the run's recipe,
  :func:`viq.mllm.generation.answer_last_question`, scored by :func:`viq.eval.answers.answer_matches`),
  with ``images="real"`` (the record's image), ``"blank"`` (a mid-grey image of the same size: pixel
  value 0 in [-1, 1]) or ``"shuffled"`` (the image of another record: a fixed derangement drawn from
  ``seed``). A model that uses the image scores clearly higher with real images than with the other
  two.
* :func:`majority_baseline`: the most frequent training answer per question template: what a model
  that ignores the image can reach by memorising answer priors.
* :func:`wilson_interval`: the 95 % Wilson score interval of a proportion.

Records are LLaVA records (``conversations`` or ``messages``, ``image``: a path or a list of paths,
see :mod:`viq.data.llava`); records without an image are left out. Relative image paths are
resolved against ``image_root``; absolute ones are used as they are. The task of a record (for the
per-task results) is its ``"task"`` field, else ``"all"``.
"""

from __future__ import annotations

import os
import random
from collections import Counter, defaultdict
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from viq.data.llava import DataError, load_record_image, parse_record
from viq.eval.answers import answer_matches, normalize_answer
from viq.eval.intervals import wilson_interval
from viq.formats.image import ImageError, PreprocessConfig
from viq.mllm.chat import IMAGE_TOKEN, LLAVA_ROLES
from viq.mllm.generation import answer_last_questions
from viq.mllm.model import ViQForConditionalGeneration, find_final
from viq.mllm.packing import answer_log_likelihoods, splice_image_features

__all__ = ["IMAGE_MODES", "answer_nll", "evaluate_qa", "find_final", "load_run", "majority_baseline", "wilson_interval"]

#: What the model is shown with each question: the real image, a mid-grey one, another sample's.
IMAGE_MODES = ("real", "blank", "shuffled")


def _summary(outcomes: Sequence[tuple[str, bool]]) -> dict[str, Any]:
    """``outcomes``: (task, correct) per question -> ``{n, accuracy, ci95, per_task}``."""
    per: dict[str, list[int]] = defaultdict(lambda: [0, 0])
    for task, ok in outcomes:
        per[task][0] += int(ok)
        per[task][1] += 1
    correct, n = sum(int(ok) for _, ok in outcomes), len(outcomes)
    return {
        "n": n,
        "accuracy": correct / n if n else 0.0,
        "ci95": wilson_interval(correct, n),
        "per_task": {
            t: {"n": c[1], "accuracy": c[0] / c[1], "ci95": wilson_interval(c[0], c[1])} for t, c in sorted(per.items())
        },
    }


# ============================================================================================ records


def _task(record: dict) -> str:
    task = record.get("task") if isinstance(record, dict) else None
    return str(task) if task else "all"


def _turns(record: dict) -> list[tuple[str, str]]:
    """(role, text) of a LLaVA record, roles normalised to user/assistant/system."""

    if "conversations" in record:
        return [(LLAVA_ROLES.get(t.get("from"), ""), t.get("value", "")) for t in record["conversations"]]
    return [(LLAVA_ROLES.get(t.get("role"), ""), t.get("content", "")) for t in record.get("messages", [])]


def _question(record: dict) -> str:
    """The last question (without ``<image>``): the record's ``question`` field or its last user turn."""

    q = record.get("question")
    if q is None:
        q = next((text for role, text in reversed(_turns(record)) if role == "user"), "")
    return q.replace(IMAGE_TOKEN, "").strip()


def _answer(record: dict) -> str:
    """The reference answer of the last question: the ``answer`` field or the last assistant turn."""
    a = record.get("answer")
    if a is None:
        a = next((text for role, text in reversed(_turns(record)) if role == "assistant"), "")
    return a


def _has_image(record: Any) -> bool:
    return isinstance(record, dict) and bool(record.get("image"))


def _derangement(n: int, seed: int) -> list[int]:
    """A fixed permutation of ``range(n)`` without fixed points (n >= 2): Sattolo's algorithm."""
    perm = list(range(n))
    rng = random.Random(seed)
    for i in range(n - 1, 0, -1):
        j = rng.randrange(i)
        perm[i], perm[j] = perm[j], perm[i]
    return perm


def _parse(records: Sequence[dict], image_root: str | os.PathLike[str], source: str | None) -> list[tuple[dict, Any]]:
    """(record, parsed record of :mod:`viq.data.llava`) of every image record; validates them like
    the training data (roles, order, ``<image>`` count) and checks that every image file exists."""

    root = os.path.join(os.fspath(image_root), "")
    out = []
    for i, record in enumerate(records):
        if not _has_image(record):
            continue
        parsed = parse_record(record, f"{source} record {i + 1}" if source else f"record {i + 1}", root)
        for k, ref in enumerate(parsed.images):
            if not os.path.isfile(ref.path):
                what = "not found" if not os.path.exists(ref.path) else "not a file"
                raise DataError(f"{parsed.label}: image {k + 1} of {len(parsed.images)} ({ref.path}): {what}")
        out.append((record, parsed))
    return out


def _load_pixels(parsed: Any, k: int, pre) -> torch.Tensor:
    """Image ``k`` of a parsed record as the training data loader decodes it (official ``resize``
    specs honoured, otherwise ``pre``) -> float32 ``(3, H, W)`` in [-1, 1]. DataError naming the
    sample and the file if it cannot be read."""

    ref = parsed.images[k]
    try:
        return load_record_image(ref, pre)
    except (ImageError, OSError) as e:
        reason = str(e).removeprefix(f"{ref.path}: ")
        raise DataError(f"{parsed.label}: image {k + 1} of {len(parsed.images)} ({ref.path}): {reason}") from e


# ============================================================================================ the run


def load_run(run: str | os.PathLike[str], device: torch.device | str | None = None) -> tuple[Any, Any]:
    """The chat model of a training run and its tokenizer, ready to answer questions:
    ``(ViQForConditionalGeneration.from_pretrained(run), model.tokenizer)``
    (:class:`viq.mllm.model.ViQForConditionalGeneration`: stages ``stage1``, ``stage2_1``, ``stage2_2``,
    ``mllm``; a run's output folder or its ``final/``). Raises FileNotFoundError / ValueError as that does."""

    model = ViQForConditionalGeneration.from_pretrained(run, device=device if device is not None else "cpu")
    return model, model.tokenizer


# ============================================================================================ evaluation


@torch.no_grad()
def evaluate_qa(
    model,
    tokenizer,
    records: Sequence[dict],
    image_root: str | os.PathLike[str],
    *,
    images: str = "real",
    seed: int = 0,
    preprocess=None,
    device: torch.device | None = None,
    examples: list[dict] | None = None,
    encoder=None,
    source: str | None = None,
    batch_size: int = 32,
) -> dict[str, Any]:
    """QA accuracy of a stage model on the image records of ``records``.

    Args:
        model, tokenizer: the chat model (or a training stage's model: projector and LLM) and its
            :class:`viq.mllm.chat.ChatTokenizer`, e.g. from :func:`load_run`.
        records: LLaVA records (e.g. :func:`viq.demo.synthetic.load_split`); records without an
            image are ignored. The last question of each is answered, the earlier turns are context.
        image_root: folder that relative image paths are resolved against.
        images: ``"real"``, ``"blank"`` (mid-grey, same size as the real image) or ``"shuffled"``
            (another record's image, by a fixed derangement from ``seed``; single-image records).
        preprocess: :class:`viq.formats.image.PreprocessConfig` (default: ``model.preprocess``, the
            run's recipe at the end of training for a model from :func:`load_run`, else the library default).
        device: default: the model's.
        examples: if given, one ``{id, task, question, answer, prediction, correct, image}`` per
            question is appended (``image``: the file shown, ``None`` for blank images).
        encoder: for stages that read codes (``mllm``): the ViQ model that encodes the images
            (default: ``model.image_encoder``, which :func:`load_run`'s model carries).
        source: name of the records' file, for error messages.
        batch_size: questions answered together (:func:`viq.mllm.generation.answer_last_questions`);
            each answer is the one it gets alone, up to the last bits of batched arithmetic.

    Returns:
        ``{"n", "accuracy", "ci95": [lo, hi], "per_task": {task: {"n", "accuracy", "ci95"}}, "images"}``.

    Raises:
        viq.data.llava.DataError (a ValueError): an invalid record, or an image missing or
            unreadable (the message names the sample: its id and the file).
        ValueError: an unknown ``images`` mode, a model without LLM, fewer than 2 records to shuffle.
    """

    outcomes: list[tuple[str, bool]] = []
    for chunk in _chunks(
        model, tokenizer, records, image_root, images, seed, preprocess, device, encoder, source, batch_size
    ):
        answers = answer_last_questions(
            model, tokenizer, chunk.conversations, chunk.pixels, chunk.device, codes=chunk.codes
        )
        for (record, parsed), shown, (prediction, answer) in zip(chunk.items, chunk.shown, answers):
            ok = bool(answer_matches(prediction, answer))
            task = _task(record)
            outcomes.append((task, ok))
            if examples is not None:
                examples.append(
                    {
                        "id": parsed.id,
                        "task": task,
                        "question": _question(record),
                        "answer": answer,
                        "prediction": prediction,
                        "correct": ok,
                        "image": None if images == "blank" else [ref.path for ref in shown.images],
                    }
                )
    result = _summary(outcomes)
    result["images"] = images
    return result


@dataclass
class _Chunk:
    """Questions answered together: their (record, parsed record), the record whose images are shown,
    the pixels shown, the chat messages, the codes (stages that read codes) and the device."""

    items: list[tuple[dict, Any]]
    shown: list[Any]
    pixels: list[list[torch.Tensor]]
    conversations: list[list[dict]]
    codes: list[list] | None
    device: torch.device


def _chunks(
    model, tokenizer, records, image_root, images, seed, preprocess, device, encoder, source, batch_size
) -> Iterator[_Chunk]:
    """The image records of ``records`` in chunks of ``batch_size``, each with what it is shown
    (``images``: real, blank or shuffled); the model is in eval mode while the chunks are used."""
    if images not in IMAGE_MODES:
        raise ValueError(f"images must be one of {IMAGE_MODES}, got {images!r}")
    if getattr(model, "llm", None) is None or getattr(model, "projector", None) is None or tokenizer is None:
        raise ValueError("evaluating QA needs a stage model with its projector, LLM and tokenizer")
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    if preprocess is None:
        preprocess = getattr(model, "preprocess", None) or PreprocessConfig()
    device = device if device is not None else next(model.parameters()).device
    reads_codes = getattr(model, "encoder", None) is None
    encoder = encoder if encoder is not None else getattr(model, "image_encoder", None)
    if reads_codes and encoder is None:
        raise ValueError("this stage model answers from codes: pass encoder= (a ViQ model) to encode the images")

    items = _parse(records, image_root, source)
    order = list(range(len(items)))
    if images == "shuffled":
        if len(items) < 2:
            raise ValueError(f"shuffled images need at least 2 image records, got {len(items)}")
        multi = next((p for _, p in items if len(p.images) != 1), None)
        if multi is not None:
            raise ValueError(
                f"{multi.label}: shuffled images need single-image records, this one has {len(multi.images)}"
            )
        order = _derangement(len(items), seed)

    was_training = model.training
    model.eval()
    try:
        for start in range(0, len(items), batch_size):
            chunk = range(start, min(start + batch_size, len(items)))
            shown = [items[order[i]][1] for i in chunk]
            pixels = [[_load_pixels(s, k, preprocess) for k in range(len(s.images))] for s in shown]
            if images == "blank":
                pixels = [[torch.zeros_like(x) for x in xs] for xs in pixels]
            codes = [encoder.encode_pixels([x.to(device) for x in xs]) for xs in pixels] if reads_codes else None
            conversations = [[{"role": role, "content": text} for role, text in items[i][1].messages] for i in chunk]
            yield _Chunk([items[i] for i in chunk], shown, pixels, conversations, codes, device)
    finally:
        model.train(was_training)
        for helper in (getattr(model, "teacher", None), getattr(model, "vae", None)):
            if helper is not None:
                helper.eval()


@torch.no_grad()
def answer_nll(
    model,
    tokenizer,
    records: Sequence[dict],
    image_root: str | os.PathLike[str],
    *,
    images: str = "real",
    seed: int = 0,
    preprocess=None,
    device: torch.device | None = None,
    encoder=None,
    source: str | None = None,
    batch_size: int = 32,
) -> dict[str, Any]:
    """How surprised the model is by the reference answers: their negative log-likelihood in nats per
    answer token (the answer and its end-of-turn marker, teacher-forced), with the image shown as in
    :func:`evaluate_qa` (same arguments). A model that reads the image gives the right answer a lower
    NLL with the real image than with a blank one; one that answers from the question alone gives both
    the same.

    Returns:
        ``{"n", "nll", "per_task": {task: {"n", "nll"}}, "images"}``.
    """

    per: dict[str, list[float]] = defaultdict(lambda: [0.0, 0.0, 0])
    for chunk in _chunks(
        model, tokenizer, records, image_root, images, seed, preprocess, device, encoder, source, batch_size
    ):
        flat_codes = [c for cs in chunk.codes for c in cs] if chunk.codes else []
        if flat_codes:
            features, grids = model.embed_codes(flat_codes)
        else:
            encoded = model.encode_features([x.to(chunk.device) for xs in chunk.pixels for x in xs])
            features, grids = encoded.features, encoded.grids
        embeds = model.projector(features, grids)
        embed_tokens = model.llm.get_input_embeddings()
        items, start = [], 0
        for conversation, xs in zip(chunk.conversations, chunk.pixels):
            encoded_text = tokenizer.encode(conversation)
            items.append(
                splice_image_features(
                    embed_tokens,
                    encoded_text.input_ids.to(chunk.device),
                    encoded_text.labels.to(chunk.device),
                    embeds[start : start + len(xs)],
                )
            )
            start += len(xs)
        nll, tokens = answer_log_likelihoods(model.llm, items)
        for (record, _), value, count in zip(chunk.items, nll.tolist(), tokens.tolist()):
            entry = per[_task(record)]
            entry[0] += value
            entry[1] += count
            entry[2] += 1
    total_nll, total_tokens = sum(v[0] for v in per.values()), sum(v[1] for v in per.values())
    return {
        "n": sum(v[2] for v in per.values()),
        "nll": total_nll / max(1, total_tokens),
        "per_task": {t: {"n": v[2], "nll": v[0] / max(1, v[1])} for t, v in sorted(per.items())},
        "images": images,
    }


def majority_baseline(train_records: Sequence[dict], test_records: Sequence[dict]) -> dict[str, Any]:
    """Accuracy of answering every test question (image records) with the most frequent training
    answer (image records) of its template ``(task, question)``; a template not seen in training
    falls back to the task's most frequent answer, then to the overall one. Answers are counted
    after :func:`viq.eval.answers.normalize_answer` (ties: the answer seen first) and scored with
    :func:`viq.eval.answers.answer_matches`. Same return format as :func:`evaluate_qa`
    (``"images": "majority"``)."""

    by_template: dict[tuple[str, str], Counter] = defaultdict(Counter)
    by_task: dict[str, Counter] = defaultdict(Counter)
    overall: Counter = Counter()
    first: dict[str, tuple[int, str]] = {}  # normalised answer -> (first position, answer as written)
    for k, rec in enumerate(r for r in train_records if _has_image(r)):
        answer = _answer(rec)
        key = normalize_answer(answer)
        first.setdefault(key, (k, answer))
        by_template[(_task(rec), _question(rec))][key] += 1
        by_task[_task(rec)][key] += 1
        overall[key] += 1

    def top(counter: Counter) -> str:
        return first[min(counter, key=lambda a: (-counter[a], first[a][0]))][1]

    outcomes = []
    for rec in (r for r in test_records if _has_image(r)):
        task = _task(rec)
        counter = by_template.get((task, _question(rec))) or by_task.get(task) or overall
        guess = top(counter) if counter else ""
        outcomes.append((task, bool(answer_matches(guess, _answer(rec)))))
    result = _summary(outcomes)
    result["images"] = "majority"
    return result
