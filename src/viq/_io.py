"""Durable file writes: the one place viq writes a file that readers must never see half-written.

* :func:`atomic_write`: temporary sibling -> fsync -> ``os.replace`` -> fsync of the directory.
  Replaces an existing file (keeping its permissions).
* :func:`create_exclusive`: the same, but never replaces: of several concurrent creators exactly
  one wins (hard link), the others get ``False``.
* :func:`fsync_dir`: make a rename itself durable.
* :func:`first_lock`: an exclusive advisory lock, so that processes deriving the same file (the merged
  index of a code store) derive it once: the others wait, then read what the first one wrote.
* :class:`OwnerLock`: an exclusive lock that is not waited for: the one owner of a folder or of a name
  in it (a store's writer ``rank0``, a training run's output folder); a second one gets
  :class:`LockHeld` naming the holder.
* :func:`remove_tree`: remove a temporary directory left by an interrupted or failed write.
* :func:`writing`: an ``OSError`` raised while writing names the path it was writing (a full disk
  reports ``<path>: No space left on device``).
* :func:`replace_dir`: put a fully written temporary directory in the place of another, never leaving
  the place without a complete copy (:func:`recover_dir` finishes an interrupted replacement).

Temporary files are named ``.<name>.<random>.tmp`` next to their target, so a crash leaves only
hidden ``*.tmp`` files behind, which every reader ignores.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

__all__ = [
    "atomic_write",
    "create_exclusive",
    "fsync_dir",
    "first_lock",
    "OwnerLock",
    "LockHeld",
    "remove_tree",
    "writing",
    "fsync_tree",
    "replace_dir",
    "recover_dir",
    "TMP_SUFFIX",
]

TMP_SUFFIX = ".tmp"

Writer = Callable[[str], None]


#: Opening with this flag refuses a final path component that is a symlink (ELOOP) instead of writing
#: to wherever it points: lock files and logs in a downloaded or shared folder may have been planted.
_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)


def append_line(path: str | os.PathLike, line: str) -> None:
    """Append ``line`` (a newline added) to the log file ``path``, created if missing, never through
    a symlink (``O_NOFOLLOW``: a planted link is an ``OSError`` naming ``path``)."""
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | _NOFOLLOW, 0o644)
    try:
        os.write(fd, (line + "\n").encode("utf-8"))
    finally:
        os.close(fd)


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
            fd = os.open(path, os.O_RDWR | os.O_CREAT | _NOFOLLOW, 0o666)
        except OSError:  # taken as a symlink too: a planted link is never written through
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


class LockHeld(RuntimeError):
    """Another process owns what an :class:`OwnerLock` guards; ``holder`` says who (pid, host, since)."""

    def __init__(self, path: Path, holder: str) -> None:
        super().__init__(f"{path}: held by {holder or 'another process'}")
        self.path, self.holder = path, holder


class OwnerLock:
    """Exclusive, non-waiting ownership of ``path`` (a lock file): ``flock(LOCK_EX | LOCK_NB)``, with
    the owner's pid, host and start time written into the file for whoever is refused. Released by
    :meth:`release` or by the owner's death (the kernel drops the lock of a killed process; the file stays
    and is reused). Where locks cannot be taken (no ``fcntl``, a file system without ``flock``) the
    lock is not held (``held`` False) and a warning says so: ownership is then the caller's promise.
    """

    def __init__(self, path: str | os.PathLike) -> None:
        import socket
        import time

        self.path = Path(path)
        self.held = False
        self._fd = -1
        try:
            import fcntl
        except ImportError:  # not POSIX
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        # O_NOFOLLOW: a lock file planted as a symlink is refused (ELOOP), never written through.
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | _NOFOLLOW, 0o666)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = ""
            with contextlib.suppress(OSError):
                holder = os.pread(fd, 512, 0).decode("utf-8", "replace").strip()
            os.close(fd)
            raise LockHeld(self.path, holder) from None
        except OSError as e:  # no flock on this file system
            import logging

            os.close(fd)
            logging.getLogger(__name__).warning("%s: cannot lock (%s); not guarded against a second owner", path, e)
            return
        try:
            os.ftruncate(fd, 0)
            os.pwrite(
                fd,
                f"pid {os.getpid()} on {socket.gethostname()} since {time.strftime('%Y-%m-%d %H:%M:%S')}".encode(),
                0,
            )
        except OSError as e:  # a full disk: name the lock file (pwrite's error names nothing)
            os.close(fd)
            raise OSError(e.errno, e.strerror, str(self.path)) from None
        self._fd, self.held = fd, True

    def release(self) -> None:
        if self._fd >= 0:
            with contextlib.suppress(OSError):
                os.close(self._fd)  # closing the descriptor drops the flock
            self._fd, self.held = -1, False

    def __del__(self) -> None:  # an abandoned owner (e.g. a writer object dropped) lets go
        self.release()

    def __enter__(self) -> OwnerLock:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


def remove_tree(path: str | os.PathLike) -> None:
    """Remove a directory tree if it exists (a temporary one a failed write left); errors are ignored."""
    import shutil

    shutil.rmtree(path, ignore_errors=True)


@contextlib.contextmanager
def writing(path: str | os.PathLike) -> Iterator[None]:
    """Name ``path`` in any ``OSError`` of the block that names no file (``write`` and ``fsync`` errors
    do not): ``ENOSPC`` becomes ``<path>: No space left on device``, one line at the command line."""
    try:
        yield
    except OSError as e:
        if e.filename is None:
            raise type(e)(e.errno, e.strerror or str(e), os.fspath(path)) from e
        raise
    except BaseException as e:  # torch's CheckpointException derives from BaseException
        if isinstance(e, (KeyboardInterrupt, SystemExit, GeneratorExit)):
            raise
        # Library writers do not always say so: torch's zip writer on a full disk raises
        # RuntimeError("[enforce fail at inline_container.cc] unexpected pos ..."), wrapped by the
        # checkpoint writer. A failed write on a file system with (almost) no space left is reported
        # as what it is.
        full = disk_full(path)
        if full is not None:
            raise full from e
        raise


def disk_full(path: str | os.PathLike, *, below: int = 1 << 20) -> OSError | None:
    """``OSError(ENOSPC)`` naming ``path`` when the file system that holds it (or its nearest existing
    parent) has less than ``below`` bytes free for this user; None otherwise or when unknown."""
    import errno

    where = Path(path)
    while not where.exists() and where != where.parent:
        where = where.parent
    try:
        st = os.statvfs(where)
    except (OSError, AttributeError):  # no statvfs (Windows), or the path vanished
        return None
    if st.f_bavail * st.f_frsize >= below:
        return None
    return OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), os.fspath(path))


def fsync_tree(directory: str | os.PathLike) -> None:
    """fsync every file under ``directory`` and the directories themselves."""
    for root, _dirs, files in os.walk(os.fspath(directory)):
        for name in files:
            with open(os.path.join(root, name), "rb") as fh:
                os.fsync(fh.fileno())
        fsync_dir(root)


def _aside(target: Path) -> Path:
    return target.with_name(f".{target.name}.old")


def replace_dir(tmp: str | os.PathLike, target: str | os.PathLike, *, before_swap=None) -> None:
    """Move the complete directory ``tmp`` to ``target``: a present ``target`` is first renamed aside
    (``.<name>.old``), then ``tmp`` takes its place, then the old copy is removed. A kill at any
    moment leaves a complete ``target``, or a complete copy aside that :func:`recover_dir` puts back.
    ``before_swap``: called between the two renames (a fault point for tests)."""
    tmp, target = Path(tmp), Path(target)
    aside = _aside(target)
    remove_tree(aside)
    if target.exists():
        os.replace(target, aside)
    if before_swap is not None:
        before_swap()
    os.replace(tmp, target)
    fsync_dir(target.parent)
    remove_tree(aside)


def recover_dir(target: str | os.PathLike) -> bool:
    """Finish a :func:`replace_dir` that was interrupted between its renames: put the copy set aside
    back when ``target`` is missing. True if it did."""
    target = Path(target)
    aside = _aside(target)
    if aside.is_dir() and not target.exists():
        try:
            os.replace(aside, target)
        except FileNotFoundError:  # another process of the job put it back first
            return False
        fsync_dir(target.parent)
        return True
    return False


def _default_mode(path: Path) -> int:
    """The permissions of the file being replaced, else those a plain ``open()`` would give."""
    try:
        return os.stat(path).st_mode & 0o7777
    except FileNotFoundError:
        umask = os.umask(0)
        os.umask(umask)
        return 0o666 & ~umask


def _write_temporary(path: Path, content: bytes | Writer, mode: int, sync: bool = True) -> str:
    """Write ``content`` (bytes, or a function that writes the file at the path it is given) to a
    fresh temporary sibling of ``path``, fsynced (unless ``sync`` is false), with ``mode``; returns its path."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=TMP_SUFFIX, dir=path.parent)
    try:
        if isinstance(content, (bytes, bytearray, memoryview)):
            with os.fdopen(fd, "wb") as fh:
                fd = -1  # closed by fh
                fh.write(content)
                fh.flush()
                if sync:
                    os.fsync(fh.fileno())
        else:
            os.close(fd)
            fd = -1
            content(tmp)
            if sync:
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


def atomic_write(path: str | os.PathLike, content: bytes | Writer, *, sync: bool = True) -> Path:
    """Write ``path`` so that readers see the old file or the whole new one, never a part.

    ``content`` is the bytes, or a function called with a temporary path that writes the file there
    (e.g. ``lambda p: image.save(p, format="PNG")``). On any failure the temporary file is removed
    and an existing ``path`` is left untouched. Returns ``path`` as a :class:`~pathlib.Path`.

    ``sync=False`` skips the two fsyncs (file and directory): the write is still all-or-nothing for
    readers and against a killed process, but survives a power loss only once something flushes it
    (``os.sync()``). For writers of many small files that flush once at the end.
    """
    path = Path(path)
    tmp = _write_temporary(path, content, _default_mode(path), sync)
    try:
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    if sync:
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
