"""Reconstruction metrics (PSNR, SSIM), per image and as the whole ``viq eval-recon`` evaluation.

Images are what viq uses everywhere: float tensors of shape ``(3, H, W)`` with values in
``[-1, 1]`` (:func:`viq.formats.image.to_pixels`). The model pads its input bottom/right to a
multiple of 16 and decodes the padded area; :func:`crop_to` cuts a reconstruction back to the
encoded ``(H, W)`` before it is scored, so padding never counts.

Metrics (:func:`psnr_ssim`) are computed by ``torchmetrics.functional.image`` in float32 on the
``(1, 3, H, W)`` batch of the images mapped to ``[0, 1]`` (``x * 0.5 + 0.5``, clamped), with
``data_range = 1.0``: PSNR in dB over all three channels together, SSIM with the standard
11x11 gaussian window (sigma 1.5), mean over channels and all ``H x W`` positions (torchmetrics
reflect-pads the borders and keeps them; scikit-image crops a 5 px border instead, so its
numbers differ slightly).

The reference images a reconstruction is scored beside (mean colour, bicubic at equal bits) are in
:mod:`viq.eval.baselines`; JPEG / WebP at equal bitrate in :mod:`viq.eval.rate_distortion`; the seam
ratio (block grids in the error) in :mod:`viq.eval.seams`.

:class:`ReconStats` collects per-image scores per method and reports means with a 95 % Student-t
interval of the mean.

:func:`encoded_area_scores` is the one way a decode is scored against its input, here and in
training validation (:func:`viq.train.evaluate.evaluate`): crop to the encoded area, then
:func:`psnr_ssim`.

:func:`evaluate_reconstruction` is the whole reconstruction evaluation behind ``viq eval-recon``:
per image, encode -> ``.viq`` size (bits per pixel) -> reconstruct -> PSNR / SSIM, the same image as
JPEG and WebP at that bitrate (:mod:`viq.eval.rate_distortion`), code usage and, optionally, rFID
(:mod:`viq.eval.fid`); means over images beside per-image records.

``torchmetrics`` is the ``eval`` extra (``pip install viq[eval]``); it is imported when a metric
is first computed, so the baselines work without it.
"""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
from PIL import Image

from viq._progress import progress_bar
from viq.eval.fid import RFID, load_feature_extractor
from viq.eval.image_check import check_image
from viq.eval.intervals import mean_ci95
from viq.eval.rate_distortion import (
    BPP_TOLERANCE,
    CODEC_LABELS,
    CURVE_QUALITIES,
    bpp_of,
    compress,
    match_bpp,
    mean_curve,
)
from viq.eval.seams import seam_ratio
from viq.formats.bits import usage_stats
from viq.formats.image import PreparedImage, PreprocessConfig, to_pil, to_pixels
from viq.formats.image import preprocess as prepare_image

__all__ = [
    "SSIM_KERNEL",
    "SSIM_SIGMA",
    "psnr_ssim",
    "check_image",
    "encoded_area_scores",
    "evaluate_reconstruction",
    "encode_and_score",
    "codes_bits",
    "ScoredImage",
    "ssim_kernel",
    "crop_to",
    "ReconStats",
]

#: SSIM's standard gaussian window: 11x11, sigma 1.5 (Wang et al. 2004; torchmetrics' default).
SSIM_KERNEL = 11
SSIM_SIGMA = 1.5


# ----------------------------------------------------------------------------------------------
# metrics
# ----------------------------------------------------------------------------------------------


