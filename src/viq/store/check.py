"""The ``viq store`` commands: :func:`verify_main` and :func:`stats_main` print a store's integrity
report and statistics, :func:`plot_stats` draws its code usage to a PNG.

The checks themselves are :meth:`CodeStore.verify` and :meth:`CodeStore.stats` (bodies in
:mod:`viq.store.scan`).
"""

from __future__ import annotations

import json
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from viq.store.format import PathLike, StoreError
from viq.store.reader import CodeStore

__all__ = ["plot_stats", "stats_main", "verify_main"]


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
        title += (f"; entropy {ent:.2f} bits/code, perplexity {stats['perplexity']:.0f}, "
                  f"used {stats['codebook_used_fraction']:.1%} of K")
    ax.set_title(title, fontsize=9)
    ax.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    out = Path(path_png)
    fig.savefig(out, format="png")
    return out


def verify_main(path: PathLike) -> int:
    """``viq store verify PATH``: print the report; exit code 0 = sound, 1 = problems, 2 = unopenable."""
    try:
        store = CodeStore.open(path, "r")
    except StoreError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    report = store.verify()
    print(report.summary())
    return 0 if report.ok else 1


def _fmt(value: Any, spec: str) -> str:
    return "n/a" if value is None else format(value, spec)


def stats_main(path: PathLike, plot: str | None = None, as_json: bool = False) -> int:
    """``viq store stats PATH [--plot PNG] [--json]``: print statistics; exit code 0, or 2 on error.

    ``as_json`` prints one JSON object: :meth:`CodeStore.stats` without the histogram.
    """
    try:
        store = CodeStore.open(path, "r")
        stats = store.stats()
    except StoreError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if plot:
        plot_stats(stats, plot)
    if as_json:
        print(json.dumps({k: v for k, v in stats.items() if k != "histogram"}, indent=2))
        return 0
    lines = [
        f"store:       {store.path}",
        (f"codes:       levels {tuple(stats['levels'])}, K = {stats['codebook_size']}, "
         f"{stats['bits_per_code']} bits/code, {'lzma' if stats['entropy_coding'] else 'packed'} records"),
        (f"images:      {stats['images']} in {stats['shards']} shard(s), {stats['total_codes']} codes, "
         f"{stats['pixels']} pixels"),
        f"size:        {stats['store_bytes']} bytes on disk, {stats['payload_bytes']} bytes of payload",
        (f"bits/pixel:  {_fmt(stats['bpp'], '.4f')} (store), {_fmt(stats['bpp_payload'], '.4f')} (payload), "
         f"{_fmt(stats['bpp_payload_padded'], '.4f')} (payload per padded pixel)"),
        (f"bits/code:   {_fmt(stats['payload_bits_per_code'], '.3f')} stored, "
         f"{_fmt(stats['entropy_bits'], '.3f')} entropy"),
        (f"usage:       perplexity {_fmt(stats['perplexity'], '.1f')}, {stats['codebook_used']} of "
         f"{stats['codebook_size']} codes used ({stats['codebook_used_fraction']:.1%})"),
    ]
    if plot:
        lines.append(f"plot:        {plot}")
    print("\n".join(lines))
    return 0
