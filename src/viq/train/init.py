"""Initialising the ViQ encoder from SigLIP / SigLIP2 checkpoints (stage 1 starts here).

Two layouts are read, both into viq's timm-style names (``encoder.*``; the final LayerNorm and the
MAP head go to ``encoder.pool.*``):

**Hugging Face** (``hf-siglip:<dir>`` or ``hf-siglip:<owner/name>``, a Hub id fetched into or found
in the Hugging Face cache, see :mod:`viq.model.hub`): a ``SiglipVisionModel`` / ``SiglipModel`` (keys optionally
under ``vision_model.``) or ``Siglip2VisionModel`` directory (``config.json`` + safetensors/bin).

==========================================================  ======================================
Hugging Face key                                            viq key
==========================================================  ======================================
embeddings.patch_embedding.{weight,bias}                    encoder.patch_embed.proj.*
  (SigLIP2: Linear over (p, p, C)-ordered patches, reshaped to a conv kernel)
embeddings.position_embedding.weight (N, C)                 encoder.pos_embed (1, N, C)
encoder.layers.i.layer_norm{1,2}                            encoder.blocks.i.norm{1,2}
encoder.layers.i.self_attn.{q,k,v}_proj                     encoder.blocks.i.attn.qkv (concatenated)
encoder.layers.i.self_attn.out_proj                         encoder.blocks.i.attn.proj
encoder.layers.i.mlp.fc{1,2}                                encoder.blocks.i.mlp.fc{1,2}
post_layernorm                                              encoder.pool.norm_in
head.probe                                                  encoder.pool.latent
head.attention.in_proj_{weight,bias}  [q; k; v]             encoder.pool.q (q rows), pool.kv (k, v)
head.attention.out_proj                                     encoder.pool.proj
head.layernorm / head.mlp.fc{1,2}                           encoder.pool.norm / encoder.pool.mlp.*
==========================================================  ======================================

Hugging Face SigLIP uses the tanh GELU; the config records it (``encoder.mlp_act = "gelu_tanh"``).

**timm / open_clip** (``timm-siglip:<file>``, .pth/.bin/.safetensors, or one file of a Hub repository:
``timm-siglip:owner/name/<file>``, see :func:`timm_siglip_file`): timm ``VisionTransformer``
names, optionally under ``visual.trunk.`` (open_clip) or ``base_model.model.model.vision_tower.vision_tower.``
(the authors' training layout, e.g. their stage-1 release ``siglip2_g_anyres_s4.pth``, whose teacher
and LPIPS keys are left out), which are viq's own: ``patch_embed.proj``,
``pos_embed``, ``blocks.i.{norm1,attn.qkv,attn.proj,norm2,mlp.fc1,mlp.fc2}`` -> ``encoder.*``;
``norm`` -> ``encoder.pool.norm_in``; ``attn_pool.*`` -> ``encoder.pool.*``. Classifier heads
(``head.*``, ``fc_norm.*``) and open_clip's text tower are ignored.

The learned position table is resized bicubically (align_corners=False) to the configured grid
(``model.config.encoder.pos_grid``, e.g. 24x24 -> 128x128 as the official converter does); the table
as published is kept beside it (:attr:`SiglipCheckpoint.native_pos_embed`) for the distillation
teacher, which is the unmodified checkpoint (``viq.train.build.setup_teacher``), and
any number of heads not given in the recipe is taken from the checkpoint's config or the known
SigLIP widths (768: 12, 1152: 16, 1536: 16).
"""

from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from viq._untrusted import read_json, torch_load
from viq.model.config import DecoderConfig, EncoderConfig, HeadConfig, ViQConfig
from viq.model.hub import parse_hub_id, resolve

__all__ = [
    "SiglipCheckpoint",
    "load_siglip",
    "hf_siglip_state",
    "timm_siglip_state",
    "resize_pos_table",
    "AUTHORS_PREFIX",
]

KNOWN_HEADS = {768: 12, 1024: 16, 1152: 16, 1536: 16}
#: Key prefix of the vision tower in the authors' (PEFT-wrapped LLaVA) training checkpoints.
AUTHORS_PREFIX = "base_model.model.model.vision_tower.vision_tower."
#: open_clip / timm layouts, tried in order after the authors' prefix.
_TIMM_PREFIXES = ("visual.trunk.", "module.visual.trunk.", "trunk.")


def resize_pos_table(table: torch.Tensor, grid: int) -> torch.Tensor:
    """(1, G*G, C) -> (1, grid*grid, C), bicubic, align_corners=False (the official converter's rule)."""
    n, c = table.shape[1:]
    g = math.isqrt(n)
    if g * g != n:
        raise ValueError(f"position table of {n} entries is not a square grid")
    if g == grid:
        return table
    t = table[0].T.reshape(1, c, g, g).float()
    t = F.interpolate(t, size=(grid, grid), mode="bicubic", align_corners=False)
    return t.reshape(c, -1).T[None].to(table.dtype)


