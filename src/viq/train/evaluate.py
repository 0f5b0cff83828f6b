"""Validation: held-out losses, answer accuracy, reconstruction quality and code usage."""

from __future__ import annotations

import logging

import torch

from viq.train.config import TrainConfig
from viq.train.data import Collator, build_dataset, max_pixels_at
from viq.train.metrics import CodeUsage, answer_matches, code_usage_metrics
from viq.train.model import TrainModel

log = logging.getLogger(__name__)

__all__ = ["answer_budget", "answer_last_question", "answer_last_questions", "evaluate", "generate_reply",
           "generate_replies"]


@torch.no_grad()
def generate_reply(model: TrainModel, tokenizer, messages: list[dict], images: list[torch.Tensor],
                   device: torch.device, *, codes: list | None = None, max_new_tokens: int = 64) -> str:
    """Greedy reply of a stage model to the last user turn of ``messages`` (chat messages, one
    ``<image>`` placeholder per image; earlier turns are context, trailing assistant turns are
    ignored), seeing ``images`` (``(3, H, W)`` pixels in [-1, 1]) or, for the stages that read stored
    codes, ``codes``. The one generation path of validation, ``viq eval-qa`` and ``viq ask``
    (:func:`generate_replies` with one conversation)."""
    return generate_replies(model, tokenizer, [messages], [images], device, codes=[codes or []],
                            max_new_tokens=[max_new_tokens])[0]


@torch.no_grad()
def generate_replies(model: TrainModel, tokenizer, conversations: list[list[dict]], images: list[list[torch.Tensor]],
                     device: torch.device, *, codes: list[list] | None = None,
                     max_new_tokens: list[int] | None = None) -> list[str]:
    """:func:`generate_reply` for several conversations at once: their images go through the vision
    side in one pass (per image, the same features as alone) and the answers are generated together
    (:func:`viq.mllm.adapters.generate_answers`). ``codes``: per conversation, its stored codes (stages
    that read codes); ``max_new_tokens``: per conversation (default 64 each)."""
    from viq.mllm.adapters import generate_answers

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
def answer_last_question(model: TrainModel, tokenizer, messages: list[dict], images: list[torch.Tensor],
                         device: torch.device, *, codes: list | None = None) -> tuple[str, str]:
    """Greedy answer of a stage model to the last question of ``messages`` (chat messages ending
    with the reference answer; the turns before the last question are context), seeing ``images``
    (``(3, H, W)`` pixels in [-1, 1]) or, for the stages that read stored codes, ``codes``
    (:func:`generate_reply`).

    Returns:
        ``(prediction, reference answer)``; the generation budget is :func:`answer_budget`.
    """
    return answer_last_questions(model, tokenizer, [messages], [images], device, codes=[codes or []])[0]


@torch.no_grad()
def answer_last_questions(model: TrainModel, tokenizer, conversations: list[list[dict]],
                          images: list[list[torch.Tensor]], device: torch.device, *,
                          codes: list[list] | None = None) -> list[tuple[str, str]]:
    """:func:`answer_last_question` for several conversations, answered together
    (:func:`generate_replies`); each keeps its own budget."""
    split = [_split_last_answer(messages) for messages in conversations]
    predictions = generate_replies(model, tokenizer, [m for m, _ in split], images, device, codes=codes,
                                   max_new_tokens=[answer_budget(tokenizer, a) for _, a in split])
    return [(p, a) for p, (_, a) in zip(predictions, split)]


