"""Ask a trained run about an image: load the run once, answer any number of questions.

::

    from viq.eval.ask import Asker, ask

    asker = Asker.from_run("runs/stage2_2")            # a run folder or its final/ folder
    asker.ask("photo.png", "What color is the square?")  # -> "red"
    ask("runs/stage1", "photo.png", "How many circles?", max_new_tokens=16)  # one-off (loads each call)

Answers come from the same path as validation and ``viq eval-qa``: the run's model from
:class:`viq.mllm.model.ViQForConditionalGeneration`, the image preprocessed as the run's recipe did at
the end of training (``model.preprocess``), and greedy generation by
:func:`viq.mllm.generation.generate_reply`. Asked with the budget of ``eval-qa``
(:func:`viq.mllm.generation.answer_budget` of the reference answer), the answer is the one ``eval-qa``
records; a larger budget lets a greedy answer run on past it.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import torch

from viq.eval.qa import load_run
from viq.formats.image import PreprocessConfig
from viq.mllm.generation import answer_question, question_messages

__all__ = ["Asker", "ask"]


class Asker:
    """A chat model (:class:`viq.mllm.model.ViQForConditionalGeneration`, or a training stage's model with
    its projector and LLM) ready to answer questions about images.

    Args:
        model, tokenizer: the chat model and its chat tokenizer (``model.tokenizer``).
        preprocess: :class:`viq.formats.image.PreprocessConfig` (default: the run's, when the model
            carries its recipe, else the library default).
        The model is put in eval mode.
        encoder: for stages that read codes (``mllm``): the ViQ model that encodes images (default:
            ``model.image_encoder``).
    """

    def __init__(self, model, tokenizer, *, preprocess=None, encoder=None) -> None:

        if getattr(model, "llm", None) is None or getattr(model, "projector", None) is None or tokenizer is None:
            raise ValueError("asking needs a stage model with its projector, LLM and tokenizer")
        self.model, self.tokenizer = model, tokenizer
        self.preprocess = preprocess or getattr(model, "preprocess", None) or PreprocessConfig()
        self.encoder = encoder if encoder is not None else getattr(model, "image_encoder", None)
        if getattr(model, "encoder", None) is None and self.encoder is None:
            raise ValueError("this stage model answers from codes: pass encoder= (a ViQ model) to encode the images")
        self.device = next(model.parameters()).device
        model.eval()  # dropout off: greedy answers are deterministic

    @classmethod
    def from_run(cls, run: str | os.PathLike[str], device: torch.device | str | None = None) -> Asker:
        """Load a training run (its output folder or ``final/``) once, as
        :class:`viq.mllm.model.ViQForConditionalGeneration` (see there for what it raises)."""

        model, tokenizer = load_run(run, device)
        return cls(model, tokenizer)

    @property
    def stage(self) -> str:
        return self.model.stage

    def messages(self, question: str, num_images: int = 1) -> list[dict[str, str]]:
        """The chat of one question: a user turn with ``num_images`` ``<image>`` placeholders in front
        of the question (the LLaVA convention: ``"<image>\\nquestion"``), unless the question places
        them itself."""

        return question_messages(question, num_images)

    @torch.no_grad()
    def ask(self, image: Any | Sequence[Any], question: str, *, max_new_tokens: int = 64) -> str:
        """The model's greedy answer to ``question`` about ``image``.

        Args:
            image: an image file path, encoded bytes, a PIL image or an ``(H, W, 3)`` uint8 array
                (anything :func:`viq.formats.image.load_image` reads), or a list of them.
            question: the question; ``<image>`` placeholders are optional (default: the images first).
            max_new_tokens: the generation budget (tokens).

        Raises:
            viq.formats.image.ImageError: an unreadable image.
            ValueError: an empty question, placeholders that do not match the images, a budget < 1.
        """

        return answer_question(
            self.model,
            self.tokenizer,
            image,
            question,
            preprocess=self.preprocess,
            device=self.device,
            encoder=self.encoder,
            max_new_tokens=max_new_tokens,
        )


def ask(
    run: str | os.PathLike[str],
    image: Any | Sequence[Any],
    question: str,
    *,
    max_new_tokens: int = 64,
    device: torch.device | str | None = None,
) -> str:
    """Load ``run`` and answer one question about ``image`` (:meth:`Asker.ask`). To ask several
    questions, load once with :meth:`Asker.from_run`."""
    return Asker.from_run(run, device).ask(image, question, max_new_tokens=max_new_tokens)
