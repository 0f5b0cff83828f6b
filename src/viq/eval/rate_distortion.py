"""Rate-distortion baselines: the same images as JPEG and as WebP (Pillow) at the codes' bitrate.

Bitrates are bits per pixel (bpp) of a whole file: ``8 * len(file bytes) / (H * W)``, headers
included, over the ``H x W`` pixels of the image as it was encoded (after preprocessing, never the
zero-padded canvas) -- the same currency as the ``.viq`` file the codes are measured in.

* :func:`compress`: an 8-bit RGB image -> ``(file bytes, decoded image)`` for one codec and quality.
  JPEG: Pillow's libjpeg with ``optimize=True`` (optimised Huffman tables, the smallest baseline
  file at a given quality) and its default 4:2:0 chroma subsampling; WebP: lossy libwebp,
  ``method=6`` (slowest, smallest files).
* :func:`match_bpp`: the quality (1 ... 100) whose file comes closest to a target bpp, found by
  binary search (file size grows with quality; where it does not, the search still returns a
  bracketing pair). The quality just under the target is preferred when it is within the tolerance
  (the codec then gets no more bits than the codes); else the one just over it, else the nearer
  one. The record says what happened (``status``): ``"matched"`` (within ``tolerance``, default
  +-10 %), ``"overshoot"`` (even quality 1 is larger than the target: the codec cannot go that low
  on this image, and its quality-1 point is reported as it is), ``"undershoot"`` (even quality 100
  is smaller) or ``"gap"`` (the two neighbouring qualities straddle the +-10 % band).
* :func:`mean_curve`: per-quality means over images of bpp / PSNR / SSIM at fixed qualities
  (:data:`CURVE_QUALITIES`): the curves of :func:`plot_rate_distortion`.
* :func:`comparison_grid`: input | reconstruction | JPEG at equal bpp, one row per image.

This module only encodes, decodes and draws; the scores (:func:`viq.eval.recon.psnr_ssim` of
the decoded file against the 8-bit input) are computed by
:func:`viq.eval.recon.evaluate_reconstruction`.
"""

from __future__ import annotations

import io
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from PIL import Image, ImageDraw

__all__ = [
    "CODECS",
    "CODEC_LABELS",
    "CURVE_QUALITIES",
    "BPP_TOLERANCE",
    "bpp_of",
    "compress",
    "match_bpp",
    "mean_curve",
    "plot_rate_distortion",
    "comparison_grid",
]

#: Codec name -> Pillow format and save options.
CODECS: dict[str, tuple[str, dict[str, Any]]] = {
    "jpeg": ("JPEG", {"optimize": True}),
    "webp": ("WEBP", {"method": 6}),
}
#: How each codec is named in tables and plots.
CODEC_LABELS = {"jpeg": "JPEG", "webp": "WebP"}
#: Qualities of the per-codec curves drawn by :func:`plot_rate_distortion`.
CURVE_QUALITIES = (2, 5, 10, 20, 30, 50, 70, 90)
#: Largest relative bpp difference from the target that still counts as "equal bitrate".
BPP_TOLERANCE = 0.10
_QUALITY_RANGE = (1, 100)


def bpp_of(num_bytes: int, size: tuple[int, int]) -> float:
    """Bits per pixel of a ``num_bytes`` file for an image of ``size = (H, W)`` pixels."""
    h, w = size
    return 8.0 * num_bytes / (h * w)


def compress(image: Image.Image, codec: str, quality: int) -> tuple[bytes, Image.Image]:
    """Encode an RGB ``image`` with ``codec`` (``"jpeg"`` / ``"webp"``) at ``quality`` (1 ... 100).

    Returns:
        ``(file bytes, decoded RGB image)``; the decoded image has the input's size.
    """
    if codec not in CODECS:
        raise ValueError(f"unknown codec {codec!r}; known: {', '.join(CODECS)}")
    if not _QUALITY_RANGE[0] <= int(quality) <= _QUALITY_RANGE[1]:
        raise ValueError(f"quality must be in [1, 100], got {quality}")
    fmt, options = CODECS[codec]
    buf = io.BytesIO()
    try:
        image.convert("RGB").save(buf, format=fmt, quality=int(quality), **options)
    except (KeyError, OSError) as e:  # a Pillow build without WebP raises KeyError / OSError
        raise RuntimeError(f"Pillow cannot write {fmt} here ({e}); install a Pillow with {fmt} support") from e
    data = buf.getvalue()
    with Image.open(io.BytesIO(data)) as im:
        decoded = im.convert("RGB")
    return data, decoded


def match_bpp(image: Image.Image, codec: str, target_bpp: float, tolerance: float = BPP_TOLERANCE) -> dict[str, Any]:
    """``image`` through ``codec`` at the quality whose file is nearest ``target_bpp`` (module docstring).

    Returns:
        ``{"quality", "bytes", "bpp", "target_bpp", "rel_error" (bpp / target - 1), "status"
        ("matched", "overshoot", "undershoot" or "gap"), "decoded" (the decoded RGB image)}``.
    """
    if not target_bpp > 0:
        raise ValueError(f"target_bpp must be positive, got {target_bpp}")
    size = (image.height, image.width)
    sizes: dict[int, float] = {}

    def bpp(q: int) -> float:
        if q not in sizes:
            sizes[q] = bpp_of(len(compress(image, codec, q)[0]), size)
        return sizes[q]

    lo, hi = _QUALITY_RANGE
    if bpp(lo) > target_bpp:
        quality, status = lo, "overshoot"
    elif bpp(hi) <= target_bpp:
        quality, status = hi, "undershoot"
    else:
        # Invariant: bpp(lo) <= target < bpp(hi).
        while hi - lo > 1:
            mid = (lo + hi) // 2
            if bpp(mid) <= target_bpp:
                lo = mid
            else:
                hi = mid
        under, over = abs(bpp(lo) / target_bpp - 1), abs(bpp(hi) / target_bpp - 1)
        if under <= tolerance:
            quality = lo
        elif over <= tolerance:
            quality = hi
        else:
            quality = lo if under <= over else hi
        status = "matched" if min(under, over) <= tolerance else "gap"
    data, decoded = compress(image, codec, quality)
    record = {"quality": quality, "bytes": len(data), "bpp": bpp_of(len(data), size), "decoded": decoded}
    rel = record["bpp"] / target_bpp - 1
    if status in ("overshoot", "undershoot") and abs(rel) <= tolerance:
        status = "matched"  # the extreme quality happens to land within the band
    record.update({"target_bpp": float(target_bpp), "rel_error": rel, "status": status})
    return record


