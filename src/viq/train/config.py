"""Training recipes: one YAML file per stage, read into dataclasses, overridable from the command line.

A recipe has the sections below; every field has a default, so a recipe only states what differs.
``viq train --config recipe.yaml optim.lr=3e-4 train.max_steps=200`` overrides fields by dotted path
(values are parsed as YAML scalars/lists).

``stage:`` names a record of the stage table (:mod:`viq.train.stages`), which says what each
stage builds, trains, computes and reads.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from viq.model.config import PRESETS, dataclass_from_dict
from viq.model.weights import TORCH_DTYPES
from viq.train.losses import LOSS_TABLE
from viq.train.model import GROUPS
from viq.train.stages import STAGES, Stage, get_stage

__all__ = ["TrainConfig", "load_recipe", "apply_overrides", "parse_init", "STAGES", "TRACKERS"]

#: the optional loggers a recipe may name in ``train.trackers`` (metrics.jsonl is always written)
TRACKERS = ("tensorboard", "wandb")


@dataclass
class ModelSection:
    #: where the ViQ weights start from:
    #:   "preset:<name>"        random init of a viq preset (tests, demo)
    #:   "viq:<dir>"            a viq model directory or a previous stage's output directory
    #:   "hf-siglip:<dir>"      a Hugging Face SigLIP / SigLIP2 vision checkpoint (encoder only)
    #:   "timm-siglip:<file>"   a timm / open_clip SigLIP2 state dict (.pth / .bin / .safetensors), local or
    #:                          one file of a Hub repository: owner/name/<file>
    init: str = "preset:viq-test"
    #: ViQConfig changes applied after loading, e.g. {"head": {"quantizer": "fsq", "code_blocks": 3}}
    #: (nested dicts merge into the config).
    config: dict[str, Any] = field(default_factory=dict)
    #: a projector/LLM adapter from a previous stage: its output directory (default: the init dir).
    previous: str | None = None
    #: the projection into FSQ at the start of a fresh run (viq.train.fsq_init): "random" (the layer's
    #: own initialisation, or what model.init holds) or "pca" (top principal directions of its input on
    #: training images, centred and whitened: FSQ's inputs start uncorrelated with unit variance)
    fsq_init: str = "random"
    #: training images "pca" measures (spread evenly over data.train)
    fsq_init_images: int = 256
    #: steps that train the code head and dequantiser alone, before the stage's first step, to give the
    #: frozen trunk's features back through the bottleneck (viq.train.head_warmup); 0 = none
    head_warmup_steps: int = 0
    #: Adam's constant step size in that warm-up (batches of train.batch_size images)
    head_warmup_lr: float = 2e-3
    #: the training images the warm-up draws its batches from (spread evenly over data.train, decoded
    #: once and kept in memory: 1024 images of 384 x 384 take 1.8 GB)
    head_warmup_images: int = 1024


@dataclass
class LLMSection:
    path: str | None = None  # HF causal LM: a local directory or a Hub id (None: stage runs without an LLM)
    mode: str = "lora"  # frozen | lora | dora | full
    lora_r: int = 64
    lora_alpha: int = 16
    lora_dropout: float = 0.05
    max_length: int = 4096  # tokens per packed LLM row
    #: put first when a conversation has none; the official template's. null: the chat template's own
    #: default (Qwen2.5's is "You are Qwen, created by Alibaba Cloud. ...")
    system_prompt: str | None = "You are a helpful assistant."
    #: the LLM's weights: float32 | bfloat16 | float16 (adapters train in float32 either way)
    dtype: str = "float32"
    #: attention kernel: sdpa | eager | flash_attention_2 (where installed)
    attention: str = "sdpa"
    #: take over the projector and LLM adapter / weights of model.previous (default: the model.init
    #: folder): auto (when made for this LLM with these LoRA settings, else fresh), true (an error if
    #: they do not fit), false (always fresh). See viq.train.language.
    inherit: Any = "auto"


@dataclass
class VAESection:
    #: the frozen latent codec of the reconstruction loss (stages 2-1, 2-2, drawer, and stage 1 with
    #: ``loss.recon``): a diffusers AutoencoderKLQwenImage folder, a Hub id such as
    #: ``Qwen/Qwen-Image/vae`` (owner/name[@revision][/subfolder], resolved like ``llm.path``), or a
    #: pixel-codec folder (:func:`viq.model.vae.save_vae`). Written into the stage output as ``vae.*``,
    #: so later stages and ``viq.load`` use exactly these weights. Unset: the ``vae.*`` weights of
    #: ``model.init`` (a stage that needs a VAE and finds none stops before training).
    path: str | None = None


@dataclass
class DataSection:
    train: str | None = None  # LLaVA JSON/JSONL, Parquet / Arrow / saved dataset, or an image folder (drawer stage)
    val: str | None = None
    image_root: str | None = None
    #: Parquet / Arrow / saved-dataset data only: the columns holding the LLaVA conversations, the
    #: image(s) (paths, bytes or {bytes, path} structs; null: text only) and the sample id (null: none).
    #: Images stored as bytes are found in a code store (stage mllm) under the id column's value, so
    #: extract them with ``viq extract --id-column`` set to the same column.
    conversations_column: str = "conversations"
    image_column: str | None = "image"
    id_column: str | None = "id"
    #: stage mllm: the code store holding the codes of data.train / data.val's images
    codes: str | None = None
    on_error: str = "raise"  # raise | skip (bad samples are counted and reported)
    #: read the header of every image of data.train / data.val before the first step (parallel, with a
    #: progress bar): a missing or unreadable image fails then, or is skipped with on_error: skip.
    #: false for huge sets whose images are known good (then a bad one fails when its sample is drawn).
    check_images: bool = True
    min_pixels: int = 256
    max_pixels: int = 1024 * 1024
    #: progressive resolution: list of [start_step, max_pixels]; max_pixels grows per phase
    resolution_schedule: list[list[int]] = field(default_factory=list)
    num_workers: int = 0


@dataclass
class LossSection:
    text: float = 1.0
    distill: float = 10.0
    #: unset: 1.0 in the stages that always reconstruct (2-1, 2-2, drawer) and off in stage 1, where
    #: a latent decoder on the trunk features is optional (viq.train.stages.Stage.optional)
    recon: float | None = None
    commit: float = 1.0
    #: teacher input: "bilinear" = official (any image resized to teacher_size^2, aspect not kept);
    #: "aspect" = area teacher_size^2 keeping the aspect ratio, antialiased.
    teacher_resize: str = "bilinear"
    teacher_size: int = 384
    #: the distillation teacher, one for the whole recipe: "auto" = the teacher recorded by the stage
    #: this one starts from (``stage.json`` of ``model.init``), else this stage's own starting
    #: encoder (stage 1: the pre-trained encoder, SigLIP2 in the paper). Or an explicit source:
    #: ``viq:<dir>``, ``hf-siglip:<dir>``, ``timm-siglip:<file>`` (its encoder + MAP head).
    teacher: str = "auto"
    #: VAE latent target normalisation: "none" (official: raw latents) or "mean_std"
    latent_norm: str = "none"
    #: stages 2-1, 2-2 and drawer: weight of a pixel-space MSE of the decoded latents through the frozen VAE
    #: decoder (0 = off; with loss.recon=0 in stage 2, the reconstruction loss "MSE" of the paper's Table 4)
    pixel: float = 0.0
    #: weights of the losses registered by extensions (:func:`viq.train.losses.register_loss`), by
    #: name; one not named here has its record's ``default_weight``
    extra: dict[str, float] = field(default_factory=dict)


@dataclass
class OptimSection:
    lr: float = 1e-4
    #: per module-group learning rates (groups: encoder, head, dequant, pool, recon, projector, llm,
    #: drawer); missing groups use ``lr``.
    group_lr: dict[str, float] = field(default_factory=dict)
    #: module groups to train; the rest is frozen. Default per stage (viq.train.stages).
    trainable: list[str] | None = None
    weight_decay: float = 1e-4
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    warmup_ratio: float = 0.05
    min_lr_ratio: float = 0.1
    grad_clip: float = 1.0


@dataclass
class TrainSection:
    output_dir: str = "runs/viq"
    max_steps: int = 100
    batch_size: int = 2  # samples per micro-batch per rank
    grad_accum: int = 1
    seed: int = 0
    precision: str = "auto"  # auto (bf16 autocast on CUDA, fp32 on CPU) | bf16 | fp32
    parallel: str = "ddp"  # ddp | fsdp (only used under torchrun with >1 process)
    gradient_checkpointing: bool = False
    attention: str = "auto"
    save_every: int = 50
    keep_checkpoints: int = 2
    eval_every: int = 0  # 0: validate only at the end
    eval_samples: int = 64
    #: write a ``train`` record to metrics.jsonl every N optimizer steps (means over them) and at the end
    log_every: int = 1
    #: also log to these, when installed: "tensorboard" (OUTPUT_DIR/tensorboard), "wandb"
    trackers: list[str] | str = field(default_factory=list)
    wandb_project: str = "viq"
    #: offline: written under OUTPUT_DIR/wandb, no network (upload later with `wandb sync`); online; disabled
    wandb_mode: str = "offline"
    #: validation images shown beside their reconstructions at each evaluation (stages that reconstruct)
    log_images: int = 4
    progress: bool = True
    #: write the sample ids of every step, per rank, to samples-rank<r>.jsonl (debugging data order)
    log_samples: bool = False
    #: quantizing stages: warn once when the share of the codebook used over the usage window (20
    #: steps) falls below this (codebook collapse); 0 turns the warning off
    collapse_usage: float = 0.01


@dataclass
class TrainConfig:
    stage: str = "stage2_2"
    model: ModelSection = field(default_factory=ModelSection)
    llm: LLMSection = field(default_factory=LLMSection)
    vae: VAESection = field(default_factory=VAESection)
    data: DataSection = field(default_factory=DataSection)
    loss: LossSection = field(default_factory=LossSection)
    optim: OptimSection = field(default_factory=OptimSection)
    train: TrainSection = field(default_factory=TrainSection)

    def __post_init__(self) -> None:
        sections = {
            "model": ModelSection,
            "llm": LLMSection,
            "vae": VAESection,
            "data": DataSection,
            "loss": LossSection,
            "optim": OptimSection,
            "train": TrainSection,
        }
        for name, cls in sections.items():
            value = getattr(self, name)
            if not isinstance(value, cls):
                setattr(self, name, _build(cls, value if value is not None else {}, name))
        if not isinstance(self.stage, str):
            raise ValueError(f"stage: expected a string, got {self.stage!r}")
        if self.stage not in STAGES:
            raise ValueError(f"stage must be one of {STAGES}, got {self.stage!r}")
        if self.llm.dtype not in TORCH_DTYPES:
            raise ValueError(f"llm.dtype must be one of {', '.join(TORCH_DTYPES)}, got {self.llm.dtype!r}")
        if self.llm.attention not in ("sdpa", "eager", "flash_attention_2"):
            raise ValueError(f"llm.attention must be sdpa, eager or flash_attention_2, got {self.llm.attention!r}")
        if self.llm.inherit not in ("auto", True, False, "true", "false"):
            raise ValueError(f"llm.inherit must be auto, true or false, got {self.llm.inherit!r}")
        if self.llm.mode not in ("frozen", "lora", "dora", "full"):
            raise ValueError(f"llm.mode must be frozen, lora, dora or full, got {self.llm.mode!r}")
        if self.train.precision not in ("auto", "bf16", "fp32"):
            raise ValueError(f"train.precision must be auto, bf16 or fp32, got {self.train.precision!r}")
        if self.train.parallel not in ("ddp", "fsdp"):
            raise ValueError(f"train.parallel must be ddp or fsdp, got {self.train.parallel!r}")
        if self.loss.teacher_resize not in ("bilinear", "aspect"):
            raise ValueError(f"loss.teacher_resize must be bilinear or aspect, got {self.loss.teacher_resize!r}")
        if self.train.eval_every and not self.data.val:
            raise ValueError(
                f"train.eval_every={self.train.eval_every} needs data.val, the held-out data to validate "
                f"on (or set train.eval_every=0)"
            )
        if not 0 <= self.train.collapse_usage <= 1:
            raise ValueError(f"train.collapse_usage must be in [0, 1], got {self.train.collapse_usage}")
        if self.train.log_every < 1:
            raise ValueError(f"train.log_every must be >= 1, got {self.train.log_every}")
        if isinstance(self.train.trackers, str):
            self.train.trackers = [self.train.trackers]
        unknown = sorted(set(self.train.trackers) - set(TRACKERS))
        if unknown:
            raise ValueError(f"train.trackers: unknown {unknown}; known: {', '.join(TRACKERS)}")
        if self.train.wandb_mode not in ("offline", "online", "disabled"):
            raise ValueError(f"train.wandb_mode must be offline, online or disabled, got {self.train.wandb_mode!r}")
        if self.data.on_error not in ("raise", "skip"):
            raise ValueError(f"data.on_error must be raise or skip, got {self.data.on_error!r}")
        self.optim.betas = tuple(self.optim.betas)  # type: ignore[assignment]
        _check_ranges(self)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @property
    def spec(self) -> Stage:
        """The stage's record in the stage table (:mod:`viq.train.stages`): parts, trainable groups,
        losses, data kind, hand-over."""
        return get_stage(self.stage)

    @property
    def trainable_groups(self) -> list[str]:
        """The module groups this stage trains: ``optim.trainable``, or the stage's default when unset."""
        return list(self.optim.trainable or self.spec.trainable)

    def loss_weights(self) -> dict[str, float]:
        """The weight of each loss of the loss table (0: off; :mod:`viq.train.losses`), with an unset
        ``loss.recon`` resolved for this stage."""
        own = {f.name for f in dataclasses.fields(LossSection)}
        weights = {
            name: getattr(self.loss, name) if name in own else self.loss.extra.get(name, loss.default_weight)
            for name, loss in LOSS_TABLE.items()
        }
        if weights["recon"] is None:
            optional = any(loss == "recon" for loss, _ in self.spec.optional)
            weights["recon"] = 0.0 if optional else 1.0
        return weights

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrainConfig:
        train = data.get("train") if isinstance(data, dict) else None
        if isinstance(train, dict) and "tensorboard" in train:
            # recipes written before train.trackers: `tensorboard: true` still means TensorBoard
            train = dict(train)
            if train.pop("tensorboard") and "tensorboard" not in train.get("trackers", []):
                train["trackers"] = [*train.get("trackers", []), "tensorboard"]
            data = {**data, "train": train}
        return _build(cls, data, "recipe")


