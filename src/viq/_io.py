"""Durable file writes: the one place viq writes a file that readers must never see half-written.

* :func:`atomic_write`: temporary sibling -> fsync -> ``os.replace`` -> fsync of the directory.
  Replaces an existing file (keeping its permissions).
* :func:`create_exclusive`: the same, but never replaces: of several concurrent creators exactly
  one wins (hard link), the others get ``False``.
* :func:`fsync_dir`: make a rename itself durable.
* :func:`first_lock`: an exclusive advisory lock, so that processes deriving the same file (the merged
  index of a code store) derive it once: the others wait, then read what the first one wrote.

Temporary files are named ``.<name>.<random>.tmp`` next to their target, so a crash leaves only
hidden ``*.tmp`` files behind, which every reader ignores.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

__all__ = ["atomic_write", "create_exclusive", "fsync_dir", "first_lock", "TMP_SUFFIX"]

TMP_SUFFIX = ".tmp"

Writer = Callable[[str], None]


def fsync_dir(directory: str | os.PathLike) -> None:
    """Make a rename in ``directory`` durable (POSIX); silently skipped where unsupported."""
    try:
        dfd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(dfd)
    except OSError:
        pass
    finally:
        os.close(dfd)


@contextlib.contextmanager
def first_lock(candidates: list[Path]) -> Iterator[Path | None]:
    """Hold an exclusive ``flock`` on the first of ``candidates`` (lock file paths) that can be created
    and locked, for the ``with`` block; yields its path, or None where no candidate can be locked
    (read-only directories, file systems without ``flock``, non-POSIX systems): the block then runs
    unlocked, which costs duplicated work, never correctness, since what it guards is written with
    :func:`atomic_write`. The lock is released when the block ends or the process dies; lock files
    are left in place (removing one that another process waits on would let two hold it).
    """
    try:
        import fcntl
    except ImportError:  # not POSIX
        yield None
        return
    for path in candidates:
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
        except OSError:
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
        except OSError:
            os.close(fd)
            continue
        try:
            yield path
        finally:
            with contextlib.suppress(OSError):
                fcntl.flock(fd, fcntl.LOCK_UN)
            os.close(fd)
        return
    yield None


def _default_mode(path: Path) -> int:
    """The permissions of the file being replaced, else those a plain ``open()`` would give."""
    try:
        return os.stat(path).st_mode & 0o7777
    except FileNotFoundError:
        umask = os.umask(0)
        os.umask(umask)
        return 0o666 & ~umask


def _write_temporary(path: Path, content: bytes | Writer, mode: int) -> str:
    """Write ``content`` (bytes, or a function that writes the file at the path it is given) to a
    fresh temporary sibling of ``path``, fsynced, with ``mode``; returns its path."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=TMP_SUFFIX, dir=path.parent)
    try:
        if isinstance(content, (bytes, bytearray, memoryview)):
            with os.fdopen(fd, "wb") as fh:
                fd = -1  # closed by fh
                fh.write(content)
                fh.flush()
                os.fsync(fh.fileno())
        else:
            os.close(fd)
            fd = -1
            content(tmp)
            with open(tmp, "rb+") as fh:
                os.fsync(fh.fileno())
        # mkstemp creates 0600 files; permissions are cosmetic, never fail a write over them.
        with contextlib.suppress(OSError):
            os.chmod(tmp, mode)
    except BaseException:
        if fd >= 0:
            os.close(fd)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    return tmp


def atomic_write(path: str | os.PathLike, content: bytes | Writer) -> Path:
    """Write ``path`` so that readers see the old file or the whole new one, never a part.

    ``content`` is the bytes, or a function called with a temporary path that writes the file there
    (e.g. ``lambda p: image.save(p, format="PNG")``). On any failure the temporary file is removed
    and an existing ``path`` is left untouched. Returns ``path`` as a :class:`~pathlib.Path`.
    """
    path = Path(path)
    tmp = _write_temporary(path, content, _default_mode(path))
    try:
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    fsync_dir(path.parent)
    return path


def create_exclusive(path: str | os.PathLike, content: bytes, mode: int = 0o644) -> bool:
    """Atomically create ``path`` with ``content`` unless it exists; True if this call created it.

    The temporary file is hard-linked to ``path`` (``link`` fails if ``path`` exists, so concurrent
    creators cannot clobber each other). Filesystems without hard links fall back to
    ``os.replace`` (last writer wins: callers use this for content that racing creators agree on).
    """
    path = Path(path)
    tmp = _write_temporary(path, content, mode)
    try:
        try:
            os.link(tmp, path)
        except FileExistsError:
            return False
        except OSError:
            if path.exists():
                return False
            os.replace(tmp, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
    fsync_dir(path.parent)
    return True
