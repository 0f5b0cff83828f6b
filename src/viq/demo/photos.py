"""Real photographs available offline, for reconstruction and evaluation.

Sources (each skipped silently when absent; nothing is ever downloaded):

* ``"scikit-image"``: the real photographs bundled in ``skimage/data`` (astronaut, camera,
  chelsea, coffee, rocket, hubble_deep_field, ...). Only files present in the installed package
  are listed; images that scikit-image would fetch from the network (eagle, lily, ...) are not.
* ``"scikit-learn"``: ``sklearn/datasets/images/{china,flower}.jpg`` (the files behind
  ``sklearn.datasets.load_sample_images``), if scikit-learn is installed.
* ``"matplotlib"``: ``grace_hopper.jpg`` from matplotlib's sample data, if present.
* ``"debian:<package>"``: JPEG/PNG/WebP wallpapers under :data:`DEBIAN_BACKGROUND_DIRS`
  (recursively), e.g. from the packages in :data:`DEBIAN_PHOTO_PACKAGES`; the package is read
  from dpkg's file lists (``"debian:unknown"`` when no listed package owns the file). KDE
  wallpaper packages ship one picture at many resolutions (``<name>/contents/images/WxH.ext``);
  only the largest one not above :data:`MAX_WALLPAPER_PIXELS` is kept per picture.

Listing reads only image headers (fast); pixels are decoded by :func:`load_photo`.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image, ImageOps

logger = logging.getLogger(__name__)

__all__ = [
    "DEBIAN_BACKGROUND_DIRS",
    "DEBIAN_PHOTO_PACKAGES",
    "SKIMAGE_PHOTOS",
    "Photo",
    "list_photos",
    "load_photo",
]

#: Debian packages with photographic wallpapers (install with apt to get more test photos).
DEBIAN_PHOTO_PACKAGES = ("mate-backgrounds", "lomiri-wallpapers-16.04", "plasma-workspace-wallpapers")
#: Where Debian wallpaper packages install their images (GNOME/MATE-style and KDE-style).
DEBIAN_BACKGROUND_DIRS = (Path("/usr/share/backgrounds"), Path("/usr/share/wallpapers"))
#: File name -> photo name of scikit-image's bundled *photographs* (synthetic images such as
#: logo, colorwheel, checkerboard, horse or the phantom are deliberately left out).
SKIMAGE_PHOTOS = {
    "astronaut.png": "astronaut",
    "brick.png": "brick",
    "camera.png": "camera",
    "chelsea.png": "chelsea",
    "clock_motion.png": "clock",
    "coffee.png": "coffee",
    "coins.png": "coins",
    "grass.png": "grass",
    "gravel.png": "gravel",
    "hubble_deep_field.jpg": "hubble_deep_field",
    "ihc.png": "immunohistochemistry",
    "moon.png": "moon",
    "motorcycle_left.png": "motorcycle_left",
    "page.png": "page",
    "retina.jpg": "retina",
    "rocket.jpg": "rocket",
    "text.png": "text",
}
SKLEARN_PHOTOS = ("china.jpg", "flower.jpg")
MATPLOTLIB_PHOTOS = ("grace_hopper.jpg",)
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp")
#: Wallpapers smaller than this on either side (px) are previews/thumbnails, not photos.
MIN_WALLPAPER_SIDE = 128
#: Preferred maximum area (px) when a KDE wallpaper package offers several resolutions.
MAX_WALLPAPER_PIXELS = 1920 * 1200
_DPKG_INFO = Path("/var/lib/dpkg/info")


@dataclass(frozen=True)
class Photo:
    """One photograph.

    Attributes:
        name: unique within its source (``"astronaut"``, ``"mate/nature/Aqua.jpg"``, ...).
        source: ``"scikit-image"``, ``"scikit-learn"``, ``"matplotlib"`` or ``"debian:<package>"``.
        size: ``(width, height)`` in px of the upright (EXIF-rotated) RGB image.
        path: image file, or ``None`` if the photo comes from ``loader``.
        loader: zero-argument callable returning the image when ``path`` is ``None``.
    """

    name: str
    source: str
    size: tuple[int, int]
    path: Path | None = None
    loader: Callable[[], Image.Image] | None = field(default=None, compare=False, repr=False)

    @property
    def file_stem(self) -> str:
        """``name`` made safe as one file name: every character outside ``[A-Za-z0-9._-]``
        (``/`` of wallpaper paths, spaces, ...) becomes ``_``; never empty, never hidden."""
        stem = re.sub(r"[^A-Za-z0-9._-]", "_", self.name).lstrip(".")
        return stem or "photo"


def _package_dir(module: str) -> Path | None:
    """Directory of an installed package, found without importing it (imports can be slow)."""
    try:
        spec = importlib.util.find_spec(module)
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations)))


def _upright_size(path: Path) -> tuple[int, int] | None:
    """``(width, height)`` after EXIF orientation, from the header only; ``None`` if unreadable."""
    try:
        with Image.open(path) as im:
            w, h = im.size
            # EXIF orientations 5-8 are transposed (rotated by 90 degrees).
            if im.getexif().get(0x0112, 1) in (5, 6, 7, 8):
                w, h = h, w
            return w, h
    except (OSError, ValueError, Image.DecompressionBombError) as e:
        logger.debug("skipping unreadable image %s: %s", path, e)
        return None


def _file_photos(source: str, files: Iterable[tuple[str, Path]]) -> list[Photo]:
    out = []
    for name, path in files:
        if path.is_file():
            size = _upright_size(path)
            if size is not None:
                out.append(Photo(name=name, source=source, size=size, path=path))
    return out


def _skimage_photos() -> list[Photo]:
    pkg = _package_dir("skimage")
    if pkg is None:
        return []
    data = pkg / "data"
    return _file_photos("scikit-image", ((name, data / fname) for fname, name in SKIMAGE_PHOTOS.items()))


def _sklearn_photos() -> list[Photo]:
    pkg = _package_dir("sklearn")
    if pkg is None:
        return []
    images = pkg / "datasets" / "images"
    return _file_photos("scikit-learn", ((Path(f).stem, images / f) for f in SKLEARN_PHOTOS))


def _matplotlib_photos() -> list[Photo]:
    pkg = _package_dir("matplotlib")
    if pkg is None:
        return []
    # matplotlib.get_data_path() is <package>/mpl-data; resolved by hand to avoid the import.
    sample = pkg / "mpl-data" / "sample_data"
    return _file_photos("matplotlib", ((Path(f).stem, sample / f) for f in MATPLOTLIB_PHOTOS))


def _dpkg_owners(packages: Iterable[str]) -> dict[str, str]:
    """Installed file path -> package, from dpkg's ``<package>[:arch].list`` files."""
    owners: dict[str, str] = {}
    if not _DPKG_INFO.is_dir():
        return owners
    for pkg in packages:
        for lst in sorted(_DPKG_INFO.glob(f"{pkg}.list")) + sorted(_DPKG_INFO.glob(f"{pkg}:*.list")):
            try:
                lines = lst.read_text(encoding="utf-8", errors="replace").splitlines()
            except OSError:
                continue
            for line in lines:
                owners.setdefault(os.path.realpath(line.strip()), pkg)
    return owners


