"""Build the model of a stage from a recipe: initial weights, hand-over between stages, LLM, VAE.

Initial ViQ weights (``model.init``):

* ``preset:<name>``: random init of a viq preset.
* ``viq:<dir>``: a viq model directory, or a previous stage's ``final/`` output, or a Hugging Face Hub
  id ``owner/name[@revision][/subfolder]`` (:mod:`viq.model.hub`; so are ``hf-siglip:`` and ``llm.path``).
  Weights are matched by name; what the new stage adds (e.g. the FSQ attention blocks in 2-2) starts fresh, and what no
  longer fits (e.g. the 2-1 bottleneck projections, D wide, vs the FSQ's d) is dropped. Both lists
  are logged: the 2-1 -> 2-2 hand-over needs no key surgery.
* ``hf-siglip:<dir>``: a Hugging Face ``SiglipVisionModel`` / ``SiglipModel`` checkpoint (encoder
  and MAP head).
* ``timm-siglip:<file>``: a timm / open_clip SigLIP2 state dict, local or ``owner/name/<file>`` on the Hub
  (see :mod:`viq.train.init`).
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import Any

import torch
from torch import nn

import viq
from viq._untrusted import read_json
from viq.model.config import EncoderConfig, ViQConfig, dataclass_from_dict, get_preset
from viq.model.encoder import ViTEncoder
from viq.model.hub import resolve, resolve_model
from viq.model.official import is_official_dir
from viq.model.vae import build_vae as make_vae
from viq.model.vae import latent_statistics, load_vae
from viq.model.viq import check_weights
from viq.train.config import TrainConfig, parse_init
from viq.train.init import load_siglip
from viq.train.language import build_language_side
from viq.train.matching import load_matching
from viq.train.model import TrainModel
from viq.train.output import STAGE_FILE, VIQ_CONFIG, VIQ_WEIGHTS, check_stage_output
from viq.train.stages import Handover

log = logging.getLogger(__name__)

__all__ = ["build_model", "load_matching", "merge_config"]


def merge_config(base: dict[str, Any], changes: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in changes.items():
        out[k] = merge_config(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def _read_viq_dir(path: Path) -> tuple[ViQConfig, dict[str, torch.Tensor]]:
    from safetensors.torch import load_file

    if not (path / VIQ_CONFIG).is_file() or not (path / VIQ_WEIGHTS).is_file():
        if is_official_dir(path):
            model = viq.load(path)
            return model.config, model.state_dict()
        raise FileNotFoundError(f"{path}: not a viq model directory ({VIQ_CONFIG} + {VIQ_WEIGHTS})")
    return ViQConfig.load(path / VIQ_CONFIG), load_file(str(path / VIQ_WEIGHTS))


def build_vae(
    cfg: TrainConfig, config: ViQConfig, state: dict[str, torch.Tensor], init_kind: str
) -> tuple[ViQConfig, nn.Module | None]:
    """The frozen latent codec of the stage, and ``config`` with its ``vae`` section matching it.

    In order: ``vae.path`` (a diffusers / pixel-codec folder or a Hub id; it also replaces ``vae.*``
    weights that came with ``model.init``), else the ``vae.*`` weights of ``model.init``, else -- only
    for a ``preset:`` init, the test and demo presets -- a randomly initialised codec, with a warning.
    A stage whose losses need a VAE and finds none stops here, before anything trains. Stages that do
    not need one build it only when ``vae.path`` names it, so that their output hands it on.
    """
    needs = cfg.spec.needs_vae(cfg.loss_weights())
    if cfg.vae.path:
        directory = resolve(cfg.vae.path, what="VAE")
        vae_config, vae = load_vae(directory)
        log.info(
            "VAE (%s) from %s%s",
            vae_config.kind,
            directory,
            "; it replaces the vae.* weights of model.init" if any(k.startswith("vae.") for k in state) else "",
        )
        return dataclasses.replace(config, vae=vae_config), vae
    if not needs:
        return config, None

    vae_state = {k[4:]: v for k, v in state.items() if k.startswith("vae.")}
    if not vae_state and init_kind != "preset":
        raise ValueError(
            f"stage {cfg.stage} needs a frozen VAE for its reconstruction loss, and model.init ({cfg.model.init}) "
            f"brings no vae.* weights: set vae.path to the Qwen-Image VAE (a diffusers folder, or the Hub id "
            f"Qwen/Qwen-Image/vae) or to a pixel-codec folder"
        )
    vae = make_vae(config.vae)
    if vae_state:
        try:
            vae.load_state_dict(vae_state)
        except RuntimeError as e:
            raise ValueError(
                f"{cfg.model.init}: its vae.* weights do not fit its config's vae section ({str(e).splitlines()[0]})"
            ) from None
    else:
        log.warning(
            "model.init %s is a preset: the reconstruction target is a randomly initialised VAE "
            "(for tests only; set vae.path for real training)",
            cfg.model.init,
        )
    return config, vae


def with_latent_norm(config: ViQConfig, latent_norm: str, vae: nn.Module | None) -> ViQConfig:
    """``config`` with its decoders' latent space set by ``loss.latent_norm``: "none" = raw latents;
    "mean_std" = normalised by the VAE's per-channel statistics, recorded in ``config.decoder`` so that
    every later consumer (draw, reconstruct, validation, the pixel loss) inverts it."""
    if latent_norm == "mean_std" and vae is not None:
        mean, std = latent_statistics(vae)
    else:
        mean = std = None
    decoder = dataclasses.replace(config.decoder, latent_mean=mean, latent_std=std)
    return dataclasses.replace(config, decoder=decoder)


def _check_carry(config: ViQConfig, carry: dict[str, torch.Tensor], source: str) -> None:
    """Fail before training, not at export, when weights a stage carries into its output do not fit its
    model config: as in the official models, the drawer shares ``decoder`` with the encoder-side latent
    decoder (``recon.*``) and the embedder shares ``head`` with the dequantiser (``dequant.*``). (A
    carried VAE is not checked here: building it, even on the meta device, needs diffusers, which a
    stage that only carries it does not.)"""
    for component, section in (("recon", "decoder"), ("dequant", "head"), ("embedder", "head")):
        state = {k: v for k, v in carry.items() if k.startswith(component + ".")}
        if not state:
            continue
        try:
            check_weights(config, state, (component,), f"{component}.*")
        except ValueError as exc:
            raise ValueError(
                f"{source}: its {component}.* weights, carried into this stage's output, do not fit the recipe's "
                f"model config ({exc}); they share the config's `{section}` section, so leave "
                f"model.config.{section} as the init has it"
            ) from None


def build_model(cfg: TrainConfig, *, device: torch.device) -> tuple[TrainModel, Any]:
    """The stage's TrainModel (on ``device``, float32 master weights) and its ChatTokenizer (or None)."""
    stage = cfg.spec
    kind, value = parse_init(cfg.model.init)
    state: dict[str, torch.Tensor] = {}
    init_dir: Path | None = None
    published = None  # a SigLIP init as published: the default distillation teacher
    if kind == "preset":
        base = get_preset(value)
    elif kind == "viq":
        init_dir = resolve_model(value)  # a local directory, or a Hub id owner/name[@rev][/sub]
        check_stage_output(init_dir)
        base, state = _read_viq_dir(init_dir)
    else:
        checkpoint = load_siglip(kind, value, cfg.model.config)
        base, state, published = checkpoint.config, checkpoint.state, checkpoint.native_encoder()
    config = ViQConfig.from_dict(merge_config(base.to_dict(), cfg.model.config)) if cfg.model.config else base
    config, vae = build_vae(cfg, config, state, kind)
    config = with_latent_norm(config, cfg.loss.latent_norm, vae)

    language = None
    if cfg.llm.path and stage.llm:
        language = build_language_side(cfg, config.width, init_dir)

    weights = cfg.loss_weights()
    carry: dict[str, torch.Tensor] = {}
    if state and stage.handover.carry:
        # Not trained here and not in the live model, but needed by a later stage.
        carry = {k: v for k, v in state.items() if k.startswith(stage.handover.carry)}
        _check_carry(config, carry, cfg.model.init)
    model = TrainModel(
        cfg.stage,
        config,
        llm=language.llm if language else None,
        projector=language.projector if language else None,
        vae=vae,
        loss_weights=weights,
        teacher_resize=cfg.loss.teacher_resize,
        teacher_size=cfg.loss.teacher_size,
        max_length=cfg.llm.max_length,
        carry=carry,
        llm_identity=language.identity if language else None,
    )
    if state:
        load_matching(model, _handed_over(stage.handover, state), cfg.model.init)

    model.teacher_record = setup_teacher(model, cfg, init_dir, published)
    if "distill" in model.losses and model.teacher is None:
        raise ValueError(
            f"loss.distill={cfg.loss.distill} needs the encoder's MAP head (the student's pooled "
            f"embedding), and the encoder of {cfg.model.init} has none: set loss.distill=0"
        )
    model.to(device)
    return model, language.tokenizer if language else None


