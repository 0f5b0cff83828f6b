"""The ViQ model and its user-facing API: images -> :class:`~viq.formats.codes.Codes` -> features / latents / pixels.

>>> model = viq.load("weights/converted_16k")          # official directory or viq directory
>>> codes = model.encode(["a.jpg", "b.png"])           # native resolution, packed
>>> feats = model.embed(codes)                         # [(h*w, 1536), ...] features for an LLM
>>> images = model.reconstruct(codes)                  # [PIL.Image, ...] at the encoded size

A model is made of parts (:mod:`viq.model.parts`: ``encoder``, ``head``, ``dequant``, ``recon``,
``embedder``, ``drawer``, ``vae``), each optional; users load them by component (``encoder`` = the
trunk and its code head: pixels -> codes; ``embedder``: codes -> features; ``drawer``: codes -> VAE
latents; ``vae``: latents -> pixels; ``dequant`` / ``recon``: the encoder's own continuous features and
latent decoder, used in training). Training subclasses this model
(:class:`viq.train.model.TrainModel`) and goes through the same methods: :meth:`encode_features`
(pixels -> trunk -> codes -> features), :meth:`embed_codes` and :meth:`draw_codes`.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable, Iterable, Iterator, Sequence, Sized
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from viq._io import atomic_write
from viq._untrusted import check_image_size
from viq.formats.codes import Codes
from viq.formats.image import PreprocessConfig
from viq.model import hub
from viq.model.batching import (
    EncodeError,
    all_or_raise,
    check_pixels,
    encode_keyed,
    exact_float32,
    pack_by_budget,
    per_image_attention,
)
from viq.model.config import ViQConfig, get_preset
from viq.model.encoder import Packed, pad_to_patches
from viq.model.fingerprint import code_fingerprint
from viq.model.head import CodeHead
from viq.model.layers import set_attention_backend
from viq.model.parts import COMPONENT_PARTS, COMPONENTS, PARTS, build_part, components_of, parts_in, parts_of
from viq.model.quantizer import FSQ
from viq.model.rope import GoldenGateRoPE2d
from viq.model.vae import decode_latents
from viq.model.weights import check_state, convert_state, read_safetensors, safetensors_index, write_safetensors

__all__ = [
    "ViQModel",
    "Encoded",
    "COMPONENTS",
    "PARTS",
    "EncodeError",
    "check_weights",
    "pack_by_budget",
    "code_fingerprint",
]

#: Default packing budget (patch tokens per forward pass) for :meth:`ViQModel.encode`.
DEFAULT_BATCH_TOKENS = 8192
WEIGHTS_NAME = "model.safetensors"
CONFIG_NAME = "config.json"


@dataclasses.dataclass
class Encoded:
    """What the encoder side makes of a batch of images (:meth:`ViQModel.encode_features`), per image:

    * ``padded``: the (3, H, W) pixels zero-padded to whole patches;
    * ``grids``: their patch grids (h, w);
    * ``features``: (h*w, C) the dequantised features ``x_low`` (a model with ``dequant``), else the trunk
      output (a model without a head: stage 1), else None;
    * ``values``: packed (e*T, d) code values of the head (with a straight-through gradient), or None;
    * ``indices``: (e*h*w,) int32 codes in official order, or None (no head, or the continuous bottleneck);
    * ``aux``: the quantizer's auxiliary loss (SimVQ's commitment; 0 otherwise).
    """

    padded: list[torch.Tensor]
    grids: list[tuple[int, int]]
    packed: Packed
    features: list[torch.Tensor] | None
    values: torch.Tensor | None
    indices: list[torch.Tensor] | None
    aux: torch.Tensor


class ViQModel(nn.Module):
    """ViQ: any-resolution ViT -> position-aware head-wise FSQ codes -> features / VAE latents / pixels.

    Args:
        config: the architecture.
        components: what to build, by user-facing component (:data:`viq.model.parts.COMPONENTS`).
        parts: what to build, by part (:data:`viq.model.parts.PARTS`); overrides ``components``.
    """

    def __init__(
        self, config: ViQConfig, components: Iterable[str] = COMPONENTS, *, parts: Iterable[str] | None = None
    ) -> None:
        super().__init__()
        parts = parts_of(components) if parts is None else tuple(parts)
        unknown = set(parts) - set(PARTS)
        if unknown:
            raise ValueError(f"unknown parts {sorted(unknown)}; choose from {PARTS}")
        self.config = config
        for name in PARTS:  # one builder, in one order (random initialisation draws in this order)
            setattr(self, name, build_part(name, config) if name in parts else None)
        self.attention_backend = "auto"
        # Set by the loaders when the encoder is stored but not loaded (see fingerprint()).
        self._fingerprint: str | None = None

    # ------------------------------------------------------------------ properties
    @property
    def parts(self) -> tuple[str, ...]:
        """The parts this model holds (a subclass may hold its VAE outside its state)."""
        return tuple(p for p in PARTS if isinstance(getattr(self, p), nn.Module))

    @property
    def components(self) -> tuple[str, ...]:
        return components_of(self.parts)

    @property
    def levels(self) -> tuple[int, ...]:
        """The codes' alphabet (FSQ: its levels; :attr:`viq.model.config.HeadConfig.code_levels`)."""
        return self.config.head.code_levels

    @property
    def patch_size(self) -> int:
        return self.config.encoder.patch_size

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.parameters()).dtype

    def fingerprint(self) -> str:
        """The id of the code space: equal for two models iff they give the same codes
        (see :func:`code_fingerprint`). Written into ``.viq`` metadata by ``viq encode``.

        Available whenever the encoder is loaded, and for models loaded from files that contain it
        (viq or official directories), whatever components were loaded.
        """
        if self.head is not None:
            return code_fingerprint(self.config, self.head.project_in.weight, self.head.project_in.bias)
        if self._fingerprint is None:
            raise RuntimeError("this model has no encoder weights, so the id of its code space is unknown")
        return self._fingerprint

    def set_attention_backend(self, backend: str) -> None:
        """ "auto" | "sdpa" | "flex" | "flash": the kernel used by every attention layer."""
        self.attention_backend = backend
        set_attention_backend(self, backend)

    def _require(self, *names: str) -> None:
        for name in names:
            if any(getattr(self, part) is None for part in COMPONENT_PARTS[name]):
                raise RuntimeError(
                    f"this model was loaded without the {name!r} component (has: {', '.join(self.components)})"
                )

    # ------------------------------------------------------------------ the network's paths
    def encode_features(self, pixels: Sequence[torch.Tensor], *, min_rows: int = 0, dequantize: bool = True) -> Encoded:
        """Pixels -> trunk -> code head -> dequantised features: the one encoder-side forward pass, with
        gradients where the caller allows them (training) or none (:meth:`indices_packed`).

        Args:
            pixels: (3, H, W) normalised images of any size (padded to whole patches here).
            min_rows: see :meth:`indices_packed` (batch-invariant packs).
            dequantize: compute ``features`` from the codes with the ``dequant`` part (when the model has one).
        """
        device, dtype = self.device, self.dtype
        padded = [pad_to_patches(x.to(device=device, dtype=dtype), self.patch_size) for x in pixels]
        tokens, packed = self.encoder(padded, min_rows=min_rows)
        out = Encoded(padded, list(packed.grids), packed, None, None, None, tokens.new_zeros(()))
        if self.head is None:
            out.features = packed.split(tokens)
            return out
        values, indices, out.aux = self.head.quantize(tokens, packed)
        out.values = values
        if indices is not None:
            out.indices = packed.split(indices, self.config.head.codes_per_patch)
        if dequantize and self.dequant is not None:
            out.features = packed.split(self.dequant.from_code_values(values))
        return out

    def embed_codes(self, codes: Sequence[Codes]) -> tuple[list[torch.Tensor], list[tuple[int, int]]]:
        """Codes -> (per image (h*w, C) embedder features, grids): the offline path an MLLM trains on."""
        flat = torch.cat([c.flat() for c in codes]).to(self.embedder.project_out.weight.device)
        feats = self.embedder(flat)
        return list(feats.split([c.grid[0] * c.grid[1] for c in codes])), [c.grid for c in codes]

    def draw_codes(
        self, indices: Sequence[torch.Tensor], grids: Sequence[tuple[int, int]]
    ) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """Code indices (per image (e*h*w,), official order) -> (features, latents in the drawer's space)."""
        return self.drawer(list(indices), list(grids))

    # ------------------------------------------------------------------ encoding
    @torch.inference_mode()
    def encode(
        self,
        images: Any,
        *,
        preprocess: PreprocessConfig | None = None,
        batch_tokens: int = DEFAULT_BATCH_TOKENS,
        progress: bool = False,
        batch_invariant: bool | None = None,
    ) -> list[Codes]:
        """Encode images at their native resolution.

        Args:
            images: a list of image paths, encoded bytes, PIL images or uint8 (H, W, 3) arrays
                (a single image is accepted too and gives a list of one).
            preprocess: a :class:`viq.formats.image.PreprocessConfig` (resolution policy); default: native
                resolution capped to [256, 1024*1024] pixels, zero-padded to multiples of 16.
            batch_tokens: packing budget, patch tokens per forward pass.
            progress: show a progress bar.
            batch_invariant: codes independent of batch companions on any device (see
                :meth:`encode_stream`; default: on for accelerators, off on CPU where it holds anyway).

        Returns:
            one :class:`Codes` per image, in order; ``codes.image_size`` is the (height, width) of the
            pixels that were encoded (after resizing, before padding).

        Raises:
            viq.formats.image.ImageError: an image cannot be read (the message names it).
        """
        if not isinstance(images, (list, tuple)):
            images = [images]
        stream = self.encode_stream(
            images, preprocess=preprocess, batch_tokens=batch_tokens, progress=progress, batch_invariant=batch_invariant
        )
        return all_or_raise(stream)

    @torch.inference_mode()
    def encode_pixels(
        self,
        pixels: Sequence[torch.Tensor],
        *,
        batch_tokens: int = DEFAULT_BATCH_TOKENS,
        batch_invariant: bool | None = None,
    ) -> list[Codes]:
        """Encode already-normalised pixels without resizing (like the official ``forward_indices``).

        Args:
            pixels: list of float tensors (3, H, W) or (1, 3, H, W), values in [-1, 1] (``x/255``
                then ``(v - 0.5) / 0.5``). Each is zero-padded right/bottom to multiples of 16.

        Returns:
            one :class:`Codes` per tensor.
        """
        if isinstance(pixels, torch.Tensor):
            raise TypeError("encode_pixels takes a list of (3, H, W) tensors, not one tensor")
        # Check every tensor before any forward pass: a malformed list is a caller's bug, not a bad image.
        checked = [check_pixels(p, f"pixels[{i}]") for i, p in enumerate(pixels)]
        return all_or_raise(self.encode_stream(checked, batch_tokens=batch_tokens, batch_invariant=batch_invariant))

    @torch.inference_mode()
    def encode_stream(
        self,
        items: Iterable[Any],
        *,
        preprocess: PreprocessConfig | None = None,
        batch_tokens: int = DEFAULT_BATCH_TOKENS,
        progress: bool = False,
        batch_invariant: bool | None = None,
    ) -> Iterator[Codes | Exception]:
        """Encode a stream of images, packing them into forward passes of about ``batch_tokens`` patches:
        :meth:`encode_keyed` with each item's position as its key, yielding the results alone.

        Args:
            items: any iterable (read lazily, so it may be a generator) of
                - image sources: paths, encoded bytes, PIL images, uint8 (H, W, 3) arrays, prepared
                  with ``preprocess``;
                - :class:`viq.formats.image.PreparedImage` (already prepared; its ``source`` names it);
                - float tensors (3, H, W) or (1, 3, H, W) in [-1, 1], encoded as they are.
            preprocess, batch_tokens, progress, batch_invariant: as for :meth:`encode_keyed`.

        Yields:
            for each item, in input order, its :class:`Codes` or the exception that stopped it.
        """
        total = len(items) if isinstance(items, Sized) else None
        keyed = self.encode_keyed(
            enumerate(items),
            preprocess=preprocess,
            batch_tokens=batch_tokens,
            progress=progress,
            batch_invariant=batch_invariant,
            total=total,
        )
        for _, result in keyed:
            yield result

    @torch.inference_mode()
    def encode_keyed(
        self,
        pairs: Iterable[tuple[Any, Any]],
        *,
        preprocess: PreprocessConfig | None = None,
        batch_tokens: int = DEFAULT_BATCH_TOKENS,
        progress: bool = False,
        batch_invariant: bool | None = None,
        total: int | None = None,
    ) -> Iterator[tuple[Any, Codes | Exception]]:
        """Encode ``(key, item)`` pairs; yield ``(key, codes or error)`` in input order. The one encoding
        loop: :meth:`encode`, :meth:`encode_pixels`, :meth:`encode_stream`, ``viq encode`` and
        :func:`viq.extract.extract` all go through it. The key is anything the caller wants back with the
        item's result (an output path, a store item): no caller keeps a queue of what it sent. The
        arguments and results are described at :func:`viq.model.batching.encode_keyed`."""
        self._require("encoder")
        yield from encode_keyed(
            self,
            pairs,
            preprocess=preprocess or PreprocessConfig(patch_size=self.patch_size),
            batch_tokens=batch_tokens,
            progress=progress,
            batch_invariant=self.device.type != "cpu" if batch_invariant is None else batch_invariant,
            total=total,
        )

    @torch.inference_mode()
    def indices_packed(self, pixels: list[torch.Tensor], *, min_rows: int = 0) -> list[torch.Tensor]:
        """One packed forward pass: list of (3, H, W) normalised pixels (any H, W) -> list of
        (4*h*w,) int32 indices in official order (on the model's device).

        ``min_rows`` > 0 is the batch-invariant mode of :meth:`encode_stream`: the pack is filled to at
        least that many tokens and attention runs one image per call."""
        self._require("encoder")
        if not self.config.head.codebook_size:
            raise RuntimeError(
                f"this model's head quantizes with {type(self.head.quantizer).__name__}, a continuous "
                "quantizer: it has no codes (train stage 2-2 to get some)"
            )
        with exact_float32(self.device, self.dtype), per_image_attention(self, enabled=min_rows > 0):
            indices = self.encode_features(pixels, min_rows=min_rows, dequantize=False).indices
        assert indices is not None  # a discrete head gives indices (checked above)
        return indices

    # ------------------------------------------------------------------ decoding
    def _codes_list(self, codes: Codes | Sequence[Codes]) -> list[Codes]:
        codes = [codes] if isinstance(codes, Codes) else list(codes)
        for i, c in enumerate(codes):
            if not isinstance(c, Codes):
                raise TypeError(f"codes[{i}]: expected viq.Codes, got {type(c).__name__}")
            if c.levels != self.levels:
                raise ValueError(f"codes[{i}] use the levels {c.levels}, this model's codes use {self.levels}")
            if c.codes_per_patch != self.config.head.codes_per_patch:
                raise ValueError(
                    f"codes[{i}] have {c.codes_per_patch} codes per patch, the model expects "
                    f"{self.config.head.codes_per_patch}"
                )
        return codes

    @torch.inference_mode()
    def embed(self, codes: Codes | Sequence[Codes]) -> list[torch.Tensor]:
        """Codes -> features for an LLM: one (h*w, C) tensor per image, rows in row-major patch order."""
        self._require("embedder")
        codes = self._codes_list(codes)
        if not codes:
            return []
        return self.embed_codes(codes)[0]

    @torch.inference_mode()
    def draw(self, codes: Codes | Sequence[Codes], *, max_pixels: int | None = None) -> list[torch.Tensor]:
        """Codes -> raw VAE latents (what :meth:`decode_latents` takes): one (16, 2h, 2w) tensor per
        image. A drawer trained on normalised latents (``config.decoder.latent_mean``) is inverted here.
        Codes whose image (grid x patch size) exceeds ``max_pixels`` (default
        ``viq._untrusted.LIMITS.max_decode_pixels``) are refused before anything is computed."""
        self._require("drawer")
        codes = self._codes_list(codes)
        if not codes:
            return []
        for i, c in enumerate(codes):
            check_image_size(
                c.grid[0] * c.patch_size,
                c.grid[1] * c.patch_size,
                f"codes {i} (grid {c.grid})",
                limit=max_pixels,
                flag="max_pixels / --max-pixels",
            )
        _, latents = self.draw_codes([c.flat().to(self.device) for c in codes], [c.grid for c in codes])
        return [self.drawer.latent.to_raw(z) for z in latents]

    @torch.inference_mode()
    def decode_latents(self, latents: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """VAE latents (16, h, w) -> pixels (3, 8h, 8w) float in [-1, 1] (the VAE's dtype)."""
        self._require("vae")
        return [decode_latents(self.vae, z) for z in latents]

    @torch.inference_mode()
    def reconstruct(
        self, codes: Codes | Sequence[Codes], *, crop: bool = True, max_pixels: int | None = None
    ) -> list[Any]:
        """Codes -> PIL RGB images (refused above ``max_pixels`` a canvas, as in :meth:`draw`).

        Pixels are rounded to the nearest uint8 level (the official code truncates, which darkens by
        half a level on average). With ``crop`` (default) each image is cut back to
        ``codes.image_size`` — the official code returns the zero-padded canvas instead.
        """
        from PIL import Image

        codes = self._codes_list(codes)
        images = []
        for c, latent in zip(codes, self.draw(codes, max_pixels=max_pixels)):
            x = self.decode_latents([latent])[0].float()
            arr = ((x * 0.5 + 0.5).clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).cpu().numpy()
            if crop and c.image_size is not None:
                arr = arr[: c.image_size[0], : c.image_size[1]]
            images.append(Image.fromarray(np.ascontiguousarray(arr)))
        return images

    # ------------------------------------------------------------------ persistence
    def save_pretrained(self, directory: str | os.PathLike, *, repo_id: str | None = None) -> None:
        """Write ``config.json``, ``model.safetensors`` (all loaded components) and a model card
        ``README.md`` (``library_name: viq``; ``repo_id`` goes into its examples; one not written by viq
        is kept) to ``directory``, each under a temporary name renamed into place."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        meta = {"format": "viq", "components": ",".join(self.components), "parts": ",".join(self.parts)}
        if self.head is not None or self._fingerprint is not None:
            meta["fingerprint"] = self.fingerprint()
        write_safetensors(directory / WEIGHTS_NAME, self.state_dict(), meta)
        atomic_write(directory / CONFIG_NAME, lambda p: Path(p).write_text(self.config.to_json() + "\n"))
        hub.write_model_card(self, directory, repo_id)

    def push_to_hub(self, repo_id: str, **kwargs: Any) -> str:
        """Upload weights, config and card to the Hub repo ``repo_id``: :func:`viq.model.hub.push_to_hub`."""
        return hub.push_to_hub(self, repo_id, **kwargs)

    @classmethod
    def from_pretrained(
        cls,
        directory: str | os.PathLike,
        *,
        device: str | torch.device = "cpu",
        dtype: torch.dtype = torch.float32,
        components: Iterable[str] | None = None,
        revision: str | None = None,
        subfolder: str | None = None,
        parts: Iterable[str] | None = None,
    ) -> ViQModel:
        """Load a viq-format directory (``config.json`` + ``model.safetensors``) or Hub repository
        (``owner/name``, :mod:`viq.model.hub`), tensor by tensor (:func:`viq.model.weights.read_safetensors`).

        ``components`` (or, finer, ``parts``) selects what to load; default: every part stored."""
        directory = hub.resolve_model(directory, revision=revision, subfolder=subfolder)
        config_path, weights_path = directory / CONFIG_NAME, directory / WEIGHTS_NAME
        for path in (config_path, weights_path):
            if not path.is_file():
                raise FileNotFoundError(f"{path}: missing (a viq model directory has {CONFIG_NAME} and {WEIGHTS_NAME})")
        config = ViQConfig.load(config_path)
        keys, meta = safetensors_index(weights_path)
        stored_parts = parts_in(keys)
        if parts is not None:
            parts = tuple(parts)
            if set(parts) - set(stored_parts):
                raise ValueError(
                    f"{weights_path}: has no weights for the parts {sorted(set(parts) - set(stored_parts))} "
                    f"(has {stored_parts})"
                )
        elif components is None:
            parts = stored_parts
        else:
            stored = components_of(stored_parts)
            if set(components) - set(stored):
                raise ValueError(
                    f"{weights_path}: has no weights for {sorted(set(components) - set(stored))} (has {stored})"
                )
            parts = parts_of(components)
        fingerprint = meta.get("fingerprint")
        if "head.project_in.weight" in keys:
            proj = read_safetensors(weights_path, ["head.project_in.weight", "head.project_in.bias"])
            fingerprint = code_fingerprint(config, proj["head.project_in.weight"], proj["head.project_in.bias"])
        prefixes = tuple(p + "." for p in parts)
        state = read_safetensors(weights_path, [k for k in keys if k.startswith(prefixes)], device=device, dtype=dtype)
        return cls.from_state_dict(
            config, state, parts=parts, device=device, dtype=dtype, source=str(weights_path), fingerprint=fingerprint
        )

    @classmethod
    def from_state_dict(
        cls,
        config: ViQConfig,
        state: dict[str, torch.Tensor],
        *,
        components: Iterable[str] | None = None,
        parts: Iterable[str] | None = None,
        device: str | torch.device = "cpu",
        dtype: torch.dtype = torch.float32,
        source: str = "<state dict>",
        fingerprint: str | None = None,
        release: Callable[[torch.Tensor], None] | None = None,
    ) -> ViQModel:
        """Build a model whose weights are exactly ``state`` (viq key names), checking every key.

        ``fingerprint``: the code-space id, for models loaded without their encoder. ``release``: see
        :func:`viq.model.weights.convert_state` (official loading hands back memory-mapped file pages).

        Modules are created on the meta device and the tensors converted one at a time to ``device`` /
        ``dtype`` and assigned: no random initialisation, and no second full copy of the weights.
        """
        parts = tuple(parts) if parts is not None else parts_of(components if components is not None else COMPONENTS)
        with torch.device("meta"):
            model = cls(config, parts=parts)
        check_state(model.state_dict(), state, source)
        model.load_state_dict(convert_state(state, device, dtype, release), strict=True, assign=True)
        model._rebuild_constants()
        model._fingerprint = fingerprint
        model.to(device=device, dtype=dtype)  # the rebuilt constants; the weights are there already
        model.eval()
        return model

    @torch.no_grad()
    def sync_codebooks(self) -> None:
        """Copy a learned codebook (SimVQ) from the head into the embedder and the drawer, which read
        indices through their own copy (:class:`~viq.model.decoders.CodeEmbedder`). Fixed codebooks
        (FSQ) are left as they are: the released embedders carry their own bf16-rounded copy."""
        if self.head is None or not self.config.head.quantizer_kind.learned_codebook:
            return
        codebook = self.head.quantizer.codebook()
        for module in (self.dequant, self.embedder, self.drawer.features if self.drawer is not None else None):
            if module is not None and module.codebook is not None:
                module.codebook.copy_(codebook.to(module.codebook.dtype))

    def _rebuild_constants(self) -> None:
        """Recreate the non-persistent tensors (FSQ tables, RoPE frequencies) on the CPU."""
        for module in self.modules():
            if isinstance(module, FSQ):
                fresh = FSQ(module.levels, module.eps)
                module._levels, module._basis = fresh._levels, fresh._basis
            if isinstance(module, CodeHead) and module.rope is not None:
                r = module.rope
                module.rope = GoldenGateRoPE2d(
                    r.head_dim,
                    r.num_heads,
                    module.cfg.rope_min_freq,
                    module.cfg.rope_max_freq,
                    module.cfg.rope_zero_fraction,
                )

    @classmethod
    def from_config(
        cls, config: ViQConfig | str, *, seed: int | None = None, components: Iterable[str] = COMPONENTS
    ) -> ViQModel:
        """A randomly initialised model (tests, benchmarks, training from scratch)."""
        if isinstance(config, str):
            config = get_preset(config)
        if seed is not None:
            torch.manual_seed(seed)
        return cls(config, components).eval()


def check_weights(
    config: ViQConfig, state: dict[str, torch.Tensor], components: Iterable[str], source: str = "<state dict>"
) -> None:
    """Raise ValueError (naming ``source`` and what differs) unless ``state`` has exactly the keys and
    shapes of a model of ``config`` with ``components``: the check :meth:`ViQModel.from_state_dict`
    makes, without loading anything (the modules are built on the meta device)."""
    with torch.device("meta"):
        expected = ViQModel(config, components).state_dict()
    check_state(expected, state, source)
