"""Model configuration: plain dataclasses, serialised to JSON, with named presets.

A :class:`ViQConfig` fully describes a ViQ model (encoder, code head, decoders and the pixel VAE), so
``config.json`` + ``model.safetensors`` is a complete, self-describing checkpoint. Every number whose
official value is a hard-coded constant in the authors' code (FSQ width, FusionBlock heads, the
attention width of the FSQ blocks, ...) is a field here, with the official value as default.

Presets (``PRESETS`` / :func:`get_preset`):

==================  ==========================================================================
name                what
==================  ==========================================================================
viq-g-2k ... 64k    the five released sizes: SigLIP2-g/16 (1536 wide, 40 deep) + FSQ levels
viq-so400m-16k      the same head on a SigLIP2-so400m/16 trunk (1152 wide, 27 deep)
viq-tiny            the official golden-fixture config "viq-tiny-a" (64 wide, 2 deep, 16k levels)
viq-demo            the CPU demo's model (64 wide, 4 deep, 4k levels, a small pixel codec)
viq-test            an even smaller config for fast unit tests (4k levels)
==================  ==========================================================================
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from viq._untrusted import LIMITS, loads_json
from viq.model.quantizer import QuantizerKind, get_quantizer_kind

__all__ = [
    "EncoderConfig",
    "HeadConfig",
    "DecoderConfig",
    "VAEConfig",
    "ViQConfig",
    "FSQ_LEVELS",
    "PRESETS",
    "get_preset",
]

#: FSQ level sets of the released sizes (the index of a code is sum_k level_idx_k * prod(levels[:k])).
FSQ_LEVELS: dict[str, tuple[int, ...]] = {
    "2k": (8, 8, 4, 3, 3),
    "4k": (8, 8, 4, 4, 4),
    "8k": (8, 8, 8, 4, 4),
    "16k": (8, 8, 8, 6, 5),
    "64k": (8, 8, 8, 5, 5, 5),
}


@dataclass
class EncoderConfig:
    """Any-resolution ViT trunk (timm ``VisionTransformer`` layout, no class token).

    ``pos_grid`` is the side of the stored learned position table, (1, pos_grid**2, width), which is
    bilinearly resized to each image's patch grid.
    """

    patch_size: int = 16
    width: int = 1536
    depth: int = 40
    num_heads: int = 16
    mlp_hidden: int = 6144
    pos_grid: int = 128
    norm_eps: float = 1e-6
    qkv_bias: bool = True
    #: MLP activation: "gelu" (exact erf; SigLIP2 in timm / the official ViQ) or "gelu_tanh"
    #: (the tanh approximation used by Hugging Face SigLIP checkpoints).
    mlp_act: str = "gelu"
    #: whether the final LayerNorm + MAP attention-pool head (used for self-distillation) exists.
    pool_head: bool = True

    def __post_init__(self) -> None:
        _check_positive(self, "patch_size", "width", "depth", "num_heads", "mlp_hidden", "pos_grid")
        _check_at_most(self)
        if self.width % self.num_heads:
            raise ValueError(f"encoder width {self.width} is not divisible by num_heads {self.num_heads}")
        if self.mlp_act not in ("gelu", "gelu_tanh"):
            raise ValueError(f"mlp_act must be 'gelu' or 'gelu_tanh', got {self.mlp_act!r}")


@dataclass
class HeadConfig:
    """The code head ("FusionBlock" + position-aware head-wise FSQ in the official code).

    Quantize path: LayerNorm (no affine) -> ``num_blocks`` ViT blocks -> expand each patch token into
    ``codes_per_patch`` sub-tokens (MLP) -> ``code_blocks`` RoPE attention blocks in which the
    sub-tokens act as heads -> Linear to ``len(levels)`` -> FSQ.
    Dequantize path: Linear back -> merge the sub-tokens (MLP) -> MLP + ``res_blocks`` residual MLPs
    -> per-channel affine.
    """

    levels: tuple[int, ...] = FSQ_LEVELS["16k"]
    #: a registered quantizer kind (:data:`viq.model.quantizer.QUANTIZERS`): "fsq" (the released
    #: tokenizer); training variants: "bottleneck" (stage 2-1 proximal representation: Linear
    #: C->bottleneck_dim, a norm limit, no rounding) and "simvq" (ablation); or one you register.
    quantizer: str = "fsq"
    bottleneck_dim: int = 32
    #: limit applied in the bottleneck: "none", "l2", "linf" (onto the hypercube surface), "tanh".
    bottleneck_limit: str = "linf"
    #: the (discrete) quantizer sits on the limited bottleneck, as FSQ does in the paper (C -> D ->
    #: limit -> d -> FSQ, and back d -> D -> C), so stage 2-2 keeps the stage 2-1 bottleneck. False:
    #: the released layout, in which FSQ projects the features directly (C -> d -> FSQ -> d -> C).
    #: (The name is the released one; it applies to every discrete quantizer kind.)
    fsq_on_bottleneck: bool = False
    simvq_codebook_size: int = 32768
    simvq_dim: int = 32
    num_blocks: int = 3
    num_heads: int = 16  # official FusionBlock default, independent of the encoder's head count
    mlp_ratio: float = 4.0
    codes_per_patch: int = 4
    code_blocks: int = 3
    #: attention width of the code blocks ("max_head_dim"); the block projects width -> attn_dim
    #: only when width > attn_dim.
    attn_dim: int = 256
    rope: bool = True
    rope_min_freq: float = 0.2
    rope_max_freq: float = 20.0
    rope_zero_fraction: float = 0.25
    #: "compute": cast RoPE angles to the activation dtype before cos/sin, as the official code does
    #: (bf16 angles in bf16 inference). "float32": keep angles in float32 (more accurate, but codes of
    #: released weights in bf16 then differ slightly from the official ones).
    rope_angle_dtype: str = "compute"
    fsq_eps: float = 1e-3
    res_blocks: int = 3
    res_mlp_ratio: float = 2.0
    pre_norm_eps: float = 1e-5
    res_norm_eps: float = 1e-5
    norm_eps: float = 1e-6

    def __post_init__(self) -> None:
        self.levels = tuple(int(v) for v in self.levels)
        if not self.levels or any(not 2 <= v <= 255 for v in self.levels):
            raise ValueError(f"FSQ levels must be 1+ integers in [2, 255], got {self.levels}")
        _check_positive(self, "num_heads", "codes_per_patch", "attn_dim")
        _check_at_most(self)
        if len(self.levels) > 32:
            raise ValueError(f"FSQ levels: at most 32 dimensions, got {len(self.levels)}")
        if self.attn_dim % 2:
            raise ValueError(f"attn_dim must be even for RoPE, got {self.attn_dim}")
        kind = get_quantizer_kind(self.quantizer)  # ValueError naming the registered kinds
        if self.codebook_size:
            kind.alphabet(self)  # a codebook that codes files cannot describe fails here, not when encoding
        if self.bottleneck_limit not in ("none", "l2", "linf", "tanh"):
            raise ValueError(f"bottleneck_limit must be none, l2, linf or tanh, got {self.bottleneck_limit!r}")
        if self.rope_angle_dtype not in ("compute", "float32"):
            raise ValueError(f"rope_angle_dtype must be 'compute' or 'float32', got {self.rope_angle_dtype!r}")

    @property
    def quantizer_kind(self) -> QuantizerKind:
        """The registered kind of ``quantizer``."""
        return get_quantizer_kind(self.quantizer)

    @property
    def codebook_size(self) -> int:
        """Number of distinct codes (0 for a continuous quantizer such as the bottleneck)."""
        return self.quantizer_kind.codebook_size(self)

    @property
    def quantizer_dim(self) -> int:
        """Width of the quantizer's values (FSQ: the number of levels)."""
        return self.quantizer_kind.dim(self)

    @property
    def code_levels(self) -> tuple[int, ...]:
        """The codes' alphabet as ``.viq`` files and stores record it (FSQ: ``levels``; see
        :func:`viq.model.quantizer.radix_levels`); ``()`` for a continuous quantizer."""
        return self.quantizer_kind.alphabet(self)

    @property
    def quantizes_on_bottleneck(self) -> bool:
        """A discrete quantizer on the limited bottleneck (``fsq_on_bottleneck``)."""
        return self.fsq_on_bottleneck and self.codebook_size > 0

    @property
    def code_dim(self) -> int:
        """Width of the values between project_in and project_out (the bottleneck width D when the
        quantizer sits on the bottleneck)."""
        return self.bottleneck_dim if self.quantizes_on_bottleneck else self.quantizer_dim