def mean_curve(curves: Sequence[Sequence[Mapping[str, Any]]]) -> list[dict[str, Any]]:
    """Per-quality means over images of curves (one list of ``{"quality", "bpp", "psnr", "ssim"}``
    per image, the same qualities in the same order):
    ``[{"quality", "n", "bpp", "psnr", "ssim"}]``. A PSNR of ``inf`` (lossless on a flat image)
    makes that quality's mean PSNR ``inf``."""
    if not curves:
        return []
    out = []
    for j, first in enumerate(curves[0]):
        rows = [c[j] for c in curves]
        if any(r["quality"] != first["quality"] for r in rows):
            raise ValueError("mean_curve needs the same qualities, in the same order, for every image")
        out.append(
            {
                "quality": first["quality"],
                "n": len(rows),
                **{k: math.fsum(r[k] for r in rows) / len(rows) for k in ("bpp", "psnr", "ssim")},
            }
        )
    return out


def plot_rate_distortion(result: Mapping[str, Any], path: str | Path) -> Path:
    """PSNR (dB) against bpp: ViQ as one point (mean over images), each codec's mean curve and its
    mean point at the codes' bitrate. ``result`` is the dict of
    :func:`viq.eval.recon.evaluate_reconstruction` (keys ``bpp``, ``psnr``, ``curves`` and one per
    codec). Written as PNG with an explicit Agg canvas (the process-wide backend is left alone)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import NullFormatter, ScalarFormatter

    fig = Figure(figsize=(6.4, 4.6), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    colours = {"jpeg": "tab:orange", "webp": "tab:green"}
    for codec, curve in result.get("curves", {}).items():
        pts = [(r["bpp"], r["psnr"]) for r in curve if math.isfinite(r["psnr"])]
        if pts:
            ax.plot(
                *zip(*pts),
                marker=".",
                color=colours.get(codec),
                label=f"{CODEC_LABELS[codec]} (quality {curve[0]['quality']}-{curve[-1]['quality']})",
            )
        at = result.get(codec)
        if at and at.get("bpp") is not None and at.get("psnr") is not None and math.isfinite(at["psnr"]):
            ax.plot(
                [at["bpp"]],
                [at["psnr"]],
                marker="s",
                ls="",
                color=colours.get(codec),
                mfc="none",
                label=f"{CODEC_LABELS[codec]} at the codes' bpp",
            )
    if result.get("bpp") is not None and result.get("psnr") is not None and math.isfinite(result["psnr"]):
        ax.plot([result["bpp"]], [result["psnr"]], marker="*", ms=14, ls="", color="tab:blue", label="ViQ codes")
    ax.set_xscale("log")
    ax.xaxis.set_minor_formatter(NullFormatter())  # labelled minor ticks of a short log axis overlap
    ax.xaxis.set_major_formatter(ScalarFormatter())
    ax.set_xlabel("bits per pixel (whole file / encoded pixels)")
    ax.set_ylabel("PSNR (dB)")
    ax.set_title(f"rate-distortion, mean over {result.get('n', '?')} image(s)", fontsize=10)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    out = Path(path)
    fig.savefig(out, format="png")
    return out


def comparison_grid(rows: Sequence[Mapping[str, Any]], height: int = 192) -> Image.Image:
    """One row per image: input | reconstruction | JPEG at equal bpp, each scaled to ``height`` px.

    Args:
        rows: dicts with ``"input"``, ``"recon"``, ``"jpeg"`` (PIL RGB images of one size) and
            ``"labels"`` (three short captions, one per panel), as kept by
            :func:`viq.eval.recon.evaluate_reconstruction` under ``"examples"``.

    Returns:
        an RGB image; each panel carries a caption strip of 14 px above it.
    """
    if not rows:
        raise ValueError("comparison_grid needs at least one row")
    caption, gap = 14, 4
    panels = []
    for row in rows:
        w, h = row["input"].size
        width = max(1, round(w * height / h))
        panels.append(
            [
                (row[k].resize((width, height), Image.Resampling.LANCZOS), text)
                for k, text in zip(("input", "recon", "jpeg"), row["labels"])
            ]
        )
    total_w = max(sum(p.width for p, _ in r) + gap * (len(r) - 1) for r in panels)
    grid = Image.new("RGB", (total_w, len(panels) * (height + caption + gap)), "white")
    draw = ImageDraw.Draw(grid)
    y = 0
    for r in panels:
        x = 0
        for panel, text in r:
            draw.text((x + 2, y + 1), text, fill="black")
            grid.paste(panel, (x, y + caption))
            x += panel.width + gap
        y += height + caption + gap
    return grid