def _debian_photos(roots: Iterable[Path] = DEBIAN_BACKGROUND_DIRS) -> list[Photo]:
    roots = [r for r in roots if r.is_dir()]
    if not roots:
        return []
    owners = _dpkg_owners(DEBIAN_PHOTO_PACKAGES)
    candidates: list[tuple[str, Path, tuple[int, int]]] = []
    seen: set[str] = set()
    for root in roots:
        for path in sorted(root.rglob("*")):
            if path.suffix.lower() not in IMAGE_SUFFIXES or path.name.lower().startswith("screenshot"):
                continue
            real = os.path.realpath(path)
            if real in seen or not path.is_file():
                continue  # the same file reached through a symlink
            size = _upright_size(path)
            if size is None or min(size) < MIN_WALLPAPER_SIDE:
                continue
            seen.add(real)
            candidates.append((f"{root.name}/{path.relative_to(root).as_posix()}", path, size))

    # KDE packages: <pkg>/contents/images[_dark]/WxH.ext are one picture at many resolutions.
    groups: dict[str, list[tuple[str, Path, tuple[int, int]]]] = {}
    for cand in candidates:
        parent = cand[1].parent
        kde = parent.name in ("images", "images_dark") and parent.parent.name == "contents"
        groups.setdefault(str(parent) if kde else cand[0], []).append(cand)
    photos = []
    for members in groups.values():
        fitting = [m for m in members if m[2][0] * m[2][1] <= MAX_WALLPAPER_PIXELS]
        name, path, size = (
            max(fitting, key=lambda m: (m[2][0] * m[2][1], m[0]))
            if fitting
            else min(members, key=lambda m: (m[2][0] * m[2][1], m[0]))
        )
        pkg = owners.get(os.path.realpath(path), "unknown")
        photos.append(Photo(name=name, source=f"debian:{pkg}", size=size, path=path))
    return photos


def list_photos() -> list[Photo]:
    """All offline photos from every available source, sorted by ``(source, name)``."""
    photos: list[Photo] = []
    for finder in (_skimage_photos, _sklearn_photos, _matplotlib_photos, _debian_photos):
        try:
            photos.extend(finder())
        except OSError as e:  # an unreadable directory must not hide the other sources
            logger.warning("photo source %s failed: %s", finder.__name__, e)
    return sorted(photos, key=lambda p: (p.source, p.name))


def load_photo(photo: Photo) -> Image.Image:
    """Decode ``photo`` as an upright 8-bit RGB image of size ``photo.size``.

    Greyscale becomes RGB by replication; transparency is composited over white; EXIF
    orientation is applied.
    """
    if photo.path is not None:
        with Image.open(photo.path) as im:
            im.load()
            img = ImageOps.exif_transpose(im)
    elif photo.loader is not None:
        img = photo.loader()
    else:
        raise ValueError(f"photo {photo.name!r} has neither path nor loader")
    if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        img = Image.alpha_composite(background, rgba)
    return img.convert("RGB")