@dataclass
class DecoderConfig:
    """Codes -> features (embedder) and codes -> VAE latent (drawer)."""

    latent_blocks: int = 3
    #: heads of the drawer's ViT blocks; the official model uses the encoder's head count.
    latent_heads: int = 16
    latent_mlp_ratio: float = 4.0
    latent_channels: int = 16
    #: each patch becomes an upscale x upscale block of latent pixels (16 px patch / VAE factor 8 = 2).
    latent_upscale: int = 2
    groupnorm_groups: int = 32
    norm_eps: float = 1e-6
    #: how the latent decoder / drawer output relates to the VAE's latents: None = the raw latents
    #: (the released models); otherwise per-channel statistics, the output being
    #: (latent - latent_mean) / latent_std (training with ``loss.latent_norm: mean_std``).
    #: :meth:`viq.model.decoders.LatentDecoder.to_raw` inverts it before any decoding to pixels.
    latent_mean: tuple[float, ...] | None = None
    latent_std: tuple[float, ...] | None = None

    def __post_init__(self) -> None:
        _check_at_most(self)
        if (self.latent_mean is None) != (self.latent_std is None):
            raise ValueError("decoder.latent_mean and decoder.latent_std go together (both or neither)")
        if self.latent_mean is not None:
            self.latent_mean = tuple(float(v) for v in self.latent_mean)
            self.latent_std = tuple(float(v) for v in self.latent_std)
            if len(self.latent_mean) != self.latent_channels or len(self.latent_std) != self.latent_channels:
                raise ValueError(f"decoder.latent_mean/std need {self.latent_channels} values each")
            if any(not s > 0 for s in self.latent_std):
                raise ValueError(f"decoder.latent_std must be positive, got {self.latent_std}")


