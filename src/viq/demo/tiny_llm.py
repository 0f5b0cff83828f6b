"""A tiny offline chat LLM for tests and CPU demos: random Qwen2 weights, a BPE tokenizer trained here."""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable
from pathlib import Path

import torch

from viq.mllm.chat import CHATML_TEMPLATE

logger = logging.getLogger(__name__)

__all__ = ["build_tiny_llm"]

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
    special_tokens: tuple[str, ...] = _SPECIAL_TOKENS,
    eos_token: str = "<|im_end|>",
    pad_token: str = "<|endoftext|>",
    chat_template: str = CHATML_TEMPLATE,
    embedding_rows: int | None = None,
) -> Path:
    """Write a small random-weight Qwen2 chat model with a freshly trained tokenizer to ``out_dir``.

    The tokenizer is a Qwen2-style byte-level BPE (same split regex, NFC) trained offline on
    ``corpus`` with at most ``vocab_size`` entries (fewer if the corpus has fewer merges), with the
    special tokens ``<|endoftext|>`` (pad), ``<|im_start|>``, ``<|im_end|>`` (eos) and the ChatML
    :data:`viq.mllm.chat.CHATML_TEMPLATE` (default system prompt "You are a helpful assistant."); other
    ``special_tokens``, ``eos_token``, ``pad_token`` and ``chat_template`` make other published layouts
    (:func:`viq.demo.public_checkpoints.qwen2_llm`); ``embedding_rows`` pads the embedding matrix beyond
    the tokenizer, as Qwen2.5's 151,936 rows for 151,665 tokens. The
    model is a ``Qwen2ForCausalLM`` with tied embeddings and the tokenizer's vocabulary size. Both are saved
    with ``save_pretrained`` (a normal HF directory for :func:`viq.mllm.adapters.load_causal_lm`).
    Deterministic for the same corpus and seed; the global RNG state is left unchanged.

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
        special_tokens=list(special_tokens),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    bpe.train_from_iterator(list(corpus), trainer=trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=bpe,
        eos_token=eos_token,
        pad_token=pad_token,
        extra_special_tokens=[t for t in special_tokens if t not in (eos_token, pad_token)],
        model_max_length=max_position_embeddings,
        clean_up_tokenization_spaces=False,
    )
    tokenizer.chat_template = chat_template
    n_vocab = max(len(tokenizer), embedding_rows or 0)
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
