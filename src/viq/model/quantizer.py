"""Quantizers: the protocol every quantizer follows, its registry, and the three viq ships.

The code head, the embedder, the drawer and training ask a quantizer for the same few things
(:class:`Quantizer`): its code dimension, its codebook size, ``quantize`` (values, indices, auxiliary
loss), ``dequantize`` (indices -> values) and ``codebook`` (the values of every index). A quantizer
*kind* (:class:`QuantizerKind`) tells a :class:`~viq.model.config.HeadConfig` how to build one and what
it will be before it is built; ``head.quantizer: <name>`` picks a registered kind
(:func:`register_quantizer`). Three are registered here:

=============  ===============================================================  ==============
kind           what it is                                                        codebook
=============  ===============================================================  ==============
``fsq``        :class:`FSQ`, the paper's (implicit codebook, ``prod(levels)``)   fixed
``simvq``      :class:`SimVQ`, the learned-codebook ablation                     learned
``bottleneck`` :class:`Bottleneck`, stage 2-1's continuous proximal space       none (0)
=============  ===============================================================  ==============

How codes are stored does not depend on the kind: ``.viq`` files and code stores describe a codebook
by its *alphabet* ``levels``, a mixed radix whose product is the codebook size (FSQ: its levels; any
other kind: :func:`radix_levels` of its size, e.g. 4096 -> (128, 32)). The embedder and the drawer
carry a copy of the codebook (K, d) in their weights, so they read the indices of any discrete kind;
a learned codebook is copied from the head when a stage output is written
(:meth:`viq.model.viq.ViQModel.sync_codebooks`).

Finite Scalar Quantization (Mentzer et al. 2023) with the official ViQ arithmetic: each of the d = ``len(levels)`` channels is bounded with a shifted tanh and rounded to one of
``levels[k]`` integer values; the tuple of rounded values is the code and its mixed-radix number
(dim 0 least significant) the index. The codebook is implicit: ``indices_to_codes`` computes it.

Quantization always runs in float32, whatever the input dtype: in bfloat16 the bounded values cannot
be rounded reliably and whole codebooks collapse (the failure reported in vector-quantize-pytorch
#114). The float32 formulas reproduce the official ones bit for bit.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple, Protocol, runtime_checkable

import torch
import torch.nn.functional as F
from torch import nn

#: a :class:`viq.model.config.HeadConfig` (not imported: the config module imports this one)
HeadConfig = Any

__all__ = [
    "FSQ",
    "Bottleneck",
    "SimVQ",
    "Quantized",
    "Quantizer",
    "QuantizerKind",
    "QUANTIZERS",
    "register_quantizer",
    "get_quantizer_kind",
    "radix_levels",
]


class Quantized(NamedTuple):
    """What :meth:`Quantizer.quantize` returns."""

    #: (..., dim) float32 values, with a gradient to the input (straight-through, rotation trick, ...)
    values: torch.Tensor
    #: (...) int32 indices in [0, codebook_size), or None for a continuous quantizer
    indices: torch.Tensor | None
    #: scalar auxiliary loss (a commitment loss; zero when the quantizer has none)
    loss: torch.Tensor


@runtime_checkable
class Quantizer(Protocol):
    """What the code head, the decoders and training ask of a quantizer (an ``nn.Module``)."""

    @property
    def dim(self) -> int:
        """Width of the values (and of the input ``z``)."""
        ...

    @property
    def codebook_size(self) -> int:
        """Number of codes K; 0 for a continuous quantizer (no indices)."""
        ...

    def quantize(self, z: torch.Tensor) -> Quantized:
        """(..., dim) any float dtype -> :class:`Quantized`."""
        ...

    def dequantize(self, indices: torch.Tensor) -> torch.Tensor:
        """(...) int indices in [0, K) -> (..., dim) float32 values (those ``quantize`` gives)."""
        ...

    def codebook(self) -> torch.Tensor | None:
        """(K, dim) float32: the values of every index; None for a continuous quantizer."""
        ...


@dataclass(frozen=True)
class QuantizerKind:
    """A registered quantizer: how a :class:`~viq.model.config.HeadConfig` builds one, and what it is
    before it is built (configs check shapes and sizes without building, and without drawing random
    numbers)."""

    name: str
    #: HeadConfig -> a module following :class:`Quantizer`
    build: Callable[[HeadConfig], nn.Module]
    #: HeadConfig -> the code dimension (``Quantizer.dim``)
    dim: Callable[[HeadConfig], int]
    #: HeadConfig -> the codebook size (0: continuous)
    codebook_size: Callable[[HeadConfig], int]
    #: the codebook is trained (it lives in the head's weights; the decoders' copies are refreshed from it)
    learned_codebook: bool = False
    #: HeadConfig -> the codes' alphabet (mixed radix, product = codebook size); default :func:`radix_levels`
    levels: Callable[[HeadConfig], tuple[int, ...]] | None = None
    #: HeadConfig -> parameters of the quantizer itself (for the size estimate refused before building)
    parameters: Callable[[HeadConfig], int] = lambda cfg: 0

    def alphabet(self, cfg: HeadConfig) -> tuple[int, ...]:
        """The codes' alphabet for ``cfg`` (``()`` for a continuous quantizer)."""
        if self.levels is not None:
            return tuple(self.levels(cfg))
        size = self.codebook_size(cfg)
        return radix_levels(size) if size else ()


