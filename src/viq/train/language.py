"""The language side of a stage: the LLM, its chat tokenizer, the projector, and what an earlier stage's
output hands on to them.

A stage output (``final/``) holds the projector (``projector.safetensors``) and the LLM's trained part
(``llm/``: a LoRA / DoRA adapter, or the whole LLM in ``full`` mode), made for one LLM. Its
``stage.json`` records which (:func:`viq.mllm.adapters.llm_identity`: architecture, widths, vocabulary
and a digest of the weights). A later stage -- or ``train-mllm`` -- takes them over by ``llm.inherit``:

* ``auto`` (default): when they were made for the recipe's LLM (same identity; outputs without a record:
  every tensor fits) and the adapter has the recipe's LoRA settings; otherwise the projector and the
  adapter start fresh and the log says why. The authors' recipe starts both fresh at stages 2-1 and 2-2;
  viq carries them on when they fit, which the demo's QA figures rely on.
* ``true``: take them, and stop with an error naming the folder and what does not fit.
* ``false``: always start fresh.

They are read from ``model.previous`` (default: the ``model.init`` folder).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import nn

from viq._untrusted import read_json
from viq.mllm.adapters import llm_identity, load_causal_lm, prepare_llm
from viq.mllm.chat import ChatTokenizer
from viq.mllm.projector import MMProjector
from viq.model.hub import resolve
from viq.model.weights import TORCH_DTYPES
from viq.train.config import TrainConfig
from viq.train.matching import load_matching
from viq.train.output import LLM_DIR, PROJECTOR_WEIGHTS, STAGE_FILE, check_stage_output

log = logging.getLogger(__name__)

__all__ = ["LanguageSide", "build_language_side"]


@dataclass
class LanguageSide:
    """The LLM (prepared for ``llm.mode``), its ChatTokenizer, a projector, and the LLM's identity."""

    llm: nn.Module
    tokenizer: Any
    projector: nn.Module
    identity: dict[str, Any]
    #: the folder whose projector / LLM weights were taken over (None: fresh)
    inherited_from: Path | None = None


def _recorded(directory: Path) -> tuple[bool, dict[str, Any] | None]:
    """(whether ``directory`` has a stage.json, the language record in it)."""
    path = directory / STAGE_FILE
    if not path.is_file():
        return False, None
    return True, read_json(path).get("llm")


def _describe(identity: dict[str, Any], path: str | None) -> str:
    return (
        f"{path or 'an LLM'} ({identity.get('architecture')}, hidden {identity.get('hidden_size')}, "
        f"{identity.get('num_layers')} layers, vocabulary {identity.get('vocab_size')})"
    )


def _misfit(module: nn.Module, path: Path, what: str, *, every_key: bool) -> str | None:
    """Why the tensors of the safetensors file ``path`` do not fit ``module`` (None: they do): one of
    another shape, or -- with ``every_key`` -- one that ``module`` does not have. Reads shapes only."""
    from safetensors import safe_open

    own = module.state_dict()
    with safe_open(str(path), "pt") as f:
        for key in f.keys():
            shape = tuple(f.get_slice(key).get_shape())
            if key not in own:
                if every_key:
                    return f"{path}: {key} is not a {what} tensor"
            elif tuple(own[key].shape) != shape:
                return f"{path}: {key} has shape {shape}, this {what} {tuple(own[key].shape)}"
    return None


def _adapter_settings(adapter: Path) -> dict[str, Any]:
    raw = read_json(adapter / "adapter_config.json")
    return {"r": raw.get("r"), "alpha": raw.get("lora_alpha"), "dora": bool(raw.get("use_dora"))}


def _why_not(
    cfg: TrainConfig, directory: Path, identity: dict[str, Any], projector: nn.Module, llm: nn.Module
) -> str | None:
    """Why the language side of ``directory`` cannot be taken over (None: it can)."""
    has_stage, record = _recorded(directory)
    if record is not None:
        if record.get("identity") != identity:
            return (
                f"it was made for {_describe(record.get('identity') or {}, record.get('path'))}, and this recipe's "
                f"LLM is {_describe(identity, cfg.llm.path)}"
            )
    elif has_stage:
        log.info("%s records no LLM (an output of an earlier viq): checking that its tensors fit", directory)
    weights = directory / PROJECTOR_WEIGHTS
    if weights.is_file():
        misfit = _misfit(projector, weights, "projector", every_key=True)
        if misfit:
            return misfit
    adapter = directory / LLM_DIR
    if (adapter / "adapter_config.json").is_file() and cfg.llm.mode in ("lora", "dora"):
        settings = _adapter_settings(adapter)
        wanted = {"r": cfg.llm.lora_r, "alpha": cfg.llm.lora_alpha, "dora": cfg.llm.mode == "dora"}
        if settings != wanted:
            return f"its adapter has {settings}, this recipe asks for {wanted} (llm.lora_r, llm.lora_alpha, llm.mode)"
    full = adapter / "model.safetensors"
    if full.is_file() and not (adapter / "adapter_config.json").is_file():
        return _misfit(llm, full, "LLM", every_key=False)
    return None


