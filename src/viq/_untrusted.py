"""Reading files that may come from anyone: the one place for what viq trusts in a file it reads.

Every file viq reads may have been downloaded (weights, another person's run folder, a code store, a
LLaVA-style dataset). The rules, applied by every reader through the helpers here:

* **Loading never runs code.** Weights are safetensors; a ``.bin`` / ``.pt`` / ``.pth`` that must still
  be read goes through :func:`torch_load` (``torch.load(weights_only=True)``: tensors and plain
  containers only). The one pickle torch itself writes that is not a tensor file -- the ``.metadata``
  of a ``torch.distributed.checkpoint`` directory -- is read by :func:`restricted_unpickle`, which
  builds only the checkpoint-metadata classes named in :data:`DCP_METADATA_CLASSES` and refuses any
  other global (``os.system``, ``builtins.eval``, ...) before it is looked up.
* **Every size a file declares is checked before it is allocated**, against :data:`LIMITS` (each
  limit has a flag or recipe key to raise it; docs/security.md lists them).
* **JSON is parsed with a bounded nesting depth** (:func:`loads_json`): a record nested 100 000 deep
  is a one-line error naming the file, not a ``RecursionError`` traceback.
* A file refused for any of these reasons raises :class:`UntrustedFileError` (a ``ValueError``: every
  command already turns those into one ``viq: error:`` line), naming the file and the problem.
"""

from __future__ import annotations

import io
import json
import os
import pickle
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

__all__ = [
    "UntrustedFileError",
    "Limits",
    "LIMITS",
    "loads_json",
    "read_json",
    "json_depth",
    "torch_load",
    "restricted_unpickle",
    "check_image_size",
]


class UntrustedFileError(ValueError):
    """A file viq refuses to read: it would run code, or it declares more than the limits allow."""


@dataclass
class Limits:
    """Sizes a file may declare before viq refuses it. Module-wide defaults; each command that reads
    such files has a flag to raise the one it meets (named in the error message)."""

    #: Pixels of one decoded image (``.viq`` decode, reconstruction): Pillow's ``MAX_IMAGE_PIXELS``
    #: spirit (89.5 Mpx there; 2x here, since reconstructions are written, not only read).
    max_decode_pixels: int = 178_956_970
    #: Nesting depth of any JSON document or record (a chat record needs < 10).
    max_json_depth: int = 64
    #: Bytes of one JSON line of a data file (a 256k-token conversation is ~1 MB of text).
    max_json_line_bytes: int = 64 << 20
    #: Decompressed bytes of one record or archive member read into memory.
    max_member_bytes: int = 256 << 20
    #: Codes one stored record may declare (its grid x codes per patch): 2^24 is a 16k x 16k image.
    max_record_codes: int = 1 << 24
    #: Entries of a dense code histogram (``viq store stats``: int64 each), i.e. the largest codebook
    #: whose usage is counted.
    max_histogram_codes: int = 1 << 24
    #: Parameters of a model built from a config (an estimate from the config alone): 20 billion.
    max_model_parameters: int = 20_000_000_000


def _limits_from_environment(text: str) -> Limits:
    """``VIQ_LIMITS="max_decode_pixels=1e9,max_json_depth=128"``: raised (or lowered) limits."""
    limits = Limits()
    for item in filter(None, (part.strip() for part in text.split(","))):
        name, _, value = item.partition("=")
        if not hasattr(limits, name.strip()):
            raise ValueError(f"VIQ_LIMITS: unknown limit {name.strip()!r} (known: {', '.join(vars(limits))})")
        try:
            setattr(limits, name.strip(), int(float(value)))
        except ValueError:
            raise ValueError(f"VIQ_LIMITS: {item!r} is not name=number") from None
    return limits


#: The limits in force: the defaults, or those of the ``VIQ_LIMITS`` environment variable.
LIMITS = _limits_from_environment(os.environ.get("VIQ_LIMITS", ""))


def json_depth(value: Any) -> int:
    """Nesting depth of a parsed JSON value (scalars 0, ``[]`` 1), without recursion."""
    depth, stack = 0, [(value, 1)]
    while stack:
        node, level = stack.pop()
        if isinstance(node, dict):
            depth = max(depth, level)
            stack.extend((v, level + 1) for v in node.values())
        elif isinstance(node, list):
            depth = max(depth, level)
            stack.extend((v, level + 1) for v in node)
    return depth


def loads_json(text: str | bytes, source: str | Path, *, max_depth: int | None = None, **kwargs: Any) -> Any:
    """``json.loads`` for text from ``source`` (a file name, or "file:line"), refusing malformed text
    and nesting deeper than ``max_depth`` (default :data:`LIMITS`) with an :class:`UntrustedFileError`
    naming ``source``. Keyword arguments go to ``json.loads`` (``parse_constant``, ...)."""
    limit = LIMITS.max_json_depth if max_depth is None else max_depth
    try:
        value = json.loads(text, **kwargs)
    except RecursionError:
        raise UntrustedFileError(f"{source}: JSON nested deeper than {limit} levels") from None
    except (ValueError, UnicodeDecodeError) as e:  # JSONDecodeError, or what parse_constant raised
        raise UntrustedFileError(f"{source}: not valid JSON ({e})") from None
    if json_depth(value) > limit:
        raise UntrustedFileError(f"{source}: JSON nested deeper than {limit} levels")
    return value