def _build(cls: type, data: dict[str, Any], where: str) -> Any:
    if not isinstance(data, dict):
        raise ValueError(f"{where}: expected a section (key: value lines), got {data!r}")
    hints = typing.get_type_hints(cls)
    coerced = {k: _coerce(v, hints[k], f"{where}.{k}") if k in hints else v for k, v in data.items()}
    return dataclass_from_dict(cls, coerced, where)


def _describe(hint: Any) -> str:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_describe(a) for a in args)
    if hint is type(None):
        return "null"
    names = {int: "an integer", float: "a number", bool: "true or false", str: "a string"}
    if hint in names:
        return names[hint]
    if origin is list:
        return f"a list of {_describe(args[0]).removeprefix('a ').removeprefix('an ')}s" if args else "a list"
    if origin is tuple:
        return f"a list of {len(args)} {_describe(args[0]).removeprefix('a ').removeprefix('an ')}s"
    if origin is dict:
        return "a mapping"
    return getattr(hint, "__name__", str(hint))


def _coerce(value: Any, hint: Any, where: str) -> Any:
    """``value`` checked against the field's type: a recipe value of the wrong kind is an error naming
    its key (``train.batch_size: expected an integer, got 1.5``), never a traceback later. Numbers written
    as YAML 1.1 strings ("3e-4" is a string to PyYAML) become numbers."""
    if hint is Any:
        return value
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    wrong = ValueError(f"{where}: expected {_describe(hint)}, got {value!r}")
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        for a in inner:
            try:
                return _coerce(value, a, where)
            except ValueError:
                continue
        raise wrong
    if hint is bool:
        if isinstance(value, bool):
            return value
        raise wrong
    if hint is int:
        if isinstance(value, str):
            try:
                value = int(value)
            except ValueError:
                raise wrong from None
        if isinstance(value, float) and value.is_integer():
            value = int(value)
        if isinstance(value, bool) or not isinstance(value, int):
            raise wrong
        return value
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, (int, float, str)):
            raise wrong
        try:
            return float(value)
        except ValueError:
            raise wrong from None
    if hint is str:
        if not isinstance(value, str):
            raise wrong
        return value
    if origin is dict:
        if not isinstance(value, dict):
            raise wrong
        return {k: _coerce(v, args[1], f"{where}.{k}") for k, v in value.items()} if args else value
    if origin is list:
        if not isinstance(value, (list, tuple)):
            raise wrong
        return [_coerce(v, args[0], f"{where}[{i}]") for i, v in enumerate(value)] if args else list(value)
    if origin is tuple:
        if not isinstance(value, (list, tuple)) or (args and args[-1] is not Ellipsis and len(value) != len(args)):
            raise wrong
        return tuple(_coerce(v, a, f"{where}[{i}]") for i, (v, a) in enumerate(zip(value, args)))
    return value


