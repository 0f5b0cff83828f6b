"""The demo's pixel codec with and without its two levers against seams (issue 24).

The drawer's latents miss the codec's own by about a third of their variance, and a codec decoder that
only ever decoded exact latents drew each 8x8 block's error up to the block's edge: a visible grid. Two
demo choices answer it (:mod:`viq.demo.pixel_codec`): latent noise while the codec trains (as a KL VAE's
decoder decodes sampled latents) and a residual refinement on the decoded pixels. This script runs the
whole demo (``viq.demo.run.run_demo``) once per seed and variant, into ``WORK/seed<S>/<variant>``:

* ``none``: no noise, no refinement (the demo before this change);
* ``noise``: latent noise up to 0.3 of each channel's spread, no refinement;
* ``refine``: the refinement (32 wide), no noise;
* ``both``: noise and refinement (the demo's defaults).

A seed's variants share its synthetic set and LLM (copied from the seed's first run; everything after
them is trained per variant). One record under ``bench/results/``: per run the reconstruction figures
(PSNR, SSIM and seam ratio from the codes, bicubic at equal bits, the codec alone; synthetic images and
photographs), code entropy, QA accuracy and the wall time per step; and per variant the paired
difference to ``none`` over the seeds (mean, 95 % t-interval) where ``none`` ran on them.

    python -m bench.demo_codec --seeds 0 1 2 --variants none both
    python -m bench.demo_codec --seeds 0 --variants noise refine --work runs/demo-codec
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
from pathlib import Path

import torch

from bench.common import write_record

#: variant -> (latent noise, refinement width)
VARIANTS = {"none": (0.0, 0), "noise": (0.3, 0), "refine": (0.0, 32), "both": (0.3, 32)}
#: (name in the record, where in results.json)
FIGURES = (
    ("psnr", ("recon", "synthetic", "psnr")),
    ("ssim", ("recon", "synthetic", "ssim")),
    ("seams", ("recon", "synthetic", "seams")),
    ("psnr_bicubic", ("recon", "synthetic", "psnr_bicubic_equal_bits")),
    ("ssim_bicubic", ("recon", "synthetic", "ssim_bicubic_equal_bits")),
    ("seams_bicubic", ("recon", "synthetic", "seams_bicubic_equal_bits")),
    ("psnr_codec", ("recon", "synthetic", "psnr_codec")),
    ("seams_codec", ("recon", "synthetic", "seams_codec")),
    ("photo_psnr", ("recon", "photos", "psnr")),
    ("photo_ssim", ("recon", "photos", "ssim")),
    ("photo_seams", ("recon", "photos", "seams")),
    ("photo_psnr_bicubic", ("recon", "photos", "psnr_bicubic_equal_bits")),
    ("photo_psnr_codec", ("recon", "photos", "psnr_codec")),
    ("entropy_bits", ("codes", "entropy_bits")),
    ("qa_final", ("qa", "final", "real")),
    ("qa_stage1", ("qa", "stage1", "real")),
)


def figures(results: dict) -> dict:
    """The record's figures of one finished demo (``results.json``), None where a figure is missing."""
    out: dict = {}
    for name, path in FIGURES:
        value = results
        for key in path:
            value = value.get(key) if isinstance(value, dict) else None
        out[name] = value
    out["per_task"] = {t: v["real"] for t, v in sorted(results["qa"]["final"]["per_task"].items())}
    out["timings_s"] = results["timings_s"]
    out["time_s"] = results["time_s"]
    return out


def paired(runs: dict, variant: str) -> dict:
    """Per figure, ``variant`` minus ``none`` over the seeds both ran: mean and 95 % t-interval."""
    from viq.eval.intervals import mean_ci95

    seeds = sorted(s for s in runs if variant in runs[s] and "none" in runs[s])
    out: dict = {"seeds": seeds}
    for name, _ in FIGURES:
        pairs = [(runs[s][variant][name], runs[s]["none"][name]) for s in seeds]
        diffs = [a - b for a, b in pairs if a is not None and b is not None]  # None: a figure the run lacks
        diffs = [d for d in diffs if math.isfinite(d)]
        if not diffs:
            continue
        mean, (low, _) = mean_ci95(diffs)
        out[name] = {"mean": mean, "ci95_half": None if low is None else mean - low, "values": diffs}
    return out


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--variants", nargs="+", default=["none", "both"], choices=sorted(VARIANTS))
    parser.add_argument("--work", type=Path, default=Path("runs/demo-codec"), help="runs (reused: done steps skip)")
    parser.add_argument("--scale", type=float, default=1.0, help="the demo's --scale")
    parser.add_argument("--out", default=None, help="record path (default bench/results/demo_codec-...json)")
    args = parser.parse_args(argv)

    from viq.demo.run import run_demo

    runs: dict = {}
    for seed in args.seeds:
        first = None
        for variant in args.variants:
            work = (args.work / f"seed{seed}" / variant).resolve()
            if first is not None and not (work / "data" / "meta.json").is_file():
                work.mkdir(parents=True, exist_ok=True)
                for part in ("data", "llm"):  # the same set and LLM for every variant of a seed
                    shutil.rmtree(work / part, ignore_errors=True)
                    shutil.rmtree(work / f"{part}.tmp", ignore_errors=True)
                    shutil.copytree(first / part, work / f"{part}.tmp")
                    (work / f"{part}.tmp").rename(work / part)
            noise, refine = VARIANTS[variant]
            run_demo(work, scale=args.scale, seed=seed, codec_noise=noise, codec_refine=refine)
            runs.setdefault(seed, {})[variant] = figures(json.loads((work / "results.json").read_text()))
            first = first or work
            row = runs[seed][variant]
            print(
                f"seed {seed} {variant:7s} PSNR {row['psnr']:.2f} (bicubic {row['psnr_bicubic']:.2f}, codec "
                f"{row['psnr_codec']:.2f}) SSIM {row['ssim']:.3f} seams {row['seams']:.2f} (codec "
                f"{row['seams_codec']:.2f}) photos {row['photo_psnr']:.2f} entropy {row['entropy_bits']:.2f} "
                f"QA {100 * row['qa_final']:.1f} % in {row['time_s']:.0f} s",
                flush=True,
            )
    record = {
        "scale": args.scale,
        "variants": {
            v: {"latent_noise": VARIANTS[v][0], "pixel_refine_channels": VARIANTS[v][1]} for v in args.variants
        },
        "runs": {str(s): v for s, v in runs.items()},
        "paired_vs_none": {v: paired(runs, v) for v in args.variants if v != "none"},
    }
    path = write_record("demo_codec", torch.device("cpu"), record, out=args.out)
    print(path)
    return record


if __name__ == "__main__":
    main()