def _read_state(path: Path) -> dict[str, torch.Tensor]:
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))

    state = torch_load(path)  # weights_only: a file that pickles an object is refused, never run
    for key in ("state_dict", "model"):
        if isinstance(state, dict) and key in state and isinstance(state[key], dict):
            state = state[key]
    return state


def hf_siglip_state(directory: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """viq-named encoder tensors + encoder config fields from a Hugging Face SigLIP(2) directory."""
    cfg_path = directory / "config.json"
    if not cfg_path.is_file():
        raise FileNotFoundError(f"{directory}: no config.json (not a Hugging Face model directory)")
    hf_cfg = read_json(cfg_path)
    vision = hf_cfg.get("vision_config", hf_cfg)
    files = sorted(directory.glob("*.safetensors")) or sorted(directory.glob("pytorch_model*.bin"))
    if not files:
        raise FileNotFoundError(f"{directory}: no *.safetensors or pytorch_model*.bin weights")
    raw: dict[str, torch.Tensor] = {}
    for f in files:
        raw.update(_read_state(f))
    prefix = "vision_model." if any(k.startswith("vision_model.") for k in raw) else ""
    raw = {k[len(prefix) :]: v for k, v in raw.items() if k.startswith(prefix)}
    out: dict[str, torch.Tensor] = {}
    patch = raw["embeddings.patch_embedding.weight"]
    width = patch.shape[0]
    p = int(vision.get("patch_size", 16))
    if patch.ndim == 2:  # SigLIP2: Linear over patches flattened as (py, px, channel)
        patch = patch.view(width, p, p, -1).permute(0, 3, 1, 2).contiguous()
    out["encoder.patch_embed.proj.weight"] = patch
    out["encoder.patch_embed.proj.bias"] = raw["embeddings.patch_embedding.bias"]
    out["encoder.pos_embed"] = raw["embeddings.position_embedding.weight"][None]
    depth = 0
    for key in raw:
        m = re.fullmatch(r"encoder\.layers\.(\d+)\.layer_norm1\.weight", key)
        if m:
            depth = max(depth, int(m.group(1)) + 1)
    for i in range(depth):
        src, dst = f"encoder.layers.{i}.", f"encoder.blocks.{i}."
        for a, b in (
            ("layer_norm1", "norm1"),
            ("layer_norm2", "norm2"),
            ("mlp.fc1", "mlp.fc1"),
            ("mlp.fc2", "mlp.fc2"),
            ("self_attn.out_proj", "attn.proj"),
        ):
            for t in ("weight", "bias"):
                out[f"{dst}{b}.{t}"] = raw[f"{src}{a}.{t}"]
        for t in ("weight", "bias"):
            out[f"{dst}attn.qkv.{t}"] = torch.cat([raw[f"{src}self_attn.{n}_proj.{t}"] for n in "qkv"])
    if "post_layernorm.weight" in raw:
        out["encoder.pool.norm_in.weight"] = raw["post_layernorm.weight"]
        out["encoder.pool.norm_in.bias"] = raw["post_layernorm.bias"]
    has_head = "head.probe" in raw
    if has_head:
        out["encoder.pool.latent"] = raw["head.probe"]
        w, b = raw["head.attention.in_proj_weight"], raw["head.attention.in_proj_bias"]
        out["encoder.pool.q.weight"], out["encoder.pool.q.bias"] = w[:width], b[:width]
        out["encoder.pool.kv.weight"], out["encoder.pool.kv.bias"] = w[width:], b[width:]
        for a, b_ in (
            ("head.attention.out_proj", "proj"),
            ("head.layernorm", "norm"),
            ("head.mlp.fc1", "mlp.fc1"),
            ("head.mlp.fc2", "mlp.fc2"),
        ):
            for t in ("weight", "bias"):
                out[f"encoder.pool.{b_}.{t}"] = raw[f"{a}.{t}"]
    fields = {
        "patch_size": p,
        "width": width,
        "depth": depth,
        "num_heads": int(vision.get("num_attention_heads", KNOWN_HEADS.get(width, 16))),
        "mlp_hidden": raw["encoder.layers.0.mlp.fc1.weight"].shape[0],
        "norm_eps": float(vision.get("layer_norm_eps", 1e-6)),
        "mlp_act": "gelu_tanh" if "tanh" in str(vision.get("hidden_act", "gelu_pytorch_tanh")) else "gelu",
        "pool_head": has_head,
    }
    return out, fields


def timm_siglip_state(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """viq-named encoder tensors + encoder config fields from a timm / open_clip state dict."""
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file")
    raw = _read_state(path)
    for prefix in (AUTHORS_PREFIX, *_TIMM_PREFIXES):
        if any(k.startswith(prefix) for k in raw):
            # the authors' file also holds the teacher (another prefix) and LPIPS weights: neither is the trunk
            raw = {
                k[len(prefix) :]: v
                for k, v in raw.items()
                if k.startswith(prefix) and not k[len(prefix) :].startswith("perceptual_loss")
            }
            break
    if "pos_embed" not in raw or "patch_embed.proj.weight" not in raw:
        raise ValueError(f"{path}: not a timm/open_clip ViT state dict (no pos_embed / patch_embed.proj.weight)")
    out: dict[str, torch.Tensor] = {}
    for k, v in raw.items():
        if k.startswith(("patch_embed.", "blocks.")) or k == "pos_embed":
            out["encoder." + k] = v
        elif k.startswith("norm."):
            out["encoder.pool.norm_in." + k[5:]] = v
        elif k.startswith("attn_pool."):
            out["encoder.pool." + k[10:]] = v
    width = raw["pos_embed"].shape[-1]
    depth = 1 + max(int(m.group(1)) for k in raw for m in [re.match(r"blocks\.(\d+)\.", k)] if m)
    fields = {
        "patch_size": raw["patch_embed.proj.weight"].shape[-1],
        "width": width,
        "depth": depth,
        "num_heads": KNOWN_HEADS.get(width, 16),
        "mlp_hidden": raw["blocks.0.mlp.fc1.weight"].shape[0],
        "pool_head": "attn_pool.latent" in raw,
    }
    return out, fields


@dataclass
class SiglipCheckpoint:
    """A SigLIP checkpoint read for viq: the config (encoder from the checkpoint and the recipe), the
    viq-named state (position table resized to ``config.encoder.pos_grid``), and the position table as
    the checkpoint has it, ``(1, G*G, C)``."""

    config: ViQConfig
    state: dict[str, torch.Tensor]
    native_pos_embed: torch.Tensor

    def native_encoder(self) -> tuple[EncoderConfig, dict[str, torch.Tensor]]:
        """The encoder exactly as published: its config at the checkpoint's own grid and its
        ``encoder.*`` tensors with the unresized table (what the distillation teacher is)."""
        grid = math.isqrt(self.native_pos_embed.shape[1])
        state = {k: v for k, v in self.state.items() if k.startswith("encoder.")}
        state["encoder.pos_embed"] = self.native_pos_embed
        return dataclasses.replace(self.config.encoder, pos_grid=grid), state


#: File endings a ``timm-siglip:`` location names.
TIMM_SIGLIP_SUFFIXES = (".bin", ".pth", ".pt", ".safetensors")


def timm_siglip_file(location: str) -> Path:
    """The file of a ``timm-siglip:`` location: a local file as it is, else ``owner/name[@revision]/<file>``
    (e.g. ``timm/ViT-gopt-16-SigLIP2-384/open_clip_pytorch_model.bin``) is that one file of a Hub
    repository, fetched into the Hugging Face cache or found there (offline: ``HF_HUB_OFFLINE=1``), as
    ``hf download timm/ViT-gopt-16-SigLIP2-384 open_clip_pytorch_model.bin`` leaves it."""
    path = Path(location)
    if path.exists() or path.suffix not in TIMM_SIGLIP_SUFFIXES or parse_hub_id(str(path.parent)) is None:
        return path
    return (
        resolve(str(path.parent), allow_patterns=(path.name,), ignore_patterns=None, what="SigLIP checkpoint")
        / path.name
    )


def load_siglip(kind: str, location: str, overrides: dict[str, Any]) -> SiglipCheckpoint:
    """The ``hf-siglip`` / ``timm-siglip`` init sources, read into viq names.

    The config's encoder comes from the checkpoint (recipe overrides in ``model.config.encoder``
    win, e.g. ``num_heads`` or ``pos_grid``); head and decoders take their defaults at that width.
    """
    if kind == "hf-siglip":  # a local directory, or a Hub id owner/name[@revision][/subfolder]
        state, fields = hf_siglip_state(resolve(location, what="SigLIP checkpoint"))
    else:  # a local file, or a file of a Hub repository owner/name[@revision]/<file>
        state, fields = timm_siglip_state(timm_siglip_file(location))
    native = state["encoder.pos_embed"]
    fields["pos_grid"] = math.isqrt(native.shape[1])
    fields.update(overrides.get("encoder", {}))
    encoder = EncoderConfig(**fields)
    state["encoder.pos_embed"] = resize_pos_table(native, encoder.pos_grid)
    config = ViQConfig(
        name=f"viq-from-{Path(location).name}",
        encoder=encoder,
        head=HeadConfig(),
        decoder=DecoderConfig(latent_heads=encoder.num_heads),
    )
    return SiglipCheckpoint(config, state, native)
