"""Random-weight checkpoints in the formats of the public artifacts a ViQ is trained from.

What a user downloads to train their own ViQ, written here by the real library classes with their
real key layouts and config files, at any width (the published widths by default; tests shrink them,
never the formats), so that every loader of viq can be tried offline on what it will meet:

=====================================  ============================================================
published artifact                     built by
=====================================  ============================================================
``google/siglip2-*-naflex``            :func:`hf_siglip2_naflex`: transformers ``Siglip2Model``
                                       (patch embedding as a Linear over (p, p, C) patches, a 16x16
                                       position table), ``save_pretrained``
``google/siglip2-giant-opt-patch16-    :func:`hf_siglip`: transformers ``SiglipModel`` (conv patch
384`` (fixed resolution)               embedding, a 24x24 table), ``save_pretrained``
``timm/ViT-gopt-16-SigLIP2-384``       :func:`open_clip_siglip`: an open_clip state dict
(``open_clip_pytorch_model.bin``)      (``visual.trunk.*`` in timm's ViT names, ``text.*``,
                                       ``logit_scale``), ``torch.save``
the authors' stage-1 release           :func:`authors_stage1`: the same trunk under the PEFT prefix
(``siglip2_g_anyres_s4.pth``)          ``base_model.model.model.vision_tower.vision_tower.``, a
                                       128x128 table, ``torch.save``
``Qwen/Qwen2.5-*`` (base or instruct)  :func:`qwen2_llm`: transformers ``Qwen2ForCausalLM`` and a
                                       byte-level BPE tokenizer with Qwen's special tokens, its
                                       ChatML template, eos ``<|endoftext|>`` (base) or
                                       ``<|im_end|>`` (instruct), ``generation_config.json``
``Qwen/Qwen-Image`` subfolder ``vae``  :func:`qwen_image_vae`: diffusers ``AutoencoderKLQwenImage``,
                                       ``save_pretrained``
LLaVA-style training data              :func:`colour_square_qa`: JPEG files, a JSONL of LLaVA
(JSON/JSONL, LLaVA-OneVision Parquet)  conversations (every other record with the authors'
                                       ``{"img_path", "resize"}`` form), the same rows as Parquet
                                       with the image bytes inside
=====================================  ============================================================

Everything is deterministic for a seed and leaves the global RNG alone.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from viq.demo.tiny_llm import build_tiny_llm
from viq.mllm.chat import IMAGE_TOKEN

__all__ = [
    "VisionWidths",
    "GIANT_OPT",
    "QWEN25_05B",
    "LLMWidths",
    "QWEN_CHAT_TEMPLATE",
    "hf_siglip2_naflex",
    "hf_siglip",
    "open_clip_siglip",
    "authors_stage1",
    "qwen2_llm",
    "qwen_image_vae",
    "hub_cache_entry",
    "COLOURS",
    "colour_square_qa",
]


@dataclass(frozen=True)
class VisionWidths:
    """A SigLIP vision tower's widths (giant-opt by default, with 2 of its 40 layers)."""

    hidden: int = 1536
    heads: int = 16
    mlp: int = 6144
    layers: int = 2
    patch: int = 16


@dataclass(frozen=True)
class LLMWidths:
    """A Qwen2 causal LM's widths (Qwen2.5-0.5B by default, with 2 of its 24 layers)."""

    hidden: int = 896
    heads: int = 14
    kv_heads: int = 2
    intermediate: int = 4864
    layers: int = 2


GIANT_OPT = VisionWidths()
QWEN25_05B = LLMWidths()

