"""The one progress bar of the package (tqdm on stderr): encoding, extraction, evaluation, training
steps, the demo's fits and the commands."""

from __future__ import annotations

import sys
from collections.abc import Iterable
from typing import Any

__all__ = ["progress_bar"]


def progress_bar(
    total: int | None,
    desc: str,
    *,
    unit: str = "img",
    show: bool | None = True,
    initial: int = 0,
    leave: bool = True,
    iterable: Iterable[Any] | None = None,
) -> Any:
    """A tqdm bar over ``total`` items (None: unknown) named ``desc``, wrapping ``iterable`` when given.

    ``show``: True / False, or None to show it only when stderr is a terminal (the commands: a bar in a
    log file is noise). ``initial``: items already done (a resumed run).
    """
    from tqdm.auto import tqdm

    return tqdm(
        iterable,
        total=total,
        initial=initial,
        desc=desc,
        unit=unit,
        file=sys.stderr,
        disable=None if show is None else not show,
        dynamic_ncols=True,
        leave=leave,
    )