def ssim_kernel(height: int, width: int) -> tuple[tuple[int, int], tuple[float, float]]:
    """SSIM gaussian window ``((k_h, k_w), (sigma_h, sigma_w))`` used for an ``height x width`` image.

    The standard 11x11 window (sigma 1.5) when both sides are >= 11 px. A side shorter than 11 px
    gets the largest odd window that fits it (``side`` if odd, else ``side - 1``; >= 3) along that
    axis, with sigma scaled by the same factor (``1.5 * k / 11``) -- torchmetrics derives the
    gaussian window size from sigma (``2 * int(3.5 * sigma + 0.5) + 1``), and this sigma gives
    exactly ``k``. The other axis keeps 11 / 1.5. Sides under 3 px raise ``ValueError``.
    """
    if height < 3 or width < 3:
        raise ValueError(f"SSIM needs images of at least 3x3 pixels, got {height}x{width} (H x W)")
    ks = []
    for side in (height, width):
        k = SSIM_KERNEL if side >= SSIM_KERNEL else (side if side % 2 else side - 1)
        ks.append(k)
    sigmas = tuple(SSIM_SIGMA if k == SSIM_KERNEL else SSIM_SIGMA * k / SSIM_KERNEL for k in ks)
    return (ks[0], ks[1]), (sigmas[0], sigmas[1])


def psnr_ssim(reference: torch.Tensor, reconstruction: torch.Tensor) -> tuple[float, float]:
    """PSNR (dB) and SSIM (unitless, <= 1) of a reconstruction against its reference.

    Args:
        reference: ``(3, H, W)`` float tensor in ``[-1, 1]``, the original image.
        reconstruction: ``(3, H, W)`` float tensor in ``[-1, 1]``, the same area of the
            reconstruction (crop both with :func:`crop_to` first; shapes must match exactly).

    Both are mapped to ``[0, 1]`` (``x * 0.5 + 0.5``, then clamped to ``[0, 1]``, as a displayed
    image would be) in float32 and scored as a ``(1, 3, H, W)`` batch with
    ``torchmetrics.functional.image.peak_signal_noise_ratio(data_range=1.0)`` -- i.e.
    ``10 * log10(1 / MSE)`` with the MSE over all ``3*H*W`` values -- and
    ``structural_similarity_index_measure(data_range=1.0)`` with the 11x11 gaussian window
    (sigma 1.5). Images with a side shorter than 11 px use a smaller window along that axis,
    see :func:`ssim_kernel`; a side shorter than 3 px raises ``ValueError`` naming the size.

    Identical images (equal after the mapping) give exactly ``(math.inf, 1.0)``: PSNR has no
    cap (MSE 0 -> torchmetrics' own ``inf``), and SSIM is returned as 1 by definition, because
    float32 SSIM of two identical *flat* images is ``1 - O(1e-4)`` (``E[xy] - E[x]E[y]`` cancels
    to a tiny negative number against ``c2 = 9e-4``). The same float32 rounding affects nearly
    flat regions of distinct images at that level.

    Returns:
        ``(psnr_db, ssim)`` as Python floats.
    """
    reference = check_image("reference", reference)
    reconstruction = check_image("reconstruction", reconstruction)
    if reference.shape != reconstruction.shape:
        raise ValueError(
            f"reference and reconstruction must have the same shape (crop both to the encoded area "
            f"with crop_to), got reference {tuple(reference.shape)} and reconstruction "
            f"{tuple(reconstruction.shape)}"
        )
    _, h, w = reference.shape
    (kh, kw), (sh, sw) = ssim_kernel(h, w)
    try:
        # torchmetrics.functional.image: the top-level torchmetrics.functional names are deprecated (1.9).
        from torchmetrics.functional.image import peak_signal_noise_ratio, structural_similarity_index_measure
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ImportError("viq.eval.recon needs torchmetrics: pip install 'viq[eval]'") from exc

    def unit(x: torch.Tensor) -> torch.Tensor:
        return (x.detach().to(torch.float32) * 0.5 + 0.5).clamp(0.0, 1.0).unsqueeze(0)

    ref = unit(reference)
    rec = unit(reconstruction.to(reference.device))
    if torch.equal(ref, rec):
        return math.inf, 1.0
    psnr = peak_signal_noise_ratio(rec, ref, data_range=1.0)
    ssim = structural_similarity_index_measure(
        rec, ref, data_range=1.0, kernel_size=(kh, kw), sigma=(sh, sw), gaussian_kernel=True
    )
    return float(psnr), float(ssim)