#: Every quantizer kind by name (``head.quantizer``); :func:`register_quantizer` adds one.
QUANTIZERS: dict[str, QuantizerKind] = {}


def register_quantizer(kind: QuantizerKind, *, replace: bool = False) -> QuantizerKind:
    """Make ``kind`` available as ``head.quantizer: <kind.name>`` (ValueError if the name is taken,
    unless ``replace``). Returns ``kind``."""
    if kind.name in QUANTIZERS and not replace:
        raise ValueError(f"a quantizer named {kind.name!r} is already registered")
    QUANTIZERS[kind.name] = kind
    return kind


def get_quantizer_kind(name: str) -> QuantizerKind:
    """The registered kind ``name``; ValueError naming the known ones otherwise."""
    try:
        return QUANTIZERS[name]
    except KeyError:
        raise ValueError(f"quantizer must be one of {sorted(QUANTIZERS)}, got {name!r}") from None


def radix_levels(size: int) -> tuple[int, ...]:
    """A codebook of ``size`` codes as a mixed radix of factors in [2, 255] (what ``.viq`` files and
    stores record): its prime factors, largest first, merged greedily while a factor stays <= 255.
    ValueError if ``size`` has a prime factor above 255 (such a codebook cannot be described)."""
    if size < 2:
        raise ValueError(f"a codebook needs at least 2 codes, got {size}")
    primes, rest, p = [], size, 2
    while p * p <= rest:
        while rest % p == 0:
            primes.append(p)
            rest //= p
        p += 1
    if rest > 1:
        primes.append(rest)
    if max(primes) > 255:
        raise ValueError(
            f"codebook size {size} has the prime factor {max(primes)} > 255: codes are stored as digits "
            "of at most 255 values each, choose a size whose prime factors are all <= 255 (e.g. a power of 2)"
        )
    factors: list[int] = []
    for prime in sorted(primes, reverse=True):
        for i, f in enumerate(factors):
            if f * prime <= 255:
                factors[i] = f * prime
                break
        else:
            factors.append(prime)
    return tuple(sorted(factors, reverse=True))


