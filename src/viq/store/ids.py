"""The id of an image in a code store: the one rule that extraction writes and training reads.

``viq extract`` stores an image's codes under this id, and a dataset of conversations looks its
images up by the same id; if the two ever computed it differently, training would find "no codes".

* an image referenced by a data file (LLaVA record) or found in a folder: its path relative to the
  image root, with ``/`` separators (``images/cat.jpg``); a path outside the root keeps its full
  path (a relative path starting with ``..`` would be ambiguous);
* a member of a WebDataset tar shard: ``<shard file name>/<member name>``.
"""

from __future__ import annotations

import os
from pathlib import Path

__all__ = ["image_id", "tar_member_id"]


def image_id(path: str | os.PathLike, root: str | os.PathLike) -> str:
    """Store id of the image file ``path`` whose data file / folder is rooted at ``root``."""
    rel = os.path.relpath(path, root)
    return Path(rel).as_posix() if not rel.startswith("..") else str(path)


def tar_member_id(shard: str | os.PathLike, member: str) -> str:
    """Store id of ``member`` of the tar shard ``shard`` (only the shard's file name counts)."""
    return f"{Path(shard).name}/{member}"