@dataclass
class VAEConfig:
    """The latent codec that turns drawn latents into pixels (see :mod:`viq.model.vae`).

    ``kind="qwen-image"``: diffusers ``AutoencoderKLQwenImage`` with these constructor arguments (the
    released models). ``kind="pixel-codec"``: :class:`viq.model.pixel_codec.PixelCodec`, a small
    autoencoder with the same latent contract for places without the Qwen-Image weights (the demo):
    ``base_dim`` is its width, ``num_res_blocks`` / ``decoder_res_blocks`` its encoder / decoder depth,
    ``pixel_refine_channels`` the width of a refinement on its decoded pixels (0: none).
    """

    kind: str = "qwen-image"
    base_dim: int = 96
    z_dim: int = 16
    dim_mult: tuple[int, ...] = (1, 2, 4, 4)
    num_res_blocks: int = 2
    attn_scales: tuple[float, ...] = ()
    temperal_downsample: tuple[bool, ...] = (False, True, True)
    #: spatial down-sampling factor of the VAE (pixels per latent pixel).
    scale_factor: int = 8
    #: pixel codec only: residual blocks of its decoder.
    decoder_res_blocks: int = 2
    #: pixel codec only: width of a residual 3x3 conv pair on the decoded pixels (0 = none). The latent
    #: decoder draws each 8x8 block from its own position; this lets an error fade across block edges.
    pixel_refine_channels: int = 0

    def __post_init__(self) -> None:
        self.dim_mult = tuple(int(v) for v in self.dim_mult)
        self.attn_scales = tuple(float(v) for v in self.attn_scales)
        self.temperal_downsample = tuple(bool(v) for v in self.temperal_downsample)
        _check_at_most(self)
        if not isinstance(self.pixel_refine_channels, int) or self.pixel_refine_channels < 0:
            raise ValueError(f"vae.pixel_refine_channels must be 0 or more, got {self.pixel_refine_channels!r}")
        if len(self.dim_mult) > 16 or any(not 1 <= v <= 64 for v in self.dim_mult):
            raise ValueError(f"vae.dim_mult: at most 16 values in [1, 64], got {self.dim_mult}")
        if self.kind not in ("qwen-image", "pixel-codec"):
            raise ValueError(f"vae.kind must be 'qwen-image' or 'pixel-codec', got {self.kind!r}")

    def diffusers_kwargs(self) -> dict[str, Any]:
        return {
            "base_dim": self.base_dim,
            "z_dim": self.z_dim,
            "dim_mult": list(self.dim_mult),
            "num_res_blocks": self.num_res_blocks,
            "attn_scales": list(self.attn_scales),
            "temperal_downsample": list(self.temperal_downsample),
        }


