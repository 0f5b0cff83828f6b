"""The parts of a ViQ network: one vocabulary and one builder, for inference and training alike.

=========  ==========================================  =====================================================
part       module (state-dict prefix = part name)      what it does
=========  ==========================================  =====================================================
encoder    :class:`~viq.model.encoder.ViTEncoder`      pixels -> packed trunk tokens (+ the MAP ``pool``,
                                                       used by self-distillation only)
head       :class:`~viq.model.head.CodeHead`           trunk tokens -> code values and indices (FSQ), or
                                                       the continuous bottleneck of stage 2-1
dequant    :class:`~viq.model.decoders.CodeEmbedder`   code values -> features (``x_low``): the encoder's
                                                       own way back, trained with it
recon      :class:`~viq.model.decoders.LatentDecoder`  features -> VAE latents (the reconstruction loss)
embedder   :class:`~viq.model.decoders.CodeEmbedder`   stored code indices -> features (the LLM's input)
drawer     :class:`~viq.model.decoders.CodeDrawer`     code indices -> features -> VAE latents
vae        the latent codec (:mod:`viq.model.vae`)     latents <-> pixels
=========  ==========================================  =====================================================

Users load *components* (``viq.load(..., components=["encoder"])``): groups of parts named after what
they do. The ``encoder`` component is the trunk with its code head -- what turns pixels into codes --
and every other component is the part of its name (:data:`COMPONENT_PARTS`). Training builds parts
(stage 1: the trunk alone). Every part is built here, by :func:`build_part`.
"""

from __future__ import annotations

from collections.abc import Iterable

from torch import nn

from viq.model.config import ViQConfig

__all__ = ["PARTS", "COMPONENTS", "COMPONENT_PARTS", "build_part", "parts_of", "components_of", "parts_in"]

#: Every part, in the order a network builds them (random initialisation draws in this order).
PARTS = ("encoder", "head", "dequant", "recon", "embedder", "drawer", "vae")
#: What users load, and the parts each brings.
COMPONENT_PARTS: dict[str, tuple[str, ...]] = {
    "encoder": ("encoder", "head"),
    "dequant": ("dequant",),
    "recon": ("recon",),
    "embedder": ("embedder",),
    "drawer": ("drawer",),
    "vae": ("vae",),
}
COMPONENTS = tuple(COMPONENT_PARTS)


def build_part(name: str, config: ViQConfig) -> nn.Module:
    """A freshly initialised part ``name`` of a network of ``config``."""
    from viq.model.decoders import CodeDrawer, CodeEmbedder, LatentDecoder
    from viq.model.encoder import ViTEncoder
    from viq.model.head import CodeHead
    from viq.model.vae import build_vae

    width = config.width
    if name == "encoder":
        return ViTEncoder(config.encoder)
    if name == "head":
        return CodeHead(width, config.head)
    if name in ("dequant", "embedder"):
        return CodeEmbedder(width, config.head)
    if name == "recon":
        return LatentDecoder(width, config.decoder)
    if name == "drawer":
        return CodeDrawer(width, config.head, config.decoder)
    if name == "vae":
        return build_vae(config.vae)
    raise ValueError(f"unknown part {name!r}; parts: {', '.join(PARTS)}")


def parts_of(components: Iterable[str]) -> tuple[str, ...]:
    """The parts of ``components`` (user-facing names), in :data:`PARTS` order."""
    components = tuple(components)
    unknown = set(components) - set(COMPONENTS)
    if unknown:
        raise ValueError(f"unknown components {sorted(unknown)}; choose from {COMPONENTS}")
    wanted = {p for c in components for p in COMPONENT_PARTS[c]}
    return tuple(p for p in PARTS if p in wanted)


def components_of(parts: Iterable[str]) -> tuple[str, ...]:
    """The components whose parts are all in ``parts``, in :data:`COMPONENTS` order."""
    have = set(parts)
    return tuple(c for c, ps in COMPONENT_PARTS.items() if set(ps) <= have)


def parts_in(keys: Iterable[str]) -> tuple[str, ...]:
    """The parts that state-dict ``keys`` hold weights of (a key's part is its first name component),
    in :data:`PARTS` order."""
    present = {key.split(".", 1)[0] for key in keys}
    return tuple(p for p in PARTS if p in present)