def encoded_area_scores(reference: torch.Tensor, decoded: torch.Tensor) -> tuple[float, float]:
    """PSNR (dB) and SSIM of a decode on the encoded area of its reference.

    Args:
        reference: ``(3, H, W)`` float tensor in ``[-1, 1]``: the image as it was encoded (after
            preprocessing, before the model's zero-padding).
        decoded: ``(3, H', W')`` float tensor, ``H' >= H``, ``W' >= W``: the decode, either the
            zero-padded canvas (multiples of 16) or already cropped; values outside ``[-1, 1]`` are
            clamped as a displayed image would be.

    Returns:
        :func:`psnr_ssim` of the top-left ``(H, W)`` crop of ``decoded`` against ``reference``.
    """
    reference = check_image("reference", reference)
    return psnr_ssim(reference, crop_to(decoded, (reference.shape[1], reference.shape[2])))


def crop_to(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Top-left ``(h, w)`` crop of a ``(3, H', W')`` image: the encoded area of a padded decode.

    viq pads images bottom/right to a multiple of 16, so the content is the top-left corner.
    Returns a view of shape ``(3, h, w)``; ``ValueError`` if ``(h, w)`` exceeds ``(H', W')``.
    """
    if x.ndim != 3:
        raise ValueError(f"crop_to expects a (3, H, W) image, got shape {tuple(x.shape)}")
    h, w = (int(v) for v in size)
    if h < 1 or w < 1 or h > x.shape[1] or w > x.shape[2]:
        raise ValueError(f"cannot crop shape {tuple(x.shape)} to (h, w) = ({h}, {w})")
    return x[:, :h, :w]


class ReconStats:
    """Per-image PSNR/SSIM per named method, summarised as means with 95 % intervals.

    The interval is the two-sided Student-t interval of the mean,
    ``mean +- t_{0.975, n-1} * sd / sqrt(n)`` (``sd`` with ``n - 1``), which assumes the per-image
    scores are independent draws. It is ``[None, None]`` when undefined: ``n < 2``, or (PSNR
    only) when some image was reconstructed exactly, whose PSNR is ``inf`` -- the PSNR mean is
    then ``inf`` and ``psnr_n_inf`` counts those images.

    Example::

        stats = ReconStats()
        stats.add_images("bicubic", ref, bicubic_at_bits(ref, bits))
        stats.summary()  # {"bicubic": {"n": 1, "psnr": ..., "psnr_ci95": [None, None], ...}}
    """

    def __init__(self) -> None:
        self._psnr: dict[str, list[float]] = {}
        self._ssim: dict[str, list[float]] = {}

    @property
    def methods(self) -> list[str]:
        """Method names in the order they were first added."""
        return list(self._psnr)

    def add(self, method: str, psnr: float, ssim: float) -> None:
        """Record one image's scores (PSNR in dB, SSIM unitless) for ``method``."""
        psnr, ssim = float(psnr), float(ssim)
        if math.isnan(psnr) or math.isnan(ssim):
            raise ValueError(f"{method}: NaN score (psnr={psnr}, ssim={ssim})")
        self._psnr.setdefault(method, []).append(psnr)
        self._ssim.setdefault(method, []).append(ssim)

    def add_images(self, method: str, reference: torch.Tensor, reconstruction: torch.Tensor) -> tuple[float, float]:
        """Score ``reconstruction`` against ``reference`` with :func:`psnr_ssim`, record and return it."""
        psnr, ssim = psnr_ssim(reference, reconstruction)
        self.add(method, psnr, ssim)
        return psnr, ssim

    def values(self, method: str) -> dict[str, list[float]]:
        """The recorded per-image scores of ``method``: ``{"psnr": [...], "ssim": [...]}``."""
        return {"psnr": list(self._psnr[method]), "ssim": list(self._ssim[method])}

    def summary(self) -> dict[str, dict[str, Any]]:
        """``{method: {"n", "psnr", "psnr_ci95": [lo, hi], "psnr_n_inf", "ssim", "ssim_ci95"}}``.

        ``psnr`` is the mean PSNR in dB, ``ssim`` the mean SSIM; the ``*_ci95`` entries are the
        95 % Student-t intervals of those means (``[None, None]`` when undefined, see the class).
        """
        out: dict[str, dict[str, Any]] = {}
        for method in self._psnr:
            psnrs, ssims = self._psnr[method], self._ssim[method]
            psnr, psnr_ci = mean_ci95(psnrs)
            ssim, ssim_ci = mean_ci95(ssims)
            out[method] = {
                "n": len(psnrs),
                "psnr": psnr,
                "psnr_ci95": psnr_ci,
                "psnr_n_inf": sum(1 for v in psnrs if math.isinf(v)),
                "ssim": ssim,
                "ssim_ci95": ssim_ci,
            }
        return out


# ----------------------------------------------------------------------------------------------
# the whole evaluation
# ----------------------------------------------------------------------------------------------


#: :meth:`ReconStats.summary` of a method without images.
_NO_SCORES = {"n": 0, "psnr": None, "psnr_ci95": [None, None], "psnr_n_inf": 0, "ssim": None, "ssim_ci95": [None, None]}


def _mean(records: list[dict[str, Any]], key: str) -> float | None:
    return math.fsum(r[key] for r in records) / len(records) if records else None


def _finite_mean(records: list[dict[str, Any]], key: str) -> float | None:
    """Mean of ``key`` over the records where it is finite (a seam ratio is nan without a grid line)."""
    return _mean([r for r in records if math.isfinite(r[key])], key)


def _codec_summary(records: list[dict[str, Any]], scores: dict[str, Any]) -> dict[str, Any]:
    statuses: dict[str, int] = {}
    for r in records:
        statuses[r["status"]] = statuses.get(r["status"], 0) + 1
    return {
        **_NO_SCORES,
        **scores,
        "bpp": _mean(records, "bpp"),
        "seams": _finite_mean(records, "seams"),
        "quality": _mean(records, "quality"),
        "matched": statuses.get("matched", 0),
        "status": statuses,
    }


def _example(record: dict[str, Any], images: dict[str, Any], codec: str) -> dict[str, Any]:
    """A row of :func:`viq.eval.rate_distortion.comparison_grid`: input | reconstruction | ``codec``."""

    name = os.path.basename(record["source"])[:28]
    return {
        "input": images["input"],
        "recon": images["recon"],
        "jpeg": images[codec],
        "labels": (
            f"{name} {record['size'][1]}x{record['size'][0]}",
            f"ViQ {record['bpp']:.3f} bpp, {record['psnr']:.1f} dB",
            f"{CODEC_LABELS[codec]} {record[codec]['bpp']:.3f} bpp, {record[codec]['psnr']:.1f} dB",
        ),
    }


def codes_bits(codes: Any, size: tuple[int, int]) -> tuple[int, float, float]:
    """``(bytes, bpp, payload_bpp)`` of ``codes`` for an image of ``size = (H, W)`` encoded pixels: the
    ``.viq`` file (header, levels, payload, CRC; no metadata) and the codes alone, in bits per pixel."""

    h, w = size
    nbytes = len(codes.to_bytes())
    return nbytes, bpp_of(nbytes, (h, w)), codes.num_codes * codes.bits_per_code / (h * w)


@dataclasses.dataclass
class ScoredImage:
    """One image through the model as ``viq eval-recon`` (and ``viq show``) scores it: the prepared input,
    its codes, the 8-bit reconstruction (PIL, cropped to the encoded size), PSNR (dB) / SSIM on the encoded
    area, and the codes' cost (:func:`codes_bits`)."""

    prepared: PreparedImage
    codes: Any
    recon: Image.Image
    psnr: float
    ssim: float
    nbytes: int
    bpp: float
    payload_bpp: float


def encode_and_score(model: Any, item: Any, preprocess: PreprocessConfig) -> ScoredImage:
    """Preprocess ``item`` (or take a :class:`PreparedImage` as it is), encode, reconstruct and score it:
    the one per-image path of :func:`evaluate_reconstruction` and :mod:`viq.eval.show`."""
    prepared = item if isinstance(item, PreparedImage) else prepare_image(item, preprocess)
    codes = model.encode_pixels([prepared.pixels])[0]
    recon = model.reconstruct([codes])[0]
    psnr, ssim = psnr_ssim(prepared.pixels, to_pixels(recon))
    nbytes, bpp, payload_bpp = codes_bits(codes, prepared.content_size)
    return ScoredImage(prepared, codes, recon, psnr, ssim, nbytes, bpp, payload_bpp)


def evaluate_reconstruction(
    model: Any,
    images: Sequence[Any],
    *,
    preprocess: PreprocessConfig | None = None,
    fid_features: Any = None,
    codecs: Sequence[str] = ("jpeg", "webp"),
    curve_qualities: Sequence[int] | None = None,
    tolerance: float | None = None,
    examples: int = 0,
    on_error: Callable[[str, Exception], Any] | None = None,
    progress: bool | Callable[[int], Any] = False,
) -> dict[str, Any]:
    """Reconstruction quality of a ViQ model and JPEG / WebP at the codes' bitrate, per image and mean.

    For each image: preprocess (the model's resolution policy), encode, serialise the codes as a
    ``.viq`` file (no metadata; ``viq encode`` adds ~100-200 bytes of JSON), reconstruct
    (``model.reconstruct``: 8-bit, cropped to the encoded size) and score on the encoded area
    (:func:`psnr_ssim`); then the 8-bit input through each codec at the quality matching the
    codes' bpp (:func:`viq.eval.rate_distortion.match_bpp`) and at ``curve_qualities``.

    Args:
        model: a :class:`viq.ViQModel` with the encoder, drawer and vae components.
        images: image sources (paths, encoded bytes, PIL images, uint8 ``(H, W, 3)`` arrays) or
            :class:`~viq.formats.image.PreparedImage` (used as they are).
        preprocess: resolution policy (default: native size within ``[256, 1024**2]`` pixels).
        fid_features: ``None`` (no rFID), a spec for :func:`viq.eval.fid.load_feature_extractor`
            (``"viq"``, ``"hf:..."``, ...) or an extractor module.
        codecs: the baselines, names of :data:`viq.eval.rate_distortion.CODECS`.
        curve_qualities: the qualities of the per-codec curves (default
            :data:`~viq.eval.rate_distortion.CURVE_QUALITIES`; empty: no curves).
        tolerance: relative bpp tolerance of "equal bitrate" (default 0.10).
        examples: keep the input / reconstruction / JPEG images of the first ``examples`` images
            under ``"examples"`` (for :func:`~viq.eval.rate_distortion.comparison_grid`).
        on_error: ``None``: the first failing image raises. Else called as ``on_error(source,
            error)`` and the image is left out (``"failed"`` lists it).
        progress: ``True`` for a tqdm bar, or a callable called with 1 after each image.

    Returns:
        ``{"n", "bpp", "payload_bpp", "psnr", "psnr_ci95", "psnr_n_inf", "ssim", "ssim_ci95",
        "seams" (:func:`viq.eval.seams.seam_ratio` on the VAE's ``seam_period``-pixel block grid, 1 = no
        grid in the error), "seam_period", "rfid" (None without features or with < 2 images),
        "fid_features", "usage" (code usage, entropy in bits per code, perplexity, log2 K, codes),
        <codec>: {"n", "bpp", "psnr", "ssim", "seams", ..., "quality", "matched", "status": {status:
        count}}, "curves": {codec: [{"quality", "n", "bpp", "psnr", "ssim"}]}, "images": [per-image
        records], "failed": [{"source", "error"}]}``: means over the images that succeeded (bpp: bits per encoded pixel; PSNR: dB),
        ``None`` where undefined.
    """

    cfg = preprocess or PreprocessConfig(patch_size=model.patch_size)
    qualities = tuple(CURVE_QUALITIES if curve_qualities is None else curve_qualities)
    tolerance = BPP_TOLERANCE if tolerance is None else float(tolerance)
    extractor = load_feature_extractor(fid_features, model) if isinstance(fid_features, str) else fid_features
    fid = RFID(extractor) if extractor is not None else None
    stats = ReconStats()
    seam_period = model.config.vae.scale_factor  # the drawn latents' blocks; 2x2 codes a 16-px patch
    hist = np.zeros(math.prod(model.levels), dtype=np.int64)
    records: list[dict[str, Any]] = []
    failed: list[dict[str, str]] = []
    kept: list[dict[str, Any]] = []
    curves: dict[str, list[list[dict[str, Any]]]] = {c: [] for c in codecs}
    if progress is True:
        bar = progress_bar(len(images), "eval-recon")
        step = bar.update
    else:
        bar, step = None, progress or None

    def one(item: Any) -> tuple[dict[str, Any], torch.Tensor, torch.Tensor, Any, dict]:
        scored = encode_and_score(model, item, cfg)
        prepared, codes, recon_img, bpp = scored.prepared, scored.codes, scored.recon, scored.bpp
        ref, recon = prepared.pixels, to_pixels(recon_img)
        h, w = prepared.content_size
        record: dict[str, Any] = {
            "source": prepared.source,
            "size": [h, w],
            "grid": list(codes.grid),
            "bytes": scored.nbytes,
            "bpp": bpp,
            "payload_bpp": scored.payload_bpp,
            "psnr": scored.psnr,
            "ssim": scored.ssim,
            "seams": seam_ratio(ref, recon, seam_period),
        }
        ref_img = to_pil(ref)
        extra: dict[str, Any] = {"input": ref_img, "recon": recon_img}
        image_curves = {}
        for codec in codecs:
            m = match_bpp(ref_img, codec, bpp, tolerance)
            decoded = m.pop("decoded")
            m["psnr"], m["ssim"] = psnr_ssim(ref, to_pixels(decoded))
            m["seams"] = seam_ratio(ref, to_pixels(decoded), seam_period)
            record[codec] = m
            extra[codec] = decoded
            curve = []
            for q in qualities:
                data, dec = compress(ref_img, codec, q)
                p, s = psnr_ssim(ref, to_pixels(dec))
                curve.append({"quality": q, "bpp": bpp_of(len(data), (h, w)), "psnr": p, "ssim": s})
            image_curves[codec] = curve
        return record, ref, recon, codes, {"images": extra, "curves": image_curves}

    try:
        for i, item in enumerate(images):
            try:
                record, ref, recon, codes, extra = one(item)
                if fid is not None:
                    fid.add(ref, recon)
            except Exception as e:  # noqa: BLE001 - one bad image must not stop the others
                if on_error is None:
                    raise
                source = (
                    item.source
                    if isinstance(item, PreparedImage)
                    else os.fspath(item)
                    if isinstance(item, (str, os.PathLike))
                    else f"image {i}"
                )
                failed.append({"source": source, "error": str(e)})
                on_error(source, e)
            else:
                # Committed only once the whole image succeeded, so a failure leaves no partial trace.
                records.append(record)
                hist += np.bincount(codes.flat().numpy(), minlength=hist.size)
                stats.add("viq", record["psnr"], record["ssim"])
                for codec in codecs:
                    stats.add(codec, record[codec]["psnr"], record[codec]["ssim"])
                    curves[codec].append(extra["curves"][codec])
                if len(kept) < examples and codecs:
                    kept.append(_example(record, extra["images"], "jpeg" if "jpeg" in codecs else codecs[0]))
            if step is not None:
                step(1)
    finally:
        if bar is not None:
            bar.close()

    summary = stats.summary()
    usage = usage_stats(hist)
    usage.update({"log2_codebook": math.log2(hist.size), "codes": int(hist.sum())})
    result: dict[str, Any] = {
        **_NO_SCORES,
        **summary.get("viq", {}),
        "bpp": _mean(records, "bpp"),
        "payload_bpp": _mean(records, "payload_bpp"),
        "seams": _finite_mean(records, "seams"),
        "seam_period": seam_period,
        "rfid": fid.compute() if fid is not None else None,
        "fid_features": fid_features
        if isinstance(fid_features, str) or fid_features is None
        else type(fid_features).__name__,
        "usage": usage,
    }
    for codec in codecs:
        result[codec] = _codec_summary([r[codec] for r in records], summary.get(codec, {}))
    result["curves"] = {codec: mean_curve(curves[codec]) for codec in codecs if qualities}
    result["images"] = records
    result["failed"] = failed
    if examples:
        result["examples"] = kept
    return result
