"""The chat model: a ViQ network (from pixels or from codes) + the MM projector + a causal LM, answering
questions about images -- what ``LlavaForConditionalGeneration`` is to transformers, for ViQ.

::

    from viq.mllm.model import ViQForConditionalGeneration

    model = ViQForConditionalGeneration.from_pretrained("runs/stage2_2")     # any stage output with an LLM
    model.answer("photo.png", "What color is the square?")                   # -> "red"
    model.generate([[{"role": "user", "content": "<image>\\nWhat is it?"}]], images=[[pixels]])
    model.save_pretrained("my-chat-model")                                    # the same folder layout

On disk it is a stage output folder (what ``viq train`` and ``viq train-mllm`` write as ``final/``)::

    config.json, model.safetensors   the ViQ network (viq format)
    projector.safetensors            the MM projector
    llm/                             the LLM's trained part: a peft adapter or the whole LLM (none: frozen)
    stage.json                       the recipe (its ``llm.path`` names the base LLM), the files and sizes

:data:`STAGE_FILE`, :data:`PROJECTOR_WEIGHTS` and :data:`LLM_DIR` are the one spelling of those names
(training writes them, :mod:`viq.train.output`).

Where image features come from is a property of the saved network: an encoder with a code head and its
``dequant`` part gives dequantised features (stages 2-1, 2-2); an encoder alone, the trunk's features
(stage 1); an ``embedder`` without an encoder reads codes (the MLLM stage), and the model then carries
the ViQ encoder of its recipe (``model.init``) to turn images into codes.
"""

from __future__ import annotations

import copy
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, cast

import torch
from torch import nn

import viq
from viq._faults import fault_point
from viq._io import fsync_tree, remove_tree, replace_dir, writing
from viq._untrusted import read_json
from viq.formats.image import PreprocessConfig, scheduled_max_pixels
from viq.mllm.adapters import load_causal_lm
from viq.mllm.chat import ChatTokenizer
from viq.mllm.generation import answer_question, generate_replies
from viq.mllm.projector import MMProjector
from viq.model.hub import parse_hub_id, resolve
from viq.model.parts import parts_in
from viq.model.viq import ViQModel
from viq.model.weights import safetensors_index

__all__ = [
    "ViQForConditionalGeneration",
    "STAGE_FILE",
    "PROJECTOR_WEIGHTS",
    "LLM_DIR",
    "find_final",
    "recipe_preprocess",
]

STAGE_FILE = "stage.json"
PROJECTOR_WEIGHTS = "projector.safetensors"
LLM_DIR = "llm"
#: Parts of the ViQ network the chat model never uses (kept out of memory when loading).
_UNUSED_PARTS = ("recon", "drawer", "vae")


def find_final(run: str | os.PathLike[str]) -> Path:
    """The ``final/`` output of a training run: ``run`` itself when it holds ``stage.json``, else
    ``run/final``. FileNotFoundError otherwise."""
    path = Path(run)
    for candidate in (path, path / "final"):
        if (candidate / STAGE_FILE).is_file():
            return candidate
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such run directory")
    raise FileNotFoundError(f"{path}: not a training run (no {STAGE_FILE} in it or in its final/ folder)")


def recipe_preprocess(recipe: dict[str, Any]) -> PreprocessConfig:
    """The image preprocessing of a recipe (as ``stage.json`` records it) at the end of its training,
    the progressive-resolution schedule included: what the run's model last saw."""
    data = recipe.get("data") or {}
    defaults = PreprocessConfig()
    max_pixels = scheduled_max_pixels(
        data.get("max_pixels", defaults.max_pixels),
        data.get("resolution_schedule") or [],
        (recipe.get("train") or {}).get("max_steps", 0),
    )
    return PreprocessConfig(min_pixels=data.get("min_pixels", defaults.min_pixels), max_pixels=max_pixels)


