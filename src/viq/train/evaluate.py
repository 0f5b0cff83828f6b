"""Validation: held-out losses, answer accuracy, reconstruction quality and code usage."""

from __future__ import annotations

import logging

import torch

from viq.eval.recon import encoded_area_scores
from viq.mllm.chat import IMAGE_TOKEN
from viq.mllm.generation import (  # the generation path lives with the chat model; named here too for callers
    answer_budget,
    answer_last_question,
    answer_last_questions,
    generate_replies,
    generate_reply,
)
from viq.model.vae import decode_latents
from viq.train.config import TrainConfig
from viq.train.data import Collator, build_dataset, max_pixels_at
from viq.train.metrics import CodeUsage, answer_matches, code_usage_metrics
from viq.train.model import TrainModel

log = logging.getLogger(__name__)

__all__ = [
    "answer_budget",
    "answer_last_question",
    "answer_last_questions",
    "evaluate",
    "generate_reply",
    "generate_replies",
]


@torch.no_grad()
def evaluate(
    model: TrainModel,
    cfg: TrainConfig,
    tokenizer,
    device: torch.device,
    examples: list[dict] | None = None,
    reconstructions: list | None = None,
) -> dict[str, float]:
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

    was_training = model.training
    model.eval()
    dataset = build_dataset(cfg.data.val, cfg, max_pixels_at(cfg, cfg.train.max_steps))
    n = min(len(dataset), cfg.train.eval_samples)
    collator = Collator(
        tokenizer,
        cfg.llm.max_length,
        image_tokens=model.projector.num_tokens if model.projector is not None else None,
        patch_size=model.config.encoder.patch_size,
    )
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
            prediction, answer = answer_last_question(
                model, tokenizer, messages, batch.images, device, codes=batch.codes
            )
            ok = bool(answer_matches(prediction, answer))
            correct += int(ok)
            asked += 1
            if examples is not None:
                question = next(m["content"] for m in reversed(messages[:last_answer]) if m["role"] == "user")
                examples.append(
                    {
                        "id": item.id,
                        "question": question.replace(IMAGE_TOKEN, "").strip(),
                        "answer": answer,
                        "prediction": prediction,
                        "correct": ok,
                    }
                )
    if usage.size and usage.current is not None:
        hist = usage.current.sum(0)  # (slots, K) -> (K,): the codebook's use over every slot
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