def _check_ranges(cfg: TrainConfig) -> None:
    """Values of the right type but outside what they can mean: one error naming the key."""

    def need(ok: bool, key: str, rule: str, value: Any) -> None:
        if not ok:
            raise ValueError(f"{key} must be {rule}, got {value!r}")

    t, o, d, m = cfg.train, cfg.optim, cfg.data, cfg.llm
    for key, value, low in (
        ("train.max_steps", t.max_steps, 1),
        ("train.batch_size", t.batch_size, 1),
        ("train.grad_accum", t.grad_accum, 1),
        ("train.save_every", t.save_every, 0),
        ("train.keep_checkpoints", t.keep_checkpoints, 1),
        ("train.eval_every", t.eval_every, 0),
        ("train.eval_samples", t.eval_samples, 0),
        ("train.log_images", t.log_images, 0),
        ("llm.lora_r", m.lora_r, 1),
        ("llm.max_length", m.max_length, 2),
        ("data.min_pixels", d.min_pixels, 1),
        ("data.num_workers", d.num_workers, 0),
        ("loss.teacher_size", cfg.loss.teacher_size, 1),
    ):
        need(value >= low, key, f"an integer >= {low}", value)
    need(d.max_pixels >= d.min_pixels, "data.max_pixels", f">= data.min_pixels ({d.min_pixels})", d.max_pixels)
    for i, phase in enumerate(d.resolution_schedule):
        need(
            len(phase) == 2 and phase[0] >= 0 and phase[1] >= 1,
            f"data.resolution_schedule[{i}]",
            "[start_step >= 0, max_pixels >= 1]",
            phase,
        )
    need(o.lr > 0, "optim.lr", "> 0", o.lr)
    for group, lr in o.group_lr.items():
        need(lr > 0, f"optim.group_lr.{group}", "> 0", lr)
    need(all(0 <= b < 1 for b in o.betas), "optim.betas", "two numbers in [0, 1)", list(o.betas))
    need(o.eps > 0, "optim.eps", "> 0", o.eps)
    for key, value in (
        ("optim.weight_decay", o.weight_decay),
        ("optim.grad_clip", o.grad_clip),
        ("llm.lora_alpha", m.lora_alpha),
    ):
        need(value >= 0, key, ">= 0", value)
    for key, value in (("optim.warmup_ratio", o.warmup_ratio), ("optim.min_lr_ratio", o.min_lr_ratio)):
        need(0 <= value <= 1, key, "in [0, 1]", value)
    need(0 <= m.lora_dropout < 1, "llm.lora_dropout", "in [0, 1)", m.lora_dropout)
    builtin = {f.name for f in dataclasses.fields(LossSection)}
    unknown = sorted(set(cfg.loss.extra) - (set(LOSS_TABLE) - builtin))
    need(not unknown, "loss.extra", f"keyed by registered losses ({sorted(set(LOSS_TABLE) - builtin)})", unknown)
    for name, weight in cfg.loss_weights().items():
        need(weight >= 0, f"loss.{name}", ">= 0", weight)
    need(cfg.loss.latent_norm in ("none", "mean_std"), "loss.latent_norm", "none or mean_std", cfg.loss.latent_norm)
    if cfg.optim.trainable is not None:
        unknown = sorted(set(cfg.optim.trainable) - set(GROUPS))
        need(not unknown, "optim.trainable", f"groups among {', '.join(GROUPS)}", unknown)
    parse_init(cfg.model.init, "model.init")
    need(cfg.model.fsq_init in ("random", "pca"), "model.fsq_init", "random or pca", cfg.model.fsq_init)
    need(cfg.model.fsq_init_images >= 1, "model.fsq_init_images", "an integer >= 1", cfg.model.fsq_init_images)
    if cfg.model.fsq_init == "pca":
        # The drawer and mllm stages read a frozen head: re-initialising it would change its codes.
        need(
            "head" in cfg.trainable_groups,
            "model.fsq_init",
            "random in a stage that does not train the code head",
            "pca",
        )
    need(cfg.model.head_warmup_steps >= 0, "model.head_warmup_steps", "an integer >= 0", cfg.model.head_warmup_steps)
    need(cfg.model.head_warmup_lr > 0, "model.head_warmup_lr", "> 0", cfg.model.head_warmup_lr)
    need(cfg.model.head_warmup_images >= 1, "model.head_warmup_images", "an integer >= 1", cfg.model.head_warmup_images)
    if cfg.model.head_warmup_steps:
        need(
            {"head", "dequant"} <= set(cfg.trainable_groups),
            "model.head_warmup_steps",
            "0 in a stage that does not train the code head and dequantiser",
            cfg.model.head_warmup_steps,
        )
    if cfg.loss.teacher != "auto":
        parse_init(cfg.loss.teacher, "loss.teacher")