class ViQForConditionalGeneration(nn.Module):
    """A ViQ network + MM projector + causal LM + chat tokenizer, answering questions about images.

    Args:
        vision: the ViQ network (:class:`viq.model.viq.ViQModel`): features from pixels
            (:meth:`encode_features`) or from codes (:meth:`embed_codes`).
        projector: :class:`viq.mllm.projector.MMProjector`, vision width -> the LLM's hidden size.
        llm: a Hugging Face causal LM (a ``peft`` model for adapters).
        tokenizer: :class:`viq.mllm.chat.ChatTokenizer`.
        image_encoder: for a network that reads codes: the ViQ model that encodes images into codes.
        preprocess: how images are sized before encoding (default: the library's).
        record: what ``stage.json`` says (recipe, LLM), written back by :meth:`save_pretrained`.
    """

    def __init__(
        self,
        vision: nn.Module,
        projector: nn.Module,
        llm: nn.Module,
        tokenizer: Any,
        *,
        image_encoder: nn.Module | None = None,
        preprocess: PreprocessConfig | None = None,
        record: dict[str, Any] | None = None,
    ) -> None:
        super().__init__()
        self.vision, self.projector, self.llm = vision, projector, llm
        self.tokenizer = tokenizer
        # A plain attribute, not a submodule: it belongs to the model the codes came from.
        self.__dict__["image_encoder"] = image_encoder
        self.preprocess = preprocess or PreprocessConfig(patch_size=vision.patch_size)
        self.record = record or {}

    # ------------------------------------------------------------------ what it reads
    @property
    def reads_codes(self) -> bool:
        """Whether the network reads stored codes (the MLLM stage) rather than pixels."""
        return self.vision.encoder is None

    @property
    def stage(self) -> str | None:
        return self.record.get("stage")

    @property
    def encoder(self) -> nn.Module | None:  # the pixel path, as the generation code asks for it
        return cast("nn.Module | None", self.vision.encoder)

    def encode_features(self, pixels: Sequence[torch.Tensor], **kwargs: Any):
        """Pixels -> the network's image features (:meth:`viq.model.viq.ViQModel.encode_features`)."""
        return self.vision.encode_features(pixels, **kwargs)

    def embed_codes(self, codes: Sequence[Any]):
        """Codes -> the embedder's features and grids (:meth:`viq.model.viq.ViQModel.embed_codes`)."""
        return self.vision.embed_codes(codes)

    # ------------------------------------------------------------------ answering
    @torch.no_grad()
    def generate(
        self,
        conversations: list[list[dict]],
        *,
        images: list[list[torch.Tensor]] | None = None,
        codes: list[list[Any]] | None = None,
        max_new_tokens: int | list[int] = 64,
    ) -> list[str]:
        """Greedy replies to the last user turn of each conversation (chat messages with one ``<image>``
        placeholder per image), seeing per conversation its ``images`` (``(3, H, W)`` pixels in [-1, 1])
        or its ``codes`` (:class:`viq.formats.codes.Codes`, for a network that reads codes).
        ``max_new_tokens``: one budget, or one per conversation."""

        n = len(conversations)
        if codes is None and self.reads_codes and images is not None:
            codes = [self.to_codes(xs) for xs in images]
        budgets = list(max_new_tokens) if isinstance(max_new_tokens, (list, tuple)) else [int(max_new_tokens)] * n
        return generate_replies(
            self,
            self.tokenizer,
            conversations,
            images or [[] for _ in range(n)],
            self.device,
            codes=codes,
            max_new_tokens=budgets,
        )

    def to_codes(self, pixels: Sequence[torch.Tensor]) -> list[Any]:
        """Images -> codes with :attr:`image_encoder` (a network that reads codes)."""
        if self.image_encoder is None:
            raise ValueError("this model reads codes: it needs image_encoder (a ViQ model) to encode images")
        return self.image_encoder.encode_pixels([x.to(self.image_encoder.device) for x in pixels])

    def answer(self, image: Any, question: str, *, max_new_tokens: int = 64) -> str:
        """The greedy answer to ``question`` about ``image`` (a source :func:`viq.formats.image.preprocess`
        reads, or a list of them), sized by :attr:`preprocess`; ``<image>`` placeholders in the question
        are optional (default: the images first, :func:`viq.mllm.generation.question_messages`)."""

        return answer_question(
            self,
            self.tokenizer,
            image,
            question,
            preprocess=self.preprocess,
            device=self.device,
            encoder=self.image_encoder,
            max_new_tokens=max_new_tokens,
        )

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    # ------------------------------------------------------------------ persistence
    @classmethod
    def from_pretrained(
        cls, path: str | os.PathLike[str], *, device: torch.device | str = "cpu"
    ) -> ViQForConditionalGeneration:
        """Load a stage output with an LLM (``stage1``, ``stage2_1``, ``stage2_2``, ``mllm``; a run folder
        or its ``final/``), or a folder :meth:`save_pretrained` wrote. The base LLM is the recipe's
        ``llm.path`` (a local folder or a cached Hub id); the LLM's trained part is ``llm/``.

        Raises FileNotFoundError (not a run; the LLM or, for a network that reads codes, the recipe's
        encoder is gone) or ValueError (no LLM in the run; an unreadable ``stage.json``)."""
        from safetensors.torch import load_file

        final = find_final(path)
        try:
            record = read_json(final / STAGE_FILE)
            recipe = copy.deepcopy(record["recipe"])
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise ValueError(f"{final / STAGE_FILE}: unreadable stage record ({e})") from None
        llm_recipe = recipe.get("llm") or {}
        llm_path = llm_recipe.get("path")
        if not llm_path or not (final / PROJECTOR_WEIGHTS).is_file():
            raise ValueError(
                f"{final}: a {record.get('stage')} output has no LLM to answer questions "
                f"(no llm.path in its recipe, or no {PROJECTOR_WEIGHTS})"
            )
        if not Path(llm_path).exists() and parse_hub_id(llm_path) is None:
            raise FileNotFoundError(f"{final}: the run's LLM {llm_path} (llm.path of its recipe) is not found")
        device = torch.device(device)

        keys, _ = safetensors_index(final / "model.safetensors")
        vision = ViQModel.from_pretrained(
            final, device=device, parts=[p for p in parts_in(keys) if p not in _UNUSED_PARTS]
        )
        dtype = getattr(torch, llm_recipe.get("dtype", "float32"))
        llm, hf_tokenizer = load_causal_lm(
            resolve(llm_path, what="LLM"), dtype=dtype, attn_implementation=llm_recipe.get("attention", "sdpa")
        )
        adapter = final / LLM_DIR
        if (adapter / "adapter_config.json").is_file():
            from peft import PeftModel

            llm = PeftModel.from_pretrained(llm, str(adapter))
        elif (adapter / "model.safetensors").is_file():
            state = load_file(str(adapter / "model.safetensors"))
            missing, unexpected = llm.load_state_dict(state, strict=False)
            tied = (
                {k for k in missing if k.endswith("lm_head.weight")}
                if getattr(llm.config, "tie_word_embeddings", False)
                else set()
            )
            if unexpected or set(missing) - tied:
                raise ValueError(
                    f"{adapter / 'model.safetensors'}: does not fit the LLM {llm_path} "
                    f"(missing {sorted(set(missing) - tied)[:4]}, unexpected {sorted(unexpected)[:4]})"
                )
        tokenizer = ChatTokenizer(hf_tokenizer, system_prompt=llm_recipe.get("system_prompt"))
        projector = MMProjector(vision.config.width, llm.config.hidden_size)
        projector.load_state_dict(load_file(str(final / PROJECTOR_WEIGHTS)), strict=True)

        image_encoder = None
        if vision.encoder is None:
            kind, _, value = (recipe.get("model") or {}).get("init", "").partition(":")
            if kind != "viq" or not (Path(value).is_dir() or parse_hub_id(value) is not None):
                raise FileNotFoundError(
                    f"{final}: a network that reads codes; its encoder (model.init "
                    f"{kind}:{value} of the recipe) is needed to encode images and is not found"
                )
            image_encoder = viq.load(value, device=device, components=("encoder",)).eval()
        model = cls(
            vision,
            projector.to(device),
            llm.to(device),
            tokenizer,
            image_encoder=image_encoder,
            preprocess=recipe_preprocess(recipe),
            record=record,
        )
        return model.eval()

    def save_pretrained(self, directory: str | os.PathLike[str]) -> None:
        """Write the folder :meth:`from_pretrained` reads (the stage output layout), complete or absent."""

        def write_files(tmp: Path) -> dict[str, Any]:
            self.vision.save_pretrained(tmp)
            frozen = (self.record.get("llm") or {}).get("mode", "full") == "frozen"
            write_language_side(tmp, self.projector, self.llm, frozen=frozen)
            return {k: v for k, v in self.record.items() if k != "files"}

        write_output_folder(Path(directory), write_files)


