"""The authors' per-image ``"resize"`` rule of their LLaVA training data, as a value.

A LLaVA record may size each image itself (``{"img_path": ..., "resize": "384x16"}``, see
:mod:`viq.data.llava`); training and code extraction must then give the encoder the same pixels, so the
rule is a :class:`~viq.formats.image.PreprocessConfig` field (``resize``) that
:func:`viq.formats.image.preprocess` applies -- the one way from an image file to pixels.

* ``"<base>x<p>"``: area-preserving toward ``base**2``, each side floored to a multiple of ``p``
  (small images are up-scaled too); ``p <= 0``: a square ``base x base`` resize.
* ``[a, b]``: exactly ``(max(a, 64), max(b, 64))`` as PIL ``(width, height)``.

Resampling is PIL bilinear (antialiased when down-scaling), as the authors' loader.
"""

from __future__ import annotations

import functools
import math
import re
from dataclasses import dataclass
from typing import Any

__all__ = ["OfficialResize", "parse_resize"]

#: Smallest side of the official ``[a, b]`` list resize.
_MIN_LIST_SIDE = 64
_RESIZE_RE = re.compile(r"^\s*(\d+)\s*[xX]\s*([+-]?\d+)\s*$")


@dataclass(frozen=True)
class OfficialResize:
    """A parsed official per-image ``"resize"`` entry.

    Attributes:
        kind: ``"area"`` for ``"<base>x<p>"`` (``a = base``, ``b = p``); ``"fixed"`` for the list
            form ``[w, h]`` (``a = w``, ``b = h``, before the 64-pixel clamp).
        a: see ``kind``.
        b: see ``kind``.
    """

    kind: str
    a: int
    b: int

    def target_size(self, width: int, height: int) -> tuple[int, int]:
        """Content size ``(new_width, new_height)`` for a ``width x height`` (upright) source.

        ``"area"`` with ``s = base / sqrt(W*H)``::

            W' = max(p, floor(W*s/p)*p),  H' = max(p, floor(H*s/p)*p)     (p > 0)
            W' = H' = base                                                  (p <= 0)

        computed exactly in integers: ``W*s/p = sqrt(W*base**2 / (H*p**2))`` and
        ``floor(sqrt(x)) = isqrt(floor(x))``. (A float implementation such as the authors' can,
        for rare sizes, land a hair below an exact multiple and floor one patch lower.)
        Examples for ``"384x16"``: 512x320 -> 480x288, 448x448 -> 384x384, 384x384 unchanged.

        ``"fixed"``: ``(max(a, 64), max(b, 64))``, independent of the source.
        """
        if width < 1 or height < 1:
            raise ValueError(f"image size must be positive, got {width}x{height}")
        if self.kind == "fixed":
            return (max(self.a, _MIN_LIST_SIDE), max(self.b, _MIN_LIST_SIDE))
        base, p = self.a, self.b
        if p <= 0:
            return (base, base)
        # Python ints are unbounded, so base**2 * W cannot overflow.
        new_w = max(p, math.isqrt(width * base * base // (height * p * p)) * p)
        new_h = max(p, math.isqrt(height * base * base // (width * p * p)) * p)
        return (new_w, new_h)

    def __str__(self) -> str:
        return f"{self.a}x{self.b}" if self.kind == "area" else f"[{self.a}, {self.b}]"


@functools.lru_cache(maxsize=256)
def _parse_resize_str(value: str) -> OfficialResize:
    # Datasets use a handful of distinct strings ("384x16", ...): parse each once.
    m = _RESIZE_RE.match(value)
    if m is None or int(m.group(1)) < 1:
        raise ValueError(f'invalid resize {value!r}: expected "<base>x<patch>" with base >= 1, e.g. "384x16"')
    return OfficialResize("area", int(m.group(1)), int(m.group(2)))


def parse_resize(value: Any) -> OfficialResize | None:
    """Parse a record's ``"resize"`` value (``"<base>x<p>"``, ``[w, h]`` or ``None``).

    Raises:
        ValueError: for anything else (the message says what is accepted).
    """
    if value is None:
        return None
    if isinstance(value, str):
        return _parse_resize_str(value)
    if isinstance(value, (list, tuple)):
        if len(value) == 2 and all(isinstance(v, int) and not isinstance(v, bool) for v in value):
            return OfficialResize("fixed", int(value[0]), int(value[1]))
        raise ValueError(f"invalid resize {value!r}: a list resize must be two ints [width, height]")
    raise ValueError(f'invalid resize {value!r}: expected "<base>x<patch>" (e.g. "384x16"), [width, height] or null')
