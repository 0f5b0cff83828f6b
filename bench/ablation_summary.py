"""The summary of the Table-4 ablations (:mod:`bench.ablations`): per variant and metric the mean and a
95 % t-interval over seeds, the paired (same seed) difference from the control, the paper's figure and a
verdict per direction; ``summary.json`` and the docs/research.md table.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any

#: the control every axis is compared to: the demo recipes as they are (bottleneck + L-inf in 2-1, FSQ
#: 4k on the bottleneck with 2D RoPE in 2-2, VAE-latent loss)
CONTROL = "control"


#: summary metrics: name -> path into a record
METRICS = {
    "qa_real": ("qa", "real"),
    "qa_blank": ("qa", "blank"),
    "qa_majority": ("qa", "majority"),
    "qa_real_minus_blank": ("qa", "real_minus_blank"),
    "psnr_synthetic": ("recon", "synthetic", "psnr"),
    "ssim_synthetic": ("recon", "synthetic", "ssim"),
    "psnr_synthetic_codec": ("recon", "synthetic", "psnr_codec"),
    "psnr_photos": ("recon", "photos", "psnr"),
    "ssim_photos": ("recon", "photos", "ssim"),
    "psnr_photos_codec": ("recon", "photos", "psnr_codec"),
    "entropy_bits": ("codes", "entropy_bits"),
    "train_s": ("train_s",),
    "stage2_s_per_step": ("stage2_s_per_step",),
    "nll_real": ("qa", "nll", "real"),
    "nll_blank": ("qa", "nll", "blank"),
    **{
        f"qa_{task}": ("qa", "per_task", task, "real")
        for task in ("where", "shape", "count_big", "digit", "shape_color")
    },
}


def t_interval(values: list[float]) -> dict[str, Any]:
    """Mean and 95 % t-interval over seeds (``ci95`` None with one value)."""
    from viq.eval.intervals import t_quantile_975  # imports torch (via viq): not before the arguments parse

    n = len(values)
    if n == 0:
        return {"n": 0, "mean": None, "ci95": None, "values": []}
    mean = sum(values) / n
    if n < 2:
        return {"n": n, "mean": mean, "ci95": None, "values": values}
    sd = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))
    half = t_quantile_975(n - 1) * sd / math.sqrt(n)
    return {"n": n, "mean": mean, "sd": sd, "ci95": [mean - half, mean + half], "half_width": half, "values": values}


def _get(record: dict, path: tuple[str, ...]):
    node: Any = record
    for p in path:
        if not isinstance(node, dict) or node.get(p) is None:
            return None
        node = node[p]
    return node


#: how close (in accuracy, 0-1) the codes must stay to the continuous encoder for the paper's
#: "discrete codes match continuous features" (57.2 vs 57.0) to count as reproduced
REFERENCE_MARGIN = 0.05

#: the paper's figure for each default variant (Table 4 average over its benchmarks; Table 2 for the
#: reference), as quoted in ../shared/paper/
PAPER = {
    CONTROL: "68.7",
    "direct_fsq": "60.9",
    "limit_l2": "—",
    "limit_tanh": "—",
    "limit_none": "—",
    "fsq_16k": "smaller codebooks better (no figure)",
    "simvq_4k": "FSQ > SimVQ (no figure)",
    "simvq_16k": "FSQ > SimVQ, worse when larger (no figure)",
    "no_rope": "65.3",
    "no_recon": "below 68.7 (no figure); VAE loss costs 1.3x time",
    "continuous": "57.0 (InternViT) vs ViQ 57.2",
    "recon_pixel": "MSE below the VAE latent loss (no figure)",
    "width_8": "a much narrower bottleneck comparable to the widest (no figure)",
    "width_16": "comparable (no figure)",
    "width_64": "comparable (no figure)",
}


def verdict(diff: dict | None, axis: str) -> str:
    """The verdict on one Table-4 direction from the paired t-interval of (variant - control) over seeds.

    Every default variant departs from the paper's choice (the control), so the paper is *reproduced* when
    the variant is worse (interval below 0), *reversed* when it is better (above 0), *inconclusive* when
    the interval holds 0 or there is one seed. The reference axis asks instead whether the codes stay
    close to the continuous encoder: reproduced when the interval lies within +-REFERENCE_MARGIN,
    reversed when the continuous encoder is clearly better (interval above 0).
    """
    if not diff or diff.get("ci95") is None:
        return "inconclusive (one seed)" if diff else "not measured"
    lo, hi = diff["ci95"]
    if axis == "reference":
        if -REFERENCE_MARGIN <= lo and hi <= REFERENCE_MARGIN:
            return "reproduced"
        return "reversed" if lo > 0 else "inconclusive"
    if hi < 0:
        return "reproduced"
    return "reversed" if lo > 0 else "inconclusive"


def summarize(records: list[dict]) -> dict[str, Any]:
    """Per variant: mean and t-interval of each metric over seeds, paired differences from the control
    (same seed) and the verdicts."""
    by_variant: dict[str, list[dict]] = {}
    for r in records:
        by_variant.setdefault(r["variant"], []).append(r)
    summary: dict[str, Any] = {}
    for name, runs in by_variant.items():
        runs.sort(key=lambda r: r["seed"])
        entry = {
            "axis": runs[0]["axis"],
            "description": runs[0]["description"],
            "spec": runs[0]["spec"],
            "seeds": [r["seed"] for r in runs],
            "metrics": {},
        }
        for metric, path in METRICS.items():
            values = [v for v in (_get(r, path) for r in runs) if v is not None]
            if values:
                entry["metrics"][metric] = t_interval([float(v) for v in values])
        control = {r["seed"]: r for r in by_variant.get(CONTROL, [])}
        if name != CONTROL and control:
            entry["vs_control"] = {}
            for metric, path in METRICS.items():
                diffs = [
                    float(_get(r, path)) - float(_get(control[r["seed"]], path))
                    for r in runs
                    if r["seed"] in control and _get(r, path) is not None and _get(control[r["seed"]], path) is not None
                ]
                if diffs:
                    entry["vs_control"][metric] = t_interval(diffs)
            entry["verdict"] = {
                metric: verdict(entry["vs_control"].get(metric), entry["axis"])
                for metric in ("qa_real", "qa_real_minus_blank", "psnr_synthetic")
            }
        summary[name] = entry
    return summary


def _mean_pm(m: dict | None, scale: float, digits: int, *, missing: str, one_seed: str) -> str:
    """A :func:`t_interval` as "mean ± half-width" (scaled), ``one_seed`` appended when there is no
    interval, ``missing`` when there is no value."""
    if not m or m.get("mean") is None:
        return missing
    out = f"{m['mean'] * scale:.{digits}f}"
    return out + (f" ± {m['half_width'] * scale:.{digits}f}" if m.get("half_width") is not None else one_seed)


def markdown_table(summary: dict, known: list[str] = ()) -> str:
    """The docs/research.md results table of a summary: per variant the means and 95 % intervals over
    seeds, the paired difference from the control, the paper's figure and the verdicts; variants in the
    order of ``known`` first."""

    def fmt(m: dict | None, scale: float = 100, digits: int = 1) -> str:
        return _mean_pm(m, scale, digits, missing="—", one_seed=" (1 seed)")

    rows = [
        "| axis | variant | seeds | QA real % | QA blank % | Δ real vs control (paired) | PSNR synth dB (codec) "
        "| Δ PSNR vs control | entropy bits | train s | paper | verdict: QA; PSNR |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    known = list(known)
    order = lambda item: (known.index(item[0]) if item[0] in known else len(known), item[0])  # noqa: E731
    for name, e in sorted(summary["variants"].items(), key=order):
        m, d, v = e["metrics"], e.get("vs_control", {}), e.get("verdict", {})
        psnr = fmt(m.get("psnr_synthetic"), 1, 2)
        if m.get("psnr_synthetic_codec"):
            psnr += f" ({m['psnr_synthetic_codec']['mean']:.1f})"
        verdicts = "—" if name == CONTROL else f"{v.get('qa_real', '—')}; {v.get('psnr_synthetic', '—')}"
        rows.append(
            f"| {e['axis']} | {name} | {len(e['seeds'])} | {fmt(m.get('qa_real'))} | {fmt(m.get('qa_blank'))} "
            f"| {'—' if name == CONTROL else fmt(d.get('qa_real'))} | {psnr} "
            f"| {'—' if name == CONTROL else fmt(d.get('psnr_synthetic'), 1, 2)} | {fmt(m.get('entropy_bits'), 1, 2)} "
            f"| {fmt(m.get('train_s'), 1, 0)} | {PAPER.get(name, '—')} | {verdicts} |"
        )
    return "\n".join(rows)


def write_summary(results: Path, label: str, scale: float, device, started: float | None) -> dict:
    """summary.json over every record of the label (runs added by earlier invocations included)."""
    from bench.common import device_description, write_record

    all_records = []
    for p in sorted(results.glob("*-seed*.json")):
        r = json.loads(p.read_text())
        if r.get("benchmark") == "ablations":
            all_records.append(r)
    summary = {
        "label": label,
        "scale": scale,
        "device": device_description(device),
        "seeds": sorted({r["seed"] for r in all_records}),
        "wall_s_this_invocation": None if started is None else time.perf_counter() - started,
        # every record's training + evaluation wall time and each seed's preparation, once
        "wall_s_all_records": sum(
            r.get("wall_s", {}).get("train", 0) + r.get("wall_s", {}).get("eval", 0) for r in all_records
        )
        + sum({r["seed"]: sum((r.get("prepare_s") or {}).values()) for r in all_records}.values()),
        "note": "mean and 95 % t-interval over seeds; vs_control: paired (same seed) differences",
        "variants": summarize(all_records),
    }
    write_record("ablations_summary", device, summary, out=str(results / "summary.json"))
    return summary


def print_table(summary: dict) -> None:
    def fmt(m: dict | None, scale: float = 1.0, digits: int = 1) -> str:
        return _mean_pm(m, scale, digits, missing="-", one_seed="")

    print(
        f"{'variant':12s} {'seeds':>5s} {'QA real %':>13s} {'blank %':>13s} {'real-blank':>13s} {'d vs control':>13s} "
        f"{'PSNR syn':>11s} {'codec':>6s} {'H bits':>6s} {'train s':>8s}"
    )
    for name, e in summary["variants"].items():
        m = e["metrics"]
        d = e.get("vs_control", {}).get("qa_real")
        print(
            f"{name:12s} {len(e['seeds']):5d} {fmt(m.get('qa_real'), 100):>13s} {fmt(m.get('qa_blank'), 100):>13s} "
            f"{fmt(m.get('qa_real_minus_blank'), 100):>13s} {fmt(d, 100):>13s} {fmt(m.get('psnr_synthetic'), 1, 2):>11s} "
            f"{fmt(m.get('psnr_synthetic_codec'), 1, 1):>6s} {fmt(m.get('entropy_bits'), 1, 2):>6s} {fmt(m.get('train_s'), 1, 0):>8s}"
        )
