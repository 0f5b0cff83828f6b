"""Training curves of a run from its ``metrics.jsonl`` (:mod:`viq.train.logger`): each loss term,
the learning rate of each module group and the code usage, as one PNG (``viq plot``)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from viq.train.logger import METRICS_FILE, read_metrics
from viq.train.losses import loss_names

__all__ = ["plot_curves"]

#: validation results drawn over the training losses they estimate
EVAL_LOSSES = {"val_text": "text", "val_distill": "distill", "latent_mse": "recon"}


def _learning_rates(records: list[dict[str, Any]]) -> dict[str, list[tuple[int, float]]]:
    """``{group: [(step, lr)]}``; an older log's single ``lr`` number is the group ``all``."""
    series: dict[str, list[tuple[int, float]]] = {}
    for r in records:
        lr = r.get("lr")
        rates = lr if isinstance(lr, dict) else {"all": lr} if isinstance(lr, (int, float)) else {}
        for group, value in rates.items():
            series.setdefault(group, []).append((r["step"], value))
    return series


def plot_curves(run_dir: str | os.PathLike[str], out: str | os.PathLike[str] | None = None) -> Path:
    """Draw the curves of the run in ``run_dir`` into ``out`` (default ``run_dir/curves.png``).

    Panels: the total loss and each loss term (validation results as markers), on a log scale
    when every value is positive; the learning rate per module group; code usage (share of the
    codebook, left axis) and code entropy (bits, right axis) for stages that quantize.

    Raises:
        FileNotFoundError: no run directory, or no ``metrics.jsonl`` in it.
        ValueError: ``metrics.jsonl`` holds no training record, or a line is not JSON.
    """
    # Figure + Agg canvas directly: the process-wide matplotlib backend is left alone.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    records = read_metrics(run_dir)
    train = [r for r in records if r.get("kind", "train") == "train" and "step" in r]
    evals = [r for r in records if r.get("kind") == "eval" and "step" in r]
    if not train:
        raise ValueError(f"{Path(run_dir) / METRICS_FILE}: no training records to plot (empty log)")
    out = Path(out) if out is not None else Path(run_dir) / "curves.png"
    steps = [r["step"] for r in train]

    fig = Figure(figsize=(15, 4.2), layout="constrained")
    FigureCanvasAgg(fig)
    ax_loss, ax_lr, ax_codes = fig.subplots(1, 3)

    values: list[float] = []
    for key in ("loss", *loss_names()):
        points = [(r["step"], r[key]) for r in train if isinstance(r.get(key), (int, float))]
        if points:
            ax_loss.plot(*zip(*points), label=key, linewidth=2.2 if key == "loss" else 1.2)
            values += [v for _, v in points]
    for key, term in EVAL_LOSSES.items():
        points = [(r["step"], r[key]) for r in evals if isinstance(r.get(key), (int, float))]
        if points:
            ax_loss.plot(*zip(*points), "o--", label=f"val {term}", markersize=4)
            values += [v for _, v in points]
    if values and min(values) > 0:
        ax_loss.set_yscale("log")
    ax_loss.set(title="loss", xlabel="step")
    ax_loss.legend(fontsize=8)

    for group, points in _learning_rates(train).items():
        ax_lr.plot(*zip(*points), label=group)
    ax_lr.set(title="learning rate", xlabel="step")
    if ax_lr.lines:
        ax_lr.legend(fontsize=8)

    usage = [(r["step"], r["code_usage"]) for r in train if isinstance(r.get("code_usage"), (int, float))]
    ax_codes.set(title="code usage", xlabel="step")
    if usage:
        ax_codes.plot(*zip(*usage), color="tab:blue", label="usage (share of codebook)")
        ax_codes.set_ylabel("share of the codebook used")
        ax_codes.set_ylim(0, 1.02)
        entropy = [
            (r["step"], r["code_entropy_bits"]) for r in train if isinstance(r.get("code_entropy_bits"), (int, float))
        ]
        if entropy:
            twin = ax_codes.twinx()
            twin.plot(*zip(*entropy), color="tab:orange", label="entropy (bits)")
            twin.set_ylabel("entropy (bits per code)")
    else:
        ax_codes.text(
            0.5, 0.5, "no codes: this stage does not quantize", ha="center", va="center", transform=ax_codes.transAxes
        )
    fig.suptitle(f"{Path(run_dir).resolve().name}: steps {steps[0]}-{steps[-1]}")
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=100)
    return out