@torch.no_grad()
def evaluate(model: TrainModel, cfg: TrainConfig, tokenizer, device: torch.device,
             examples: list[dict] | None = None, reconstructions: list | None = None) -> dict[str, float]:
    """Validation on the first ``train.eval_samples`` samples of ``data.val``:

    * ``val_<loss>``: the training losses (means over tokens / images),
    * ``answer_accuracy``: greedy answers to the last question of each multimodal sample, scored
      by normalised exact match (LLM stages),
    * ``latent_mse``, ``psnr`` (dB) and ``ssim``: reconstruction through the frozen VAE decoder
      (stage 2, drawer), scored on the encoded area of the first image of each sample by
      :func:`viq.eval.recon.encoded_area_scores` (the metric code of ``viq eval-recon``; needs
      torchmetrics),
    * ``code_usage`` / ``code_perplexity`` of the validation codes (quantized stages).

    ``examples``: if given, each answered question is appended as {question, answer, prediction, correct}.
    ``reconstructions``: if given, ``(image, reconstruction)`` pixel pairs (``(3, h, w)``, [-1, 1], on
    the CPU) of the first ``train.log_images`` reconstructed samples are appended.
    """
    from viq.eval.recon import encoded_area_scores
    from viq.model.vae import decode_latents
    from viq.mllm.chat import IMAGE_TOKEN

    was_training = model.training
    model.eval()
    dataset = build_dataset(cfg.data.val, cfg, max_pixels_at(cfg, cfg.train.max_steps))
    n = min(len(dataset), cfg.train.eval_samples)
    collator = Collator(tokenizer, cfg.llm.max_length,
                        image_tokens=model.projector.num_tokens if model.projector is not None else None,
                        patch_size=model.config.encoder.patch_size)
    sums = {"text": 0.0, "distill": 0.0, "recon": 0.0}
    tokens = images = 0.0
    correct = asked = 0
    psnrs: list[float] = []
    ssims: list[float] = []
    usage = CodeUsage(model.config.head.codebook_size if model.head is not None else 0, device, window=1)
    hist = None
    for i in range(n):
        item = dataset[i]
        if item is None or (model.spec.data == "images" and not getattr(item, "images", [item])):
            continue  # skipped sample, or a text-only sample for an image-only stage
        batch = collator([item]).to(device)
        out = model(batch)
        tokens += batch.num_supervised_tokens
        images += batch.num_images
        for k in sums:
            sums[k] += float(out.sums.get(k, 0.0))
        if out.indices is not None and usage.size:
            usage.add(out.indices)
        # Reconstruction quality of the first image of the sample.
        if batch.images and model.vae is not None and (model.recon is not None or model.drawer is not None):
            x = batch.images[0]
            encoded = model.encode_features([x])
            if model.drawer is not None:
                _, latents = model.draw_codes(encoded.indices, encoded.grids)
                latent = model.drawer.latent.to_raw(latents[0])
            else:
                latent = model.recon.to_raw(model.recon(encoded.features, encoded.grids)[0])
            pixels = decode_latents(model.vae, latent)
            h, w = x.shape[-2:]  # the encoded area, not the zero-padded canvas
            p, s = encoded_area_scores(x, pixels)  # crops to (h, w): the zero-padded canvas never counts
            psnrs.append(p)
            ssims.append(s)
            if reconstructions is not None and len(reconstructions) < cfg.train.log_images:
                reconstructions.append((x.detach().cpu(), pixels[:, :h, :w].detach().float().clamp(-1, 1).cpu()))
        # Answer accuracy on multimodal QA (LLM stages).
        if model.llm is not None and tokenizer is not None and hasattr(item, "messages") and batch.num_images:
            messages = item.messages
            last_answer = max(i for i, m in enumerate(messages) if m["role"] == "assistant")
            prediction, answer = answer_last_question(model, tokenizer, messages, batch.images, device,
                                                      codes=batch.codes)
            ok = bool(answer_matches(prediction, answer))
            correct += int(ok)
            asked += 1
            if examples is not None:
                question = next(m["content"] for m in reversed(messages[:last_answer]) if m["role"] == "user")
                examples.append({"id": item.id, "question": question.replace(IMAGE_TOKEN, "").strip(),
                                 "answer": answer, "prediction": prediction, "correct": ok})
    if usage.size:
        hist = usage.current
    result: dict[str, float] = {"val_samples": float(n)}
    if tokens:
        result["val_text"] = sums["text"] / tokens
    if images:
        result["val_distill"] = sums["distill"] / images
        if model.recon is not None or model.drawer is not None:
            result["latent_mse"] = sums["recon"] / images
    if asked:
        result["answer_accuracy"] = correct / asked
    if psnrs:
        result["psnr"] = sum(psnrs) / len(psnrs)
        result["ssim"] = sum(ssims) / len(ssims)
    if hist is not None:
        result.update(code_usage_metrics(hist))
    model.train(was_training)
    for helper in (model.teacher, model.vae):
        if helper is not None:
            helper.eval()
    return result
