"""The demo's verdict: held-out QA and reconstruction, each beside the baselines that would expose it.

* QA, for the stage-1 model and for the final quantized model (stage 2-2, answering from codes): the
  same questions with the real image, a blank image, another sample's image (shuffled), and the
  majority training answer per question template; Wilson 95 % intervals, per task and overall.
* Reconstruction from codes, on the encoded area of held-out synthetic images and of real photographs:
  PSNR / SSIM beside a per-image mean colour, bicubic at the codes' bit budget, and the pixel codec
  alone (encode + decode, the ceiling any drawer can reach).
* Code usage and entropy (bits per code) beside log2 of the codebook size.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any

import numpy as np
import torch

from viq.eval.baselines import bicubic_at_bits, mean_colour
from viq.eval.qa import IMAGE_MODES, answer_nll, evaluate_qa, load_run, majority_baseline
from viq.eval.recon import ReconStats, crop_to, psnr_ssim
from viq.eval.seams import seam_ratio
from viq.formats.bits import bits_for_levels, usage_stats
from viq.formats.image import PreprocessConfig, preprocess, to_pil, to_pixels
from viq.model.encoder import pad_to_patches
from viq.model.vae import decode_latents, encode_latents

log = logging.getLogger(__name__)

__all__ = ["evaluate_qa_with_baselines", "evaluate_reconstruction", "code_summary"]


def evaluate_qa_with_baselines(
    run: Path,
    train_records: list[dict],
    test_records: list[dict],
    image_root: Path,
    *,
    seed: int = 0,
    device: torch.device | None = None,
    modes: tuple[str, ...] | None = None,
    nll: bool = True,
) -> dict[str, Any]:
    """QA accuracy of the run's final model with real / blank / shuffled images (``modes``: a subset of
    :data:`viq.eval.qa.IMAGE_MODES` that includes "real"; default all), and the majority baseline:
    ``{"n", "real", "blank", "shuffled", "majority", "margin", "ci95": {mode: [lo, hi]}, "per_task": {task:
    {"n", mode: accuracy, ..., "ci95": {mode: [lo, hi]}, "nll": {"real", "blank"}, "reads"}}, "examples"}``.

    ``margin``: real minus the best baseline evaluated. Per task, ``nll`` is the answer NLL (nats per answer
    token, :func:`viq.eval.qa.answer_nll`) with real and blank images (``nll=True`` and "blank" in
    ``modes``), and ``reads`` says whether the model reads the image for that task: the 95 % interval of
    its accuracy with real images lies wholly above the interval of every baseline evaluated."""

    modes = IMAGE_MODES if modes is None else tuple(modes)
    if "real" not in modes or set(modes) - set(IMAGE_MODES):
        raise ValueError(f"modes must include 'real' and be among {IMAGE_MODES}, got {modes}")
    device = device or torch.device("cpu")
    model, tokenizer = load_run(run, device)
    results: dict[str, dict] = {}
    examples: list[dict] = []
    for mode in modes:
        results[mode] = evaluate_qa(
            model,
            tokenizer,
            test_records,
            image_root,
            images=mode,
            seed=seed,
            device=device,
            examples=examples if mode == "real" else None,
        )
    results["majority"] = majority_baseline(train_records, test_records)
    nlls = {
        mode: answer_nll(model, tokenizer, test_records, image_root, images=mode, seed=seed, device=device)
        for mode in ("real", "blank")
        if nll and mode in modes
    }
    out: dict[str, Any] = {"n": results["real"]["n"]}
    out.update({mode: r["accuracy"] for mode, r in results.items()})
    out["ci95"] = {mode: r["ci95"] for mode, r in results.items()}
    if nlls:
        out["nll"] = {mode: r["nll"] for mode, r in nlls.items()}
    out["per_task"] = {}
    for task in sorted(results["real"]["per_task"]):
        entry: dict[str, Any] = {"n": results["real"]["per_task"][task]["n"]}
        ci = {}
        for mode, r in results.items():
            task_result = r["per_task"].get(task, {})
            entry[mode] = task_result.get("accuracy")
            ci[mode] = task_result.get("ci95")
        entry["ci95"] = ci
        if nlls:
            entry["nll"] = {mode: r["per_task"].get(task, {}).get("nll") for mode, r in nlls.items()}
        baselines = [ci[m] for m in results if m != "real" and ci.get(m)]
        entry["reads"] = bool(ci["real"]) and all(ci["real"][0] > hi for _, hi in baselines)
        out["per_task"][task] = entry
    out["margin"] = out["real"] - max(out[mode] for mode in results if mode != "real")
    out["examples"] = examples[:24]
    return out


def evaluate_reconstruction(
    model, sources: list[tuple[str, Any]], out_dir: Path, *, max_pixels: int, kind: str
) -> tuple[dict[str, Any], list[dict], np.ndarray]:
    """Encode and reconstruct ``sources`` ((file stem, image) pairs) with a full ViQ model.

    Returns the summary ``{"n", "psnr", "ssim", "psnr_mean_colour", "ssim_mean_colour",
    "psnr_bicubic_equal_bits", "ssim_bicubic_equal_bits", "psnr_codec", "ssim_codec", "ci95": {...},
    "bpp", "seams", "seams_<method>", "seam_period"}`` (seams: :func:`viq.eval.seams.seam_ratio` on the
    codec's block grid, mean over images; 1 = none), one record per image (files written under
    ``out_dir``), and the code histogram.
    """

    pre = PreprocessConfig(max_pixels=max_pixels)
    bits_per_code = bits_for_levels(model.levels)
    stats = ReconStats()
    seam_period = model.config.vae.scale_factor
    items: list[dict] = []
    hist = np.zeros(math.prod(model.levels), dtype=np.int64)
    out_dir.mkdir(parents=True, exist_ok=True)
    for stem, image in sources:
        ref = preprocess(image, pre).pixels  # (3, H, W) in [-1, 1]
        h, w = ref.shape[-2:]
        codes = model.encode_pixels([ref])[0]
        hist += np.bincount(codes.flat().numpy(), minlength=hist.size)
        recon_img = model.reconstruct([codes])[0]
        recon = to_pixels(recon_img)
        bits = codes.num_codes * bits_per_code
        padded = pad_to_patches(ref, model.config.vae.scale_factor)
        with torch.no_grad():
            ceiling = crop_to(decode_latents(model.vae, encode_latents(model.vae, padded)).float().clamp(-1, 1), (h, w))
        methods = {
            "viq": recon,
            "mean_colour": mean_colour(ref),
            "bicubic_equal_bits": bicubic_at_bits(ref, bits),
            "codec": to_pixels(to_pil(ceiling)),
        }
        record = {
            "kind": kind,
            "name": stem,
            "size": [h, w],
            "grid": list(codes.grid),
            "codes": codes.num_codes,
            "bits": bits,
            "bpp": bits / (h * w),
        }
        for method, pixels in methods.items():
            p, s = psnr_ssim(ref, pixels)
            stats.add(method, p, s)
            record[f"psnr_{method}"], record[f"ssim_{method}"] = p, s
            # the codec's blocks and the codes' cells share this grid (2x2 codes per 16-pixel patch)
            record[f"seams_{method}"] = seam_ratio(ref, pixels, seam_period)
        in_path, out_path = out_dir / f"{kind}-{stem}-input.png", out_dir / f"{kind}-{stem}-recon.png"
        to_pil(ref).save(in_path)
        recon_img.save(out_path)
        record.update({"input": in_path.name, "recon": out_path.name})
        items.append(record)
    summary = stats.summary()
    viq_s = summary["viq"]
    result: dict[str, Any] = {
        "n": viq_s["n"],
        "psnr": viq_s["psnr"],
        "ssim": viq_s["ssim"],
        "bpp": float(np.mean([i["bpp"] for i in items])) if items else None,
        "ci95": {},
    }
    for method in ("mean_colour", "bicubic_equal_bits", "codec"):
        result[f"psnr_{method}"] = summary[method]["psnr"]
        result[f"ssim_{method}"] = summary[method]["ssim"]
    # seam_ratio: 1 = no grid in the error; mean over the images that have a grid line (nan: none)
    result["seam_period"] = seam_period
    for method in summary:
        finite = [i[f"seams_{method}"] for i in items if math.isfinite(i[f"seams_{method}"])]
        key = "seams" if method == "viq" else f"seams_{method}"
        result[key] = float(np.mean(finite)) if finite else None
    for method, scores in summary.items():
        result["ci95"][method] = {"psnr": scores["psnr_ci95"], "ssim": scores["ssim_ci95"]}
    return result, items, hist


def code_summary(hist: np.ndarray) -> dict[str, float]:
    """``{"entropy_bits", "log2_codebook", "usage", "perplexity"}`` of a code histogram."""

    s = usage_stats(hist)
    return {
        "entropy_bits": s["entropy_bits"],
        "log2_codebook": math.log2(hist.size),
        "usage": s["usage"],
        "perplexity": s["perplexity"],
        "codes": int(hist.sum()),
    }
