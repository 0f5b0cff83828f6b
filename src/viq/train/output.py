"""A stage's output folder (``OUTPUT_DIR/final``): its layout, writing it whole or not at all, checking it.

::

    final/
      config.json, model.safetensors   the ViQ model (viq format; viq.load reads it once it has an FSQ head)
      projector.safetensors            the MM projector (stages with an LLM)
      llm/                             the LLM's trained part: a peft adapter, or the whole LLM (full mode)
      teacher.safetensors              the distillation teacher, written by the stage that chose it
      stage.json                       the recipe, the teacher, the LLM it was made for, every file's size

The next stage names it as ``model.init: viq:OUTPUT_DIR/final``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from viq._untrusted import read_json

# the chat model's folder layout: a stage output with an LLM is what ViQForConditionalGeneration loads
from viq.mllm.model import LLM_DIR, PROJECTOR_WEIGHTS, STAGE_FILE, write_language_side, write_output_folder
from viq.model.viq import CONFIG_NAME as VIQ_CONFIG  # the one spelling of a model folder's files
from viq.model.viq import WEIGHTS_NAME as VIQ_WEIGHTS
from viq.train.config import TrainConfig
from viq.train.model import TrainModel

__all__ = [
    "save_stage_output",
    "check_stage_output",
    "language_record",
    "VIQ_CONFIG",
    "VIQ_WEIGHTS",
    "TEACHER_WEIGHTS",
    "STAGE_FILE",
    "PROJECTOR_WEIGHTS",
    "LLM_DIR",
]

#: the distillation teacher's encoder, written by the stage that chose it (see viq.train.build.setup_teacher)
TEACHER_WEIGHTS = "teacher.safetensors"


def language_record(cfg: TrainConfig, identity: dict[str, Any] | None) -> dict[str, Any] | None:
    """What a stage output's ``stage.json`` says of its language side (None: it has none)."""
    if identity is None:
        return None
    return {
        "path": cfg.llm.path,
        "mode": cfg.llm.mode,
        "identity": identity,
        "lora": {"r": cfg.llm.lora_r, "alpha": cfg.llm.lora_alpha, "dora": cfg.llm.mode == "dora"},
    }


def save_stage_output(model: TrainModel, directory: Path, cfg: TrainConfig) -> None:
    """Write a stage's result: ``config.json`` + ``model.safetensors`` (viq key names, loadable by
    the next stage and, once it has an FSQ head, by ``viq.load``), the projector and the LLM side,
    and ``stage.json`` (the recipe, the teacher, the LLM, and the size of every file).

    Complete or absent: everything is written into a hidden temporary folder beside ``directory``,
    fsynced, and then takes its place (:func:`viq._io.replace_dir`); a failed write removes the
    temporary folder. A stage that starts from an output checks its files against ``stage.json``
    (:func:`check_stage_output`)."""
    write_output_folder(directory, lambda tmp: _write_stage_files(model, tmp, directory, cfg))


def check_stage_output(directory: Path) -> None:
    """Stop, naming the file, when a stage output lacks a file its ``stage.json`` lists or holds a
    shorter one (an output copied or written in part). Outputs without the list are not checked."""
    stage = directory / STAGE_FILE
    if not stage.is_file():
        return
    try:
        files = read_json(stage).get("files")
    except (ValueError, UnicodeDecodeError) as e:
        raise ValueError(f"{stage}: unreadable ({e}); the output is incomplete") from None
    for name, size in (files or {}).items():
        path = directory / name
        if not path.is_file():
            raise FileNotFoundError(
                f"{path}: missing from the stage output {directory} (its stage.json lists it): "
                f"the output is incomplete; re-run the stage that wrote it"
            )
        if path.stat().st_size != size:
            raise ValueError(
                f"{path}: {path.stat().st_size} bytes, its stage.json says {size}: the output "
                f"{directory} is damaged; re-run the stage that wrote it"
            )


def _write_stage_files(model: TrainModel, directory: Path, final: Path, cfg: TrainConfig) -> dict[str, Any]:
    """The files of a stage output but ``stage.json``, written into ``directory`` (which becomes ``final``);
    returns what ``stage.json`` says of them."""
    from safetensors.torch import save_file

    # The network as viq.load reads it: exactly what the inference model saves (one class, one writer).
    model.inference_model().save_pretrained(directory)
    write_language_side(directory, model.projector, model.llm, frozen=cfg.llm.mode == "frozen")
    record = model.teacher_record
    if record is not None and record["weights"] is None and model.teacher is not None:
        # This stage chose the teacher: its encoder travels with the output, for every later stage.
        teacher_state = {k: v.detach().cpu().contiguous() for k, v in model.teacher.state_dict().items()}
        save_file(teacher_state, str(directory / TEACHER_WEIGHTS), metadata={"source": record["source"]})
        record = {**record, "weights": str((final / TEACHER_WEIGHTS).resolve())}
    return {
        "stage": cfg.stage,
        "recipe": cfg.to_dict(),
        "teacher": record,
        "llm": language_record(cfg, model.llm_identity),
    }