def _inherit_mode(cfg: TrainConfig) -> str:
    value = cfg.llm.inherit
    if value is True or value == "true":
        return "true"
    if value is False or value == "false":
        return "false"
    return "auto"


def build_language_side(cfg: TrainConfig, width: int, init_dir: Path | None) -> LanguageSide:
    """Load ``llm.path`` (a local folder or a Hub id) in ``llm.dtype`` with ``llm.attention``, a
    projector from ``width`` to its hidden size, take over what ``model.previous`` / ``model.init``
    hands on (module docstring), and prepare the LLM for ``llm.mode``."""

    llm, hf_tokenizer = load_causal_lm(
        resolve(cfg.llm.path, what="LLM"), dtype=TORCH_DTYPES[cfg.llm.dtype], attn_implementation=cfg.llm.attention
    )
    tokenizer = ChatTokenizer(hf_tokenizer, system_prompt=cfg.llm.system_prompt)
    projector = MMProjector(width, llm.config.hidden_size)
    identity = llm_identity(llm)

    mode = _inherit_mode(cfg)
    source = Path(cfg.model.previous) if cfg.model.previous else init_dir
    if source is not None and source != init_dir and mode != "false":
        check_stage_output(source)
    taken: Path | None = None
    if mode != "false" and source is not None and source.is_dir():
        has_language = (source / PROJECTOR_WEIGHTS).is_file() or (source / LLM_DIR).is_dir()
        reason = _why_not(cfg, source, identity, projector, llm) if has_language else None
        if reason is not None and mode == "true":
            raise ValueError(
                f"llm.inherit=true: the projector and LLM weights of {source} do not fit: {reason}; "
                f"set llm.inherit=auto or false to start them fresh"
            )
        if reason is not None:
            log.info("projector and LLM adapter start fresh: those of %s do not fit (%s)", source, reason)
        elif has_language:
            taken = source
    elif mode == "true":
        raise ValueError(
            f"llm.inherit=true but there is no earlier output to take the projector and LLM weights "
            f"from (model.previous / model.init: {source})"
        )

    if taken is not None:
        from safetensors.torch import load_file

        if (taken / PROJECTOR_WEIGHTS).is_file():
            load_matching(projector, load_file(str(taken / PROJECTOR_WEIGHTS)), str(taken / PROJECTOR_WEIGHTS))
        adapter = taken / LLM_DIR
        if (adapter / "model.safetensors").is_file() and not (adapter / "adapter_config.json").is_file():
            load_matching(llm, load_file(str(adapter / "model.safetensors")), str(adapter / "model.safetensors"))
        elif (adapter / "adapter_config.json").is_file() and cfg.llm.mode in ("full", "frozen"):
            from peft import PeftModel

            # An adapter trained before, under a recipe that now trains the whole LLM (or none of it):
            # folded into the weights.
            llm = PeftModel.from_pretrained(llm, str(adapter)).merge_and_unload()
            log.info("%s: LoRA adapter merged into the LLM (llm.mode %s)", adapter, cfg.llm.mode)
    llm = prepare_llm(llm, cfg.llm.mode, r=cfg.llm.lora_r, alpha=cfg.llm.lora_alpha, dropout=cfg.llm.lora_dropout)
    if taken is not None and cfg.llm.mode in ("lora", "dora") and (taken / LLM_DIR / "adapter_config.json").is_file():
        _load_adapter(llm, taken / LLM_DIR)
    return LanguageSide(llm, tokenizer, projector, identity, taken)


def _load_adapter(llm: nn.Module, adapter_dir: Path) -> None:
    """Load an adapter's weights into ``llm``'s (same settings, checked before) adapter, every tensor."""
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    weights = adapter_dir / "adapter_model.safetensors"
    if not weights.is_file():
        raise FileNotFoundError(f"{adapter_dir}: adapter_config.json without adapter_model.safetensors")
    result = set_peft_model_state_dict(llm, load_file(str(weights)))
    unexpected = list(getattr(result, "unexpected_keys", []))
    if unexpected:
        raise ValueError(
            f"{weights}: {len(unexpected)} adapter tensors have no place in this LLM, e.g. {unexpected[:2]}"
        )
    log.info("%s: loaded LoRA adapter", adapter_dir)