class FSQ(nn.Module):
    """FSQ with an implicit codebook; no learned parameters (the state dict is empty).

    Args:
        levels: number of values per channel, e.g. (8, 8, 8, 6, 5) -> K = 15360 codes.
        eps: the official bound margin (values are bounded to +-(L-1)(1+eps)/2 before rounding).
    """

    _levels: torch.Tensor
    _basis: torch.Tensor

    def __init__(self, levels: Sequence[int], eps: float = 1e-3) -> None:
        super().__init__()
        self.levels = tuple(int(v) for v in levels)
        self.eps = eps
        levels_t = torch.tensor(self.levels, dtype=torch.int32)
        basis = torch.cumprod(torch.tensor((1,) + self.levels[:-1], dtype=torch.int64), dim=0)
        # Buffers are non-persistent: they are a function of `levels`, which the config carries.
        self.register_buffer("_levels", levels_t, persistent=False)
        self.register_buffer("_basis", basis, persistent=False)

    @property
    def codebook_size(self) -> int:
        return math.prod(self.levels)

    @property
    def dim(self) -> int:
        return len(self.levels)

    def _constants(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        # Same expressions, dtypes and order of operations as the official code, so the float32
        # results are bit-identical: int32 levels * python float -> float32.
        levels = self._levels
        half_l = (levels - 1) * (1 + self.eps) / 2
        offset = torch.where(levels % 2 == 0, 0.5, 0.0)
        shift = (offset / half_l).atanh()
        return half_l, offset, shift, levels // 2

    def bound(self, z: torch.Tensor) -> torch.Tensor:
        """(..., d) any float dtype -> (..., d) float32 bounded values in (-L/2, L/2)."""
        half_l, offset, shift, _ = self._constants()
        return (z.float() + shift).tanh() * half_l - offset

    def quantize(self, z: torch.Tensor) -> Quantized:
        """Quantize continuous values.

        Args:
            z: (..., d) pre-quantization values (output of the projection), any float dtype.

        Returns:
            values: (..., d) float32 code values in [-1, 1] (q / (L // 2)), with a straight-through
                gradient to ``z``.
            indices: (...) int32 codebook indices in [0, K).
            loss: 0 (FSQ has no auxiliary loss).
        """
        bounded = self.bound(z)
        rounded = bounded.round()
        # Straight-through estimator: forward value round(b), gradient of b.
        quantized = bounded + (rounded - bounded).detach()
        half_width = self._levels // 2
        codes = quantized / half_width
        indices = self._level_indices_to_indices(rounded.to(torch.int64) + half_width)
        return Quantized(codes, indices, codes.new_zeros(()))

    def forward(self, z: torch.Tensor) -> Quantized:
        return self.quantize(z)

    def dequantize(self, indices: torch.Tensor) -> torch.Tensor:
        """(...) int indices -> (..., d) float32 code values (:meth:`indices_to_codes`)."""
        return self.indices_to_codes(indices)

    def codebook(self) -> torch.Tensor:
        """(K, d) float32: the implicit codebook (:meth:`implicit_codebook`)."""
        return self.implicit_codebook()

    def _level_indices_to_indices(self, level_indices: torch.Tensor) -> torch.Tensor:
        return (level_indices.to(torch.int64) * self._basis).sum(-1).to(torch.int32)

    def codes_to_indices(self, codes: torch.Tensor) -> torch.Tensor:
        """(..., d) code values (q / (L // 2)) -> (...) int32 indices."""
        if codes.shape[-1] != self.dim:
            raise ValueError(f"codes have {codes.shape[-1]} channels, FSQ has {self.dim} levels")
        half_width = self._levels // 2
        level_indices = (codes.float() * half_width).round().to(torch.int64) + half_width
        return self._level_indices_to_indices(level_indices)

    def indices_to_level_indices(self, indices: torch.Tensor) -> torch.Tensor:
        """(...) indices -> (..., d) int64 per-channel level indices in [0, L_k)."""
        return (indices.to(torch.int64)[..., None] // self._basis) % self._levels

    def indices_to_codes(self, indices: torch.Tensor) -> torch.Tensor:
        """(...) int indices -> (..., d) float32 code values."""
        if indices.numel() and indices.device.type != "meta":
            if int(indices.min()) < 0 or int(indices.max()) >= self.codebook_size:
                raise ValueError(f"indices out of range [0, {self.codebook_size})")
        half_width = self._levels // 2
        return (self.indices_to_level_indices(indices) - half_width) / half_width

    def implicit_codebook(self) -> torch.Tensor:
        """(K, d) float32: the code value of every index."""
        return self.indices_to_codes(torch.arange(self.codebook_size, device=self._levels.device))

    def extra_repr(self) -> str:
        return f"levels={self.levels}, codebook_size={self.codebook_size}"


class Bottleneck(nn.Module):
    """Stage 2-1 "proximal representation": a continuous bottleneck with a norm limit, no rounding.

    The values are the projected features mapped onto a constraint set, so that the later FSQ stage
    starts from a compact space:

    * ``"linf"``: f / max(max_i |f_i|, 1e-6): onto the surface of the unit hypercube (the paper's
      L-infinity projection),
    * ``"l2"``: f / max(||f||_2, 1e-6): onto the unit sphere,
    * ``"tanh"``: elementwise tanh, into the open cube,
    * ``"none"``: the plain linear bottleneck.
    """

    #: the continuous quantizer has no codes
    codebook_size = 0

    def __init__(self, limit: str = "linf", eps: float = 1e-6, dim: int = 0) -> None:
        super().__init__()
        if limit not in ("none", "l2", "linf", "tanh"):
            raise ValueError(f"unknown bottleneck limit {limit!r}")
        self.limit = limit
        self.eps = eps
        #: width of the values (0: not known, when the module only limits inside a head's layout)
        self.dim = dim

    def quantize(self, z: torch.Tensor) -> Quantized:
        """(..., D) -> limited values (same dtype: stage 2-1 keeps the compute dtype), no indices, no loss."""
        return Quantized(self(z), None, z.new_zeros(()))

    def dequantize(self, indices: torch.Tensor) -> torch.Tensor:
        raise RuntimeError("the continuous bottleneck has no codes to dequantize (it is stage 2-1's quantizer)")

    def codebook(self) -> None:
        return None

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        """(..., D) -> (..., D) limited values, same dtype."""
        if self.limit == "linf":
            return z / z.abs().amax(-1, keepdim=True).clamp_min(self.eps)
        if self.limit == "l2":
            return z / z.norm(dim=-1, keepdim=True).clamp_min(self.eps)
        if self.limit == "tanh":
            return z.tanh()
        return z

    def extra_repr(self) -> str:
        return f"limit={self.limit!r}"


class SimVQ(nn.Module):
    """SimVQ (Zhu et al. 2024), the learned-codebook alternative in the paper's ablation.

    A frozen Gaussian codebook E (K, d) ~ N(0, 1/d) is reparameterised by a learned linear map W,
    codebook = E W^T; each vector takes its nearest code (Euclidean). Gradients reach the input through
    the rotation trick (Fifty et al. 2024), and the loss is MSE(sg x, q) + beta MSE(x, sg q).
    Distances and the search run in float32.
    """

    frozen_codebook: torch.Tensor

    def __init__(self, codebook_size: int, dim: int, beta: float = 0.25) -> None:
        super().__init__()
        self.beta = beta
        self.register_buffer("frozen_codebook", torch.randn(codebook_size, dim) * dim**-0.5)
        self.proj = nn.Linear(dim, dim, bias=False)

    @property
    def codebook_size(self) -> int:
        return self.frozen_codebook.shape[0]

    @property
    def dim(self) -> int:
        return self.frozen_codebook.shape[1]

    def codebook(self) -> torch.Tensor:
        """(K, d) float32 effective codebook."""
        return self.proj(self.frozen_codebook.to(self.proj.weight.dtype)).float()

    def quantize(self, z: torch.Tensor) -> Quantized:
        """(N, d) -> values (N, d) float32 with the rotation-trick gradient, indices (N,) int32, loss."""
        x = z.float()
        codebook = self.codebook()
        with torch.no_grad():
            indices = torch.cdist(x, codebook).argmin(-1)
        q = codebook[indices]
        loss = F.mse_loss(x.detach(), q) + self.beta * F.mse_loss(x, q.detach())
        return Quantized(_rotation_trick(x, q), indices.to(torch.int32), loss)

    def forward(self, z: torch.Tensor) -> Quantized:
        return self.quantize(z)

    def dequantize(self, indices: torch.Tensor) -> torch.Tensor:
        """(...) int indices -> (..., d) float32 codebook rows."""
        return self.codebook()[indices.long()]

    def extra_repr(self) -> str:
        return f"codebook_size={self.codebook_size}, dim={self.frozen_codebook.shape[1]}"


def _rotation_trick(x: torch.Tensor, q: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """Value q, gradient through the rotation that maps x's direction to q's, scaled by |q|/|x|.

    With r = (x_hat + q_hat)/|x_hat + q_hat| the rotation is R = I - 2 r r^T + 2 q_hat x_hat^T;
    all factors are detached, so d(out)/dx = (|q|/|x|) R.
    """
    x_norm = x.norm(dim=-1, keepdim=True).clamp_min(eps)
    q_norm = q.norm(dim=-1, keepdim=True).clamp_min(eps)
    x_hat, q_hat = (x / x_norm).detach(), (q / q_norm).detach()
    r = x_hat + q_hat
    r = (r / r.norm(dim=-1, keepdim=True).clamp_min(eps)).detach()
    rotated = x - 2 * (x * r).sum(-1, keepdim=True) * r + 2 * (x * x_hat).sum(-1, keepdim=True) * q_hat
    return rotated * (q_norm / x_norm).detach()


# ---------------------------------------------------------------------------------------------- registry
register_quantizer(
    QuantizerKind(
        "fsq",
        build=lambda cfg: FSQ(cfg.levels, cfg.fsq_eps),
        dim=lambda cfg: len(cfg.levels),
        codebook_size=lambda cfg: math.prod(cfg.levels),
        levels=lambda cfg: tuple(cfg.levels),
    )
)
register_quantizer(
    QuantizerKind(
        "simvq",
        build=lambda cfg: SimVQ(cfg.simvq_codebook_size, cfg.simvq_dim),
        dim=lambda cfg: cfg.simvq_dim,
        codebook_size=lambda cfg: cfg.simvq_codebook_size,
        learned_codebook=True,
        parameters=lambda cfg: cfg.simvq_codebook_size * cfg.simvq_dim,
    )
)
register_quantizer(
    QuantizerKind(
        "bottleneck",
        build=lambda cfg: Bottleneck(cfg.bottleneck_limit, dim=cfg.bottleneck_dim),
        dim=lambda cfg: cfg.bottleneck_dim,
        codebook_size=lambda cfg: 0,
    )
)