def write_language_side(directory: Path, projector: nn.Module | None, llm: nn.Module | None, *, frozen: bool) -> None:
    """The language side of a stage output into ``directory``: ``projector.safetensors``, and ``llm/``: the
    adapter as peft saves it, or (unless ``frozen``) the whole LLM as one safetensors file."""
    from safetensors.torch import save_file

    if projector is not None:
        save_file(
            {k: v.detach().cpu().contiguous() for k, v in projector.state_dict().items()},
            str(directory / PROJECTOR_WEIGHTS),
        )
    if llm is None or frozen:
        return
    if hasattr(llm, "peft_config"):
        llm.save_pretrained(str(directory / LLM_DIR))
    else:
        (directory / LLM_DIR).mkdir(parents=True, exist_ok=True)
        # clone: tied embeddings share storage, which safetensors refuses to write twice
        save_file(
            {k: v.detach().cpu().clone() for k, v in llm.state_dict().items()},
            str(directory / LLM_DIR / "model.safetensors"),
        )


def write_output_folder(directory: Path, write_files: Callable[[Path], dict[str, Any]]) -> None:
    """Write a stage output folder complete or absent: ``write_files(tmp)`` fills a hidden temporary folder
    beside ``directory`` and returns the ``stage.json`` record; the size of every file is added to it
    (``files``, what a later stage checks), then the folder is fsynced and takes ``directory``'s place
    (:func:`viq._io.replace_dir`). Any failure removes the temporary folder; a full disk is one OSError."""
    import json

    tmp = directory.with_name(f".{directory.name}.tmp")
    try:
        with writing(tmp):
            remove_tree(tmp)
            tmp.mkdir(parents=True)
            record = write_files(tmp)
            fault_point("final.write")
            record["files"] = {
                p.relative_to(tmp).as_posix(): p.stat().st_size for p in sorted(tmp.rglob("*")) if p.is_file()
            }
            (tmp / STAGE_FILE).write_text(json.dumps(record, indent=2))
            fsync_tree(tmp)
            fault_point("final.written")
            replace_dir(tmp, directory)
    except BaseException:
        remove_tree(tmp)
        raise