def _teacher_record(directory: Path | None) -> dict[str, Any] | None:
    """The teacher an earlier stage recorded in its output's ``stage.json`` (None if it has none)."""
    path = directory / STAGE_FILE if directory is not None else None
    if path is None or not path.is_file():
        return None
    return read_json(path).get("teacher")


def _encoder_from(config_dict: dict[str, Any], state: dict[str, torch.Tensor], source: str) -> nn.Module:
    """A ViTEncoder (+ MAP head) of ``config_dict`` holding the ``encoder.*`` tensors of ``state``."""

    encoder = ViTEncoder(dataclass_from_dict(EncoderConfig, config_dict, "teacher encoder"))
    weights = {k[len("encoder.") :]: v for k, v in state.items() if k.startswith("encoder.")}
    missing, unexpected = encoder.load_state_dict(weights, strict=False)
    if missing or unexpected or not weights:
        raise ValueError(
            f"teacher {source}: its weights do not fit the encoder ({len(missing)} missing, "
            f"{len(unexpected)} unexpected, e.g. {(missing + unexpected)[:3]})"
        )
    if encoder.pool is None:
        raise ValueError(f"teacher {source}: the encoder has no MAP head to pool its features")
    return encoder


def setup_teacher(
    model: TrainModel,
    cfg: TrainConfig,
    init_dir: Path | None,
    published: tuple[Any, dict[str, torch.Tensor]] | None = None,
) -> dict[str, Any] | None:
    """Give ``model`` its distillation teacher and return the record to write into the stage output.

    The paper distils every stage towards one fixed-resolution teacher: the pre-trained encoder that
    stage 1 starts from. So the teacher is chosen once (``loss.teacher``, default "auto": the stage
    that starts without a recorded teacher takes its own starting encoder), its encoder is written to
    that stage's output (``teacher.safetensors``), and every later stage loads that same file through
    the ``stage.json`` record of the stage it starts from -- never a copy of its own starting encoder,
    which stage 2 has already trained. A stage that starts from a SigLIP checkpoint (``published``: its
    encoder config and tensors as published, :meth:`viq.train.init.SiglipCheckpoint.native_encoder`)
    takes that checkpoint unmodified -- its own position table (24x24 for SigLIP2-384), not the
    128x128 resize the student starts from -- as the official teacher is.
    """
    stage = cfg.spec
    if "distill" not in stage.losses or cfg.loss.distill <= 0 or model.encoder is None or model.encoder.pool is None:
        return None
    spec = cfg.loss.teacher
    record = _teacher_record(init_dir) if spec == "auto" else None
    if spec == "auto" and record is None and published is not None:
        return _teacher_from(model, *published, cfg.model.init)
    if spec == "auto" and record is None:
        model.snapshot_teacher()  # this stage's starting encoder becomes the recipe's teacher
        return {"source": cfg.model.init, "weights": None, "encoder": dataclasses.asdict(model.config.encoder)}
    if record is not None:
        from safetensors.torch import load_file

        weights = Path(record["weights"])
        if not weights.is_file():
            raise FileNotFoundError(
                f"teacher weights {weights} (recorded in {init_dir / STAGE_FILE}) not found: "
                f"restore them or name a teacher with loss.teacher=viq:<dir>"
            )
        state = {"encoder." + k: v for k, v in load_file(str(weights)).items()}
        model.set_teacher(_encoder_from(record["encoder"], state, str(weights)))
        return record
    kind, value = parse_init(spec, "loss.teacher")
    if kind == "preset":
        raise ValueError(f"loss.teacher {spec!r}: a teacher needs trained weights (viq:, hf-siglip:, timm-siglip:)")
    if kind == "viq":
        config, state = _read_viq_dir(resolve_model(value))
        encoder_config = config.encoder
    else:
        encoder_config, state = load_siglip(kind, value, {}).native_encoder()
    return _teacher_from(model, encoder_config, state, spec)


def _teacher_from(
    model: TrainModel, encoder_config: Any, state: dict[str, torch.Tensor], source: str
) -> dict[str, Any]:
    """Give ``model`` the teacher of ``encoder_config`` holding the ``encoder.*`` tensors of ``state``;
    the record of a teacher chosen here (its weights are written with this stage's output)."""
    encoder = dataclasses.asdict(encoder_config)
    model.set_teacher(_encoder_from(encoder, state, source))
    return {"source": source, "weights": None, "encoder": encoder}


def _handed_over(handover: Handover, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The init weights a stage loads into its model, by its hand-over rule (see
    :class:`viq.train.stages.Handover`)."""
    taken = {k: v for k, v in state.items() if not k.startswith(handover.skip)}
    if handover.only:
        taken = {k: v for k, v in taken.items() if k.startswith(handover.only)}
    targets = tuple({dst.split(".")[0] + "." for _, dst in handover.seed})
    if targets and not any(k.startswith(targets) for k in taken):
        for src, dst in handover.seed:
            taken.update({dst + k[len(src) :]: v for k, v in state.items() if k.startswith(src)})
    return taken
