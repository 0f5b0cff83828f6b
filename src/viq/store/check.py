"""A store's code usage as a picture: :func:`plot_stats` (``viq store stats --plot``).

The checks and statistics themselves are :meth:`CodeStore.verify` and :meth:`CodeStore.stats`
(bodies in :mod:`viq.store.scan`); the ``viq store`` commands that print them are in
:mod:`viq.cli.store`.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from viq.store.format import PathLike
from viq.store.reader import CodeStore

__all__ = ["plot_stats"]


def plot_stats(store: CodeStore | PathLike | Mapping[str, Any], path_png: PathLike) -> Path:
    """Draw the code usage (frequencies sorted in decreasing order, log scale) to a PNG.

    Args:
        store: a :class:`CodeStore`, a store path, or the dict returned by :meth:`CodeStore.stats`.
        path_png: output file.

    Returns:
        ``path_png`` as a Path.
    """
    # The object-oriented API with an explicit Agg canvas: no pyplot global state, and the
    # process-wide matplotlib backend is left alone.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    if isinstance(store, Mapping):
        stats = store
    else:
        st = store if isinstance(store, CodeStore) else CodeStore.open(store, "r")
        stats = st.stats()
    hist = np.asarray(stats["histogram"], dtype=np.int64)
    total = int(hist.sum())
    k = hist.size
    fig = Figure(figsize=(8, 4.5), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    if total:
        freq = np.sort(hist)[::-1] / total
        used = int(np.count_nonzero(freq))
        ax.plot(np.arange(1, used + 1), freq[:used], lw=1.2, label="codes (sorted by frequency)")
        ax.axhline(1.0 / k, color="gray", ls="--", lw=1, label=f"uniform 1/K = {1.0 / k:.2e}")
        ax.set_yscale("log")
        ax.legend(loc="upper right")
    ax.set_xlim(0, k)
    ax.set_xlabel(f"code rank (K = {k})")
    ax.set_ylabel("frequency")
    ent = stats.get("entropy_bits")
    title = f"{stats.get('images', '?')} images, {total} codes"
    if ent is not None:
        title += (
            f"; entropy {ent:.2f} bits/code, perplexity {stats['perplexity']:.0f}, "
            f"used {stats['codebook_used_fraction']:.1%} of K"
        )
    ax.set_title(title, fontsize=9)
    ax.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    out = Path(path_png)
    fig.savefig(out, format="png")
    return out