def read_json(path: str | Path, *, max_bytes: int = 256 << 20, max_depth: int | None = None) -> Any:
    """A JSON file (configs, indexes, progress files), at most ``max_bytes`` long."""
    path = Path(path)
    size = path.stat().st_size
    if size > max_bytes:
        raise UntrustedFileError(f"{path}: {size} bytes, more than the {max_bytes} a JSON file of this kind may have")
    return loads_json(path.read_bytes(), path, max_depth=max_depth)


def torch_load(path: str | Path, **kwargs: Any) -> Any:
    """``torch.load(path, weights_only=True)``: tensors, numbers, strings and plain containers; a file
    that pickles anything else (which could run code) is refused, naming the file and the global it
    asked for. Keyword arguments go to ``torch.load`` (``map_location``, ``mmap``)."""
    import torch

    kwargs.setdefault("map_location", "cpu")
    try:
        return torch.load(path, weights_only=True, **kwargs)
    except pickle.UnpicklingError as e:
        first = str(e).strip().splitlines()
        why = next(
            (line.strip() for line in first if "GLOBAL" in line or "Unsupported" in line), first[0] if first else ""
        )
        raise UntrustedFileError(
            f"{path}: refused: it pickles more than tensors and plain values, and loading "
            f"it could run code ({why[:160]}); convert it to safetensors where it was made"
        ) from None
    except (RuntimeError, EOFError, ValueError, OSError) as e:
        if isinstance(e, FileNotFoundError):
            raise
        raise UntrustedFileError(f"{path}: not a readable torch file ({type(e).__name__}: {str(e)[:160]})") from None


#: What the ``.metadata`` pickle of a ``torch.distributed.checkpoint`` directory may build: its own
#: metadata classes, tensor sizes / dtypes / layouts / memory formats, and paths. Module prefix → names
#: ("*": any class of that module, all of them plain data classes).
DCP_METADATA_CLASSES: dict[str, set[str]] = {
    "torch.distributed.checkpoint.metadata": {"*"},
    "torch.distributed.checkpoint.filesystem": {"_StorageInfo"},
    "torch.distributed.checkpoint.planner": {"*"},
    "torch.serialization": {"_get_layout"},
    "torch": {"Size", "device"},  # dtypes, layouts and memory formats are checked by type below
    "collections": {"OrderedDict"},
    "pathlib": {"PosixPath", "PurePosixPath", "WindowsPath", "PureWindowsPath", "Path"},
    "builtins": {"set", "frozenset", "tuple", "list", "dict", "slice"},
}


class _RestrictedUnpickler(pickle.Unpickler):
    def __init__(self, file: BinaryIO, source: str, allowed: dict[str, set[str]]) -> None:
        super().__init__(file)
        self._source, self._allowed = source, allowed

    def find_class(self, module: str, name: str) -> Any:
        import torch

        names = self._allowed.get(module)
        if names is not None and ("*" in names or name in names):
            return super().find_class(module, name)
        if module == "torch":  # torch.float32 and friends, torch.strided, torch.contiguous_format
            value = getattr(torch, name, None)
            if isinstance(value, (torch.dtype, torch.layout, torch.memory_format)):
                return value
        raise UntrustedFileError(
            f"{self._source}: refused: the pickle asks for {module}.{name}, which is not "
            f"checkpoint metadata (loading it could run code)"
        )


def restricted_unpickle(data: bytes | BinaryIO, source: str | Path, allowed: dict[str, set[str]] | None = None) -> Any:
    """Unpickle ``data`` building only the classes in ``allowed`` (default :data:`DCP_METADATA_CLASSES`);
    any other global is refused before it is looked up, so nothing in the file runs."""
    file = io.BytesIO(data) if isinstance(data, (bytes, bytearray)) else data
    try:
        return _RestrictedUnpickler(file, str(source), allowed or DCP_METADATA_CLASSES).load()
    except UntrustedFileError:
        raise
    except Exception as e:  # noqa: BLE001 - whatever a damaged pickle raises, it is one error about the file
        raise UntrustedFileError(
            f"{source}: not a readable checkpoint metadata file ({type(e).__name__}: {str(e)[:120]})"
        ) from None


def printable(text: str, limit: int = 300) -> str:
    """``text`` (a name taken from an input) safe to put in a log line: control characters and
    non-printable ones escaped (a newline in a file name cannot forge a log line), at most ``limit``
    characters."""
    if text.isprintable() and len(text) <= limit:
        return text
    escaped = "".join(c if c.isprintable() else c.encode("unicode_escape").decode("ascii") for c in text)
    return escaped if len(escaped) <= limit else escaped[: limit - 3] + "..."


def check_image_size(
    height: int, width: int, source: str | Path, *, limit: int | None = None, flag: str = "--max-pixels"
) -> None:
    """Refuse an image of ``height`` x ``width`` that a file declares when it exceeds ``limit`` pixels
    (default :data:`LIMITS`), before anything of that size is allocated."""
    limit = LIMITS.max_decode_pixels if limit is None else limit
    if height <= 0 or width <= 0:
        raise UntrustedFileError(f"{source}: declares an image of {height} x {width} pixels")
    if height * width > limit:
        raise UntrustedFileError(
            f"{source}: declares an image of {height} x {width} = {height * width:,} pixels, more "
            f"than the limit of {limit:,} (raise it with {flag} if the file is yours)"
        )
