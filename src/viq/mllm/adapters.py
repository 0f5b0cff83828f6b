"""The causal LM itself: offline loading, what of it trains (frozen, LoRA/DoRA, full), and greedy answers.

Models load from local Hugging Face directories only; nothing is downloaded. A small random model for
tests and demos comes from :func:`viq.demo.tiny_llm.build_tiny_llm`.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from viq._untrusted import LIMITS, UntrustedFileError, read_json
from viq.mllm.chat import ChatTokenizer
from viq.mllm.packing import splice_image_features

logger = logging.getLogger(__name__)

__all__ = [
    "load_causal_lm",
    "llm_identity",
    "prepare_llm",
    "linear_leaf_names",
    "trainable_parameter_count",
    "generate_answer",
    "generate_answers",
]


# --------------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------------


def check_llm_config(path: Path) -> dict:
    """Read a Hugging Face ``config.json`` (bounded JSON) and refuse one whose sizes put the model (an
    estimate: embeddings + layers x 12 hidden^2, or the MLP's width where given) above
    ``LIMITS.max_model_parameters``, before transformers builds anything of that size."""

    config = read_json(path, max_bytes=16 << 20)
    if not isinstance(config, dict):
        raise UntrustedFileError(f"{path}: expected a JSON object")
    sizes = {}
    for key, default in (("hidden_size", 0), ("num_hidden_layers", 0), ("vocab_size", 0), ("intermediate_size", 0)):
        value = config.get(
            key,
            config.get("text_config", {}).get(key, default) if isinstance(config.get("text_config"), dict) else default,
        )
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise UntrustedFileError(f"{path}: {key} = {value!r} is not a size")
        sizes[key] = value
    h, layers = sizes["hidden_size"], sizes["num_hidden_layers"]
    mlp = sizes["intermediate_size"] or 4 * h
    estimate = 2 * sizes["vocab_size"] * h + layers * (4 * h * h + 3 * h * mlp)
    if estimate > LIMITS.max_model_parameters:
        raise UntrustedFileError(
            f"{path}: hidden_size {h}, {layers} layers, vocabulary {sizes['vocab_size']}: about {estimate:.3g} parameters, "
            f"more than the limit of {LIMITS.max_model_parameters:.3g} (raise it with VIQ_LIMITS=max_model_parameters=N)"
        )
    return config


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
        attn_implementation: ``"sdpa"`` or ``"eager"`` (both support
            :func:`viq.mllm.packing.pack_sequences`), or ``"flash_attention_2"`` where installed.

    Returns:
        (model in eval mode, tokenizer).
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"LLM directory not found: {path} (models are loaded from local directories only)")
    if not (path / "config.json").is_file():
        raise ValueError(f"{path} is not a Hugging Face model directory: it has no config.json")
    import pickle

    check_llm_config(path / "config.json")
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
        # transformers reads safetensors, or a pytorch_model.bin with torch.load(weights_only=True);
        # remote code is never trusted (trust_remote_code stays False).
        model = AutoModelForCausalLM.from_pretrained(
            path, dtype=dtype, attn_implementation=attn_implementation, local_files_only=True
        )
    except pickle.UnpicklingError as e:
        raise UntrustedFileError(
            f"{path}: refused: its weights pickle more than tensors and plain values, and "
            f"loading them could run code ({str(e).strip().splitlines()[0][:160]})"
        ) from None
    except (OSError, RecursionError) as e:
        raise UntrustedFileError(
            f"{path}: cannot load the LLM ({type(e).__name__}: {str(e).strip().splitlines()[0][:200]})"
        ) from None
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


def llm_identity(model: nn.Module) -> dict[str, Any]:
    """Which LLM this is, independent of where it lies on disk or the dtype it was loaded in: its
    architecture, hidden size, layers, vocabulary, and ``weights``, a digest (sha256, 16 hex digits) of
    the first 256 values of every parameter rounded to bfloat16 (so float32 and bfloat16 loads of the same
    checkpoint agree; any fine-tuned variant differs). An adapter or projector is made for one identity.
    """
    import hashlib

    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    config = base.config
    digest = hashlib.sha256()
    for name, param in sorted(base.named_parameters()):
        if "lora_" in name:
            continue
        sample = param.detach().reshape(-1)[:256].to("cpu", torch.bfloat16).view(torch.int16)
        digest.update(name.encode())
        digest.update(sample.numpy().tobytes())
    return {
        "architecture": (getattr(config, "architectures", None) or [type(base).__name__])[0],
        "hidden_size": int(config.hidden_size),
        "num_layers": int(getattr(config, "num_hidden_layers", 0)),
        "vocab_size": int(base.get_input_embeddings().weight.shape[0]),
        "weights": digest.hexdigest()[:16],
    }


# --------------------------------------------------------------------------------------------------
# Trainable parts
# --------------------------------------------------------------------------------------------------


def linear_leaf_names(model: nn.Module) -> list[str]:
    """Sorted last-name components of every ``nn.Linear`` except the output head (LoRA targets)."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    names = {
        name.rsplit(".", 1)[-1] for name, mod in model.named_modules() if isinstance(mod, nn.Linear) and mod is not head
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
    """Greedy answer to a prompt with images (:func:`generate_answers` with one prompt).

    Args:
        model: causal LM (optionally peft-wrapped); put it in eval mode first (dropout).
        tokenizer: the :class:`viq.mllm.chat.ChatTokenizer` that made ``input_ids``.
        input_ids: (L,) prompt ids from :meth:`ChatTokenizer.encode_prompt`.
        image_embeds: per image (n_i, H) projector outputs.
        max_new_tokens: generation budget.

    Returns:
        the decoded answer without special tokens.
    """
    return generate_answers(model, tokenizer, [input_ids], [image_embeds], max_new_tokens=max_new_tokens)[0]


def generate_answers(
    model: nn.Module,
    tokenizer: ChatTokenizer,
    prompts: Sequence[torch.Tensor],
    image_embeds: Sequence[Sequence[torch.Tensor]],
    *,
    max_new_tokens: int | Sequence[int] = 64,
) -> list[str]:
    """Greedy answers to several prompts with images, generated together.

    The prompts (each spliced with its images' projector outputs) are left-padded to the longest, with
    an attention mask, so one ``generate`` call decodes them all: position ids follow the mask, so each
    answer is the one its prompt gets alone, up to the last bits of batched arithmetic. Each stops at
    the chat template's end-of-turn marker or at eos.

    Args:
        model: causal LM (optionally peft-wrapped); put it in eval mode first (dropout).
        tokenizer: the :class:`viq.mllm.chat.ChatTokenizer` that made the prompts.
        prompts: per prompt (L_i,) ids from :meth:`ChatTokenizer.encode_prompt`.
        image_embeds: per prompt, per image (n_i, H) projector outputs.
        max_new_tokens: generation budget, for all prompts or one per prompt (an answer is cut to its
            own budget, as if generated alone).

    Returns:
        one decoded answer per prompt, without special tokens.
    """
    from transformers import GenerationConfig

    if len(prompts) != len(image_embeds):
        raise ValueError(f"{len(prompts)} prompts but {len(image_embeds)} image lists")
    if not prompts:
        return []
    budgets = [max_new_tokens] * len(prompts) if isinstance(max_new_tokens, int) else list(max_new_tokens)
    if len(budgets) != len(prompts) or min(budgets) < 1:
        raise ValueError(f"max_new_tokens: one positive budget per prompt, got {max_new_tokens}")
    embed = model.get_input_embeddings()
    rows = [splice_image_features(embed, ids, None, images)[0] for ids, images in zip(prompts, image_embeds)]
    longest = max(r.shape[0] for r in rows)
    padded = torch.stack([torch.cat([r.new_zeros(longest - r.shape[0], r.shape[1]), r]) for r in rows])
    mask = torch.stack([torch.arange(longest, device=padded.device) >= longest - r.shape[0] for r in rows]).long()
    hf_tok = tokenizer.tokenizer
    eos = model.generation_config.eos_token_id if model.generation_config is not None else None
    eos_ids = set(eos if isinstance(eos, (list, tuple)) else [eos] if eos is not None else [])
    # The end of the assistant's turn as the chat template writes it (ChatML's <|im_end|>), besides eos:
    # a base model's eos (<|endoftext|>) never comes after an answer trained in a chat template.
    eos_ids.update(tokenizer.end_of_turn_ids)
    marker = tokenizer.end_of_turn
    stop_strings = [marker] if marker and len(hf_tok(marker, add_special_tokens=False)["input_ids"]) > 1 else None
    pad = hf_tok.pad_token_id if hf_tok.pad_token_id is not None else min(eos_ids) if eos_ids else 0
    # A fresh config: the checkpoint's sampling defaults (temperature, top_p, ...) do not apply.
    config = GenerationConfig(
        max_new_tokens=max(budgets),
        do_sample=False,
        eos_token_id=sorted(eos_ids) or None,
        pad_token_id=pad,
        stop_strings=stop_strings,
    )
    out = model.generate(
        inputs_embeds=padded,
        attention_mask=mask,
        generation_config=config,
        **({"tokenizer": hf_tok} if stop_strings else {}),
    )
    # With only inputs_embeds, decoder-only generate returns just the new tokens.
    texts = [hf_tok.decode(row[:budget], skip_special_tokens=True) for row, budget in zip(out, budgets)]
    return [t.partition(marker)[0] for t in texts] if stop_strings else texts