#: Qwen2.5's chat template (the text part of the published one: no tools), with its own default
#: system prompt -- not the official ViQ recipe's "You are a helpful assistant.".
QWEN_CHAT_TEMPLATE = (
    "{%- if messages[0]['role'] == 'system' %}"
    "{{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}"
    "{%- else %}"
    "{{- '<|im_start|>system\\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- for message in messages %}"
    "{%- if (message.role == 'user') or (message.role == 'system' and not loop.first) or (message.role == 'assistant') %}"
    "{{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>' + '\\n' }}"
    "{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)
#: Qwen2's special tokens, in their published order (ids follow the vocabulary).
_QWEN_SPECIAL = (
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|object_ref_start|>",
    "<|object_ref_end|>",
    "<|box_start|>",
    "<|box_end|>",
    "<|quad_start|>",
    "<|quad_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|vision_pad|>",
    "<|image_pad|>",
    "<|video_pad|>",
)


def _seeded(seed: int):
    rng = torch.random.fork_rng(devices=[])
    rng.__enter__()
    torch.manual_seed(seed)
    return rng


def _text_config(width: int) -> dict:
    # The text tower is not used by viq: keep it small whatever the vision widths.
    return {
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 1,
        "num_attention_heads": 2,
        "vocab_size": 128,
        "max_position_embeddings": 16,
        "projection_size": width,
        "pad_token_id": 0,
        "bos_token_id": 1,
        "eos_token_id": 2,
    }


def _vision_config(w: VisionWidths) -> dict:
    return {
        "hidden_size": w.hidden,
        "intermediate_size": w.mlp,
        "num_hidden_layers": w.layers,
        "num_attention_heads": w.heads,
        "patch_size": w.patch,
        "hidden_act": "gelu_pytorch_tanh",
        "layer_norm_eps": 1e-6,
    }


def hf_siglip2_naflex(
    out: str | os.PathLike, widths: VisionWidths = GIANT_OPT, *, num_patches: int = 256, seed: int = 0
) -> Path:
    """A transformers ``Siglip2Model`` (NaFlex: ``num_patches`` positions, a 16x16 table by default)."""
    from transformers import Siglip2Config, Siglip2Model

    config = Siglip2Config(
        text_config=_text_config(widths.hidden), vision_config={**_vision_config(widths), "num_patches": num_patches}
    )
    rng = _seeded(seed)
    try:
        model = Siglip2Model(config).eval()
    finally:
        rng.__exit__(None, None, None)
    model.save_pretrained(out)
    return Path(out)


def hf_siglip(
    out: str | os.PathLike, widths: VisionWidths = GIANT_OPT, *, image_size: int = 384, seed: int = 0
) -> Path:
    """A transformers ``SiglipModel`` at a fixed resolution (``image_size``: a (size/p)^2 table)."""
    from transformers import SiglipConfig, SiglipModel

    text = _text_config(widths.hidden)
    text.pop("projection_size")
    config = SiglipConfig(text_config=text, vision_config={**_vision_config(widths), "image_size": image_size})
    rng = _seeded(seed)
    try:
        model = SiglipModel(config).eval()
    finally:
        rng.__exit__(None, None, None)
    model.save_pretrained(out)
    return Path(out)


def _timm_trunk(widths: VisionWidths, grid: int, seed: int) -> dict[str, torch.Tensor]:
    """A timm ``VisionTransformer`` state dict (no class token, MAP head ``attn_pool``), random."""
    c, m = widths.hidden, widths.mlp
    g = torch.Generator().manual_seed(seed)

    def rand(*shape: int, std: float = 0.02) -> torch.Tensor:
        return torch.randn(*shape, generator=g) * std

    state = {
        "patch_embed.proj.weight": rand(c, 3, widths.patch, widths.patch),
        "patch_embed.proj.bias": rand(c),
        "pos_embed": rand(1, grid * grid, c),
    }
    for i in range(widths.layers):
        b = f"blocks.{i}."
        state.update(
            {
                b + "norm1.weight": 1 + rand(c),
                b + "norm1.bias": rand(c),
                b + "attn.qkv.weight": rand(3 * c, c),
                b + "attn.qkv.bias": rand(3 * c),
                b + "attn.proj.weight": rand(c, c),
                b + "attn.proj.bias": rand(c),
                b + "norm2.weight": 1 + rand(c),
                b + "norm2.bias": rand(c),
                b + "mlp.fc1.weight": rand(m, c),
                b + "mlp.fc1.bias": rand(m),
                b + "mlp.fc2.weight": rand(c, m),
                b + "mlp.fc2.bias": rand(c),
            }
        )
    state.update(
        {
            "norm.weight": 1 + rand(c),
            "norm.bias": rand(c),
            "attn_pool.latent": rand(1, 1, c),
            "attn_pool.q.weight": rand(c, c),
            "attn_pool.q.bias": rand(c),
            "attn_pool.kv.weight": rand(2 * c, c),
            "attn_pool.kv.bias": rand(2 * c),
            "attn_pool.proj.weight": rand(c, c),
            "attn_pool.proj.bias": rand(c),
            "attn_pool.norm.weight": 1 + rand(c),
            "attn_pool.norm.bias": rand(c),
            "attn_pool.mlp.fc1.weight": rand(m, c),
            "attn_pool.mlp.fc1.bias": rand(m),
            "attn_pool.mlp.fc2.weight": rand(c, m),
            "attn_pool.mlp.fc2.bias": rand(c),
        }
    )
    return state


def open_clip_siglip(
    out: str | os.PathLike, widths: VisionWidths = GIANT_OPT, *, image_size: int = 384, seed: int = 0
) -> Path:
    """``open_clip_pytorch_model.bin`` of an open_clip SigLIP2 model (``timm/ViT-gopt-16-SigLIP2-384``):
    the vision trunk under ``visual.trunk.``, a text tower under ``text.``, ``logit_scale`` / ``logit_bias``."""
    trunk = _timm_trunk(widths, image_size // widths.patch, seed)
    state = {"visual.trunk." + k: v for k, v in trunk.items()}
    state.update(
        {
            "text.token_embedding.weight": torch.zeros(64, 32),
            "text.positional_embedding": torch.zeros(16, 32),
            "text.ln_final.weight": torch.ones(32),
            "text.ln_final.bias": torch.zeros(32),
            "text.text_projection.weight": torch.zeros(widths.hidden, 32),
            "logit_scale": torch.tensor([4.6]),
            "logit_bias": torch.tensor([-16.0]),
        }
    )
    path = Path(out)
    path.mkdir(parents=True, exist_ok=True)
    torch.save(state, path / "open_clip_pytorch_model.bin")
    return path / "open_clip_pytorch_model.bin"


#: The prefix of the authors' training layout (a PEFT-wrapped LLaVA model's vision tower).
AUTHORS_PREFIX = "base_model.model.model.vision_tower.vision_tower."


def authors_stage1(
    out: str | os.PathLike, widths: VisionWidths = GIANT_OPT, *, pos_grid: int = 128, seed: int = 0
) -> Path:
    """``siglip2_g_anyres_s4.pth``-style file: the any-resolution trunk (a ``pos_grid``^2 table) under
    :data:`AUTHORS_PREFIX`, with the teacher's keys and an LPIPS leftover beside it (both ignored)."""
    trunk = _timm_trunk(widths, pos_grid, seed)
    state = {AUTHORS_PREFIX + k: v for k, v in trunk.items()}
    state["base_model.model.model.vision_tower.vision_tower_teacher.pos_embed"] = torch.zeros(1, 4, widths.hidden)
    state[AUTHORS_PREFIX + "perceptual_loss.net.weight"] = torch.zeros(2)
    path = Path(out)
    path.mkdir(parents=True, exist_ok=True)
    torch.save(state, path / "siglip2_g_anyres_s4.pth")
    return path / "siglip2_g_anyres_s4.pth"


def qwen2_llm(
    out: str | os.PathLike,
    corpus: Iterable[str],
    widths: LLMWidths = QWEN25_05B,
    *,
    instruct: bool = False,
    vocab_size: int = 600,
    embedding_rows: int | None = None,
    seed: int = 0,
) -> Path:
    """A Qwen2.5-style causal LM directory: ``Qwen2ForCausalLM`` (tied embeddings, as the small Qwen2.5
    models), a Qwen2 byte-level BPE tokenizer trained on ``corpus`` with Qwen's special tokens,
    :data:`QWEN_CHAT_TEMPLATE`, and the published eos rule: base models end text with
    ``<|endoftext|>`` (tokenizer and ``generation_config.json``), instruct models with ``<|im_end|>``.
    The vocabulary is small (``vocab_size``); its format is Qwen's. ``embedding_rows``: the embedding
    matrix's rows (Qwen2.5: 151,936 for 0.5B-3B, 152,064 for 7B), default the tokenizer's size."""
    from transformers import GenerationConfig

    path = build_tiny_llm(
        out,
        corpus,
        vocab_size=vocab_size,
        hidden_size=widths.hidden,
        num_layers=widths.layers,
        num_heads=widths.heads,
        num_kv_heads=widths.kv_heads,
        intermediate_size=widths.intermediate,
        max_position_embeddings=32768,
        seed=seed,
        special_tokens=_QWEN_SPECIAL,
        eos_token="<|im_end|>" if instruct else "<|endoftext|>",
        pad_token="<|endoftext|>",
        chat_template=QWEN_CHAT_TEMPLATE,
        embedding_rows=embedding_rows,
    )
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(path)
    endoftext, im_end = (tok.convert_tokens_to_ids(t) for t in ("<|endoftext|>", "<|im_end|>"))
    generation = GenerationConfig(
        bos_token_id=endoftext,
        eos_token_id=[im_end, endoftext] if instruct else endoftext,
        pad_token_id=endoftext,
        do_sample=False,
        max_new_tokens=2048,
    )
    generation.save_pretrained(path)
    return path


def qwen_image_vae(out: str | os.PathLike, *, base_dim: int = 96, seed: int = 0) -> Path:
    """diffusers ``AutoencoderKLQwenImage`` (the Qwen-Image VAE's class and config; ``base_dim`` 96 is
    the published width), saved with ``save_pretrained`` (``config.json`` +
    ``diffusion_pytorch_model.safetensors``)."""
    from diffusers import AutoencoderKLQwenImage

    rng = _seeded(seed)
    try:
        vae: Any = AutoencoderKLQwenImage(base_dim=base_dim)  # Any: diffusers' lazy module has no types
        vae.eval()
    finally:
        rng.__exit__(None, None, None)
    vae.save_pretrained(out)
    return Path(out)


def hub_cache_entry(
    cache: str | os.PathLike,
    repo_id: str,
    files_from: str | os.PathLike,
    *,
    subfolder: str = "",
    revision: str = "0" * 40,
) -> Path:
    """Lay out ``files_from`` as ``repo_id`` (in ``subfolder``) in a Hugging Face hub cache, as
    ``hf download`` leaves it (``models--owner--name/snapshots/<rev>/``, ``refs/main``), so that Hub ids
    resolve offline. Returns the snapshot folder."""
    import shutil

    repo = Path(cache) / ("models--" + repo_id.replace("/", "--"))
    snapshot = repo / "snapshots" / revision
    target = snapshot / subfolder if subfolder else snapshot
    shutil.copytree(files_from, target, dirs_exist_ok=True)
    (repo / "refs").mkdir(parents=True, exist_ok=True)
    (repo / "refs" / "main").write_text(revision)
    return snapshot


#: The answers of :func:`colour_square_qa` and the RGB each is drawn in.
COLOURS = {"red": (220, 30, 30), "blue": (30, 60, 220), "green": (30, 180, 60), "yellow": (230, 210, 40)}


def colour_square_qa(
    root: str | os.PathLike,
    n: int,
    *,
    sizes: Iterable[tuple[int, int]] = ((256, 384), (384, 256), (320, 320), (288, 448)),
    square: tuple[int, int] = (20, 120),
    resize: str = "384x32",
    parquet_row_group: int = 3,
) -> dict[str, Path]:
    """``n`` "What color is the square?" conversations in the published data formats, under ``root``.

    Image ``i`` is ``sizes[i % len(sizes)]`` (H, W) of light noise with a square of
    ``COLOURS[answer]`` from pixel ``square[0]`` to ``square[1]``, saved as ``images/<i>.jpg``. Every
    other record names its image in the authors' form ``{"img_path": ..., "resize": resize}``.

    Returns ``{"jsonl", "parquet", "folder", "root"}``: ``train.jsonl``, ``ov.parquet`` (LLaVA-OneVision
    style: ``id``, ``conversations``, ``image`` = ``{"bytes", "path"}``) and the image folder.
    """
    import json

    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq
    from PIL import Image

    root = Path(root)
    (root / "images").mkdir(parents=True, exist_ok=True)
    sizes = list(sizes)
    a, b = square
    records = []
    for i in range(n):
        h, w = sizes[i % len(sizes)]
        img = np.random.default_rng(i).integers(190, 250, (h, w, 3), dtype=np.uint8)
        colour = list(COLOURS)[i % len(COLOURS)]
        img[a:b, a:b] = COLOURS[colour]
        Image.fromarray(img).save(root / "images" / f"{i}.jpg", quality=92)
        image = {"img_path": f"images/{i}.jpg", "resize": resize} if i % 2 == 0 else f"images/{i}.jpg"
        records.append(
            {
                "id": f"s{i}",
                "image": image,
                "conversations": [
                    {"from": "human", "value": f"{IMAGE_TOKEN}\nWhat color is the square?"},
                    {"from": "gpt", "value": colour},
                ],
            }
        )
    jsonl = root / "train.jsonl"
    jsonl.write_text("".join(json.dumps(r) + "\n" for r in records))
    parquet = root / "ov.parquet"
    pq.write_table(
        pa.table(
            {
                "id": [r["id"] for r in records],
                "conversations": [r["conversations"] for r in records],
                "image": [{"bytes": (root / "images" / f"{i}.jpg").read_bytes(), "path": None} for i in range(n)],
            }
        ),
        parquet,
        row_group_size=parquet_row_group,
    )
    return {"jsonl": jsonl, "parquet": parquet, "folder": root / "images", "root": root}