@dataclass
class ViQConfig:
    """Everything needed to build a :class:`viq.model.viq.ViQModel`."""

    name: str = "viq-g-16k"
    encoder: EncoderConfig = field(default_factory=EncoderConfig)
    head: HeadConfig = field(default_factory=HeadConfig)
    decoder: DecoderConfig = field(default_factory=DecoderConfig)
    vae: VAEConfig = field(default_factory=VAEConfig)

    def __post_init__(self) -> None:
        for name, cls in (
            ("encoder", EncoderConfig),
            ("head", HeadConfig),
            ("decoder", DecoderConfig),
            ("vae", VAEConfig),
        ):
            value = getattr(self, name)
            if isinstance(value, dict):
                setattr(self, name, _from_dict(cls, value, f"config.{name}"))
        estimate = self.approx_parameters()
        if estimate > LIMITS.max_model_parameters:
            raise ValueError(
                f"config {self.name!r}: about {estimate:.3g} parameters, more than the limit of "
                f"{LIMITS.max_model_parameters:.3g} (a config this size is refused before anything is built; "
                f"raise it with VIQ_LIMITS=max_model_parameters=N if it is meant)"
            )
        if self.encoder.patch_size != self.decoder.latent_upscale * self.vae.scale_factor:
            raise ValueError(
                f"patch_size {self.encoder.patch_size} must equal latent_upscale {self.decoder.latent_upscale} "
                f"x VAE scale factor {self.vae.scale_factor}"
            )

    @property
    def width(self) -> int:
        """Feature width shared by the trunk, the code head and the decoders."""
        return self.encoder.width

    def approx_parameters(self) -> int:
        """A cheap estimate of the parameter count (the large matrices only), computed from the
        config alone: what is refused before a model of an absurd config is built."""
        e, h, d, v = self.encoder, self.head, self.decoder, self.vae
        w = e.width
        trunk = e.depth * (4 * w * w + 2 * w * e.mlp_hidden) + e.pos_grid**2 * w + 3 * e.patch_size**2 * w
        head = (
            h.num_blocks * int((4 + 2 * h.mlp_ratio) * w * w)
            + h.codes_per_patch * w * w
            + h.code_blocks * int((4 + 2 * h.mlp_ratio) * h.attn_dim**2)
            + h.res_blocks * int(2 * h.res_mlp_ratio * w * w)
            + h.quantizer_kind.parameters(h)
            + 2 * h.bottleneck_dim * w
        )
        decoders = 2 * d.latent_blocks * int((4 + 2 * d.latent_mlp_ratio) * w * w)
        vae = 50 * (v.base_dim * max(v.dim_mult, default=1)) ** 2 * (v.num_res_blocks + v.decoder_res_blocks + 2)
        vae += 2 * 9 * 3 * v.pixel_refine_channels
        return int(trunk + head + decoders + vae)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ViQConfig:
        return _from_dict(cls, data, "config")

    def to_json(self) -> str:
        return json.dumps({"format": "viq", "format_version": 1, **self.to_dict()}, indent=2)

    @classmethod
    def from_json(cls, text: str, source: str = "<config>") -> ViQConfig:
        data = loads_json(text, source)  # malformed or too deep: a ValueError naming source
        if not isinstance(data, dict):
            raise ValueError(f"{source}: expected a JSON object")
        data = dict(data)
        data.pop("format", None)
        version = data.pop("format_version", 1)
        if version != 1:
            raise ValueError(f"{source}: unsupported viq config format_version {version}")
        try:
            return cls.from_dict(data)
        except (TypeError, ValueError) as e:
            raise ValueError(f"{source}: {e}") from None

    def save(self, path: str | Path) -> None:
        Path(path).write_text(self.to_json() + "\n")

    @classmethod
    def load(cls, path: str | Path) -> ViQConfig:
        return cls.from_json(Path(path).read_text(), source=str(path))

    def replace(self, **changes: Any) -> ViQConfig:
        """A copy with top-level fields replaced (sub-configs are deep-copied)."""
        return ViQConfig.from_dict({**self.to_dict(), **changes})


#: The largest value each size field of a config may take: far above any real model (the paper's
#: giant trunk is 1536 wide and 40 deep), low enough that a crafted config.json is refused before it is
#: built. The product of sizes is bounded too (:meth:`ViQConfig.approx_parameters`).
SIZE_LIMITS: dict[str, int | float] = {
    "patch_size": 256,
    "width": 32768,
    "depth": 1024,
    "num_heads": 1024,
    "mlp_hidden": 262144,
    "pos_grid": 4096,
    "bottleneck_dim": 32768,
    "simvq_codebook_size": 1 << 24,
    "simvq_dim": 32768,
    "num_blocks": 1024,
    "mlp_ratio": 64.0,
    "codes_per_patch": 256,
    "code_blocks": 1024,
    "attn_dim": 32768,
    "res_blocks": 1024,
    "res_mlp_ratio": 64.0,
    "latent_blocks": 1024,
    "latent_heads": 1024,
    "latent_mlp_ratio": 64.0,
    "latent_channels": 4096,
    "latent_upscale": 64,
    "groupnorm_groups": 4096,
    "base_dim": 8192,
    "z_dim": 4096,
    "num_res_blocks": 64,
    "scale_factor": 64,
    "decoder_res_blocks": 64,
    "pixel_refine_channels": 8192,
}


