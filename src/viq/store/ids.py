"""The id of an image in a code store: the one rule that extraction writes and training reads.

``viq extract`` stores an image's codes under this id, and a dataset of conversations looks its
images up by the same id; if the two ever computed it differently, training would find "no codes".

* an image referenced by a data file (LLaVA record) or found in a folder: its path relative to the
  image root, with ``/`` separators (``images/cat.jpg``); a path outside the root keeps its full
  path (a relative path starting with ``..`` would be ambiguous);
* a member of a WebDataset tar shard: ``<shard file name>/<member name>``.

The store's compact index finds an id by :func:`id_hash`, a 64-bit hash of its UTF-8 bytes: CRC-32 in
the high 32 bits, Adler-32 in the low ones (stdlib ``zlib``, ~0.5 us an id where BLAKE2b or SHA-256
take ~1.5-2 us, a third of a lookup's budget). It is a search key, not a fingerprint: the index always
compares the id itself. The index files record :data:`ID_HASH`, so a change of the function is a change
of that name, and every index built with the old one is rebuilt.
"""

from __future__ import annotations

import os
import zlib
from pathlib import Path

__all__ = ["ID_HASH", "content_hash", "id_hash", "id_hash_bytes", "image_id", "tar_member_id"]

#: Name of :func:`id_hash`, recorded in index files (a different name -> the index is rebuilt).
ID_HASH = "crc32-adler32"


def image_id(path: str | os.PathLike, root: str | os.PathLike) -> str:
    """Store id of the image file ``path`` whose data file / folder is rooted at ``root``."""
    rel = os.path.relpath(path, root)
    return Path(rel).as_posix() if not rel.startswith("..") else str(path)


def content_hash(data: bytes, resize: object = None) -> str:
    """What a stored record's ``content_hash`` says the codes were made from: the sha256 hex digest of
    the image file bytes, or, for an image with a per-record ``resize`` (LLaVA data), of the bytes and
    the resize rule (``str(resize)``) -- the same file under another resize gives other pixels and other
    codes, so extraction never shares codes between them."""
    import hashlib

    digest = hashlib.sha256(data)
    if resize is not None:
        digest.update(b"\0viq-resize:" + str(resize).encode())
    return digest.hexdigest()


def tar_member_id(shard: str | os.PathLike, member: str) -> str:
    """Store id of ``member`` of the tar shard ``shard`` (only the shard's file name counts)."""
    return f"{Path(shard).name}/{member}"


def id_hash(sample_id: str) -> int:
    """64-bit hash of a store id: ``crc32(utf8) << 32 | adler32(utf8)``.

    Only a search key: the index always compares the id itself, so equal hashes never return the
    wrong image.
    """
    return id_hash_bytes(sample_id.encode("utf-8", "surrogatepass"))


def id_hash_bytes(data: bytes) -> int:
    """:func:`id_hash` of an id already encoded (UTF-8, ``surrogatepass``): the index's hot path."""
    return zlib.crc32(data) << 32 | zlib.adler32(data)
