"""Checking a dataset's images before training starts: a missing or unreadable file fails in seconds,
not hours into a run when its sample is drawn.

:func:`check_images` reads the header of every distinct image a dataset refers to (files, or image
bytes in columnar rows), on threads (I/O bound; helps on network file systems), with a progress bar.
What happens to the bad ones follows the dataset's ``on_error``: ``raise`` stops with one error naming
the first sample and file and how many are bad; ``skip`` drops the samples that use them (a warning
counts them) so that every rank, and every epoch, sees the same data.
"""

from __future__ import annotations

import logging
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from viq._progress import progress_bar
from viq.data.folder import ImageFolderDataset
from viq.data.llava import DataError, LlavaDataset, header_size

__all__ = ["check_images"]

log = logging.getLogger(__name__)


def _scan(refs: list[Any], num_threads: int, progress: bool, desc: str) -> list[str | tuple[int, int]]:

    with ThreadPoolExecutor(max_workers=max(1, min(num_threads, len(refs)))) as pool:
        results = pool.map(header_size, refs)
        return list(progress_bar(len(refs), desc, show=progress, iterable=results))


def check_images(dataset: Any, *, num_threads: int = 16, progress: bool = False) -> int:
    """Check every image of ``dataset`` (a :class:`~viq.data.llava.LlavaDataset` or
    :class:`~viq.data.folder.ImageFolderDataset`; others are left alone) and apply its ``on_error`` to
    the bad ones (module docstring). Returns the number of samples dropped (skip mode).

    Raises:
        DataError: a bad image in raise mode (the message names the sample, the file and the count).
    """
    if isinstance(dataset, LlavaDataset):
        refs = list({ref.path: ref for i in range(len(dataset)) for ref in dataset.record(i).images}.values())
        if not refs:
            return 0
        sizes = dict(zip((r.path for r in refs), _scan(refs, num_threads, progress, f"checking {dataset.path}")))
        bad = {path: why for path, why in sizes.items() if isinstance(why, str)}
        if not bad:
            return 0
        offenders = [i for i in range(len(dataset)) if any(r.path in bad for r in dataset.record(i).images)]
        first = dataset.record(offenders[0])
        path = next(r.path for r in first.images if r.path in bad)
        problem = (
            f"{first.label}: image {path}: {bad[path]} ({len(bad)} unreadable image(s) in "
            f"{len(offenders)} sample(s) of {dataset.path})"
        )
        if dataset.on_error == "raise":
            raise DataError(problem + "; fix them, or set data.on_error=skip to train without those samples")
        dataset.drop(offenders, reason="unreadable image")
        log.warning("skipping %d sample(s) with unreadable images; first: %s", len(offenders), problem)
        return len(offenders)
    if isinstance(dataset, ImageFolderDataset):
        sizes = _scan(list(dataset.files), num_threads, progress, f"checking {dataset.root}")
        unreadable: list[tuple[int, str]] = [(i, why) for i, why in enumerate(sizes) if isinstance(why, str)]
        if not unreadable:
            return 0
        i, why = unreadable[0]
        problem = f"{dataset.files[i]}: {why} ({len(unreadable)} unreadable image(s) under {dataset.root})"
        if dataset.on_error == "raise":
            raise DataError(problem + "; fix them, or set data.on_error=skip to train without them")
        dropped = {j for j, _ in unreadable}
        dataset.files = [f for j, f in enumerate(dataset.files) if j not in dropped]
        log.warning("skipping %d unreadable image(s); first: %s", len(unreadable), problem)
        return len(unreadable)
    return 0