def _check_at_most(obj: Any) -> None:
    """Every field of ``obj`` named in :data:`SIZE_LIMITS` is a number no larger than its limit."""
    for f in dataclasses.fields(obj):
        if f.name not in SIZE_LIMITS:
            continue
        value = getattr(obj, f.name)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not value <= SIZE_LIMITS[f.name]:
            raise ValueError(
                f"{type(obj).__name__}.{f.name} = {value!r}: must be a number no larger than "
                f"{SIZE_LIMITS[f.name]} (refused before anything is built)"
            )


def _check_positive(obj: Any, *names: str) -> None:
    for name in names:
        value = getattr(obj, name)
        if not isinstance(value, int) or value <= 0:
            raise ValueError(f"{type(obj).__name__}.{name} must be a positive integer, got {value!r}")


def dataclass_from_dict(cls: type, data: dict[str, Any], where: str) -> Any:
    """``cls(**data)`` for a config dataclass, with unknown keys an error naming them and ``where``."""
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ValueError(f"{where}: unknown keys {unknown} (known: {sorted(known)})")
    return cls(**data)


_from_dict = dataclass_from_dict


def _giant(size: str) -> ViQConfig:
    return ViQConfig(name=f"viq-g-{size}", head=HeadConfig(levels=FSQ_LEVELS[size]))


def _so400m(size: str) -> ViQConfig:
    # SigLIP2-so400m/16: width 1152, depth 27, 16 heads, MLP 4304 (ratio 3.7362).
    return ViQConfig(
        name=f"viq-so400m-{size}",
        encoder=EncoderConfig(width=1152, depth=27, num_heads=16, mlp_hidden=4304),
        head=HeadConfig(levels=FSQ_LEVELS[size]),
    )


def _tiny() -> ViQConfig:
    # Exactly the official golden-fixture config "viq-tiny-a" (shared/fixtures/official-viq).
    return ViQConfig(
        name="viq-tiny",
        encoder=EncoderConfig(width=64, depth=2, num_heads=4, mlp_hidden=256, pos_grid=32),
        head=HeadConfig(levels=FSQ_LEVELS["16k"], attn_dim=32),
        decoder=DecoderConfig(latent_heads=4),
        vae=VAEConfig(base_dim=4),
    )


def _demo() -> ViQConfig:
    # Small enough to train stage 1 -> 2-2 -> drawer in minutes on 2 CPU cores (viq demo).
    return ViQConfig(
        name="viq-demo",
        # 64 wide: at equal CPU time a 64-wide trunk learns the demo's tasks faster than a 96-wide one;
        # a 4 x 4 position table: the demo's images are 3-6 patches a side (docs/training.md).
        encoder=EncoderConfig(width=64, depth=4, num_heads=4, mlp_hidden=256, pos_grid=4),
        head=HeadConfig(levels=FSQ_LEVELS["4k"], num_heads=4, attn_dim=32, code_blocks=2, num_blocks=2, res_blocks=1),
        decoder=DecoderConfig(latent_blocks=1, latent_heads=4, groupnorm_groups=8),
        # A small pixel codec with the Qwen-Image latent contract, fitted by the demo itself.
        vae=VAEConfig(
            kind="pixel-codec", base_dim=64, num_res_blocks=1, decoder_res_blocks=2, pixel_refine_channels=32
        ),
    )


def _test() -> ViQConfig:
    return ViQConfig(
        name="viq-test",
        encoder=EncoderConfig(width=32, depth=2, num_heads=2, mlp_hidden=64, pos_grid=16),
        head=HeadConfig(levels=FSQ_LEVELS["4k"], num_heads=4, attn_dim=16, code_blocks=2, num_blocks=1, res_blocks=1),
        decoder=DecoderConfig(latent_blocks=1, latent_heads=2, groupnorm_groups=8),
        vae=VAEConfig(base_dim=4),
    )


PRESETS: dict[str, Any] = {
    **{f"viq-g-{size}": (lambda s=size: _giant(s)) for size in FSQ_LEVELS},
    "viq-so400m-16k": lambda: _so400m("16k"),
    "viq-tiny": _tiny,
    "viq-demo": _demo,
    "viq-test": _test,
}


def get_preset(name: str) -> ViQConfig:
    """A fresh copy of a named preset config."""
    try:
        return PRESETS[name]()
    except KeyError:
        raise KeyError(f"unknown preset {name!r}; known: {', '.join(sorted(PRESETS))}") from None
