"""All images under a folder, for reconstruction (autoencoder) training of ViQ.

Files are found recursively; only names with an image extension (:data:`IMAGE_EXTENSIONS`,
case-insensitive) are taken, hidden files and hidden folders (names starting with ``"."``, e.g.
``.ipynb_checkpoints``) are skipped, and the list is sorted by relative path (folder by folder),
so indices are reproducible across machines. Images are decoded lazily with
:func:`viq.formats.image.preprocess` (native-resolution policy of the given
:class:`~viq.formats.image.PreprocessConfig`).

Errors: :class:`~viq.data.llava.DataError` naming the file (``"<path> (index i): <problem>"``).
With ``on_error="skip"``, a file that fails to load makes ``__getitem__`` return ``None`` with a
logging warning; :func:`collate_items` drops those.
"""

from __future__ import annotations

import logging
import operator
import os
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch.utils.data import Dataset

from viq.data.llava import DataError
from viq.formats.image import IMAGE_EXTENSIONS, ImageError, PreprocessConfig
from viq.formats.image import preprocess as preprocess_image

__all__ = ["IMAGE_EXTENSIONS", "ImageFolderDataset", "ImageItem", "collate_items", "find_images"]

logger = logging.getLogger(__name__)


@dataclass
class ImageItem:
    """One image of an :class:`ImageFolderDataset`.

    Attributes:
        path: the file path (``root`` joined with the relative path).
        pixels: float32 ``(3, H, W)`` in [-1, 1] (:func:`viq.formats.image.preprocess`).
        index: the dataset index.
    """

    path: str
    pixels: torch.Tensor
    index: int


def collate_items(batch: Sequence[ImageItem | None]) -> list[ImageItem]:
    """DataLoader ``collate_fn``: drop ``None`` (failed files in skip mode), keep a plain list.

    Images have different sizes, so nothing is stacked; the result may be empty.
    """
    return [item for item in batch if item is not None]


def find_images(root: str, on_error: str) -> list[str]:
    found: list[tuple[tuple[str, ...], str]] = []

    def walk_error(err: OSError) -> None:
        # os.walk ignores unreadable folders by default; never lose data silently.
        msg = f"{getattr(err, 'filename', root)}: cannot list folder: {err.strerror or err}"
        if on_error == "raise":
            raise DataError(msg) from err
        logger.warning("skipping %s", msg)

    for dirpath, dirnames, filenames in os.walk(root, onerror=walk_error):
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]  # prune hidden folders in place
        rel_dir = os.path.relpath(dirpath, root)
        parts = () if rel_dir == os.curdir else tuple(rel_dir.split(os.sep))
        for name in filenames:
            if name.startswith(".") or os.path.splitext(name)[1].lower() not in IMAGE_EXTENSIONS:
                continue
            found.append((parts + (name,), os.path.join(dirpath, name)))
    # Sort by path components, not by the joined string, so "a/x.png" and "a-b/y.png" order
    # folder-wise and the same on every OS.
    found.sort(key=lambda item: item[0])
    return [path for _, path in found]


class ImageFolderDataset(Dataset):
    """Every image file under ``root`` (recursive; see the module docstring for the rules).

    Args:
        root: the folder.
        preprocess: how images are sized (:class:`~viq.formats.image.PreprocessConfig`).
        on_error: ``"raise"`` (default): a bad file raises :class:`DataError` naming it;
            ``"skip"``: ``__getitem__`` returns ``None`` for it and logs a warning (use
            :func:`collate_items`).

    Attributes:
        root: the folder, as given.
        files: sorted list of image file paths; ``files[i]`` is item ``i``.

    Raises:
        DataError: if ``root`` is not a folder or contains no image files.
    """

    def __init__(
        self,
        root: str | os.PathLike[str],
        *,
        preprocess: PreprocessConfig = PreprocessConfig(),
        on_error: str = "raise",
    ) -> None:
        if on_error not in ("raise", "skip"):
            raise ValueError(f"on_error must be 'raise' or 'skip', got {on_error!r}")
        if not isinstance(preprocess, PreprocessConfig):
            raise TypeError(f"preprocess must be a viq.formats.image.PreprocessConfig, got {type(preprocess).__name__}")
        self.root = os.fspath(root)
        self.preprocess = preprocess
        self.on_error = on_error
        if not os.path.isdir(self.root):
            what = "does not exist" if not os.path.exists(self.root) else "is not a folder"
            raise DataError(f"{self.root}: image folder {what}")
        self.files: list[str] = find_images(self.root, on_error)
        if not self.files:
            raise DataError(
                f"{self.root}: no image files found (recursive; extensions {', '.join(IMAGE_EXTENSIONS)}, "
                "any case; hidden files and folders are skipped)"
            )

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int) -> ImageItem | None:
        i = operator.index(index)
        n = len(self.files)
        if not -n <= i < n:
            raise IndexError(f"index {i} out of range for a dataset of {n} images")
        i %= n
        path = self.files[i]
        try:
            pixels = preprocess_image(path, self.preprocess).pixels
        except ImageError as e:
            # ImageError messages start with "<path>: "; say the path once, with the index.
            msg = f"{path} (index {i}): {str(e).removeprefix(f'{path}: ')}"
            if self.on_error == "skip":
                logger.warning("skipping image: %s", msg)
                return None
            raise DataError(msg) from e
        return ImageItem(path=path, pixels=pixels, index=i)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.root!r}, images={len(self)}, on_error={self.on_error!r})"
