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
    """One panel per stage (training losses per step), plus the pixel VAE's loss."""
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
        ax.set_title("pixel VAE")
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


def write_report(out: Path, results: dict[str, Any]) -> Path:
    """Write ``out/report.html`` from the demo's results (see :func:`viq.demo.run.evaluate_final`)."""
    out = Path(out)
    curves = out / "loss_curves.png"
    curves.write_bytes(loss_curves_png(results.get("stages", {}), results.get("vae_history", [])))

    stage_rows = []
    for name, s in results.get("stages", {}).items():
        first, last, val = s["history"][0], s["history"][-1], s.get("val", {})
        stage_rows.append([
            name, len(s["history"]), first["loss"], last["loss"], last.get("text", ""), last.get("distill", ""),
            last.get("recon", ""), val.get("answer_accuracy", ""), val.get("latent_mse", ""), val.get("psnr", ""),
            val.get("code_usage", ""), val.get("code_perplexity", ""), results.get("timings_s", {}).get(name, ""),
        ])
    stage_table = _table(stage_rows, ["stage", "steps", "first loss", "last loss", "text CE", "distill", "latent MSE",
                                      "val answer acc.", "val latent MSE", "val PSNR (dB)", "code usage",
                                      "code perplexity", "time (s)"])
    cards = []
    for item in results.get("reconstructions", []):
        cards.append(
            f'<div class="card"><div>{html.escape(item["kind"])}: {html.escape(item["name"])}</div>'
            f'{_img(out / item["input"], 160)} {_img(out / item["recon"], 160)}'
            f'<div>grid {item["grid"][0]}x{item["grid"][1]}, {item["codes"]} codes, {item["bytes"]} B '
            f'({item["bpp"]:.3f} bpp), PSNR {item["psnr"]:.2f} dB</div></div>'
        )
    qa = results.get("qa", {})
    qa_rows = [[e["question"], e["answer"], e["prediction"], "yes" if e["correct"] else "no"]
               for e in results.get("qa_examples", [])]
    timings = results.get("timings_s", {})
    page = f"""<!doctype html><html><head><meta charset="utf-8"><title>viq demo report</title>
<style>body{{font-family:sans-serif;margin:2em;max-width:1300px}} table{{border-collapse:collapse;margin:1em 0}}
td,th{{border:1px solid #ccc;padding:4px 8px;font-size:13px}} .card{{display:inline-block;margin:8px;
padding:8px;border:1px solid #ddd;font-size:12px;vertical-align:top}}</style></head><body>
<h1>viq demo</h1>
<p>A tiny ViQ trained on CPU through every stage of the paper's recipe (stage 1 text-aligned pre-training,
stage 2-1 proximal representation learning, stage 2-2 head-wise FSQ, reconstruction decoder), on a synthetic
QA set, with a tiny LLM and a small pixel VAE trained here (no weights can be downloaded). Numbers show that
each part runs and learns; they are not the paper's quality. Model fingerprint:
<code>{html.escape(str(results.get("model", {}).get("fingerprint", "")))}</code>.
Total time: {sum(timings.values()):.0f} s.</p>
<h2>Training stages</h2>{stage_table}
<h2>Loss curves</h2>{_img(curves)}
<h2>Held-out images and real photographs: input | reconstruction from codes</h2>{''.join(cards)}
<h2>Held-out questions (stage 2-2 model)</h2>
<p>answer accuracy {qa.get("answer_accuracy", float("nan")):.3f} on {int(qa.get("val_samples", 0))} test samples;
test text CE {qa.get("val_text", float("nan")):.3f}</p>
{_table(qa_rows, ["question", "answer", "prediction", "correct"])}
<h2>Time per step of the demo (s)</h2>{_table([[k, v] for k, v in timings.items()], ["step", "seconds"])}
</body></html>"""
    path = out / "report.html"
    path.write_text(page)
    return path
