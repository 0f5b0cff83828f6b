"""A self-contained HTML report of a training run (``viq demo``): images, curves, metrics.

Images and plots are embedded as base64 PNG, so ``report.html`` can be opened or sent on its own.
"""

from __future__ import annotations

import base64
import html
import io
from pathlib import Path
from typing import Any

__all__ = ["write_report", "loss_curves_png"]

CURVE_KEYS = ("loss", "text", "distill", "recon", "commit")


def _img(path: Path, width: int | None = None) -> str:
    data = base64.b64encode(path.read_bytes()).decode()
    style = f' style="width:{width}px;image-rendering:pixelated"' if width else ""
    return f'<img src="data:image/png;base64,{data}"{style}>'


def loss_curves_png(stages: dict[str, Any], vae_history: list[float]) -> bytes:
    """One panel per stage (training losses per step), plus the pixel codec's loss."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [(name, s["history"]) for name, s in stages.items() if s.get("history")]
    n = len(panels) + (1 if vae_history else 0)
    fig, axes = plt.subplots(1, max(n, 1), figsize=(4 * max(n, 1), 3.2), squeeze=False)
    for ax, (name, history) in zip(axes[0], panels):
        steps = [h["step"] for h in history]
        for key in CURVE_KEYS:
            if key in history[0]:
                ax.plot(steps, [h[key] for h in history], label=key)
        ax.set_title(name)
        ax.set_xlabel("step")
        ax.set_yscale("log")
        ax.legend(fontsize=7)
    if vae_history:
        ax = axes[0][len(panels)]
        ax.plot(range(1, len(vae_history) + 1), vae_history)
        ax.set_title("pixel codec")
        ax.set_xlabel("step")
        ax.set_yscale("log")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90)
    plt.close(fig)
    return buf.getvalue()


def _table(rows: list[list[Any]], header: list[str]) -> str:
    def cell(v: Any) -> str:
        if isinstance(v, float):
            return f"{v:.4g}"
        return html.escape(str(v))

    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{cell(v)}</td>" for v in row) + "</tr>" for row in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def _pct(v: Any) -> str:
    return "" if v is None else f"{100 * v:.1f}"


def _ci(ci: Any) -> str:
    return "" if not ci or ci[0] is None else f"[{100 * ci[0]:.1f}, {100 * ci[1]:.1f}]"


def qa_tables(qa: dict[str, Any], direct: dict[str, Any] | None = None) -> str:
    """Per model: accuracy (%) with real / blank / shuffled images and the majority answer, overall and per
    task, each with its 95 % interval; the answer NLL with real and blank images; whether the model reads
    the image for the task (its real-image interval above every baseline's); and, beside them, the direct
    classifier trained on the same images (``direct``, :func:`viq.demo.run.direct_classifier`)."""
    parts = []
    modes = ("real", "blank", "shuffled", "majority")
    direct_tasks = (direct or {}).get("per_task", {})
    for name, r in qa.items():
        cis = r.get("ci95", {})
        has_nll = "nll" in r
        header = ["task", "n"] + [f"{m} image" if m != "majority" else "majority answer" for m in modes]
        header += ["answer NLL real / blank (nats)"] if has_nll else []
        header += ["reads the image?"]
        if direct is not None and direct_tasks:
            header.append(f"direct classifier, {direct['seconds']:.0f} s")
        rows = [
            ["all", r["n"]]
            + [f"{_pct(r[m])} {_ci(cis.get(m))}" for m in modes]
            + ([f"{r['nll']['real']:.3f} / {r['nll'].get('blank', float('nan')):.3f}"] if has_nll else [])
            + [f"margin {_pct(r.get('margin'))}"]
            + ([""] if direct_tasks else [])
        ]
        for task, v in r["per_task"].items():
            task_ci = v.get("ci95", {})
            row = [task, v["n"]] + [f"{_pct(v.get(m))} {_ci(task_ci.get(m))}" for m in modes]
            if has_nll:
                nll = v.get("nll", {})
                row.append(f"{nll.get('real', float('nan')):.3f} / {nll.get('blank', float('nan')):.3f}")
            row.append("yes" if v.get("reads") else "no")
            if direct_tasks:
                d = direct_tasks.get(task)
                row.append(f"{_pct(d['accuracy'])} {_ci(d['ci95'])}" if d else "")
            rows.append(row)
        parts.append(
            f"<h3>{html.escape(name)} model: accuracy (%) on {r['n']} held-out questions</h3>" + _table(rows, header)
        )
    parts.append(
        "<p>A task is read when the 95 % interval with real images lies wholly above the intervals with "
        "blank and shuffled images and of the majority answer. The direct classifier is the demo's SigLIP "
        "stand-in (the encoder stage 1 starts from) answering by the nearest answer text: a model trained "
        "straight on the same images with the answers as labels, in the time given.</p>"
    )
    return "".join(parts)


def _db_ci(ci: Any) -> str:
    return "" if not ci or ci[0] is None else f"[{ci[0]:.2f}, {ci[1]:.2f}]"


def recon_table(recon: dict[str, Any], codes: dict[str, Any]) -> str:
    rows = []
    for name, r in recon.items():
        ci = r.get("ci95", {})
        rows.append(
            [
                name,
                r["n"],
                r.get("bpp"),
                r["psnr"],
                _db_ci(ci.get("viq", {}).get("psnr")),
                r["ssim"],
                r["psnr_mean_colour"],
                r["psnr_bicubic_equal_bits"],
                r["psnr_codec"],
                r["ssim_bicubic_equal_bits"],
                r["ssim_codec"],
                *("" if r.get(k) is None else r[k] for k in ("seams", "seams_bicubic_equal_bits", "seams_codec")),
            ]
        )
    table = _table(
        rows,
        [
            "images",
            "n",
            "bits/pixel",
            "ViQ PSNR (dB)",
            "95 % CI",
            "ViQ SSIM",
            "mean colour PSNR",
            "bicubic at equal bits PSNR",
            "codec alone PSNR (ceiling)",
            "bicubic SSIM",
            "codec SSIM",
            "ViQ seams",
            "bicubic seams",
            "codec seams",
        ],
    )
    period = next((r["seam_period"] for r in recon.values() if r.get("seam_period")), None)
    if period:
        table += (
            f"<p>Seams: how much more the error jumps across the {period}-pixel grid of the codec's blocks "
            "and the codes' cells than between other neighbouring pixels (1 = no grid; "
            "<code>viq.eval.seams.seam_ratio</code>).</p>"
        )
    code = (
        f"<p>Codes: entropy {codes['entropy_bits']:.2f} bits per code of log2 K = {codes['log2_codebook']:.2f}; "
        f"{100 * codes['usage']:.1f} % of the codebook used, perplexity {codes['perplexity']:.0f}, "
        f"over {codes['codes']} codes.</p>"
    )
    return table + code


def write_report(out: Path, results: dict[str, Any]) -> Path:
    """Write ``out/report.html`` from the demo's results (see :func:`viq.demo.run.evaluate_final`)."""
    out = Path(out)
    curves = out / "loss_curves.png"
    curves.write_bytes(loss_curves_png(results.get("stages", {}), results.get("vae_history", [])))

    stage_rows = []
    for name, s in results.get("stages", {}).items():
        first, last, val = s["history"][0], s["history"][-1], s.get("val", {})
        stage_rows.append(
            [
                name,
                len(s["history"]),
                first["loss"],
                last["loss"],
                last.get("text", ""),
                last.get("distill", ""),
                last.get("recon", ""),
                val.get("answer_accuracy", ""),
                val.get("psnr", ""),
                val.get("code_usage", ""),
                val.get("code_perplexity", ""),
                results.get("timings_s", {}).get(name, ""),
            ]
        )
    stage_table = _table(
        stage_rows,
        [
            "stage",
            "steps",
            "first loss",
            "last loss",
            "text CE",
            "distill",
            "latent MSE",
            "val answer acc.",
            "val PSNR (dB)",
            "code usage",
            "code perplexity",
            "time (s)",
        ],
    )
    jump = results.get("handover_2_1_to_2_2", {})
    jump_rows = [[k, v.get("stage2_1_last"), v.get("stage2_2_first")] for k, v in jump.items()]
    cards = []
    for item in results.get("reconstructions", []):
        cards.append(
            f'<div class="card"><div>{html.escape(item["kind"])}: {html.escape(item["name"])}</div>'
            f"{_img(out / 'reconstructions' / item['input'], 160)} {_img(out / 'reconstructions' / item['recon'], 160)}"
            f"<div>grid {item['grid'][0]}x{item['grid'][1]}, {item['codes']} codes, {item['bpp']:.3f} bits/pixel; "
            f"PSNR {item['psnr_viq']:.2f} dB (bicubic at equal bits {item['psnr_bicubic_equal_bits']:.2f}, "
            f"codec alone {item['psnr_codec']:.2f})</div></div>"
        )
    examples = results.get("qa", {}).get("final", {}).get("examples", [])
    qa_rows = [
        [e.get("task", ""), e["question"], e["answer"], e["prediction"], "yes" if e["correct"] else "no"]
        for e in examples
    ]
    timings = results.get("timings_s", {})
    page = f"""<!doctype html><html><head><meta charset="utf-8"><title>viq demo report</title>
<style>body{{font-family:sans-serif;margin:2em;max-width:1300px}} table{{border-collapse:collapse;margin:1em 0}}
td,th{{border:1px solid #ccc;padding:4px 8px;font-size:13px}} .card{{display:inline-block;margin:8px;
padding:8px;border:1px solid #ddd;font-size:12px;vertical-align:top}}</style></head><body>
<h1>viq demo</h1>
<p>A tiny ViQ trained on CPU through every stage of the paper's recipe (stage 1 text-aligned pre-training,
stage 2-1 proximal representation learning, stage 2-2 head-wise FSQ on the L∞ bottleneck, reconstruction
decoder), on a synthetic QA set, with a tiny LLM and a small pixel codec trained here (no weights can be
downloaded). Every figure stands beside the baselines that would expose it. Model fingerprint:
<code>{html.escape(str(results.get("model", {}).get("fingerprint", "")))}</code>.
Total time: {results.get("time_s", sum(timings.values())):.0f} s.</p>
<h2>Does the model read the image? Held-out questions</h2>{qa_tables(results.get("qa", {}), results.get("direct_classifier"))}
<h2>Reconstruction from codes (encoded area)</h2>{recon_table(results.get("recon", {}), results.get("codes", {}))}
<h2>Training stages</h2>{stage_table}
<h3>Stage 2-1 → 2-2 hand-over: last 2-1 step vs first 2-2 step</h3>
{_table(jump_rows, ["loss", "last stage 2-1 step", "first stage 2-2 step"])}
<h2>Loss curves</h2>{_img(curves)}
<h2>Held-out images and real photographs: input | reconstruction from codes</h2>{"".join(cards)}
<h2>Examples (final model)</h2>
{_table(qa_rows, ["task", "question", "answer", "prediction", "correct"])}
<h2>Time per step of the demo (s)</h2>{_table([[k, v] for k, v in timings.items()], ["step", "seconds"])}
</body></html>"""
    path = out / "report.html"
    path.write_text(page)
    return path
