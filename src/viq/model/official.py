"""Loading the authors' released weights (``converted_<size>/`` directories).

A release directory holds three ``torch.save`` pickles of flat state dicts:

===========================  ==============================================  ========================
file                         content                                         viq components
===========================  ==============================================  ========================
model_viq_fsq_<size>.pth     ViT trunk, MAP head, FusionBlock + FSQ head,    encoder, dequant, recon,
                             continuous path, recon adapter, Qwen-Image VAE  (vae if no drawer file)
embedder.pth                 IndexEmbeder (usually bf16)                      embedder
index_drawer.pth             IndexDrawer + Qwen-Image VAE (usually bf16)      drawer, vae
===========================  ==============================================  ========================

Every key of every file is mapped by the rules below to a viq parameter; a key no rule knows, a
parameter no key fills, or a shape that does not fit is an error naming the keys. The architecture is
read from the tensor shapes (width, depth, grids, widths of every part, FSQ code dimension, VAE width).
Two things are not visible in shapes: the FSQ levels of a code dimension (2k/4k/8k/16k all have d=5),
taken from the stored codebook (K rows) or the file name, and the number of attention heads, known for
the official widths (1536 and 1152: 16 heads) and otherwise passed as ``num_heads=``.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Iterable
from pathlib import Path

import torch

from viq._untrusted import UntrustedFileError, torch_load
from viq.model.config import (
    FSQ_LEVELS,
    DecoderConfig,
    EncoderConfig,
    HeadConfig,
    VAEConfig,
    ViQConfig,
)
from viq.model.hub import resolve_model
from viq.model.parts import parts_of
from viq.model.quantizer import FSQ
from viq.model.viq import ViQModel, code_fingerprint
from viq.model.weights import MappedFile

__all__ = [
    "is_official_dir",
    "find_official_files",
    "load_official",
    "load_official_state_dicts",
    "detect_config",
    "map_official_state_dicts",
]

#: Attention heads of the official trunks, by width (SigLIP2-g: 1536, SigLIP2-so400m: 1152).
OFFICIAL_HEADS = {1536: 16, 1152: 16}

Rule = tuple[str, Callable[[re.Match], str]]


def _sub(template: str) -> Callable[[re.Match], str]:
    return lambda m: m.expand(template)


def _shift(template: str, group: int, offset: int) -> Callable[[re.Match], str]:
    """Like _sub, but renumber the index in ``group`` by ``-offset`` (official layer lists mix
    different layer kinds in one Sequential)."""

    def apply(m: re.Match) -> str:
        return template.format(i=int(m.group(group)) - offset, rest=m.group(group + 1))

    return apply


def _embedder_rules(prefix: str) -> list[Rule]:
    return [
        (r"_weight", _sub(prefix + "out_weight")),
        (r"_bias", _sub(prefix + "out_bias")),
        (r"ori_codebook\.weight", _sub(prefix + "codebook")),
        (r"projector_1\.(weight|bias)", _sub(prefix + r"project_out.\1")),
        (r"projector_2\.(fc[12]\.(?:weight|bias))", _sub(prefix + r"merge.\1")),
        (r"projector_3\.0\.(fc[12]\.(?:weight|bias))", _sub(prefix + r"post_mlp.\1")),
        (r"projector_3\.([1-9]\d*)\.(.+)", _shift(prefix + "res_blocks.{i}.{rest}", 1, 1)),
    ]


def _latent_rules(prefix: str) -> list[Rule]:
    return [
        (r"vae_preprocess_layers\.0\.(fc[12]\.(?:weight|bias))", _sub(prefix + r"mlp.\1")),
        (r"vae_preprocess_layers\.1\.(weight|bias)", _sub(prefix + r"norm.\1")),
        (r"vae_preprocess_layers\.([2-9]|[1-9]\d+)\.(.+)", _shift(prefix + "blocks.{i}.{rest}", 1, 2)),
        (r"vae_head\.conv_norm_out\.(weight|bias)", _sub(prefix + r"norm_out.\1")),
        (r"vae_head\.conv_out\.(weight|bias)", _sub(prefix + r"conv_out.\1")),
    ]


def _encoder_rules(vae_target: str | None) -> list[Rule]:
    fb = r"fusion_block\."
    rules: list[Rule] = [
        (r"pos_embed", _sub("encoder.pos_embed")),
        (r"patch_embed\.proj\.(weight|bias)", _sub(r"encoder.patch_embed.proj.\1")),
        (r"blocks\.(\d+)\.(.+)", _sub(r"encoder.blocks.\1.\2")),
        (r"norm\.(weight|bias)", _sub(r"encoder.pool.norm_in.\1")),
        (r"attn_pool\.(.+)", _sub(r"encoder.pool.\1")),
        (fb + r"vq_low_preprocess_layers\.(\d+)\.(.+)", _sub(r"head.blocks.\1.\2")),
        (fb + r"vq_low_pre_token_shuffle_head\.(.+)", _sub(r"head.expand.\1")),
        (fb + r"vq_low_post_token_shuffle_head\.(.+)", _sub(r"head.expand_post.\1")),
        (fb + r"vq_low\.fsq_pre_attn\.(\d+)\.(.+)", _sub(r"head.code_blocks.\1.\2")),
        (fb + r"vq_low\.project_in\.(weight|bias)", _sub(r"head.project_in.\1")),
        (fb + r"vq_low\.project_out\.(weight|bias)", _sub(r"dequant.project_out.\1")),
        (fb + r"vq_low_inverse_token_shuffle_head\.(.+)", _sub(r"dequant.merge.\1")),
        (fb + r"vq_low_postprocess_layers\.0\.(fc[12]\.(?:weight|bias))", _sub(r"dequant.post_mlp.\1")),
        (fb + r"vq_low_postprocess_layers\.([1-9]\d*)\.(.+)", _shift("dequant.res_blocks.{i}.{rest}", 1, 1)),
        (fb + r"vq_low_norm_trick_post_quantize_affine_weight", _sub("dequant.out_weight")),
        (fb + r"vq_low_norm_trick_post_quantize_affine_bias", _sub("dequant.out_bias")),
        *_latent_rules("recon."),
    ]
    # The encoder file repeats the whole VAE (also stored in the drawer file); it is used only when
    # there is no drawer file, otherwise the keys are recognised and dropped.
    rules.append((r"vae_head\.vae\.(.+)", _sub(r"vae.\1") if vae_target else (lambda m: "")))
    return rules


def _drawer_rules() -> list[Rule]:
    return [
        *_embedder_rules("drawer.features."),
        *_latent_rules("drawer.latent."),
        (r"vae_head\.vae\.(.+)", _sub(r"vae.\1")),
    ]


def _map_keys(state: dict[str, torch.Tensor], rules: list[Rule], source: str) -> dict[str, torch.Tensor]:
    compiled = [(re.compile(p), f) for p, f in rules]
    out: dict[str, torch.Tensor] = {}
    unknown = []
    for key, value in state.items():
        for pattern, fn in compiled:
            m = pattern.fullmatch(key)
            if m:
                target = fn(m)
                if target:  # "" = a known key that viq does not keep
                    out[target] = value
                break
        else:
            unknown.append(key)
    if unknown:
        raise ValueError(
            f"{source}: {len(unknown)} keys are not part of the official ViQ layout: "
            + ", ".join(unknown[:10])
            + (" ..." if len(unknown) > 10 else "")
        )
    return out


# ---------------------------------------------------------------------------------------------- files


def find_official_files(directory: str | Path) -> dict[str, Path]:
    """The official files present in ``directory``: keys ``encoder`` (required), ``embedder``,
    ``drawer`` (optional)."""
    directory = Path(directory)
    if not directory.is_dir():
        raise FileNotFoundError(f"{directory}: not a directory")
    encoders = sorted(directory.glob("model_viq_fsq_*.pth"))
    if len(encoders) != 1:
        raise FileNotFoundError(
            f"{directory}: expected exactly one model_viq_fsq_<size>.pth, found {[p.name for p in encoders] or 'none'}"
        )
    files = {"encoder": encoders[0]}
    for name, filename in (("embedder", "embedder.pth"), ("drawer", "index_drawer.pth")):
        if (directory / filename).is_file():
            files[name] = directory / filename
    return files


def is_official_dir(directory: str | Path) -> bool:
    try:
        find_official_files(directory)
        return True
    except FileNotFoundError:
        return False


def _torch_load(path: Path) -> dict[str, torch.Tensor]:
    try:
        # mmap: a 6.7 GB encoder file is paged in lazily, one tensor at a time, instead of read into
        # memory up front (load_official hands each tensor's pages back once it is converted).
        state = torch_load(path, mmap=True)
    except UntrustedFileError:
        raise
    except Exception as e:  # torch raises many types for corrupt pickles/zips
        raise ValueError(f"{path}: cannot read official weights ({type(e).__name__}: {e})") from None
    if not isinstance(state, dict) or not all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items()
    ):
        raise ValueError(f"{path}: expected a flat state dict of tensors (official converted format)")
    return state


def load_official_state_dicts(directory: str | Path) -> dict[str, dict[str, torch.Tensor]]:
    """The raw official state dicts: {"encoder": ..., "embedder": ..., "drawer": ...} (present files)."""
    return {name: _torch_load(path) for name, path in find_official_files(directory).items()}


# ------------------------------------------------------------------------------------------ detection


def _count(state: dict[str, torch.Tensor], pattern: str) -> int:
    rx = re.compile(pattern)
    return len({m.group(1) for k in state for m in [rx.fullmatch(k)] if m})


def _levels_for(code_dim: int, codebook_size: int | None, size_tag: str | None, source: str) -> tuple[int, ...]:
    if codebook_size is not None:
        for levels in FSQ_LEVELS.values():
            if len(levels) == code_dim and math.prod(levels) == codebook_size:
                return levels
        raise ValueError(
            f"{source}: no known FSQ level set has {code_dim} dims and {codebook_size} codes; pass levels="
        )
    if size_tag in FSQ_LEVELS and len(FSQ_LEVELS[size_tag]) == code_dim:
        return FSQ_LEVELS[size_tag]
    raise ValueError(
        f"{source}: cannot tell the FSQ levels (code dim {code_dim}) without embedder.pth/index_drawer.pth "
        f"or a size in the file name; pass levels="
    )


def detect_config(
    states: dict[str, dict[str, torch.Tensor]],
    *,
    size_tag: str | None = None,
    num_heads: int | None = None,
    levels: Iterable[int] | None = None,
    source: str = "<official weights>",
) -> ViQConfig:
    """Infer a :class:`ViQConfig` from official state dicts (see the module docstring)."""
    enc = states["encoder"]
    for key in (
        "pos_embed",
        "patch_embed.proj.weight",
        "blocks.0.mlp.fc1.weight",
        "fusion_block.vq_low.project_in.weight",
    ):
        if key not in enc:
            raise ValueError(f"{source}: encoder file lacks {key!r}; is this an official model_viq_fsq_<size>.pth?")
    n_pos, width = enc["pos_embed"].shape[1:]
    grid = math.isqrt(n_pos)
    if grid * grid != n_pos:
        raise ValueError(f"{source}: pos_embed has {n_pos} positions, not a square grid")
    if num_heads is None:
        num_heads = OFFICIAL_HEADS.get(width)
        if num_heads is None:
            raise ValueError(
                f"{source}: width {width} is not an official SigLIP2 width; the number of attention "
                f"heads cannot be read from weights: pass num_heads="
            )
    fb = "fusion_block."
    code_dim = enc[fb + "vq_low.project_in.weight"].shape[0]
    if levels is None:
        table = next(
            (
                states[n][k]
                for n, k in (("embedder", "ori_codebook.weight"), ("drawer", "ori_codebook.weight"))
                if n in states and k in states[n]
            ),
            None,
        )
        levels = _levels_for(code_dim, None if table is None else table.shape[0], size_tag, source)
    levels = tuple(levels)
    if len(levels) != code_dim:
        raise ValueError(f"{source}: levels {levels} have {len(levels)} dims, project_in outputs {code_dim}")
    expand_out = enc[fb + "vq_low_pre_token_shuffle_head.fc2.weight"].shape[0]
    decrease = enc.get(fb + "vq_low.fsq_pre_attn.0.attn.decrease_dim.weight")
    head_mlp = (
        enc[fb + "vq_low_preprocess_layers.0.mlp.fc1.weight"].shape[0]
        if fb + "vq_low_preprocess_layers.0.mlp.fc1.weight" in enc
        else 4 * width
    )
    res_hidden = enc.get(fb + "vq_low_postprocess_layers.1.mlp.fc1.weight")
    vae_source = states.get("drawer", enc)
    vae_conv_out = vae_source.get("vae_head.vae.decoder.conv_out.weight")
    latent_conv = vae_source.get("vae_head.conv_out.weight")
    latent_mlp = vae_source.get("vae_preprocess_layers.2.mlp.fc1.weight")
    return ViQConfig(
        name=f"official-{size_tag or 'viq'}",
        encoder=EncoderConfig(
            patch_size=enc["patch_embed.proj.weight"].shape[-1],
            width=width,
            depth=_count(enc, r"blocks\.(\d+)\.norm1\.weight"),
            num_heads=num_heads,
            mlp_hidden=enc["blocks.0.mlp.fc1.weight"].shape[0],
            pos_grid=grid,
            pool_head="attn_pool.latent" in enc,
        ),
        head=HeadConfig(
            levels=levels,
            num_blocks=_count(enc, fb + r"vq_low_preprocess_layers\.(\d+)\.norm1\.weight"),
            mlp_ratio=head_mlp / width,
            codes_per_patch=expand_out // width,
            code_blocks=_count(enc, fb + r"vq_low\.fsq_pre_attn\.(\d+)\.norm1\.weight"),
            attn_dim=width if decrease is None else decrease.shape[0],
            rope=True,
            res_blocks=_count(enc, fb + r"vq_low_postprocess_layers\.(\d+)\.norm\.weight"),
            res_mlp_ratio=2.0 if res_hidden is None else res_hidden.shape[0] / width,
        ),
        decoder=DecoderConfig(
            latent_blocks=_count(vae_source, r"vae_preprocess_layers\.(\d+)\.norm1\.weight"),
            latent_heads=num_heads,  # the official drawer uses the encoder's head count
            latent_mlp_ratio=4.0 if latent_mlp is None else latent_mlp.shape[0] / width,
            latent_channels=16 if latent_conv is None else latent_conv.shape[0] // 4,
        ),
        vae=VAEConfig(
            base_dim=96 if vae_conv_out is None else vae_conv_out.shape[1],
            z_dim=vae_source["vae_head.vae.post_quant_conv.weight"].shape[0]
            if "vae_head.vae.post_quant_conv.weight" in vae_source
            else 16,
        ),
    )


# -------------------------------------------------------------------------------------------- mapping


def map_official_state_dicts(
    states: dict[str, dict[str, torch.Tensor]], config: ViQConfig, source: str = "<official weights>"
) -> tuple[dict[str, torch.Tensor], tuple[str, ...]]:
    """Official state dicts -> (viq state dict, components it fills)."""
    has_drawer = "drawer" in states
    vae_in_encoder = any(k.startswith("vae_head.vae.") for k in states["encoder"])
    out = _map_keys(states["encoder"], _encoder_rules(None if has_drawer else "vae"), f"{source}/encoder")
    components = ["encoder"]
    if any(k.startswith("dequant.") for k in out):
        # The encoder's continuous path uses the exact float32 implicit codebook (not stored).
        out["dequant.codebook"] = FSQ(config.head.levels).implicit_codebook()
        components.append("dequant")
    if any(k.startswith("recon.") for k in out):
        components.append("recon")
    if "embedder" in states:
        out.update(_map_keys(states["embedder"], _embedder_rules("embedder."), f"{source}/embedder.pth"))
        components.append("embedder")
    if has_drawer:
        out.update(_map_keys(states["drawer"], _drawer_rules(), f"{source}/index_drawer.pth"))
        components.append("drawer")
    if has_drawer or vae_in_encoder:
        components.append("vae")
    return out, tuple(components)


def load_official(
    directory: str | Path,
    *,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    config: ViQConfig | None = None,
    num_heads: int | None = None,
    levels: Iterable[int] | None = None,
    components: Iterable[str] | None = None,
):
    """Load an official release directory into a :class:`viq.model.viq.ViQModel`.

    The files are memory-mapped and every tensor is converted to ``device`` / ``dtype`` on its own,
    its file pages handed back as soon as it is copied (:class:`viq.model.weights.MappedFile`): a
    float32 release loads into bfloat16 without a float32 copy of the model ever being resident.

    Args:
        directory: folder with ``model_viq_fsq_<size>.pth`` and optionally ``embedder.pth`` and
            ``index_drawer.pth``; or a Hub id ``owner/name`` (see :mod:`viq.model.hub`).
        device, dtype: where and in which float dtype to put the weights (they are stored in float32
            and bfloat16; FSQ arithmetic is float32 regardless).
        config: use this architecture instead of detecting it (it is still checked against shapes).
        num_heads: attention heads of the trunk, needed only for non-official widths.
        levels: FSQ levels, needed only when neither the codebook nor the file name tells them.
        components: load only these (default: everything the files contain).
    """

    directory = resolve_model(directory)
    files = find_official_files(directory)
    states = {name: _torch_load(path) for name, path in files.items()}
    mappings = [m for name, path in files.items() if (m := MappedFile.find(path, states[name].values()))]
    tag = re.fullmatch(r"model_viq_fsq_(.+)\.pth", files["encoder"].name).group(1)
    if config is None:
        config = detect_config(states, size_tag=tag, num_heads=num_heads, levels=levels, source=str(directory))
    state, available = map_official_state_dicts(states, config, source=str(directory))
    wanted = available if components is None else tuple(components)
    missing = set(wanted) - set(available)
    if missing:
        raise ValueError(f"{directory}: the official files hold no weights for {sorted(missing)} (have {available})")

    prefixes = tuple(p + "." for p in parts_of(wanted))
    state = {k: v for k, v in state.items() if k.startswith(prefixes)}

    enc = states["encoder"]
    fingerprint = code_fingerprint(
        config, enc["fusion_block.vq_low.project_in.weight"], enc["fusion_block.vq_low.project_in.bias"]
    )

    def release(t: torch.Tensor) -> None:
        for mapping in mappings:
            mapping.release(t)

    return ViQModel.from_state_dict(
        config,
        state,
        components=wanted,
        device=device,
        dtype=dtype,
        source=str(directory),
        fingerprint=fingerprint,
        release=release,
    )