def parse_init(spec: str, key: str = "model.init") -> tuple[str, str]:
    """``(kind, value)`` of a weights source ``<kind>:<value>`` (``model.init``, ``loss.teacher``);
    ValueError naming ``key`` for an unknown kind, an empty value or an unknown preset."""
    kind, _, value = spec.partition(":")
    if kind not in ("preset", "viq", "hf-siglip", "timm-siglip") or not value:
        raise ValueError(f"{key} {spec!r}: expected preset:<name>, viq:<dir>, hf-siglip:<dir> or timm-siglip:<file>")
    if kind == "preset":
        if value not in PRESETS:
            raise ValueError(f"{key} {spec!r}: unknown preset; known: {', '.join(sorted(PRESETS))}")
    return kind, value


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply ``a.b.c=value`` overrides to a nested dict (values parsed as YAML)."""
    import yaml

    for item in overrides:
        if "=" not in item:
            raise ValueError(f"override {item!r} is not of the form key.path=value")
        key, text = item.split("=", 1)
        value = yaml.safe_load(text) if text else None
        node = data
        parts = key.strip().split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ValueError(f"override {item!r}: {part} is not a section")
        node[parts[-1]] = value
    return data


def load_recipe(path: str | Path, overrides: list[str] | None = None) -> TrainConfig:
    """Read a YAML recipe, apply overrides, and validate it. Relative paths inside the recipe stay
    relative to the current directory (recipes are run from the repository root)."""
    import yaml

    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: recipe not found") from None
    except yaml.YAMLError as e:
        raise ValueError(f"{path}: invalid YAML ({e})") from None
    data = apply_overrides(data, list(overrides or []))
    try:
        return TrainConfig.from_dict(data)
    except (TypeError, ValueError) as e:
        raise ValueError(f"{path}: {e}") from None
