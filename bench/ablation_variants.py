"""The variants of bench/ablations.py: what a variant is, the command-line syntax that makes one, the
default set (the paper's Table-4 axes, bottleneck width and reconstruction-loss type), and the checks
that stop a misspelt key or a bad value before anything trains.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from typing import Any

from bench.ablation_summary import CONTROL

#: the stages of the demo, in order (viq.demo.run.DEMO_STAGES; repeated to parse before importing torch)
STAGES = ("stage1", "stage2_1", "stage2_2", "drawer")


@dataclass
class Variant:
    name: str
    #: [(stages, "key.path=value")]
    overrides: list[tuple[tuple[str, ...], str]] = field(default_factory=list)
    skip: tuple[str, ...] = ()
    until: str = "drawer"
    axis: str = "custom"
    description: str = ""

    def chain(self) -> list[str]:
        stages = list(STAGES[: STAGES.index(self.until) + 1])
        return [s for s in stages if s not in self.skip]

    def stage_overrides(self, stage: str) -> list[str]:
        return [kv for stages, kv in self.overrides if stage in stages]

    def spec(self) -> list[str]:
        tokens = [f"{','.join(stages)}:{kv}" for stages, kv in self.overrides]
        if self.skip:
            tokens.append(f"skip={','.join(self.skip)}")
        if self.until != "drawer":
            tokens.append(f"until={self.until}")
        return tokens


def parse_variant(name: str, tokens: list[str], *, axis: str = "custom", description: str = "") -> Variant:
    """A variant from command-line tokens (see the module docstring)."""
    variant = Variant(name, axis=axis, description=description)
    for token in tokens:
        if "=" not in token:
            raise ValueError(f"variant {name}: {token!r} is not STAGE:KEY=VALUE, KEY=VALUE, skip=STAGE or until=STAGE")
        key, value = token.split("=", 1)
        if key in ("skip", "until"):
            names = tuple(v for v in value.split(",") if v)
            _check_stages(name, names, token)
            if key == "until":
                if len(names) != 1:
                    raise ValueError(f"variant {name}: until= takes one stage, got {value!r}")
                variant.until = names[0]
            else:
                if "stage1" in names:
                    raise ValueError(f"variant {name}: stage1 cannot be skipped (every chain starts from it)")
                variant.skip = tuple(dict.fromkeys((*variant.skip, *names)))
            continue
        stages: tuple[str, ...] = STAGES
        if ":" in key:
            where, key = key.split(":", 1)
            if where not in ("all", "*"):
                stages = tuple(s for s in where.split(",") if s)
                _check_stages(name, stages, token)
        variant.overrides.append((stages, f"{key}={value}"))
    return variant


def _check_stages(name: str, stages: tuple[str, ...], token: str) -> None:
    unknown = [s for s in stages if s not in STAGES]
    if unknown or not stages:
        raise ValueError(
            f"variant {name}: {token!r}: unknown stage {unknown or stages} (stages: {', '.join(STAGES)}, all)"
        )


#: head warm-up steps and images of ``direct_fsq``'s stage 2-2: the demo's stage 2-1 warms its fresh head
#: so (src/viq/recipes/demo/stage2_1.yaml), and without 2-1 the fresh head is 2-2's
DIRECT_FSQ_WARMUP, DIRECT_FSQ_WARMUP_IMAGES = 1000, 2048


def default_variants() -> dict[str, Variant]:
    """The axes of the paper's Table 4 (issue 11) and its bottleneck-width and reconstruction-loss
    comparisons (issue 24), each compared to the control."""
    both = "stage2_1,stage2_2"
    table = [
        (
            CONTROL,
            "control",
            [],
            "demo recipes: bottleneck + L-inf (2-1), FSQ 4k on the bottleneck, 2D RoPE, VAE-latent loss",
        ),
        # 1. proximal representation
        (
            "direct_fsq",
            "proximal",
            [
                "skip=stage2_1",
                "stage2_2:model.config.head.fsq_on_bottleneck=false",
                f"stage2_2:model.head_warmup_steps={DIRECT_FSQ_WARMUP}",
                f"stage2_2:model.head_warmup_images={DIRECT_FSQ_WARMUP_IMAGES}",
            ],
            "no proximal stage: FSQ (released layout C -> d -> FSQ) trained straight on the stage-1 features; "
            "its fresh head gets the warm-up the control's gets in stage 2-1",
        ),
        ("limit_l2", "proximal", [f"{both}:model.config.head.bottleneck_limit=l2"], "bottleneck limited by L2 norm"),
        ("limit_tanh", "proximal", [f"{both}:model.config.head.bottleneck_limit=tanh"], "bottleneck limited by tanh"),
        ("limit_none", "proximal", [f"{both}:model.config.head.bottleneck_limit=none"], "bottleneck without a limit"),
        # 2. quantizer. Every discrete kind encodes and trains the drawer (viq.model.quantizer's protocol),
        # so SimVQ runs the whole chain; on the demo's fsq_on_bottleneck it sits on the bottleneck like FSQ.
        ("fsq_16k", "quantizer", ["stage2_2:model.config.head.levels=[8,8,8,6,5]"], "FSQ, 15360 codes"),
        (
            "simvq_4k",
            "quantizer",
            [
                "stage2_2:model.config.head.quantizer=simvq",
                "stage2_2:model.config.head.simvq_codebook_size=4096",
                "stage2_2:model.fsq_init=random",  # the PCA start is FSQ's (its projection); SimVQ's is its own
            ],
            "SimVQ, 4096 codes",
        ),
        (
            "simvq_16k",
            "quantizer",
            [
                "stage2_2:model.config.head.quantizer=simvq",
                "stage2_2:model.config.head.simvq_codebook_size=16384",
                "stage2_2:model.fsq_init=random",  # the PCA start is FSQ's (its projection); SimVQ's is its own
            ],
            "SimVQ, 16384 codes",
        ),
        # 3. position
        ("no_rope", "position", ["stage2_2:model.config.head.rope=false"], "no 2D RoPE in the code blocks"),
        # 4. reconstruction loss (time per step: the stages' train_s over their steps)
        ("no_recon", "recon", [f"{both}:loss.recon=0"], "no VAE-latent loss in stage 2 (the drawer still trains)"),
        (
            "recon_pixel",
            "recon",
            [f"{both}:loss.recon=0", f"{both}:loss.pixel=1"],
            "pixel MSE through the frozen codec's decoder in stage 2 instead of the VAE-latent loss",
        ),
        # 5. bottleneck width D (the control: 32)
        ("width_8", "width", [f"{both}:model.config.head.bottleneck_dim=8"], "bottleneck width D = 8"),
        ("width_16", "width", [f"{both}:model.config.head.bottleneck_dim=16"], "bottleneck width D = 16"),
        ("width_64", "width", [f"{both}:model.config.head.bottleneck_dim=64"], "bottleneck width D = 64"),
        # 6. reference
        ("continuous", "reference", ["until=stage1"], "the continuous stage-1 encoder (no quantization)"),
    ]
    return {name: parse_variant(name, tokens, axis=axis, description=d) for name, axis, tokens, d in table}


AXES = ("proximal", "quantizer", "position", "recon", "width", "reference")


# ---------------------------------------------------------------------------------------------- checks


def check_variant(variant: Variant) -> None:
    """Every override key names a field of the recipe (TrainConfig) or, under model.config, of the model
    config (ViQConfig); each stage's recipe with the overrides loads, and its model config builds."""
    from viq.demo.run import recipe_path
    from viq.model.config import ViQConfig
    from viq.train.build import merge_config
    from viq.train.config import TrainConfig, load_recipe

    for stages, kv in variant.overrides:
        key = kv.split("=", 1)[0].strip()
        parts = key.split(".")
        if parts[:2] == ["model", "config"]:
            _check_path(ViQConfig, parts[2:], f"variant {variant.name}: {kv!r}", prefix="model.config")
        else:
            _check_path(TrainConfig, parts, f"variant {variant.name}: {kv!r}", prefix="")
        if not any(s in variant.chain() for s in stages):
            raise ValueError(
                f"variant {variant.name}: {kv!r} applies to {','.join(stages)}, none of which it trains "
                f"({', '.join(variant.chain())})"
            )
    for stage in variant.chain():
        try:
            cfg = load_recipe(recipe_path(stage), variant.stage_overrides(stage))
            if cfg.model.config:
                from viq.model.config import get_preset

                base = get_preset("viq-demo").to_dict()
                config = ViQConfig(**merge_config(base, cfg.model.config))
                # viq.train.fsq_init fits FSQ's input map: other quantizers fail there, after stage 1 trained
                if cfg.model.fsq_init == "pca" and config.head.quantizer != "fsq":
                    raise ValueError(
                        f"model.fsq_init: pca fits the projection into FSQ; this stage's quantizer is "
                        f"{config.head.quantizer!r} (add {stage}:model.fsq_init=random)"
                    )
        except (TypeError, ValueError) as e:
            raise ValueError(f"variant {variant.name}, {stage}: {e}") from None


def _check_path(cls: type, parts: list[str], where: str, prefix: str) -> None:
    if not parts or not all(parts):
        raise ValueError(f"{where}: no key under {prefix or 'the recipe'}")
    node: Any = cls
    done = prefix
    for part in parts:
        if not dataclasses.is_dataclass(node):
            if typing.get_origin(node) is dict or node is dict:
                return  # free-form mapping (optim.group_lr, ...)
            raise ValueError(f"{where}: {done} is a value ({node}), not a section; cannot set {part!r}")
        hints = typing.get_type_hints(node)
        if part not in hints:
            known = ", ".join(sorted(hints))
            raise ValueError(f"{where}: unknown key {part!r} in {done or 'the recipe'} (known: {known})")
        node = hints[part]
        done = f"{done}.{part}" if done else part
        if typing.get_origin(node) in (typing.Union, types.UnionType):
            inner = [a for a in typing.get_args(node) if a is not type(None)]
            node = inner[0] if len(inner) == 1 else node
